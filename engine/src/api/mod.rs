//! The HTTP API: routes, shared state, and the handlers for health, metrics and orders.

mod assets;
pub mod auth;
mod error;
pub mod listener;
mod openapi;
pub mod origin;
mod pages;
mod plugins;
mod runs;
pub mod webhooks;
pub mod ws;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, OpenApi, ToSchema};

pub use error::{ApiError, ErrorBody};
pub use pages::page_limit;

use crate::domain::{Order, OrderEvent, Priority, Status};
use crate::engine::{Engine, OrderEdit};
use crate::journey::Journey;
use crate::store::{HistoryEntry, ListQuery, OrderCounts, Page, Sort};
use crate::telemetry;

/// Limits and credentials the API enforces.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body accepted; larger ones get 413. Plugin uploads have their
    /// own limit, checked by the registry.
    pub max_body_bytes: usize,
    /// Largest list answer in bytes (see `pages::capped`).
    pub max_page_bytes: usize,
    /// The tokens, and whether reads are open: see `auth.rs`.
    pub access: auth::Access,
    /// The host names a loopback engine answers to: see `origin.rs`.
    pub hosts: origin::Hosts,
    /// How long a client may take to send a request body (408 past it).
    pub body_timeout: std::time::Duration,
    /// How many `/ws` clients, and how long one may go without reading.
    pub ws: ws::WsLimits,
    /// How many refused, unsigned webhook posts each address may leave in the audit.
    pub refusals: Arc<webhooks::RefusalBudget>,
    /// The Shopify bridge, when a webhook secret is configured.
    pub shopify: Option<crate::shopify::ShopifyConfig>,
}

/// Plugin uploads beyond the registry's limit still reach it (and get its clear 400)
/// up to this size.
pub(crate) const PLUGIN_BODY_LIMIT: usize = 64 << 20;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub runs: Arc<crate::runs::Runs>,
    pub metrics: PrometheusHandle,
    /// Shared: axum clones the state for every extractor of every request.
    pub config: Arc<ApiConfig>,
    /// Once-a-second figures for the dashboard's live charts.
    pub pulse: Arc<crate::pulse::Pulse>,
}

pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let shopify_limit = state.config.shopify.as_ref().map_or(1 << 20, |c| c.max_body_bytes);
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .route("/logs", get(recent_logs))
        .route("/orders/events", post(post_events))
        .route("/orders", get(list_orders))
        .route("/order-counts", get(order_counts))
        .route("/cluster", get(cluster_view))
        .route("/orders/{id}", get(get_order).patch(patch_order))
        .route("/orders/{id}/history", get(order_history))
        .route("/orders/{id}/journey", get(order_journey))
        .route("/ws", get(ws::upgrade))
        .route("/plugins", get(plugins::list))
        .route("/plugins/{slot}", put(plugins::deploy).layer(DefaultBodyLimit::max(PLUGIN_BODY_LIMIT)))
        .route("/plugins/{slot}/replay", post(plugins::what_if).layer(DefaultBodyLimit::max(PLUGIN_BODY_LIMIT)))
        .route("/plugins/{slot}/promote", post(plugins::promote))
        .route("/plugins/{slot}/rollback", post(plugins::rollback))
        .route("/plugins/{slot}/versions/{version}/activate", post(plugins::activate))
        .route("/plugins/{slot}/shadow", axum::routing::delete(plugins::discard))
        .route("/plugins/{slot}/shadow-report", get(plugins::shadow_report))
        .route("/dead-letters", get(plugins::dead_letters))
        .route("/dead-letters/{id}/replay", post(plugins::replay))
        .route("/dead-letters/replay", post(plugins::replay_many))
        .route("/dead-letters/purge", post(plugins::purge_many))
        .route("/runs", post(runs::start).get(runs::list))
        .route("/runs/current", get(runs::current))
        .route("/runs/{id}", get(runs::get))
        .route("/runs/{id}/cancel", post(runs::cancel))
        .route("/queues/{priority}", get(runs::queue_state))
        .route("/queues/{priority}/pause", post(runs::pause))
        .route("/queues/{priority}/resume", post(runs::resume))
        .route("/reset", post(runs::reset))
        .route("/webhooks/shopify", post(webhooks::receive).layer(DefaultBodyLimit::max(shopify_limit)))
        .route("/webhooks/deliveries", get(webhooks::deliveries))
        .route("/shopify/reconcile", post(webhooks::reconcile))
        .route("/shopify/shops/{shop}", get(webhooks::shop))
        .route("/shopify/compliance", get(webhooks::compliance_requests))
        .route("/shopify/compliance/{id}", get(webhooks::compliance_request))
        .route("/shopify/compliance/{id}/retry", post(webhooks::retry_compliance_request))
        .route("/shopify/shops/{shop}/activate", post(webhooks::activate_shop))
        .route("/audit", get(audit))
        .merge(assets::routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), origin::check))
        .layer(axum::middleware::from_fn(error::json_errors))
        .with_state(state)
}

