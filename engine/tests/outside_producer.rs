//! Outside producers: the bridge process, and records written by `kcat` in the documented format (key: the
//! order id; value: an OrderEvent as JSON; topic by priority) are applied, and a
//! malformed one lands in the dead letters and on the dead-letter topic with its reason.

mod common;

use std::time::{Duration, Instant};

use common::{Server, created, distributed, kcat, service, updated};
use orchestrator::shopify::signature::sign;
use serde_json::Value;

const SECRET: &str = "bridge-secret";
const CREATE: &[u8] = include_bytes!("../src/shopify/fixtures/orders_create.json");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_records_are_applied_and_malformed_ones_dead_lettered() {
    if !distributed() {
        eprintln!("the outside-producer test needs Kafka: it runs in the distributed pass");
        return;
    }
    let brokers = service("KAFKA_BROKERS").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let prefix = s.kafka_prefix().unwrap();
    let vip = format!("{prefix}.vip");
    let normal = format!("{prefix}.normal");

    // A keyless, undecodable record on VIP first: it must reach the dead letters, or
    // NORMAL (which waits for VIP) would never run.
    kcat(&["-b", &brokers, "-P", "-t", &vip], "poison without a key");
    let normal_event = created("kcat-3", "kcat-3-created", "SILVER", 100).to_string();
    kcat(&["-b", &brokers, "-P", "-t", &normal, "-k", "kcat-3"], &normal_event);
    let good = created("kcat-1", "kcat-1-created", "DIAMOND", 4_200).to_string();
    kcat(&["-b", &brokers, "-P", "-t", &vip, "-k", "kcat-1"], &good);
    kcat(&["-b", &brokers, "-P", "-t", &normal, "-k", "kcat-2"], "{\"event_id\": \"oops\", not json");
    // A 200 KB note from outside the API: dead-lettered with the reason, and the order's
    // next event still applies (it used to block the order's changelog forever).
    let huge = updated("kcat-1", "kcat-1-huge", serde_json::json!({"note": "n".repeat(200_000)}));
    let next = updated("kcat-1", "kcat-1-after", serde_json::json!({"note": "after"})).to_string();
    kcat(&["-b", &brokers, "-P", "-t", &vip, "-k", "kcat-1"], &huge.to_string());
    kcat(&["-b", &brokers, "-P", "-t", &vip, "-k", "kcat-1"], &next);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, order) = s.get_json("/orders/kcat-1").await;
        if status == 200 {
            assert_eq!((order["priority"].as_str(), order["shipping_fee_cents"].as_i64()), (Some("VIP"), Some(999)));
            break;
        }
        assert!(Instant::now() < deadline, "the kcat record was never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let letter = loop {
        let (_, page) = s.get_json("/dead-letters").await;
        if let Some(l) = page["items"].as_array().unwrap().iter().find(|l| l["order_id"] == "kcat-2") {
            break l.clone();
        }
        assert!(Instant::now() < deadline, "the malformed record never reached the dead letters");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((letter["stage"].as_str(), letter["error_type"].as_str()), (Some("decode"), Some("malformed")));
    assert!(letter["reason"].as_str().unwrap().contains("key must be a string"), "{letter}");
    assert!(letter["payload"].as_str().unwrap().contains("not json"));
    while s.get_json("/orders/kcat-1").await.1["note"] != "after" {
        assert!(Instant::now() < deadline, "the event after the oversized one never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while s.get_json("/orders/kcat-3").await.0 != 200 {
        assert!(Instant::now() < deadline, "NORMAL never ran after a keyless poison record on VIP");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, page) = s.get_json("/dead-letters").await;
    let poison = page["items"].as_array().unwrap().iter().find(|l| l["payload"] == "poison without a key");
    let poison = poison.expect("the keyless record is dead-lettered");
    assert!(poison["id"].as_str().unwrap().starts_with("log:vip:"), "{poison}");
    assert_eq!(poison["order_id"], poison["id"], "filed under its place in the log: {poison}");
    let huge = page["items"].as_array().unwrap().iter().find(|l| l["order_id"] == "kcat-1").expect("a letter");
    assert!(huge["reason"].as_str().unwrap().contains("note must be at most 16384 bytes"), "{huge}");

    let on_topic =
        kcat(&["-b", &brokers, "-C", "-t", &format!("{prefix}.dlq"), "-o", "beginning", "-e", "-q", "-K", "|"], "");
    let line = on_topic
        .lines()
        .find(|l| l.starts_with("kcat-2|"))
        .unwrap_or_else(|| panic!("no dead letter for kcat-2 on the topic: {on_topic}"));
    let value: Value = serde_json::from_str(line.trim_start_matches("kcat-2|")).unwrap();
    assert_eq!(value["error_type"], "malformed");
    assert!(value["reason"].as_str().unwrap().contains("key must be a string"));
}

/// `orchestrator bridge` as a process of its own: it takes the webhook, puts the event on
/// Kafka, and the engine beside it applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_runs_as_its_own_process() {
    if !distributed() {
        eprintln!("the bridge produces to Kafka: it runs in the distributed pass");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = Server::start(dir.path()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut bridge = common::orchestrator()
        .args(["bridge", "--listen", &format!("127.0.0.1:{port}"), "--shopify-secret", SECRET])
        .args(engine.backend_args())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("{base}/health")).await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "the bridge did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = common::client()
        .post(format!("{base}/webhooks/shopify"))
        .header("x-shopify-topic", "orders/create")
        .header("x-shopify-webhook-id", "bridge-1")
        .header("x-shopify-hmac-sha256", sign(SECRET, CREATE))
        .body(CREATE.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.get_json("/orders/shopify-820982911946154508").await.0 != 200 {
        assert!(Instant::now() < deadline, "the engine never applied the bridged event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, audit) = common::client()
        .get(format!("{base}/webhooks/deliveries"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .map(|a| ((), a))
        .unwrap();
    assert_eq!(audit["items"][0]["outcome"], "received");
    bridge.kill().unwrap();
    bridge.wait().unwrap();
}
