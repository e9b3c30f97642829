//! The WebSocket change feed: changes arrive promptly, and a client that stops
//! reading neither slows the engine nor silently misses changes (it gets a resync).
//! The engine's pulse: a `stats` message each second, its last 10 minutes on connect.

mod common;

use std::time::{Duration, Instant};

use common::{Server, created};
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// The next message that is not the engine's pulse.
async fn next_json<S>(ws: &mut S) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let v = next_any(ws).await;
        if !v["type"].as_str().is_some_and(|t| t.starts_with("stats")) {
            return v;
        }
    }
}

async fn next_any<S>(ws: &mut S) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message in time")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test]
async fn synced_message_arrives_after_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let mut lags = Vec::new();
    for i in 0..20 {
        assert_eq!(s.post_events(&created(&format!("w-{i}"), &format!("w-{i}"), "GOLD", 100)).await.status(), 202);
        let msg = next_json(&mut ws).await;
        let received = chrono::Utc::now();
        assert_eq!(msg["type"], "order.synced");
        assert_eq!(msg["order"]["id"], format!("w-{i}"));
        assert_eq!(msg["order"]["version"], 1);
        let applied: chrono::DateTime<chrono::Utc> = msg["order"]["updated_at"].as_str().unwrap().parse().unwrap();
        lags.push((received - applied).num_microseconds().unwrap());
    }
    lags.sort();
    eprintln!(
        "WebSocket: applied-to-received p50 {} µs, max {} µs over {} changes",
        lags[lags.len() / 2],
        lags[lags.len() - 1],
        lags.len()
    );
}

/// With `?batch=true` a client takes each send cycle's changes as one `orders.synced`
/// message: 500 orders posted at once arrive as far fewer messages, each order once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batching_client_gets_many_changes_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?batch=true", s.ws_url())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let events: Vec<Value> = (0..500).map(|i| created(&format!("b-{i}"), &format!("b-{i}"), "GOLD", 100)).collect();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    let (mut seen, mut messages) = (std::collections::BTreeSet::new(), 0);
    while seen.len() < 500 {
        let msg = next_json(&mut ws).await;
        assert_eq!(msg["type"], "orders.synced", "{msg}");
        messages += 1;
        for o in msg["orders"].as_array().unwrap() {
            assert_eq!(o["version"], 1);
            assert!(seen.insert(o["id"].as_str().unwrap().to_string()), "{} twice", o["id"]);
        }
    }
    eprintln!("500 changes in {messages} messages");
    assert!(messages < 500, "one message per change: {messages}");
    assert!(seen.iter().all(|id| id.starts_with("b-")));
    // A query the feed does not know is refused, as JSON, before any upgrade.
    let refused = tokio_tungstenite::connect_async(format!("{}?batch=perhaps", s.ws_url())).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(answer) = refused else { panic!("{refused}") };
    assert_eq!(answer.status(), 400);
}