/// The routes of `orchestrator bridge`: webhooks, their audit, health and metrics.
pub fn bridge_router(state: AppState) -> Router {
    let limit = state.config.shopify.as_ref().map_or(1 << 20, |c| c.max_body_bytes);
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/webhooks/shopify", post(webhooks::receive).layer(DefaultBodyLimit::max(limit)))
        .route("/webhooks/deliveries", get(webhooks::deliveries))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard))
        .layer(axum::middleware::from_fn_with_state(state.clone(), origin::check))
        .layer(axum::middleware::from_fn(error::json_errors))
        .with_state(state)
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// "ok" when the log and the store answer, else "degraded" (with 503 and Retry-After).
    status: &'static str,
    /// What is wrong, when degraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    backend: String,
    /// Events in the log not yet applied, per priority.
    queue_depth: QueueDepth,
    applied: u64,
    skipped: u64,
    rejected: u64,
    duplicates: u64,
    cas_conflicts: u64,
    /// Creates decided as if their order were absent, then again against its row (it
    /// existed, or the rules did not upsert); since this instance started.
    create_guesses_missed: u64,
    /// Events that came before their order's create and were parked, and parked events
    /// decided since (both since this instance started).
    parked: u64,
    released: u64,
    /// Shopify compliance requests received and not yet done (`GET /shopify/compliance`).
    compliance_open: u64,
}

#[derive(Serialize, ToSchema)]
struct QueueDepth {
    vip: u64,
    normal: u64,
}

#[utoipa::path(get, path = "/health", responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn health(State(s): State<AppState>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = s.engine.stats();
    let problem = s.engine.health().await.err();
    let body = Health {
        status: if problem.is_none() { "ok" } else { "degraded" },
        reason: problem.clone(),
        backend: s.engine.backend(),
        queue_depth: QueueDepth {
            vip: s.engine.queue_depth(Priority::Vip),
            normal: s.engine.queue_depth(Priority::Normal),
        },
        applied: stats.applied.load(Relaxed),
        skipped: stats.skipped.load(Relaxed),
        rejected: stats.rejected.load(Relaxed),
        duplicates: stats.duplicates.load(Relaxed),
        cas_conflicts: stats.conflicts.load(Relaxed),
        create_guesses_missed: stats.guesses_missed.load(Relaxed),
        parked: stats.parked.load(Relaxed),
        released: stats.released.load(Relaxed),
        compliance_open: s.config.shopify.as_ref().map_or(0, |c| c.compliance.open()),
    };
    match problem {
        None => (StatusCode::OK, Json(body)).into_response(),
        // Probes and load balancers should look again soon, not hammer.
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "5")], Json(body)).into_response(),
    }
}

