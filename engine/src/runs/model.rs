//! What a run is, as the API serves it and the store keeps it.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a run is. The happy path goes IDLE → GENERATING → VIP_PROCESSING →
/// VIP_DRAINED → NORMAL_PROCESSING → DONE; CANCELLED and FAILED end it early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    Idle,
    Generating,
    VipProcessing,
    VipDrained,
    NormalProcessing,
    Done,
    Cancelled,
    Failed,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Cancelled | Phase::Failed)
    }

    /// The fixed label value of `orchestrator_run_phase_changes_total`.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Idle => "Idle",
            Phase::Generating => "Generating",
            Phase::VipProcessing => "VipProcessing",
            Phase::VipDrained => "VipDrained",
            Phase::NormalProcessing => "NormalProcessing",
            Phase::Done => "Done",
            Phase::Cancelled => "Cancelled",
            Phase::Failed => "Failed",
        }
    }
}

/// Tier shares in percent; they must add up to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierShares {
    #[serde(rename = "DIAMOND")]
    pub diamond: u32,
    #[serde(rename = "GOLD")]
    pub gold: u32,
    #[serde(rename = "SILVER")]
    pub silver: u32,
    #[serde(rename = "BRONZE")]
    pub bronze: u32,
}

impl Default for TierShares {
    fn default() -> Self {
        Self { diamond: 5, gold: 15, silver: 30, bronze: 50 }
    }
}

impl TierShares {
    pub fn validate(&self) -> Result<(), String> {
        // Summed wide: shares near u32::MAX must not wrap round to 100.
        let sum: u64 = [self.diamond, self.gold, self.silver, self.bronze].into_iter().map(u64::from).sum();
        if sum != 100 {
            return Err(format!("tier_mix shares must add up to 100, they add up to {sum}"));
        }
        Ok(())
    }
}

/// `POST /runs`.
#[derive(Debug, Clone, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// How many orders to generate: 1 to the engine's maximum (1,500,000 by default).
    /// Signed so that a negative number gets a clear answer instead of a parse error.
    #[schema(minimum = 1)]
    #[schemars(range(min = 1))]
    pub quantity: i64,
    #[serde(default)]
    pub tier_mix: Option<TierShares>,
}

/// A time window of one priority's processing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct Window {
    /// Orders of this priority the run generated.
    pub count: u64,
    /// Orders of this priority processed so far.
    pub processed: u64,
    /// The first order of this priority applied (from the store's history).
    pub started_at: Option<DateTime<Utc>>,
    /// The last one applied.
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<u64>,
    pub orders_per_s: Option<f64>,
}

/// What the engine found when it checked a finished run against its log and store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct Verification {
    pub passed: bool,
    /// Orders generated, and stored rows found for them.
    pub generated: u64,
    pub stored: u64,
    /// Applied history entries for the run's orders: exactly one per order when passed.
    pub applied_entries: u64,
    /// Rows not at version 1 (changed by something other than their one event).
    pub not_processed: u64,
    /// Whether the last VIP order was applied before the first NORMAL one.
    pub vip_before_normal: bool,
    /// Each failed check, in words.
    pub failures: Vec<String>,
}

/// What a cancel did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct CancelReport {
    /// Orders the generator had put on the log when it stopped.
    pub produced: u64,
    /// Whether the run's unprocessed events are being discarded.
    pub purged: bool,
    /// The run's events still on the log when it was cancelled (then discarded if purged).
    pub unprocessed: u64,
    /// Stored orders of the run that were still PENDING and were deleted.
    pub deleted_pending: u64,
}

/// `POST /runs/{id}/cancel`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// Discard the run's events that are still on the log.
    #[serde(default)]
    pub purge: bool,
    /// Delete the run's stored orders whose status is still PENDING.
    #[serde(default)]
    pub delete_pending: bool,
}

/// One generated run: live while it is going, persisted at every phase change, every
/// few seconds while it goes (its heartbeat), and at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct Run {
    pub id: String,
    pub phase: Phase,
    pub quantity: u64,
    pub tier_mix: TierShares,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Orders on the log so far.
    pub generated: u64,
    pub generation_ms: Option<u64>,
    pub vip: Window,
    pub normal: Window,
    pub total_ms: Option<u64>,
    pub progress_percent: f64,
    /// Seconds left at the current pace, while the run goes.
    pub eta_s: Option<f64>,
    /// From append to applied, over the orders applied during the run.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Dead letters recorded during the run.
    pub dead_letters: u64,
    /// Set when the run failed, or a reason the run's end is doubtful.
    pub error: Option<String>,
    pub verification: Option<Verification>,
    pub cancel: Option<CancelReport>,
    /// When the instance running it last recorded it. A run not recorded for the run
    /// lease (`--run-lease-secs`) is reported FAILED: its instance stopped.
    #[serde(default)]
    pub heartbeat_at: Option<DateTime<Utc>>,
}

impl Run {
    /// Order ids of a run sort by priority, so each priority is one key range.
    pub fn prefix(&self, vip: bool) -> String {
        format!("{}-{}-", self.id, if vip { "vip" } else { "normal" })
    }

    /// The id of the run's `seq`th order of one priority.
    pub fn order_id(&self, vip: bool, seq: u64) -> String {
        self.keys(vip, 0).id(seq)
    }

    /// The run's first `count` orders of one priority, by id.
    pub fn keys(&self, vip: bool, count: u64) -> crate::store::RunKeys {
        crate::store::RunKeys { prefix: self.prefix(vip), count }
    }
}
