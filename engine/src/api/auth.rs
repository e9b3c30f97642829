//! Who may call what: named bearer tokens with roles, the route policy that says which
//! role each route needs, the guard that enforces it, and the audit of what operators and
//! admins did.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::{ApiError, AppState};
use crate::failure::{Failure, FailureKind, Stage};
use crate::store::ActionRecord;
use crate::telemetry;

/// What a token may do. Each role includes the ones before it: an operator may also
/// ingest, an admin may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Appends order events (`POST /orders/events`).
    Producer,
    /// Edits orders, runs, pauses queues, replays dead letters, and reads orders off loopback.
    Operator,
    /// Deploys plugins and resets the store.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "producer" => Some(Role::Producer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// What a route needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health, metrics, the API document, the dashboard's files, and the
    /// Shopify webhook (its HMAC is checked by the handler).
    Open,
    /// A read of orders, history, dead letters, runs or the feed: open on a loopback
    /// bind without `--allowed-hosts` to requests no proxy forwarded, an operator token
    /// otherwise (rows hold customer emails).
    Read,
    /// A write: a token of at least this role. Operator and admin writes are audited.
    Role(Role),
}

/// Every route and what it needs; the guard refuses a route missing here (fail closed),
/// and a test checks the table against the router.
pub const POLICY: &[(&str, &str, Need)] = &[
    ("GET", "/health", Need::Open),
    ("GET", "/metrics", Need::Open),
    ("GET", "/openapi.json", Need::Open),
    ("GET", "/", Need::Open),
    ("GET", "/dashboard", Need::Open),
    ("GET", "/ui", Need::Open),
    ("GET", "/ui/{*page}", Need::Open),
    ("GET", "/dashboard/dashboard.js", Need::Open),
    ("GET", "/dashboard/dashboard_bg.wasm", Need::Open),
    ("GET", "/dashboard/style.css", Need::Open),
    ("POST", "/webhooks/shopify", Need::Open),
    ("POST", "/shopify/reconcile", Need::Role(Role::Operator)),
    ("GET", "/shopify/shops/{shop}", Need::Read),
    // Exports hold what customers asked about: a token always, and each read audited.
    ("GET", "/shopify/compliance", Need::Role(Role::Operator)),
    ("GET", "/shopify/compliance/{id}", Need::Role(Role::Operator)),
    ("POST", "/shopify/compliance/{id}/retry", Need::Role(Role::Operator)),
    ("POST", "/shopify/shops/{shop}/activate", Need::Role(Role::Operator)),
    ("GET", "/logs", Need::Read),
    ("GET", "/orders", Need::Read),
    ("GET", "/order-counts", Need::Read),
    ("GET", "/cluster", Need::Read),
    ("GET", "/orders/{id}", Need::Read),
    ("GET", "/orders/{id}/history", Need::Read),
    ("GET", "/orders/{id}/journey", Need::Read),
    ("GET", "/ws", Need::Read),
    ("GET", "/plugins", Need::Read),
    ("GET", "/plugins/{slot}/shadow-report", Need::Read),
    ("GET", "/dead-letters", Need::Read),
    ("GET", "/runs", Need::Read),
    ("GET", "/runs/current", Need::Read),
    ("GET", "/runs/{id}", Need::Read),
    ("GET", "/queues/{priority}", Need::Read),
    ("GET", "/webhooks/deliveries", Need::Read),
    ("GET", "/audit", Need::Read),
    ("POST", "/orders/events", Need::Role(Role::Producer)),
    ("PATCH", "/orders/{id}", Need::Role(Role::Operator)),
    ("POST", "/runs", Need::Role(Role::Operator)),
    ("POST", "/runs/{id}/cancel", Need::Role(Role::Operator)),
    ("POST", "/queues/{priority}/pause", Need::Role(Role::Operator)),
    ("POST", "/queues/{priority}/resume", Need::Role(Role::Operator)),
    ("POST", "/dead-letters/{id}/replay", Need::Role(Role::Operator)),
    ("POST", "/dead-letters/replay", Need::Role(Role::Operator)),
    ("POST", "/dead-letters/purge", Need::Role(Role::Operator)),
    ("PUT", "/plugins/{slot}", Need::Role(Role::Admin)),
    ("POST", "/plugins/{slot}/replay", Need::Role(Role::Admin)),
    ("POST", "/plugins/{slot}/promote", Need::Role(Role::Admin)),
    ("POST", "/plugins/{slot}/rollback", Need::Role(Role::Admin)),
    ("POST", "/plugins/{slot}/versions/{version}/activate", Need::Role(Role::Admin)),
    ("DELETE", "/plugins/{slot}/shadow", Need::Role(Role::Admin)),
    ("POST", "/reset", Need::Role(Role::Admin)),
];

