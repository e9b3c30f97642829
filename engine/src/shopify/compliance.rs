//! Shopify's mandatory compliance webhooks: `customers/redact` erases a customer's
//! personal data, `customers/data_request` gathers it for the merchant, `shop/redact`
//! (48 h after an uninstall) deletes everything of a shop. Each delivery is
//! saved as a request and answered 200 at once; a worker does the work off the request
//! path, resumes what a restart interrupted, and tracks progress in the request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{WebhookAnswer, WebhookError};
use crate::compliance::{Erasure, Export, Subject};
use crate::engine::Engine;
use crate::store::{ActionRecord, ComplianceRecord, ShopRecord, StoreError, WebhookDelivery};
use crate::telemetry;

/// How long the worker sleeps between looks when nothing wakes it.
const IDLE: Duration = Duration::from_secs(30);
/// How many orders an export holds at most; the request says when it was cut.
const EXPORT_ORDERS_MAX: usize = 10_000;
/// How many times a request meeting store errors is tried, 30 s apart at first and
/// doubling to an hour (about 15 hours in all), before it is marked failed.
const ATTEMPTS_MAX: u32 = 20;
const RETRY_FIRST: Duration = Duration::from_secs(30);
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// After a redaction is done, its copies are erased once more this much later: events
/// already on the log when it ran may since have been dead-lettered or parked, and
/// each instance's what-if recorder may since have written cases it held.
const SETTLE: Duration = Duration::from_secs(60);
/// How long a data request's export is kept.
const EXPORT_KEPT: chrono::TimeDelta = chrono::TimeDelta::days(30);
/// Progress is saved after this many orders.
const SAVE_EVERY: usize = 100;

/// What a compliance topic asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Redact,
    DataRequest,
    ShopRedact,
}

impl Topic {
    pub fn of(topic: &str) -> Option<Self> {
        match topic {
            "customers/redact" => Some(Self::Redact),
            "customers/data_request" => Some(Self::DataRequest),
            "shop/redact" => Some(Self::ShopRedact),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Redact => "customers/redact",
            Self::DataRequest => "customers/data_request",
            Self::ShopRedact => "shop/redact",
        }
    }
}

/// The worker's wake-up call and the count of requests not yet done (for `/health`).
#[derive(Debug, Default)]
pub struct Worker {
    wake: tokio::sync::Notify,
    open: AtomicU64,
}

impl Worker {
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    fn set_open(&self, n: u64) {
        self.open.store(n, Ordering::Relaxed);
        metrics::gauge!(telemetry::COMPLIANCE_OPEN).set(n as f64);
    }
}

/// A data subject request and how far it got.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComplianceRequest {
    /// The delivery's `X-Shopify-Webhook-Id`.
    pub id: String,
    /// customers/redact, customers/data_request or shop/redact.
    pub topic: String,
    pub shop: Option<String>,
    pub customer_id: Option<String>,
    /// Shopify's id of a data request.
    pub data_request_id: Option<String>,
    /// The engine's ids of the orders the shop named (none for shop/redact, which
    /// takes every order whose row records the shop).
    pub order_ids: Vec<String>,
    /// The customer's email and phone, searched for in kept payloads; cleared once a
    /// redaction is done, so the request does not keep what it erased.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contact: Vec<String>,
    /// pending, running, done or failed.
    pub state: String,
    /// Orders done so far: of those named, or of the shop's deleted.
    pub orders_done: usize,
    pub attempts: u32,
    pub received_at: DateTime<Utc>,
    /// When a request that met an error is tried next.
    #[serde(default)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When a redaction's second pass over the copies ran ([`SETTLE`] after it was done).
    #[serde(default)]
    pub settled_at: Option<DateTime<Utc>>,
    /// Failed tries of the second pass, spaced like a request's.
    #[serde(default)]
    pub settle_attempts: u32,
    /// Why the last attempt failed, while it is retried or once it failed.
    pub error: Option<String>,
    /// What else to know: order ids left out, an export expired or erased.
    #[serde(default)]
    pub note: Option<String>,
    pub erasure: Option<Erasure>,
    /// For a data request: everything held about the customer.
    pub export: Option<Export>,
    /// The export holds the first 10,000 of more orders.
    #[serde(default)]
    pub export_cut: bool,
}

