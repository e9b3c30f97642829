//! The rule stage's interfaces, which the pipeline calls to decide rows and merge races,
//! the rulebook that swaps them on deploy, and shadow runs that compare a candidate.

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{Order, OrderEvent, OrderFields};

/// What the order rules decided for one event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "decision", content = "value", rename_all = "snake_case")]
pub enum Decision {
    /// Write these fields as the order's next version.
    Upsert(OrderFields),
    /// Leave the row alone; the reason is kept in the order's history.
    Skip(String),
    /// Send the event to the dead-letter log with this reason.
    Reject(String),
}

/// Why a rule could not decide: the sandbox stopped it, or it broke its contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RuleError {
    pub kind: RuleErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleErrorKind {
    /// The plugin trapped (a panic, an unreachable, a bad memory access).
    Trap,
    /// The per-call deadline passed.
    Timeout,
    /// The plugin tried to grow its memory past the cap.
    MemoryLimit,
    /// The plugin could not be instantiated, or answered outside the contract.
    Instantiate,
}

impl RuleErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleErrorKind::Trap => "trap",
            RuleErrorKind::Timeout => "timeout",
            RuleErrorKind::MemoryLimit => "memory_limit",
            RuleErrorKind::Instantiate => "instantiate",
        }
    }
}

impl From<RuleErrorKind> for crate::failure::FailureKind {
    fn from(kind: RuleErrorKind) -> Self {
        use crate::failure::FailureKind;
        match kind {
            RuleErrorKind::Trap => FailureKind::Trap,
            RuleErrorKind::Timeout => FailureKind::Timeout,
            RuleErrorKind::MemoryLimit => FailureKind::MemoryLimit,
            RuleErrorKind::Instantiate => FailureKind::Instantiate,
        }
    }
}

impl fmt::Display for RuleErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Order-processing rules: decide the next row from an event and the current row.
pub trait OrderRules: Send + Sync {
    /// `slot@version` plus a content hash, recorded as `decided_by`.
    fn id(&self) -> &str;
    /// One result per input, in order. An error fails only its own event.
    fn decide_batch(&self, inputs: &[(&OrderEvent, Option<&Order>)]) -> Vec<Result<Decision, RuleError>>;
}

/// Conflict resolution: when a versioned write lost a race, merge the row the writer
/// based its change on, the row now stored, and the writer's change (whose
/// `updated_at` is when the change happened).
pub trait ConflictResolver: Send + Sync {
    fn id(&self) -> &str;
    /// `Ok(Err(reason))` is the resolver rejecting the change.
    fn resolve(
        &self,
        base: Option<&Order>,
        current: &Order,
        change: &Order,
    ) -> Result<Result<OrderFields, String>, RuleError>;
}

/// The rules in force: swapped atomically on deploy, read once per batch by the
/// pipeline, so a batch runs on one version and in-flight calls finish on theirs.
pub struct Rulebook {
    rules: ArcSwap<Arc<dyn OrderRules>>,
    resolver: ArcSwap<Arc<dyn ConflictResolver>>,
    shadow: ArcSwapOption<ShadowRun>,
}

impl Rulebook {
    pub fn new(rules: Arc<dyn OrderRules>, resolver: Arc<dyn ConflictResolver>) -> Arc<Self> {
        Arc::new(Self {
            rules: ArcSwap::from_pointee(rules),
            resolver: ArcSwap::from_pointee(resolver),
            shadow: ArcSwapOption::empty(),
        })
    }

    pub fn rules(&self) -> Arc<dyn OrderRules> {
        (**self.rules.load()).clone()
    }

    pub fn resolver(&self) -> Arc<dyn ConflictResolver> {
        (**self.resolver.load()).clone()
    }

    pub fn shadow(&self) -> Option<Arc<ShadowRun>> {
        self.shadow.load_full()
    }

    pub fn set_rules(&self, rules: Arc<dyn OrderRules>) {
        self.rules.store(Arc::new(rules));
    }

    pub fn set_resolver(&self, resolver: Arc<dyn ConflictResolver>) {
        self.resolver.store(Arc::new(resolver));
    }

    pub fn set_shadow(&self, shadow: Option<Arc<ShadowRun>>) {
        self.shadow.store(shadow);
    }
}

/// Most differences a shadow run keeps as samples.
const SHADOW_SAMPLES: usize = 50;
/// Batches waiting for the shadow worker; beyond this the live path drops them.
const SHADOW_QUEUE: usize = 64;

/// One live batch for the candidate: each event, the row it was decided against, and the
/// active rules' decision.
pub type ShadowBatch = Vec<(OrderEvent, Option<Order>, Result<Decision, RuleError>)>;

