//! The API's edges: every error is JSON with an object or null `detail`, page sizes are
//! bounded, `If-Match` is compared strongly, run mixes cannot wrap, upload limits name
//! themselves, and the data files are private.

mod common;

use common::{Server, TOKEN, authorized, client, created};
use serde_json::{Value, json};

async fn answer(r: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = r.status().as_u16();
    let content_type = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text:?}"));
    (status, content_type, body)
}

/// The answer is a JSON error: `error` a string, `detail` an object or null.
fn assert_error(what: &str, (status, content_type, body): &(u16, Option<String>, Value), expected: u16) {
    assert_eq!(*status, expected, "{what}: {body}");
    assert!(content_type.as_deref().is_some_and(|c| c.starts_with("application/json")), "{what}: {content_type:?}");
    assert!(body["error"].is_string(), "{what}: {body}");
    assert!(body["detail"].is_object() || body["detail"].is_null(), "{what}: detail {body}");
}

/// Each of these answered plain text or an empty body before.
#[tokio::test]
async fn every_error_is_json_with_an_object_detail() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let c = authorized();
    let get = |path: &str| c.get(s.url(path)).send();
    for path in ["/dead-letters?limit=abc", "/webhooks/deliveries?limit=abc", "/orders/%FF%FE", "/ws"] {
        assert_error(path, &answer(get(path).await.unwrap()).await, 400);
    }
    let shadow = c.put(s.url("/plugins/order-rules?shadow=maybe")).body(vec![0u8; 8]).send().await.unwrap();
    assert_error("shadow=maybe", &answer(shadow).await, 400);
    let missing = answer(get("/no/such/route").await.unwrap()).await;
    assert_error("an unknown route", &missing, 404);
    assert_eq!(missing.2["detail"]["path"], "/no/such/route");
    let wrong_method = c.delete(s.url("/orders")).send().await.unwrap();
    assert!(wrong_method.headers().contains_key("allow"), "405 keeps its Allow header");
    assert_error("DELETE /orders", &answer(wrong_method).await, 405);
    // Errors the handlers raise with a message carry it as detail.message.
    let bad = c.post(s.url("/orders/events")).header("content-type", "application/json").body("{").send().await;
    let bad = answer(bad.unwrap()).await;
    assert_error("malformed JSON", &bad, 400);
    assert!(bad.2["detail"]["message"].as_str().unwrap().contains("EOF"), "{}", bad.2);
    // The dashboard's pages load the app.
    let page = client().get(s.url("/ui/orders/o-1")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<html"));
}

/// `limit=0` and `limit=99999999999` were accepted; now every page size outside its
/// range is refused, and the answer says the range.
#[tokio::test]
async fn page_sizes_outside_their_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let c = authorized();
    let routes =
        [("/orders", 1000), ("/dead-letters", 1000), ("/webhooks/deliveries", 1000), ("/audit", 1000), ("/runs", 100)];
    for (path, max) in routes.into_iter().chain([("/logs", 500)]) {
        for limit in ["0", "99999999999", &(max + 1).to_string()] {
            let r = answer(c.get(s.url(&format!("{path}?limit={limit}"))).send().await.unwrap()).await;
            assert_error(&format!("{path}?limit={limit}"), &r, 400);
            assert_eq!(r.2["detail"]["allowed"], format!("1..={max}"), "{path}");
        }
        let ok = c.get(s.url(&format!("{path}?limit={max}"))).send().await.unwrap();
        assert_eq!(ok.status(), 200, "{path}?limit={max}");
    }
}

