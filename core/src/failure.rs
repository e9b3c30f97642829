//! Why one event or delivery was refused: a typed `Failure` builds its dead letter, its
//! `orchestrator_errors_total` count and its log line in one place (like a Vector
//! internal event), so the three never disagree and every label value is fixed.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::OrderEvent;
use crate::telemetry;

/// Where the failure happened: the `stage` of a dead letter and of the error metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A log record that is not an event.
    Decode,
    /// The order rules.
    Rules,
    /// The conflict resolver, after a lost compare-and-set.
    Resolver,
    /// The versioned write.
    Store,
    /// A signed Shopify delivery.
    Webhook,
    /// The operator audit.
    Audit,
    /// Relaying a stored change to the other instances.
    Publish,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Rules => "rules",
            Stage::Resolver => "resolver",
            Stage::Store => "store",
            Stage::Webhook => "webhook",
            Stage::Audit => "audit",
            Stage::Publish => "publish",
        }
    }
}

/// What went wrong: the `error_type` of a dead letter and of the error metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Not an event: bad JSON, or a field out of bounds.
    Malformed,
    /// The rules refused the event: a business decision, not an error.
    Rejected,
    /// The resolver refused to merge a lost race: a business decision, not an error.
    ConflictRejected,
    /// The plugin trapped.
    Trap,
    /// The plugin ran past its deadline.
    Timeout,
    /// The plugin tried to grow its memory past the cap.
    MemoryLimit,
    /// The plugin could not be instantiated, or answered outside the contract.
    Instantiate,
    /// The compare-and-set was lost more times than allowed.
    ConflictRetriesExhausted,
    /// Another order holds the event's id.
    EventIdReused,
    /// An undecodable record's log position is taken (a log recreated beside a store).
    RecordIdReused,
    /// A signed delivery that cannot become an event.
    InvalidDelivery,
    /// The store refused a write that is not an event's.
    Store,
    /// A record the log will never take (too large, say).
    Unpublishable,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Malformed => "malformed",
            FailureKind::Rejected => "rejected",
            FailureKind::ConflictRejected => "conflict_rejected",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::MemoryLimit => "memory_limit",
            FailureKind::Instantiate => "instantiate",
            FailureKind::ConflictRetriesExhausted => "conflict_retries_exhausted",
            FailureKind::EventIdReused => "event_id_reused",
            FailureKind::RecordIdReused => "record_id_reused",
            FailureKind::InvalidDelivery => "invalid_delivery",
            FailureKind::Store => "store",
            FailureKind::Unpublishable => "unpublishable",
        }
    }

    /// A rule's refusal is the engine working as told: it is dead-lettered, not counted
    /// as an error.
    pub fn is_error(self) -> bool {
        !matches!(self, FailureKind::Rejected | FailureKind::ConflictRejected)
    }
}

/// The pairs the engine can count, registered at zero on start so that alerts and
/// dashboards see each series before its first error.
const COUNTED: &[(Stage, FailureKind)] = &[
    (Stage::Decode, FailureKind::Malformed),
    (Stage::Decode, FailureKind::RecordIdReused),
    (Stage::Rules, FailureKind::Trap),
    (Stage::Rules, FailureKind::Timeout),
    (Stage::Rules, FailureKind::MemoryLimit),
    (Stage::Rules, FailureKind::Instantiate),
    (Stage::Resolver, FailureKind::Trap),
    (Stage::Resolver, FailureKind::Timeout),
    (Stage::Resolver, FailureKind::MemoryLimit),
    (Stage::Resolver, FailureKind::Instantiate),
    (Stage::Store, FailureKind::ConflictRetriesExhausted),
    (Stage::Store, FailureKind::EventIdReused),
    (Stage::Webhook, FailureKind::InvalidDelivery),
    (Stage::Publish, FailureKind::Unpublishable),
    (Stage::Audit, FailureKind::Store),
];

/// Sets every error series to zero; called once, after the recorder is installed.
pub fn count_from_zero() {
    for (stage, kind) in COUNTED {
        counter(*stage, *kind).absolute(0);
    }
}

fn counter(stage: Stage, kind: FailureKind) -> metrics::Counter {
    metrics::counter!(telemetry::ERRORS, "error_type" => kind.as_str(), "stage" => stage.as_str())
}

/// One refusal, with the words an operator reads in the dead letter.
#[derive(Debug, Clone)]
pub struct Failure {
    pub stage: Stage,
    pub kind: FailureKind,
    pub reason: String,
    /// The rule that refused, when one did.
    pub decided_by: Option<String>,
}

