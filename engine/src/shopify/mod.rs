//! The Shopify bridge: signed order webhooks in, order events on the log out, with
//! durable deduplication and an audit record per delivery.

pub mod payload;
pub mod send;
pub mod signature;

use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::{Engine, IngestError};
use crate::store::{StoreError, WebhookDelivery};
use payload::TopicAction;
use signature::Secrets;

/// The bridge's settings.
#[derive(Debug, Clone)]
pub struct ShopifyConfig {
    pub secrets: Secrets,
    /// How long a delivery id is remembered for deduplication.
    pub dedup_ttl: Duration,
    /// Largest accepted webhook body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Deliveries per second each shop may send; `None` (the default) is unlimited.
    pub rate_limit: Option<std::sync::Arc<RateLimit>>,
}

/// Shopify waits about 5 s for an answer: a log that takes longer gets a 503 (and a retry).
pub const APPEND_BUDGET: Duration = Duration::from_secs(4);

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

/// Why a delivery was not accepted. Each kind maps to one HTTP status in `api/webhooks`;
/// Shopify retries everything but a 2xx.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("X-Shopify-Hmac-Sha256 is missing")]
    Unsigned,
    #[error("X-Shopify-Hmac-Sha256 does not sign this body")]
    BadSignature,
    #[error("too many deliveries from this shop; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("X-Shopify-Topic is missing")]
    NoTopic,
    #[error("X-Shopify-Webhook-Id is missing")]
    NoDeliveryId,
    #[error("invalid Shopify payload: {0}")]
    Payload(String),
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
    /// accepted, duplicate or ignored.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
}

/// Takes one signed delivery: verifies it, claims its ids for deduplication, and puts its
/// event durably on the log. `audit` is filled in as far as the delivery got.
pub async fn accept(
    engine: &Engine,
    config: &ShopifyConfig,
    headers: &DeliveryHeaders,
    body: &[u8],
    audit: &mut WebhookDelivery,
) -> Result<WebhookAnswer, WebhookError> {
    let signature = headers.hmac.as_deref().ok_or(WebhookError::Unsigned)?;
    if !signature::verify(&config.secrets, body, signature) {
        return Err(WebhookError::BadSignature);
    }
    if let Some(limit) = &config.rate_limit
        && let Err(retry_after_s) = limit.check(headers.shop.as_deref().unwrap_or("unknown"))
    {
        return Err(WebhookError::RateLimited { retry_after_s });
    }
    let topic = headers.topic.as_deref().ok_or(WebhookError::NoTopic)?;
    let kind = match payload::topic_action(topic) {
        TopicAction::Event(kind) => kind,
        TopicAction::Ignored => {
            audit.outcome = "ignored".into();
            return Ok(WebhookAnswer { status: "ignored", order_id: None });
        }
    };
    let delivery_id = headers.webhook_id.clone().or(headers.event_id.clone()).ok_or(WebhookError::NoDeliveryId)?;
    let event = payload::to_event(kind, body, &delivery_id).map_err(WebhookError::Payload)?;
    audit.order_id = Some(event.order_id.clone());

    // Claim every id the delivery carries; a claim already held means a duplicate.
    let keys: Vec<String> = [
        headers.webhook_id.as_ref().map(|w| format!("webhook:{w}")),
        headers.event_id.as_ref().map(|e| format!("event:{e}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut claimed = Vec::new();
    for key in &keys {
        if engine.webhooks().claim_delivery(key, config.dedup_ttl).await? {
            claimed.push(key.clone());
        } else {
            for k in &claimed {
                engine.webhooks().release_delivery(k).await?;
            }
            audit.outcome = "duplicate".into();
            return Ok(WebhookAnswer { status: "duplicate", order_id: Some(event.order_id) });
        }
    }
    // Durable on the log before the 200; otherwise no mark is kept, so Shopify's retry passes.
    let appended = match tokio::time::timeout(APPEND_BUDGET, engine.ingest(std::slice::from_ref(&event))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(LogFailure::Refused(e)),
        // The record may still land later; the retry then is a duplicate the store absorbs.
        Err(_) => Err(LogFailure::NoAckWithin(APPEND_BUDGET)),
    };
    if let Err(failure) = appended {
        for k in &claimed {
            let _ = engine.webhooks().release_delivery(k).await;
        }
        return Err(WebhookError::LogUnavailable(failure));
    }
    audit.outcome = "received".into();
    Ok(WebhookAnswer { status: "accepted", order_id: Some(event.order_id) })
}