/// What `route` (a router path) needs for `method`; `None` when the policy lacks it.
pub fn need(method: &Method, route: &str) -> Option<Need> {
    // HEAD is answered by the GET handler, so it needs what GET needs.
    let method = if method == Method::HEAD { "GET" } else { method.as_str() };
    POLICY.iter().find(|(m, r, _)| *m == method && *r == route).map(|(_, _, n)| *n)
}

/// A token, known by its name and kept only as a digest.
struct Token {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// Who called: the name and role of the token they sent.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The engine's tokens, and whether reads are open (a loopback bind).
#[derive(Clone)]
pub struct Access {
    tokens: Arc<Vec<Token>>,
    open_reads: bool,
}

/// Tokens shorter than this are refused: a guessable token is no token.
pub const MIN_TOKEN_LEN: usize = 16;

/// The name in `others` whose token is also `admin`'s: one token cannot be two callers.
pub fn reuses_admin<'a>(admin: &str, others: &'a [(String, Role, String)]) -> Option<&'a str> {
    others.iter().find(|(_, _, t)| t == admin).map(|(n, _, _)| n.as_str())
}

/// Names and roles only: a token never reaches a log line.
impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.tokens.iter().map(|t| (&t.name, t.role)).collect();
        f.debug_struct("Access").field("tokens", &names).field("open_reads", &self.open_reads).finish()
    }
}

impl Access {
    /// `admin` is the token named "admin"; `others` come from a tokens file (which
    /// [`read_tokens_file`] checked, but for the admin token: callers check that with
    /// [`Access::reuses_admin`]).
    pub fn new(admin: &str, others: Vec<(String, Role, String)>, open_reads: bool) -> Self {
        let all = std::iter::once(("admin".to_string(), Role::Admin, admin.to_string())).chain(others);
        let tokens = all.map(|(name, role, token)| Token { name, role, digest: digest(&token) }).collect();
        Self { tokens: Arc::new(tokens), open_reads }
    }

    /// The caller named by the `Authorization` header: `None` without one, an error
    /// for a malformed header or an unknown token.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
        let unauthorized = |error: &str, detail: &str| ApiError::new(StatusCode::UNAUTHORIZED, error, json!(detail));
        let given = match headers.get(header::AUTHORIZATION) {
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|v| v.trim().split_once(' '))
                // RFC 9110: the scheme is case-insensitive.
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .ok_or_else(|| unauthorized("malformed Authorization header", "send Authorization: Bearer <token>"))?,
            // A browser cannot set headers on a WebSocket; the dashboard offers its token
            // as a subprotocol instead.
            None => match websocket_token(headers) {
                Some(token) => return Ok(Some(self.find(&token)?)),
                None => return Ok(None),
            },
        };
        self.find(given).map(Some)
    }

    /// The token's caller. Digests are compared in constant time against every token,
    /// so neither the length nor the bytes of a token leak through timing.
    fn find(&self, given: &str) -> Result<Caller, ApiError> {
        let given = digest(given);
        let mut found = None;
        for t in self.tokens.iter() {
            if bool::from(t.digest.ct_eq(&given)) {
                found = Some(Caller { name: t.name.clone(), role: t.role });
            }
        }
        found.ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "invalid API token", json!("the bearer token matches no token"))
        })
    }
}

/// Whether a proxy says it forwarded the request: its client is not on this machine,
/// whatever `Host` the proxy sent (nginx sends the upstream's, a loopback name).
fn forwarded(headers: &HeaderMap) -> bool {
    ["forwarded", "x-forwarded-for", "x-real-ip"].iter().any(|h| headers.contains_key(*h))
}

/// The subprotocol the dashboard names itself by on `/ws`; the engine selects it.
pub const WS_PROTOCOL: &str = "orchestrator";