/// `If-Match: W/"1"` was accepted; RFC 9110 compares If-Match strongly, so a weak tag
/// never matches (412). The ETag as given, and a bare version, do; so does a list that
/// names the current version, and `*` (refused with 400 before).
#[tokio::test]
async fn if_match_is_compared_strongly() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    assert_eq!(s.post_events(&created("m-1", "m-1", "GOLD", 100)).await.status(), 202);
    s.drain(std::time::Duration::from_secs(30)).await;
    let patch = |tag: &'static str, note: &'static str| {
        authorized().patch(s.url("/orders/m-1")).header("if-match", tag).json(&json!({ "note": note })).send()
    };
    assert_error("a weak tag", &answer(patch("W/\"1\"", "weak").await.unwrap()).await, 412);
    let strong = patch("\"1\"", "strong").await.unwrap();
    assert_eq!(strong.status(), 200);
    assert_eq!(strong.headers()["etag"], "\"2\"");
    assert_eq!(patch("2", "bare").await.unwrap().status(), 200);
    // A list matches when it names the current version (RFC 9110): here 3.
    let listed = patch("\"9\", \"3\"", "listed").await.unwrap();
    assert_eq!((listed.status().as_u16(), listed.headers()["etag"].to_str().unwrap()), (200, "\"4\""));
    let stale = answer(patch("\"1\", \"2\"", "stale list").await.unwrap()).await;
    assert_error("a list without the current version", &stale, 409);
    assert_eq!(stale.2["current"]["version"], 4, "{}", stale.2);
    assert_error("a weak tag in a list", &answer(patch("\"4\", W/\"4\"", "weak").await.unwrap()).await, 412);
    // `*` matches any version of an existing order, and no missing one.
    let any = patch("*", "any").await.unwrap();
    assert_eq!((any.status().as_u16(), any.headers()["etag"].to_str().unwrap()), (200, "\"5\""));
    let missing = authorized().patch(s.url("/orders/nope")).header("if-match", "*").json(&json!({"note": "x"}));
    assert_error("* on a missing order", &answer(missing.send().await.unwrap()).await, 404);
    let (_, row) = s.get_json("/orders/m-1").await;
    assert_eq!((row["note"].as_str(), row["version"].as_u64()), (Some("any"), Some(5)), "{row}");
}

/// A tier mix whose shares wrap round to 100 in 32 bits got 201; now it is refused.
#[tokio::test]
async fn a_tier_mix_cannot_wrap_round_to_100() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let mix = json!({ "DIAMOND": 4294967295u64, "GOLD": 101, "SILVER": 0, "BRONZE": 0 });
    let r = authorized().post(s.url("/runs")).json(&json!({ "quantity": 10, "tier_mix": mix })).send().await;
    let r = answer(r.unwrap()).await;
    assert_error("a wrapping mix", &r, 400);
    assert!(r.2.to_string().contains("4294967396"), "the real sum is named: {}", r.2);
    assert_eq!(s.get_json("/runs").await.1["items"], json!([]), "no run started");
}

/// An upload over the engine's plugin limit names the flag that raises it; one over the
/// route's body limit gets 413 with that route's limit, not the global one.
#[tokio::test]
async fn plugin_upload_limits_name_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let put =
        |bytes: usize| client().put(s.url("/plugins/order-rules")).bearer_auth(TOKEN).body(vec![0u8; bytes]).send();
    // Over the 32 MiB default, under the route's 64 MiB.
    let over_plugin_limit = answer(put(33 << 20).await.unwrap()).await;
    assert_error("over --max-plugin-bytes", &over_plugin_limit, 400);
    assert!(over_plugin_limit.2["detail"]["message"].as_str().unwrap().contains("--max-plugin-bytes"));
    let over_route_limit = answer(put((64 << 20) + 1).await.unwrap()).await;
    assert_error("over the route's limit", &over_route_limit, 413);
    assert_eq!(over_route_limit.2["detail"]["limit_bytes"], 64 << 20);
}

