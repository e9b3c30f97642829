//! Who may write: every mutating route needs a token of the right role, reads off
//! loopback need one too, and operator and admin actions are audited.

mod common;

use std::io::Write;

use common::{Server, TOKEN, client, created, orchestrator};
use serde_json::{Value, json};

const PRODUCER: &str = "producer-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";

/// A private tokens file with a producer and an operator.
fn tokens_file(dir: &std::path::Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("tokens");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "# name role token\nshop-bridge producer {PRODUCER}\n\nalice operator {OPERATOR}").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_string()
}

async fn send(s: &Server, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method.parse().unwrap(), s.url(path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The reproduction: with a token set, a tokenless PATCH cancelled an order and a
/// tokenless POST appended events. Now both are refused, and nothing changes.
#[tokio::test]
async fn writes_without_a_token_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    assert_eq!(s.post_events(&created("a-1", "a-1", "GOLD", 100)).await.status(), 202);
    s.drain(std::time::Duration::from_secs(30)).await;

    let (status, body) = send(&s, "POST", "/orders/events", None, Some(created("a-2", "a-2", "GOLD", 100))).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "API token required");
    let cancel = json!({ "status": "CANCELLED" });
    let (status, _) = send(&s, "PATCH", "/orders/a-1", None, Some(cancel.clone())).await;
    assert_eq!(status, 401);
    let (status, body) = send(&s, "PATCH", "/orders/a-1", Some("not-a-token"), Some(cancel)).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid API token")));
    s.drain(std::time::Duration::from_secs(30)).await;
    let (_, order) = s.get_json("/orders/a-1").await;
    assert_ne!(order["status"], "CANCELLED");
    assert_eq!(s.get_json("/orders/a-2").await.0, 404);
    // A stale token or a proxy's Basic header does not close what needs no token.
    for header in ["Bearer stale-token", "Basic dXNlcjpwYXNz"] {
        for path in ["/health", "/metrics", "/orders/a-1"] {
            let r = client().get(s.url(path)).header("authorization", header).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path} with {header}");
        }
    }
    let r = client().post(s.url("/orders/events")).json(&created("a-3", "a-3", "GOLD", 1)).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer", "a 401 names its scheme");
    // RFC 9110: the scheme is case-insensitive.
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let r = client()
            .post(s.url("/orders/events"))
            .header("authorization", format!("{scheme} {TOKEN}"))
            .json(&created(&format!("a-{scheme}"), &format!("a-{scheme}"), "GOLD", 100))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "scheme {scheme}");
    }
}

/// Each role may do its own work and what the roles below it may, nothing more; every
/// operator and admin action, allowed or not, lands in the audit with the token's name.
#[tokio::test]
async fn roles_limit_what_a_token_may_do_and_actions_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let s = Server::start_with(&dir.path().join("data"), &["--tokens-file", &tokens]).await;

    let (status, _) =
        send(&s, "POST", "/orders/events", Some(PRODUCER), Some(created("r-1", "r-1", "GOLD", 100))).await;
    assert_eq!(status, 202, "a producer ingests");
    s.drain(std::time::Duration::from_secs(30)).await;
    let edit = json!({ "note": "by alice" });
    let patch = |token: &'static str| {
        let (s, edit) = (&s, edit.clone());
        async move {
            let r = client()
                .patch(s.url("/orders/r-1"))
                .header("authorization", format!("Bearer {token}"))
                .header("if-match", "1")
                .json(&edit)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = patch(PRODUCER).await;
    assert_eq!(status, 403, "a producer may not edit: {body}");
    assert_eq!(body["detail"], json!({ "token": "shop-bridge", "role": "producer", "needs": "operator" }));
    assert_eq!(patch(OPERATOR).await.0, 200, "an operator edits");
    let (status, _) =
        send(&s, "POST", "/orders/events", Some(OPERATOR), Some(created("r-2", "r-2", "GOLD", 100))).await;
    assert_eq!(status, 202, "an operator may also ingest");
    assert_eq!(send(&s, "POST", "/queues/vip/pause", Some(OPERATOR), None).await.0, 200);
    assert_eq!(send(&s, "POST", "/queues/vip/resume", Some(OPERATOR), None).await.0, 200);
    assert_eq!(send(&s, "POST", "/reset", Some(OPERATOR), Some(json!({ "confirm": "reset" }))).await.0, 403);
    assert_eq!(send(&s, "POST", "/plugins/order-rules/rollback", Some(PRODUCER), None).await.0, 403);
    assert_eq!(send(&s, "POST", "/plugins/order-rules/rollback", Some(TOKEN), None).await.0, 409, "admin passes");

    let (status, audit) = s.get_json("/audit?limit=1000").await;
    assert_eq!(status, 200);
    let seen: Vec<(String, String, String, u64, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let text = |k: &str| a[k].as_str().unwrap().to_string();
            (text("token"), text("action"), text("target"), a["status"].as_u64().unwrap(), text("outcome"))
        })
        .collect();
    let expected = [
        ("admin", "POST /plugins/{slot}/rollback", "/plugins/order-rules/rollback", 409, "refused"),
        ("alice", "POST /reset", "/reset", 403, "refused"),
        ("alice", "POST /queues/{priority}/resume", "/queues/vip/resume", 200, "done"),
        ("alice", "POST /queues/{priority}/pause", "/queues/vip/pause", 200, "done"),
        ("alice", "PATCH /orders/{id}", "/orders/r-1", 200, "done"),
    ]
    .map(|(t, a, g, st, o)| (t.to_string(), a.to_string(), g.to_string(), st, o.to_string()));
    assert_eq!(seen, expected, "newest first; neither ingest nor a producer's refusals are audited");
    assert!(audit["items"][0]["at"].as_str().is_some_and(|t| t.starts_with("20")));
}

