//! The versioned order store, as ports that each backend implements: `Orders`
//! (insert-if-absent, compare-and-set on `version`, idempotent apply keyed by `event_id`,
//! every outcome kept in a history), `Parking`, `DeadLetters`, `WebhookLedger`, `Runs`,
//! `ActionLog` and `Cases` (decided events kept for what-if runs).

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod cql;
pub mod embedded;
#[cfg(test)]
pub mod memory;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{Order, OrderEvent, Priority, Status};
pub use crate::failure::DeadLetter;
pub use orchestrator_types::{Page, Sort};

pub use crate::error::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not answer now (busy, timed out, unreachable): the same call
    /// may succeed later, so callers retry with backoff.
    #[error("store backend unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The backend answered with an error that a retry will not change.
    #[error("store backend: {0}")]
    Backend(#[source] BoxError),
    #[error("corrupt row in store: {0}")]
    Corrupt(String),
    #[error("bad cursor: {0}")]
    Cursor(String),
}

impl StoreError {
    /// Whether retrying the same call may succeed: an outage, not a bad request or row.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

pub use orchestrator_types::journey::{Outcome, Trace};

/// One write to the store, keyed by its `event_id` for idempotency.
#[derive(Debug, Clone)]
pub enum Write {
    /// Put `row` (already at its new version). With `base: None` the row is inserted
    /// only if absent; otherwise only if the stored version equals the base's.
    Apply { event_id: String, source: String, base: Option<Base>, row: Order, trace: Trace },
    /// Record that the event was skipped or rejected, without touching the row.
    /// A rejection also lands in the dead-letter log.
    Record {
        event_id: String,
        source: String,
        order_id: String,
        outcome: Outcome,
        reason: String,
        decided_by: String,
        dead_letter: Option<DeadLetter>,
        trace: Trace,
    },
}

impl Write {
    pub fn trace(&self) -> &Trace {
        match self {
            Write::Apply { trace, .. } | Write::Record { trace, .. } => trace,
        }
    }

    pub fn event_id(&self) -> &str {
        match self {
            Write::Apply { event_id, .. } | Write::Record { event_id, .. } => event_id,
        }
    }

    pub fn order_id(&self) -> &str {
        match self {
            Write::Apply { row, .. } => &row.id,
            Write::Record { order_id, .. } => order_id,
        }
    }
}

/// What a write knows of the row it replaces: the version its compare-and-set expects,
/// and where a listing by time holds that row (the entry a CQL store retires).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Base {
    pub version: u64,
    pub updated_at: DateTime<Utc>,
    pub status: Status,
    pub priority: Priority,
    /// Whether the row recorded its shop (CQL lists a row under its shop once it does).
    pub has_shop: bool,
}

impl Base {
    pub fn of(row: &Order) -> Self {
        let (version, updated_at, status, priority) = (row.version, row.updated_at, row.status, row.priority);
        Base { version, updated_at, status, priority, has_shop: row.shop.is_some() }
    }
}

/// The result of one [`Write`].
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResult {
    /// Written (or recorded) now.
    Done,
    /// This event id was already recorded; nothing changed.
    Duplicate,
    /// This event id was already recorded for another order (named here); nothing
    /// changed. Only a backend whose ledger is global can tell (the embedded one).
    IdTaken(String),
    /// The compare-and-set lost: this is the row now stored (`None` if absent).
    Conflict(Option<Box<Order>>),
}

/// One history entry: an applied change, or a skipped or rejected event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct HistoryEntry {
    pub order_id: String,
    /// The order's version after this entry (unchanged for skipped and rejected).
    pub version: u64,
    pub event_id: String,
    pub source: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub decided_by: String,
    pub recorded_at: DateTime<Utc>,
    /// What the engine did with the event on its way here (none for entries of earlier
    /// versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
}

/// The answer to claiming a dead letter for replay.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplayClaim {
    Claimed(DeadLetter),
    AlreadyReplayed(DeadLetter),
    NotFound,
}

/// Orders by status and by priority, as `GET /order-counts` answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct OrderCounts {
    pub total: u64,
    /// Each status that has orders.
    pub by_status: std::collections::BTreeMap<String, u64>,
    pub by_priority: std::collections::BTreeMap<String, u64>,
    /// False where the figures are kept in counters rather than counted (CQL): they
    /// drift with writes retried after an unknown outcome (README, *Order counts*).
    pub exact: bool,
    pub counted_at: DateTime<Utc>,
}