impl ComplianceRequest {
    /// A request just received, with nothing read from its payload yet.
    fn received(id: &str, topic: Topic, shop: Option<String>) -> Self {
        Self {
            id: id.to_string(),
            topic: topic.as_str().into(),
            shop,
            customer_id: None,
            data_request_id: None,
            order_ids: Vec::new(),
            contact: Vec::new(),
            state: "pending".into(),
            orders_done: 0,
            attempts: 0,
            received_at: Utc::now(),
            next_attempt_at: None,
            finished_at: None,
            settled_at: None,
            settle_attempts: 0,
            error: None,
            note: None,
            erasure: None,
            export: None,
            export_cut: false,
        }
    }

    fn is_open(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "running")
    }

    fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.is_open() && self.next_attempt_at.is_none_or(|t| t <= now)
    }

    /// A redaction done at least [`SETTLE`] ago whose second pass has not run.
    fn needs_settling(&self, now: DateTime<Utc>) -> bool {
        let settle = chrono::TimeDelta::from_std(SETTLE).unwrap_or_default();
        let erases = [Topic::Redact.as_str(), Topic::ShopRedact.as_str()].contains(&self.topic.as_str());
        erases
            && self.state == "done"
            && self.next_attempt_at.is_none_or(|t| t <= now)
            && self.settled_at.is_none()
            && self.finished_at.is_some_and(|t| t + settle <= now)
    }

    fn record(&self) -> ComplianceRecord {
        let body = serde_json::to_string(self).expect("a request serializes");
        ComplianceRecord { id: self.id.clone(), received_at: self.received_at, body }
    }

    pub fn from_record(record: &ComplianceRecord) -> Result<Self, StoreError> {
        serde_json::from_str(&record.body).map_err(|e| StoreError::Corrupt(format!("request {}: {e}", record.id)))
    }

    /// What the API shows: without the contact details it searches for.
    pub fn shown(mut self) -> Self {
        self.contact.clear();
        self
    }
}

/// The longest email or phone a request keeps (RFC 5321 caps an address at 254).
const MAX_CONTACT_CHARS: usize = 254;

/// The parts of a compliance payload the engine uses (Shopify sends ids as numbers).
#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(default)]
    shop_id: Option<Id>,
    #[serde(default)]
    shop_domain: Option<String>,
    #[serde(default)]
    customer: Option<Customer>,
    #[serde(default)]
    orders_to_redact: Option<Vec<Id>>,
    #[serde(default)]
    orders_requested: Option<Vec<Id>>,
    #[serde(default)]
    data_request: Option<DataRequest>,
}

#[derive(Debug, Deserialize)]
struct Customer {
    id: Option<Id>,
    email: Option<String>,
    phone: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DataRequest {
    id: Option<Id>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Id {
    Number(i64),
    Text(String),
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Number(n) => write!(f, "{n}"),
            Id::Text(t) => f.write_str(t),
        }
    }
}

