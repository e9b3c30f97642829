//! Runs (start, follow, cancel), queue pause and resume, and reset. Every mutating
//! call needs the API token.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiQuery, AppState, ErrorBody, JsonBytes, page_limit, parse_json};
use crate::domain::Priority;
use crate::engine::ResetError;
use crate::runs::RunError;
use crate::runs::model::{CancelRequest, Run, RunRequest};
use crate::store::Page;

impl From<RunError> for ApiError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Invalid(m) => ApiError::bad_request("invalid run", m),
            RunError::Active(id) => {
                ApiError::new(StatusCode::CONFLICT, "a run is already active", json!({ "run_id": id }))
            }
            RunError::Ended(id) => {
                ApiError::new(StatusCode::CONFLICT, "the run has already ended", json!({ "run_id": id }))
            }
            RunError::NotFound => ApiError::not_found("run not found"),
            RunError::Store(e) => e.into(),
            RunError::Switch(e) => {
                let what = "a switch every instance must see (a run's hold or purge) was not kept; retry";
                let mut err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, what, e.to_string());
                err.retry_after = Some(5);
                err
            }
            RunError::Reset(ResetError::Store(e)) => e.into(),
            RunError::Reset(e @ (ResetError::Log(_) | ResetError::Cluster(_) | ResetError::NotStopped(_))) => {
                let mut err =
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the reset did not finish; retry", e.to_string());
                err.retry_after = Some(5);
                err
            }
        }
    }
}

/// Starts a generated run of `quantity` orders through the normal pipeline.
#[utoipa::path(
    post, path = "/runs", request_body = RunRequest,
    responses(
        (status = 201, body = Run), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A run is already active"),
    )
)]
pub async fn start(State(s): State<AppState>, JsonBytes(body): JsonBytes) -> Result<(StatusCode, Json<Run>), ApiError> {
    let request: RunRequest = parse_json(&body, "run request")?;
    Ok((StatusCode::CREATED, Json(s.runs.start(request).await?)))
}

/// The active run (or the last one this instance ran), live.
#[utoipa::path(get, path = "/runs/current", responses((status = 200, body = Run), (status = 404, body = ErrorBody)))]
pub async fn current(State(s): State<AppState>) -> Result<Json<Run>, ApiError> {
    s.runs.current().await.map(Json).ok_or_else(|| ApiError::not_found("no run yet"))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunsParams {
    /// Page size, 1..=100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u64>,
    cursor: Option<String>,
}

/// Run history, newest first.
#[utoipa::path(
    get, path = "/runs", params(RunsParams),
    responses((status = 200, body = Page<Run>), (status = 400, body = ErrorBody))
)]
pub async fn list(
    State(s): State<AppState>,
    ApiQuery(p): ApiQuery<RunsParams>,
) -> Result<axum::response::Response, ApiError> {
    let limit = page_limit(p.limit, 20, 100)?;
    super::pages::capped(s.config.max_page_bytes, limit, |n| s.runs.list(n, p.cursor.clone())).await
}

#[utoipa::path(get, path = "/runs/{id}", responses((status = 200, body = Run), (status = 404, body = ErrorBody)))]
pub async fn get(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Run>, ApiError> {
    Ok(Json(s.runs.get(&id).await?))
}

/// Cancels an active run. `purge` discards its events still on the log;
/// `delete_pending` deletes its stored orders still PENDING. The run's `cancel` says what was done.
#[utoipa::path(
    post, path = "/runs/{id}/cancel", request_body = CancelRequest,
    responses(
        (status = 200, body = Run), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The run has already ended"),
    )
)]
pub async fn cancel(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBytes(body): JsonBytes,
) -> Result<Json<Run>, ApiError> {
    let request: CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        parse_json(&body, "cancel request")?
    };
    Ok(Json(s.runs.cancel(&id, request).await?))
}

#[derive(Serialize, ToSchema)]
pub struct QueueState {
    priority: Priority,
    /// Paused by an operator.
    paused: bool,
    /// Held by the active run (NORMAL waits for the run's VIP orders).
    held_by_run: bool,
}

async fn queue(s: &AppState, name: &str, paused: Option<bool>) -> Result<Json<QueueState>, ApiError> {
    let priority = Priority::parse(&name.to_ascii_uppercase())
        .ok_or_else(|| ApiError::not_found(format!("no queue {name:?}; queues are vip and normal")))?;
    if let Some(p) = paused {
        s.engine.set_pause(priority, p).await.map_err(|e| {
            let mut err =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the pause was not kept; retry", e.to_string());
            err.retry_after = Some(5);
            err
        })?;
    }
    Ok(Json(QueueState {
        priority,
        paused: s.engine.pauses().operator_paused(priority),
        held_by_run: s.engine.pauses().held(priority),
    }))
}

/// Stops consuming one priority on every instance, until resumed (restarts included);
/// queued events wait on the log, and the other priority goes on.
#[utoipa::path(
    post, path = "/queues/{priority}/pause",
    responses((status = 200, body = QueueState), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn pause(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<QueueState>, ApiError> {
    queue(&s, &name, Some(true)).await
}

#[utoipa::path(
    post, path = "/queues/{priority}/resume",
    responses((status = 200, body = QueueState), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn resume(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<QueueState>, ApiError> {
    queue(&s, &name, Some(false)).await
}

#[utoipa::path(
    get, path = "/queues/{priority}",
    responses((status = 200, body = QueueState), (status = 404, body = ErrorBody))
)]
pub async fn queue_state(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<QueueState>, ApiError> {
    queue(&s, &name, None).await
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ResetRequest {
    /// Must be exactly "reset".
    confirm: String,
}

/// Deletes every queued event, order, history entry, run and dead letter. Refused while a run is active.
#[utoipa::path(
    post, path = "/reset", request_body = ResetRequest,
    responses(
        (status = 200, description = "Emptied"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A run is active"),
    )
)]
pub async fn reset(State(s): State<AppState>, JsonBytes(body): JsonBytes) -> Result<Json<serde_json::Value>, ApiError> {
    let request: ResetRequest = parse_json(&body, "reset request")?;
    if request.confirm != "reset" {
        return Err(ApiError::bad_request("reset not confirmed", r#"send {"confirm": "reset"}"#));
    }
    s.runs.reset().await?;
    Ok(Json(json!({ "reset": true })))
}