impl OrderCounts {
    /// From (status, priority, orders) triples.
    pub fn of(groups: impl IntoIterator<Item = (String, String, i64)>, exact: bool) -> Self {
        let mut counts = OrderCounts { exact, counted_at: Utc::now(), ..Default::default() };
        for (status, priority, n) in groups {
            // A counter can go below zero when its increment was lost: none is shown.
            let n = n.max(0) as u64;
            if n == 0 {
                continue;
            }
            counts.total += n;
            *counts.by_status.entry(status).or_default() += n;
            *counts.by_priority.entry(priority).or_default() += n;
        }
        counts
    }
}

/// A page request for orders.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub limit: usize,
    pub cursor: Option<String>,
    pub status: Option<Status>,
    pub priority: Option<Priority>,
    /// Prefix of the order id or the customer, or a Shopify order id (see
    /// [`ListQuery::id_prefixes`]).
    pub q: Option<String>,
    pub sort: Sort,
    /// Only the orders of this shop.
    pub shop: Option<String>,
}

impl ListQuery {
    /// The id prefixes a search looks under: the text itself, and for a Shopify order
    /// id (digits, as in the admin's `/admin/orders/<id>`) the engine's id of that order.
    pub fn id_prefixes(&self) -> Vec<String> {
        let Some(q) = self.q.as_deref().filter(|q| !q.is_empty()) else { return Vec::new() };
        let mut prefixes = vec![q.to_string()];
        if q.bytes().all(|b| b.is_ascii_digit()) {
            prefixes.push(format!("shopify-{q}"));
        }
        prefixes
    }

    /// Whether `o` is found by the search: by an id prefix, or its customer's prefix.
    pub fn found(&self, o: &Order) -> bool {
        match self.q.as_deref().filter(|q| !q.is_empty()) {
            None => true,
            Some(q) => o.customer.starts_with(q) || self.id_prefixes().iter().any(|p| o.id.starts_with(p.as_str())),
        }
    }
}

/// A shop's standing with the app: active unless it uninstalled the app (a shop never
/// seen is active).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ShopRecord {
    /// Its `X-Shopify-Shop-Domain`, in lower case.
    pub domain: String,
    pub active: bool,
    /// What changed it last: the `app/uninstalled` webhook, or who activated it again.
    pub reason: String,
    pub changed_at: DateTime<Utc>,
}

/// One webhook delivery, as the bridge saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct WebhookDelivery {
    /// `X-Shopify-Webhook-Id`: the same on every retry of one delivery.
    pub webhook_id: Option<String>,
    /// `X-Shopify-Event-Id`.
    pub event_id: Option<String>,
    pub topic: Option<String>,
    pub shop: Option<String>,
    /// received, duplicate, ignored or rejected.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// One operator or admin action, as the audit keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionRecord {
    pub at: DateTime<Utc>,
    /// The name of the token that acted.
    pub token: String,
    /// The token's role: operator or admin.
    pub role: String,
    /// The route, as in `POST /plugins/{slot}/promote`.
    pub action: String,
    /// The path acted on, as in `/plugins/order-rules/promote`.
    pub target: String,
    /// The answer's HTTP status.
    pub status: u16,
    /// done (2xx), refused (4xx) or failed (5xx).
    pub outcome: String,
}

/// Orders and history entries under one order-id prefix: how a run is verified.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Audit {
    pub orders: u64,
    /// Rows not at version 1.
    pub not_first_version: u64,
    /// History entries with outcome applied, and with any other outcome.
    pub applied: u64,
    pub other: u64,
    pub first_applied: Option<DateTime<Utc>>,
    pub last_applied: Option<DateTime<Utc>>,
}

/// The orders of one priority of a generated run, which it names `{prefix}{seq:08}` for
/// each seq below `count` ([`RunKeys::id`]): a store reads exactly these (partitions on
/// CQL, an id range on SQLite) instead of scanning every order for a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunKeys {
    pub prefix: String,
    pub count: u64,
}

