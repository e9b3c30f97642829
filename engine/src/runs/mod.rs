//! Generated runs: the load generator feeding the normal pipeline, VIP-first phases
//! detected from the log and the store, live and persisted run metrics, cancel, and
//! the verification of every finished run.

pub mod cli;
pub mod model;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;
use tokio::sync::watch;

use crate::domain::{PerPriority, Priority, Status};
use crate::engine::Engine;
use crate::generator::{self, TierMix};
use crate::store::{Audit, Page, RunRecord, StoreError};
use crate::telemetry;
use model::{CancelReport, CancelRequest, Phase, Run, RunRequest, TierShares, Verification, Window};

/// Limits and pacing of runs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Largest accepted quantity.
    pub max_quantity: u64,
    /// Orders per append to the log.
    pub batch: usize,
    /// A run its instance has not recorded for this long is reported FAILED by every
    /// instance; see [`Lease`].
    pub lease: Duration,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self { max_quantity: 1_500_000, batch: 5_000, lease: Duration::from_secs(90) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Invalid(String),
    #[error("run {0} is still active; cancel it or wait for it to finish")]
    Active(String),
    #[error("run {0} has already ended")]
    Ended(String),
    #[error("run not found")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The purge could not be kept (the cluster or the data dir refused it).
    #[error("the purge was not kept: {0}")]
    Switch(#[from] crate::engine::SwitchError),
    #[error(transparent)]
    Reset(#[from] crate::engine::ResetError),
}

/// Clients get at most this many progress messages per second (one per 250 ms).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often the drain of a priority is checked.
const TICK: Duration = Duration::from_millis(25);
/// Most time a cancel waits for the store once its run has stopped.
const WIND_DOWN_MAX: Duration = Duration::from_secs(60);
/// A drain fails the run when nothing moves for this long.
const DRAIN_STALL: Duration = Duration::from_secs(120);

/// The promise an instance keeps while it runs a run, so that a run whose instance died
/// (kill -9, a lost machine) ends FAILED everywhere instead of staying live for ever:
/// the running instance records the run every [`Lease::beat`], rides out a store outage
/// for up to [`Lease::patience`] and fails the run itself past that; every instance
/// reports a run not recorded for the whole lease as FAILED. The margin between the two
/// absorbs clock skew between instances.
#[derive(Debug, Clone, Copy)]
struct Lease(Duration);

impl Lease {
    fn beat(self) -> Duration {
        self.0 / 9
    }
    fn patience(self) -> Duration {
        self.0 * 2 / 3
    }
    /// Whether a run last recorded at `at` has outlived the lease.
    fn lapsed(self, at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        now.signed_duration_since(at).to_std().is_ok_and(|d| d > self.0)
    }
}

struct Active {
    run: Arc<Mutex<Run>>,
    cancel: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The runs of one engine instance: at most one active at a time.
pub struct Runs {
    engine: Arc<Engine>,
    config: RunConfig,
    active: tokio::sync::Mutex<Option<Active>>,
}

impl Runs {
    pub fn new(engine: Arc<Engine>, config: RunConfig) -> Arc<Self> {
        Arc::new(Self { engine, config, active: tokio::sync::Mutex::new(None) })
    }

    pub fn max_quantity(&self) -> u64 {
        self.config.max_quantity
    }

    /// Checks the request, persists the new run and starts generating.
    pub async fn start(self: &Arc<Self>, request: RunRequest) -> Result<Run, RunError> {
        let max = self.config.max_quantity;
        if request.quantity < 1 || request.quantity as u64 > max {
            return Err(RunError::Invalid(format!("quantity must be between 1 and {max}, got {}", request.quantity)));
        }
        let mix = request.tier_mix.unwrap_or_default();
        mix.validate().map_err(RunError::Invalid)?;
        let mut active = self.active.lock().await;
        if let Some(a) = active.as_ref() {
            let run = a.run.lock().unwrap_or_else(|p| p.into_inner());
            if !run.phase.is_final() {
                return Err(RunError::Active(run.id.clone()));
            }
        }
        let now = Utc::now();
        let run = Run {
            // The whole v7 uuid: its time sorts runs, and its 74 random bits keep outside
            // producers from guessing the prefix that the run's audit and purge act on.
            id: format!("run-{}", uuid::Uuid::now_v7().simple()),
            phase: Phase::Generating,
            quantity: request.quantity as u64,
            tier_mix: mix,
            started_at: now,
            ended_at: None,
            generated: 0,
            generation_ms: None,
            vip: Window::default(),
            normal: Window::default(),
            total_ms: None,
            progress_percent: 0.0,
            eta_s: None,
            latency_p50_ms: None,
            latency_p99_ms: None,
            dead_letters: 0,
            error: None,
            verification: None,
            cancel: None,
            heartbeat_at: Some(now),
        };
        // NORMAL waits, on every instance, until the run's VIP orders are drained; VIP
        // flows from the start.
        // Saved only once held: a run recorded without its hold would be a phantom.
        let started = match self.engine.hold(Priority::Normal, true, self.config.lease).await {
            Ok(()) => save(&self.engine, &run).await.map_err(RunError::from),
            Err(e) => Err(RunError::from(e)),
        };
        if let Err(e) = started {
            release(&self.engine, self.config.lease).await;
            return Err(e);
        }
        let shared = Arc::new(Mutex::new(run.clone()));
        let (cancel, cancelled) = watch::channel(false);
        // GENERATING goes out before the driver starts, so no progress message of this
        // run can reach a client ahead of its first phase.
        self.engine.changes().notify(phase_message(&run));
        let driver = Driver::new(self.engine.clone(), shared.clone(), self.config.clone(), cancelled);
        let task = tokio::spawn(driver.drive());
        *active = Some(Active { run: shared, cancel, task });
        Ok(run)
    }

    /// The active run, or the last one this instance ran.
    pub async fn current(&self) -> Option<Run> {
        let active = self.active.lock().await;
        active.as_ref().map(|a| a.run.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Runs, newest first.
    pub async fn list(&self, limit: usize, cursor: Option<String>) -> Result<Page<Run>, StoreError> {
        let page = self.engine.run_store().runs(limit, cursor).await?;
        let mine = self.current().await.filter(|r| !r.phase.is_final()).map(|r| r.id);
        let mut items = Vec::with_capacity(page.items.len());
        for record in page.items {
            let run = from_record(record)?;
            items.push(if mine.as_ref() == Some(&run.id) { run } else { self.judged(run).await });
        }
        Ok(Page { items, next_cursor: page.next_cursor })
    }

    pub async fn get(&self, id: &str) -> Result<Run, RunError> {
        if let Some(run) = self.current().await.filter(|r| r.id == id) {
            return Ok(run);
        }
        let run = self.engine.run_store().run(id).await?.map(from_record).transpose()?.ok_or(RunError::NotFound)?;
        Ok(self.judged(run).await)
    }

    /// A stored run as it stands: one that is not final and has not been recorded for
    /// the lease lost its instance, so it is FAILED (and recorded so, if the store can).
    async fn judged(&self, mut run: Run) -> Run {
        let lease = Lease(self.config.lease);
        let last = run.heartbeat_at.unwrap_or(run.started_at);
        if run.phase.is_final() || !lease.lapsed(last, Utc::now()) {
            return run;
        }
        run.phase = Phase::Failed;
        run.eta_s = None;
        run.error = Some(format!(
            "the instance running it stopped recording it at {} (the run lease is {} s); it was not finished",
            last.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            lease.0.as_secs()
        ));
        if let Err(e) = save(&self.engine, &run).await {
            tracing::warn!(run = %run.id, error = %e, "recording a run whose instance stopped as FAILED");
        }
        run
    }

    /// Stops the run's generator, optionally discards its unprocessed events and
    /// deletes its still-PENDING orders, and says what it did.
    pub async fn cancel(self: &Arc<Self>, id: &str, request: CancelRequest) -> Result<Run, RunError> {
        // On a task of its own: a caller that goes away (a client's timeout during a store
        // outage) must not leave the run stopped halfway, holding NORMAL for good.
        let (runs, id) = (self.clone(), id.to_string());
        match tokio::spawn(async move { runs.cancel_whole(&id, request).await }).await {
            Ok(outcome) => outcome,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // The runtime is shutting down: the process and its runs end with it.
                Err(_) => Err(RunError::Store(StoreError::Unavailable("the engine is shutting down".into()))),
            },
        }
    }

    async fn cancel_whole(&self, id: &str, request: CancelRequest) -> Result<Run, RunError> {
        let mut active = self.active.lock().await;
        let is_active = active.as_ref().is_some_and(|a| {
            let run = a.run.lock().unwrap_or_else(|p| p.into_inner());
            run.id == id && !run.phase.is_final()
        });
        if !is_active {
            drop(active);
            return match self.get(id).await {
                Ok(_) => Err(RunError::Ended(id.to_string())),
                Err(e) => Err(e),
            };
        }
        let a = active.as_mut().expect("checked above");
        if request.purge {
            // Kept beside the pauses: other instances, and this one after a restart,
            // drop the run's remaining events too. Before the driver stops, so a purge
            // that cannot be kept leaves the run as it was, and the cancel can be retried.
            let prefixes = {
                let run = a.run.lock().unwrap_or_else(|p| p.into_inner());
                [run.prefix(true), run.prefix(false)]
            };
            for prefix in prefixes {
                self.engine.purge(prefix).await?;
            }
        }
        let _ = a.cancel.send(true);
        let _ = (&mut a.task).await;
        let run = a.run.clone();
        let snapshot = run.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if snapshot.phase.is_final() {
            // It finished (or failed) while being cancelled.
            return Err(RunError::Ended(id.to_string()));
        }
        // The driver has stopped: from here the run ends whatever the store says, and
        // its hold of NORMAL goes with it.
        // Bounded: the runs' lock is held meanwhile, and NORMAL stays held.
        let wound_down = tokio::time::timeout(WIND_DOWN_MAX, self.wind_down(&snapshot, &request))
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable(format!("no answer within {WIND_DOWN_MAX:?}").into())));
        release(&self.engine, self.config.lease).await;
        let finished = {
            let mut r = run.lock().unwrap_or_else(|p| p.into_inner());
            r.ended_at = Some(Utc::now());
            r.total_ms = Some(elapsed_ms(r.started_at, Utc::now()));
            r.eta_s = None;
            match &wound_down {
                Ok(report) => {
                    r.phase = Phase::Cancelled;
                    r.cancel = Some(report.clone());
                }
                Err(e) => {
                    r.phase = Phase::Failed;
                    r.error = Some(format!("cancelled, but the cancel could not finish: {e}"));
                }
            }
            r.clone()
        };
        let saved = save(&self.engine, &finished).await;
        self.engine.changes().notify(phase_message(&finished));
        wound_down?;
        saved?;
        Ok(finished)
    }

    /// What a cancel does once the driver has stopped: counts what the run left
    /// unprocessed and deletes its PENDING orders if asked.
    async fn wind_down(&self, snapshot: &Run, request: &CancelRequest) -> Result<CancelReport, StoreError> {
        let store = self.engine.run_store();
        if request.purge {
            // A batch already in hand was decided before the purge: let it land first,
            // so the PENDING orders it writes are deleted below.
            self.engine.stats().step_boundary(Duration::from_secs(30)).await;
        }
        // One batch past the counts: a batch appended as the cancel came may not be
        // counted in the snapshot yet.
        let margin = self.config.batch as u64;
        let keys = |vip: bool| {
            let counted = if vip { snapshot.vip.count } else { snapshot.normal.count };
            snapshot.keys(vip, (counted + margin).min(snapshot.quantity))
        };
        let (vip, normal) = (store.audit(&keys(true)).await?, store.audit(&keys(false)).await?);
        let settled = vip.applied + vip.other + normal.applied + normal.other;
        let mut deleted_pending = 0;
        if request.delete_pending {
            for v in [true, false] {
                deleted_pending += store.delete_orders(&keys(v), Status::Pending).await?;
            }
        }
        Ok(CancelReport {
            produced: snapshot.generated,
            purged: request.purge,
            unprocessed: snapshot.generated.saturating_sub(settled),
            deleted_pending,
        })
    }

    /// Marks runs left unfinished by an earlier process (it stopped or crashed
    /// mid-run) as FAILED, so their records say so. Only for a single-instance engine:
    /// in Kafka mode another instance may be running them.
    pub async fn fail_interrupted(&self) -> Result<usize, RunError> {
        let mut failed = 0;
        for mut run in self.list(100, None).await?.items.into_iter().filter(|r| !r.phase.is_final()) {
            run.phase = Phase::Failed;
            run.error = Some("the engine stopped during the run; it was not finished".into());
            run.eta_s = None;
            save(&self.engine, &run).await?;
            failed += 1;
        }
        Ok(failed)
    }

    /// Refuses while a run is active; otherwise empties the log and the store's orders,
    /// history, runs and dead letters (`Engine::reset`).
    pub async fn reset(&self) -> Result<(), RunError> {
        let mut active = self.active.lock().await;
        if let Some(a) = active.as_ref() {
            let run = a.run.lock().unwrap_or_else(|p| p.into_inner());
            if !run.phase.is_final() {
                return Err(RunError::Active(run.id.clone()));
            }
        }
        self.engine.reset().await?;
        *active = None;
        Ok(())
    }
}

/// Drives one run from generation to its verified end.
struct Driver {
    engine: Arc<Engine>,
    run: Arc<Mutex<Run>>,
    config: RunConfig,
    cancelled: watch::Receiver<bool>,
    /// Baselines of the engine's counters when the run began.
    settled_at_start: PerPriority<u64>,
    rejected_at_start: u64,
    latency_at_start: Option<hdrhistogram::Histogram<u64>>,
    /// Orders of each priority put on the log.
    produced: PerPriority<u64>,
    /// The run's own monotonic clock: `run.progress` carries `elapsed_ms` from it, so
    /// clients and tests see the engine's pacing rather than their delivery jitter.
    began: Instant,
    last_progress: Option<Instant>,
    first_settled: Option<Instant>,
    /// When the run was last recorded in the store.
    recorded: Instant,
    /// When the last heartbeat was tried (it may have failed).
    beaten: Instant,
    /// Whether the run still holds NORMAL (renewed with each heartbeat).
    holding: bool,
}

impl Driver {
    fn new(engine: Arc<Engine>, run: Arc<Mutex<Run>>, config: RunConfig, cancelled: watch::Receiver<bool>) -> Self {
        let stats = engine.stats();
        let settled_at_start = PerPriority::from_fn(|p| stats.settled[p].load(std::sync::atomic::Ordering::Relaxed));
        let rejected_at_start = stats.rejected.load(std::sync::atomic::Ordering::Relaxed);
        let latency_at_start = stats.latency_us.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Self {
            engine,
            run,
            config,
            cancelled,
            settled_at_start,
            rejected_at_start,
            latency_at_start,
            produced: PerPriority::default(),
            began: Instant::now(),
            last_progress: None,
            first_settled: None,
            recorded: Instant::now(),
            beaten: Instant::now(),
            holding: true,
        }
    }

    fn snapshot(&self) -> Run {
        self.run.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Run)) -> Run {
        let mut run = self.run.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut run);
        run.clone()
    }

    fn is_cancelled(&self) -> bool {
        *self.cancelled.borrow()
    }

    async fn drive(mut self) {
        if let Err(e) = self.phases().await {
            if self.is_cancelled() {
                return;
            }
            tracing::error!(error = %e, "run failed");
            self.release().await;
            let run = self.update(|r| {
                r.phase = Phase::Failed;
                r.error = Some(e.to_string());
                r.ended_at = Some(Utc::now());
                r.eta_s = None;
            });
            let run = match self.record().await {
                Ok(run) => run,
                Err(e) => {
                    // Other instances report it FAILED once its lease lapses.
                    tracing::error!(run = %run.id, error = %e, "recording the failed run");
                    run
                }
            };
            self.engine.changes().notify(phase_message(&run));
        }
    }

    async fn phases(&mut self) -> anyhow::Result<()> {
        let generation_started = Instant::now();
        if !self.generate().await? {
            return Ok(());
        }
        let generation_ms = generation_started.elapsed().as_millis() as u64;
        self.set_phase(Phase::VipProcessing, |r| r.generation_ms = Some(generation_ms)).await?;

        let Some(vip) = self.drained(Priority::Vip).await? else { return Ok(()) };
        self.set_phase(Phase::VipDrained, |r| r.vip = window(&vip, r.vip.count)).await?;
        self.release().await;
        self.set_phase(Phase::NormalProcessing, |_| {}).await?;

        let Some(normal) = self.drained(Priority::Normal).await? else { return Ok(()) };
        let verification = verify(&self.snapshot(), &vip, &normal);
        let (p50, p99) = self.latency();
        let dead_letters =
            self.engine.stats().rejected.load(std::sync::atomic::Ordering::Relaxed) - self.rejected_at_start;
        self.update(|r| {
            let now = Utc::now();
            r.phase = Phase::Done;
            r.ended_at = Some(now);
            r.total_ms = Some(elapsed_ms(r.started_at, now));
            r.normal = window(&normal, r.normal.count);
            r.vip.processed = vip.applied + vip.other;
            r.progress_percent = 100.0;
            r.eta_s = None;
            r.latency_p50_ms = p50;
            r.latency_p99_ms = p99;
            r.dead_letters = dead_letters;
            if !verification.passed {
                r.error = Some(format!("verification failed: {}", verification.failures.join("; ")));
            }
            r.verification = Some(verification);
        });
        let run = self.record().await?;
        self.engine.changes().notify(phase_message(&run));
        tracing::info!(
            run = %run.id,
            total_ms = ?run.total_ms,
            passed = run.verification.as_ref().is_some_and(|v| v.passed),
            "run done"
        );
        Ok(())
    }

    /// Puts the run's orders on the log in batches. False when cancelled.
    async fn generate(&mut self) -> anyhow::Result<bool> {
        let run = self.snapshot();
        let TierShares { diamond, gold, silver, bronze } = run.tier_mix;
        let mix = TierMix([bronze, silver, gold, diamond]);
        let mut rng = SmallRng::from_os_rng();
        let mut left = run.quantity;
        while left > 0 {
            if self.is_cancelled() {
                return Ok(false);
            }
            let n = left.min(self.config.batch as u64);
            let events: Vec<_> = (0..n)
                .map(|_| {
                    let tier = mix.pick(&mut rng);
                    let p = tier.priority();
                    let seq = self.produced[p];
                    self.produced[p] += 1;
                    let id = run.order_id(p == Priority::Vip, seq);
                    generator::order(id, tier, &mut rng)
                })
                .collect();
            // The heartbeat goes on while the log takes the batch, however slow it is.
            let (engine, cancelled) = (self.engine.clone(), self.cancelled.clone());
            self.beating(Self::append(engine, cancelled, events)).await??;
            self.beat().await?;
            left -= n;
            let produced = self.produced;
            self.update(|r| {
                r.generated = produced.sum();
                r.vip.count = produced[Priority::Vip];
                r.normal.count = produced[Priority::Normal];
            });
            self.progress();
        }
        Ok(true)
    }

    /// Appends one batch, riding out a short log outage.
    async fn append(
        engine: Arc<Engine>,
        cancelled: watch::Receiver<bool>,
        events: Vec<crate::domain::OrderEvent>,
    ) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match engine.ingest_generated(&events).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() < deadline && !*cancelled.borrow() => {
                    tracing::warn!(error = %e, "run: appending a batch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => anyhow::bail!("the log refused the run's orders: {e}"),
            }
        }
    }

    /// Waits until the log holds no more `priority` records and the store has an outcome
    /// for every one of the run's orders of that priority. None when cancelled. Fails
    /// when nothing moves (no event settles, the depth stays) for `DRAIN_STALL`.
    async fn drained(&mut self, priority: Priority) -> anyhow::Result<Option<Audit>> {
        let run = self.snapshot();
        let expected = self.produced[priority];
        let keys = run.keys(priority == Priority::Vip, expected);
        let mut last = None;
        let mut moved_at = Instant::now();
        loop {
            if self.is_cancelled() {
                return Ok(None);
            }
            self.progress();
            self.beat().await?;
            let settled = self.engine.stats().settled[priority].load(std::sync::atomic::Ordering::Relaxed);
            let now = (settled, self.engine.queue_depth(priority));
            // An operator's pause is not a stall.
            if last != Some(now) || self.engine.pauses().operator_paused(priority) {
                (last, moved_at) = (Some(now), Instant::now());
            } else if moved_at.elapsed() >= DRAIN_STALL {
                let why = self.engine.health().await.err().unwrap_or_else(|| "no fault reported".into());
                anyhow::bail!(
                    "the {} drain stalled: {} events still queued and none settled for {} s ({why})",
                    priority.as_str(),
                    now.1,
                    DRAIN_STALL.as_secs()
                );
            }
            // The log's own view first (cheap); then the store confirms.
            if self.engine.queue_depth(priority) == 0 {
                let (engine, keys) = (self.engine.clone(), keys.clone());
                let audit = self.beating(async move { engine.run_store().audit(&keys).await }).await??;
                if audit.applied + audit.other >= expected {
                    return Ok(Some(audit));
                }
            }
            tokio::time::sleep(TICK).await;
        }
    }

    async fn set_phase(&mut self, phase: Phase, f: impl FnOnce(&mut Run)) -> anyhow::Result<()> {
        self.update(|r| {
            r.phase = phase;
            f(r);
        });
        let run = self.record().await?;
        self.engine.changes().notify(phase_message(&run));
        Ok(())
    }

    async fn release(&mut self) {
        release(&self.engine, self.config.lease).await;
        self.holding = false;
    }

    /// Records the run with a fresh heartbeat, riding out a store outage for the lease's
    /// patience (from the last time it was recorded); returns what it recorded.
    async fn record(&mut self) -> Result<Run, StoreError> {
        let lease = Lease(self.config.lease);
        let mut backoff = Duration::from_millis(100);
        loop {
            let run = self.update(|r| r.heartbeat_at = Some(Utc::now()));
            match save(&self.engine, &run).await {
                Ok(()) => {
                    self.recorded = Instant::now();
                    return Ok(run);
                }
                Err(e) if e.is_transient() && self.recorded.elapsed() + backoff < lease.patience() => {
                    tracing::warn!(run = %run.id, error = %e, "recording the run failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The heartbeat: records the run when a beat has passed. A store that refuses it
    /// for the lease's patience fails the run, before other instances call it dead.
    /// Awaits `work` (a store read over the run's orders, a long one on CQL for a large
    /// run) while the heartbeat goes on, so other instances never take the run for lost.
    async fn beating<T>(&mut self, work: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = tokio::time::sleep(Lease(self.config.lease).beat()) => self.beat().await?,
            }
        }
    }

    async fn beat(&mut self) -> anyhow::Result<()> {
        let lease = Lease(self.config.lease);
        if self.beaten.elapsed() < lease.beat() {
            return Ok(());
        }
        self.beaten = Instant::now();
        if self.holding
            && let Err(e) = self.engine.hold(Priority::Normal, true, lease.0).await
        {
            tracing::warn!(error = %e, "the run's hold of NORMAL was not renewed; other instances may start NORMAL");
        }
        let run = self.update(|r| r.heartbeat_at = Some(Utc::now()));
        match save(&self.engine, &run).await {
            Ok(()) => self.recorded = Instant::now(),
            Err(e) if self.recorded.elapsed() < lease.patience() => {
                tracing::warn!(run = %run.id, error = %e, "the run's heartbeat was not recorded");
            }
            Err(e) => anyhow::bail!(
                "the run could not be recorded for {} s, so other instances would call it lost: {e}",
                self.recorded.elapsed().as_secs()
            ),
        }
        Ok(())
    }

    /// Refreshes the live counters; sends `run.progress` at most once per 250 ms of the
    /// engine's clock. Phase changes and the end go out as `run.phase`, never as progress.
    fn progress(&mut self) {
        let stats = self.engine.stats();
        let processed = PerPriority::from_fn(|p| {
            let now = stats.settled[p].load(std::sync::atomic::Ordering::Relaxed);
            now.saturating_sub(self.settled_at_start[p]).min(self.produced[p])
        });
        let done = processed.sum();
        if done > 0 && self.first_settled.is_none() {
            self.first_settled = Some(Instant::now());
        }
        let first = self.first_settled;
        let run = self.update(|r| {
            r.vip.processed = processed[Priority::Vip];
            r.normal.processed = processed[Priority::Normal];
            r.progress_percent = (done as f64 * 100.0 / r.quantity.max(1) as f64).min(100.0);
            r.eta_s = first.and_then(|f| {
                let secs = f.elapsed().as_secs_f64();
                (secs > 0.0 && done > 0).then(|| (r.quantity.saturating_sub(done)) as f64 / (done as f64 / secs))
            });
        });
        if self.last_progress.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) {
            let now = Instant::now();
            self.last_progress = Some(now);
            let elapsed_ms = (now - self.began).as_millis() as u64;
            self.engine.changes().notify(message("run.progress", &run, Some(elapsed_ms)));
            metrics::gauge!(telemetry::RUN_PROGRESS).set(run.progress_percent / 100.0);
        }
    }

    /// p50 and p99 of append-to-applied over what was applied since the run began.
    fn latency(&self) -> (Option<f64>, Option<f64>) {
        let now = self.engine.stats().latency_us.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(mut h) = now else { return (None, None) };
        if let Some(start) = &self.latency_at_start {
            let _ = h.subtract(start);
        }
        if h.is_empty() {
            return (None, None);
        }
        (Some(h.value_at_quantile(0.5) as f64 / 1000.0), Some(h.value_at_quantile(0.99) as f64 / 1000.0))
    }
}

fn elapsed_ms(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    (to - from).num_milliseconds().max(0) as u64
}

/// A priority's window from the store's history of the run's orders.
fn window(audit: &Audit, count: u64) -> Window {
    let duration_ms = match (audit.first_applied, audit.last_applied) {
        (Some(a), Some(b)) => Some(elapsed_ms(a, b)),
        _ => None,
    };
    let processed = audit.applied + audit.other;
    Window {
        count,
        processed,
        started_at: audit.first_applied,
        ended_at: audit.last_applied,
        duration_ms,
        orders_per_s: duration_ms.map(|ms| processed as f64 * 1000.0 / ms.max(1) as f64),
    }
}

/// Every generated order stored once, at version 1, with one applied entry; every VIP
/// order applied before the first NORMAL one.
fn verify(run: &Run, vip: &Audit, normal: &Audit) -> Verification {
    let mut failures = Vec::new();
    let stored = vip.orders + normal.orders;
    let applied = vip.applied + normal.applied;
    if stored != run.generated {
        failures.push(format!("{} orders generated, {stored} stored", run.generated));
    }
    if applied != run.generated {
        failures.push(format!("{applied} applied history entries for {} generated orders", run.generated));
    }
    let not_processed = vip.not_first_version + normal.not_first_version;
    if not_processed > 0 {
        failures.push(format!("{not_processed} orders are past version 1"));
    }
    let other = vip.other + normal.other;
    if other > 0 {
        failures.push(format!("{other} orders were skipped or dead-lettered instead of applied"));
    }
    let vip_before_normal = match (vip.last_applied, normal.first_applied) {
        (Some(last_vip), Some(first_normal)) => last_vip <= first_normal,
        _ => true,
    };
    if !vip_before_normal {
        failures.push(format!(
            "the last VIP order was applied at {:?}, after the first NORMAL one at {:?}",
            vip.last_applied, normal.first_applied
        ));
    }
    Verification {
        passed: failures.is_empty(),
        generated: run.generated,
        stored,
        applied_entries: applied,
        not_processed,
        vip_before_normal,
        failures,
    }
}

#[derive(Serialize)]
struct Message<'a> {
    r#type: &'static str,
    run_id: &'a str,
    phase: Phase,
    /// Progress only: milliseconds since the run began, on the engine's monotonic clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    elapsed_ms: Option<u64>,
    run: &'a Run,
}

