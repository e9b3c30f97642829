//! The pipeline: strict-priority scheduling over the log, the rule stage, versioned
//! writes with bounded conflict resolution, and commits after the store write.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::domain::{ChangedAt, EventKind, Order, OrderEvent, OrderFields, PerPriority, Priority};
use crate::failure::{Failure, FailureKind, Stage};
use crate::journey::{self, Conflict, Said, Trace};
use crate::log::{Delivery, LogConsumer};
use crate::ordering;
use crate::rules::{Decision, RuleError, Rulebook};
use crate::store::{Base, DeadLetter, Orders, Outcome, ParkedEvent, Parking, StoreError, Write, WriteResult};
use crate::stream::ChangeStream;
use crate::telemetry::PipelineMetrics;
use crate::whatif::recorder::Recorder;

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Most records taken from the log at once.
    pub batch_max: usize,
    /// After this many consecutive VIP batches while NORMAL waits, one NORMAL batch
    /// runs. `None` (the default) is strict priority.
    pub starvation_guard: Option<u32>,
    /// How many times a write that lost a compare-and-set is re-resolved.
    pub max_conflict_retries: u32,
    /// How long an event parked for its order's create waits before it is decided as is.
    pub park_timeout: Duration,
    /// How often parked events are looked at: those whose order appeared meanwhile (a
    /// create applied elsewhere) are applied, those past `park_timeout` decided.
    pub sweep_every: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_max: 1024,
            starvation_guard: None,
            max_conflict_retries: 16,
            park_timeout: Duration::from_secs(300),
            sweep_every: Duration::from_secs(2),
        }
    }
}

/// The most parked events one sweep takes.
const SWEEP_MAX: usize = 1000;

/// Counters the engine reports on /health and the bench reads.
#[derive(Default)]
pub struct Stats {
    pub applied: AtomicU64,
    pub skipped: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicates: AtomicU64,
    pub conflicts: AtomicU64,
    /// Creates decided as if their order were absent that were decided again against
    /// its row (it existed, or the rules did not upsert).
    pub guesses_missed: AtomicU64,
    /// Events parked to wait for their order's create, and parked events decided since.
    pub parked: AtomicU64,
    pub released: AtomicU64,
    /// Events settled (applied, skipped or rejected) per priority: a run's live progress.
    pub settled: PerPriority<AtomicU64>,
    /// Decided events the what-if recorder could not keep (it was behind, or the store
    /// refused them).
    pub cases_lost: AtomicU64,
    /// Pipeline steps (poll, process, commit) begun and ended.
    pub steps: Steps,
    /// Per priority, the step being retried, while one is (the next step of that
    /// priority that gets work done clears it).
    pub stall: std::sync::Mutex<PerPriority<Option<Stall>>>,
    /// Append-to-applied latency in µs.
    pub latency_us: std::sync::Mutex<Option<hdrhistogram::Histogram<u64>>>,
    /// Events applied per priority.
    pub applied_by: PerPriority<AtomicU64>,
    /// Shopify deliveries by audited outcome, as [`crate::telemetry::WEBHOOK_OUTCOMES`] lists them.
    pub webhooks: [AtomicU64; crate::telemetry::WEBHOOK_OUTCOMES.len()],
    /// The same latency since the engine's pulse last took it (a second's worth).
    pub recent_latency_us: std::sync::Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

impl Stats {
    /// Returns once the step under way (if any) has ended, so every later step sees
    /// a change made before this call (a purge, say). Gives up after `timeout`.
    pub async fn step_boundary(&self, timeout: Duration) -> bool {
        self.steps.boundary(timeout).await
    }

    /// Notes a failed step of `priority` (one more attempt, if it failed before).
    fn stalled(&self, cause: RetryCause, priority: Priority, e: &anyhow::Error) {
        let mut stall = self.stall.lock().unwrap_or_else(|p| p.into_inner());
        let attempts = stall[priority].as_ref().map_or(0, |s| s.attempts) + 1;
        let error = crate::error::describe(e.as_ref());
        stall[priority] = Some(Stall { cause, priority, error, attempts });
    }

    fn unstalled(&self, priority: Priority) {
        self.stall.lock().unwrap_or_else(|p| p.into_inner())[priority] = None;
    }

    /// The steps being retried, VIP's first.
    pub fn stalls(&self) -> Vec<Stall> {
        self.stall.lock().unwrap_or_else(|p| p.into_inner()).iter().flatten().cloned().collect()
    }

    pub fn new() -> Self {
        let histogram = || std::sync::Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).ok());
        Self { latency_us: histogram(), recent_latency_us: histogram(), ..Default::default() }
    }

    /// Counts a Shopify delivery, in the metric and here, by its audited outcome.
    pub fn webhook(&self, outcome: &str) {
        metrics::counter!(crate::telemetry::WEBHOOKS_RECEIVED, "outcome" => outcome.to_string()).increment(1);
        if let Some(i) = crate::telemetry::WEBHOOK_OUTCOMES.iter().position(|o| *o == outcome) {
            self.webhooks[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The latency quantiles `qs` (in ms) of the events applied since the last call, which
    /// starts the next window; None while nothing was applied.
    pub fn take_recent_latency_ms<const N: usize>(&self, qs: [f64; N]) -> Option<[f64; N]> {
        let mut recent = self.recent_latency_us.lock().unwrap_or_else(|p| p.into_inner());
        let h = recent.as_mut().filter(|h| !h.is_empty())?;
        let out = qs.map(|q| h.value_at_quantile(q) as f64 / 1000.0);
        h.reset();
        Some(out)
    }
}

/// Why the pipeline retries a step, told by the error's type ([`crate::error::is_outage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// The log or the store is away or slow: waited out briskly.
    Outage,
    /// Anything else (a refused statement, corrupt data, a bug): it will not pass by
    /// waiting, so it is tried less often and shown on `/health` until it passes.
    Fault,
}

impl RetryCause {
    fn of(e: &anyhow::Error) -> Self {
        if crate::error::is_outage(e.as_ref()) { RetryCause::Outage } else { RetryCause::Fault }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::Outage => "outage",
            RetryCause::Fault => "fault",
        }
    }

    fn max_backoff(self) -> Duration {
        match self {
            RetryCause::Outage => Duration::from_secs(5),
            RetryCause::Fault => Duration::from_secs(30),
        }
    }
}

/// A step the pipeline keeps retrying: nothing of it was committed, so its records come
/// again, in order, once it passes.
#[derive(Debug, Clone)]
pub struct Stall {
    pub cause: RetryCause,
    pub priority: Priority,
    /// The error with its sources.
    pub error: String,
    /// Failed attempts in a row.
    pub attempts: u32,
}

/// One failed step: its log line and its count by cause, emitted together.
struct StepFailed<'a> {
    cause: RetryCause,
    priority: Priority,
    error: &'a anyhow::Error,
    retry_in: Duration,
}

impl StepFailed<'_> {
    fn emit(&self) {
        let (priority, retry_in_ms) = (self.priority.label(), self.retry_in.as_millis() as u64);
        let error = crate::error::describe(self.error.as_ref());
        match self.cause {
            RetryCause::Outage => tracing::warn!(error, priority, retry_in_ms, "pipeline step failed: outage"),
            RetryCause::Fault => tracing::error!(error, priority, retry_in_ms, "pipeline step failed: fault"),
        }
        metrics::counter!(crate::telemetry::PIPELINE_RETRIES, "cause" => self.cause.as_str()).increment(1);
    }
}

/// Counts pipeline steps, bumped when one begins and again when it ends, so it is odd
/// while one is under way. A watch channel: a waiter wakes when the step ends.
pub struct Steps(watch::Sender<u64>);

impl Default for Steps {
    fn default() -> Self {
        Self(watch::Sender::new(0))
    }
}

impl Steps {
    fn bump(&self) {
        self.0.send_modify(|n| *n += 1);
    }

    /// Marks a step begun; the guard ends it on every way out, errors included.
    fn begin(&self) -> StepGuard<'_> {
        self.bump();
        StepGuard(self)
    }

    /// Whether the boundary came before the timeout.
    async fn boundary(&self, timeout: Duration) -> bool {
        let mut rx = self.0.subscribe();
        let at = *rx.borrow_and_update();
        // The sender lives as long as `self`, so this ends by a change or the timeout.
        at.is_multiple_of(2) || tokio::time::timeout(timeout, rx.wait_for(|n| *n != at)).await.is_ok()
    }
}

struct StepGuard<'a>(&'a Steps);

impl Drop for StepGuard<'_> {
    fn drop(&mut self) {
        self.0.bump();
    }
}

/// What the engine shares with its pipeline: counters, pause switches and purges.
#[derive(Clone, Default)]
pub struct Controls {
    pub stats: Arc<Stats>,
    pub pauses: Arc<Pauses>,
    pub discards: Arc<Discards>,
}

/// Per-priority pause switches: one operators set, one a run holds (NORMAL waits while
/// a run's VIP orders go first), here or, until a deadline, from another instance. Any
/// one stops the priority.
#[derive(Default)]
pub struct Pauses {
    operator: PerPriority<AtomicBool>,
    run: PerPriority<AtomicBool>,
    /// A run's hold from the cluster: until this time (unix microseconds; 0 for none).
    run_until: PerPriority<std::sync::atomic::AtomicI64>,
    /// Both priorities stop while a reset clears the log and the store: until this
    /// time (unix microseconds; 0 for none, `i64::MAX` for a reset on this instance).
    resetting: std::sync::atomic::AtomicI64,
}

impl Pauses {
    /// An operator's pause or resume.
    pub fn set(&self, p: Priority, paused: bool) {
        self.operator[p].store(paused, Ordering::SeqCst);
    }
    /// A run's hold, independent of the operator's switch.
    pub fn hold(&self, p: Priority, held: bool) {
        self.run[p].store(held, Ordering::SeqCst);
    }
    /// A run's hold from the cluster, until the time given (`None` releases it).
    pub fn hold_until(&self, p: Priority, until: Option<chrono::DateTime<chrono::Utc>>) {
        self.run_until[p].store(until.map_or(0, |t| t.timestamp_micros()), Ordering::SeqCst);
    }
    /// A reset's stop of everything, independent of the other two.
    pub fn resetting(&self, on: bool) {
        self.resetting.store(if on { i64::MAX } else { 0 }, Ordering::SeqCst);
    }
    /// Another instance's reset, until the time given (`None` ends it).
    pub fn resetting_until(&self, until: Option<chrono::DateTime<chrono::Utc>>) {
        self.resetting.store(until.map_or(0, |t| t.timestamp_micros()), Ordering::SeqCst);
    }
    pub fn is_resetting(&self) -> bool {
        self.resetting.load(Ordering::SeqCst) > chrono::Utc::now().timestamp_micros()
    }
    pub fn is_paused(&self, p: Priority) -> bool {
        self.operator[p].load(Ordering::SeqCst) || self.held(p) || self.is_resetting()
    }
    pub fn operator_paused(&self, p: Priority) -> bool {
        self.operator[p].load(Ordering::SeqCst)
    }
    pub fn held(&self, p: Priority) -> bool {
        self.run[p].load(Ordering::SeqCst)
            || self.run_until[p].load(Ordering::SeqCst) > chrono::Utc::now().timestamp_micros()
    }
}