/// Off loopback, reads of orders, history, dead letters, the audit and the feed need an
/// operator token; health and metrics stay open.
#[tokio::test]
async fn reads_off_loopback_need_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let port = std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    let listen = format!("0.0.0.0:{port}");
    let admin = "admin-token-0123456789abcdef";
    let mut child = orchestrator()
        .args(["serve", "--listen", &listen, "--tokens-file", &tokens, "--data-dir"])
        .arg(dir.path().join("data"))
        .env("ORCHESTRATOR_API_TOKEN", admin)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while c.get(format!("{base}/health")).send().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the engine did not start");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let get = |path: &'static str, token: Option<&'static str>| {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let mut req = c.get(format!("{base}{path}"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    for path in ["/orders", "/orders/x/history", "/dead-letters", "/audit", "/webhooks/deliveries", "/ws"] {
        assert_eq!(get(path, None).await, 401, "{path} without a token");
        assert_eq!(get(path, Some(PRODUCER)).await, 403, "{path} as a producer");
    }
    for path in ["/orders", "/dead-letters", "/audit"] {
        assert_eq!(get(path, Some(OPERATOR)).await, 200, "{path} as an operator");
        assert_eq!(get(path, Some(admin)).await, 200, "{path} as the admin");
    }
    for path in ["/health", "/metrics", "/openapi.json"] {
        assert_eq!(get(path, None).await, 200, "{path} stays open");
    }
    // The dashboard's feed: a browser cannot set headers on a WebSocket, so it offers
    // the token as a subprotocol, and the engine selects its own.
    for (token, expected) in [(OPERATOR, "101"), ("wrong-token-0123456789", "401")] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: orchestrator, bearer.{}\r\n\r\n",
            token.bytes().map(|b| format!("{b:02x}")).collect::<String>()
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = conn.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase();
        assert!(answer.lines().next().unwrap().contains(expected), "{answer}");
        if expected == "101" {
            assert!(answer.contains("sec-websocket-protocol: orchestrator\r\n"), "{answer}");
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A tokens file that other users can read is refused at start, naming the fix.
#[test]
fn an_exposed_tokens_file_stops_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = orchestrator()
        .args(["serve", "--listen", "127.0.0.1:0", "--tokens-file", &tokens, "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

/// Sends one raw HTTP/1.1 request and returns the status line: a test of what a browser
/// could send, without a client library's defaults in the way.
async fn raw(s: &Server, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or("").to_string()
}

/// Cross-site writes and DNS rebinding on the default loopback bind: a text/plain or form
/// post, a foreign `Host`, and a WebSocket from a foreign `Origin` are all refused. With
/// `--allowed-hosts` (a reverse proxy brings others in) reads need a token, as they do
/// when a proxy says it forwarded the request (on main both were open).
#[tokio::test]
async fn a_web_page_cannot_reach_a_loopback_engine() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--allowed-hosts", "orders.example.com"]).await;
    let body = created("x-1", "x-1", "GOLD", 100).to_string();
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let r = client()
            .post(s.url("/orders/events"))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{content_type}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["error"], "JSON body required");
    }
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    let get =
        |host: &str, token: &str| format!("GET /orders HTTP/1.1\r\nHost: {host}\r\n{token}Connection: close\r\n\r\n");
    assert!(raw(&s, get("evil.example", &bearer)).await.contains("403"), "a rebound name");
    assert!(raw(&s, get("evil.example:80", &bearer)).await.contains("403"));
    assert!(raw(&s, get(&format!("localhost:{}", s.port), &bearer)).await.contains("200"));
    assert!(raw(&s, get("orders.example.com", &bearer)).await.contains("200"), "an allowed host");
    assert!(raw(&s, get("orders.example.com", "")).await.contains("401"), "a read through the proxy");
    assert!(raw(&s, get("localhost", "")).await.contains("401"), "reads need a token once a proxy is set up");
    let upgrade = |origin: Option<&str>| {
        let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
        format!(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{origin}{bearer}Connection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            s.port
        )
    };
    assert!(raw(&s, upgrade(Some("http://evil.example"))).await.contains("403"), "a foreign page's socket");
    assert!(raw(&s, upgrade(Some("null"))).await.contains("403"), "a sandboxed page's socket");
    assert!(raw(&s, upgrade(Some(&format!("http://127.0.0.1:{}", s.port)))).await.contains("101"), "the dashboard");
    assert!(raw(&s, upgrade(None)).await.contains("101"), "a client that is not a browser");

    // Without --allowed-hosts reads are open on loopback, but not to what a proxy forwarded.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = Server::start(plain_dir.path()).await;
    let read =
        |forwarded: &str| format!("GET /orders HTTP/1.1\r\nHost: localhost\r\n{forwarded}Connection: close\r\n\r\n");
    assert!(raw(&plain, read("")).await.contains("200"), "a local user's read");
    for header in ["X-Forwarded-For: 203.0.113.9\r\n", "Forwarded: for=203.0.113.9\r\n", "X-Real-IP: 203.0.113.9\r\n"] {
        assert!(raw(&plain, read(header)).await.contains("401"), "{header}");
    }
}