/// The data dir held customer emails readable by any local user (0755, files 0644).
#[tokio::test]
async fn the_data_files_are_private_to_the_engine_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Server::start(&data).await;
    assert_eq!(s.post_events(&created("p-1", "p-1", "GOLD", 100)).await.status(), 202);
    s.drain(std::time::Duration::from_secs(30)).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data dir");
    let mut files = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            files += 1;
        }
    }
    assert!(files >= 4, "log, store, plugins and their WAL files: {files}");
    assert_eq!(mode(&data.join("store.cases.sqlite")), 0o600, "the cases kept for what-if runs");
    // The compiled plugins too (the two built-in ones at least).
    let cache = data.join("plugin-cache");
    assert_eq!(mode(&cache), 0o700, "the compile cache");
    let compiled: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(compiled.len() >= 2, "{compiled:?}");
    for path in compiled {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

/// Reads from `conn` until it closes or `within` passes; returns what came and whether
/// the server closed the connection.
async fn read_until_closed(conn: &mut tokio::net::TcpStream, within: std::time::Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Half-sent headers and trickled bodies held connections open for over a minute; now a
/// client that is too slow is cut off, and one over the connection cap gets a clear 503.
#[tokio::test]
async fn slow_clients_are_cut_off_and_the_connection_cap_answers_503() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let args = ["--header-timeout-secs", "1", "--body-timeout-secs", "1", "--max-connections", "3"];
    let s = Server::start_with(dir.path(), &args).await;
    let connect = || TcpStream::connect(("127.0.0.1", s.port));
    let window = std::time::Duration::from_secs(10);

    // A connection that never sends a byte held its slot for ever.
    let mut silent = connect().await.unwrap();
    let (_, closed) = read_until_closed(&mut silent, window).await;
    assert!(closed, "a silent connection is cut off");

    let mut half = connect().await.unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
    let (_, closed) = read_until_closed(&mut half, window).await;
    assert!(closed, "half-sent headers are cut off");

    // A keep-alive connection that goes quiet after its first answer is cut off too.
    let mut kept = connect().await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let (answer, closed) = read_until_closed(&mut kept, window).await;
    assert!(answer.starts_with("HTTP/1.1 200") && closed, "answered, then closed when idle: {answer:?}");

    let mut trickle = connect().await.unwrap();
    let head = format!(
        "POST /orders/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n["
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let (answer, _) = read_until_closed(&mut trickle, window).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "a trickled body gets 408: {answer:?}");
    assert!(answer.contains("request body too slow"), "{answer}");

    // Three idle connections fill the cap (until their 1 s header timer closes them; the
    // fourth comes at once); the fourth is refused with a readable answer.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect().await.unwrap());
    }
    let mut fourth = connect().await.unwrap();
    let (answer, closed) = read_until_closed(&mut fourth, window).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("too many connections") && closed, "{answer}");
    drop(idle);
    // Once the idle ones are gone, the engine serves again.
    let deadline = std::time::Instant::now() + window;
    while client().get(s.url("/health")).send().await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline, "the engine serves again after the cap");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let metrics = client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("orchestrator_connections_refused_total{reason=\"cap\"} 0"), "{metrics}");
}

/// A client that sent requests and then stopped reading the answers held its connection
/// (and a slot of the cap) until the kernel gave up on it. Now a write that makes no
/// progress for the write timeout closes the connection.
#[tokio::test]
async fn a_client_that_stops_reading_its_answers_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--write-timeout-secs", "1"]).await;
    let events: Vec<Value> = (0..1000).map(|i| created(&format!("w{i}"), &format!("w{i}"), "GOLD", 1_000)).collect();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    s.drain(std::time::Duration::from_secs(10)).await;

    // 200 pipelined pages of 1000 orders (tens of MB), from a socket with a small window.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(([127, 0, 0, 1], s.port).into()).await.unwrap();
    let page = "GET /orders?limit=1000 HTTP/1.1\r\nHost: localhost\r\n\r\n";
    stalled.write_all(page.repeat(200).as_bytes()).await.unwrap();
    // Past the write timeout without reading: the engine gave up on the connection, so
    // what is read now is what the kernel held, then the end.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let (answers, closed) = read_until_closed(&mut stalled, std::time::Duration::from_secs(30)).await;
    let pages = answers.matches("HTTP/1.1 200").count();
    assert!(closed && pages < 200, "closed: {closed}, pages answered: {pages} of 200");
    // Other clients are served as before.
    assert_eq!(client().get(s.url("/health")).send().await.unwrap().status(), 200);
}

/// Each `/ws` client could pin about 64 MiB with an unfinished fragmented message, and
/// clients were not limited. Now inbound messages are capped at a few KiB, and the
/// clients past `--max-ws-clients` get 503.
#[tokio::test]
async fn websocket_clients_are_bounded() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--max-ws-clients", "1"]).await;
    let (mut first, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    match tokio_tungstenite::connect_async(s.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 503);
            let body: Value = serde_json::from_slice(r.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"], "too many feed clients");
        }
        other => panic!("a second client is refused: {other:?}"),
    }
    let refused = r#"orchestrator_connections_refused_total{reason="ws_cap"}"#;
    assert_eq!(common::counter(&s, refused).await, 1, "the refusal is counted");
    // A 64 KiB message closes the socket instead of being buffered.
    first.send(Message::Text("x".repeat(64 << 10).into())).await.unwrap();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(m) = first.next().await {
            match m {
                Ok(Message::Close(_)) | Err(_) => return true,
                Ok(_) => {}
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    assert!(closed, "an oversized message closes the socket");
    // Its place is free again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio_tungstenite::connect_async(s.ws_url()).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the place is given back");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// 1,100 idle sockets exhausted a 1024 open-file soft limit: the engine raises its soft
/// limit to the hard one at start (#13 finding 4). Started here with a soft limit of 512.
#[tokio::test]
async fn the_engine_raises_its_open_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().display().to_string();
    let mut engine = std::process::Command::new("sh")
        .args(["-c", "ulimit -Sn 512 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_orchestrator")])
        .args(["serve", "--listen", &listen, "--data-dir", &data])
        .env_remove("KAFKA_BROKERS")
        .env_remove("CQL_NODES")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while reqwest::get(format!("http://{listen}/health")).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the engine did not start");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", engine.id())).unwrap();
    let _ = engine.kill();
    let _ = engine.wait();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_ne!(soft, "512", "the soft limit was raised: {line}");
    assert_eq!(soft, hard, "to the hard limit: {line}");
}

