//! The engine's pulse, for the dashboard's live charts: once a second, what the last
//! second did (a `stats` message on `/ws`), with the last 10 minutes kept in memory so a
//! client that connects draws its charts at once (`stats.history`). No client polls.
//!
//! Where instances share a log, each also sends a beacon each second on the cluster's
//! pulse channel (its sample, pauses, deciding plugins and partitions) and follows the
//! others': a sample then carries the cluster's figures with a per-instance breakdown,
//! and `GET /cluster` describes the group.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use crate::cluster::Channel;
use crate::domain::Priority;
use crate::engine::Engine;
use crate::log::Placement;
use crate::telemetry::WEBHOOK_OUTCOMES;

/// How often a sample is taken.
pub const EVERY: Duration = Duration::from_secs(1);
/// Samples kept: 10 minutes.
pub const KEPT: usize = 600;

/// A beacon older than this is an instance gone: it leaves the cluster's figures.
pub const STALE: Duration = Duration::from_secs(5);
/// How long a beacon may take to be acknowledged before it is given up (the next one
/// follows a second later).
const BEACON_TIMEOUT: Duration = Duration::from_secs(2);
/// A failing follow of the others' beacons is logged once per this many tries (the
/// first, then every ~5 minutes at the 30 s backoff).
const FOLLOW_WARN_EVERY: u32 = 10;

/// One second of the engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// When it was taken (unix ms), and the time since the one before: a rate times
    /// the interval is that second's count.
    pub at_ms: i64,
    pub interval_ms: f64,
    pub applied_per_s: PerPriority<f64>,
    /// Append-to-applied latency of the events applied in the second; null when none was.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Events on the log not yet processed (`queue_depth`).
    pub lag: PerPriority<u64>,
    pub conflicts_per_s: f64,
    pub dead_letters_per_s: f64,
    /// Shopify deliveries per second by outcome (`telemetry::WEBHOOK_OUTCOMES`).
    pub webhooks_per_s: BTreeMap<String, f64>,
    /// The whole group's figures, where instances share a log (none on the embedded
    /// default, and in what an instance says of itself in its beacon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSample>,
}

/// The group's second: sums of the instances' rates (latencies: the worst instance's),
/// and each instance's own figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSample {
    pub applied_per_s: PerPriority<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub conflicts_per_s: f64,
    pub dead_letters_per_s: f64,
    pub webhooks_per_s: BTreeMap<String, f64>,
    pub instances: Vec<InstanceSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceSample {
    pub instance: String,
    pub at_ms: i64,
    pub applied_per_s: PerPriority<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub conflicts_per_s: f64,
    pub dead_letters_per_s: f64,
}

/// What an instance says of itself each second on the cluster's pulse channel.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Beacon {
    pub instance: String,
    #[schema(value_type = Object)]
    pub sample: Sample,
    /// Operator pauses, as this instance follows them.
    pub paused: PerPriority<bool>,
    /// The plugin version deciding in each slot (`slot@version#sha256:…`).
    pub deciding: BTreeMap<String, String>,
    /// Each partition's lag, and which this instance consumes.
    pub placement: Option<Placement>,
}

/// A figure per priority, as the wire names them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PerPriority<T> {
    pub vip: T,
    pub normal: T,
}

/// The counters a sample is the difference of.
#[derive(Default, Clone, Copy)]
struct Totals {
    applied: [u64; 2],
    conflicts: u64,
    dead_letters: u64,
    webhooks: [u64; WEBHOOK_OUTCOMES.len()],
}

pub struct Pulse {
    history: Mutex<VecDeque<Sample>>,
    /// The last beacon of each instance (this one too) and when it came.
    members: Mutex<BTreeMap<String, (Instant, Beacon)>>,
    /// The last beacon could not be sent: said once, until one goes again.
    beacon_failing: AtomicBool,
}