impl Failure {
    pub fn new(stage: Stage, kind: FailureKind, reason: impl Into<String>) -> Self {
        Self { stage, kind, reason: reason.into(), decided_by: None }
    }

    pub fn decided_by(mut self, rule: &str) -> Self {
        self.decided_by = Some(rule.to_string());
        self
    }

    /// Counts it (when it is an error) and logs it; call once, where it is known. A
    /// failing plugin fails on every event, so the log line per kind is kept to one a
    /// second; the metric counts them all.
    pub fn emit(&self, subject: &str) {
        if !self.kind.is_error() {
            tracing::debug!(stage = self.stage.as_str(), subject, reason = %self.reason, "refused by a rule");
            return;
        }
        counter(self.stage, self.kind).increment(1);
        if first_this_second(self.kind) {
            tracing::warn!(
                stage = self.stage.as_str(),
                error_type = self.kind.as_str(),
                subject,
                reason = %self.reason,
                "an event failed (one line a second per kind; orchestrator_errors_total counts all)"
            );
        }
    }

    /// The dead letter of an event, which keeps its place, so that a replay cannot
    /// overwrite later changes.
    pub fn letter_for(&self, event: &OrderEvent) -> DeadLetter {
        let payload = serde_json::to_string(event).unwrap_or_default();
        self.letter(event.event_id.clone(), Some(event.order_id.clone()), payload)
    }

    /// The dead letter of anything else: a raw record, a delivery.
    pub fn letter(&self, id: String, order_id: Option<String>, payload: String) -> DeadLetter {
        DeadLetter {
            id,
            order_id,
            stage: self.stage.as_str().into(),
            error_type: self.kind.as_str().into(),
            reason: self.reason.clone(),
            decided_by: self.decided_by.clone(),
            payload,
            recorded_at: Utc::now(),
            replayed_at: None,
        }
    }
}

/// Whether this is the first failure of `kind` in the current second.
fn first_this_second(kind: FailureKind) -> bool {
    const KINDS: usize = FailureKind::Unpublishable as usize + 1;
    static LAST: [AtomicI64; KINDS] = [const { AtomicI64::new(-1) }; KINDS];
    let second = Utc::now().timestamp();
    LAST[kind as usize].swap(second, Ordering::Relaxed) != second
}

/// An event or delivery that could not be processed, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct DeadLetter {
    /// Unique per failed record: the event id, or the log position of an undecodable record.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// The stage that failed: decode, rules, resolver, store, webhook.
    pub stage: String,
    /// A short machine-readable kind: malformed, rejected, conflict_retries_exhausted, ...
    pub error_type: String,
    pub reason: String,
    /// Which rule refused it, when a rule did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The raw record, as it was on the log.
    pub payload: String,
    pub recorded_at: DateTime<Utc>,
    /// When an operator sent it through the pipeline again, if they did.
    #[serde(default)]
    pub replayed_at: Option<DateTime<Utc>>,
}

/// Which dead letters an operator acts on at once: every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LetterFilter {
    /// The stage that failed (`DeadLetter::stage`).
    #[serde(default)]
    pub stage: Option<String>,
    /// The kind of failure (`DeadLetter::error_type`).
    #[serde(default)]
    pub error_type: Option<String>,
    /// A prefix of the order id.
    #[serde(default)]
    pub order_prefix: Option<String>,
}

impl LetterFilter {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.stage.as_ref().is_none_or(|s| *s == letter.stage)
            && self.error_type.as_ref().is_none_or(|t| *t == letter.error_type)
            && self
                .order_prefix
                .as_ref()
                .is_none_or(|p| letter.order_id.as_ref().is_some_and(|o| o.starts_with(p.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_its_stage_and_kind_in_its_letter() {
        let f = Failure::new(Stage::Rules, FailureKind::Timeout, "too slow").decided_by("wasm:rules@v2");
        let l = f.letter("e1".into(), Some("o1".into()), "{}".into());
        assert_eq!((l.stage.as_str(), l.error_type.as_str()), ("rules", "timeout"));
        assert_eq!((l.reason.as_str(), l.decided_by.as_deref()), ("too slow", Some("wasm:rules@v2")));
    }

    #[test]
    fn one_log_line_a_second_per_kind() {
        // Within one second: the first call says yes, the next no; another kind is apart.
        let now = Utc::now().timestamp();
        while Utc::now().timestamp() == now {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(first_this_second(FailureKind::Unpublishable));
        assert!(!first_this_second(FailureKind::Unpublishable));
        assert!(first_this_second(FailureKind::RecordIdReused));
    }
}