/// Order-id prefixes whose events are dropped unprocessed: a cancelled run's purge.
#[derive(Default)]
pub struct Discards {
    prefixes: std::sync::RwLock<Vec<String>>,
    /// Events dropped so far.
    pub dropped: AtomicU64,
}

impl Discards {
    pub fn add(&self, prefix: String) {
        let mut prefixes = self.prefixes.write().unwrap_or_else(|p| p.into_inner());
        if !prefixes.contains(&prefix) {
            prefixes.push(prefix);
        }
    }

    pub fn prefixes(&self) -> Vec<String> {
        self.prefixes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn matches(&self, order_id: &str) -> bool {
        let prefixes = self.prefixes.read().unwrap_or_else(|p| p.into_inner());
        !prefixes.is_empty() && prefixes.iter().any(|p| order_id.starts_with(p.as_str()))
    }
}

pub struct Pipeline {
    pub store: Arc<dyn Orders>,
    pub parking: Arc<dyn Parking>,
    pub rulebook: Arc<Rulebook>,
    pub changes: ChangeStream,
    pub stats: Arc<Stats>,
    pub pauses: Arc<Pauses>,
    pub discards: Arc<Discards>,
    pub config: PipelineConfig,
    metrics: PipelineMetrics,
    /// Whether parked events may exist, so a round that creates orders looks for theirs.
    /// Set when this pipeline parks, and by each sweep from what it found.
    maybe_parked: AtomicBool,
    /// Keeps decided events for what-if runs, where the engine records them.
    recorder: Option<Recorder>,
}

/// One event (or undecodable record) within a batch.
#[derive(Clone)]
struct Item<'a> {
    delivery: &'a Delivery,
    event: Result<OrderEvent, String>,
    /// Set for a parked event being decided now: it is never parked again.
    parked_since: Option<DateTime<Utc>>,
}

/// The event on a record, placed where the log accepted it unless it keeps an earlier
/// place (a replayed dead letter).
fn decode(d: &Delivery) -> Result<OrderEvent, String> {
    let mut e = OrderEvent::from_log(&d.payload)?;
    e.validate()?;
    e.accepted_at.get_or_insert_with(|| match d.appended_at_us {
        us if us > 0 => crate::sqlite::from_micros(us),
        _ => Utc::now(),
    });
    Ok(e)
}

/// A batch's events, decoded, with its first round decided if it was looked at ahead.
struct Ahead {
    events: Vec<Result<OrderEvent, String>>,
    /// How many items the first round was offered, and its decisions.
    first: Option<(usize, Plan)>,
}

impl Ahead {
    /// Waits for the write sent ahead, if any, of a batch this step does not take (it
    /// failed, or stops here): no write of a step may land after the step ended, when a
    /// reset may be under way. What it wrote comes again from the commit, as duplicates.
    async fn abandon(self) {
        if let Some((_, Plan { sent: Some(sent), .. })) = self.first {
            // Its outcome changes nothing (the events come again either way); logged
            // for whoever traces why a step rewound.
            match sent.await {
                Ok(Ok(done)) => tracing::debug!(writes = done.len(), "a batch sent ahead landed; it comes again"),
                Ok(Err(e)) => tracing::debug!(error = %e, "a batch sent ahead failed; it comes again"),
                Err(e) => tracing::debug!(error = %e, "a batch sent ahead did not finish; it comes again"),
            }
        }
    }
}

/// A batch's items, from its deliveries and their decoded events.
fn items(deliveries: &[Delivery], events: Vec<Result<OrderEvent, String>>) -> Vec<Item<'_>> {
    deliveries.iter().zip(events).map(|(delivery, event)| Item { delivery, event, parked_since: None }).collect()
}

/// A round's decisions, before anything is written.
struct Plan {
    /// How many items the round took (a preempted round takes fewer).
    taken: usize,
    writes: Vec<Write>,
    /// The writes on their way to the store already (`Pipeline::send_ahead`).
    sent: Option<Sent>,
    /// One per write, in the same order.
    slots: Vec<Slot>,
    to_park: Vec<ParkedEvent>,
    /// Creates decided as if their order were absent that the rules did not upsert:
    /// decided again against the stored row (items' places in the round).
    redo: Vec<usize>,
    /// Creates decided as if their order were absent and written so: recorded for
    /// what-if runs once the write shows the order was absent indeed.
    guessed: Vec<usize>,
}

/// A store write under way in a task of its own.
type Sent = tokio::task::JoinHandle<Result<Vec<(Write, WriteResult)>, StoreError>>;

/// How a round reads the rows its events meet.
#[derive(Clone, Copy, PartialEq)]
enum Reads {
    /// A create is decided as if its order were absent, without a read: true for nearly
    /// every create, and an insert that finds the row (a second create) is decided again.
    GuessCreates,
    /// Every event reads its order's row first.
    All,
}

/// What settling one write needs besides its result.
struct Slot {
    priority: Priority,
    appended_at_us: i64,
    /// The item's place in the round, and whether its create was written as a guess.
    item: usize,
    guessed: bool,
    /// For an apply: what a lost race needs.
    pending: Option<Pending>,
    /// For a refusal: counted and logged once the store holds its record.
    failure: Option<Failure>,
}

/// What a write needs if it loses a race: the row it was based on and its change.
struct Pending {
    base: Option<Order>,
    fields: OrderFields,
    event: OrderEvent,
    decided_by: String,
    /// The event's journey so far; each lost race adds to it.
    trace: Trace,
}

impl Pipeline {
    pub fn new(
        store: Arc<dyn Orders>,
        parking: Arc<dyn Parking>,
        rulebook: Arc<Rulebook>,
        changes: ChangeStream,
        controls: Controls,
        config: PipelineConfig,
    ) -> Self {
        let Controls { stats, pauses, discards } = controls;
        let metrics = PipelineMetrics::new();
        let maybe_parked = AtomicBool::new(true);
        let recorder = None;
        Self { store, parking, rulebook, changes, stats, pauses, discards, config, metrics, maybe_parked, recorder }
    }

    /// Keeps each decided event with the row it met, for what-if runs.
    pub fn with_recorder(self, recorder: Recorder) -> Self {
        Self { recorder: Some(recorder), ..self }
    }

    /// Consumes until `shutdown` turns true; the batch in hand is finished and committed first.
    pub async fn run(self, mut consumer: Box<dyn LogConsumer>, mut shutdown: watch::Receiver<bool>) {
        let mut vip_streak = 0u32;
        // Per priority: a failed step's records wait out their backoff while the other
        // priority's may run (NORMAL's never overtake VIP's, see below).
        const FIRST_BACKOFF: Duration = Duration::from_millis(50);
        let mut backoff = PerPriority::from_fn(|_| FIRST_BACKOFF);
        let mut retry_at: PerPriority<Option<Instant>> = PerPriority::default();
        let mut last_sweep: Option<Instant> = None;
        while !*shutdown.borrow() {
            if last_sweep.is_none_or(|t| t.elapsed() >= self.config.sweep_every) {
                last_sweep = Some(Instant::now());
                let _step = self.stats.steps.begin();
                if let Err(e) = self.sweep().await {
                    tracing::warn!(error = %e, "looking at parked events failed; trying again later");
                }
            }
            for p in Priority::ALL {
                consumer.set_paused(p, self.pauses.is_paused(p));
            }
            let now = Instant::now();
            let waits = |c: &dyn LogConsumer, p| !self.pauses.is_paused(p) && c.waiting(p) > 0;
            let due = |p: Priority| retry_at[p].is_none_or(|t| now >= t);
            let (vip_waits, normal_waits) = (waits(&*consumer, Priority::Vip), waits(&*consumer, Priority::Normal));
            let (vip, normal) = (vip_waits && due(Priority::Vip), normal_waits && due(Priority::Normal));
            let guard_due = self.config.starvation_guard.is_some_and(|g| vip_streak >= g);
            let (priority, preemptible) = match (vip, normal) {
                (true, true) if guard_due => (Priority::Normal, false),
                (true, _) => (Priority::Vip, false),
                // NORMAL never overtakes VIP work, not even work waiting out a retry.
                (false, true) if !vip_waits => (Priority::Normal, true),
                _ => {
                    let nap = Duration::from_millis(100).min(self.config.sweep_every);
                    // Work is waiting out a retry: sleep until then, not on the log.
                    let retry = Priority::ALL.into_iter().filter_map(|p| retry_at[p]).filter(|t| *t > now).min();
                    match retry {
                        Some(t) => tokio::select! {
                            _ = tokio::time::sleep(nap.min(t - now)) => {}
                            _ = shutdown.changed() => {}
                        },
                        None => tokio::select! {
                            _ = consumer.wait(nap) => {}
                            _ = shutdown.changed() => {}
                        },
                    }
                    continue;
                }
            };
            vip_streak = if priority == Priority::Vip && normal { vip_streak + 1 } else { 0 };
            // A step goes on to the next batch only while nothing else is due: the other
            // priority's work, a sweep, or the shutdown.
            let more = |c: &dyn LogConsumer| {
                let others_wait = Priority::ALL.into_iter().any(|o| o != priority && waits(c, o));
                let sweep_due = last_sweep.is_none_or(|t| t.elapsed() >= self.config.sweep_every);
                !others_wait && !sweep_due && !*shutdown.borrow()
            };
            match self.step(&mut *consumer, priority, preemptible, &more).await {
                // An empty poll proves nothing about a failure: only work done clears it.
                Ok(worked) if worked || consumer.waiting(priority) == 0 => {
                    backoff[priority] = FIRST_BACKOFF;
                    retry_at[priority] = None;
                    self.stats.unstalled(priority);
                }
                Ok(_) => {}
                Err(e) => {
                    // Nothing was committed, so the same records come again, in order.
                    let cause = RetryCause::of(&e);
                    let wait = backoff[priority].min(cause.max_backoff());
                    StepFailed { cause, priority, error: &e, retry_in: wait }.emit();
                    self.stats.stalled(cause, priority, &e);
                    consumer.rewind(priority);
                    retry_at[priority] = Some(Instant::now() + wait);
                    backoff[priority] = (wait * 2).min(cause.max_backoff());
                }
            }
        }
    }

