//! Where a request may come from. A web page can make a browser send requests to a
//! loopback engine: by DNS rebinding (a `Host` that is not ours), by a WebSocket (an
//! `Origin` that is not ours), or by a form post (a body that is not JSON).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, AppState};

/// The host names this engine answers to.
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    /// A loopback bind checks `Host`; other binds rely on tokens.
    loopback_bind: bool,
    /// `--allowed-hosts`, lower case, without ports.
    allowed: Vec<String>,
}

impl Hosts {
    pub fn new(loopback_bind: bool, allowed: &[String]) -> Self {
        let allowed = allowed.iter().map(|h| strip_port(h.trim()).to_ascii_lowercase()).filter(|h| !h.is_empty());
        Self { loopback_bind, allowed: allowed.collect() }
    }

    /// A loopback name (`localhost`, `*.localhost`, 127.0.0.0/8, `::1`) or a configured one.
    fn known(&self, host: &str) -> bool {
        let host = strip_port(host).to_ascii_lowercase();
        let loopback = host == "localhost"
            || host.ends_with(".localhost")
            || host.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        loopback || self.allowed.contains(&host)
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') && (host.starts_with('[') || host[..i].find(':').is_none()) => &host[..i],
        _ => host,
    }
}

/// The host of an `Origin` (`scheme://host[:port]`), or `None` for `null` and garbage.
fn origin_host(origin: &str) -> Option<&str> {
    origin.split_once("://").map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
}

/// Refuses, before routing, a request whose `Host` a loopback engine does not answer to,
/// and a WebSocket upgrade whose `Origin` is neither ours nor allowed.
pub async fn check(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let hosts = &s.config.hosts;
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if hosts.loopback_bind && !hosts.known(host) {
        let detail = json!({
            "host": host,
            "reason": "this engine listens on loopback and answers only to loopback names and --allowed-hosts",
        });
        return ApiError::new(StatusCode::FORBIDDEN, "host not allowed", detail).into_response();
    }
    if req.uri().path() == "/ws"
        && let Some(origin) = req.headers().get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or("");
        // Same origin (the page came from this engine), or a known host.
        let ours = origin_host(origin).is_some_and(|o| o.eq_ignore_ascii_case(host) || hosts.known(o));
        if !ours {
            let detail =
                json!({ "origin": origin, "reason": "the feed accepts pages of this engine and --allowed-hosts" });
            return ApiError::new(StatusCode::FORBIDDEN, "origin not allowed", detail).into_response();
        }
    }
    next.run(req).await
}

/// A request body that is not declared JSON, on a route that reads JSON: refused, so a
/// cross-site form or `text/plain` post never reaches a handler.
pub fn json_body_required(headers: &HeaderMap) -> Result<(), ApiError> {
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0);
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if !has_body || essence == "application/json" || essence.ends_with("+json") {
        return Ok(());
    }
    let detail = json!({ "content_type": content_type, "expected": "application/json" });
    Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "JSON body required", detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_allowed_hosts_are_known() {
        let hosts = Hosts::new(true, &["Orders.Example.com".into()]);
        for ok in
            ["localhost:8080", "127.0.0.1:8080", "127.1.2.3", "[::1]:8080", "app.localhost", "orders.example.com:80"]
        {
            assert!(hosts.known(ok), "{ok}");
        }
        for bad in ["evil.example", "localhost.evil.example", "10.0.0.1:8080", "", "orders.example.com.evil"] {
            assert!(!hosts.known(bad), "{bad}");
        }
    }

    #[test]
    fn ports_come_off_names_and_addresses() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(origin_host("http://localhost:8080"), Some("localhost:8080"));
        assert_eq!(origin_host("null"), None);
    }
}