/// The token in a `Sec-WebSocket-Protocol: orchestrator, bearer.<token as hex>` offer:
/// hex, because a subprotocol allows only token characters and a token may hold others.
fn websocket_token(headers: &HeaderMap) -> Option<String> {
    let offered = headers.get(header::SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    let hex = offered.split(',').map(str::trim).find_map(|p| p.strip_prefix("bearer."))?;
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
    // Malformed hex is passed on as is, so it is refused as an unknown token.
    Some(bytes.and_then(|b| String::from_utf8(b).ok()).unwrap_or_else(|| hex.to_string()))
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} can be read by other users (mode {mode:o}); run chmod 600 {path}")]
    Exposed { path: String, mode: u32 },
    #[error("{path} line {line}: {reason}")]
    Line { path: String, line: usize, reason: String },
}

/// Refuses a secrets file that other users can read.
pub fn check_private(path: &Path) -> Result<(), TokensFileError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| TokensFileError::Read { path: shown.clone(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokensFileError::Exposed { path: shown, mode });
    }
    Ok(())
}

/// Reads a tokens file: one token per line, `<name> <role> <token>`, where role is
/// producer, operator or admin; blank lines and lines starting with `#` are skipped.
/// The file must be private to the engine's user.
pub fn read_tokens_file(path: &Path) -> Result<Vec<(String, Role, String)>, TokensFileError> {
    check_private(path)?;
    let shown = path.display().to_string();
    let read = |source| TokensFileError::Read { path: shown.clone(), source };
    let text = std::fs::read_to_string(path).map_err(read)?;
    let (mut names, mut tokens, mut out) = (HashSet::new(), HashSet::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: String| TokensFileError::Line { path: shown.clone(), line: i + 1, reason };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, role, token] = fields[..] else {
            return Err(bad(format!("expected `<name> <role> <token>`, found {} fields", fields.len())));
        };
        let role =
            Role::parse(role).ok_or_else(|| bad(format!("unknown role {role:?}; use producer, operator or admin")))?;
        let name_ok = name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return Err(bad("a name is 1 to 64 letters, digits, '.', '_' or '-'".into()));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(bad(format!("the token of {name} is shorter than {MIN_TOKEN_LEN} characters")));
        }
        if name == "admin" || !names.insert(name.to_string()) {
            return Err(bad(format!("the name {name} is taken (\"admin\" is the --api-token)")));
        }
        if !tokens.insert(token.to_string()) {
            return Err(bad(format!("the token of {name} is also another name's token")));
        }
        out.push((name.to_string(), role, token.to_string()));
    }
    Ok(out)
}

/// The guard on every route: checks the caller against [`POLICY`], runs the handler,
/// and audits operator and admin writes with their outcome.
pub async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_default();
    let Some(need) = need(req.method(), &route) else {
        // A known route asked with another method: 405 naming the methods it takes.
        let allowed: Vec<&str> = POLICY.iter().filter(|(_, r, _)| *r == route).map(|(m, _, _)| *m).collect();
        if !allowed.is_empty() {
            let detail = json!({ "method": req.method().as_str(), "allowed": allowed });
            let mut answer =
                ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", detail).into_response();
            if let Ok(v) = allowed.join(", ").parse() {
                answer.headers_mut().insert(header::ALLOW, v);
            }
            return answer;
        }
        tracing::error!(method = %req.method(), route, "a route missing from the access policy was refused");
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            json!({ "reason": "the route has no access policy" }),
        )
        .into_response();
    };
    let action = format!("{} {route}", req.method());
    let access = &s.config.access;
    let needed = match need {
        Need::Open => None,
        Need::Read if access.open_reads && !forwarded(req.headers()) => None,
        Need::Read => Some(Role::Operator),
        Need::Role(r) => Some(r),
    };
    // Where nothing is needed, a credential is not looked at: a stale dashboard token or
    // a proxy's Basic header must not close /health, /metrics or open reads.
    let Some(needed) = needed else { return next.run(req).await };
    let caller = match access.caller(req.headers()) {
        Ok(Some(c)) => c,
        Ok(None) => {
            metrics::counter!(telemetry::AUTH_REFUSED, "reason" => "unauthenticated").increment(1);
            let detail = json!({ "needs": needed.as_str(), "send": "Authorization: Bearer <token>" });
            return challenge(ApiError::new(StatusCode::UNAUTHORIZED, "API token required", detail));
        }
        Err(e) => {
            metrics::counter!(telemetry::AUTH_REFUSED, "reason" => "unauthenticated").increment(1);
            return challenge(e);
        }
    };
    if caller.role < needed {
        metrics::counter!(telemetry::AUTH_REFUSED, "reason" => "forbidden").increment(1);
        let detail = json!({ "token": caller.name, "role": caller.role.as_str(), "needs": needed.as_str() });
        let refused = ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail).into_response();
        // A refusal is audited only for a token that could have done operator work: a
        // producer token probing admin routes must not grow the audit (the metric counts it).
        if caller.role >= Role::Operator {
            audit(&s, &caller, &action, req.uri().path(), refused.status()).await;
        }
        return refused;
    }
    if !matches!(need, Need::Role(r) if r >= Role::Operator) {
        return next.run(req).await;
    }
    // The action and its audit run as their own task: a client that hangs up mid-request
    // must not leave an action done and unaudited.
    let target = req.uri().path().to_string();
    let task = tokio::spawn(async move {
        let response = next.run(req).await;
        audit(&s, &caller, &action, &target, response.status()).await;
        response
    });
    match task.await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "an operator action's task failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error", Value::Null).into_response()
        }
    }
}