    /// Polls batches of `priority`, processes them and commits what was processed, one
    /// after another while `more` allows. While a batch's last round is written, the next
    /// batch is polled and decoded and the start of its first round decided: deciding
    /// overlaps the store's writer. Returns whether any work got done.
    async fn step(
        &self,
        consumer: &mut dyn LogConsumer,
        priority: Priority,
        preemptible: bool,
        more: &(dyn Fn(&dyn LogConsumer) -> bool + Sync),
    ) -> anyhow::Result<bool> {
        let _step = self.stats.steps.begin();
        // Checked again inside the step: a reset that stopped everything between the
        // scheduler's look and here has seen no step running, and must see none.
        if self.pauses.is_paused(priority) {
            return Ok(false);
        }
        let mut deliveries = consumer.poll(priority, self.config.batch_max).await?;
        if deliveries.is_empty() {
            return Ok(false);
        }
        // A NORMAL batch yields as soon as a VIP record is waiting (and VIP is not paused).
        let vip_waiting =
            |c: &dyn LogConsumer| preemptible && !self.pauses.is_paused(Priority::Vip) && c.waiting(Priority::Vip) > 0;
        let mut ahead = Ahead { events: self.decoded(&deliveries), first: None };
        let mut worked = false;
        loop {
            let items = items(&deliveries, ahead.events);
            // Looked at before this batch is written: a pause or a reset ends the chain here.
            let go_on = !self.pauses.is_paused(priority) && consumer.waiting(priority) > 0 && more(&*consumer);
            let (mut done, last) = self.rounds(&items, ahead.first, &|| vip_waiting(&*consumer), go_on).await?;
            let (mut looked, mut written) = (None, Ok(()));
            if let Some(plan) = last {
                let next_batch = async {
                    let next = consumer.poll(priority, self.config.batch_max).await?;
                    let mut ahead = self.look_ahead(&items, &next, &|| vip_waiting(&*consumer)).await?;
                    // The whole next batch is one round: its write goes now, behind this one.
                    if let Some((len, plan)) = &mut ahead.first
                        && *len == next.len()
                        && plan.taken == *len
                    {
                        self.send_ahead(plan);
                    }
                    anyhow::Ok((next, ahead))
                };
                let (n, next) = tokio::join!(self.round(&items[done..], plan), next_batch);
                looked = Some(next);
                written = n.map(|n| done += n);
            }
            drop(items);
            if written.is_ok() && done > 0 {
                worked = true;
                written = async {
                    self.changes.flush().await.context("relaying changes")?;
                    anyhow::Ok(consumer.commit(&deliveries[..done]).await?)
                }
                .await;
            }
            match looked {
                Some(Ok((next, next_ahead))) if written.is_ok() && done == deliveries.len() && !next.is_empty() => {
                    (deliveries, ahead) = (next, next_ahead);
                }
                looked => {
                    let (polled, failed) = match looked {
                        Some(Ok((next, ahead))) => {
                            ahead.abandon().await;
                            (!next.is_empty(), None)
                        }
                        Some(Err(e)) => (false, Some(e)),
                        None => (false, None),
                    };
                    // A batch cut short, or one polled ahead, comes again from the commit.
                    if done < deliveries.len() || polled {
                        consumer.rewind(priority);
                    }
                    written?;
                    return failed.map_or(Ok(worked), Err);
                }
            }
        }
    }

    /// Sends a round decided ahead to the store at once, behind the write under way, so
    /// that the writer goes on to it without waiting for the step to settle the one
    /// before. Its orders are not in that one (`look_ahead`), so neither write depends
    /// on the other. Not for a round that parks events: they must be parked before it.
    fn send_ahead(&self, plan: &mut Plan) {
        if plan.to_park.is_empty() && plan.sent.is_none() {
            let (store, writes) = (self.store.clone(), std::mem::take(&mut plan.writes));
            plan.sent = Some(tokio::spawn(async move { store.write(writes).await }));
        }
    }

    /// The events on `deliveries`, counted as consumed.
    fn decoded(&self, deliveries: &[Delivery]) -> Vec<Result<OrderEvent, String>> {
        for d in deliveries {
            self.metrics.consumed[d.priority].increment(1);
        }
        deliveries.iter().map(decode).collect()
    }