impl Pulse {
    /// Starts taking samples of `engine` each second, for as long as the pulse lives.
    pub fn start(engine: Arc<Engine>) -> Arc<Self> {
        let pulse = Arc::new(Pulse {
            history: Mutex::new(VecDeque::new()),
            members: Mutex::new(BTreeMap::new()),
            beacon_failing: AtomicBool::new(false),
        });
        if let Some(cluster) = engine.cluster() {
            Self::follow(cluster.clone(), Arc::downgrade(&pulse));
        }
        let weak = Arc::downgrade(&pulse);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<(Instant, Totals)> = None;
            loop {
                tick.tick().await;
                let Some(pulse) = weak.upgrade() else { return };
                let now = (Instant::now(), Self::totals(&engine));
                if let Some(before) = last {
                    let mut sample = pulse.sample(&engine, before, now);
                    if engine.cluster().is_some() {
                        pulse.beacon(&engine, &sample);
                        sample.cluster = Some(pulse.cluster_sample());
                    }
                    let message = serde_json::json!({ "type": "stats", "sample": sample });
                    pulse.keep(sample);
                    engine.changes().notify(message.to_string());
                }
                last = Some(now);
            }
        });
        pulse
    }

    /// Follows the others' beacons, on a thread of its own: finding the pulse topic's
    /// partitions and ends may take a while (a topic just made, a broker coming back),
    /// and the engine serves meanwhile. Tried with backoff (up to 30 s) for as long as
    /// the pulse lives: until it follows, `/cluster` shows this instance alone, and the
    /// log says why every [`FOLLOW_WARN_EVERY`] tries.
    fn follow(cluster: Arc<dyn crate::cluster::Cluster>, pulse: std::sync::Weak<Pulse>) {
        let spawned = std::thread::Builder::new().name("pulse-follow".into()).spawn(move || {
            let mut wait = Duration::from_secs(1);
            for attempt in 1.. {
                let weak = pulse.clone();
                let apply = Box::new(move |payload: &[u8]| {
                    let Some(pulse) = weak.upgrade() else { return };
                    match serde_json::from_slice::<Beacon>(payload) {
                        Ok(b) => pulse.heard(b),
                        Err(e) => tracing::debug!(error = %e, "an unreadable beacon on the pulse channel"),
                    }
                });
                match cluster.follow(Channel::Pulse, apply) {
                    Ok(()) => return,
                    Err(e) => {
                        if attempt % FOLLOW_WARN_EVERY == 1 {
                            let why = "not following the cluster's pulse (figures are this instance's only)";
                            tracing::warn!(error = %e, attempt, "{why}; trying again");
                        }
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                }
                if pulse.strong_count() == 0 {
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "not following the cluster's pulse: no thread for it");
        }
    }

    /// The last 10 minutes, oldest first, as the message a new client gets first.
    pub fn history_message(&self) -> String {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({ "type": "stats.history", "samples": *history }).to_string()
    }

    fn totals(engine: &Engine) -> Totals {
        let stats = engine.stats();
        Totals {
            applied: Priority::ALL.map(|p| stats.applied_by[p].load(Ordering::Relaxed)),
            conflicts: stats.conflicts.load(Ordering::Relaxed),
            dead_letters: stats.rejected.load(Ordering::Relaxed),
            webhooks: std::array::from_fn(|i| stats.webhooks[i].load(Ordering::Relaxed)),
        }
    }

    fn sample(&self, engine: &Engine, (t0, a): (Instant, Totals), (t1, b): (Instant, Totals)) -> Sample {
        let secs = (t1 - t0).as_secs_f64().max(1e-3);
        let rate = |from: u64, to: u64| to.saturating_sub(from) as f64 / secs;
        let latency = engine.stats().take_recent_latency_ms([0.5, 0.99]);
        Sample {
            at_ms: chrono::Utc::now().timestamp_millis(),
            interval_ms: secs * 1000.0,
            applied_per_s: PerPriority {
                vip: rate(a.applied[0], b.applied[0]),
                normal: rate(a.applied[1], b.applied[1]),
            },
            latency_p50_ms: latency.map(|[p50, _]| p50),
            latency_p99_ms: latency.map(|[_, p99]| p99),
            lag: PerPriority { vip: engine.queue_depth(Priority::Vip), normal: engine.queue_depth(Priority::Normal) },
            conflicts_per_s: rate(a.conflicts, b.conflicts),
            dead_letters_per_s: rate(a.dead_letters, b.dead_letters),
            webhooks_per_s: WEBHOOK_OUTCOMES
                .iter()
                .enumerate()
                .map(|(i, o)| (o.to_string(), rate(a.webhooks[i], b.webhooks[i])))
                .collect(),
            cluster: None,
        }
    }

    /// Says this instance's second on the pulse channel (and keeps it as heard).
    fn beacon(self: &Arc<Self>, engine: &Arc<Engine>, sample: &Sample) {
        let beacon = Beacon {
            instance: engine.instance(),
            sample: sample.clone(),
            paused: PerPriority {
                vip: engine.operator_paused(Priority::Vip),
                normal: engine.operator_paused(Priority::Normal),
            },
            deciding: engine.deciding().into_iter().map(|(slot, id)| (slot.to_string(), id)).collect(),
            placement: engine.placement(),
        };
        let payload = serde_json::to_vec(&beacon).expect("a beacon serializes");
        let key = beacon.instance.clone();
        self.heard(beacon);
        let (engine, pulse) = (engine.clone(), self.clone());
        tokio::spawn(async move {
            let Some(cluster) = engine.cluster() else { return };
            let sent = tokio::time::timeout(BEACON_TIMEOUT, cluster.send_now(Channel::Pulse, &key, &payload)).await;
            let failed = match sent {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("not acknowledged in {BEACON_TIMEOUT:?}")),
            };
            let was_failing = pulse.beacon_failing.swap(failed.is_some(), Ordering::Relaxed);
            match failed {
                Some(why) if !was_failing => {
                    tracing::warn!(error = %why, "this instance's beacon did not go out; the others see it as gone")
                }
                None if was_failing => tracing::info!("this instance's beacons go out again"),
                _ => {}
            }
        });
    }

    fn heard(&self, beacon: Beacon) {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.insert(beacon.instance.clone(), (Instant::now(), beacon));
        members.retain(|_, (at, _)| at.elapsed() < STALE * 12);
    }

    /// The instances heard from within [`STALE`], by name, with how long ago.
    pub fn members(&self) -> Vec<(Duration, Beacon)> {
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.values().filter(|(at, _)| at.elapsed() < STALE).map(|(at, b)| (at.elapsed(), b.clone())).collect()
    }

    fn cluster_sample(&self) -> ClusterSample {
        let members = self.members();
        let sum = |f: fn(&Sample) -> f64| members.iter().map(|(_, b)| f(&b.sample)).sum::<f64>();
        let mut webhooks = BTreeMap::<String, f64>::new();
        for (_, b) in &members {
            for (outcome, rate) in &b.sample.webhooks_per_s {
                *webhooks.entry(outcome.clone()).or_default() += rate;
            }
        }
        ClusterSample {
            applied_per_s: PerPriority { vip: sum(|s| s.applied_per_s.vip), normal: sum(|s| s.applied_per_s.normal) },
            latency_p50_ms: members.iter().filter_map(|(_, b)| b.sample.latency_p50_ms).reduce(f64::max),
            latency_p99_ms: members.iter().filter_map(|(_, b)| b.sample.latency_p99_ms).reduce(f64::max),
            conflicts_per_s: sum(|s| s.conflicts_per_s),
            dead_letters_per_s: sum(|s| s.dead_letters_per_s),
            webhooks_per_s: webhooks,
            instances: members
                .iter()
                .map(|(_, b)| InstanceSample {
                    instance: b.instance.clone(),
                    at_ms: b.sample.at_ms,
                    applied_per_s: b.sample.applied_per_s,
                    latency_p50_ms: b.sample.latency_p50_ms,
                    latency_p99_ms: b.sample.latency_p99_ms,
                    conflicts_per_s: b.sample.conflicts_per_s,
                    dead_letters_per_s: b.sample.dead_letters_per_s,
                })
                .collect(),
        }
    }

    fn keep(&self, sample: Sample) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.len() == KEPT {
            history.pop_front();
        }
        history.push_back(sample);
    }
}