/// A candidate rules version deciding live events beside the active one. Its decisions
/// are only compared, never written. It runs on a thread of its own, fed through a
/// bounded queue: a slow or looping candidate never delays the live path; batches it
/// cannot keep up with are dropped and counted.
pub struct ShadowRun {
    pub rules: Arc<dyn OrderRules>,
    pub version: u64,
    queue: std::sync::mpsc::SyncSender<ShadowBatch>,
    tally: Arc<Tally>,
}

/// What the shadow worker found, shared with the report.
#[derive(Default)]
struct Tally {
    agree: AtomicU64,
    differ: AtomicU64,
    /// Events dropped because the worker was behind.
    skipped: AtomicU64,
    /// Events offered and not yet compared or dropped.
    queued: AtomicU64,
    samples: Mutex<Vec<ShadowDiff>>,
}

/// One event on which the candidate decided differently from the active rules.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ShadowDiff {
    pub event_id: String,
    pub order_id: String,
    #[schema(value_type = Object)]
    pub active: serde_json::Value,
    #[schema(value_type = Object)]
    pub candidate: serde_json::Value,
    /// Where they part: `decision` when the kinds differ, else each field of an upsert
    /// that differs, or `reason` for a skip or reject.
    pub fields: Vec<crate::whatif::FieldDiff>,
}

/// What the shadow run saw so far.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ShadowReport {
    pub candidate: String,
    pub version: u64,
    pub compared: u64,
    pub agreed: u64,
    pub differed: u64,
    /// Live events the candidate did not see, because it was behind (a slow candidate
    /// never delays the live path).
    pub skipped: u64,
    /// Live events waiting for the candidate right now.
    pub queued: u64,
    /// Up to 50 differences, the earliest first.
    pub samples: Vec<ShadowDiff>,
}

/// A decision (or the failure to make one) as the JSON that reports show.
pub fn outcome_json(r: &Result<Decision, RuleError>) -> serde_json::Value {
    match r {
        Ok(d) => serde_json::to_value(d).unwrap_or_default(),
        Err(e) => serde_json::json!({ "decision": "error", "value": e.to_string() }),
    }
}

impl ShadowRun {
    pub fn new(rules: Arc<dyn OrderRules>, version: u64) -> Arc<Self> {
        let (queue, batches) = std::sync::mpsc::sync_channel::<ShadowBatch>(SHADOW_QUEUE);
        let tally = Arc::new(Tally::default());
        let (worker_rules, worker_tally) = (rules.clone(), tally.clone());
        // Ends when the run is dropped (its sender with it) and the queue is empty.
        let spawned = std::thread::Builder::new().name(format!("shadow-v{version}")).spawn(move || {
            for batch in batches {
                let inputs: Vec<(&OrderEvent, Option<&Order>)> =
                    batch.iter().map(|(e, o, _)| (e, o.as_ref())).collect();
                let candidate = worker_rules.decide_batch(&inputs);
                for ((event, _, active), cand) in batch.iter().zip(&candidate) {
                    worker_tally.compare(event, active, cand);
                }
                worker_tally.queued.fetch_sub(batch.len() as u64, Ordering::Relaxed);
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no thread for the shadow run; it will skip every batch");
        }
        Arc::new(Self { rules, version, queue, tally })
    }

    /// Hands a live batch to the candidate without waiting: when the worker is behind,
    /// the batch is dropped and counted as skipped.
    pub fn offer(&self, batch: ShadowBatch) {
        let n = batch.len() as u64;
        self.tally.queued.fetch_add(n, Ordering::Relaxed);
        if self.queue.try_send(batch).is_err() {
            self.tally.queued.fetch_sub(n, Ordering::Relaxed);
            self.tally.skipped.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn report(&self) -> ShadowReport {
        let t = &self.tally;
        let (agreed, differed) = (t.agree.load(Ordering::Relaxed), t.differ.load(Ordering::Relaxed));
        ShadowReport {
            candidate: self.rules.id().to_string(),
            version: self.version,
            compared: agreed + differed,
            agreed,
            differed,
            skipped: t.skipped.load(Ordering::Relaxed),
            queued: t.queued.load(Ordering::Relaxed),
            samples: t.samples.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

impl Tally {
    /// Compares the candidate's decision on `event` with the active one.
    fn compare(
        &self,
        event: &OrderEvent,
        active: &Result<Decision, RuleError>,
        candidate: &Result<Decision, RuleError>,
    ) {
        if active == candidate {
            self.agree.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.differ.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < SHADOW_SAMPLES {
            let (active, candidate) = (outcome_json(active), outcome_json(candidate));
            let fields = crate::whatif::field_diffs(&active, &candidate);
            samples.push(ShadowDiff {
                event_id: event.event_id.clone(),
                order_id: event.order_id.clone(),
                active,
                candidate,
                fields,
            });
        }
    }
}