/// A `/ws` client that never reads holds its buffers only until its sends have been
/// blocked for 10 s; then it is dropped and counted (#13 finding 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_never_reads_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        s.port
    );
    idle.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = [0u8; 256];
    let n = idle.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 101"), "the feed opens");
    // Changes enough to fill the socket's buffers many times over, and never read.
    let dropped = r#"orchestrator_ws_dropped_total{reason="not_reading"}"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut k = 0;
    while common::counter(&s, dropped).await == 0 {
        assert!(std::time::Instant::now() < deadline, "a client that never reads is never dropped");
        if k < 60 {
            let note = "n".repeat(2_000);
            let chunk: Vec<Value> = (0..500)
                .map(|i| {
                    let mut e = created(&format!("w-{k}-{i}"), &format!("w-{k}-{i}"), "GOLD", 100);
                    e["payload"]["note"] = json!(note);
                    e
                })
                .collect();
            assert_eq!(s.post_events(&Value::Array(chunk)).await.status(), 202);
            k += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(s.health().await["status"], "ok");
    drop(idle);
}

/// NUL characters were accepted in notes; control characters are refused in notes (but
/// for newlines and tabs) and customers, by events and by edits, naming the field.
#[tokio::test]
async fn control_characters_are_refused_in_free_text() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let mut nul = created("c-1", "c-1", "GOLD", 100);
    nul["payload"]["note"] = json!("gift\u{0}wrap");
    let r = answer(s.post_events(&nul).await).await;
    assert_error("a NUL in a note", &r, 400);
    assert!(r.2["detail"]["reason"].as_str().unwrap().contains("U+0000"), "{}", r.2);
    let mut bell = created("c-2", "c-2", "GOLD", 100);
    bell["payload"]["customer"] = json!("ada\u{7}@example.com");
    assert_error("a BEL in a customer", &answer(s.post_events(&bell).await).await, 400);
    let mut lines = created("c-3", "c-3", "GOLD", 100);
    lines["payload"]["note"] = json!("line one\nline two\tend");
    assert_eq!(s.post_events(&lines).await.status(), 202);
    s.drain(std::time::Duration::from_secs(30)).await;
    let edit = authorized().patch(s.url("/orders/c-3")).header("if-match", "1").json(&json!({ "note": "a\u{0}b" }));
    let r = answer(edit.send().await.unwrap()).await;
    assert_error("a NUL in an edit", &r, 400);
    assert!(r.2["detail"]["message"].as_str().unwrap().contains("control characters"), "{}", r.2);
}

/// Four concurrent `GET /orders?limit=1000` of long rows returned 126 MB each: pages were
/// bounded by count only. Now a page is bounded by bytes too, and shorter pages still
/// list every order once through `next_cursor`.
#[tokio::test]
async fn list_pages_are_bounded_by_bytes_and_still_list_everything() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--max-page-bytes", "100000"]).await;
    let long = "n".repeat(16 * 1024);
    let events: Vec<Value> = (0..60)
        .map(|i| {
            let mut e = created(&format!("b{i:02}"), &format!("e-b{i}"), "GOLD", 1_000);
            e["payload"]["note"] = json!(long);
            e
        })
        .collect();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    s.drain(std::time::Duration::from_secs(30)).await;

    let (mut seen, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let mut get = authorized().get(s.url("/orders?limit=1000&sort=id"));
        if let Some(c) = &cursor {
            get = get.query(&[("cursor", c)]);
        }
        let body = get.send().await.unwrap().bytes().await.unwrap();
        assert!(body.len() <= 100_000, "a page of {} bytes", body.len());
        let page: Value = serde_json::from_slice(&body).unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(!items.is_empty(), "a page that goes on holds something");
        seen.extend(items.iter().map(|o| o["id"].as_str().unwrap().to_string()));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..60).map(|i| format!("b{i:02}")).collect();
    assert_eq!(seen, expected, "every order once, in order, over {pages} pages");
    assert!(pages >= 10, "about 6 rows of 16 KiB fit in 100 kB: {pages} pages");
}
