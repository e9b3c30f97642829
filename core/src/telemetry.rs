//! Metrics: the Prometheus recorder, metric names and descriptions, and the
//! pre-resolved handles the hot path uses.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::{PerPriority, Priority};

pub const RECEIVED: &str = "orchestrator_received_events_total";
pub const CONSUMED: &str = "orchestrator_consumed_events_total";
pub const PROCESSED: &str = "orchestrator_processed_events_total";
pub const APPLIED: &str = "orchestrator_applied_events_total";
pub const CAS_CONFLICTS: &str = "orchestrator_cas_conflicts_total";
pub const ERRORS: &str = "orchestrator_errors_total";
pub const RULE_DURATION: &str = "orchestrator_rule_duration_seconds";
pub const APPLY_LATENCY: &str = "orchestrator_apply_latency_seconds";
pub const QUEUE_DEPTH: &str = "orchestrator_queue_depth";
pub const WS_CLIENTS: &str = "orchestrator_ws_clients";
pub const WS_RESYNCS: &str = "orchestrator_ws_resyncs_total";
pub const PLUGIN_CALLS: &str = "orchestrator_plugin_invocations_total";
pub const PLUGIN_ERRORS: &str = "orchestrator_plugin_errors_total";
pub const PLUGIN_COMPILES: &str = "orchestrator_plugin_compilations_total";
pub const PLUGIN_DURATION: &str = "orchestrator_plugin_call_duration_seconds";
pub const SHADOW_DECISIONS: &str = "orchestrator_shadow_decisions_total";
pub const RUN_PROGRESS: &str = "orchestrator_run_progress_ratio";
pub const RUN_PHASE_CHANGES: &str = "orchestrator_run_phase_changes_total";
pub const WEBHOOKS_RECEIVED: &str = "orchestrator_webhooks_received_total";
/// A Shopify delivery's audited outcomes: the label values of [`WEBHOOKS_RECEIVED`].
pub const WEBHOOK_OUTCOMES: [&str; 6] =
    ["received", "duplicate", "ignored", "rejected", "uninstalled", "shop_inactive"];
pub const SHOP_WEBHOOKS: &str = "orchestrator_shop_webhooks_total";
pub const PARKED: &str = "orchestrator_parked_events_total";
pub const AUTH_REFUSED: &str = "orchestrator_auth_refused_total";
pub const DEGRADED: &str = "orchestrator_degraded";
pub const HTTP_CONNECTIONS: &str = "orchestrator_http_connections";
pub const CONNECTIONS_REFUSED: &str = "orchestrator_connections_refused_total";
pub const WS_DROPPED: &str = "orchestrator_ws_dropped_total";
pub const WHATIF_CASES: &str = "orchestrator_whatif_cases_total";
pub const PLUGIN_MEMORY: &str = "orchestrator_plugin_memory_bytes";
pub const PIPELINE_RETRIES: &str = "orchestrator_pipeline_retries_total";
pub const SHOPIFY_RECONCILED: &str = "orchestrator_shopify_reconciled_orders_total";
pub const COMPLIANCE_REQUESTS: &str = "orchestrator_compliance_requests_total";
pub const COMPLIANCE_OPEN: &str = "orchestrator_compliance_open_requests";
pub const DEAD_LETTERS_HELD: &str = "orchestrator_dead_letters_held";
pub const DEAD_LETTERS_OLDEST_AGE: &str = "orchestrator_dead_letters_oldest_age_seconds";
pub const DEAD_LETTERS_PURGED: &str = "orchestrator_dead_letters_purged_total";
pub const STORE_COMMITS: &str = "orchestrator_store_commits_total";
pub const STORE_WRITES: &str = "orchestrator_store_writes_total";