#[utoipa::path(
    get, path = "/metrics",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"))
)]
async fn metrics(State(s): State<AppState>) -> Response {
    for p in Priority::ALL {
        telemetry::queue_depth(p).set(s.engine.queue_depth(p) as f64);
    }
    let degraded = s.engine.health().await.is_err();
    metrics::gauge!(telemetry::DEGRADED).set(if degraded { 1.0 } else { 0.0 });
    if let Some(plugins) = s.engine.plugins() {
        plugins.report_memory();
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    /// How many of the latest lines, 1..=500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

/// The engine's latest log lines (INFO and above), oldest first.
#[utoipa::path(
    get, path = "/logs", params(LogParams),
    responses((status = 200, body = Vec<crate::recent_logs::LogLine>), (status = 400, body = ErrorBody))
)]
async fn recent_logs(ApiQuery(p): ApiQuery<LogParams>) -> Result<Json<Vec<crate::recent_logs::LogLine>>, ApiError> {
    Ok(Json(crate::recent_logs::recent(page_limit(p.limit, 100, 500)?)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Page size, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
    /// `next_cursor` from the previous page.
    cursor: Option<String>,
}

/// Operator and admin actions, newest first: who (the token's name), what, on which
/// path, when, and how it ended.
#[utoipa::path(
    get, path = "/audit", params(AuditParams),
    responses((status = 200, body = Page<crate::store::ActionRecord>), (status = 400, body = ErrorBody))
)]
async fn audit(State(s): State<AppState>, ApiQuery(p): ApiQuery<AuditParams>) -> Result<Response, ApiError> {
    let limit = page_limit(p.limit, 100, 1000)?;
    pages::capped(s.config.max_page_bytes, limit, |n| s.engine.action_log().actions(n, p.cursor.clone())).await
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi::ApiDoc::openapi())
}

/// Query parameters; a query that does not parse gets a JSON 400 naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<AppState> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, ApiError> {
        let Query(value) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e: QueryRejection| ApiError::bad_request("invalid query", e.body_text()))?;
        Ok(ApiQuery(value))
    }
}

/// A request body declared as JSON, read whole: a body of another type is refused with
/// 415 (see `origin.rs`), one too large with 413.
pub struct JsonBytes(pub Bytes);

impl axum::extract::FromRequest<AppState> for JsonBytes {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self, ApiError> {
        origin::json_body_required(req.headers())?;
        let RawBody(read) = RawBody::from_request(req, state).await.unwrap_or_else(|never| match never {});
        read.map(JsonBytes).map_err(|e| e.into_error(state.config.max_body_bytes))
    }
}

/// A request body read whole within the body timeout. The handler answers a failure,
/// since the size limit differs per route.
pub struct RawBody(pub Result<Bytes, BodyFailure>);

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyFailure {
    TooLarge,
    /// The client sent it too slowly: it took longer than this.
    TooSlow(std::time::Duration),
    Unreadable(String),
}

impl BodyFailure {
    /// The answer, with `limit` the route's body limit.
    pub fn into_error(self, limit: usize) -> ApiError {
        match self {
            BodyFailure::TooLarge => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large", json!({ "limit_bytes": limit }))
            }
            BodyFailure::TooSlow(t) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request body too slow",
                json!({ "timeout_secs": t.as_secs_f64(), "message": "send the whole body within the body timeout" }),
            ),
            BodyFailure::Unreadable(m) => ApiError::bad_request("unreadable request body", m),
        }
    }
}

impl axum::extract::FromRequest<AppState> for RawBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let timeout = state.config.body_timeout;
        let read = match tokio::time::timeout(timeout, Bytes::from_request(req, state)).await {
            Err(_) => Err(BodyFailure::TooSlow(timeout)),
            Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(BodyFailure::TooLarge),
            Ok(Err(e)) => Err(BodyFailure::Unreadable(e.body_text())),
            Ok(Ok(bytes)) => Ok(bytes),
        };
        Ok(RawBody(read))
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("malformed {what}"), e.to_string()))
}

#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// How many events are now durably in the log.
    accepted: usize,
}

