//! The Shopify bridge: signed order webhooks in, order events on the log out, with
//! durable deduplication and an audit record per delivery.

pub mod payload;
pub mod send;
pub mod signature;

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::api::{ApiError, AppState};
use crate::store::{Page, WebhookDelivery};
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
const APPEND_BUDGET: Duration = Duration::from_secs(4);

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

pub const RECEIVED: &str = "orchestrator_webhooks_received_total";

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

#[derive(Serialize, ToSchema)]
pub struct WebhookAnswer {
    /// accepted, duplicate or ignored.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<String>,
}

/// Receives a Shopify order webhook. 200 means the event is durably on the log (or was
/// a duplicate, or a topic we ignore); Shopify retries anything else.
#[utoipa::path(
    post, path = "/webhooks/shopify",
    responses(
        (status = 200, body = WebhookAnswer), (status = 400, body = crate::api::ErrorBody), (status = 401, body = crate::api::ErrorBody),
        (status = 413, body = crate::api::ErrorBody), (status = 503, body = crate::api::ErrorBody),
    )
)]
pub async fn receive(State(s): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Json<WebhookAnswer>, ApiError> {
    let Some(config) = s.config.shopify.clone() else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Shopify webhooks are not configured", "set --shopify-secret or SHOPIFY_WEBHOOK_SECRET"));
    };
    let mut audit = WebhookDelivery {
        webhook_id: header(&headers, "x-shopify-webhook-id").map(str::to_string),
        event_id: header(&headers, "x-shopify-event-id").map(str::to_string),
        topic: header(&headers, "x-shopify-topic").map(str::to_string),
        shop: header(&headers, "x-shopify-shop-domain").map(str::to_string),
        outcome: "rejected".into(),
        reason: None,
        order_id: None,
        received_at: Utc::now(),
    };
    let result = handle(&s, &config, &headers, body, &mut audit).await;
    let outcome = audit.outcome.clone();
    metrics::counter!(RECEIVED, "outcome" => outcome).increment(1);
    if let Err(e) = &result {
        audit.reason = Some(format!("{}: {}", e.error, e.detail.as_str().map_or_else(|| e.detail.to_string(), str::to_string)));
    }
    if let Err(e) = s.engine.store.record_delivery(audit).await {
        tracing::warn!(error = %e, "could not record a webhook delivery in the audit");
    }
    result.map(Json)
}

async fn handle(
    s: &AppState,
    config: &ShopifyConfig,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    audit: &mut WebhookDelivery,
) -> Result<WebhookAnswer, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "webhook body too large", json!({ "limit_bytes": config.max_body_bytes }))
        } else {
            ApiError::bad_request("unreadable webhook body", e.body_text())
        }
    })?;
    let unauthorized = |why: &str| ApiError::new(StatusCode::UNAUTHORIZED, "invalid webhook signature", why.to_string());
    let signature = header(headers, "x-shopify-hmac-sha256").ok_or_else(|| unauthorized("X-Shopify-Hmac-Sha256 is missing"))?;
    if !signature::verify(&config.secrets, &body, signature) {
        return Err(unauthorized("X-Shopify-Hmac-Sha256 does not sign this body"));
    }
    if let Some(limit) = &config.rate_limit
        && let Err(seconds) = limit.check(audit.shop.as_deref().unwrap_or("unknown"))
    {
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too many deliveries from this shop", json!({ "retry_after_seconds": seconds }));
        e.retry_after = Some(seconds);
        return Err(e);
    }
    let topic = audit.topic.clone().ok_or_else(|| ApiError::bad_request("X-Shopify-Topic is missing", "every Shopify webhook names its topic"))?;
    let kind = match payload::topic_action(&topic) {
        TopicAction::Event(kind) => kind,
        TopicAction::Ignored => {
            audit.outcome = "ignored".into();
            return Ok(WebhookAnswer { status: "ignored", order_id: None });
        }
    };
    let delivery_id = audit
        .webhook_id
        .clone()
        .or(audit.event_id.clone())
        .ok_or_else(|| ApiError::bad_request("X-Shopify-Webhook-Id is missing", "deliveries are deduplicated on it"))?;
    let event = payload::to_event(kind, &body, &delivery_id).map_err(|m| ApiError::bad_request("invalid Shopify payload", m))?;
    audit.order_id = Some(event.order_id.clone());

    // Claim every id the delivery carries; a claim already held means a duplicate.
    let keys: Vec<String> = [audit.webhook_id.as_ref().map(|w| format!("webhook:{w}")), audit.event_id.as_ref().map(|e| format!("event:{e}"))]
        .into_iter()
        .flatten()
        .collect();
    let mut claimed = Vec::new();
    for key in &keys {
        if s.engine.store.claim_delivery(key, config.dedup_ttl).await? {
            claimed.push(key.clone());
        } else {
            for k in &claimed {
                s.engine.store.release_delivery(k).await?;
            }
            audit.outcome = "duplicate".into();
            return Ok(WebhookAnswer { status: "duplicate", order_id: Some(event.order_id) });
        }
    }
    // Durable on the log before the 200; otherwise no mark is kept, so Shopify's retry passes.
    let appended = match tokio::time::timeout(APPEND_BUDGET, s.engine.ingest(std::slice::from_ref(&event))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        // The record may still land later; the retry then is a duplicate the store absorbs.
        Err(_) => Err(format!("no acknowledgement from the log within {APPEND_BUDGET:?}")),
    };
    if let Err(reason) = appended {
        for k in &claimed {
            let _ = s.engine.store.release_delivery(k).await;
        }
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the order log is unavailable; retry later", reason);
        e.retry_after = Some(5);
        return Err(e);
    }
    audit.outcome = "received".into();
    Ok(WebhookAnswer { status: "accepted", order_id: Some(event.order_id) })
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DeliveryParams {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// One record per webhook delivery: received, duplicate, ignored or rejected (with why).
#[utoipa::path(get, path = "/webhooks/deliveries", params(DeliveryParams), responses((status = 200, body = Page<WebhookDelivery>)))]
pub async fn deliveries(State(s): State<AppState>, Query(p): Query<DeliveryParams>) -> Result<Json<Page<WebhookDelivery>>, ApiError> {
    Ok(Json(s.engine.store.deliveries(p.limit.unwrap_or(100), p.cursor).await?))
}
