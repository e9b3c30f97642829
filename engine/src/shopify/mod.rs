//! The Shopify bridge: signed order webhooks in, order events on the log out, with
//! durable deduplication and an audit record per delivery.

pub mod admin;
pub mod compliance;
pub mod payload;
pub mod reconcile;
pub mod send;
pub mod signature;

use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::OrderEvent;
use crate::engine::{Engine, IngestError};
use crate::failure::{Failure, FailureKind, Stage};
use crate::store::{Claim, ShopRecord, StoreError, WebhookDelivery};
use payload::TopicAction;
use signature::Secrets;

/// The bridge's settings.
#[derive(Debug, Clone)]
pub struct ShopifyConfig {
    /// The app's secret, for shops without one of their own; `None` when every shop
    /// has its own.
    pub secrets: Option<Secrets>,
    /// Per shop (by domain, lower case), for agencies running one custom app per shop.
    pub shop_secrets: std::sync::Arc<std::collections::HashMap<String, Secrets>>,
    /// How long a delivery id is remembered for deduplication.
    pub dedup_ttl: Duration,
    /// Largest accepted webhook body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Deliveries per second each shop may send; `None` (the default) is unlimited.
    pub rate_limit: Option<std::sync::Arc<RateLimit>>,
    /// The `shop` label values of the per-shop webhook metric.
    pub shop_labels: std::sync::Arc<ShopLabels>,
    /// How to read the Admin API, for reconciliation; `None` without an access token.
    pub admin: Option<AdminSettings>,
    /// Runs the compliance requests (`serve` starts it).
    pub compliance: std::sync::Arc<compliance::Worker>,
}

impl ShopifyConfig {
    /// The secrets a delivery from `shop` must be signed with: its own, else the app's.
    pub fn secrets_for(&self, shop: Option<&str>) -> Option<&Secrets> {
        let own = shop.and_then(|s| self.shop_secrets.get(&s.trim().to_ascii_lowercase()));
        own.or(self.secrets.as_ref())
    }
}

/// Where the Admin API is and the access token that reads it.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// The API's base URL, with `{shop}` where the shop's domain goes.
    pub url: String,
    pub token: crate::secret::Secret,
    /// Reconcile `shop` every `every` in `serve` (the periodic mode), if set.
    pub periodic: Option<(String, Duration)>,
}

/// Shopify waits about 5 s for an answer: a log that takes longer gets a 503 (and a retry).
pub const APPEND_BUDGET: Duration = Duration::from_secs(4);
/// How long an unconfirmed dedup claim holds off other attempts: past it, the attempt
/// that took it is taken to have died (its append was bounded by `APPEND_BUDGET`).
pub const CLAIM_LEASE: Duration = Duration::from_secs(10);

