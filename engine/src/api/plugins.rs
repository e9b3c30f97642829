//! Plugin deployment (deploy, shadow, promote, rollback) and dead letters. The access
//! policy (`auth.rs`) says who may call each.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiQuery, AppState, JsonBytes, RawBody, page_limit, parse_json};
use crate::engine::{BulkPurge, BulkReplay, ReplayError, WhatIfError};
use crate::failure::LetterFilter;
use crate::plugin::registry::{Deployed, Registry, SlotInfo, VersionInfo};
use crate::plugin::{PluginError, Slot};
use crate::rules::ShadowReport;
use crate::store::{DeadLetter, Page};
use crate::whatif::{self, WhatIfReport};

impl From<PluginError> for ApiError {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::Disabled => {
                ApiError::new(StatusCode::NOT_FOUND, "plugins are disabled", "the engine runs the native rules")
            }
            PluginError::Invalid(m) => ApiError::bad_request("invalid plugin", m),
            PluginError::State(m) => ApiError::new(StatusCode::CONFLICT, "not possible in the slot's state", m),
            PluginError::NoVersion(m) => ApiError::not_found(m),
            PluginError::Unreplicated(m) => {
                let mut err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not replicated; retry", m);
                err.retry_after = Some(5);
                err
            }
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "plugin registry failed", other.to_string()),
        }
    }
}

fn registry(s: &AppState) -> Result<&Arc<Registry>, ApiError> {
    s.engine
        .plugins()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "plugins are disabled", "the engine runs the native rules"))
}

fn slot(name: &str) -> Result<Slot, ApiError> {
    Slot::parse(name)
        .ok_or_else(|| ApiError::not_found(format!("no slot {name:?}; slots are order-rules and conflict-resolver")))
}