/// Saves a signed compliance delivery as a request and wakes the worker. A delivery
/// that repeats one already saved changes nothing; one that cannot be read is answered
/// 200 and audited with the reason, since Shopify's retry would read the same.
pub async fn receive(
    engine: &Engine,
    worker: &Worker,
    topic: Topic,
    delivery_id: &str,
    shop: Option<&str>,
    body: &[u8],
    audit: &mut WebhookDelivery,
) -> Result<WebhookAnswer, WebhookError> {
    let store = engine.compliance();
    if store.request(delivery_id).await?.is_some() {
        audit.outcome = "duplicate".into();
        return Ok(WebhookAnswer { status: "duplicate", order_id: None });
    }
    let mut request = ComplianceRequest::received(delivery_id, topic, shop.map(|s| s.trim().to_ascii_lowercase()));
    match serde_json::from_slice::<Payload>(body) {
        Ok(payload) => {
            let shop_check = (topic == Topic::ShopRedact).then(|| erased_shop(&mut request, &payload));
            let orders = match topic {
                Topic::Redact => payload.orders_to_redact,
                Topic::DataRequest => payload.orders_requested,
                Topic::ShopRedact => None,
            };
            let named: Vec<String> = orders.unwrap_or_default().iter().map(|id| format!("shopify-{id}")).collect();
            let (mut valid, invalid): (Vec<String>, Vec<String>) =
                named.into_iter().partition(|id| crate::domain::check_id("order_id", id).is_ok());
            valid.sort_unstable();
            valid.dedup();
            if !invalid.is_empty() {
                request.note = Some(format!("{} order ids are not Shopify order ids and were left out", invalid.len()));
            }
            request.order_ids = valid;
            let customer = payload.customer.as_ref();
            request.contact = customer
                .into_iter()
                .flat_map(|c| [c.email.clone(), c.phone.clone()])
                .flatten()
                .map(|c| c.trim().chars().take(MAX_CONTACT_CHARS).collect::<String>())
                .filter(|c| !c.is_empty())
                .collect();
            request.customer_id = customer.and_then(|c| c.id.as_ref()).map(Id::to_string);
            request.data_request_id = payload.data_request.and_then(|d| d.id).map(|id| id.to_string());
            if let Some(Err(why)) = shop_check {
                // Never run, so it keeps nothing it read about a customer.
                request.contact.clear();
                request.customer_id = None;
                request.order_ids.clear();
                request.state = "failed".into();
                request.finished_at = Some(request.received_at);
                request.error = Some(why);
                audit.reason = request.error.clone();
            }
        }
        // Kept as a failed request, where an operator sees it: Shopify does not send
        // a delivery it got a 200 for again.
        Err(e) => {
            request.state = "failed".into();
            request.finished_at = Some(request.received_at);
            request.error = Some(format!("a {} payload that cannot be read: {e}", topic.as_str()));
            audit.reason = request.error.clone();
        }
    }
    store.save_request(&request.record()).await?;
    // The audit trail an operator reads in `GET /audit`: who asked for what, and when.
    let action = ActionRecord {
        at: request.received_at,
        token: "shopify".into(),
        role: "webhook".into(),
        action: request.topic.clone(),
        target: format!("/shopify/compliance/{}", request.id),
        status: 200,
        outcome: format!("{} orders named; shop {}", request.order_ids.len(), shop.unwrap_or("unknown")),
    };
    if let Err(e) = engine.action_log().record_action(action).await {
        tracing::warn!(error = %e, request = %request.id, "could not audit a compliance request");
    }
    let outcome = if request.state == "failed" { "failed" } else { "received" };
    metrics::counter!(telemetry::COMPLIANCE_REQUESTS, "topic" => topic.as_str(), "outcome" => outcome).increment(1);
    worker.wake.notify_one();
    audit.outcome = if outcome == "failed" { "rejected".into() } else { "received".into() };
    Ok(WebhookAnswer { status: if outcome == "failed" { "rejected" } else { "accepted" }, order_id: None })
}

/// Settles which shop a `shop/redact` erases: the payload's `shop_domain`, which must
/// be the shop whose secret signed it (its `X-Shopify-Shop-Domain`) when the delivery
/// names one. The signature covers the body only, not the topic header, so the body
/// must be a shop/redact's (a `shop_id` and `shop_domain`, and nothing about a
/// customer): another signed body sent again under this topic erases nothing.
fn erased_shop(request: &mut ComplianceRequest, payload: &Payload) -> Result<(), String> {
    let about_a_customer = payload.customer.is_some()
        || payload.orders_to_redact.is_some()
        || payload.orders_requested.is_some()
        || payload.data_request.is_some();
    if payload.shop_id.is_none() || about_a_customer {
        return Err("not a shop/redact payload (it needs shop_id and shop_domain, and no customer); \
                    nothing was erased"
            .into());
    }
    let named = payload.shop_domain.as_deref().map(|s| s.trim().to_ascii_lowercase()).unwrap_or_default();
    if crate::domain::check_shop(&named).is_err() {
        return Err(format!("shop/redact names {named:?} in shop_domain, which is not a shop domain"));
    }
    match request.shop.as_deref() {
        Some(from) if from != named => {
            Err(format!("shop/redact from {from} names another shop ({named}); nothing was erased"))
        }
        _ => {
            request.shop = Some(named);
            Ok(())
        }
    }
}

/// Runs the due requests, oldest first, whenever woken and every [`IDLE`]; settles
/// redactions; drops expired exports. Requests are idempotent, and a request another
/// instance finished is not run again, so instances sharing a store only repeat work.
pub fn spawn_worker(engine: Arc<Engine>, worker: Arc<Worker>) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = look(&engine, &worker).await {
                tracing::warn!(error = %e, "could not read the compliance requests; looking again soon");
            }
            let _ = tokio::time::timeout(IDLE, worker.wake.notified()).await;
        }
    });
}

