//! The Shopify bridge with the log down (Kafka stopped): deliveries get 503 in time and
//! leave no deduplication mark; Shopify's retries after recovery are applied once. A run
//! started meanwhile cannot hold NORMAL on every instance: it gets 503 and is not
//! recorded, and a plugin deployment is not reported done.

mod common;

use std::time::{Duration, Instant};

use common::{Server, deliver, distributed, history};
use orchestrator::shopify::signature::sign;
use serde_json::{Value, json};

const SECRET: &str = "outage-secret";
const CREATE: &[u8] = include_bytes!("../src/shopify/fixtures/orders_create.json");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_during_a_log_outage_get_503_and_their_retries_apply_once() {
    if !distributed() {
        eprintln!("the log-outage test stops Kafka: it runs in the distributed pass");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", SECRET]).await;
    tokio::task::spawn_blocking(|| common::local_services("stop", "kafka")).await.unwrap();
    // A claim whose conditional write has no known outcome (Cassandra timing out on a
    // starved machine) is answered "delivery in flight" until its lease runs out: that
    // is Shopify's retry too, so the test retries it, within a bound.
    let give_up = Instant::now() + Duration::from_secs(90);
    let (waited, status, retry_after, body) = loop {
        let started = Instant::now();
        let r = deliver(&s, "orders/create", "outage-1", CREATE, Some(sign(SECRET, CREATE))).await;
        let waited = started.elapsed();
        let status = r.status();
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let body: Value = r.json().await.unwrap();
        if body["error"] != "delivery in flight; retry later" || Instant::now() > give_up {
            break (waited, status, retry_after, body);
        }
        eprintln!("the claim's outcome was unknown ({body}); retrying after its lease");
        let after = body["detail"]["retry_after_seconds"].as_u64().unwrap_or(10);
        tokio::time::sleep(Duration::from_secs(after)).await;
    };
    // On main the run was saved although its hold failed: a GENERATING phantom until its
    // lease ran out.
    let run = common::client().post(s.url("/runs")).bearer_auth(common::TOKEN).json(&json!({"quantity": 10}));
    let run = run.send().await.unwrap();
    let (run_status, run_body) = (run.status(), run.json::<Value>().await.unwrap());
    let (_, runs) = s.get_json("/runs").await;
    // A deployment that cannot reach the other instances is not reported done (on main
    // it was 201, and the other instances never got it).
    let deployed = s.deploy("order-rules", common::plugin("fixture_rules_v2"), false).await;
    let (deploy_status, deploy_body) = (deployed.status(), deployed.text().await.unwrap());
    tokio::task::spawn_blocking(|| common::local_services("start", "kafka")).await.unwrap();
    assert_eq!(deploy_status, 503, "{deploy_body}");
    assert!(deploy_body.contains("did not get it"), "{deploy_body}");
    assert_eq!(run_status, 503, "a run cannot hold NORMAL with the log down: {run_body}");
    assert_eq!(runs["items"], json!([]), "a run that never held NORMAL is not recorded: {runs}");
    // Shopify's 5 s are kept by the engine's 4 s append budget (or a quicker log error):
    // the answer names which, and the wall time is logged, not asserted (a busy machine).
    eprintln!("503 after {waited:?}: {body}");
    assert_eq!(status, 503, "the log is down: {body}");
    assert_eq!(body["error"], "the order log is unavailable; retry later", "{body}");
    assert!(body["detail"]["message"].as_str().is_some_and(|d| !d.is_empty()), "the answer says why: {body}");
    assert_eq!(retry_after.as_deref(), Some("5"));

    // Shopify retries with the same delivery id until it gets a 2xx.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = deliver(&s, "orders/create", "outage-1", CREATE, Some(sign(SECRET, CREATE))).await;
        if r.status() == 200 {
            assert_eq!(
                r.json::<Value>().await.unwrap()["status"],
                "accepted",
                "no mark was kept for the failed delivery"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the bridge never recovered: {}", r.status());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = deliver(&s, "orders/create", "outage-1", CREATE, Some(sign(SECRET, CREATE))).await;
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "duplicate");
    s.drain(Duration::from_secs(60)).await;
    let h = history(&s, "shopify-820982911946154508").await;
    assert_eq!(h.len(), 1, "applied exactly once: {h:?}");
    assert_eq!(h[0]["outcome"], "applied");
}