/// Every metric the engine exports: the one list the Grafana consistency test reads.
pub const ALL: &[&str] = &[
    RECEIVED,
    CONSUMED,
    PROCESSED,
    APPLIED,
    CAS_CONFLICTS,
    ERRORS,
    RULE_DURATION,
    APPLY_LATENCY,
    QUEUE_DEPTH,
    WS_CLIENTS,
    WS_RESYNCS,
    PLUGIN_CALLS,
    PLUGIN_ERRORS,
    PLUGIN_COMPILES,
    PLUGIN_DURATION,
    SHADOW_DECISIONS,
    RUN_PROGRESS,
    RUN_PHASE_CHANGES,
    WEBHOOKS_RECEIVED,
    SHOP_WEBHOOKS,
    PARKED,
    AUTH_REFUSED,
    DEGRADED,
    HTTP_CONNECTIONS,
    CONNECTIONS_REFUSED,
    WS_DROPPED,
    WHATIF_CASES,
    PLUGIN_MEMORY,
    PIPELINE_RETRIES,
    SHOPIFY_RECONCILED,
    COMPLIANCE_REQUESTS,
    COMPLIANCE_OPEN,
    DEAD_LETTERS_HELD,
    DEAD_LETTERS_OLDEST_AGE,
    DEAD_LETTERS_PURGED,
    STORE_COMMITS,
    STORE_WRITES,
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
                )
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            register_at_zero();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(RECEIVED, "Events accepted into the log, by priority and source interface.");
    describe_counter!(CONSUMED, "Events read from the log by the pipeline, by priority.");
    describe_counter!(PROCESSED, "Events processed, by priority and outcome (applied, skipped, rejected, duplicate).");
    describe_counter!(
        APPLIED,
        "Changes applied to the store, by priority (operator edits count as their order's priority)."
    );
    describe_counter!(CAS_CONFLICTS, "Compare-and-set writes that lost a race and were re-resolved.");
    describe_counter!(ERRORS, "Errors by error_type and stage.");
    describe_histogram!(
        RULE_DURATION,
        metrics::Unit::Seconds,
        "Time one call to the rules (or the resolver) took; the rules decide a batch per call."
    );
    describe_histogram!(
        APPLY_LATENCY,
        metrics::Unit::Seconds,
        "Time from log append to applied in the store, by priority."
    );
    describe_gauge!(QUEUE_DEPTH, "Events in the log not yet committed, by priority.");
    describe_gauge!(WS_CLIENTS, "Connected WebSocket clients.");
    describe_counter!(WS_RESYNCS, "Resync messages sent to WebSocket clients that fell behind.");
    describe_counter!(PLUGIN_CALLS, "Calls into a Wasm plugin, by plugin slot, version and outcome (ok, error).");
    describe_counter!(
        PLUGIN_ERRORS,
        "Failed plugin calls, by plugin (slot@version#hash) and error_type (trap, timeout, memory_limit, instantiate)."
    );
    describe_counter!(
        PLUGIN_COMPILES,
        "Components made ready to run, by source: compiled, or loaded from the compile cache on disk."
    );
    describe_histogram!(
        PLUGIN_DURATION,
        metrics::Unit::Seconds,
        "Duration of one call into a plugin (a batch of events or one), by slot and version."
    );
    describe_counter!(
        SHADOW_DECISIONS,
        "Shadow decisions compared with the active rules, by result (agreed, differed)."
    );
    describe_gauge!(RUN_PROGRESS, "Progress of the current generated run, 0 to 1.");
    describe_counter!(RUN_PHASE_CHANGES, "Phase changes of generated runs, by phase.");
    describe_counter!(
        WEBHOOKS_RECEIVED,
        "Shopify webhook deliveries, by outcome (received, duplicate, ignored, rejected, uninstalled, shop_inactive)."
    );
    describe_counter!(
        SHOP_WEBHOOKS,
        "Shopify webhook deliveries, by shop and outcome. Only the first --shop-metric-limit shops that signed a \
         delivery get their own shop label; the rest count as \"other\", signed deliveries without a shop as \
         \"none\", and senders not shown to hold a secret as \"unverified\"."
    );
    describe_counter!(
        SHOPIFY_RECONCILED,
        "Orders read from Shopify's Admin API by reconciliation, by outcome (applied, up_to_date, failed)."
    );
    describe_counter!(
        COMPLIANCE_REQUESTS,
        "Shopify compliance requests (customers/redact, customers/data_request, shop/redact), by topic and \
         outcome (received; done; retried: a store error, tried again; failed: given up after 20 tries)."
    );
    describe_gauge!(COMPLIANCE_OPEN, "Compliance requests received and not yet done on this instance's last look.");
    describe_gauge!(
        DEAD_LETTERS_HELD,
        "Dead letters the store holds (replayed ones too, until an operator purges them), read every 30 s."
    );
    describe_gauge!(
        DEAD_LETTERS_OLDEST_AGE,
        "Age of the oldest dead letter held, 0 when there is none, read every 30 s."
    );
    describe_counter!(DEAD_LETTERS_PURGED, "Dead letters an operator deleted for good (POST /dead-letters/purge).");
    describe_counter!(
        STORE_COMMITS,
        "Write transactions the embedded store committed, each one fsync (0 on Kafka + CQL)."
    );
    describe_counter!(
        STORE_WRITES,
        "Writes the embedded store committed: concurrent ones share a transaction (group commit)."
    );
    describe_counter!(
        PARKED,
        "Events that came before their order's create, by priority and action (parked; released: decided later)."
    );
    describe_gauge!(HTTP_CONNECTIONS, "Open HTTP connections (WebSocket clients included).");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused, by reason (cap: --max-connections; accept_failed: out of file descriptors; \
         ws_cap: --max-ws-clients)."
    );
    describe_counter!(
        WS_DROPPED,
        "WebSocket clients dropped, by reason (not_reading: sends blocked past the timeout)."
    );
    describe_gauge!(
        PLUGIN_MEMORY,
        "Memory a loaded plugin version holds on this instance, by plugin, version and kind \
         (code: compiled code; instances: the linear memory of its idle instances)."
    );
    describe_counter!(
        WHATIF_CASES,
        "Decided events kept for what-if runs, by outcome \
         (recorded; dropped: the recorder was behind; failed: the store refused them)."
    );
    describe_counter!(
        PIPELINE_RETRIES,
        "Pipeline steps retried, by cause (outage: the log or store was away; fault: anything else, shown on /health)."
    );
    describe_gauge!(
        DEGRADED,
        "1 while the log or the store fails, or the pipeline retries a fault (GET /health answers 503), else 0."
    );
    describe_counter!(
        AUTH_REFUSED,
        "Requests refused by the access policy, by reason \
         (unauthenticated: no or unknown token; forbidden: role too low)."
    );
}