/// Each second a `stats` message says what the second did; a client that connects later
/// first gets the samples so far (`stats.history`), oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pulse_says_each_second_what_the_engine_did() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--shopify-secret", "shpss_pulse"]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    assert_eq!(next_any(&mut ws).await["type"], "hello");
    assert_eq!(next_any(&mut ws).await["type"], "stats.history");
    let events: Vec<Value> = (0..500).map(|i| created(&format!("p-{i}"), &format!("p-{i}"), "GOLD", 100)).collect();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    // An unsigned delivery: refused, and counted as such.
    let refused = common::client().post(s.url("/webhooks/shopify")).body("{}").send().await.unwrap();
    assert!(refused.status().is_client_error(), "{}", refused.status());
    s.drain(Duration::from_secs(30)).await;
    // Seconds later everything above has been sampled (a second may split it in two).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut ticks = Vec::new();
    while ticks.len() < 3 {
        let v = next_any(&mut ws).await;
        if v["type"] == "stats" {
            let sample = &v["sample"];
            assert!(sample["lag"]["normal"].is_u64() && sample["conflicts_per_s"].is_f64(), "{sample}");
            ticks.push(sample["at_ms"].as_i64().unwrap());
        }
    }
    // Each a later second; how far apart is a figure (a busy machine delays the timer).
    assert!(ticks.windows(2).all(|w| w[0] < w[1]), "one after another: {ticks:?}");
    eprintln!("pulse: samples {:?} ms apart", ticks.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>());
    // A client connecting now gets every second so far.
    let (mut late, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    assert_eq!(next_any(&mut late).await["type"], "hello");
    let history = next_any(&mut late).await;
    assert_eq!(history["type"], "stats.history");
    let samples = history["samples"].as_array().unwrap();
    assert!(samples.windows(2).all(|w| w[0]["at_ms"].as_i64() < w[1]["at_ms"].as_i64()), "oldest first");
    // A rate times its interval is the count of that second: the seconds add up exactly.
    let count = |rate: &dyn Fn(&Value) -> f64| {
        samples.iter().map(|s| rate(s) * s["interval_ms"].as_f64().unwrap() / 1000.0).sum::<f64>().round()
    };
    let applied =
        count(&|s| s["applied_per_s"]["vip"].as_f64().unwrap() + s["applied_per_s"]["normal"].as_f64().unwrap());
    assert_eq!(applied, 500.0, "{history}");
    assert_eq!(count(&|s| s["webhooks_per_s"]["rejected"].as_f64().unwrap()), 1.0, "{history}");
    assert_eq!(count(&|s| s["dead_letters_per_s"].as_f64().unwrap()), 0.0, "{history}");
    assert!(samples.iter().any(|s| s["latency_p99_ms"].as_f64().is_some_and(|ms| ms > 0.0)), "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_gets_a_resync_and_the_engine_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let (mut stalled, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let started = Instant::now();
    for k in 0..40 {
        let chunk: Vec<Value> =
            (0..1_000).map(|i| created(&format!("s-{k}-{i}"), &format!("s-{k}-{i}"), "GOLD", 100)).collect();
        assert_eq!(s.post_events(&Value::Array(chunk)).await.status(), 202);
    }
    s.drain(Duration::from_secs(120)).await;
    assert_eq!(s.health().await["applied"], 40_000);
    eprintln!("40k events applied in {:?} with a stalled WebSocket client", started.elapsed());

    // Now read: the client fell 16k+ changes behind, so it must have been told to resync.
    let mut synced = 0;
    loop {
        let v = next_json(&mut stalled).await;
        match v["type"].as_str().unwrap() {
            "resync" => break,
            "order.synced" | "hello" => synced += 1,
            other => panic!("unexpected {other}"),
        }
        assert!(synced < 40_000, "never told to resync");
    }
    eprintln!("stalled client read {synced} messages before its resync");
}

/// The cluster view (`GET /cluster`) and the pulse's cluster figures. On Kafka + CQL two
/// engines in one group each list both, with the partitions each consumes (disjoint,
/// covering every partition), the same plugin versions, and a pause made on one seen
/// by both; each `stats` sample carries the group's figures with both instances. On the
/// embedded default the view is the one instance, and samples carry no cluster part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_view_lists_every_instance_with_its_partitions() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(a_dir.path()).await;
    if !common::distributed() {
        let (status, view) = a.get_json("/cluster").await;
        assert_eq!(status, 200, "{view}");
        assert_eq!((view["this"].as_str(), view["instances"].as_array().map(Vec::len)), (Some("embedded"), Some(1)));
        assert!(view["placement"].is_null() && view["plugins_agree"] == true, "{view}");
        let deciding = view["instances"][0]["deciding"]["order-rules"].as_str().unwrap();
        assert!(deciding.starts_with("order-rules@1#sha256:"), "{deciding}");
        let (mut ws, _) = tokio_tungstenite::connect_async(a.ws_url()).await.unwrap();
        let stats = loop {
            let m = next_any(&mut ws).await;
            if m["type"] == "stats" {
                break m;
            }
        };
        assert!(stats["sample"].get("cluster").is_none(), "no cluster part on one instance: {stats}");
        return;
    }
    let b = Server::start_beside(b_dir.path(), &a).await;
    // Beacons go each second; a rebalance gives each its partitions within a few.
    let deadline = Instant::now() + Duration::from_secs(60);
    let view = loop {
        let (_, view) = a.get_json("/cluster").await;
        let held: Vec<i64> = view["instances"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|i| i["partitions"]["normal"].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()))
            .collect();
        let all = view["placement"]["normal"].as_array().map_or(0, Vec::len);
        let both_hold = view["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| !i["partitions"]["normal"].as_array().unwrap().is_empty());
        let mut distinct = held.clone();
        distinct.sort();
        distinct.dedup();
        // While a rebalance goes, an instance may still say it holds what it gave up.
        let once_each = held.len() == all && distinct.len() == all;
        if view["instances"].as_array().unwrap().len() == 2 && both_hold && all > 0 && once_each {
            break view;
        }
        assert!(Instant::now() < deadline, "the view never showed both instances, each partition held once: {view}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(view["plugins_agree"], true, "{view}");
    let names: Vec<&str> =
        view["instances"].as_array().unwrap().iter().map(|i| i["instance"].as_str().unwrap()).collect();
    assert!(names.contains(&view["this"].as_str().unwrap()), "{view}");

    // A pause made on A shows in B's view of both.
    assert_eq!(a.post_authorized("/queues/vip/pause").await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, view) = b.get_json("/cluster").await;
        let paused = view["instances"].as_array().unwrap().iter().filter(|i| i["paused"]["vip"] == true).count();
        if paused == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "B never saw the pause on both instances: {view}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(a.post_authorized("/queues/vip/resume").await.status(), 200);

    // B's pulse carries the group's figures, one entry per instance.
    let (mut ws, _) = tokio_tungstenite::connect_async(b.ws_url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = next_any(&mut ws).await;
        if m["type"] == "stats" && m["sample"]["cluster"]["instances"].as_array().is_some_and(|i| i.len() == 2) {
            let c = &m["sample"]["cluster"];
            assert!(c["applied_per_s"]["vip"].is_f64() && c["conflicts_per_s"].is_f64(), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "no stats with both instances on B: {m}");
    }
}
