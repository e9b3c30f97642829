//! An order's journey: what the engine did with each of its events (where the event
//! came from, what decided it, each compare-and-set it lost and how that was resolved,
//! and what it changed), and the timeline `GET /orders/{id}/journey` draws from it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Order, Priority};

/// What became of one event (or edit), as recorded in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The row moved to a new version.
    Applied,
    /// The rules left the row alone (the reason says why).
    Skipped,
    /// The event went to the dead-letter log.
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Skipped => "skipped",
            Outcome::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "applied" => Outcome::Applied,
            "skipped" => Outcome::Skipped,
            "rejected" => Outcome::Rejected,
            _ => return None,
        })
    }
}

/// What the engine did with one event before its outcome, kept with its history entry.
/// Every part is optional: entries written before traces existed have none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
pub struct Trace {
    /// When the change happened at its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<DateTime<Utc>>,
    /// When the engine first accepted it: its place among the order's changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<DateTime<Utc>>,
    /// When the log acknowledged its append.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appended_at: Option<DateTime<Utc>>,
    /// Where it sat on the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogPlace>,
    /// Since when it waited for its order's created event, if it came before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_at: Option<DateTime<Utc>>,
    /// What the order rules said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Verdict>,
    /// Each compare-and-set the event's write lost, oldest first, and how it was resolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Conflict>,
    /// The row's fields the event changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<FieldChange>,
}

impl Trace {
    pub fn is_empty(&self) -> bool {
        *self == Trace::default()
    }
}

/// A record's place on the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
pub struct LogPlace {
    pub priority: Priority,
    pub partition: i32,
    pub offset: u64,
}

/// A plugin's say on an event: which plugin (and version), and what it said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
pub struct Verdict {
    /// The plugin and version, as in `order-rules@v2`.
    pub by: String,
    pub said: Said,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a rule or resolver said about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Said {
    /// Write these fields (the rules).
    Upsert,
    /// Write the change merged with the stored row (the resolver).
    Merge,
    /// Leave the row alone.
    Skip,
    /// Refuse the event: it goes to the dead letters.
    Reject,
    /// The plugin failed on the event (trap, timeout, bad answer).
    Failed,
}

impl Said {
    pub fn as_str(self) -> &'static str {
        match self {
            Said::Upsert => "upsert",
            Said::Merge => "merge",
            Said::Skip => "skip",
            Said::Reject => "reject",
            Said::Failed => "failed",
        }
    }
}

/// A compare-and-set the event's write lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
pub struct Conflict {
    /// The version the write expected (none: it expected no row).
    pub expected: Option<u64>,
    /// The version it found instead (none: the row was gone).
    pub found: Option<u64>,
    /// What the conflict resolver then said; none when the row was gone and the change
    /// was written as a new row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver: Option<Verdict>,
}

/// One field an event changed. Personal fields (customer, note) are named without their
/// values, so erasing an order's row erases them everywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, utoipa::ToSchema))]
pub struct FieldChange {
    pub field: String,
    /// Absent when the row was new, or the field is personal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    /// Absent when the field is personal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
    /// The values are personal data and not kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withheld: bool,
}

/// An order and the journey of each of its events, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct Journey {
    pub order: Order,
    pub events: Vec<JourneyEvent>,
    /// The order has more events than a journey shows (the first 1000).
    pub truncated: bool,
}

/// One event's way through the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct JourneyEvent {
    pub event_id: String,
    pub source: String,
    pub outcome: Outcome,
    /// The order's version after the event (unchanged unless it was applied).
    pub version: u64,
    /// Who decided the outcome: the rules, the resolver, the decoder or an operator.
    pub decided_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub steps: Vec<Step>,
    /// The fields this event changed (applied events only).
    pub changes: Vec<FieldChange>,
}

/// One step on an event's way, when it is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct Step {
    pub kind: StepKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    pub detail: String,
}

/// The steps of an event's way, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// The change happened at its source.
    Occurred,
    /// The engine accepted it.
    Received,
    /// The log acknowledged its append.
    Appended,
    /// It waited for its order's created event.
    Parked,
    /// The order rules decided it.
    Decided,
    /// Its write lost a compare-and-set.
    Conflict,
    /// The conflict resolver decided it against the newer row.
    Resolved,
    Applied,
    Skipped,
    DeadLettered,
    /// The new row went out on the changelog (WebSocket), right after its commit.
    Published,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Occurred => "occurred",
            StepKind::Received => "received",
            StepKind::Appended => "appended",
            StepKind::Parked => "parked",
            StepKind::Decided => "decided",
            StepKind::Conflict => "conflict",
            StepKind::Resolved => "resolved",
            StepKind::Applied => "applied",
            StepKind::Skipped => "skipped",
            StepKind::DeadLettered => "dead_lettered",
            StepKind::Published => "published",
        }
    }
}