/// Appends one event or an array of events. All or none are accepted.
#[utoipa::path(
    post, path = "/orders/events",
    request_body(content = Vec<OrderEvent>, description = "One OrderEvent, or an array of them"),
    responses(
        (status = 202, body = Accepted, description = "Durably in the log"),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
async fn post_events(
    State(s): State<AppState>,
    JsonBytes(body): JsonBytes,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let is_array = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let events: Vec<OrderEvent> =
        if is_array { parse_json(&body, "event array")? } else { vec![parse_json(&body, "event")?] };
    if events.is_empty() {
        return Err(ApiError::bad_request("no events", "the array is empty"));
    }
    // Shopify's clock decides staleness and its webhook ids deduplicate deliveries, so an
    // unsigned request may not borrow either: it could make genuine deliveries stale or
    // duplicates forever.
    if let Some(index) = events.iter().position(OrderEvent::claims_shopify) {
        let reason = "source \"shopify\", event ids starting with \"shopify:\" and shops ending in \
                      \".myshopify.com\" belong to the signed webhook (POST /webhooks/shopify)";
        return Err(ApiError::bad_request("invalid event", json!({ "index": index, "reason": reason })));
    }
    // An event's place decides which change of a field wins: a client could make its
    // change unbeatable (or void) by naming one.
    if let Some(index) = events.iter().position(|e| e.accepted_at.is_some()) {
        let reason = "accepted_at is set by the engine (when it accepts the event); leave it out";
        return Err(ApiError::bad_request("invalid event", json!({ "index": index, "reason": reason })));
    }
    let accepted = s.engine.ingest(&events).await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted })))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1..=1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
    /// `next_cursor` from the previous page.
    cursor: Option<String>,
    /// PENDING, CONFIRMED, PROCESSING, SHIPPED, DELIVERED or CANCELLED.
    status: Option<String>,
    /// VIP or NORMAL.
    priority: Option<String>,
    /// Prefix of the order id or the customer; or a Shopify order id (digits), which
    /// also finds `shopify-<id>`.
    q: Option<String>,
    /// -updated_at (default), updated_at, id or -id.
    sort: Option<String>,
    /// Only the orders of this shop (a domain, such as example.myshopify.com).
    shop: Option<String>,
}

#[utoipa::path(
    get, path = "/orders", params(ListParams),
    responses((status = 200, body = Page<Order>), (status = 400, body = ErrorBody))
)]
async fn list_orders(State(s): State<AppState>, ApiQuery(p): ApiQuery<ListParams>) -> Result<Response, ApiError> {
    let status = p
        .status
        .map(|v| Status::parse(&v.to_ascii_uppercase()).ok_or_else(|| ApiError::bad_request("invalid status", v)))
        .transpose()?;
    let priority = p
        .priority
        .map(|v| Priority::parse(&v).ok_or_else(|| ApiError::bad_request("invalid priority", v)))
        .transpose()?;
    let sort = match p.sort.as_deref() {
        None => Sort::default(),
        Some(v) => serde_json::from_value(json!(v)).map_err(|_| {
            ApiError::bad_request("invalid sort", format!("{v:?}; use -updated_at, updated_at, id or -id"))
        })?,
    };
    let shop = p.shop.as_deref().map(|v| v.trim().to_ascii_lowercase());
    if let Some(shop) = &shop {
        crate::domain::check_shop(shop).map_err(|e| ApiError::bad_request("invalid shop", e))?;
    }
    let limit = page_limit(p.limit, 50, 1000)?;
    pages::capped(s.config.max_page_bytes, limit, |limit| {
        let (cursor, q, shop) = (p.cursor.clone(), p.q.clone(), shop.clone());
        s.engine.orders(ListQuery { limit, cursor, status, priority, q, sort, shop })
    })
    .await
}

