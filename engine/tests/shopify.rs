//! The Shopify bridge against the real binary: signatures (with a rotated secret), real
//! payloads, duplicates under concurrency, ignored topics, limits, and the audit.

mod common;

use std::time::{Duration, Instant};

use common::{Server, deliver, history};
use futures::StreamExt;
use orchestrator::shopify::signature::sign;
use serde_json::{Value, json};

const SECRET: &str = "shpss_current";
const OLD: &str = "shpss_previous";
const CREATE: &[u8] = include_bytes!("../src/shopify/fixtures/orders_create.json");

fn update(note: &str) -> Vec<u8> {
    json!({
        "id": 820982911946154508i64,
        "updated_at": "2026-11-21T12:00:00-05:00",
        "note": note,
        "financial_status": "paid",
        "total_price": "598.95",
        "currency": "USD",
        "line_items": [],
        "admin_graphql_api_id": "gid://shopify/Order/820982911946154508"
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_deliveries_become_events_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        dir.path(),
        &["--shopify-secret", SECRET, "--shopify-secret-previous", OLD, "--shopify-max-body-bytes", "8192"],
    )
    .await;

    // Unsigned, wrongly signed, truncated and bit-flipped signatures: 401, never 500.
    assert_eq!(deliver(&s, "orders/create", "w-0", CREATE, None).await.status(), 401);
    assert_eq!(deliver(&s, "orders/create", "w-0", CREATE, Some(sign("nope", CREATE))).await.status(), 401);
    assert_eq!(deliver(&s, "orders/create", "w-0", CREATE, Some("short".into())).await.status(), 401);
    let mut flipped = CREATE.to_vec();
    flipped[10] ^= 1;
    assert_eq!(deliver(&s, "orders/create", "w-0", &flipped, Some(sign(SECRET, CREATE))).await.status(), 401);

    // A real orders/create payload.
    let r = deliver(&s, "orders/create", "w-1", CREATE, Some(sign(SECRET, CREATE))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "accepted");
    // Shopify's retry of the same delivery: 200, and no second event.
    let r = deliver(&s, "orders/create", "w-1", CREATE, Some(sign(SECRET, CREATE))).await;
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "duplicate");
    s.drain(Duration::from_secs(10)).await;
    let (status, order) = s.get_json("/orders/shopify-820982911946154508").await;
    assert_eq!(status, 200, "{order}");
    assert_eq!(
        (order["total_cents"].as_i64(), order["tier"].as_str(), order["status"].as_str()),
        (Some(59_895), Some("GOLD"), Some("PENDING"))
    );
    assert_eq!(order["shopify_order_id"], 820982911946154508i64);

    // orders/paid, signed with the previous secret during a rotation.
    let paid = update("");
    assert_eq!(deliver(&s, "orders/paid", "w-2", &paid, Some(sign(OLD, &paid))).await.status(), 200);
    // Topics we do not act on, bad payloads, oversized bodies.
    let product = br#"{"id": 1, "title": "a product"}"#;
    let r = deliver(&s, "products/update", "w-3", product, Some(sign(SECRET, product))).await;
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ignored");
    let no_id = br#"{"updated_at": "2026-11-21T12:00:00Z"}"#;
    // Signed but unusable: 200 (a retry would fail the same way) and a dead letter.
    let r = deliver(&s, "orders/updated", "w-4", no_id, Some(sign(SECRET, no_id))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "rejected");
    let (_, letters) = s.get_json("/dead-letters").await;
    assert!(
        letters["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["id"] == "shopify:w-4" && l["reason"].as_str().unwrap().contains("no id")),
        "{letters}"
    );
    let big = vec![b' '; 9000];
    assert_eq!(deliver(&s, "orders/updated", "w-5", &big, Some(sign(SECRET, &big))).await.status(), 413);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(s.get_json("/orders/shopify-820982911946154508").await.1["status"], "CONFIRMED");

    let (_, audit) = s.get_json("/webhooks/deliveries?limit=100").await;
    let outcomes: Vec<(String, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["webhook_id"].as_str().unwrap().into(), d["outcome"].as_str().unwrap().into()))
        .collect();
    let expect = [
        ("w-0", "rejected"),
        ("w-0", "rejected"),
        ("w-0", "rejected"),
        ("w-0", "rejected"),
        ("w-1", "received"),
        ("w-1", "duplicate"),
        ("w-2", "received"),
        ("w-3", "ignored"),
        ("w-4", "rejected"),
        ("w-5", "rejected"),
    ];
    assert_eq!(outcomes, expect.map(|(a, b)| (a.to_string(), b.to_string())));
    assert!(audit["items"][0]["reason"].as_str().unwrap().contains("missing"), "{}", audit["items"][0]);
}