async fn look(engine: &Engine, worker: &Worker) -> Result<(), StoreError> {
    let now = Utc::now();
    let mut requests = Vec::new();
    for record in engine.compliance().requests(10_000).await? {
        match ComplianceRequest::from_record(&record) {
            Ok(r) => requests.push(r),
            // One unreadable record must not stop the others.
            Err(e) => tracing::warn!(error = %e, "a compliance request cannot be read; skipped"),
        }
    }
    requests.reverse();
    worker.set_open(requests.iter().filter(|r| r.is_open()).count() as u64);
    for mut request in requests {
        if request.is_due(now) {
            run(engine, request).await;
            worker.set_open(worker.open().saturating_sub(1));
        } else if request.needs_settling(now) {
            settle(engine, request).await;
        } else if request.export.is_some() && request.finished_at.is_some_and(|t| t + EXPORT_KEPT <= now) {
            request.export = None;
            request.note = Some("the export expired 30 days after it was made".into());
            engine.compliance().save_request(&request.record()).await?;
        }
    }
    Ok(())
}

/// The second pass over a redaction's copies (see [`SETTLE`]); for a shop, over its
/// orders again (rows its events on the log wrote since).
async fn settle(engine: &Engine, mut request: ComplianceRequest) {
    // The contact details are gone by now: letters are found by their orders.
    let subject = Subject { order_ids: request.order_ids.clone(), needles: Vec::new(), shop: request.shop.clone() };
    let settled = match (Topic::of(&request.topic), request.shop.as_deref()) {
        // Adds to the request's erasure as it goes.
        (Some(Topic::ShopRedact), Some(shop)) => erase_shop(engine, &request, shop).await,
        _ => engine.erase_copies(&subject).await.map(|more| {
            let mut total = request.erasure.clone().unwrap_or_default();
            total.dead_letters += more.dead_letters;
            total.parked += more.parked;
            total.cases += more.cases;
            total
        }),
    };
    match settled {
        Ok(total) => {
            if request.topic == Topic::ShopRedact.as_str() {
                request.orders_done = total.orders_deleted as usize;
            }
            request.erasure = Some(total);
            request.settled_at = Some(Utc::now());
            request.next_attempt_at = None;
        }
        Err(e) if request.settle_attempts + 1 >= ATTEMPTS_MAX => {
            tracing::error!(error = %e, request = %request.id, "the second pass of a redaction failed for good");
            request.settled_at = Some(Utc::now());
            request.note = Some(format!("the second pass failed {ATTEMPTS_MAX} times, the last with: {e}"));
        }
        Err(e) => {
            request.settle_attempts += 1;
            let wait = RETRY_FIRST.saturating_mul(1 << request.settle_attempts.min(8)).min(RETRY_MAX);
            request.next_attempt_at = Some(Utc::now() + chrono::TimeDelta::from_std(wait).unwrap_or_default());
            tracing::warn!(error = %e, request = %request.id, retry_in_s = wait.as_secs(),
                "settling a redaction failed; it is tried again");
        }
    }
    if let Err(e) = engine.compliance().save_request(&request.record()).await {
        tracing::warn!(error = %e, request = %request.id, "could not save a redaction's second pass");
    }
}