/// The group's instances as their beacons of the last 5 s say (this one alone on the
/// embedded default): the partitions each consumes, its pauses, the plugin versions it
/// decides with and its throughput; and the group's lag per partition.
#[derive(Debug, Serialize, ToSchema)]
struct ClusterView {
    /// The instance that answers.
    this: String,
    instances: Vec<InstanceView>,
    /// Each partition's lag and whether the answering instance holds it (Kafka only).
    placement: Option<crate::log::Placement>,
    /// Every instance decides with the same plugin versions.
    plugins_agree: bool,
}

#[derive(Debug, Serialize, ToSchema)]
struct InstanceView {
    instance: String,
    /// How long ago its last beacon came.
    seen_ms_ago: u64,
    paused: crate::pulse::PerPriority<bool>,
    deciding: std::collections::BTreeMap<String, String>,
    /// The partitions it consumes, per priority.
    partitions: crate::pulse::PerPriority<Vec<i32>>,
    applied_per_s: crate::pulse::PerPriority<f64>,
}

#[utoipa::path(get, path = "/cluster", responses((status = 200, body = ClusterView)))]
async fn cluster_view(State(s): State<AppState>) -> Json<ClusterView> {
    let engine = &s.engine;
    let instances: Vec<InstanceView> = if engine.cluster().is_some() {
        s.pulse
            .members()
            .into_iter()
            .map(|(ago, b)| {
                let mine = |p: &Option<crate::log::Placement>, vip: bool| -> Vec<i32> {
                    let Some(p) = p else { return Vec::new() };
                    let list = if vip { &p.vip } else { &p.normal };
                    list.iter().filter(|x| x.mine).map(|x| x.partition).collect()
                };
                InstanceView {
                    seen_ms_ago: ago.as_millis() as u64,
                    paused: b.paused,
                    partitions: crate::pulse::PerPriority {
                        vip: mine(&b.placement, true),
                        normal: mine(&b.placement, false),
                    },
                    applied_per_s: b.sample.applied_per_s,
                    deciding: b.deciding,
                    instance: b.instance,
                }
            })
            .collect()
    } else {
        let paused = |p| engine.operator_paused(p);
        vec![InstanceView {
            instance: engine.instance(),
            seen_ms_ago: 0,
            paused: crate::pulse::PerPriority { vip: paused(Priority::Vip), normal: paused(Priority::Normal) },
            deciding: engine.deciding().into_iter().map(|(slot, id)| (slot.to_string(), id)).collect(),
            partitions: crate::pulse::PerPriority { vip: vec![0], normal: vec![0] },
            applied_per_s: crate::pulse::PerPriority::default(),
        }]
    };
    let plugins_agree = instances.windows(2).all(|w| w[0].deciding == w[1].deciding);
    Json(ClusterView { this: engine.instance(), instances, placement: engine.placement(), plugins_agree })
}

/// Orders by status and by priority. Counted on the embedded default (`exact`), kept in
/// counters on CQL (approximate); at most 2 s old either way (`counted_at`).
#[utoipa::path(get, path = "/order-counts", responses((status = 200, body = OrderCounts)))]
async fn order_counts(State(s): State<AppState>) -> Result<Json<OrderCounts>, ApiError> {
    Ok(Json(s.engine.counts().await?))
}

#[utoipa::path(get, path = "/orders/{id}", responses((status = 200, body = Order), (status = 404, body = ErrorBody)))]
async fn get_order(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let order = s.engine.order(&id).await?.ok_or_else(|| ApiError::not_found("order not found"))?;
    Ok(with_etag(order))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryParams {
    /// 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
    cursor: Option<String>,
}

/// The order's history, oldest first, a page at a time: every outcome of every event.
#[utoipa::path(
    get, path = "/orders/{id}/history", params(HistoryParams),
    responses((status = 200, body = Page<HistoryEntry>), (status = 404, body = ErrorBody))
)]
async fn order_history(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<HistoryParams>,
) -> Result<Response, ApiError> {
    let limit = page_limit(p.limit, 100, 1000)?;
    let (engine, id, cursor) = (&s.engine, &id, &p.cursor);
    pages::capped(s.config.max_page_bytes, limit, |limit| async move {
        let page = engine.history(id, limit, cursor.clone()).await?;
        page.ok_or_else(|| ApiError::not_found("order not found"))
    })
    .await
}