/// A 401 with the scheme the client should use (RFC 9110).
fn challenge(e: ApiError) -> Response {
    let mut answer = e.into_response();
    answer.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    answer
}

/// The longest path the audit keeps; longer ones are cut (the route names the action).
const MAX_TARGET_BYTES: usize = 256;

/// Records one operator or admin action. The action has happened: an audit that cannot
/// be written is loud, not fatal.
async fn audit(s: &AppState, caller: &Caller, action: &str, target: &str, status: StatusCode) {
    let mut end = target.len().min(MAX_TARGET_BYTES);
    while !target.is_char_boundary(end) {
        end -= 1;
    }
    let outcome = match status.as_u16() {
        200..=299 => "done",
        500.. => "failed",
        _ => "refused",
    };
    let record = ActionRecord {
        at: Utc::now(),
        token: caller.name.clone(),
        role: caller.role.as_str().into(),
        action: action.to_string(),
        target: target[..end].to_string(),
        status: status.as_u16(),
        outcome: outcome.into(),
    };
    if let Err(e) = s.engine.action_log().record_action(record.clone()).await {
        let why = format!("auditing {} by {}: {e}", record.action, record.token);
        Failure::new(Stage::Audit, FailureKind::Store, why).emit(&record.target);
    }
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi;

    use super::*;

    /// Every documented operation has a policy entry, and every write needs a role.
    #[test]
    fn the_policy_covers_every_documented_route() {
        let doc = super::super::openapi::ApiDoc::openapi();
        let mut checked = 0;
        for (path, item) in doc.paths.paths {
            let ops = [
                ("GET", item.get.is_some()),
                ("POST", item.post.is_some()),
                ("PUT", item.put.is_some()),
                ("PATCH", item.patch.is_some()),
                ("DELETE", item.delete.is_some()),
            ];
            for (method, _) in ops.into_iter().filter(|(_, present)| *present) {
                let need = need(&method.parse().unwrap(), &path);
                assert!(need.is_some(), "{method} {path} has no access policy");
                if method != "GET" && path != "/webhooks/shopify" {
                    assert!(matches!(need, Some(Need::Role(_))), "{method} {path} is a write without a role");
                }
                checked += 1;
            }
        }
        assert!(checked >= 25, "the document lists the API ({checked} operations)");
    }

    #[test]
    fn a_token_is_found_by_its_bytes_and_the_scheme_in_any_case() {
        let access = Access::new("admin-secret", vec![("ci".into(), Role::Producer, "ci-secret".into())], true);
        let caller = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            access.caller(&h).map(|c| c.map(|c| (c.name, c.role))).map_err(|e| e.error)
        };
        assert_eq!(caller("Bearer ci-secret"), Ok(Some(("ci".into(), Role::Producer))));
        assert_eq!(caller("bearer admin-secret"), Ok(Some(("admin".into(), Role::Admin))));
        assert_eq!(caller("Bearer ci-secre"), Err("invalid API token".into()));
        assert_eq!(caller("Basic Y2k6eA=="), Err("malformed Authorization header".into()));
        assert_eq!(access.caller(&HeaderMap::new()).unwrap().map(|c| c.name), None);
    }
}
