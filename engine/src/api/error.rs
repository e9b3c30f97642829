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
    /// Specifics, an object or null: `message` (the parser's words), the offending
    /// `index`, the `limit_bytes`, ...
    #[schema(value_type = Option<Object>)]
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
    /// A `detail` that is not an object or null becomes `{"message": detail}`, so clients
    /// read one shape.
    pub fn new(status: StatusCode, error: impl Into<String>, detail: impl Into<Value>) -> Self {
        let detail = match detail.into() {
            d @ (Value::Object(_) | Value::Null) => d,
            other => serde_json::json!({ "message": other }),
        };
        Self { status, error: error.into(), detail, current: None, retry_after: None }
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
            other => Self::unavailable("store unavailable", other.to_string(), other.is_transient()),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Invalid { index, reason } => {
                Self::bad_request("invalid event", serde_json::json!({ "index": index, "reason": reason }))
            }
            IngestError::Log(e) => Self::unavailable("log unavailable", e.to_string(), e.is_transient()),
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
    /// 503 for a backend that failed. An outage passes: say when to come back. Other
    /// failures stay 503 without a hint, since retrying them soon will not help.
    fn unavailable(error: &str, detail: String, outage: bool) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, error, detail);
        e.retry_after = outage.then_some(1);
        e
    }

    fn with_current(mut self, current: Box<Order>) -> Self {
        self.current = Some(current);
        self
    }
}

/// Answers that did not come from a handler (no route: 404, wrong method: 405, an
/// extractor's plain-text rejection) become JSON like every other error, keeping their
/// status and headers (`Allow` on 405).
pub async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let status = response.status();
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Rejection texts are short; anything longer is cut rather than buffered.
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let error = status.canonical_reason().unwrap_or("error").to_ascii_lowercase();
    let detail = match (status, text.is_empty()) {
        (StatusCode::NOT_FOUND, _) => {
            serde_json::json!({ "path": path, "message": "no such route; see /openapi.json" })
        }
        (_, true) => Value::Null,
        (_, false) => serde_json::json!({ "message": text }),
    };
    let body = ErrorBody { error, detail, current: None };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    Response::from_parts(parts, axum::body::Body::from(serde_json::to_vec(&body).unwrap_or_default()))
}