/// Slots with their active and shadow versions, every stored version, and the history.
#[utoipa::path(get, path = "/plugins", responses((status = 200, body = Vec<SlotInfo>)))]
pub async fn list(State(s): State<AppState>) -> Result<Json<Vec<SlotInfo>>, ApiError> {
    Ok(Json(registry(&s)?.describe()?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeployParams {
    /// Run the upload beside the active version, comparing decisions, instead of activating it.
    shadow: Option<bool>,
}

/// Deploys a component (the request body) to a slot.
#[utoipa::path(
    put, path = "/plugins/{slot}", params(DeployParams),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses(
        (status = 201, body = Deployed, description = "A new version"),
        (
            status = 200, body = Deployed,
            description = "The bytes of a stored version, which is now active (or shadowed)"
        ),
        (status = 400, body = super::ErrorBody), (status = 401, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn deploy(
    State(s): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(p): ApiQuery<DeployParams>,
    RawBody(body): RawBody,
) -> Result<(StatusCode, Json<Deployed>), ApiError> {
    let slot = slot(&name)?;
    let body = body.map_err(|e| e.into_error(super::PLUGIN_BODY_LIMIT))?;
    if body.is_empty() {
        return Err(ApiError::bad_request("invalid plugin", "the request body is empty; send the component's bytes"));
    }
    let (bytes, shadow) = (body.to_vec(), p.shadow.unwrap_or(false));
    let deployed = s.engine.change_plugins(slot, move |r| async move { r.deploy(slot, bytes, shadow).await }).await?;
    tracing::info!(slot = %slot, version = deployed.version, shadow = deployed.shadow, reused = deployed.reused,
        ms = deployed.activation_ms, "plugin deployed");
    let status = if deployed.reused { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(deployed)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WhatIfParams {
    /// How far back: a duration from now (`90s`, `30m`, `1h`, `2d`) or an RFC 3339 time.
    since: String,
    /// Most recorded events decided, oldest first: 1..=100000 (default 10000).
    #[param(minimum = 1, maximum = 100000)]
    limit: Option<u64>,
}

/// A what-if run: the component (the request body) and the active rules decide the
/// events recorded since `since`, each with the row it met; the report compares them.
/// Nothing is written or deployed.
#[utoipa::path(
    post, path = "/plugins/{slot}/replay", params(WhatIfParams),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses(
        (status = 200, body = WhatIfReport),
        (status = 400, body = super::ErrorBody), (status = 401, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn what_if(
    State(s): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(p): ApiQuery<WhatIfParams>,
    RawBody(body): RawBody,
) -> Result<Json<WhatIfReport>, ApiError> {
    if slot(&name)? != Slot::OrderRules {
        return Err(ApiError::bad_request("cannot replay", "what-if runs are for the order-rules slot"));
    }
    let since = whatif::parse_since(&p.since, chrono::Utc::now()).map_err(|m| ApiError::bad_request("bad since", m))?;
    let limit = page_limit(p.limit, whatif::DEFAULT_CASES, whatif::MAX_CASES)?;
    let body = body.map_err(|e| e.into_error(super::PLUGIN_BODY_LIMIT))?;
    if body.is_empty() {
        return Err(ApiError::bad_request("invalid plugin", "the request body is empty; send the component's bytes"));
    }
    match s.engine.what_if(body.to_vec(), since, limit).await {
        Ok(report) => Ok(Json(report)),
        Err(WhatIfError::Plugin(e)) => Err(e.into()),
        Err(WhatIfError::Store(e)) => Err(e.into()),
        Err(e @ (WhatIfError::Busy | WhatIfError::NotRecorded)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "not possible now", e.to_string()))
        }
    }
}

/// Makes the shadow version active.
#[utoipa::path(
    post, path = "/plugins/{slot}/promote",
    responses((status = 200, body = VersionInfo), (status = 409, body = super::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn promote(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<VersionInfo>, ApiError> {
    let slot = slot(&name)?;
    Ok(Json(s.engine.change_plugins(slot, move |r| async move { r.promote(slot).await }).await?))
}

/// Re-activates the version that was active before the current one.
#[utoipa::path(
    post, path = "/plugins/{slot}/rollback",
    responses((status = 200, body = VersionInfo), (status = 409, body = super::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn rollback(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<VersionInfo>, ApiError> {
    let slot = slot(&name)?;
    Ok(Json(s.engine.change_plugins(slot, move |r| async move { r.rollback(slot).await }).await?))
}

/// Makes any stored version of the slot active.
#[utoipa::path(
    post, path = "/plugins/{slot}/versions/{version}/activate",
    responses(
        (status = 200, body = VersionInfo), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody)
    ),
    security(("bearer" = []))
)]
pub async fn activate(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, u64)>,
) -> Result<Json<VersionInfo>, ApiError> {
    let slot = slot(&name)?;
    Ok(Json(s.engine.change_plugins(slot, move |r| async move { r.activate(slot, version).await }).await?))
}

/// Stops the shadow run without promoting it.
#[utoipa::path(
    delete, path = "/plugins/{slot}/shadow",
    responses((status = 204), (status = 409, body = super::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn discard(State(s): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let slot = slot(&name)?;
    s.engine.change_plugins(slot, move |r| async move { r.discard_shadow(slot).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// How the shadow version's decisions compare with the active version's.
#[utoipa::path(
    get, path = "/plugins/{slot}/shadow-report",
    responses((status = 200, body = ShadowReport), (status = 409, body = super::ErrorBody))
)]
pub async fn shadow_report(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ShadowReport>, ApiError> {
    Ok(Json(registry(&s)?.shadow_report(slot(&name)?)?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
    cursor: Option<String>,
}

/// Dead letters, oldest first.
#[utoipa::path(get, path = "/dead-letters", params(PageParams), responses((status = 200, body = Page<DeadLetter>)))]
pub async fn dead_letters(
    State(s): State<AppState>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<axum::response::Response, ApiError> {
    let limit = page_limit(p.limit, 100, 1000)?;
    super::pages::capped(s.config.max_page_bytes, limit, |n| s.engine.dead_letters(n, p.cursor.clone())).await
}

#[derive(Serialize, ToSchema)]
pub struct Replayed {
    /// The id the replayed event got: the dead letter's id, suffixed `#replay`.
    event_id: String,
}

/// Sends a dead-lettered event through the pipeline again, once.
#[utoipa::path(
    post, path = "/dead-letters/{id}/replay",
    responses(
        (status = 202, body = Replayed), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody), (status = 400, body = super::ErrorBody)
    ),
    security(("bearer" = []))
)]
pub async fn replay(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Replayed>), ApiError> {
    let event = s.engine.replay(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(Replayed { event_id: event.event_id })))
}

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::NotFound => ApiError::not_found("dead letter not found"),
            ReplayError::AlreadyReplayed(at) => {
                ApiError::new(StatusCode::CONFLICT, "already replayed", json!({ "replayed_at": at }))
            }
            e @ ReplayError::AlreadyApplied(_) => {
                ApiError::new(StatusCode::CONFLICT, "already applied", json!({ "reason": e.to_string() }))
            }
            ReplayError::NotAnEvent(m) => ApiError::bad_request("cannot replay", m),
            ReplayError::Ingest(e) => e.into(),
            ReplayError::Store(e) => e.into(),
        }
    }
}

/// `POST /dead-letters/replay`: which letters, and how many at most.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkReplayRequest {
    /// Most letters to replay, 1 to 1000: the number an operator confirms.
    limit: u64,
    /// Only letters of this stage (decode, rules, resolver, store, webhook).
    #[serde(default)]
    stage: Option<String>,
    /// Only letters of this kind of failure (`error_type`).
    #[serde(default)]
    error_type: Option<String>,
    /// Only letters of orders whose id starts with this.
    #[serde(default)]
    order_prefix: Option<String>,
    /// Go on from an earlier answer's `next_cursor`.
    #[serde(default)]
    cursor: Option<String>,
}

/// Most letters one bulk replay sends, or one purge deletes.
const BULK_REPLAY_MAX: u64 = 1000;

/// The filter of a bulk request, once its `limit` is checked.
fn selection(
    limit: u64,
    stage: Option<String>,
    error_type: Option<String>,
    order_prefix: Option<String>,
) -> Result<(LetterFilter, usize), ApiError> {
    if !(1..=BULK_REPLAY_MAX).contains(&limit) {
        let hint = format!("limit is the most letters to take: 1 to {BULK_REPLAY_MAX}, got {limit}");
        return Err(ApiError::bad_request("invalid limit", hint));
    }
    Ok((LetterFilter { stage, error_type, order_prefix }, limit as usize))
}

/// Replays, oldest first, the dead letters a filter matches that were not replayed yet,
/// up to `limit`. A letter that cannot be replayed is reported with why and the rest go
/// on; at most 100,000 letters are looked at per request (`next_cursor` goes on).
#[utoipa::path(
    post, path = "/dead-letters/replay", request_body = BulkReplayRequest,
    responses(
        (status = 200, body = BulkReplay), (status = 400, body = super::ErrorBody),
        (status = 401, body = super::ErrorBody), (status = 503, body = super::ErrorBody)
    ),
    security(("bearer" = []))
)]
pub async fn replay_many(State(s): State<AppState>, JsonBytes(body): JsonBytes) -> Result<Json<BulkReplay>, ApiError> {
    let request: BulkReplayRequest = parse_json(&body, "bulk replay request")?;
    let (filter, limit) = selection(request.limit, request.stage, request.error_type, request.order_prefix)?;
    Ok(Json(s.engine.replay_matching(&filter, limit, request.cursor).await?))
}

/// `POST /dead-letters/purge`: which letters to delete for good, and how many at most.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkPurgeRequest {
    /// Most letters to delete, 1 to 1000: the number an operator confirms.
    limit: u64,
    /// Only letters of this stage (decode, rules, resolver, store, webhook).
    #[serde(default)]
    stage: Option<String>,
    /// Only letters of this kind of failure (`error_type`).
    #[serde(default)]
    error_type: Option<String>,
    /// Only letters of orders whose id starts with this.
    #[serde(default)]
    order_prefix: Option<String>,
    /// Only letters replayed already (true) or not replayed (false); both when absent.
    #[serde(default)]
    replayed: Option<bool>,
    /// Go on from an earlier answer's `next_cursor`.
    #[serde(default)]
    cursor: Option<String>,
}

/// Deletes for good, oldest first, the dead letters a filter matches, up to `limit`: an
/// operator's decision that they need nothing more. Audited with the token's name; at
/// most 100,000 letters are looked at per request (`next_cursor` goes on).
#[utoipa::path(
    post, path = "/dead-letters/purge", request_body = BulkPurgeRequest,
    responses(
        (status = 200, body = BulkPurge), (status = 400, body = super::ErrorBody),
        (status = 401, body = super::ErrorBody), (status = 503, body = super::ErrorBody)
    ),
    security(("bearer" = []))
)]
pub async fn purge_many(State(s): State<AppState>, JsonBytes(body): JsonBytes) -> Result<Json<BulkPurge>, ApiError> {
    let request: BulkPurgeRequest = parse_json(&body, "purge request")?;
    let (filter, limit) = selection(request.limit, request.stage, request.error_type, request.order_prefix)?;
    Ok(Json(s.engine.purge_matching(&filter, request.replayed, limit, request.cursor).await?))
}