fn message(kind: &'static str, run: &Run, elapsed_ms: Option<u64>) -> String {
    let m = Message { r#type: kind, run_id: &run.id, phase: run.phase, elapsed_ms, run };
    serde_json::to_string(&m).expect("a run always serializes")
}

fn phase_message(run: &Run) -> String {
    metrics::counter!(telemetry::RUN_PHASE_CHANGES, "phase" => run.phase.label()).increment(1);
    message("run.phase", run, None)
}

/// Ends a run's hold of NORMAL. A release that cannot go round the cluster is not
/// retried: the hold lapses by itself at the end of its lease.
async fn release(engine: &Engine, lease: Duration) {
    if let Err(e) = engine.hold(Priority::Normal, false, lease).await {
        tracing::warn!(error = %e, "a run's hold of NORMAL could not be released; it lapses with its lease");
    }
}

/// The store keeps a run as JSON it does not read; this is the one place that writes it.
async fn save(engine: &Engine, run: &Run) -> Result<(), StoreError> {
    let body = serde_json::to_string(run).expect("a run always serializes");
    engine.run_store().save_run(&RunRecord { id: run.id.clone(), started_at: run.started_at, body }).await
}

fn from_record(record: RunRecord) -> Result<Run, StoreError> {
    serde_json::from_str(&record.body).map_err(|e| StoreError::Corrupt(format!("run {}: {e}", record.id)))
}
