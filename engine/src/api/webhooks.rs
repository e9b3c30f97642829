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
use crate::shopify::compliance::ComplianceRequest;
use crate::shopify::{self, DeliveryHeaders, LogFailure, WebhookAnswer, WebhookError};
use crate::store::{Page, WebhookDelivery};
use crate::telemetry::SHOP_WEBHOOKS;

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
    let Some(config) = s.config.shopify.as_ref() else {
        let hint = "set --shopify-secret (SHOPIFY_WEBHOOK_SECRET) or --shopify-secrets-file";
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
            let accepted = shopify::accept(&s.engine, config, &delivery, &body, &mut audit).await;
            let refused = matches!(accepted, Err(WebhookError::Unsigned | WebhookError::BadSignature));
            unverified = refused || matches!(accepted, Err(WebhookError::UnknownShop));
            if let Err(e @ WebhookError::UnknownShop) = &accepted {
                audit.reason = Some(e.to_string());
            }
            accepted.map_err(ApiError::from)
        }
    };
    s.engine.stats().webhook(&audit.outcome);
    let shop = match unverified {
        true => shopify::ShopLabels::UNVERIFIED.to_string(),
        false => config.shop_labels.of(delivery.shop.as_deref()),
    };
    metrics::counter!(SHOP_WEBHOOKS, "shop" => shop, "outcome" => audit.outcome.clone()).increment(1);
    if let Err(e) = &result
        && audit.reason.is_none()
    {
        let detail = e.detail["message"].as_str().map_or_else(|| e.detail.to_string(), str::to_string);
        audit.reason = Some(format!("{}: {detail}", e.error));
    }
    // Refusals past the budget are only counted.
    let audited = (!unverified || s.config.refusals.allows(peer.ip())).then_some(audit);
    shopify::settle(&s.engine, config, result.as_ref().ok(), audited).await;
    result.map(|accepted| Json(accepted.answer))
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
            // Answered like a bad signature, so that callers cannot tell which shops are set
            // up; the audit keeps the difference.
            WebhookError::UnknownShop => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid webhook signature",
                WebhookError::BadSignature.to_string(),
            ),
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

/// What to reconcile: one shop's orders updated since a time.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// The shop's domain (example.myshopify.com).
    pub shop: String,
    /// Orders updated at or after this time (RFC 3339) are read.
    pub since: chrono::DateTime<Utc>,
    /// And at or before this one, if given.
    #[serde(default)]
    pub until: Option<chrono::DateTime<Utc>>,
}

/// Reads the shop's orders updated since `since` from Shopify's Admin API and sends on,
/// through the webhook path, those the store lacks or has older. Answers when done.
#[utoipa::path(
    post, path = "/shopify/reconcile", request_body = ReconcileRequest,
    responses(
        (status = 200, body = shopify::reconcile::ReconcileReport), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "No Admin API token, or no webhook secret, is configured"),
        (status = 502, body = ErrorBody, description = "The Admin API refused or kept failing"),
    )
)]
pub async fn reconcile(
    State(s): State<AppState>,
    super::JsonBytes(body): super::JsonBytes,
) -> Result<Json<shopify::reconcile::ReconcileReport>, ApiError> {
    let request: ReconcileRequest = super::parse_json(&body, "reconcile request")?;
    let not_set_up = |hint: &str| ApiError::new(StatusCode::CONFLICT, "reconciliation is not configured", json!(hint));
    let config = s.config.shopify.clone().ok_or_else(|| not_set_up("set --shopify-secret"))?;
    let admin = config
        .admin
        .clone()
        .ok_or_else(|| not_set_up("give the Admin API token: --shopify-admin-token-file or SHOPIFY_ADMIN_TOKEN"))?;
    let shop = shop_param(&request.shop)?;
    if request.since > Utc::now() || request.until.is_some_and(|u| u < request.since) {
        return Err(ApiError::bad_request("invalid window", "since must be past, and until after it"));
    }
    if config.secrets_for(Some(&shop)).is_none() {
        return Err(not_set_up("no webhook secret for this shop: --shopify-secret or --shopify-secrets-file"));
    }
    if s.engine.webhooks().shop(&shop).await?.is_some_and(|r| !r.active) {
        return Err(not_set_up("the shop uninstalled the app: POST /shopify/shops/{shop}/activate first"));
    }
    let upstream = |e: String| ApiError::new(StatusCode::BAD_GATEWAY, "the Shopify Admin API failed", json!(e));
    let api =
        shopify::admin::AdminApi::new(&admin.url, &shop, admin.token.clone()).map_err(|e| upstream(e.to_string()))?;
    let window = (request.since, request.until);
    let report = shopify::reconcile::reconcile(&s.engine, &config, &api, &shop, window, |r| {
        tracing::info!(shop = %r.shop, pages = r.pages, fetched = r.fetched, "reconciling");
    })
    .await
    .map_err(|e| upstream(e.to_string()))?;
    Ok(Json(report))
}