impl RunKeys {
    /// Most orders of one priority a run may hold: ids up to it sort as their numbers do.
    pub const MAX: u64 = 100_000_000;

    pub fn id(&self, seq: u64) -> String {
        format!("{}{seq:08}", self.prefix)
    }

    /// The ids in chunks of `n`, so a run of millions is read a chunk at a time.
    pub fn id_chunks(&self, n: u64) -> impl Iterator<Item = Vec<String>> + '_ {
        let end = self.count.min(Self::MAX);
        (0..end).step_by(n.max(1) as usize).map(move |from| (from..(from + n).min(end)).map(|s| self.id(s)).collect())
    }

    /// The ids as a range, `[first, end)`; only ids of [`RunKeys::id_chars`] characters
    /// in it are the run's (`{prefix}00000001x` sorts between two of them).
    pub fn range(&self) -> (String, String) {
        (self.id(0), self.id(self.count.min(Self::MAX)))
    }

    /// How many characters each of the run's ids has.
    pub fn id_chars(&self) -> usize {
        self.prefix.chars().count() + 8
    }
}

/// A listing's cursor: the last key it gave, `updated_at` in microseconds (for the sorts
/// by time) and the id, so the next page starts right after it.
pub(crate) fn encode_cursor(updated_us: Option<i64>, id: &str) -> String {
    use base64::Engine;
    let key = updated_us.map(|k| k.to_string()).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{key}:{id}"))
}

pub(crate) fn decode_cursor(cursor: &str) -> Result<(Option<i64>, String), StoreError> {
    use base64::Engine;
    let bad = || StoreError::Cursor("not a cursor this server issued".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (key, id) = raw.split_once(':').ok_or_else(bad)?;
    let key = if key.is_empty() { None } else { Some(key.parse().map_err(|_| bad())?) };
    Ok((key, id.to_string()))
}

/// One page of `all`, for a backend that pages a list it holds whole: the cursor is the
/// index of the next item; 1 to 1000 items a page, so paging always moves on.
pub fn page_by_place<T: Clone>(all: &[T], limit: usize, cursor: Option<String>) -> Result<Page<T>, StoreError> {
    let from: usize = match cursor {
        Some(c) => c.parse().map_err(|_| StoreError::Cursor(format!("{c:?} is not a cursor this server issued")))?,
        None => 0,
    };
    let to = from.saturating_add(limit.clamp(1, 1000)).min(all.len());
    let items = all.get(from..to).unwrap_or_default().to_vec();
    Ok(Page { items, next_cursor: (to < all.len()).then(|| to.to_string()) })
}

/// Row counts, for health and tests.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct StoreStats {
    pub orders: u64,
    pub history: u64,
    pub dead_letters: u64,
    /// Events parked until their order's created event lands.
    #[serde(default)]
    pub parked: u64,
}

/// A generated run as the store keeps it: its id and start for ordering, and the record
/// itself as JSON, which only the runs module reads (the store does not know its shape).
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub started_at: DateTime<Utc>,
    pub body: String,
}

/// Orders and their history: the versioned rows the pipeline decides and writes, and the
/// reads behind the orders API.
#[async_trait]
pub trait Orders: Send + Sync + 'static {
    /// A short name for health output: "embedded", "scylla".
    fn backend(&self) -> &'static str;
    async fn get(&self, id: &str) -> Result<Option<Order>, StoreError>;
    async fn get_many(&self, ids: Vec<String>) -> Result<HashMap<String, Order>, StoreError>;
    /// Performs the writes in order. Each is atomic and idempotent on its event id;
    /// the batch as a whole need not be. Hands each write back with its result.
    async fn write(&self, writes: Vec<Write>) -> Result<Vec<(Write, WriteResult)>, StoreError>;
    /// The order's history, oldest first: up to `limit` entries after `cursor`.
    async fn history(
        &self,
        order_id: &str,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<Page<HistoryEntry>, StoreError>;
    async fn list(&self, query: ListQuery) -> Result<Page<Order>, StoreError>;
    /// Row counts of orders, history and dead letters.
    async fn stats(&self) -> Result<StoreStats, StoreError>;
    /// Orders by status and priority: counted (embedded), or kept in counters (CQL).
    async fn counts(&self) -> Result<OrderCounts, StoreError>;
    /// The order each of these event ids was recorded for, when the backend's ledger is
    /// global; `None` from a backend whose ledger is per order (CQL), which cannot tell.
    async fn recorded_for(&self, _event_ids: Vec<String>) -> Result<Option<HashMap<String, String>>, StoreError> {
        Ok(None)
    }
}