/// 100 concurrent updates of one order, half of them duplicate deliveries: every unique
/// delivery is applied once, every duplicate is refused as one, and the audit adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_of_duplicate_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    assert_eq!(deliver(&s, "orders/create", "c-0", CREATE, Some(sign(SECRET, CREATE))).await.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    let deliveries: Vec<(String, Vec<u8>)> =
        (0..100).map(|i| (format!("c-{}", 1 + i / 2), update(&format!("update {}", i / 2)))).collect();
    let answers: Vec<String> = futures::stream::iter(deliveries.iter().map(|(id, body)| {
        let s = &s;
        async move {
            deliver(s, "orders/updated", id, body, Some(sign(SECRET, body)))
                        .await
                        .json::<Value>()
                        .await
                        .unwrap()["status"]
                        .as_str()
                        .unwrap()
                        .to_string()
        }
    }))
    .buffer_unordered(32)
    .collect()
    .await;
    assert_eq!(answers.iter().filter(|a| *a == "accepted").count(), 50);
    assert_eq!(answers.iter().filter(|a| *a == "duplicate").count(), 50);
    s.drain(Duration::from_secs(20)).await;
    let h = history(&s, "shopify-820982911946154508").await;
    let applied = h.iter().filter(|e| e["outcome"] == "applied").count();
    let (_, order) = s.get_json("/orders/shopify-820982911946154508").await;
    assert_eq!(order["version"].as_u64().unwrap() as usize, applied, "version is 1 + the applied updates");
    // The 50 updates carry one updated_at, and one second holds many changes: none of
    // them is stale, and each unique delivery (its own note) applies once.
    assert_eq!(h.len(), 51, "the create and each unique delivery, once: {h:#?}");
    assert_eq!(applied, 51);
    let (_, audit) = s.get_json("/webhooks/deliveries?limit=1000").await;
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items.iter().filter(|d| d["outcome"] == "received").count(), 51);
    assert_eq!(items.iter().filter(|d| d["outcome"] == "duplicate").count(), 50);
}

/// `orchestrator webhook send --chaos 100` against a running engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_chaos_mode_is_applied_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    let send = |extra: &[&str]| {
        let out = common::orchestrator()
            .args(["webhook", "send", "--url", &s.url("/webhooks/shopify"), "--secret", SECRET, "--order-id", "42"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(send(&[]).contains("accepted"));
    s.drain(Duration::from_secs(10)).await;
    let report = send(&["--chaos", "100"]);
    eprintln!("{report}");
    assert!(report.contains("    50  accepted") && report.contains("    50  duplicate"), "{report}");
    s.drain(Duration::from_secs(20)).await;
    // Each unique delivery is decided exactly once: applied, or (arriving after a newer
    // one) discarded as stale, with the reason in the history.
    let h = history(&s, "shopify-42").await;
    let ids: std::collections::HashSet<&str> = h.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!((h.len(), ids.len()), (51, 51), "the create and 50 unique updates, once each");
    let applied = h.iter().filter(|e| e["outcome"] == "applied").count();
    assert!(
        h.iter()
            .all(|e| e["outcome"] == "applied" || e["reason"].as_str().unwrap_or("").starts_with("discarded: stale"))
    );
    assert_eq!(
        s.get_json("/orders/shopify-42").await.1["version"].as_u64().unwrap() as usize,
        applied,
        "version = 1 + applied updates"
    );
    for topic in [
        "orders/paid",
        "orders/fulfilled",
        "orders/cancelled",
        "orders/delete",
        "orders/edited",
        "orders/partially_fulfilled",
        "orders/updated",
    ] {
        assert!(send(&["--topic", topic]).contains("accepted"), "{topic}");
    }
}

/// `orchestrator webhook send --load`: every delivery is a distinct signed order the
/// engine accepts, audits and applies, and the report counts what it answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_load_mode_delivers_distinct_orders() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    let out = dir.path().join("load.json");
    let load = |secret: &str, n: &str| {
        let out = common::orchestrator()
            .args(["webhook", "send", "--url", &s.url("/webhooks/shopify"), "--secret", secret])
            .args(["--load", n, "--rate", "2000", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    load(SECRET, "300");
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(report["accepted"], 300, "{report:#}");
    assert_eq!(report["other_answers"], json!({}), "{report:#}");
    // Figures are logged, not bounded; their order holds however busy the machine is.
    let at = |q: &str| report["time_to_200_ms"][q].as_f64().unwrap();
    eprintln!("time to 200: p50 {} ms, p99 {} ms, max {} ms", at("p50"), at("p99"), at("max"));
    assert!(at("p50") <= at("p99") && at("p99") <= at("max"), "{report:#}");
    s.drain(Duration::from_secs(20)).await;
    for id in ["shopify-1000000000", "shopify-1000000150", "shopify-1000000299"] {
        let (status, order) = s.get_json(&format!("/orders/{id}")).await;
        assert_eq!((status, order["version"].as_u64()), (200, Some(1)), "{id}: {order}");
    }
    assert_eq!(s.get_json("/orders/shopify-1000000300").await.0, 404, "no more than sent");
    let (_, audit) = s.get_json("/webhooks/deliveries?limit=1000").await;
    let received = audit["items"].as_array().unwrap().iter().filter(|d| d["outcome"] == "received").count();
    assert_eq!(received, 300);
    // A wrong secret: every delivery is refused, and counted by its answer.
    load("not-the-secret", "20");
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(report["accepted"], 0, "{report:#}");
    assert_eq!(report["other_answers"], json!({ "HTTP 401 invalid webhook signature": 20 }), "{report:#}");
}

#[tokio::test]
async fn a_shop_over_its_rate_limit_gets_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET, "--shopify-rate-limit", "5"]).await;
    // All at once, so the bucket's refill (5 a second) cannot keep up however slow a
    // delivery is on a busy machine: one after another at 120 ms each, it would.
    let sends = (0..12).map(|i| {
        let s = &s;
        async move {
            let r = deliver(s, "orders/create", &format!("rl-{i}"), CREATE, Some(sign(SECRET, CREATE))).await;
            (r.status().as_u16(), r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()))
        }
    });
    let answers = futures::future::join_all(sends).await;
    let limited: Vec<_> = answers.iter().filter(|(s, _)| *s == 429).collect();
    assert!(!limited.is_empty() && limited.len() <= 7, "{answers:?}");
    assert!(limited.iter().all(|(_, retry)| retry.as_deref() == Some("1")), "{answers:?}");
    assert!(answers.iter().filter(|(s, _)| *s == 200).count() >= 5, "the burst passes: {answers:?}");
}

