//! The Shopify routes: `POST /webhooks/shopify` turns a delivery into an HTTP answer
//! (and an audit record), `GET /webhooks/deliveries` lists that audit.

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use super::{ApiError, ApiQuery, AppState, BodyFailure, ErrorBody, RawBody, page_limit};
use crate::shopify::{self, DeliveryHeaders, LogFailure, WebhookAnswer, WebhookError};
use crate::store::{Page, WebhookDelivery};
use crate::telemetry::WEBHOOKS_RECEIVED;

/// Receives a Shopify order webhook. 200 means the event is durably on the log (or was
/// a duplicate, or a topic we ignore); Shopify retries anything else.
#[utoipa::path(
    post, path = "/webhooks/shopify",
    responses(
        (status = 200, body = WebhookAnswer), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 408, body = ErrorBody, description = "The body came too slowly"),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
pub async fn receive(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<WebhookAnswer>, ApiError> {
    let Some(config) = s.config.shopify.clone() else {
        let hint = "set --shopify-secret or SHOPIFY_WEBHOOK_SECRET";
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "Shopify webhooks are not configured", hint));
    };
    let delivery = delivery_headers(&headers);
    // Header values are the sender's: the audit keeps a bounded part of each.
    let cut = |v: &Option<String>| v.as_deref().map(|v| v.chars().take(AUDIT_HEADER_CHARS).collect::<String>());
    let mut audit = WebhookDelivery {
        webhook_id: cut(&delivery.webhook_id),
        event_id: cut(&delivery.event_id),
        topic: cut(&delivery.topic),
        shop: cut(&delivery.shop),
        outcome: "rejected".into(),
        reason: None,
        order_id: None,
        received_at: Utc::now(),
    };
    // Whether the sender was never shown to hold the secret: its refusals are audited
    // within a budget per address, so unsigned posts cannot fill the disk.
    let mut unverified = true;
    let result = match body {
        Err(BodyFailure::TooLarge) => {
            let limit = json!({ "limit_bytes": config.max_body_bytes });
            Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "webhook body too large", limit))
        }
        Err(e) => Err(e.into_error(config.max_body_bytes)),
        Ok(body) => {
            let accepted = shopify::accept(&s.engine, &config, &delivery, &body, &mut audit).await;
            unverified = matches!(accepted, Err(WebhookError::Unsigned | WebhookError::BadSignature));
            accepted.map_err(ApiError::from)
        }
    };
    metrics::counter!(WEBHOOKS_RECEIVED, "outcome" => audit.outcome.clone()).increment(1);
    if let Err(e) = &result {
        let detail = e.detail["message"].as_str().map_or_else(|| e.detail.to_string(), str::to_string);
        audit.reason = Some(format!("{}: {detail}", e.error));
    }
    if unverified && !s.config.refusals.allows(peer.ip()) {
        return result.map(Json);
    }
    if let Err(e) = s.engine.webhooks().record_delivery(audit).await {
        tracing::warn!(error = %e, "could not record a webhook delivery in the audit");
    }
    result.map(Json)
}

/// The most of each delivery header the audit keeps.
const AUDIT_HEADER_CHARS: usize = 128;

/// How many refused, unverified deliveries may go into the audit per minute: ten per
/// sender (an IPv6 sender counted by its /64, which one host can hold whole), and a few
/// hundred in all, so many senders cannot fill the disk either. Past either they are
/// only counted (`orchestrator_webhooks_received_total`).
#[derive(Debug, Default)]
pub struct RefusalBudget {
    window: std::sync::Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    started: Option<std::time::Instant>,
    total: u32,
    per_sender: std::collections::HashMap<u64, u32>,
}

impl RefusalBudget {
    const PER_SENDER: u32 = 10;
    const TOTAL: u32 = 300;

    pub fn allows(&self, address: std::net::IpAddr) -> bool {
        let sender = match address {
            std::net::IpAddr::V4(a) => u64::from(u32::from(a)),
            std::net::IpAddr::V6(a) => (u128::from(a) >> 64) as u64 | 1 << 63,
        };
        let now = std::time::Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        // One window a minute for everyone: the map never outgrows TOTAL senders.
        if w.started.is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(60)) {
            *w = Window { started: Some(now), ..Window::default() };
        }
        if w.total >= Self::TOTAL {
            return false;
        }
        let count = w.per_sender.entry(sender).or_insert(0);
        if *count >= Self::PER_SENDER {
            return false;
        }
        *count += 1;
        w.total += 1;
        true
    }
}

fn delivery_headers(h: &HeaderMap) -> DeliveryHeaders {
    let get = |name: &str| {
        h.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty()).map(str::to_string)
    };
    DeliveryHeaders {
        hmac: get("x-shopify-hmac-sha256"),
        webhook_id: get("x-shopify-webhook-id"),
        event_id: get("x-shopify-event-id"),
        topic: get("x-shopify-topic"),
        shop: get("x-shopify-shop-domain"),
    }
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        let why = e.to_string();
        match e {
            WebhookError::Unsigned | WebhookError::BadSignature => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid webhook signature", why)
            }
            WebhookError::RateLimited { retry_after_s } => {
                let detail = json!({ "retry_after_seconds": retry_after_s });
                let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too many deliveries from this shop", detail);
                e.retry_after = Some(retry_after_s);
                e
            }
            WebhookError::InFlight { retry_after_s } => {
                let detail = json!({ "retry_after_seconds": retry_after_s });
                let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "delivery in flight; retry later", detail);
                e.retry_after = Some(retry_after_s);
                e
            }
            WebhookError::NoTopic => ApiError::bad_request(why, "every Shopify webhook names its topic"),
            WebhookError::NoDeliveryId => ApiError::bad_request(why, "deliveries are deduplicated on it"),
            WebhookError::LogUnavailable(failure) => {
                let reason = match &failure {
                    LogFailure::Refused(e) => e.to_string(),
                    LogFailure::NoAckWithin(_) => failure.to_string(),
                };
                let mut e =
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the order log is unavailable; retry later", reason);
                e.retry_after = Some(5);
                e
            }
            WebhookError::Store(e) => e.into(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    /// 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
    cursor: Option<String>,
}

/// One record per webhook delivery: received, duplicate, ignored or rejected (with why).
#[utoipa::path(
    get, path = "/webhooks/deliveries", params(DeliveryParams),
    responses((status = 200, body = Page<WebhookDelivery>))
)]
pub async fn deliveries(
    State(s): State<AppState>,
    ApiQuery(p): ApiQuery<DeliveryParams>,
) -> Result<axum::response::Response, ApiError> {
    let limit = page_limit(p.limit, 100, 1000)?;
    let ledger = s.engine.webhooks();
    super::pages::capped(s.config.max_page_bytes, limit, |n| ledger.deliveries(n, p.cursor.clone())).await
}