/// Registers the series the README lists at zero, so `/metrics` shows each (with its
/// help text) from the start, not after its first increment.
fn register_at_zero() {
    counter!(STORE_COMMITS).absolute(0);
    counter!(STORE_WRITES).absolute(0);
    for p in Priority::ALL {
        for name in [RECEIVED, CONSUMED, APPLIED] {
            counter!(name, "priority" => p.label()).absolute(0);
        }
        for outcome in ["applied", "skipped", "rejected", "duplicate"] {
            counter!(PROCESSED, "priority" => p.label(), "outcome" => outcome).absolute(0);
        }
        for action in ["parked", "released"] {
            counter!(PARKED, "priority" => p.label(), "action" => action).absolute(0);
        }
        gauge!(QUEUE_DEPTH, "priority" => p.label()).set(0.0);
    }
    for reason in ["unauthenticated", "forbidden"] {
        counter!(AUTH_REFUSED, "reason" => reason).absolute(0);
    }
    for outcome in ["received", "duplicate", "ignored", "rejected", "uninstalled", "shop_inactive"] {
        counter!(WEBHOOKS_RECEIVED, "outcome" => outcome).absolute(0);
    }
    for outcome in ["applied", "up_to_date", "failed"] {
        counter!(SHOPIFY_RECONCILED, "outcome" => outcome).absolute(0);
    }
    for topic in ["customers/redact", "customers/data_request", "shop/redact"] {
        for outcome in ["received", "done", "retried", "failed"] {
            counter!(COMPLIANCE_REQUESTS, "topic" => topic, "outcome" => outcome).absolute(0);
        }
    }
    gauge!(COMPLIANCE_OPEN).set(0.0);
    gauge!(DEAD_LETTERS_HELD).set(0.0);
    gauge!(DEAD_LETTERS_OLDEST_AGE).set(0.0);
    for source in ["compiled", "cache"] {
        counter!(PLUGIN_COMPILES, "source" => source).absolute(0);
    }
    counter!(CAS_CONFLICTS).absolute(0);
    counter!(WS_RESYNCS).absolute(0);
    gauge!(WS_CLIENTS).set(0.0);
    gauge!(DEGRADED).set(0.0);
    gauge!(HTTP_CONNECTIONS).set(0.0);
    for reason in ["cap", "accept_failed", "ws_cap"] {
        counter!(CONNECTIONS_REFUSED, "reason" => reason).absolute(0);
    }
    counter!(WS_DROPPED, "reason" => "not_reading").absolute(0);
    for outcome in ["recorded", "dropped", "failed"] {
        counter!(WHATIF_CASES, "outcome" => outcome).absolute(0);
    }
    for cause in ["outage", "fault"] {
        counter!(PIPELINE_RETRIES, "cause" => cause).absolute(0);
    }
}

/// The queue-depth gauge of one priority.
pub fn queue_depth(p: Priority) -> Gauge {
    gauge!(QUEUE_DEPTH, "priority" => p.label())
}

/// Handles resolved once per pipeline, so the hot path does no label hashing.
pub struct PipelineMetrics {
    pub consumed: PerPriority<Counter>,
    pub applied: PerPriority<Counter>,
    pub skipped: PerPriority<Counter>,
    pub rejected: PerPriority<Counter>,
    pub duplicate: PerPriority<Counter>,
    pub parked: PerPriority<Counter>,
    pub released: PerPriority<Counter>,
    pub conflicts: Counter,
    pub rule_duration: Histogram,
    pub latency: PerPriority<Histogram>,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PipelineMetrics {
    pub fn new() -> Self {
        let per = |name: &'static str| PerPriority::from_fn(|p| counter!(name, "priority" => p.label()));
        let outcome =
            |o: &'static str| PerPriority::from_fn(|p| counter!(PROCESSED, "priority" => p.label(), "outcome" => o));
        let parking =
            |a: &'static str| PerPriority::from_fn(|p| counter!(PARKED, "priority" => p.label(), "action" => a));
        Self {
            consumed: per(CONSUMED),
            applied: per(APPLIED),
            skipped: outcome("skipped"),
            rejected: outcome("rejected"),
            duplicate: outcome("duplicate"),
            parked: parking("parked"),
            released: parking("released"),
            conflicts: counter!(CAS_CONFLICTS),
            rule_duration: histogram!(RULE_DURATION),
            latency: PerPriority::from_fn(|p| histogram!(APPLY_LATENCY, "priority" => p.label())),
        }
    }
}