/// A late delivery (its updated_at not newer than the last applied) is discarded by the
/// rules and audited in the order's history, never silently dropped.
#[tokio::test]
async fn stale_deliveries_are_discarded_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    assert_eq!(deliver(&s, "orders/create", "s-0", CREATE, Some(sign(SECRET, CREATE))).await.status(), 200);
    let at = |t: &str, note: &str| {
        json!({"id": 820982911946154508i64, "updated_at": t, "note": note, "total_price": "598.95", "currency": "USD"})
            .to_string()
            .into_bytes()
    };
    let newer = at("2026-11-21T13:00:00-05:00", "newer");
    let older = at("2026-11-21T12:30:00-05:00", "older");
    assert_eq!(deliver(&s, "orders/updated", "s-2", &newer, Some(sign(SECRET, &newer))).await.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(deliver(&s, "orders/updated", "s-1", &older, Some(sign(SECRET, &older))).await.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    let (_, order) = s.get_json("/orders/shopify-820982911946154508").await;
    assert_eq!((order["note"].as_str(), order["version"].as_u64()), (Some("newer"), Some(2)));
    assert_eq!(order["source_updated_at"], "2026-11-21T18:00:00Z");
    let h = history(&s, "shopify-820982911946154508").await;
    let last = h.last().unwrap();
    assert_eq!((last["event_id"].as_str(), last["outcome"].as_str()), (Some("shopify:s-1"), Some("skipped")));
    assert!(last["reason"].as_str().unwrap().starts_with("discarded: stale delivery"), "{last}");
}

/// An unsigned request may not pose as Shopify: a `shopify` source dated 2099 made every
/// genuine delivery of that order stale, and a `shopify:<webhook id>` event id made the
/// genuine delivery a silent duplicate. Both are refused, and the genuine ones apply.
#[tokio::test]
async fn the_api_cannot_forge_shopify_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    assert_eq!(deliver(&s, "orders/create", "f-0", CREATE, Some(sign(SECRET, CREATE))).await.status(), 200);
    let order = "shopify-820982911946154508";
    let mut future = common::updated(order, "forged-1", json!({ "note": "forged" }));
    future["source"] = json!("shopify");
    future["occurred_at"] = json!("2099-01-01T00:00:00Z");
    let mut borrowed = common::updated(order, "shopify:f-1", json!({ "note": "borrowed" }));
    borrowed["source"] = json!("api");
    // A Shopify shop decides whose compliance requests reach the order.
    let mut shop = common::updated(order, "forged-2", json!({ "note": "shop" }));
    shop["shop"] = json!("example.myshopify.com");
    let cases = [(future, "a shopify source"), (borrowed, "a webhook's event id"), (shop, "a Shopify shop")];
    for (forged, what) in cases {
        let r = s.post_events(&json!([forged])).await;
        assert_eq!(r.status(), 400, "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["detail"]["index"], 0);
        assert!(body["detail"]["reason"].as_str().unwrap().contains("signed webhook"), "{body}");
    }
    let genuine = update("genuine");
    assert_eq!(deliver(&s, "orders/updated", "f-1", &genuine, Some(sign(SECRET, &genuine))).await.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    let (_, row) = s.get_json(&format!("/orders/{order}")).await;
    assert_eq!(row["note"], "genuine", "{row}");
    let h = history(&s, order).await;
    let outcomes: Vec<&str> = h.iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["applied", "applied"], "{h:?}");
}

/// Signed deliveries with one bad field got 503 "the order log is unavailable", so Shopify
/// retried them for hours and alerts blamed the log. Now each is answered 200, audited
/// as rejected, and dead-lettered with the field and the reason.
#[tokio::test]
async fn a_signed_delivery_with_a_bad_field_is_dead_lettered_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    let long_id = "w".repeat(130);
    let mut euro: Value = serde_json::from_slice(CREATE).unwrap();
    euro["currency"] = json!("EU");
    euro["presentment_currency"] = json!("EU");
    let euro = euro.to_string().into_bytes();
    let cases: [(&str, &[u8], &str); 3] =
        [(&long_id, CREATE, "event_id"), ("tab\there", CREATE, "event_id"), ("bad-currency", &euro, "currency")];
    for (id, body, field) in cases {
        let r = deliver(&s, "orders/create", id, body, Some(sign(SECRET, body))).await;
        assert_eq!(r.status(), 200, "{id}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["status"], "rejected", "{id}: {answer}");
        let (_, letters) = s.get_json("/dead-letters?limit=1000").await;
        let letter = letters["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["error_type"] == "invalid_delivery" && l["reason"].as_str().unwrap().contains(field));
        assert!(letter.is_some(), "{id}: a letter naming {field}: {letters}");
    }
    let (_, audit) = s.get_json("/webhooks/deliveries?limit=1000").await;
    let rejected = audit["items"].as_array().unwrap().iter().filter(|d| d["outcome"] == "rejected").count();
    assert_eq!(rejected, 3, "{audit}");
    assert_eq!(s.health().await["status"], "ok", "no outage is reported");
    // The same order, delivered well, still applies.
    assert_eq!(deliver(&s, "orders/create", "good-1", CREATE, Some(sign(SECRET, CREATE))).await.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(s.get_json("/orders/shopify-820982911946154508").await.0, 200);
}

/// 1,000 unsigned posts with 32 KB headers grew the data dir by 31 MB. Now an address's
/// refusals are audited ten a minute, with each header value cut to 128 characters, and
/// the rest are only counted.
#[tokio::test]
async fn unsigned_posts_cannot_fill_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    let long = "x".repeat(8 << 10);
    for i in 0..50 {
        let r = common::client()
            .post(s.url("/webhooks/shopify"))
            .header("content-type", "application/json")
            .header("x-shopify-topic", &long)
            .header("x-shopify-shop-domain", &long)
            .header("x-shopify-webhook-id", format!("{i}-{long}"))
            .header("x-shopify-hmac-sha256", "forged")
            .body(CREATE.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let (_, audit) = s.get_json("/webhooks/deliveries?limit=1000").await;
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items.len(), 10, "ten a minute from one address");
    for d in items {
        for field in ["webhook_id", "topic", "shop"] {
            assert!(d[field].as_str().unwrap().chars().count() <= 128, "{field} is cut");
        }
    }
    let metrics = common::client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("orchestrator_webhooks_received_total{outcome=\"rejected\"} 50"), "all counted");
    // A genuine delivery is still audited.
    assert_eq!(deliver(&s, "orders/create", "real-1", CREATE, Some(sign(SECRET, CREATE))).await.status(), 200);
    let (_, audit) = s.get_json("/webhooks/deliveries?limit=1000").await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 11);
}

/// Shopify's `updated_at` has one-second resolution: `orders/paid` and then
/// `orders/fulfilled` in the same second are two changes, and both apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_changes_in_the_same_second_both_apply() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    assert_eq!(deliver(&s, "orders/create", "same-1", CREATE, Some(sign(SECRET, CREATE))).await.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    let paid = update("");
    assert_eq!(deliver(&s, "orders/paid", "same-2", &paid, Some(sign(SECRET, &paid))).await.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    let mut fulfilled: Value = serde_json::from_slice(&paid).unwrap();
    fulfilled["fulfillment_status"] = json!("fulfilled");
    let fulfilled = fulfilled.to_string().into_bytes();
    let r = deliver(&s, "orders/fulfilled", "same-3", &fulfilled, Some(sign(SECRET, &fulfilled))).await;
    assert_eq!(r.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    let (_, order) = s.get_json("/orders/shopify-820982911946154508").await;
    let h = history(&s, "shopify-820982911946154508").await;
    let outcomes: Vec<&str> = h.iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["applied", "applied", "applied"], "{h:?}");
    assert_eq!(order["status"], "SHIPPED", "{order}");
}

/// A delivery whose append fails and whose claim cannot be given back (the store refuses
/// the release) must not come back as a "duplicate": the claim was never confirmed, so
/// Shopify's retry takes it over once its lease ends, and the order is created.
#[tokio::test]
async fn a_claim_whose_event_never_reached_the_log_is_not_a_duplicate() {
    common::embedded_only("its faults are SQLite triggers on the log and the store");
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    let faults = [
        ("log.sqlite", "refuse_normal_appends", "BEFORE INSERT ON records_normal"),
        ("log.sqlite", "refuse_vip_appends", "BEFORE INSERT ON records_vip"),
        ("store.sqlite", "refuse_releases", "BEFORE DELETE ON webhook_claims"),
    ];
    let open = |file: &str| {
        let c = rusqlite::Connection::open(dir.path().join(file)).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    };
    for (file, name, on) in faults {
        let sql = format!("CREATE TRIGGER {name} {on} BEGIN SELECT RAISE(ABORT, 'injected: {name}'); END;");
        open(file).execute_batch(&sql).unwrap();
    }
    let r = deliver(&s, "orders/create", "lost-1", CREATE, Some(sign(SECRET, CREATE))).await;
    assert_eq!(r.status(), 503, "the log refused the event");
    for (file, name, _) in faults {
        open(file).execute_batch(&format!("DROP TRIGGER {name};")).unwrap();
    }
    // Shopify retries the same delivery until it gets a 2xx.
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let r = deliver(&s, "orders/create", "lost-1", CREATE, Some(sign(SECRET, CREATE))).await;
        if r.status() != 503 {
            break (r.status(), r.json::<Value>().await.unwrap());
        }
        assert!(r.headers().contains_key("retry-after"), "a 503 says when to come back");
        assert!(Instant::now() < deadline, "the retry was refused for a minute");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(answer.0, 200);
    assert_eq!(answer.1["status"], "accepted", "not a duplicate: {}", answer.1);
    s.drain(Duration::from_secs(10)).await;
    let order = answer.1["order_id"].as_str().unwrap().to_string();
    assert_eq!(s.get_json(&format!("/orders/{order}")).await.1["version"], 1);
    // Once durable, the claim does make a duplicate.
    let again = deliver(&s, "orders/create", "lost-1", CREATE, Some(sign(SECRET, CREATE))).await;
    assert_eq!(again.json::<Value>().await.unwrap()["status"], "duplicate");
}

/// Many shops in one engine: each signs with its own secret (rotation per shop), a shop
/// without one is refused, and `app/uninstalled` makes the shop's later deliveries
/// refused and audited until an operator activates it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shops_sign_with_their_own_secrets_and_an_uninstall_stops_a_shop() {
    use common::deliver_from;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("shop-secrets");
    std::fs::write(&secrets, "# shop secret [previous]\na.myshopify.com secret-a\nB.myshopify.com secret-b old-b\n")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = secrets.display().to_string();
    // One shop gets its own label on the per-shop metric; the next counts as "other".
    let flags = ["--shopify-secrets-file", &path, "--shop-metric-limit", "1"];
    let s = Server::start_with(&dir.path().join("data"), &flags).await;
    let order = |id: i64| {
        let mut o: Value = serde_json::from_slice(CREATE).unwrap();
        o["id"] = json!(id);
        o.to_string().into_bytes()
    };
    let status = |r: reqwest::Response| async move {
        let code = r.status().as_u16();
        (code, r.json::<Value>().await.unwrap_or_default()["status"].as_str().unwrap_or_default().to_string())
    };
    let (a, b) = ("a.myshopify.com", "b.myshopify.com");
    let body = order(1);
    assert_eq!(
        status(deliver_from(&s, a, "orders/create", "a-1", &body, Some(sign("secret-a", &body))).await).await,
        (200, "accepted".into())
    );
    assert_eq!(deliver_from(&s, a, "orders/create", "a-x", &body, Some(sign("secret-b", &body))).await.status(), 401);
    let body = order(2);
    assert_eq!(deliver_from(&s, b, "orders/create", "b-2", &body, Some(sign("old-b", &body))).await.status(), 200);
    let r = deliver_from(&s, "c.myshopify.com", "orders/create", "c-3", &body, Some(sign("secret-a", &body))).await;
    assert_eq!(r.status(), 401, "a shop with no secret");

    // The uninstall: A's later deliveries are refused (200, so Shopify stops) and audited.
    let gone = br#"{"id": 1, "name": "A", "domain": "a.myshopify.com"}"#;
    assert_eq!(
        status(deliver_from(&s, a, "app/uninstalled", "a-bye", gone, Some(sign("secret-a", gone))).await).await,
        (200, "uninstalled".into())
    );
    let body = order(4);
    assert_eq!(
        status(deliver_from(&s, a, "orders/create", "a-4", &body, Some(sign("secret-a", &body))).await).await,
        (200, "refused".into())
    );
    let body = order(5);
    assert_eq!(
        status(deliver_from(&s, b, "orders/create", "b-5", &body, Some(sign("secret-b", &body))).await).await,
        (200, "accepted".into()),
        "another shop goes on"
    );
    s.drain(Duration::from_secs(30)).await;
    assert_eq!(s.get_json("/orders/shopify-4").await.0, 404, "nothing of the refused delivery");
    assert_eq!(s.get_json("/orders/shopify-5").await.0, 200);
    let (_, audit) = s.get_json("/webhooks/deliveries?limit=100").await;
    let refused = audit["items"].as_array().unwrap().iter().find(|d| d["webhook_id"] == "a-4").cloned().unwrap();
    assert_eq!(refused["outcome"], "shop_inactive", "{refused}");
    assert!(refused["reason"].as_str().unwrap().contains("uninstalled"), "{refused}");
    let (_, shop) = s.get_json("/shopify/shops/a.myshopify.com").await;
    assert_eq!((shop["active"].as_bool(), shop["reason"].as_str()), (Some(false), Some("app/uninstalled")));

    // Per shop on /metrics: A (the first to sign) by name, B past the limit as "other",
    // and the badly signed and secretless deliveries as "unverified", whatever shop
    // they named.
    let metrics = common::client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        r#"orchestrator_shop_webhooks_total{shop="a.myshopify.com",outcome="received"} 1"#,
        r#"orchestrator_shop_webhooks_total{shop="a.myshopify.com",outcome="uninstalled"} 1"#,
        r#"orchestrator_shop_webhooks_total{shop="a.myshopify.com",outcome="shop_inactive"} 1"#,
        r#"orchestrator_shop_webhooks_total{shop="other",outcome="received"} 2"#,
        r#"orchestrator_shop_webhooks_total{shop="unverified",outcome="rejected"} 2"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line} in:\n{metrics}");
    }
    assert!(!metrics.contains(r#"shop="b.myshopify.com""#) && !metrics.contains(r#"shop="c.myshopify.com""#));
    common::check_with_promtool(&metrics);

    // Rows record the shop their first delivery came from, and the list filters by it.
    let (_, row) = s.get_json("/orders/shopify-1").await;
    assert_eq!(row["shop"], a, "{row}");
    let listed = |shop: &'static str| {
        let s = &s;
        async move {
            let (code, page) = s.get_json(&format!("/orders?limit=100&shop={shop}")).await;
            assert_eq!(code, 200, "{page}");
            let items = page["items"].as_array().unwrap().clone();
            assert!(items.iter().all(|o| o["shop"] == shop), "only {shop}'s orders: {page}");
            items.iter().map(|o| o["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    let (of_a, of_b) = (listed(a).await, listed(b).await);
    assert!(of_a.contains(&"shopify-1".to_string()) && !of_a.contains(&"shopify-2".to_string()), "{of_a:?}");
    assert!(of_b.contains(&"shopify-2".to_string()) && !of_b.contains(&"shopify-1".to_string()), "{of_b:?}");
    assert_eq!(s.get_json("/orders?shop=Not%20a%20shop").await.0, 400);

    // Activated again (after a reinstall), its deliveries are taken.
    let r = common::authorized().post(s.url("/shopify/shops/a.myshopify.com/activate")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = order(6);
    assert_eq!(
        status(deliver_from(&s, a, "orders/create", "a-6", &body, Some(sign("secret-a", &body))).await).await,
        (200, "accepted".into())
    );
}

/// A signed delivery the log refuses for what it holds (its webhook id, so its event id,
/// was taken by another order once the dedup window let it through again) is answered
/// 200 and dead-lettered with the reason; on main it got 503 "the order log is
/// unavailable" and Shopify would retry it for days. (The embedded ledger refuses such
/// an id at ingest; CQL's, per order, dead-letters it in the pipeline.)
#[tokio::test]
async fn a_delivery_the_log_refuses_for_its_content_is_dead_lettered_not_retried() {
    common::embedded_only("the embedded ledger refuses a taken event id at ingest; CQL's is per order");
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET, "--shopify-dedup-hours", "0"]).await;
    let order = |id: i64| {
        let mut o: Value = serde_json::from_slice(CREATE).unwrap();
        o["id"] = json!(id);
        o.to_string().into_bytes()
    };
    let first = order(11);
    assert_eq!(deliver(&s, "orders/create", "same-id", &first, Some(sign(SECRET, &first))).await.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    let second = order(12);
    let r = deliver(&s, "orders/create", "same-id", &second, Some(sign(SECRET, &second))).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["status"], "rejected", "{answer}");
    let (_, letters) = s.get_json("/dead-letters?limit=100").await;
    let letter = letters["items"].as_array().unwrap().iter().find(|l| l["error_type"] == "invalid_delivery").cloned();
    let letter = letter.unwrap_or_else(|| panic!("a dead letter: {letters}"));
    assert!(letter["reason"].as_str().unwrap().contains("already used"), "{letter}");
    assert_eq!(s.health().await["status"], "ok", "no outage is reported");
}

/// Shopify's compliance webhooks: a data request exports what the engine holds about a
/// customer (to an operator token only); a redaction then erases the customer's email
/// and notes from the rows, the dead letters and the export, keeping the business facts,
/// and nothing the store holds, read through the API or straight from its files (SQLite)
/// or tables (cqlsh), still has the email.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_redaction_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(&dir.path().join("data"), &["--shopify-secret", SECRET]).await;
    let (ada, bob) = ("ada.lovelace@example.com", "bob@example.com");
    let order = |id: i64, email: &str, currency: &str| {
        let mut o: Value = serde_json::from_slice(CREATE).unwrap();
        o["id"] = json!(id);
        o["email"] = json!(email);
        o["customer"]["email"] = json!(email);
        o["note"] = json!(format!("ring {email} before delivery"));
        o["currency"] = json!(currency);
        o["presentment_currency"] = json!(currency);
        o.to_string().into_bytes()
    };
    let send = |topic: &'static str, id: String, body: Vec<u8>| {
        let s = &s;
        async move {
            let r = deliver(s, topic, &id, &body, Some(sign(SECRET, &body))).await;
            assert_eq!(r.status(), 200, "{topic} {id}");
            r.json::<Value>().await.unwrap()["status"].as_str().unwrap().to_string()
        }
    };
    for id in 1..=3 {
        assert_eq!(send("orders/create", format!("c-{id}"), order(id, ada, "USD")).await, "accepted");
    }
    assert_eq!(send("orders/create", "c-4".into(), order(4, bob, "USD")).await, "accepted");
    // A delivery that never became an event: its dead letter keeps the raw body.
    assert_eq!(send("orders/create", "c-5".into(), order(5, ada, "EU")).await, "rejected");
    s.drain(Duration::from_secs(10)).await;

    let authed = |path: &str| common::client().get(s.url(path)).bearer_auth(common::TOKEN).send();
    let request = |id: &str| {
        let path = format!("/shopify/compliance/{id}");
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r: Value = authed(&path).await.unwrap().json().await.unwrap();
                if r["state"] == "done" || Instant::now() > deadline {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let customer = json!({ "id": 191167, "email": ada, "phone": "+1 555 0100" });
    let ask = json!({
        "shop_id": 954889, "shop_domain": "shop.myshopify.com", "customer": customer,
        "orders_requested": [1, 2, 3, 5], "data_request": { "id": 9999 },
    });
    assert_eq!(send("customers/data_request", "dr-1".into(), ask.to_string().into_bytes()).await, "accepted");
    let asked = request("dr-1").await;
    assert_eq!(asked["state"], "done", "{asked}");
    let exported: Vec<&str> =
        asked["export"]["orders"].as_array().unwrap().iter().map(|o| o["customer"].as_str().unwrap()).collect();
    assert_eq!(exported, [ada, ada, ada], "the export holds the customer's orders: {asked}");
    assert!(asked["export"]["dead_letters"].as_array().unwrap().len() == 1, "and the letter: {asked}");
    assert_eq!(s.get_json("/shopify/compliance/dr-1").await.0, 401, "an export needs a token, even on loopback");

    let redact = json!({
        "shop_id": 954889, "shop_domain": "shop.myshopify.com", "customer": customer,
        "orders_to_redact": [1, 2, 3],
    });
    assert_eq!(send("customers/redact", "rd-1".into(), redact.to_string().into_bytes()).await, "accepted");
    assert_eq!(send("customers/redact", "rd-1".into(), redact.to_string().into_bytes()).await, "duplicate");
    let done = request("rd-1").await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["erasure"]["orders_redacted"], 3, "{done}");

    // Another shop cannot redact this shop's orders.
    let foreign = json!({ "shop_domain": "other.myshopify.com", "customer": {"email": bob}, "orders_to_redact": [4] });
    let foreign = foreign.to_string().into_bytes();
    let r = common::deliver_from(
        &s,
        "other.myshopify.com",
        "customers/redact",
        "rd-other",
        &foreign,
        Some(sign(SECRET, &foreign)),
    );
    assert_eq!(r.await.status(), 200);
    let other_shop = request("rd-other").await;
    assert_eq!(
        (other_shop["state"].as_str(), other_shop["erasure"]["orders_redacted"].as_u64()),
        (Some("done"), Some(0))
    );

    // A payload that cannot be read: 200 (Shopify would only send it again), kept as a
    // failed request with the reason, and not sent round again.
    let unreadable = br#"{"customer": 5}"#.to_vec();
    assert_eq!(send("customers/redact", "rd-bad".into(), unreadable).await, "rejected");
    let bad: Value = authed("/shopify/compliance/rd-bad").await.unwrap().json().await.unwrap();
    assert_eq!(bad["state"], "failed", "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("cannot be read"), "{bad}");
    let retry = common::client()
        .post(s.url("/shopify/compliance/rd-bad/retry"))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 409, "an unreadable request is failed for good");

    // The business facts stay; the personal fields are gone, as a new version.
    let (_, row) = s.get_json("/orders/shopify-1").await;
    assert_eq!((row["customer"].as_str(), row["note"].as_str()), (Some("[redacted]"), Some("")), "{row}");
    assert_eq!((row["version"].as_u64(), row["total_cents"].as_i64()), (Some(2), Some(59895)), "{row}");
    let (_, history) = s.get_json("/orders/shopify-1/history").await;
    assert!(history["items"].as_array().unwrap().iter().any(|h| h["source"] == "redaction"), "{history}");
    let (_, other) = s.get_json("/orders/shopify-4").await;
    assert_eq!(other["customer"], bob, "another customer's order stays");

    // Nothing read back through the API holds the email any more.
    let mut seen = String::new();
    for path in
        ["/orders?limit=100", "/dead-letters?limit=1000", "/webhooks/deliveries?limit=1000", "/audit?limit=1000"]
    {
        seen.push_str(&authed(path).await.unwrap().text().await.unwrap());
    }
    for id in 1..=5 {
        seen.push_str(&s.get_json(&format!("/orders/shopify-{id}/history")).await.1.to_string());
    }
    for id in ["dr-1", "rd-1"] {
        seen.push_str(&authed(&format!("/shopify/compliance/{id}")).await.unwrap().text().await.unwrap());
    }
    seen.push_str(&authed("/shopify/compliance").await.unwrap().text().await.unwrap());
    assert!(seen.contains(bob), "the reads cover the other customer's data");
    assert!(!seen.contains(ada) && !seen.contains("555 0100"), "the API still returns the customer's data");

    // Nor does the store itself.
    assert_the_store_forgot(&s, ada, bob).await;
}

/// Reads every table (SQLite's files, or the keyspace through cqlsh) until `gone` is
/// not there (the embedded log deletes applied records every 2 s), for 15 s at most;
/// `kept` must be there, to show the dump covers the store.
async fn assert_the_store_forgot(s: &Server, gone: &str, kept: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let raw = loop {
        let raw = match s.keyspace() {
            Some(keyspace) => common::cql_dump(&keyspace),
            None => common::sqlite_dump(&s.data_dir),
        };
        if !raw.contains(gone) || Instant::now() > deadline {
            break raw;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(raw.contains(kept), "the dump covers the store");
    if let Some(at) = raw.find(gone) {
        let around: String = raw[at.saturating_sub(300)..].chars().take(400).collect();
        panic!("the store still holds {gone}: …{around}…");
    }
}

/// `shop/redact` (48 h after an uninstall) deletes every order whose row records the
/// shop, with its history, redacts the dead letters of those orders, drops the exports
/// of the shop's data requests and leaves the shop inactive; another shop's orders stay.
/// One naming a shop other than the one whose secret signed it erases nothing. On main
/// it was answered "ignored" and nothing was erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shop_redaction_removes_the_shop() {
    let dir = tempfile::tempdir().unwrap();
    // An update whose order never comes is dead-lettered after 1 s.
    let flags = ["--shopify-secret", SECRET, "--park-timeout-secs", "1"];
    let s = Server::start_with(&dir.path().join("data"), &flags).await;
    let (gone, stays) = ("gone.myshopify.com", "stays.myshopify.com");
    let (ada, bob) = ("ada.of.gone@example.com", "bob.of.stays@example.com");
    let order = |id: i64, email: &str| {
        let mut o: Value = serde_json::from_slice(CREATE).unwrap();
        o["id"] = json!(id);
        o["email"] = json!(email);
        o["customer"]["email"] = json!(email);
        o.to_string().into_bytes()
    };
    let send = |shop: &'static str, topic: &'static str, id: String, body: Vec<u8>| {
        let s = &s;
        async move {
            let r = common::deliver_from(s, shop, topic, &id, &body, Some(sign(SECRET, &body))).await;
            assert_eq!(r.status(), 200, "{topic} {id}");
            r.json::<Value>().await.unwrap()["status"].as_str().unwrap().to_string()
        }
    };
    for id in 1..=3 {
        assert_eq!(send(gone, "orders/create", format!("g-{id}"), order(id, ada)).await, "accepted");
    }
    assert_eq!(send(stays, "orders/create", "s-4".into(), order(4, bob)).await, "accepted");
    // A dead letter of order 2 that keeps the raw body (its webhook id is too long).
    assert_eq!(send(gone, "orders/create", "w".repeat(130), order(2, ada)).await, "rejected");
    // And one of an order that never got a row (an update carries the note, not the
    // email): found by the shop its event came from.
    let mut update: Value = serde_json::from_slice(&order(99, ada)).unwrap();
    update["note"] = json!(format!("ring {ada}"));
    let update = update.to_string().into_bytes();
    assert_eq!(send(gone, "orders/updated", "g-99".into(), update).await, "accepted");
    s.drain(Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.get_json("/dead-letters?limit=100").await.1.to_string().contains("shopify-99") {
        assert!(Instant::now() < deadline, "the update of order 99 was never dead-lettered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let authed = |path: String| {
        let url = s.url(&path);
        async move { common::client().get(url).bearer_auth(common::TOKEN).send().await.unwrap() }
    };
    let request = |id: &'static str, state: &'static str| {
        let authed = &authed;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r: Value = authed(format!("/shopify/compliance/{id}")).await.json().await.unwrap();
                if r["state"] == state || Instant::now() > deadline {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let ask = json!({ "shop_domain": gone, "customer": { "email": ada }, "orders_requested": [1] });
    assert_eq!(send(gone, "customers/data_request", "dr-g".into(), ask.to_string().into_bytes()).await, "accepted");
    let asked = request("dr-g", "done").await;
    assert_eq!(asked["export"]["orders"].as_array().map(Vec::len), Some(1), "{asked}");

    // Signed by one shop, naming another: refused, and nothing erased.
    let other = json!({ "shop_id": 1, "shop_domain": gone }).to_string().into_bytes();
    assert_eq!(send(stays, "shop/redact", "sr-x".into(), other).await, "rejected");
    let refused = request("sr-x", "failed").await;
    assert!(refused["error"].as_str().unwrap().contains("names another shop"), "{refused}");
    // The signature covers the body, not the topic: the shop's own signed data request
    // sent again as shop/redact is no shop/redact, and erases nothing either.
    assert_eq!(send(gone, "shop/redact", "sr-replay".into(), ask.to_string().into_bytes()).await, "rejected");
    let replayed = request("sr-replay", "failed").await;
    assert!(replayed["error"].as_str().unwrap().contains("not a shop/redact payload"), "{replayed}");
    assert_eq!(s.get_json("/orders/shopify-1").await.0, 200);

    let bye = json!({ "id": 1, "domain": gone }).to_string().into_bytes();
    assert_eq!(send(gone, "app/uninstalled", "g-bye".into(), bye).await, "uninstalled");
    let redact = json!({ "shop_id": 954889, "shop_domain": gone }).to_string().into_bytes();
    assert_eq!(send(gone, "shop/redact", "sr-g".into(), redact).await, "accepted");
    let done = request("sr-g", "done").await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!((done["erasure"]["orders_deleted"].as_u64(), done["orders_done"].as_u64()), (Some(3), Some(3)));
    assert!(done["erasure"]["dead_letters"].as_u64() >= Some(2), "the letters of orders 2 and 99: {done}");

    for id in 1..=3 {
        assert_eq!(s.get_json(&format!("/orders/shopify-{id}")).await.0, 404, "order {id}");
        assert_eq!(s.get_json(&format!("/orders/shopify-{id}/history")).await.0, 404, "order {id}'s history");
    }
    let (_, listed) = s.get_json(&format!("/orders?limit=100&shop={gone}")).await;
    assert_eq!(listed["items"], json!([]), "{listed}");
    let (_, kept) = s.get_json("/orders/shopify-4").await;
    assert_eq!((kept["customer"].as_str(), kept["shop"].as_str()), (Some(bob), Some(stays)), "{kept}");
    let export: Value = authed("/shopify/compliance/dr-g".into()).await.json().await.unwrap();
    assert!(export["export"].is_null(), "the shop's export is dropped: {export}");
    let (_, shop) = s.get_json(&format!("/shopify/shops/{gone}")).await;
    assert_eq!((shop["active"].as_bool(), shop["reason"].as_str()), (Some(false), Some("shop/redact")), "{shop}");
    let metrics = common::client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let line = r#"orchestrator_compliance_requests_total{topic="shop/redact",outcome="done"} 1"#;
    assert!(metrics.lines().any(|l| l == line), "missing {line}");

    // Nothing the API or the store holds still has the shop's customer; the other's stays.
    let mut seen = String::new();
    for path in ["/orders?limit=100", "/dead-letters?limit=1000", "/shopify/compliance"] {
        seen.push_str(&authed(path.into()).await.text().await.unwrap());
    }
    assert!(seen.contains(bob) && !seen.contains(ada), "the API still returns the shop's data: {seen}");
    assert_the_store_forgot(&s, ada, bob).await;
}
