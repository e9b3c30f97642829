//! Reconciliation against a stand-in of Shopify's Admin API (a small server here that
//! serves recorded order payloads with cursor pagination, the call-limit header, and
//! injected 429s and a 503): the orders whose webhooks never came are applied, those
//! delivered are left alone, and a late webhook never takes an order backwards.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{Server, TOKEN, deliver, history, orchestrator};
use orchestrator::shopify::signature::sign;
use serde_json::{Value, json};

const SECRET: &str = "shpss_reconcile";
const ACCESS_TOKEN: &str = "shpat_stand_in";
const SHOP: &str = "gap-shop.myshopify.com";
const CREATE: &[u8] = include_bytes!("../src/shopify/fixtures/orders_create.json");
const PAGE: usize = 250;

/// The shop's orders as the Admin API has them: `n` orders, updated a second apart.
fn shop_orders(n: usize) -> Vec<Value> {
    let base: Value = serde_json::from_slice(CREATE).unwrap();
    (0..n)
        .map(|i| {
            let mut o = base.clone();
            o["id"] = json!(7_000_000 + i as i64);
            o["email"] = json!(format!("buyer-{i}@example.com"));
            o["updated_at"] = json!(at(i as i64));
            o["note"] = json!(format!("state of order {i} at Shopify"));
            o
        })
        .collect()
}

