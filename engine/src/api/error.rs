//! The API's error body: `{"error": "...", "detail": ...}` with the right status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::Order;
use crate::engine::{EditError, IngestError};
use crate::store::StoreError;

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A short human-readable summary.
    pub error: String,
    /// Specifics: the parser's message, the offending index, the current row, ...
    #[schema(value_type = Object)]
    pub detail: Value,
    /// On 409 for a stale version: the row as it is now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<Order>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub detail: Value,
    /// Boxed: a whole row would make every `Result<_, ApiError>` large.
    pub current: Option<Box<Order>>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>, detail: impl Into<Value>) -> Self {
        Self { status, error: error.into(), detail: detail.into(), current: None, retry_after: None }
    }

    pub fn bad_request(error: impl Into<String>, detail: impl Into<Value>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, detail)
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, what, Value::Null)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.error, detail = %self.detail, "request failed");
        }
        let mut response = (
            self.status,
            Json(ErrorBody { error: self.error, detail: self.detail, current: self.current.map(|c| *c) }),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Cursor(m) => Self::bad_request("invalid cursor", m),
            other => {
                let transient = other.is_transient();
                let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "store unavailable", other.to_string());
                // An outage passes: say when to come back. Other store failures stay 503
                // without a hint, since retrying them soon will not help.
                e.retry_after = transient.then_some(1);
                e
            }
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Invalid { index, reason } => {
                Self::bad_request("invalid event", serde_json::json!({ "index": index, "reason": reason }))
            }
            IngestError::Log(e) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "log unavailable", e.to_string()),
            IngestError::Store(e) => e.into(),
        }
    }
}

impl From<EditError> for ApiError {
    fn from(e: EditError) -> Self {
        match e {
            EditError::NotFound => Self::not_found("order not found"),
            EditError::Stale { expected, current } => {
                let detail = serde_json::json!({ "expected": expected, "current_version": current.version });
                Self::new(StatusCode::CONFLICT, "stale version", detail).with_current(current)
            }
            EditError::Invalid(m) => Self::bad_request("invalid edit", m),
            EditError::Store(e) => e.into(),
        }
    }
}

impl ApiError {
    fn with_current(mut self, current: Box<Order>) -> Self {
        self.current = Some(current);
        self
    }
}