/// An event held back because its order did not exist when it came off the log.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedEvent {
    pub order_id: String,
    pub event_id: String,
    pub priority: Priority,
    /// When the event was appended to the log (µs), then its offset there: one order's
    /// parked events apply in this order (records appended together share a time), and
    /// a redelivery parks it under the same key.
    pub appended_at_us: i64,
    pub offset: u64,
    pub parked_at: DateTime<Utc>,
    /// The event as it was on the log (JSON).
    pub payload: String,
}

/// Events that arrived before their order's created event, held durably until it lands.
#[async_trait]
pub trait Parking: Send + Sync + 'static {
    /// Holds these events; parking one that is already parked changes nothing.
    async fn park(&self, events: Vec<ParkedEvent>) -> Result<(), StoreError>;
    /// The parked events of these orders, each order's in log order (append time,
    /// then offset). Events are keyed by order and event id.
    async fn parked(&self, order_ids: Vec<String>) -> Result<Vec<ParkedEvent>, StoreError>;
    /// Up to `limit` parked events, the longest parked first.
    async fn parked_oldest(&self, limit: usize) -> Result<Vec<ParkedEvent>, StoreError>;
    /// Lets go of events once they were decided.
    async fn unpark(&self, events: &[ParkedEvent]) -> Result<(), StoreError>;
}

/// The dead-letter log that rejected writes land in, and its replay marks.
#[async_trait]
pub trait DeadLetters: Send + Sync + 'static {
    async fn dead_letters(&self, limit: usize, cursor: Option<String>) -> Result<Page<DeadLetter>, StoreError>;
    /// One dead letter by id, with its replay mark.
    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError>;
    /// Marks a dead letter replayed, once; `undo` clears the mark again (the replay failed).
    async fn claim_replay(&self, id: &str, undo: bool) -> Result<ReplayClaim, StoreError>;
    /// Deletes these letters for good (an operator's purge); returns the ids this call
    /// deleted. A letter purged by two calls at once is in one answer only.
    async fn purge_letters(&self, ids: &[String]) -> Result<Vec<String>, StoreError>;
    /// How many letters are held (replayed ones too: a replay marks, never deletes) and
    /// when the oldest was recorded.
    async fn tally(&self) -> Result<LetterTally, StoreError>;
}

/// The dead letters held, for the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LetterTally {
    pub held: u64,
    pub oldest: Option<DateTime<Utc>>,
}

/// What claiming a webhook deduplication key found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key is this attempt's until its lease runs out: put the event on the log,
    /// then confirm.
    Claimed,
    /// A delivery with this key is durably on the log: this one is a duplicate.
    Done,
    /// Another attempt holds the key and its lease has not run out: try again later.
    InFlight,
}

/// How long the webhook delivery audit is kept: pruned on the embedded store, a TTL on CQL.
pub const DELIVERY_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// Webhook deduplication claims and the delivery audit. A claim counts as a duplicate
/// only once it is confirmed (its event is durable); an unconfirmed claim whose lease
/// ran out (its attempt crashed or failed) is taken over by the next attempt.
#[async_trait]
pub trait WebhookLedger: Send + Sync + 'static {
    /// Claims a delivery by all its keys (its webhook id and event id), all or none:
    /// `Done` if a key is confirmed, `InFlight` if another attempt holds one, and nothing
    /// is held unless the answer is `Claimed`. Kept for `ttl` once confirmed; an
    /// unconfirmed claim older than `lease` is taken over.
    async fn claim_delivery(
        &self,
        keys: &[String],
        ttl: std::time::Duration,
        lease: std::time::Duration,
    ) -> Result<Claim, StoreError>;
    /// The claimed delivery's event is durable on the log: its keys are duplicates now.
    async fn confirm_delivery(&self, keys: &[String], ttl: std::time::Duration) -> Result<(), StoreError>;
    /// Gives unconfirmed claims back early (their event did not reach the log).
    async fn release_delivery(&self, keys: &[String]) -> Result<(), StoreError>;
    async fn record_delivery(&self, delivery: WebhookDelivery) -> Result<(), StoreError>;
    /// The delivery audit, oldest first.
    async fn deliveries(&self, limit: usize, cursor: Option<String>) -> Result<Page<WebhookDelivery>, StoreError>;
    /// Deletes delivery records received before `before` and claims whose time ran out;
    /// returns how many rows went. A backend with TTLs (CQL) expires them itself.
    async fn prune_deliveries(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// A shop's standing, if it ever changed.
    async fn shop(&self, domain: &str) -> Result<Option<ShopRecord>, StoreError>;
    async fn set_shop(&self, shop: &ShopRecord) -> Result<(), StoreError>;
}