fn at(second: i64) -> String {
    (chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").unwrap() + chrono::TimeDelta::seconds(second))
        .to_rfc3339()
}

struct StandIn {
    orders: Vec<Value>,
    calls: AtomicUsize,
    throttled: AtomicUsize,
    base: std::sync::OnceLock<String>,
}

/// `GET /{shop}/admin/api/2025-10/orders.json`: every other call is throttled (429 with
/// Retry-After), the third fails (503); the others serve a page and link the next.
async fn orders_json(
    State(s): State<Arc<StandIn>>,
    Path(shop): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let call = s.calls.fetch_add(1, Ordering::SeqCst);
    if headers.get("x-shopify-access-token").and_then(|v| v.to_str().ok()) != Some(ACCESS_TOKEN) {
        return (StatusCode::UNAUTHORIZED, "{\"errors\":\"[API] Invalid API key or access token\"}").into_response();
    }
    if shop != SHOP || q.get("status").map(String::as_str) != Some("any") {
        return (StatusCode::BAD_REQUEST, "{\"errors\":\"unexpected shop or status\"}").into_response();
    }
    if call % 2 == 1 {
        s.throttled.fetch_add(1, Ordering::SeqCst);
        let body = "{\"errors\":\"Exceeded 2 calls per second for api client. Reduce request rates to resume.\"}";
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0.2")], body).into_response();
    }
    if call == 2 {
        return (StatusCode::SERVICE_UNAVAILABLE, "upstream hiccup").into_response();
    }
    // The cursor is the page number here; on the first page, the filter's time.
    let page: usize = q.get("page_info").and_then(|p| p.parse().ok()).unwrap_or(0);
    let since = q.get("updated_at_min").cloned().unwrap_or_default();
    let since = chrono::DateTime::parse_from_rfc3339(&since).expect("updated_at_min is RFC 3339");
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(50).min(PAGE);
    let matching: Vec<&Value> = s
        .orders
        .iter()
        .filter(|o| chrono::DateTime::parse_from_rfc3339(o["updated_at"].as_str().unwrap()).unwrap() >= since)
        .collect();
    let items: Vec<Value> = matching.iter().skip(page * limit).take(limit).map(|o| (*o).clone()).collect();
    let mut response = axum::Json(json!({ "orders": items })).into_response();
    let h = response.headers_mut();
    h.insert("x-shopify-shop-api-call-limit", format!("{}/40", 1 + call % 40).parse().unwrap());
    if (page + 1) * limit < matching.len() {
        let next = format!(
            "<{}/orders.json?limit={limit}&page_info={}&updated_at_min={}&status=any>; rel=\"next\"",
            s.base.get().unwrap(),
            page + 1,
            since.to_rfc3339().replace('+', "%2B")
        );
        h.insert("link", next.parse().unwrap());
    }
    response
}

async fn stand_in(orders: Vec<Value>) -> Arc<StandIn> {
    let state = Arc::new(StandIn {
        orders,
        calls: AtomicUsize::new(0),
        throttled: AtomicUsize::new(0),
        base: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    state.base.set(format!("http://127.0.0.1:{port}/{SHOP}/admin/api/2025-10")).unwrap();
    let app = axum::Router::new()
        .route("/{shop}/admin/api/2025-10/orders.json", axum::routing::get(orders_json))
        .with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    state
}

/// `orchestrator shopify reconcile` against `s`: its JSON report.
fn reconcile_cli(s: &Server) -> Value {
    let out = orchestrator()
        .args(["shopify", "reconcile", "--shop", SHOP, "--since", "2026-10-01T00:00:00Z", "--json"])
        .args(["--url", &s.base, "--api-token", TOKEN])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "reconcile failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("a JSON report ({e}): {stdout}"))
}

/// 520 orders at Shopify; 20 came by webhook, one more came in an older state, and the
/// webhooks of the other 499 were "lost". Reconciliation applies those 500, through
/// 429s and a 503, leaves the 20 alone, and a rerun finds everything up to date. A late
/// webhook older than the reconciled state does not take its order back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconciliation_closes_a_gap_of_lost_webhooks() {
    let orders = shop_orders(520);
    let api = stand_in(orders.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ACCESS_TOKEN}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let admin_url = api.base.get().unwrap().replace(SHOP, "{shop}");
    let token_arg = token_file.display().to_string();
    let args =
        ["--shopify-secret", SECRET, "--shopify-admin-url", &admin_url, "--shopify-admin-token-file", &token_arg];
    let s = Server::start_with(&dir.path().join("data"), &args).await;

    for (i, order) in orders.iter().enumerate().take(20) {
        let body = order.to_string().into_bytes();
        let r = deliver(&s, "orders/create", &format!("wh-{i}"), &body, Some(sign(SECRET, &body))).await;
        assert_eq!(r.status(), 200);
    }
    // Order 20 came once, in a state older than Shopify's now.
    let mut older = orders[20].clone();
    older["updated_at"] = json!(at(-3_600));
    older["note"] = json!("an older state");
    let body = older.to_string().into_bytes();
    assert_eq!(deliver(&s, "orders/create", "wh-20", &body, Some(sign(SECRET, &body))).await.status(), 200);
    s.drain(Duration::from_secs(30)).await;

    let report = reconcile_cli(&s);
    let counts = |r: &Value| {
        ["fetched", "applied", "up_to_date", "failed"].map(|k| r[k].as_u64().unwrap_or_else(|| panic!("{k}: {r}")))
    };
    assert_eq!(counts(&report), [520, 500, 20, 0], "{report}");
    assert_eq!(report["pages"], 3, "{report}");
    assert!(api.throttled.load(Ordering::SeqCst) >= 2, "the stand-in throttled the client");
    s.drain(Duration::from_secs(60)).await;
    let (_, page) = s.get_json("/orders?limit=1000").await;
    let notes: HashMap<String, Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["id"].as_str().unwrap().to_string(), row["note"].clone()))
        .collect();
    for (i, order) in orders.iter().enumerate() {
        let note = notes.get(&format!("shopify-{}", order["id"]));
        assert_eq!(note, Some(&json!(format!("state of order {i} at Shopify"))), "order {i} was reconciled");
    }
    // Delivered by webhook and up to date: nothing more in its history.
    assert_eq!(history(&s, "shopify-7000000").await.len(), 1);
    assert_eq!(history(&s, "shopify-7000020").await.len(), 2, "the older state, then Shopify's");

    // A late webhook of an older state than the reconciled one changes nothing.
    let mut late = orders[300].clone();
    late["updated_at"] = json!(at(-60));
    late["note"] = json!("late and stale");
    let body = late.to_string().into_bytes();
    assert_eq!(deliver(&s, "orders/updated", "late-300", &body, Some(sign(SECRET, &body))).await.status(), 200);
    s.drain(Duration::from_secs(30)).await;
    let (_, row) = s.get_json("/orders/shopify-7000300").await;
    assert_eq!(row["note"], "state of order 300 at Shopify", "{row}");

    // Nothing was missed now: a rerun sends nothing.
    assert_eq!(counts(&reconcile_cli(&s)), [520, 0, 520, 0]);
    let applied = r#"orchestrator_shopify_reconciled_orders_total{outcome="applied"}"#;
    assert_eq!(common::counter(&s, applied).await, 500);
}

/// The access token is never a flag's value, and its file must be private; without one
/// the route says what to configure.
#[tokio::test]
async fn the_access_token_comes_from_a_private_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, ACCESS_TOKEN).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = orchestrator()
        .args(["serve", "--listen", "127.0.0.1:0", "--shopify-secret", SECRET, "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--shopify-admin-token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600") && !err.contains(ACCESS_TOKEN), "{err}");

    let s = Server::start_with(&dir.path().join("data2"), &["--shopify-secret", SECRET]).await;
    let r = common::authorized()
        .post(s.url("/shopify/reconcile"))
        .json(&json!({"shop": SHOP, "since": "2026-10-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert!(body["detail"].to_string().contains("SHOPIFY_ADMIN_TOKEN"), "{body}");
}