/// One attempt at a request, saving progress as it goes: done, or after an error open
/// again for a later look (spaced from [`RETRY_FIRST`] to [`RETRY_MAX`]), or failed
/// after [`ATTEMPTS_MAX`] tries.
async fn run(engine: &Engine, mut request: ComplianceRequest) {
    let topic = Topic::of(&request.topic).unwrap_or(Topic::Redact);
    let store = engine.compliance();
    // Another instance may have finished it since this one read it.
    match store.request(&request.id).await.map(|r| r.map(|r| ComplianceRequest::from_record(&r))) {
        Ok(Some(Ok(now))) if !now.is_open() => return,
        Ok(_) => {}
        Err(e) => return tracing::warn!(error = %e, request = %request.id, "could not start a compliance request"),
    }
    request.state = "running".into();
    request.attempts += 1;
    if let Err(e) = store.save_request(&request.record()).await {
        return tracing::warn!(error = %e, request = %request.id, "could not start a compliance request");
    }
    let subject =
        Subject { order_ids: request.order_ids.clone(), needles: request.contact.clone(), shop: request.shop.clone() };
    let outcome = match topic {
        Topic::Redact => match erase_saving_progress(engine, &request, &subject).await {
            Ok(erased) => forget_exports(engine, &request).await.map(|()| {
                request.orders_done = request.order_ids.len();
                request.erasure = Some(erased);
            }),
            Err(e) => Err(e),
        },
        Topic::ShopRedact => match request.shop.clone() {
            // Inactive first: its deliveries are refused while the erasure runs.
            Some(shop) => match stop_shop(engine, &shop).await {
                Ok(()) => match erase_shop(engine, &request, &shop).await {
                    Ok(erased) => forget_exports(engine, &request).await.map(|()| {
                        request.orders_done = erased.orders_deleted as usize;
                        request.erasure = Some(erased);
                    }),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            // Refused at receipt; a stored request without one is corrupt.
            None => Err(StoreError::Corrupt(format!("shop/redact {} names no shop", request.id))),
        },
        Topic::DataRequest => {
            let cut = subject.order_ids.len() > EXPORT_ORDERS_MAX;
            let kept = subject.order_ids.len().min(EXPORT_ORDERS_MAX);
            let subject = Subject { order_ids: subject.order_ids[..kept].to_vec(), ..subject };
            engine.export(&subject).await.map(|export| {
                request.orders_done = subject.order_ids.len();
                request.export = Some(export);
                request.export_cut = cut;
            })
        }
    };
    let outcome_label = match outcome {
        Ok(()) => {
            request.state = "done".into();
            request.error = None;
            request.next_attempt_at = None;
            "done"
        }
        Err(e) => {
            request.error = Some(e.to_string());
            if request.attempts >= ATTEMPTS_MAX {
                request.state = "failed".into();
                tracing::error!(error = %e, request = %request.id, "a compliance request failed for good");
                "failed"
            } else {
                request.state = "pending".into();
                let wait = RETRY_FIRST.saturating_mul(1 << request.attempts.min(8)).min(RETRY_MAX);
                request.next_attempt_at = Some(Utc::now() + chrono::TimeDelta::from_std(wait).unwrap_or_default());
                tracing::warn!(error = %e, request = %request.id, retry_in_s = wait.as_secs(),
                    "a compliance request met an error; it is tried again");
                "retried"
            }
        }
    };
    if request.state != "pending" {
        // Needed only while the request runs: a finished one keeps no contact details.
        request.contact.clear();
        request.finished_at = Some(Utc::now());
    }
    metrics::counter!(telemetry::COMPLIANCE_REQUESTS, "topic" => topic.as_str(), "outcome" => outcome_label)
        .increment(1);
    if let Err(e) = store.save_request(&request.record()).await {
        tracing::warn!(error = %e, request = %request.id, "could not save a compliance request's outcome");
    }
}

/// The erasure, saving `orders_done` every [`SAVE_EVERY`] orders so that the request
/// shows its progress while it runs.
async fn erase_saving_progress(
    engine: &Engine,
    request: &ComplianceRequest,
    subject: &Subject,
) -> Result<Erasure, StoreError> {
    let mut report = Erasure::default();
    let mut done = 0;
    for chunk in subject.order_ids.chunks(SAVE_EVERY) {
        let part = Subject { order_ids: chunk.to_vec(), ..subject.clone() };
        let erased = engine.erase_rows(&request.id, &part).await?;
        report.orders_redacted += erased.orders_redacted;
        report.orders_untouched += erased.orders_untouched;
        done += chunk.len();
        let saved = ComplianceRequest { orders_done: done, ..request.clone() };
        engine.compliance().save_request(&saved.record()).await?;
    }
    let copies = engine.erase_copies(subject).await?;
    Ok(Erasure { dead_letters: copies.dead_letters, parked: copies.parked, cases: copies.cases, ..report })
}

/// Every chunk of a shop's orders, added to what the request's erasure holds (an
/// earlier attempt's progress, or the first pass when settling) and saved with
/// `orders_done` (the rows deleted so far) after each chunk, so the request shows its
/// progress.
async fn erase_shop(engine: &Engine, request: &ComplianceRequest, shop: &str) -> Result<Erasure, StoreError> {
    let mut report = request.erasure.clone().unwrap_or_default();
    let mut cursor = None;
    loop {
        let (erased, next) = engine.erase_shop_chunk(shop, cursor).await?;
        report.orders_deleted += erased.orders_deleted;
        report.dead_letters += erased.dead_letters;
        report.parked += erased.parked;
        report.cases += erased.cases;
        let (orders_done, erasure) = (report.orders_deleted as usize, Some(report.clone()));
        let saved = ComplianceRequest { orders_done, erasure, ..request.clone() };
        engine.compliance().save_request(&saved.record()).await?;
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    // Letters and cases of the shop's orders that never got a row: no page names them.
    let strays = engine.erase_shop_strays(shop).await?;
    report.dead_letters += strays.dead_letters;
    report.cases += strays.cases;
    Ok(report)
}

/// A shop erased is inactive: its later deliveries are refused until an operator
/// activates it again (after a reinstall).
async fn stop_shop(engine: &Engine, shop: &str) -> Result<(), StoreError> {
    let record =
        ShopRecord { domain: shop.into(), active: false, reason: "shop/redact".into(), changed_at: Utc::now() };
    engine.webhooks().set_shop(&record).await
}

/// Drops the exports of earlier data requests about the same customer (the same
/// customer id, or an order in common), or of the shop a `shop/redact` erased: once
/// erased, the data is not kept there either.
async fn forget_exports(engine: &Engine, redaction: &ComplianceRequest) -> Result<(), StoreError> {
    let whole_shop = redaction.topic == Topic::ShopRedact.as_str();
    for record in engine.compliance().requests(10_000).await? {
        let mut earlier = ComplianceRequest::from_record(&record)?;
        let same_customer = earlier.customer_id.is_some() && earlier.customer_id == redaction.customer_id;
        let shared_order = earlier.order_ids.iter().any(|o| redaction.order_ids.contains(o));
        let same_shop = earlier.shop.is_none() || redaction.shop.is_none() || earlier.shop == redaction.shop;
        let of_shop = whole_shop && earlier.shop.is_some() && earlier.shop == redaction.shop;
        if earlier.export.is_some() && (of_shop || same_shop && (same_customer || shared_order)) {
            earlier.export = None;
            earlier.contact.clear();
            earlier.note = Some(format!("the export was erased by {} {}", redaction.topic, redaction.id));
            engine.compliance().save_request(&earlier.record()).await?;
        }
    }
    Ok(())
}

/// Why a request cannot be tried again.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("no compliance request {0}")]
    NotFound(String),
    #[error("compliance request {0} is {1}: only a failed request is tried again")]
    NotFailed(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sends a failed request round again (`POST /shopify/compliance/{id}/retry`), from
/// its first order, with a fresh count of tries.
pub async fn retry(engine: &Engine, worker: &Worker, id: &str) -> Result<ComplianceRequest, RetryError> {
    let record = engine.compliance().request(id).await?.ok_or_else(|| RetryError::NotFound(id.into()))?;
    let mut request = ComplianceRequest::from_record(&record)?;
    if request.state != "failed" {
        return Err(RetryError::NotFailed(id.into(), request.state));
    }
    if request.order_ids.is_empty() && request.error.as_deref().is_some_and(|e| e.contains("cannot be read")) {
        return Err(RetryError::NotFailed(id.into(), "failed for good: its payload cannot be read".into()));
    }
    request.state = "pending".into();
    request.attempts = 0;
    request.next_attempt_at = None;
    request.finished_at = None;
    engine.compliance().save_request(&request.record()).await?;
    worker.wake.notify_one();
    Ok(request.shown())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(topic: Topic, state: &str) -> ComplianceRequest {
        let order_ids = vec!["shopify-1".into()];
        ComplianceRequest { state: state.into(), order_ids, ..ComplianceRequest::received("r", topic, None) }
    }

    #[test]
    fn a_request_waits_out_its_retry_and_a_redaction_settles_once_a_minute_later() {
        let now = Utc::now();
        let mut r = request(Topic::Redact, "pending");
        assert!(r.is_due(now));
        r.next_attempt_at = Some(now + chrono::TimeDelta::seconds(30));
        assert!(!r.is_due(now), "a request that met an error waits for its next attempt");
        assert!(r.is_due(now + chrono::TimeDelta::seconds(30)));

        let mut done = request(Topic::Redact, "done");
        done.finished_at = Some(now);
        assert!(!done.is_due(now) && !done.needs_settling(now + chrono::TimeDelta::seconds(59)));
        assert!(done.needs_settling(now + chrono::TimeDelta::seconds(60)));
        done.settled_at = Some(now);
        assert!(!done.needs_settling(now + chrono::TimeDelta::hours(1)), "settled once");
        let mut export = request(Topic::DataRequest, "done");
        export.finished_at = Some(now);
        assert!(!export.needs_settling(now + chrono::TimeDelta::hours(1)), "only redactions settle");
    }
}