/// Generated runs: their records, and the audit, purge and reset they act with.
#[async_trait]
pub trait Runs: Send + Sync + 'static {
    /// Counts the run's orders and their history entries.
    async fn audit(&self, run: &RunKeys) -> Result<Audit, StoreError>;
    /// Deletes the run's orders whose status is `status`, with their history.
    async fn delete_orders(&self, run: &RunKeys, status: Status) -> Result<u64, StoreError>;
    /// Empties orders, history, parked events, dead letters and runs. Webhook deduplication keys stay.
    async fn reset(&self) -> Result<(), StoreError>;
    /// Inserts the run, or replaces the record of the same id.
    async fn save_run(&self, run: &RunRecord) -> Result<(), StoreError>;
    async fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError>;
    /// Runs, newest first.
    async fn runs(&self, limit: usize, cursor: Option<String>) -> Result<Page<RunRecord>, StoreError>;
}

/// The audit of operator and admin actions.
#[async_trait]
pub trait ActionLog: Send + Sync + 'static {
    async fn record_action(&self, action: ActionRecord) -> Result<(), StoreError>;
    /// Actions, newest first.
    async fn actions(&self, limit: usize, cursor: Option<String>) -> Result<Page<ActionRecord>, StoreError>;
}

/// One decided event as the rules met it: the event as it came off the log and the row
/// it was decided against (`None` for a new order). What a what-if run feeds a candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub event: OrderEvent,
    pub current: Option<Order>,
    #[serde(skip)]
    pub recorded_at: DateTime<Utc>,
}

/// How long cases are kept, and (where the backend counts rows) how many at most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaseRetention {
    pub keep_for: std::time::Duration,
    /// The embedded store deletes the oldest beyond this; CQL has no cheap count, and
    /// relies on its TTL alone.
    pub max_cases: u64,
}

impl Default for CaseRetention {
    fn default() -> Self {
        Self { keep_for: std::time::Duration::from_secs(86_400), max_cases: 1_000_000 }
    }
}

/// Decided events kept for a while, for what-if runs of candidate rules.
#[async_trait]
pub trait Cases: Send + Sync + 'static {
    /// Keeps these cases for `keep_for`. An event id recorded again (a batch retried
    /// after an outage, a redelivery) reads back once, as first recorded.
    async fn record_cases(&self, cases: Vec<Case>, keep_for: std::time::Duration) -> Result<(), StoreError>;
    /// Up to `limit` cases recorded at or after `since`, oldest first (by minute on CQL).
    async fn cases_since(&self, since: DateTime<Utc>, limit: usize) -> Result<Vec<Case>, StoreError>;
    /// Deletes what `retention` no longer keeps; returns how many went. A backend with
    /// TTLs (CQL) expires them itself.
    async fn prune_cases(&self, retention: CaseRetention) -> Result<u64, StoreError>;
}

/// A data subject request (Shopify's compliance webhooks) as the engine tracks it: its
/// body is the engine's JSON, which the store keeps as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ComplianceRecord {
    pub id: String,
    pub received_at: DateTime<Utc>,
    pub body: String,
}

/// The copies an erasure reaches: dead letters and what-if cases of its orders, or of an
/// event of its shop, and dead letters whose payload names one of its contact details
/// (`compliance::holds_contact`).
#[derive(Debug, Clone, Default)]
pub struct ErasureMatch {
    pub order_ids: std::collections::HashSet<String>,
    pub contact: Vec<String>,
    pub shop: Option<String>,
}

