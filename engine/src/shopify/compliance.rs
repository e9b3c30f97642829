//! Shopify's mandatory compliance webhooks: `customers/redact` erases a customer's
//! personal data, `customers/data_request` gathers it for the merchant. Each delivery is
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
use crate::store::{ActionRecord, ComplianceRecord, StoreError, WebhookDelivery};
use crate::telemetry;

/// How long the worker sleeps between looks when nothing wakes it.
const IDLE: Duration = Duration::from_secs(30);
/// How many orders an export holds at most; the request says when it was cut.
const EXPORT_ORDERS_MAX: usize = 10_000;
/// How often a failed request is tried again in all, with the worker's next looks.
const ATTEMPTS_MAX: u32 = 5;
/// Progress is saved after this many orders.
const SAVE_EVERY: usize = 100;

/// What a compliance topic asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Redact,
    DataRequest,
}

impl Topic {
    pub fn of(topic: &str) -> Option<Self> {
        match topic {
            "customers/redact" => Some(Self::Redact),
            "customers/data_request" => Some(Self::DataRequest),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Redact => "customers/redact",
            Self::DataRequest => "customers/data_request",
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
    /// customers/redact or customers/data_request.
    pub topic: String,
    pub shop: Option<String>,
    pub customer_id: Option<String>,
    /// Shopify's id of a data request.
    pub data_request_id: Option<String>,
    /// The engine's ids of the orders the shop named.
    pub order_ids: Vec<String>,
    /// The customer's email and phone, searched for in kept payloads; cleared once a
    /// redaction is done, so the request does not keep what it erased.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contact: Vec<String>,
    /// pending, running, done or failed.
    pub state: String,
    pub orders_done: usize,
    pub attempts: u32,
    pub received_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub erasure: Option<Erasure>,
    /// For a data request: everything held about the customer.
    pub export: Option<Export>,
    /// The export holds the first 10,000 of more orders.
    #[serde(default)]
    pub export_cut: bool,
}

impl ComplianceRequest {
    fn is_open(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "running")
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

/// The parts of a compliance payload the engine uses (Shopify sends ids as numbers).
#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(default)]
    customer: Option<Customer>,
    #[serde(default)]
    orders_to_redact: Vec<Id>,
    #[serde(default)]
    orders_requested: Vec<Id>,
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
    let payload: Payload = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => {
            audit.outcome = "rejected".into();
            audit.reason = Some(format!("a {} payload that cannot be read: {e}", topic.as_str()));
            return Ok(WebhookAnswer { status: "rejected", order_id: None });
        }
    };
    let store = engine.compliance();
    if store.request(delivery_id).await?.is_some() {
        audit.outcome = "duplicate".into();
        return Ok(WebhookAnswer { status: "duplicate", order_id: None });
    }
    let orders = match topic {
        Topic::Redact => &payload.orders_to_redact,
        Topic::DataRequest => &payload.orders_requested,
    };
    let mut order_ids: Vec<String> = orders.iter().map(|id| format!("shopify-{id}")).collect();
    order_ids.sort_unstable();
    order_ids.dedup();
    let customer = payload.customer.as_ref();
    let contact = customer
        .into_iter()
        .flat_map(|c| [c.email.clone(), c.phone.clone()])
        .flatten()
        .map(|c| c.trim().to_string())
        .filter(|c| c.len() >= 3)
        .collect();
    let request = ComplianceRequest {
        id: delivery_id.to_string(),
        topic: topic.as_str().into(),
        shop: shop.map(str::to_string),
        customer_id: customer.and_then(|c| c.id.as_ref()).map(Id::to_string),
        data_request_id: payload.data_request.and_then(|d| d.id).map(|id| id.to_string()),
        order_ids,
        contact,
        state: "pending".into(),
        orders_done: 0,
        attempts: 0,
        received_at: Utc::now(),
        finished_at: None,
        error: None,
        erasure: None,
        export: None,
        export_cut: false,
    };
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
    metrics::counter!(telemetry::COMPLIANCE_REQUESTS, "topic" => topic.as_str(), "outcome" => "received").increment(1);
    worker.set_open(worker.open() + 1);
    worker.wake.notify_one();
    audit.outcome = "received".into();
    Ok(WebhookAnswer { status: "accepted", order_id: None })
}

/// Runs the open requests, oldest first, whenever woken and every [`IDLE`]. Requests
/// are idempotent, so two instances that both take one only repeat each other.
pub fn spawn_worker(engine: Arc<Engine>, worker: Arc<Worker>) {
    tokio::spawn(async move {
        loop {
            match open_requests(&engine).await {
                Ok(open) => {
                    let mut left = open.len() as u64;
                    worker.set_open(left);
                    for request in open {
                        run(&engine, request).await;
                        left -= 1;
                        worker.set_open(left);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read the open compliance requests"),
            }
            let _ = tokio::time::timeout(IDLE, worker.wake.notified()).await;
        }
    });
}

async fn open_requests(engine: &Engine) -> Result<Vec<ComplianceRequest>, StoreError> {
    let mut open = Vec::new();
    for record in engine.compliance().requests(10_000).await? {
        let request = ComplianceRequest::from_record(&record)?;
        if request.is_open() {
            open.push(request);
        }
    }
    open.reverse();
    Ok(open)
}

/// One request to its end (done or failed), saving progress as it goes. A store error
/// leaves it open for the next look, up to [`ATTEMPTS_MAX`] tries.
async fn run(engine: &Engine, mut request: ComplianceRequest) {
    let topic = Topic::of(&request.topic).unwrap_or(Topic::Redact);
    request.state = "running".into();
    request.attempts += 1;
    let store = engine.compliance();
    if let Err(e) = store.save_request(&request.record()).await {
        return tracing::warn!(error = %e, request = %request.id, "could not start a compliance request");
    }
    let subject = Subject { order_ids: request.order_ids.clone(), needles: request.contact.clone() };
    let outcome = match topic {
        Topic::Redact => match erase_saving_progress(engine, &request, &subject).await {
            Ok(erased) => forget_exports(engine, &request).await.map(|()| {
                request.orders_done = request.order_ids.len();
                request.erasure = Some(erased);
            }),
            Err(e) => Err(e),
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
                tracing::warn!(error = %e, request = %request.id, "a compliance request failed; it is tried again");
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
        let part = Subject { order_ids: chunk.to_vec(), needles: Vec::new() };
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

/// Drops the exports of earlier data requests about the same customer (the same
/// customer id, or an order in common): once erased, the data is not kept there either.
async fn forget_exports(engine: &Engine, redaction: &ComplianceRequest) -> Result<(), StoreError> {
    for record in engine.compliance().requests(10_000).await? {
        let mut earlier = ComplianceRequest::from_record(&record)?;
        let same_customer = earlier.customer_id.is_some() && earlier.customer_id == redaction.customer_id;
        let shared_order = earlier.order_ids.iter().any(|o| redaction.order_ids.contains(o));
        if earlier.export.is_some() && (same_customer || shared_order) {
            earlier.export = None;
            earlier.contact.clear();
            earlier.error = Some(format!("the export was erased by customers/redact {}", redaction.id));
            engine.compliance().save_request(&earlier.record()).await?;
        }
    }
    Ok(())
}
