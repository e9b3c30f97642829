//! The engine's pulse, for the dashboard's live charts: once a second, what the last
//! second did (a `stats` message on `/ws`), with the last 10 minutes kept in memory so a
//! client that connects draws its charts at once (`stats.history`). No client polls.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::domain::Priority;
use crate::engine::Engine;
use crate::telemetry::WEBHOOK_OUTCOMES;

/// How often a sample is taken.
pub const EVERY: Duration = Duration::from_secs(1);
/// Samples kept: 10 minutes.
pub const KEPT: usize = 600;

/// One second of the engine.
#[derive(Debug, Clone, Serialize)]
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
    pub webhooks_per_s: std::collections::BTreeMap<&'static str, f64>,
}

/// A figure per priority, as the wire names them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
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
}

impl Pulse {
    /// Starts taking samples of `engine` each second, for as long as the pulse lives.
    pub fn start(engine: Arc<Engine>) -> Arc<Self> {
        let pulse = Arc::new(Pulse { history: Mutex::new(VecDeque::new()) });
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
                    let sample = pulse.sample(&engine, before, now);
                    let message = serde_json::json!({ "type": "stats", "sample": sample });
                    pulse.keep(sample);
                    engine.changes().notify(message.to_string());
                }
                last = Some(now);
            }
        });
        pulse
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
                .map(|(i, o)| (*o, rate(a.webhooks[i], b.webhooks[i])))
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