/// The order's journey: each of its first 1000 events as a timeline (source, received,
/// appended, decided by which plugin version, each compare-and-set it lost and how the
/// resolver settled it, the outcome, published) with the fields it changed.
#[utoipa::path(
    get, path = "/orders/{id}/journey",
    responses((status = 200, body = Journey), (status = 404, body = ErrorBody))
)]
async fn order_journey(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Journey>, ApiError> {
    let journey = s.engine.journey(&id).await?;
    Ok(Json(journey.ok_or_else(|| ApiError::not_found("order not found"))?))
}

/// An operator's edit, applied only if `If-Match` names the current version.
#[utoipa::path(
    patch, path = "/orders/{id}",
    request_body = OrderEdit,
    params(("If-Match" = String, Header,
        description = "The version the edit is based on (the ETag, or a bare version); a list of versions, any of \
                       which may be current; or `*`, any version of an existing order")),
    responses(
        (status = 200, body = Order), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "Stale version; `current` holds the row"),
        (status = 412, body = ErrorBody, description = "If-Match is a weak tag"),
        (status = 428, body = ErrorBody, description = "If-Match missing"),
    )
)]
async fn patch_order(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBytes(body): JsonBytes,
) -> Result<Response, ApiError> {
    let raw = headers.get(header::IF_MATCH).ok_or_else(|| {
        ApiError::new(
            StatusCode::PRECONDITION_REQUIRED,
            "If-Match required",
            "send If-Match: <version> from the row you edited",
        )
    })?;
    let raw = raw.to_str().unwrap_or("").trim();
    let edit: OrderEdit = parse_json(&body, "edit")?;
    let expected = match if_match(raw)? {
        IfMatch::Version(v) => v,
        // `*` or a list: the row as it is now decides. A list without its version is
        // stale (the edit below answers 409 with the row); a race with another writer
        // is still caught by the compare-and-set.
        other => {
            let current = s.engine.order(&id).await?.ok_or_else(|| ApiError::not_found("order not found"))?;
            match other {
                IfMatch::Versions(listed) if !listed.contains(&current.version) => listed[0],
                _ => current.version,
            }
        }
    };
    let order = s.engine.edit(&id, expected, edit).await?;
    Ok(with_etag(order))
}

/// What an `If-Match` header asks for (RFC 9110, 13.1.1).
enum IfMatch {
    Version(u64),
    Versions(Vec<u64>),
    Any,
}

fn if_match(raw: &str) -> Result<IfMatch, ApiError> {
    if raw == "*" {
        return Ok(IfMatch::Any);
    }
    let mut versions = Vec::new();
    for tag in raw.split(',').map(str::trim) {
        // RFC 9110 compares If-Match strongly: a weak tag never matches.
        if tag.starts_with("W/") {
            let detail = json!({ "if_match": raw, "message": "If-Match needs strong tags: send the ETag as given" });
            return Err(ApiError::new(StatusCode::PRECONDITION_FAILED, "weak entity tag", detail));
        }
        // The ETag is the quoted version; a bare version is taken too.
        let unquoted = tag.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(tag);
        let version = unquoted.parse::<u64>().map_err(|_| {
            ApiError::bad_request("invalid If-Match", "If-Match must be the order's version (a number), a list, or *")
        })?;
        versions.push(version);
    }
    Ok(match versions[..] {
        [one] => IfMatch::Version(one),
        _ => IfMatch::Versions(versions),
    })
}

fn with_etag(order: Order) -> Response {
    let etag = format!("\"{}\"", order.version);
    ([(header::ETAG, etag)], Json(order)).into_response()
}