/// A token bucket per shop: `per_second` refill, a burst of as many.
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl RateLimit {
    pub fn new(per_second: u32) -> Self {
        Self { per_second: per_second.max(1) as f64, buckets: Default::default() }
    }

    /// `Ok` to go ahead, or `Err(seconds)` until the shop may send again.
    pub fn check(&self, shop: &str) -> Result<(), u64> {
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(shop.to_string()).or_insert((self.per_second, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.per_second);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }
}

/// The `shop` label of the per-shop webhook metric: each of the first `limit` shops
/// that signed a delivery gets its own; the rest share "other", so the series stay
/// bounded however many shops send.
#[derive(Debug)]
pub struct ShopLabels {
    limit: usize,
    labelled: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl ShopLabels {
    /// For deliveries not shown to come from a shop: unsigned, badly signed, or from a
    /// shop with no secret. Their shop header is the sender's word only.
    pub const UNVERIFIED: &str = "unverified";
    /// For shops past the limit.
    pub const OTHER: &str = "other";
    /// For signed deliveries without a shop header.
    pub const NONE: &str = "none";

    pub fn new(limit: usize) -> Self {
        Self { limit, labelled: Default::default() }
    }

    /// The label for a delivery signed for `shop`.
    pub fn of(&self, shop: Option<&str>) -> String {
        // A domain is at most 255 characters; a longer header is cut like the audit's.
        let shop = shop.map(|s| s.trim().to_ascii_lowercase().chars().take(255).collect::<String>());
        let Some(shop) = shop.filter(|s| !s.is_empty()) else {
            return Self::NONE.into();
        };
        let mut labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        if labelled.contains(&shop) {
            return shop;
        }
        if labelled.len() < self.limit {
            labelled.insert(shop.clone());
            return shop;
        }
        Self::OTHER.into()
    }
}

/// Why a delivery was not accepted. Each kind maps to one HTTP status in `api/webhooks`;
/// Shopify retries everything but a 2xx.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("X-Shopify-Hmac-Sha256 is missing")]
    Unsigned,
    #[error("no secret is configured for this shop (X-Shopify-Shop-Domain)")]
    UnknownShop,
    #[error("X-Shopify-Hmac-Sha256 does not sign this body")]
    BadSignature,
    #[error("too many deliveries from this shop; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("X-Shopify-Topic is missing")]
    NoTopic,
    #[error("X-Shopify-Webhook-Id is missing")]
    NoDeliveryId,
    /// Another attempt at the same delivery is putting it on the log right now.
    #[error("this delivery is being accepted by another attempt; retry in {retry_after_s} s")]
    InFlight { retry_after_s: u64 },
    /// The log refused the event or did not acknowledge it within [`APPEND_BUDGET`].
    #[error("the order log is unavailable: {0}")]
    LogUnavailable(#[source] LogFailure),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why the log did not take a delivery's event.
#[derive(Debug, thiserror::Error)]
pub enum LogFailure {
    #[error(transparent)]
    Refused(#[from] IngestError),
    #[error("no acknowledgement from the log within {0:?}")]
    NoAckWithin(Duration),
}

/// The headers Shopify sends with a delivery, trimmed; empty ones count as absent.
#[derive(Debug, Clone, Default)]
pub struct DeliveryHeaders {
    pub hmac: Option<String>,
    pub webhook_id: Option<String>,
    pub event_id: Option<String>,
    pub topic: Option<String>,
    pub shop: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAnswer {
    /// accepted, duplicate, ignored, or rejected (dead-lettered: the delivery is signed
    /// but a field is invalid; `GET /dead-letters` says which).
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
}

/// A delivery's answer, and the claims [`settle`] confirms: those of an event now durable.
pub struct Accepted {
    pub answer: WebhookAnswer,
    claimed: Vec<String>,
}

impl From<WebhookAnswer> for Accepted {
    fn from(answer: WebhookAnswer) -> Self {
        Accepted { answer, claimed: Vec::new() }
    }
}

/// Ends a delivery before its answer: confirms the claims of an accepted one beside its
/// audit record (if it is audited), so that on the embedded store both share one group
/// commit. The event is durable, so the answer is 200 either way: an unconfirmed claim
/// only lets a retry append it again after the lease, which the event ledger absorbs.
pub async fn settle(
    engine: &Engine,
    config: &ShopifyConfig,
    accepted: Option<&Accepted>,
    audit: Option<WebhookDelivery>,
) {
    let confirm = async {
        let Some(keys) = accepted.map(|a| &a.claimed).filter(|keys| !keys.is_empty()) else { return };
        if let Err(e) = engine.webhooks().confirm_delivery(keys, config.dedup_ttl).await {
            tracing::warn!(error = %e, ?keys, "confirming webhook claims failed; a retry may append it again");
        }
    };
    let record = async {
        let Some(audit) = audit else { return };
        if let Err(e) = engine.webhooks().record_delivery(audit).await {
            tracing::warn!(error = %e, "could not record a webhook delivery in the audit");
        }
    };
    tokio::join!(confirm, record);
}

/// Takes one signed delivery: verifies it, claims its ids for deduplication, and puts its
/// event durably on the log. `audit` is filled in as far as the delivery got; [`settle`]
/// confirms the claims and records it.
pub async fn accept(
    engine: &Engine,
    config: &ShopifyConfig,
    headers: &DeliveryHeaders,
    body: &[u8],
    audit: &mut WebhookDelivery,
) -> Result<Accepted, WebhookError> {
    let signature = headers.hmac.as_deref().ok_or(WebhookError::Unsigned)?;
    let secrets = config.secrets_for(headers.shop.as_deref()).ok_or(WebhookError::UnknownShop)?;
    if !signature::verify(secrets, body, signature) {
        return Err(WebhookError::BadSignature);
    }
    if let Some(limit) = &config.rate_limit
        && let Err(retry_after_s) = limit.check(headers.shop.as_deref().unwrap_or("unknown"))
    {
        return Err(WebhookError::RateLimited { retry_after_s });
    }
    let topic = headers.topic.as_deref().ok_or(WebhookError::NoTopic)?;
    // Before the shop's standing: a shop that uninstalled the app still has its
    // customers' requests honoured.
    if let Some(compliance) = compliance::Topic::of(topic) {
        let id = headers.webhook_id.as_deref().or(headers.event_id.as_deref()).ok_or(WebhookError::NoDeliveryId)?;
        let shop = headers.shop.as_deref();
        return compliance::receive(engine, &config.compliance, compliance, id, shop, body, audit)
            .await
            .map(Into::into);
    }
    if let Some(answer) = shop_standing(engine, headers, topic, audit).await? {
        return Ok(answer.into());
    }
    let kind = match payload::topic_action(topic) {
        TopicAction::Event(kind) => kind,
        TopicAction::Ignored => {
            audit.outcome = "ignored".into();
            return Ok(WebhookAnswer { status: "ignored", order_id: None }.into());
        }
    };
    let delivery_id = headers.webhook_id.clone().or(headers.event_id.clone()).ok_or(WebhookError::NoDeliveryId)?;
    // A signed delivery that can never become a valid event is answered 200 and
    // dead-lettered with the reason: a retry would fail the same way, and Shopify
    // removes subscriptions that keep failing.
    let event = match payload::to_event(kind, body, &delivery_id) {
        Ok(event) => OrderEvent { shop: headers.shop.as_deref().map(|s| s.trim().to_ascii_lowercase()), ..event },
        Err(reason) => {
            let reason = format!("payload: {reason}");
            return reject(engine, audit, &delivery_id, None, body, reason).await.map(Into::into);
        }
    };
    audit.order_id = Some(event.order_id.clone());
    if let Err(reason) = event.validate() {
        let order = Some(event.order_id.as_str());
        return reject(engine, audit, &delivery_id, order, body, reason).await.map(Into::into);
    }

    // Claim every id the delivery carries; a claim already held means a duplicate.
    let keys: Vec<String> = [
        headers.webhook_id.as_ref().map(|w| format!("webhook:{w}")),
        headers.event_id.as_ref().map(|e| format!("event:{e}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    // A claim counts as a duplicate only once its event is durable (confirmed after);
    // a claim left unconfirmed by a failed or crashed attempt is taken over after its lease.
    match claim(engine, config, &keys).await? {
        Claim::Claimed => {}
        Claim::Done => {
            audit.outcome = "duplicate".into();
            return Ok(WebhookAnswer { status: "duplicate", order_id: Some(event.order_id) }.into());
        }
        Claim::InFlight => return Err(WebhookError::InFlight { retry_after_s: CLAIM_LEASE.as_secs() }),
    }
    // Durable on the log before the 200; otherwise the claims are given back (or, if that
    // fails, run out their lease), so Shopify's retry passes.
    let appended = match tokio::time::timeout(APPEND_BUDGET, engine.ingest(std::slice::from_ref(&event))).await {
        Ok(Ok(_)) => Ok(()),
        // Refused for what it holds (an event id another order took): no outage, and a
        // retry would be refused the same way.
        Ok(Err(IngestError::Invalid { reason, .. })) => {
            release(engine, &keys).await;
            // The letter's id names the order too: the event id alone is the other order's.
            let letter_id = format!("{delivery_id}@{}", event.order_id);
            let order = Some(event.order_id.as_str());
            return reject(engine, audit, &letter_id, order, body, reason).await.map(Into::into);
        }
        Ok(Err(e)) => Err(LogFailure::Refused(e)),
        // The record may still land later; the retry then is a duplicate the store absorbs.
        Err(_) => Err(LogFailure::NoAckWithin(APPEND_BUDGET)),
    };
    if let Err(failure) = appended {
        release(engine, &keys).await;
        return Err(WebhookError::LogUnavailable(failure));
    }
    audit.outcome = "received".into();
    Ok(Accepted { answer: WebhookAnswer { status: "accepted", order_id: Some(event.order_id) }, claimed: keys })
}

/// An `app/uninstalled` delivery marks its shop inactive; a delivery from an inactive
/// shop is refused (200, so that Shopify does not retry it, and audited). `None` lets
/// the delivery go on.
async fn shop_standing(
    engine: &Engine,
    headers: &DeliveryHeaders,
    topic: &str,
    audit: &mut WebhookDelivery,
) -> Result<Option<WebhookAnswer>, WebhookError> {
    let Some(shop) = headers.shop.as_deref().map(|s| s.trim().to_ascii_lowercase()) else { return Ok(None) };
    if topic == "app/uninstalled" {
        let record = ShopRecord {
            domain: shop,
            active: false,
            reason: "app/uninstalled".into(),
            changed_at: chrono::Utc::now(),
        };
        engine.webhooks().set_shop(&record).await?;
        audit.outcome = "uninstalled".into();
        return Ok(Some(WebhookAnswer { status: "uninstalled", order_id: None }));
    }
    match engine.webhooks().shop(&shop).await? {
        Some(record) if !record.active => {
            audit.outcome = "shop_inactive".into();
            audit.reason = Some(format!(
                "the shop uninstalled the app at {}; POST /shopify/shops/{shop}/activate after a reinstall",
                record.changed_at.to_rfc3339()
            ));
            Ok(Some(WebhookAnswer { status: "refused", order_id: None }))
        }
        _ => Ok(None),
    }
}

/// The longest delivery id a dead letter keeps (Shopify's are uuids).
const MAX_LETTER_ID: usize = 100;
/// The most of a rejected body a dead letter keeps.
const MAX_LETTER_PAYLOAD: usize = 64 << 10;

/// Dead-letters a signed delivery whose content is invalid, and answers it 200
/// ("rejected"). Only a store that cannot take the letter makes it a 503.
async fn reject(
    engine: &Engine,
    audit: &mut WebhookDelivery,
    delivery_id: &str,
    order_id: Option<&str>,
    body: &[u8],
    reason: String,
) -> Result<WebhookAnswer, WebhookError> {
    // The id as a letter can hold it: printable, bounded (the bad field may be the id).
    let id: String = delivery_id.chars().filter(|c| c.is_ascii_graphic()).take(MAX_LETTER_ID).collect();
    let payload = String::from_utf8_lossy(&body[..body.len().min(MAX_LETTER_PAYLOAD)]).into_owned();
    let why = format!("a signed delivery that cannot become an event: {reason}");
    let failure = Failure::new(Stage::Webhook, FailureKind::InvalidDelivery, why);
    let letter = failure.letter(format!("shopify:{id}"), order_id.map(str::to_string), payload);
    engine.reject_delivery(letter).await?;
    failure.emit(&id);
    audit.outcome = "rejected".into();
    audit.reason = Some(reason);
    Ok(WebhookAnswer { status: "rejected", order_id: order_id.map(str::to_string) })
}

/// How long a delivery waits for another attempt at it to finish before it gets 503.
/// With the append's own budget this can pass Shopify's 5 s; Shopify then retries, which
/// is what a 503 asks for anyway.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(3);

/// Claims a delivery's keys, all or none. While another attempt holds one (a concurrent
/// copy of the delivery), waits a little for that attempt to confirm or give it back.
async fn claim(engine: &Engine, config: &ShopifyConfig, keys: &[String]) -> Result<Claim, StoreError> {
    let deadline = tokio::time::Instant::now() + IN_FLIGHT_WAIT;
    let mut pause = Duration::from_millis(10);
    loop {
        let held = engine.webhooks().claim_delivery(keys, config.dedup_ttl, CLAIM_LEASE).await?;
        if held != Claim::InFlight || tokio::time::Instant::now() + pause > deadline {
            return Ok(held);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Gives unconfirmed claims back, best effort: one that stays runs out its lease.
async fn release(engine: &Engine, keys: &[String]) {
    if let Err(e) = engine.webhooks().release_delivery(keys).await {
        tracing::warn!(error = %e, ?keys, "releasing webhook claims failed; they run out their lease");
    }
}

#[cfg(test)]
mod tests {
    use super::ShopLabels;

    #[test]
    fn shops_past_the_limit_share_one_label() {
        let labels = ShopLabels::new(2);
        assert_eq!(labels.of(Some(" A.myshopify.com ")), "a.myshopify.com");
        assert_eq!(labels.of(Some("b.myshopify.com")), "b.myshopify.com");
        assert_eq!(labels.of(Some("c.myshopify.com")), ShopLabels::OTHER);
        assert_eq!(labels.of(Some("a.MYSHOPIFY.com")), "a.myshopify.com", "a labelled shop keeps its label");
        assert_eq!(labels.of(None), ShopLabels::NONE);
        assert_eq!(labels.of(Some("  ")), ShopLabels::NONE);
        assert_eq!(ShopLabels::new(0).of(Some("a.myshopify.com")), ShopLabels::OTHER);
        assert_eq!(ShopLabels::new(5).of(Some(&"x".repeat(400))).len(), 255);
    }
}