    /// Decodes the next batch and decides the start of its first round, while the batch
    /// in hand is written: up to the first event whose order the batch in hand holds too,
    /// since its row may be about to change.
    async fn look_ahead(
        &self,
        current: &[Item<'_>],
        next: &[Delivery],
        preempt: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<Ahead> {
        let busy: HashSet<&str> =
            current.iter().filter_map(|it| it.event.as_ref().ok()).map(|e| e.order_id.as_str()).collect();
        let items = items(next, self.decoded(next));
        let mut orders = HashSet::new();
        let free = |e: &OrderEvent| !busy.contains(e.order_id.as_str());
        let len = items
            .iter()
            .take_while(|it| it.event.as_ref().map_or(true, |e| free(e) && orders.insert(e.order_id.as_str())))
            .count();
        let first = match len {
            0 => None,
            len => Some((len, self.plan(&items[..len], preempt, Reads::GuessCreates).await?)),
        };
        Ok(Ahead { events: items.into_iter().map(|it| it.event).collect(), first })
    }

    /// Processes a prefix of `deliveries`, stopping early when `preempt` says so.
    /// Returns how many were processed (and may be committed).
    pub async fn process(&self, deliveries: &[Delivery], preempt: &(dyn Fn() -> bool + Sync)) -> anyhow::Result<usize> {
        let items = items(deliveries, self.decoded(deliveries));
        Ok(self.rounds(&items, None, preempt, false).await?.0)
    }

    /// Splits items into rounds that hold each order at most once, so every write in a
    /// round is based on the stored row and no write depends on another's outcome.
    /// `first` is the first round, decided already. Returns how many items were done,
    /// and, with `hold_last`, the last round decided but not written if it takes all it
    /// holds: the caller writes it (`round`) while it does something else.
    async fn rounds(
        &self,
        items: &[Item<'_>],
        mut first: Option<(usize, Plan)>,
        preempt: &(dyn Fn() -> bool + Sync),
        hold_last: bool,
    ) -> anyhow::Result<(usize, Option<Plan>)> {
        let mut done = 0;
        while done < items.len() {
            let (end, plan) = match first.take() {
                Some((len, plan)) => (done + len, plan),
                None => {
                    let mut orders = HashSet::new();
                    let end = done
                        + items[done..]
                            .iter()
                            .take_while(|it| it.event.as_ref().map_or(true, |e| orders.insert(e.order_id.as_str())))
                            .count()
                            .max(1);
                    (end, self.plan(&items[done..end], preempt, Reads::GuessCreates).await?)
                }
            };
            if hold_last && end == items.len() && plan.taken == end - done {
                return Ok((done, Some(plan)));
            }
            done += self.round(&items[done..end], plan).await?;
            if done < end {
                break;
            }
        }
        Ok((done, None))
    }

    /// Writes and settles a decided round. After a round that created orders, their
    /// parked events are decided, before any later event of those orders. Returns how
    /// many items the round took.
    async fn round(&self, items: &[Item<'_>], plan: Plan) -> anyhow::Result<usize> {
        let (taken, created) = self.apply(items, plan).await?;
        let releasing = items.first().is_some_and(|it| it.parked_since.is_none());
        if releasing && !created.is_empty() && self.maybe_parked.load(Ordering::Relaxed) {
            // A paused priority's parked events wait for the sweep after its resume.
            let mut parked = self.parking.parked(created).await?;
            parked.retain(|p| !self.pauses.is_paused(p.priority));
            if !parked.is_empty() {
                // Boxed: deciding parked events runs these rounds again (never deeper).
                Box::pin(self.release(parked)).await?;
            }
        }
        Ok(taken)
    }

    /// Decides parked events (their order exists now, or their wait ran out), each order's
    /// in log order, then lets them go.
    async fn release(&self, parked: Vec<ParkedEvent>) -> anyhow::Result<()> {
        let deliveries: Vec<Delivery> = parked
            .iter()
            .map(|p| Delivery {
                priority: p.priority,
                partition: 0,
                offset: p.offset,
                key: p.order_id.clone(),
                payload: p.payload.clone().into_bytes(),
                appended_at_us: p.appended_at_us,
            })
            .collect();
        let items: Vec<Item<'_>> = deliveries
            .iter()
            .zip(&parked)
            .map(|(d, p)| Item { delivery: d, event: decode(d), parked_since: Some(p.parked_at) })
            .collect();
        self.rounds(&items, None, &|| false, false).await?;
        // Their changes are relayed before they are let go: nothing redelivers them.
        self.changes.flush().await.context("relaying changes")?;
        self.parking.unpark(&parked).await?;
        for p in &parked {
            self.metrics.released[p.priority].increment(1);
        }
        self.stats.released.fetch_add(parked.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Decides the parked events whose order exists by now (its create was applied by
    /// another instance, or before a crash let go of them) or whose wait ran out.
    async fn sweep(&self) -> anyhow::Result<()> {
        let parked = self.parking.parked_oldest(SWEEP_MAX).await?;
        self.maybe_parked.store(!parked.is_empty(), Ordering::Relaxed);
        if parked.is_empty() {
            return Ok(());
        }
        let ids: HashSet<String> = parked.iter().map(|p| p.order_id.clone()).collect();
        let existing = self.store.get_many(ids.into_iter().collect()).await?;
        let now = Utc::now();
        let timeout = chrono::Duration::from_std(self.config.park_timeout).unwrap_or(chrono::Duration::MAX);
        let mut due: Vec<ParkedEvent> = parked
            .into_iter()
            .filter(|p| !self.pauses.is_paused(p.priority))
            .filter(|p| existing.contains_key(&p.order_id) || now - p.parked_at >= timeout)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        due.sort_by_key(|p| (p.appended_at_us, p.offset));
        self.release(due).await
    }

    /// A round reads as plan, write, settle: decide every event against the stored rows,
    /// write all the outcomes at once, then count, relay and resolve lost races.
    async fn process_round(
        &self,
        items: &[Item<'_>],
        preempt: &(dyn Fn() -> bool + Sync),
        reads: Reads,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        let plan = self.plan(items, preempt, reads).await?;
        self.apply(items, plan).await
    }

    /// Writes a round's decisions and settles them (see `process_round`). Returns how
    /// many items the round took, and the orders it created.
    async fn apply(&self, items: &[Item<'_>], plan: Plan) -> anyhow::Result<(usize, Vec<String>)> {
        let results = match plan.sent {
            Some(sent) => sent.await.context("the store write sent ahead")??,
            None => {
                self.park(plan.to_park).await?;
                self.store.write(plan.writes).await?
            }
        };
        let (mut created, mut redo) = self.settle(items, results, plan.slots).await?;
        if let Some(recorder) = &self.recorder {
            let held = plan.guessed.iter().filter(|i| !redo.contains(i));
            let decided: Vec<_> = held.filter_map(|&i| items[i].event.as_ref().ok()).map(|e| (e, None)).collect();
            recorder.offer(&decided);
        }
        redo.extend(plan.redo);
        if !redo.is_empty() {
            // Creates whose order exists after all: decided again, against its row, before
            // the next round can hold a later event of the same order.
            redo.sort_unstable();
            self.stats.guesses_missed.fetch_add(redo.len() as u64, Ordering::Relaxed);
            let again: Vec<Item<'_>> = redo.iter().map(|&i| items[i].clone()).collect();
            // Boxed: a round with every read made never redoes, so this goes one level deep.
            let (_, more) = Box::pin(self.process_round(&again, &|| false, Reads::All)).await?;
            created.extend(more);
        }
        Ok((plan.taken, created))
    }

    /// Decides a round's events, writing nothing.
    async fn plan(
        &self,
        items: &[Item<'_>],
        preempt: &(dyn Fn() -> bool + Sync),
        reads: Reads,
    ) -> anyhow::Result<Plan> {
        // One rules version decides the whole round: a deploy takes effect between rounds.
        let rules = self.rulebook.rules();
        let shadow = self.rulebook.shadow();
        // Read once, so the decisions below line up with the events they were made for.
        let dropped: Vec<bool> =
            items.iter().map(|it| it.event.as_ref().is_ok_and(|e| self.discards.matches(&e.order_id))).collect();
        // A round holds each order once, so a create is its order's only event here.
        let guessed: Vec<bool> = items
            .iter()
            .zip(&dropped)
            .map(|(it, d)| {
                reads == Reads::GuessCreates
                    && !*d
                    && it.parked_since.is_none()
                    && it.event.as_ref().is_ok_and(|e| e.kind == EventKind::Created)
            })
            .collect();
        let wanted: Vec<String> = items
            .iter()
            .zip(dropped.iter().zip(&guessed))
            .filter(|(_, (d, g))| !**d && !**g)
            .filter_map(|(it, _)| it.event.as_ref().ok().map(|e| e.order_id.clone()))
            .collect();
        let current = self.store.get_many(wanted).await?;
        // An event other than a create, for an order that does not exist yet, came early:
        // it waits for the create instead of being decided against nothing.
        let parks: Vec<bool> = items
            .iter()
            .zip(&dropped)
            .map(|(it, d)| {
                !*d && it.parked_since.is_none()
                    && it
                        .event
                        .as_ref()
                        .is_ok_and(|e| e.kind != EventKind::Created && !current.contains_key(&e.order_id))
            })
            .collect();
        let events: Vec<&OrderEvent> = items
            .iter()
            .zip(dropped.iter().zip(&parks))
            .filter(|(_, (d, p))| !**d && !**p)
            .filter_map(|(it, _)| it.event.as_ref().ok())
            .collect();
        let inputs: Vec<(&OrderEvent, Option<&Order>)> =
            events.iter().map(|e| (*e, current.get(&e.order_id))).collect();
        let started = Instant::now();
        let mut decisions = rules.decide_batch(&inputs).into_iter();
        self.metrics.rule_duration.record(started.elapsed().as_secs_f64());
        if let Some(shadow) = &shadow {
            // Off the hot path: the candidate decides on its own thread, or not at all.
            let batch =
                inputs.iter().zip(decisions.as_slice()).map(|((e, o), d)| ((*e).clone(), o.cloned(), d.clone()));
            shadow.offer(batch.collect());
        }

        let mut plan = Plan {
            taken: 0,
            writes: Vec::new(),
            sent: None,
            slots: Vec::new(),
            to_park: Vec::new(),
            redo: Vec::new(),
            guessed: Vec::new(),
        };
        // The events this round takes, with the rows they met: kept for what-if runs.
        let mut decided = Vec::with_capacity(inputs.len());
        for (item, ((it, dropped), park)) in items.iter().zip(dropped).zip(parks).enumerate() {
            if preempt() {
                break;
            }
            let guessed = guessed[item];
            plan.taken += 1;
            if dropped {
                self.discards.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let d = it.delivery;
            let slot = Slot {
                priority: d.priority,
                appended_at_us: d.appended_at_us,
                item,
                guessed,
                pending: None,
                failure: None,
            };
            let event = match &it.event {
                Ok(e) if park => {
                    plan.to_park.push(ParkedEvent {
                        order_id: e.order_id.clone(),
                        event_id: e.event_id.clone(),
                        priority: d.priority,
                        appended_at_us: d.appended_at_us,
                        offset: d.offset,
                        parked_at: Utc::now(),
                        payload: String::from_utf8_lossy(&d.payload).into_owned(),
                    });
                    continue;
                }
                Ok(e) => e,
                Err(reason) => {
                    let failure = Failure::new(Stage::Decode, FailureKind::Malformed, reason.clone());
                    let payload = String::from_utf8_lossy(&d.payload).into_owned();
                    let letter = failure.letter(record_id(d), Some(record_owner(d)), payload);
                    plan.writes.push(Write::Record {
                        event_id: record_id(d),
                        source: "log".into(),
                        order_id: record_owner(d),
                        outcome: Outcome::Rejected,
                        reason: failure.reason.clone(),
                        decided_by: "decoder".into(),
                        dead_letter: Some(letter),
                        trace: journey::arrived(None, d, it.parked_since),
                    });
                    plan.slots.push(Slot { failure: Some(failure), ..slot });
                    continue;
                }
            };
            let base = current.get(&event.order_id);
            let decision = decisions.next().expect("one decision per decodable event");
            if guessed {
                // Only an upsert is written on the guess; any other answer may be one the
                // stored row would have changed ("order already exists"), so it is asked
                // again with the row.
                if !matches!(decision, Ok(Decision::Upsert(_))) {
                    plan.redo.push(item);
                    continue;
                }
                plan.guessed.push(item);
            } else {
                decided.push((event, base));
            }
            let arrived = journey::arrived(Some(event), d, it.parked_since);
            let traced = |said: Said, reason: Option<&str>| Trace {
                rules: Some(journey::verdict(rules.id(), said, reason)),
                ..arrived.clone()
            };
            let refused = |failure: Failure, said: Said| {
                let trace = traced(said, Some(&failure.reason));
                (refusal(event, &failure, rules.id(), trace), Some(failure))
            };
            let skipped = |reason: String, said: Said| {
                let trace = traced(said, Some(&reason));
                record(event, Outcome::Skipped, reason, rules.id(), None, trace)
            };
            let (write, pending, failure) = match decision {
                Ok(Decision::Upsert(fields)) if superseded(base, &fields, event) => {
                    (skipped(SUPERSEDED.to_string(), Said::Upsert), None, None)
                }
                Ok(Decision::Upsert(fields)) => {
                    // A guessed create that loses is decided again, not merged: it needs
                    // nothing kept for a lost race.
                    let pending = (!guessed).then(|| Pending {
                        base: base.cloned(),
                        fields: fields.clone(),
                        event: event.clone(),
                        decided_by: rules.id().to_string(),
                        trace: traced(Said::Upsert, None),
                    });
                    let row = build_row(event, base, fields, rules.id());
                    let trace = Trace { changes: journey::changes(base, &row), ..traced(Said::Upsert, None) };
                    let (event_id, source) = (event.event_id.clone(), event.source.clone());
                    let write = Write::Apply { event_id, source, base: base.map(Base::of), row, trace };
                    (write, pending, None)
                }
                Ok(Decision::Skip(reason)) => (skipped(reason, Said::Skip), None, None),
                Ok(Decision::Reject(reason)) => {
                    let reason = match (it.parked_since, base) {
                        (Some(since), None) => format!(
                            "no created event for order {} arrived while this event was parked \
                             (since {}); then the rules said: {reason}",
                            event.order_id,
                            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                        _ => reason,
                    };
                    let failure = Failure::new(Stage::Rules, FailureKind::Rejected, reason).decided_by(rules.id());
                    let (write, failure) = refused(failure, Said::Reject);
                    (write, None, failure)
                }
                Err(RuleError { kind, message }) => {
                    // The plugin failed on this event: it alone goes to the dead letters.
                    let reason = format!("{} failed ({kind}): {message}", rules.id());
                    let failure = Failure::new(Stage::Rules, kind.into(), reason).decided_by(rules.id());
                    let (write, failure) = refused(failure, Said::Failed);
                    (write, None, failure)
                }
            };
            plan.writes.push(write);
            plan.slots.push(Slot { pending, failure, ..slot });
        }
        if let Some(recorder) = &self.recorder {
            recorder.offer(&decided);
        }
        Ok(plan)
    }

    /// Parks the events that came before their order's create.
    async fn park(&self, to_park: Vec<ParkedEvent>) -> anyhow::Result<()> {
        if to_park.is_empty() {
            return Ok(());
        }
        for p in &to_park {
            self.metrics.parked[p.priority].increment(1);
        }
        self.stats.parked.fetch_add(to_park.len() as u64, Ordering::Relaxed);
        self.parking.park(to_park).await?;
        self.maybe_parked.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Counts and relays what the store now holds, and resolves the lost races. Returns
    /// the orders this round created (or found created, on a redelivery): their parked
    /// events are due.
    /// Also returns the guessed creates whose order existed (items' places), to decide again.
    async fn settle(
        &self,
        items: &[Item<'_>],
        results: Vec<(Write, WriteResult)>,
        slots: Vec<Slot>,
    ) -> anyhow::Result<(Vec<String>, Vec<usize>)> {
        let mut created = Vec::new();
        let mut redo = Vec::new();
        for ((write, result), slot) in results.into_iter().zip(slots) {
            let Slot { priority, appended_at_us, item, guessed, pending, failure } = slot;
            // None for an undecodable record.
            let event = items[item].event.as_ref().ok();
            if guessed && matches!(result, WriteResult::Conflict(_)) {
                redo.push(item);
                continue;
            }
            if let Write::Apply { row, base: None, .. } = &write
                && matches!(result, WriteResult::Done | WriteResult::Duplicate | WriteResult::Conflict(Some(_)))
            {
                created.push(row.id.clone());
            }
            match (result, write) {
                (WriteResult::Duplicate, write) => self.duplicate(write.order_id(), priority).await?,
                (WriteResult::IdTaken(holder), write) => match event {
                    Some(event) => self.id_taken(event, holder, write.trace().clone(), priority).await?,
                    // An undecodable record's id is its log position: taken only when the
                    // log was recreated beside an older store. Its letter exists already.
                    None => {
                        let why = format!("the id of an undecodable record is held by {holder}");
                        Failure::new(Stage::Decode, FailureKind::RecordIdReused, why).emit(write.event_id());
                        self.duplicate(write.order_id(), priority).await?;
                    }
                },
                (WriteResult::Done, Write::Apply { row, .. }) => self.applied(row, priority, appended_at_us),
                (WriteResult::Done, record) => self.recorded(record, failure, priority),
                (WriteResult::Conflict(now), _) => {
                    let pending =
                        pending.ok_or_else(|| anyhow::anyhow!("store reported a conflict on a record-only write"))?;
                    self.resolve(pending, now.map(|b| *b), priority, appended_at_us).await?;
                }
            }
        }
        Ok((created, redo))
    }

    /// A redelivered event after a crash: its change may never have been published,
    /// so publish the row as it is now (clients keep the newest version).
    async fn duplicate(&self, order_id: &str, priority: Priority) -> anyhow::Result<()> {
        self.metrics.duplicate[priority].increment(1);
        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        if let Some(now) = self.store.get(order_id).await? {
            self.changes.publish(now);
        }
        Ok(())
    }

    /// A write lost its compare-and-set: merge with the stored row and retry, a bounded
    /// number of times.
    async fn resolve(
        &self,
        mut p: Pending,
        mut now: Option<Order>,
        priority: Priority,
        appended_at_us: i64,
    ) -> anyhow::Result<()> {
        let resolver = self.rulebook.resolver();
        for _ in 0..self.config.max_conflict_retries {
            self.metrics.conflicts.increment(1);
            self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            // The write that lost expected the base the change was decided on.
            let expected = p.base.as_ref().map(|b| b.version);
            let mut lost = Conflict { expected, found: now.as_ref().map(|o| o.version), resolver: None };
            let (base, merged) = match &now {
                // The row vanished under us: write the change as a fresh insert.
                None => (None, p.fields.clone()),
                Some(current) => {
                    // The resolver sees the change as newer than the stored row (each
                    // dated when it happened), once the fields that a later-placed change
                    // set are taken out of it: "the newer side wins" is then the ordering
                    // rule, field by field.
                    let place = ordering::place(&p.event);
                    let fields = ordering::without_overridden(current, p.base.as_ref(), p.fields.clone(), place);
                    let mut change = build_row(&p.event, p.base.as_ref(), fields, &p.decided_by);
                    change.updated_at = crate::sqlite::from_micros(place);
                    let stored = Order { updated_at: crate::sqlite::from_micros(place - 1_000), ..current.clone() };
                    let started = Instant::now();
                    let merged = resolver.resolve(p.base.as_ref(), &stored, &change);
                    self.metrics.rule_duration.record(started.elapsed().as_secs_f64());
                    let refused = |kind: FailureKind, reason: String| {
                        Failure::new(Stage::Resolver, kind, reason).decided_by(resolver.id())
                    };
                    let settled = match merged {
                        Ok(Ok(merged)) if merged == current.fields() => Err(Ok("no change after merge".to_string())),
                        Ok(Ok(merged)) if superseded(Some(current), &merged, &p.event) => {
                            Err(Ok(SUPERSEDED.to_string()))
                        }
                        Ok(Ok(merged)) => Ok(merged),
                        Ok(Err(reason)) => Err(Err((Said::Reject, refused(FailureKind::ConflictRejected, reason)))),
                        Err(RuleError { kind, message }) => {
                            let reason = format!("{} failed ({kind}): {message}", resolver.id());
                            Err(Err((Said::Failed, refused(kind.into(), reason))))
                        }
                    };
                    let (said, reason) = match &settled {
                        Ok(_) => (Said::Merge, None),
                        Err(Ok(reason)) => (Said::Skip, Some(reason.as_str())),
                        Err(Err((said, failure))) => (*said, Some(failure.reason.as_str())),
                    };
                    lost.resolver = Some(journey::verdict(resolver.id(), said, reason));
                    match settled {
                        Ok(merged) => (Some(Base::of(current)), merged),
                        Err(Ok(reason)) => {
                            p.trace.conflicts.push(lost);
                            let skip = record(&p.event, Outcome::Skipped, reason, resolver.id(), None, p.trace);
                            return self.write_record(skip, None, priority).await;
                        }
                        Err(Err((_, failure))) => {
                            p.trace.conflicts.push(lost);
                            let record = refusal(&p.event, &failure, resolver.id(), p.trace);
                            return self.write_record(record, Some(failure), priority).await;
                        }
                    }
                }
            };
            p.trace.conflicts.push(lost);
            let row = build_row(&p.event, now.as_ref(), merged.clone(), resolver.id());
            let w = Write::Apply {
                event_id: p.event.event_id.clone(),
                source: p.event.source.clone(),
                base,
                row: row.clone(),
                trace: Trace { changes: journey::changes(now.as_ref(), &row), ..p.trace.clone() },
            };
            match self.store.write(vec![w]).await?.pop().map(|(_, r)| r) {
                Some(WriteResult::Done) => {
                    self.applied(row, priority, appended_at_us);
                    return Ok(());
                }
                Some(WriteResult::Duplicate) => {
                    // A redelivery found out only after a conflict (CQL checks its ledger last).
                    self.duplicate(&row.id, priority).await?;
                    return Ok(());
                }
                Some(WriteResult::IdTaken(holder)) => return self.id_taken(&p.event, holder, p.trace, priority).await,
                Some(WriteResult::Conflict(again)) => {
                    p.base = now;
                    p.fields = merged;
                    p.decided_by = resolver.id().to_string();
                    now = again.map(|b| *b);
                }
                None => anyhow::bail!("store returned no result for a write"),
            }
        }
        let reason = format!("compare-and-set lost {} times in a row", self.config.max_conflict_retries);
        let failure = Failure::new(Stage::Store, FailureKind::ConflictRetriesExhausted, reason);
        let record = refusal(&p.event, &failure, resolver.id(), p.trace);
        self.write_record(record, Some(failure), priority).await
    }

    /// An event whose id another order holds already: a producer's bug, never dropped.
    /// It is recorded under an id of its own (`<event id>@<order id>`) and dead-lettered,
    /// so a replay (which takes a fresh id) can still apply it.
    async fn id_taken(
        &self,
        event: &OrderEvent,
        holder: String,
        trace: Trace,
        priority: Priority,
    ) -> anyhow::Result<()> {
        let reason = format!(
            "event id {} is already used by order {holder}; event ids must be unique, so this event for order {} \
             was not applied",
            event.event_id, event.order_id
        );
        let own_id = format!("{}@{}", event.event_id, event.order_id);
        let failure = Failure::new(Stage::Store, FailureKind::EventIdReused, reason);
        let mut letter = failure.letter_for(event);
        letter.id = own_id.clone();
        let record = Write::Record {
            event_id: own_id,
            source: event.source.clone(),
            order_id: event.order_id.clone(),
            outcome: Outcome::Rejected,
            reason: failure.reason.clone(),
            decided_by: "store".into(),
            dead_letter: Some(letter),
            // What it would have changed is not what happened: the journey keeps the rest.
            trace: Trace { changes: Vec::new(), ..trace },
        };
        // Recorded before (a redelivery); or the derived id is itself taken, which only a
        // producer reusing ids on purpose gets: either way it stays a duplicate.
        self.write_record(record, Some(failure), priority).await
    }

    /// Writes one record on its own (an outcome found after a lost race) and settles it.
    /// A record the store holds already is a redelivery's.
    async fn write_record(&self, record: Write, failure: Option<Failure>, priority: Priority) -> anyhow::Result<()> {
        match self.store.write(vec![record]).await?.pop() {
            Some((record, WriteResult::Done)) => self.recorded(record, failure, priority),
            Some((record, _)) => self.duplicate(record.order_id(), priority).await?,
            None => anyhow::bail!("store returned no result for a write"),
        }
        Ok(())
    }

    /// A skip or refusal the store now holds: its failure is counted and logged, and its
    /// dead letter relayed, only now, so a write retried after an outage counts once.
    fn recorded(&self, record: Write, failure: Option<Failure>, priority: Priority) {
        if let Write::Record { event_id, outcome, dead_letter, .. } = record {
            if let Some(f) = failure {
                f.emit(&event_id);
            }
            if let Some(letter) = &dead_letter {
                self.changes.dead_letter(letter);
            }
            self.counted(outcome, priority);
        }
    }

    fn counted(&self, outcome: Outcome, priority: Priority) {
        let (counter, stat) = match outcome {
            Outcome::Skipped => (&self.metrics.skipped, &self.stats.skipped),
            Outcome::Rejected => (&self.metrics.rejected, &self.stats.rejected),
            Outcome::Applied => (&self.metrics.applied, &self.stats.applied),
        };
        counter[priority].increment(1);
        stat.fetch_add(1, Ordering::Relaxed);
        self.stats.settled[priority].fetch_add(1, Ordering::Relaxed);
    }

    fn applied(&self, row: Order, priority: Priority, appended_at_us: i64) {
        self.counted(Outcome::Applied, priority);
        self.stats.applied_by[priority].fetch_add(1, Ordering::Relaxed);
        if appended_at_us > 0 {
            let us = (Utc::now().timestamp_micros() - appended_at_us).max(1) as u64;
            self.metrics.latency[priority].record(us as f64 / 1e6);
            for histogram in [&self.stats.latency_us, &self.stats.recent_latency_us] {
                if let Some(h) = histogram.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    let _ = h.record(us);
                }
            }
        }
        self.changes.publish(row);
    }
}

/// The record of a skip or a refusal: no new row, but the event's outcome in the history.
fn record(
    event: &OrderEvent,
    outcome: Outcome,
    reason: String,
    decided_by: &str,
    letter: Option<DeadLetter>,
    trace: Trace,
) -> Write {
    Write::Record {
        event_id: event.event_id.clone(),
        source: event.source.clone(),
        order_id: event.order_id.clone(),
        outcome,
        reason,
        decided_by: decided_by.to_string(),
        dead_letter: letter,
        trace,
    }
}

/// The record of a refused event, with its dead letter.
fn refusal(event: &OrderEvent, failure: &Failure, decided_by: &str, trace: Trace) -> Write {
    let letter = Some(failure.letter_for(event));
    record(event, Outcome::Rejected, failure.reason.clone(), decided_by, letter, trace)
}

/// Names an undecodable record by its place in the log.
fn record_id(d: &Delivery) -> String {
    format!("log:{}:{}:{}", d.priority.label(), d.partition, d.offset)
}

/// The order an undecodable record is filed under: its key when that is a usable order
/// id, else its own place in the log (a keyless record from an outside producer must
/// still land somewhere, or it would stall its partition).
fn record_owner(d: &Delivery) -> String {
    match crate::domain::check_id("key", &d.key) {
        Ok(()) => d.key.clone(),
        Err(_) => record_id(d),
    }
}

/// Why an event whose every change came too late is skipped.
const SUPERSEDED: &str = "superseded: a later change (an operator's edit, or an event accepted after this one) \
                          set every field this event changes";

/// Whether the ordering rule leaves nothing of `fields`: each field they change was set by
/// a change placed after `event`.
fn superseded(base: Option<&Order>, fields: &OrderFields, event: &OrderEvent) -> bool {
    base.is_some_and(|b| {
        let now = b.fields();
        let named = ordering::Named::of(&event.payload);
        *fields != now && ordering::settle(b, fields.clone(), named, ordering::place(event)).0 == now
    })
}

/// The next version of a row from decided fields, settled field by field against `base`
/// by the ordering rule.
pub fn build_row(event: &OrderEvent, base: Option<&Order>, fields: OrderFields, decided_by: &str) -> Order {
    let place = ordering::place(event);
    let (fields, changed_at) = match base {
        Some(b) => ordering::settle(b, fields, ordering::Named::of(&event.payload), place),
        None => (fields, ChangedAt { created: place, ..ChangedAt::default() }),
    };
    Order {
        id: event.order_id.clone(),
        shopify_order_id: fields.shopify_order_id,
        customer: fields.customer,
        // A property of the order: its tier's at creation. A later tier change leaves it.
        priority: base.map_or(fields.tier.priority(), |b| b.priority),
        tier: fields.tier,
        status: fields.status,
        total_cents: fields.total_cents,
        shipping_fee_cents: fields.shipping_fee_cents,
        currency: fields.currency,
        note: fields.note,
        version: base.map_or(1, |b| b.version + 1),
        created_at: base.map_or(event.occurred_at, |b| b.created_at),
        updated_at: Utc::now(),
        // A change from Shopify moves Shopify's clock; other sources leave it.
        source_updated_at: if event.source == "shopify" {
            Some(base.and_then(|b| b.source_updated_at).map_or(event.occurred_at, |t| t.max(event.occurred_at)))
        } else {
            base.and_then(|b| b.source_updated_at)
        },
        decided_by: decided_by.to_string(),
        changed_at,
        // Fixed once set; a row that has none yet (older, or made by an event without
        // one) takes the first shop an event brings.
        shop: base.and_then(|b| b.shop.clone()).or_else(|| event.shop.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use async_trait::async_trait;

    use super::*;
    use crate::domain::{EventKind, OrderChange, Status, Tier};
    use crate::plugin::native::{self, NativeResolver};
    use crate::store::embedded::EmbeddedStore;
    use crate::store::memory::MemoryStore;
    use crate::store::{DeadLetters, ListQuery, Page, StoreError, StoreStats};

    /// An operator's edit of one order: the row it makes from the stored one.
    type Edit = Box<dyn Fn(&Order) -> Order + Send + Sync>;

    /// A memory store with two scripts: an operator edit that lands between the
    /// pipeline's read and its write, once (in the write of its order that comes after
    /// `skip` others); and an error every write fails with, while it is set.
    #[derive(Default)]
    struct Scripted {
        inner: MemoryStore,
        edit: std::sync::Mutex<Option<(usize, String, Edit)>>,
        fail: std::sync::Mutex<Option<fn() -> StoreError>>,
        /// The order ids the pipeline read rows of, in order.
        reads: std::sync::Mutex<Vec<String>>,
        /// While set, the next write waits for `open` before it lands.
        hold: AtomicBool,
        open: tokio::sync::Notify,
        /// The orders of the writes that landed, in order.
        landed: std::sync::Mutex<Vec<String>>,
    }

    impl Scripted {
        fn racing(skip: usize, order_id: &str, edit: Edit) -> Self {
            Self { edit: std::sync::Mutex::new(Some((skip, order_id.into(), edit))), ..Default::default() }
        }

        /// The edit, if it has not landed, for the caller to apply itself.
        fn take(&self) -> Option<Edit> {
            self.edit.lock().unwrap().take().map(|(_, _, e)| e)
        }

        fn fail_writes(&self, fail: Option<fn() -> StoreError>) {
            *self.fail.lock().unwrap() = fail;
        }

        fn reads(&self) -> Vec<String> {
            std::mem::take(&mut self.reads.lock().unwrap())
        }
    }

    /// Commits an operator's edit as `Engine::edit` does.
    async fn commit_edit(store: &MemoryStore, order_id: &str, edit: &Edit) {
        let current = store.get(order_id).await.unwrap().unwrap();
        let w = Write::Apply {
            event_id: format!("edit-{}", current.version),
            source: "operator".into(),
            base: Some(Base::of(&current)),
            row: edit(&current),
            trace: Trace::default(),
        };
        assert_eq!(store.write(vec![w]).await.unwrap()[0].1, WriteResult::Done);
    }

    #[async_trait]
    impl Orders for Scripted {
        fn backend(&self) -> &'static str {
            "scripted"
        }
        async fn get(&self, id: &str) -> Result<Option<Order>, StoreError> {
            self.inner.get(id).await
        }
        async fn get_many(&self, ids: Vec<String>) -> Result<HashMap<String, Order>, StoreError> {
            self.reads.lock().unwrap().extend(ids.iter().cloned());
            self.inner.get_many(ids).await
        }
        async fn write(&self, writes: Vec<Write>) -> Result<Vec<(Write, WriteResult)>, StoreError> {
            if self.hold.swap(false, Ordering::SeqCst) {
                self.open.notified().await;
            }
            let fail = *self.fail.lock().unwrap();
            if let Some(fail) = fail {
                return Err(fail());
            }
            let landing = {
                let mut slot = self.edit.lock().unwrap();
                let ours = slot.as_ref().is_some_and(|(_, order, _)| {
                    writes.iter().any(|w| matches!(w, Write::Apply { row, base: Some(_), .. } if row.id == *order))
                });
                match slot.as_mut() {
                    Some((skip, _, _)) if ours && *skip > 0 => {
                        *skip -= 1;
                        None
                    }
                    _ if ours => slot.take(),
                    _ => None,
                }
            };
            if let Some((_, order, edit)) = landing {
                commit_edit(&self.inner, &order, &edit).await;
            }
            let orders: Vec<String> = writes.iter().map(|w| w.order_id().to_string()).collect();
            let results = self.inner.write(writes).await?;
            self.landed.lock().unwrap().extend(orders);
            Ok(results)
        }
        async fn history(
            &self,
            id: &str,
            limit: usize,
            cursor: Option<String>,
        ) -> Result<Page<crate::store::HistoryEntry>, StoreError> {
            self.inner.history(id, limit, cursor).await
        }
        async fn list(&self, q: ListQuery) -> Result<Page<Order>, StoreError> {
            self.inner.list(q).await
        }
        async fn stats(&self) -> Result<StoreStats, StoreError> {
            self.inner.stats().await
        }

        async fn counts(&self) -> Result<crate::store::OrderCounts, StoreError> {
            self.inner.counts().await
        }
    }

    fn delivery(offset: u64, e: &OrderEvent) -> Delivery {
        Delivery {
            priority: Priority::Normal,
            partition: 0,
            offset,
            key: e.order_id.clone(),
            payload: serde_json::to_vec(e).unwrap(),
            appended_at_us: 0,
        }
    }

    /// A pipeline with the native rules over one store for its rows and parked events.
    fn native_pipeline<S: Orders + Parking>(store: Arc<S>, config: PipelineConfig) -> Pipeline {
        let parking: Arc<dyn Parking> = store.clone();
        Pipeline::new(store, parking, native::rulebook(), ChangeStream::new(16), Controls::default(), config)
    }

    /// A pipeline with the native rules over a scripted store, and the stats it keeps.
    fn scripted_pipeline(store: &Arc<Scripted>) -> (Pipeline, Arc<Stats>) {
        scripted_pipeline_with(store, PipelineConfig::default())
    }

    fn scripted_pipeline_with(store: &Arc<Scripted>, config: PipelineConfig) -> (Pipeline, Arc<Stats>) {
        let stats = Arc::new(Stats::new());
        let p = Pipeline::new(
            store.clone(),
            Arc::new(MemoryStore::default()),
            native::rulebook(),
            ChangeStream::new(16),
            Controls { stats: stats.clone(), ..Default::default() },
            config,
        );
        (p, stats)
    }

    /// Order o1 created for Ada, GOLD, 1.00.
    fn ada_created() -> OrderEvent {
        let change = OrderChange {
            customer: Some("ada".into()),
            tier: Some(Tier::Gold),
            total_cents: Some(100),
            ..Default::default()
        };
        event("c", EventKind::Created, change)
    }

    fn event(id: &str, kind: EventKind, payload: OrderChange) -> OrderEvent {
        OrderEvent {
            event_id: id.into(),
            order_id: "o1".into(),
            kind,
            source: "test".into(),
            occurred_at: Utc::now(),
            accepted_at: None,
            shop: None,
            payload,
        }
    }

    /// A create is decided as if its order were absent, without a read. One that the
    /// rules refuse, or whose insert finds the row (a second create under another event
    /// id), is decided again against the stored row: the second create is skipped as the
    /// rules say ("order already exists"), not merged as a lost race would be.
    #[tokio::test]
    async fn creates_are_decided_without_a_read_and_again_with_the_row_when_it_exists() {
        let store = Arc::new(Scripted::default());
        let (p, stats) = scripted_pipeline(&store);
        assert_eq!(p.process(&[delivery(1, &ada_created())], &|| false).await.unwrap(), 1);
        assert_eq!(store.reads(), Vec::<String>::new(), "a create reads no row");
        assert_eq!(store.get("o1").await.unwrap().map(|o| o.version), Some(1));

        let again = OrderEvent { event_id: "c2".into(), ..ada_created() };
        let negative = OrderChange { total_cents: Some(-1), ..ada_created().payload };
        let refused = OrderEvent { event_id: "c3".into(), order_id: "o2".into(), payload: negative, ..ada_created() };
        assert_eq!(p.process(&[delivery(2, &again), delivery(3, &refused)], &|| false).await.unwrap(), 2);
        assert_eq!(store.reads(), ["o1", "o2"], "read only to decide the two again");
        assert_eq!(stats.guesses_missed.load(Ordering::Relaxed), 2);
        assert_eq!(stats.conflicts.load(Ordering::Relaxed), 0, "no race was resolved");
        let history = store.history("o1", 100, None).await.unwrap().items;
        let told: Vec<_> = history.iter().map(|h| (h.event_id.as_str(), h.outcome, h.reason.as_deref())).collect();
        assert_eq!(told, [("c", Outcome::Applied, None), ("c2", Outcome::Skipped, Some("order already exists"))]);
        assert_eq!(store.get("o1").await.unwrap().map(|o| o.version), Some(1), "the second create changed nothing");
        let letter = store.inner.dead_letter("c3").await.unwrap().expect("the refused create's letter");
        assert!(letter.reason.contains("negative total_cents -1"), "{}", letter.reason);
        assert_eq!(store.get("o2").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_lost_race_is_merged_and_retried() {
        let edit: Edit = Box::new(|o| {
            let fields = OrderFields { note: "operator note".into(), ..o.fields() };
            let named = ordering::Named { note: true, ..Default::default() };
            ordering::edited(o, fields, named, ordering::edit_place(o))
        });
        let store = Arc::new(Scripted::racing(0, "o1", edit));
        let (p, stats) = scripted_pipeline(&store);
        let create = ada_created();
        let paid = event(
            "u",
            EventKind::Updated,
            OrderChange { financial_status: Some(crate::domain::FinancialStatus::Paid), ..Default::default() },
        );
        // Two events of one order: processed in two rounds, the second racing the edit.
        let deliveries = [delivery(1, &create), delivery(2, &paid)];
        assert_eq!(p.process(&deliveries, &|| false).await.unwrap(), 2);

        let row = store.get("o1").await.unwrap().unwrap();
        assert_eq!(row.version, 3);
        assert_eq!((row.status, row.note.as_str()), (Status::Confirmed, "operator note"), "both changes kept");
        assert_eq!(row.decided_by, NativeResolver::ID);
        assert_eq!(stats.conflicts.load(Ordering::Relaxed), 1);
        let versions: Vec<_> = store
            .history("o1", 100, None)
            .await
            .unwrap()
            .items
            .iter()
            .map(|h| (h.event_id.clone(), h.version))
            .collect();
        assert_eq!(versions, [("c".to_string(), 1), ("edit-1".to_string(), 2), ("u".to_string(), 3)]);
        assert!(store.take().is_none(), "the edit landed inside the pipeline's write");

        // The journey tells the race: decided on v1, lost to the edit's v2, merged by the
        // resolver, applied as v3 with the status it brought.
        let history = store.history("o1", 100, None).await.unwrap().items;
        let traced = history[2].trace.clone().expect("the pipeline's entry has a trace");
        let by = |v: &Option<crate::journey::Verdict>| v.as_ref().map(|v| (v.by.clone(), v.said));
        assert_eq!(by(&traced.rules), Some((native::NativeRules::ID.to_string(), Said::Upsert)));
        assert_eq!(traced.log.as_ref().map(|l| l.offset), Some(2));
        let [lost] = traced.conflicts.as_slice() else { panic!("one lost race: {traced:?}") };
        assert_eq!((lost.expected, lost.found), (Some(1), Some(2)));
        assert_eq!(by(&lost.resolver), Some((NativeResolver::ID.to_string(), Said::Merge)));
        let changed: Vec<_> = traced.changes.iter().map(|c| (c.field.as_str(), c.after.clone())).collect();
        assert_eq!(changed, [("status", Some(serde_json::json!("CONFIRMED")))], "against v2, only the status");
        let created = history[0].trace.clone().expect("the create's trace");
        assert!(created.conflicts.is_empty() && created.changes.iter().any(|c| c.field == "total_cents"));
        let journey = crate::journey::journey(row.clone(), history, false);
        let steps: Vec<_> = journey.events[2].steps.iter().map(|s| s.kind).collect();
        use crate::journey::StepKind::*;
        assert_eq!(steps, [Occurred, Received, Appended, Decided, Conflict, Resolved, Applied, Published]);

        // Redelivery of both (a crash before the commit) changes nothing.
        assert_eq!(p.process(&deliveries, &|| false).await.unwrap(), 2);
        assert_eq!(store.get("o1").await.unwrap().unwrap(), row);
        assert_eq!(stats.duplicates.load(Ordering::Relaxed), 2);
    }

    /// The ordering rule (README, Semantics): one set of changes makes one row, whatever
    /// the batch sizes and wherever an operator's edit lands among the pipeline's steps.
    #[tokio::test]
    async fn one_set_of_changes_makes_one_row_whatever_the_interleaving() {
        let t0 = Utc::now().timestamp_micros() - 3_600_000_000;
        let on =
            |order: &str, id: &str, kind, payload| OrderEvent { order_id: order.into(), ..event(id, kind, payload) };
        let created = |customer: &str| OrderChange {
            customer: Some(customer.into()),
            tier: Some(Tier::Gold),
            total_cents: Some(1_000),
            ..Default::default()
        };
        let note = |n: &str| OrderChange { note: Some(n.into()), ..Default::default() };
        let total = |t| OrderChange { total_cents: Some(t), ..Default::default() };
        // Two orders interleaved, so that a batch of several events holds both.
        let events = [
            on("o1", "c1", EventKind::Created, created("ada")),
            on("o2", "c2", EventKind::Created, created("bob")),
            on("o1", "n1", EventKind::Updated, note("n1")),
            on("o2", "m1", EventKind::Updated, note("m1")),
            on("o1", "t1", EventKind::Updated, total(6_000)),
            on("o1", "n3", EventKind::Updated, note("n3")),
            // The operator's edit of o1 is accepted here, after these six.
            on("o1", "t2", EventKind::Updated, total(12_000)),
            on("o2", "t3", EventKind::Updated, total(5_000)),
        ];
        let deliveries: Vec<Delivery> = events
            .iter()
            .enumerate()
            .map(|(i, e)| Delivery { appended_at_us: t0 + 1_000 * i as i64, ..delivery(i as u64, e) })
            .collect();
        let edit_place = t0 + 5_500;
        let edit = move || -> Edit {
            Box::new(move |o| {
                let fields = OrderFields { note: "op".into(), shipping_fee_cents: 50, ..o.fields() };
                let named = ordering::Named { note: true, shipping_fee_cents: true, ..Default::default() };
                ordering::edited(o, fields, named, edit_place)
            })
        };

        // Where the edit lands: after the first `n` deliveries were processed, or inside
        // the pipeline's write of o1 that comes after `n` others (its conflict path).
        #[derive(Debug, Clone, Copy)]
        enum Lands {
            After(usize),
            Inside(usize),
        }
        let run = async |batch: usize, lands: Lands| -> [(OrderFields, ChangedAt); 2] {
            let skip = match lands {
                Lands::Inside(n) => n,
                Lands::After(_) => usize::MAX,
            };
            let store = Arc::new(Scripted::racing(skip, "o1", edit()));
            let p = Pipeline::new(
                store.clone(),
                Arc::new(MemoryStore::default()),
                native::rulebook(),
                ChangeStream::new(64),
                Controls::default(),
                PipelineConfig::default(),
            );
            let process = async |from: usize, to: usize| {
                for chunk in deliveries[from..to].chunks(batch) {
                    assert_eq!(p.process(chunk, &|| false).await.unwrap(), chunk.len());
                }
            };
            // Nothing accepted after the edit can be processed before it lands.
            let before = match lands {
                Lands::After(n) => n,
                Lands::Inside(_) => 6,
            };
            process(0, before).await;
            if let Some(edit) = store.take() {
                commit_edit(&store.inner, "o1", &edit).await;
            }
            process(before, deliveries.len()).await;
            let row = async |id| {
                let o: Order = store.get(id).await.unwrap().unwrap();
                (o.fields(), o.changed_at)
            };
            [row("o1").await, row("o2").await]
        };

        let sequential = run(1, Lands::After(6)).await;
        let (o1, o2) = (&sequential[0].0, &sequential[1].0);
        assert_eq!((o1.note.as_str(), o1.total_cents, o1.shipping_fee_cents), ("op", 12_000, 599));
        assert_eq!((o2.note.as_str(), o2.total_cents, o2.shipping_fee_cents), ("m1", 5_000, 799));
        assert_eq!(sequential[0].1.note, edit_place);
        for batch in [1, 2, 3, 8] {
            for lands in (1..=6).map(Lands::After).chain((0..4).map(Lands::Inside)) {
                assert_eq!(run(batch, lands).await, sequential, "batches of {batch}, the edit landing {lands:?}");
            }
        }
    }

    /// An early event whose create was applied elsewhere (another instance) is found by
    /// the sweep; one whose wait ran out is decided as it is.
    #[tokio::test]
    async fn the_sweep_applies_parked_events_once_their_order_exists_or_their_wait_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.sqlite")).unwrap());
        let config = PipelineConfig { park_timeout: Duration::from_secs(3600), ..Default::default() };
        let p = native_pipeline(store.clone(), config);
        let note = |id: &str, order: &str| {
            let mut e = event(id, EventKind::Updated, OrderChange { note: Some(id.into()), ..Default::default() });
            e.order_id = order.into();
            e
        };
        let full = {
            let change = OrderChange {
                customer: Some("bo".into()),
                tier: Some(Tier::Silver),
                total_cents: Some(500),
                ..Default::default()
            };
            let mut e = event("full", EventKind::Updated, change);
            e.order_id = "o2".into();
            e
        };
        let batch = [delivery(1, &note("n1", "o1")), delivery(2, &note("n2", "o1")), delivery(3, &full)];
        assert_eq!(p.process(&batch, &|| false).await.unwrap(), 3);
        assert_eq!(store.stats().await.unwrap().parked, 3, "all three wait");
        assert_eq!(store.stats().await.unwrap().orders, 0);

        // o1's create lands through another writer (another instance): the sweep finds
        // it and applies n1, then n2.
        let fields = OrderFields {
            shopify_order_id: None,
            customer: "ada".into(),
            tier: Tier::Gold,
            status: Status::Pending,
            total_cents: 100,
            shipping_fee_cents: 0,
            currency: "USD".into(),
            note: String::new(),
        };
        let create = event("c", EventKind::Created, OrderChange::default());
        let row = build_row(&create, None, fields, "elsewhere");
        let w = Write::Apply { event_id: "c".into(), source: "test".into(), base: None, row, trace: Trace::default() };
        assert_eq!(store.write(vec![w]).await.unwrap()[0].1, WriteResult::Done);
        p.sweep().await.unwrap();
        let row = store.get("o1").await.unwrap().unwrap();
        assert_eq!((row.version, row.note.as_str()), (3, "n2"), "both applied, in log order");
        assert_eq!(store.stats().await.unwrap().parked, 1, "o2's event still waits");

        // o2 is never created: once the wait ends, the rules decide the event as it is,
        // and it carries enough to create the order.
        let p = Pipeline { config: PipelineConfig { park_timeout: Duration::ZERO, ..Default::default() }, ..p };
        p.sweep().await.unwrap();
        let o2 = store.get("o2").await.unwrap().expect("created by the released event");
        assert_eq!((o2.version, o2.customer.as_str()), (1, "bo"));
        assert_eq!(store.stats().await.unwrap().parked, 0);
    }

    #[tokio::test]
    async fn undecodable_records_are_dead_lettered_and_processing_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.sqlite")).unwrap());
        let p = native_pipeline(store.clone(), PipelineConfig::default());
        let create = ada_created();
        let garbage = Delivery {
            priority: Priority::Normal,
            partition: 0,
            offset: 1,
            key: "o1".into(),
            payload: b"{not json".to_vec(),
            appended_at_us: 0,
        };
        assert_eq!(p.process(&[garbage, delivery(2, &create)], &|| false).await.unwrap(), 2);
        assert_eq!(store.get("o1").await.unwrap().unwrap().version, 1);
        let letters = store.dead_letters(10, None).await.unwrap().items;
        assert_eq!(letters.len(), 1);
        assert_eq!(
            (letters[0].id.as_str(), letters[0].stage.as_str(), letters[0].error_type.as_str()),
            ("log:normal:0:1", "decode", "malformed")
        );
        assert!(
            letters[0].reason.contains("key must be a string") || letters[0].reason.contains("expected"),
            "{}",
            letters[0].reason
        );
    }

    /// A record written by a newer engine, with a field this one does not know, is
    /// applied without it (on main it was dead-lettered as malformed, which breaks a
    /// rolling upgrade).
    #[tokio::test]
    async fn a_record_from_a_newer_engine_is_applied_without_its_new_fields() {
        let store = Arc::new(MemoryStore::default());
        let p = native_pipeline(store.clone(), PipelineConfig::default());
        let create = ada_created();
        let mut newer = serde_json::to_value(&create).unwrap();
        newer["trace_id"] = serde_json::json!("t-1");
        newer["payload"]["gift_wrap"] = serde_json::json!(true);
        let record = Delivery { payload: serde_json::to_vec(&newer).unwrap(), ..delivery(1, &create) };
        assert_eq!(p.process(&[record], &|| false).await.unwrap(), 1);
        assert_eq!(store.get("o1").await.unwrap().expect("applied").customer, "ada");
        assert!(store.dead_letters(10, None).await.unwrap().items.is_empty());
    }

    #[tokio::test]
    async fn a_normal_batch_yields_when_vip_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.sqlite")).unwrap());
        let p = native_pipeline(store.clone(), PipelineConfig::default());
        let deliveries: Vec<_> = (0..10)
            .map(|i| {
                let mut e = event(
                    &format!("e{i}"),
                    EventKind::Created,
                    OrderChange {
                        customer: Some("ada".into()),
                        tier: Some(Tier::Gold),
                        total_cents: Some(100),
                        ..Default::default()
                    },
                );
                e.order_id = format!("o{i}");
                delivery(i + 1, &e)
            })
            .collect();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        // "VIP arrives" once four events were taken.
        let done = p.process(&deliveries, &|| calls.fetch_add(1, Ordering::SeqCst) >= 4).await.unwrap();
        assert_eq!(done, 4);
        assert_eq!(store.stats().await.unwrap().orders, 4);
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_step_is_retried_as_an_outage_or_a_fault_told_by_its_type() {
        use crate::log::{OrderLog, Record, embedded::EmbeddedLog};
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(&dir.path().join("log.sqlite")).unwrap();
        let e = ada_created();
        let payload = serde_json::to_vec(&e).unwrap();
        log.append(vec![Record::new(Priority::Normal, e.order_id.clone(), payload)]).await.unwrap();
        let store = Arc::new(Scripted::default());
        store.fail_writes(Some(|| StoreError::Backend("no such column: nope".into())));
        let controls = Controls::default();
        let stats = controls.stats.clone();
        let parking: Arc<dyn Parking> = Arc::new(MemoryStore::default());
        let changes = ChangeStream::new(16);
        let p = Pipeline::new(store.clone(), parking, native::rulebook(), changes, controls, Default::default());
        let (stop, shutdown) = watch::channel(false);
        let running = tokio::spawn(p.run(log.consumer().await.unwrap(), shutdown));

        // A fault: retried, the attempts counted, shown for /health, nothing applied.
        let stall = || stats.stalls().into_iter().next();
        let retried = |cause| stall().is_some_and(|s| s.cause == cause && s.attempts >= 2);
        until("a fault is retried", || retried(RetryCause::Fault)).await;
        let stalled = stall().unwrap();
        assert_eq!(stalled.priority, Priority::Normal);
        // The cause is said once, though the store's error names its source too.
        assert_eq!(stalled.error.matches("no such column: nope").count(), 1, "{}", stalled.error);
        assert!(store.inner.get("o1").await.unwrap().is_none());
        // An outage is told by its type, whatever its words say.
        store.fail_writes(Some(|| StoreError::Unavailable("a fault, this text says".into())));
        until("the outage is seen", || stall().is_some_and(|s| s.cause == RetryCause::Outage)).await;
        // Healed: the event is applied once, in its turn, and the stall is gone.
        store.fail_writes(None);
        until("the stall clears", || stall().is_none()).await;
        let row = store.inner.get("o1").await.unwrap().expect("applied after the store healed");
        assert_eq!((row.version, row.customer.as_str()), (1, "ada"));
        stop.send(true).unwrap();
        running.await.unwrap();
    }

    /// While a batch's last round is written, the next batch is polled and the start of
    /// its first round decided, up to the first event whose order the written batch holds:
    /// that one is decided only once the write has landed, against the row it made.
    #[tokio::test]
    async fn the_next_batch_is_decided_while_this_one_is_written_but_not_its_shared_orders() {
        use crate::log::{OrderLog, Record, embedded::EmbeddedLog};
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(&dir.path().join("log.sqlite")).unwrap();
        let store = Arc::new(Scripted::default());
        let created = |id: &str| OrderEvent { event_id: format!("c-{id}"), order_id: id.into(), ..ada_created() };
        let noted = |id: &str| {
            let change = OrderChange { note: Some("gift".into()), ..Default::default() };
            OrderEvent { event_id: format!("n-{id}"), order_id: id.into(), ..event("", EventKind::Updated, change) }
        };
        let (p, _) = scripted_pipeline(&store);
        assert_eq!(p.process(&[delivery(1, &created("x"))], &|| false).await.unwrap(), 1);
        store.reads();

        // Two batches of two: [create o1, create o2], then [note on x, note on o1].
        let records = [created("o1"), created("o2"), noted("x"), noted("o1")]
            .map(|e| Record::new(Priority::Normal, e.order_id.clone(), serde_json::to_vec(&e).unwrap()));
        log.append(records.into()).await.unwrap();
        store.hold.store(true, Ordering::SeqCst);
        let (p, _) = scripted_pipeline_with(&store, PipelineConfig { batch_max: 2, ..Default::default() });
        let (stop, shutdown) = watch::channel(false);
        let running = tokio::spawn(p.run(log.consumer().await.unwrap(), shutdown));

        let read = || store.reads.lock().unwrap().clone();
        until("the note on x is decided while the first batch is held", || read().contains(&"x".into())).await;
        assert_eq!(read(), ["x"], "the note on o1 waits for the write of o1's create");
        assert!(store.inner.get("o1").await.unwrap().is_none(), "the first batch is still held");

        store.open.notify_one();
        let version = |id: &'static str| {
            let store = store.clone();
            async move { store.inner.get(id).await.unwrap().map(|o| (o.version, o.note)) }
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while version("o1").await != Some((2, "gift".to_string())) {
            assert!(Instant::now() < deadline, "o1 got no note: {:?}", version("o1").await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(version("x").await, Some((2, "gift".to_string())));
        assert_eq!(version("o2").await.map(|v| v.0), Some(1));
        assert_eq!(read(), ["x", "o1"], "the note on o1 was decided against its stored row");
        stop.send(true).unwrap();
        running.await.unwrap();
    }

    /// A running pipeline of batches of two over `store`, with two batches of creates on
    /// its log (orders a, b, then c, d), once c and d landed while a and b's write is held.
    struct SentAhead {
        _dir: tempfile::TempDir,
        stats: Arc<Stats>,
        stop: watch::Sender<bool>,
        running: tokio::task::JoinHandle<()>,
    }

    async fn sent_ahead(store: &Arc<Scripted>) -> SentAhead {
        use crate::log::{OrderLog, Record, embedded::EmbeddedLog};
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(&dir.path().join("log.sqlite")).unwrap();
        let record = |id: &str| {
            let e = OrderEvent { event_id: format!("c-{id}"), order_id: id.into(), ..ada_created() };
            Record::new(Priority::Normal, id, serde_json::to_vec(&e).unwrap())
        };
        log.append(["a", "b", "c", "d"].map(record).into()).await.unwrap();
        store.hold.store(true, Ordering::SeqCst);
        let (p, stats) = scripted_pipeline_with(store, PipelineConfig { batch_max: 2, ..Default::default() });
        let (stop, shutdown) = watch::channel(false);
        let running = tokio::spawn(p.run(log.consumer().await.unwrap(), shutdown));
        let landed = || store.landed.lock().unwrap().clone();
        until("the second batch lands while the first is held", || landed().len() == 2).await;
        assert_eq!(landed(), ["c", "d"]);
        SentAhead { _dir: dir, stats, stop, running }
    }

    /// The next batch, other orders in one round, is written while this one's write is
    /// still under way: the store's writer does not wait for this batch to be settled
    /// and committed before it gets the next.
    #[tokio::test]
    async fn the_next_batch_is_sent_to_the_store_while_this_one_is_written() {
        let store = Arc::new(Scripted::default());
        let SentAhead { stats, stop, running, .. } = sent_ahead(&store).await;
        store.open.notify_one();
        until("all four are applied", || stats.applied.load(Ordering::Relaxed) == 4).await;
        assert_eq!(*store.landed.lock().unwrap(), ["c", "d", "a", "b"]);
        stop.send(true).unwrap();
        running.await.unwrap();
        assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0, "nothing was written twice");
    }

    /// A batch sent ahead lands though the batch before it fails. Nothing of the two is
    /// committed, so both come again: the first is applied, the second found written
    /// (duplicates, published again), and no order has two versions.
    #[tokio::test]
    async fn a_batch_sent_ahead_of_a_failed_one_comes_again_as_duplicates() {
        let store = Arc::new(Scripted::default());
        let SentAhead { stats, stop, running, .. } = sent_ahead(&store).await;
        store.fail_writes(Some(|| StoreError::Unavailable("the disk went away".into())));
        store.open.notify_one();
        until("the step fails", || !stats.stalls().is_empty()).await;
        store.fail_writes(None);
        until("the stall clears", || stats.stalls().is_empty()).await;
        let settled = || (stats.applied.load(Ordering::Relaxed), stats.duplicates.load(Ordering::Relaxed));
        until("a and b are applied, c and d found written", || settled() == (2, 2)).await;
        stop.send(true).unwrap();
        running.await.unwrap();
        for id in ["a", "b", "c", "d"] {
            let row = store.inner.get(id).await.unwrap().expect("every order is written");
            assert_eq!(row.version, 1, "{id}");
            assert_eq!(store.inner.history(id, 10, None).await.unwrap().items.len(), 1, "{id}");
        }
    }
}