impl ErasureMatch {
    /// A dead letter, by its order and its payload.
    pub fn takes(&self, order_id: Option<&str>, payload: &str) -> bool {
        order_id.is_some_and(|o| self.order_ids.contains(o))
            || crate::compliance::holds_contact(payload, &self.contact)
            || self.shop.as_deref().is_some_and(|shop| crate::compliance::is_of_shop(payload, shop))
    }

    /// A what-if case, by the event it holds.
    pub fn takes_case(&self, event: &crate::domain::OrderEvent) -> bool {
        self.order_ids.contains(&event.order_id) || (self.shop.is_some() && event.shop == self.shop)
    }

    /// A what-if case as stored (JSON with its `event`); one that cannot be read is kept.
    pub fn takes_case_body(&self, body: &str) -> bool {
        #[derive(serde::Deserialize)]
        struct Stored {
            event: crate::domain::OrderEvent,
        }
        serde_json::from_str::<Stored>(body).is_ok_and(|c| self.takes_case(&c.event))
    }
}

/// Erases the personal fields of a stored payload (`compliance::redact_payload`).
pub type Redact = for<'a> fn(&'a str) -> String;

/// Erasure of a customer's personal data where the store keeps copies of it outside
/// the order rows (those go through the engine's write path, to get a version and a
/// history entry), and the requests that ask for it.
#[async_trait]
pub trait Compliance: Send + Sync + 'static {
    /// Rewrites the payload of each dead letter `which` takes with `redact(payload)`;
    /// returns how many changed. One pass over the letters, off the writer's critical path.
    async fn redact_dead_letters(&self, which: ErasureMatch, redact: Redact) -> Result<u64, StoreError>;
    /// The same for the events parked for `order_ids`.
    async fn redact_parked(&self, order_ids: &[String], redact: Redact) -> Result<u64, StoreError>;
    /// Deletes the what-if cases of `order_ids`; returns how many went.
    async fn forget_cases(&self, which: ErasureMatch) -> Result<u64, StoreError>;
    /// Up to `limit` ids of the orders whose rows record `shop`, from where `cursor` (the
    /// last page's) left off, for a shop's erasure. Rows written before rows recorded
    /// their shop are not found.
    async fn shop_orders(&self, shop: &str, limit: usize, cursor: Option<String>) -> Result<Page<String>, StoreError>;
    /// Deletes the rows of `ids` that record `shop`, with their history; returns how
    /// many went.
    async fn delete_shop_orders(&self, shop: &str, ids: &[String]) -> Result<u64, StoreError>;
    /// Saves a request, replacing the one under its id.
    async fn save_request(&self, request: &ComplianceRecord) -> Result<(), StoreError>;
    async fn request(&self, id: &str) -> Result<Option<ComplianceRecord>, StoreError>;
    /// The newest `limit` requests, newest first.
    async fn requests(&self, limit: usize) -> Result<Vec<ComplianceRecord>, StoreError>;
}

/// A backend that implements every port. Adding one means implementing the eight
/// ports and an arm in `Engine::open`.
pub trait Backend: Orders + Parking + DeadLetters + WebhookLedger + Runs + ActionLog + Cases + Compliance {}

impl<T: Orders + Parking + DeadLetters + WebhookLedger + Runs + ActionLog + Cases + Compliance> Backend for T {}

/// The ports of one backend, each behind its own trait object, so every user holds
/// exactly the port it needs.
#[derive(Clone)]
pub struct Stores {
    pub orders: Arc<dyn Orders>,
    pub parking: Arc<dyn Parking>,
    pub dead_letters: Arc<dyn DeadLetters>,
    pub webhooks: Arc<dyn WebhookLedger>,
    pub runs: Arc<dyn Runs>,
    pub actions: Arc<dyn ActionLog>,
    pub cases: Arc<dyn Cases>,
    pub compliance: Arc<dyn Compliance>,
}

impl Stores {
    pub fn of<B: Backend>(backend: Arc<B>) -> Self {
        Self {
            orders: backend.clone(),
            parking: backend.clone(),
            dead_letters: backend.clone(),
            webhooks: backend.clone(),
            runs: backend.clone(),
            actions: backend.clone(),
            cases: backend.clone(),
            compliance: backend,
        }
    }
}