/// A shop's domain as a request gave it, checked (400 otherwise).
fn shop_param(shop: &str) -> Result<String, ApiError> {
    shopify::reconcile::checked_shop(shop).map_err(|e| ApiError::bad_request("invalid shop", e.to_string()))
}

/// A shop's standing with the app: active unless an `app/uninstalled` delivery came.
#[utoipa::path(
    get, path = "/shopify/shops/{shop}", params(("shop" = String, Path, description = "The shop's domain")),
    responses(
        (status = 200, body = crate::store::ShopRecord), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    )
)]
pub async fn shop(
    State(s): State<AppState>,
    axum::extract::Path(shop): axum::extract::Path<String>,
) -> Result<Json<crate::store::ShopRecord>, ApiError> {
    let domain = shop_param(&shop)?;
    let record = s.engine.webhooks().shop(&domain).await?;
    Ok(Json(record.unwrap_or_else(|| crate::store::ShopRecord {
        domain,
        active: true,
        reason: "never uninstalled".into(),
        changed_at: chrono::DateTime::<Utc>::UNIX_EPOCH,
    })))
}

/// Takes a shop's deliveries again after it reinstalled the app.
#[utoipa::path(
    post, path = "/shopify/shops/{shop}/activate", params(("shop" = String, Path, description = "The shop's domain")),
    responses(
        (status = 200, body = crate::store::ShopRecord), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    )
)]
pub async fn activate_shop(
    State(s): State<AppState>,
    axum::extract::Path(shop): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Result<Json<crate::store::ShopRecord>, ApiError> {
    let domain = shop_param(&shop)?;
    let by = s.config.access.caller(&headers).ok().flatten().map_or_else(|| "an operator".to_string(), |c| c.name);
    let record =
        crate::store::ShopRecord { domain, active: true, reason: format!("activated by {by}"), changed_at: Utc::now() };
    s.engine.webhooks().set_shop(&record).await?;
    Ok(Json(record))
}

/// The compliance requests, newest first, without their exports (`GET
/// /shopify/compliance/{id}` has those).
#[utoipa::path(
    get, path = "/shopify/compliance",
    responses(
        (status = 200, body = Vec<ComplianceRequest>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub async fn compliance_requests(State(s): State<AppState>) -> Result<Json<Vec<ComplianceRequest>>, ApiError> {
    let mut shown = Vec::new();
    for record in s.engine.compliance().requests(COMPLIANCE_LISTED).await? {
        let request = ComplianceRequest::from_record(&record)?;
        shown.push(ComplianceRequest { export: None, ..request.shown() });
    }
    Ok(Json(shown))
}

/// How many requests `GET /shopify/compliance` lists.
const COMPLIANCE_LISTED: usize = 500;

/// One compliance request with its progress, and for a data request its export: what
/// the merchant passes on to the customer. An operator token is needed even on loopback,
/// and each read is audited.
#[utoipa::path(
    get, path = "/shopify/compliance/{id}", params(("id" = String, Path, description = "The delivery's webhook id")),
    responses(
        (status = 200, body = ComplianceRequest), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn compliance_request(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ComplianceRequest>, ApiError> {
    let record = s.engine.compliance().request(&id).await?;
    let record = record.ok_or_else(|| ApiError::not_found(format!("no compliance request {id}")))?;
    Ok(Json(ComplianceRequest::from_record(&record)?.shown()))
}

/// Sends a failed compliance request round again (after the store outage that failed
/// it is over).
#[utoipa::path(
    post, path = "/shopify/compliance/{id}/retry",
    params(("id" = String, Path, description = "The delivery's webhook id")),
    responses(
        (status = 200, body = ComplianceRequest), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
    )
)]
pub async fn retry_compliance_request(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ComplianceRequest>, ApiError> {
    use crate::shopify::compliance::{RetryError, retry};
    let Some(config) = s.config.shopify.as_ref() else {
        return Err(ApiError::not_found(format!("no compliance request {id}: Shopify is not configured")));
    };
    match retry(&s.engine, &config.compliance, &id).await {
        Ok(request) => Ok(Json(request)),
        Err(e @ RetryError::NotFound(_)) => Err(ApiError::not_found(e.to_string())),
        Err(e @ RetryError::NotFailed(..)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "the request is not failed", e.to_string()))
        }
        Err(RetryError::Store(e)) => Err(e.into()),
    }
}
