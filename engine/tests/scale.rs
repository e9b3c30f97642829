//! Scale-out on Kafka + CQL: two engines share the partitions through one consumer
//! group; one is SIGKILLed mid-run, the other takes over, every event is applied exactly
//! once, and a WebSocket client on the survivor saw every change.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Server, client, created, distributed};
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const EVENTS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instance_hands_over_and_nothing_is_lost_or_doubled() {
    if !distributed() {
        eprintln!(
            "scale-out needs Kafka + CQL: it runs in the distributed pass (ORCHESTRATOR_TEST_BACKEND=distributed)"
        );
        return;
    }
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Server::start(dir_a.path()).await;
    let b = Server::start_beside(dir_b.path(), &a).await;
    let (ws, _) = tokio_tungstenite::connect_async(b.ws_url()).await.unwrap();
    let watcher = tokio::spawn(async move {
        let mut ws = ws;
        let mut seen = HashSet::new();
        while seen.len() < EVENTS {
            let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(120), ws.next()).await else { break };
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            match v["type"].as_str() {
                Some("order.synced") => {
                    seen.insert(v["order"]["id"].as_str().unwrap().to_string());
                }
                Some("resync") => panic!("the survivor's client fell behind"),
                _ => {}
            }
        }
        seen
    });

    for k in 0..EVENTS / 1000 {
        let chunk: Vec<Value> =
            (0..1000).map(|i| created(&format!("sc-{k}-{i}"), &format!("sc-{k}-{i}"), "GOLD", 100)).collect();
        assert_eq!(b.post_events(&Value::Array(chunk)).await.status(), 202);
    }
    // Kill A once it has done part of its share.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let applied = a.health().await["applied"].as_u64().unwrap_or(0);
        if applied >= 2_000 {
            eprintln!("killing A after it applied {applied}");
            break;
        }
        assert!(Instant::now() < deadline, "A never got a share of the partitions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill();
    b.drain(Duration::from_secs(180)).await;

    let seen = watcher.await.unwrap();
    let missed: Vec<String> =
        (0..EVENTS).map(|n| format!("sc-{}-{}", n / 1000, n % 1000)).filter(|id| !seen.contains(id)).take(20).collect();
    if !missed.is_empty() {
        for id in &missed {
            eprintln!("missed {id}: history {:?}", b.get_json(&format!("/orders/{id}/history")).await);
        }
        // Is it on the changelog topic at all? (Diagnosis: publish side or follow side.)
        if let Some(prefix) = b.kafka_prefix() {
            let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_default();
            let topic = format!("{prefix}.changes");
            let out = std::process::Command::new("kcat")
                .args(["-C", "-b", &brokers, "-t", &topic, "-o", "beginning", "-e", "-q", "-f", "%k %p %o\n"])
                .output();
            if let Ok(out) = out {
                let text = String::from_utf8_lossy(&out.stdout);
                for id in &missed {
                    let hits: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("{id} "))).collect();
                    eprintln!("changelog records of {id}: {hits:?}");
                }
            }
        }
    }
    assert_eq!(seen.len(), EVENTS, "the client on the survivor saw every order change; missed {missed:?}");
    let c = client();
    let ids: Vec<String> = (0..EVENTS).map(|n| format!("sc-{}-{}", n / 1000, n % 1000)).collect();
    let histories =
        futures::stream::iter(ids.iter().map(|id| {
            let (c, url) = (c.clone(), b.url(&format!("/orders/{id}/history")));
            async move {
                c.get(url).send().await.unwrap().json::<Value>().await.unwrap()["items"].as_array().unwrap().clone()
            }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    for h in &histories {
        assert_eq!(h.len(), 1, "applied exactly once: {h:?}");
        assert_eq!(h[0]["outcome"], "applied");
    }
    eprintln!("scale-out: {EVENTS} events applied exactly once across the kill; B saw {} changes", seen.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_on_one_instance_holds_every_instance() {
    if !distributed() {
        eprintln!("a cluster-wide pause needs two instances on Kafka: it runs in the distributed pass");
        return;
    }
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(dir_a.path()).await;
    let b = Server::start_beside(dir_b.path(), &a).await;
    // Both instances hold partitions: each has applied some of these.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut round = 0;
    loop {
        let warm: Vec<Value> =
            (0..40).map(|i| created(&format!("warm-{round}-{i}"), &format!("warm-{round}-{i}"), "GOLD", 100)).collect();
        assert_eq!(a.post_events(&Value::Array(warm)).await.status(), 202);
        a.drain(Duration::from_secs(60)).await;
        let applied = |h: Value| h["applied"].as_u64().unwrap_or(0);
        if applied(a.health().await) > 0 && applied(b.health().await) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the two instances never shared the partitions");
        round += 1;
    }
    assert_eq!(a.post_authorized("/queues/vip/pause").await.status(), 200);
    // B follows A's switch.
    while b.get_json("/queues/vip").await.1["paused"] != true {
        assert!(Instant::now() < deadline, "the pause never reached the other instance");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vip: Vec<Value> = (0..20).map(|i| created(&format!("pv-{i}"), &format!("pv-{i}"), "DIAMOND", 100)).collect();
    let normal: Vec<Value> = (0..20).map(|i| created(&format!("pn-{i}"), &format!("pn-{i}"), "SILVER", 100)).collect();
    assert_eq!(b.post_events(&Value::Array(vip)).await.status(), 202);
    assert_eq!(b.post_events(&Value::Array(normal)).await.status(), 202);
    // NORMAL, queued after the VIP events, runs on both instances; VIP waits on both.
    for i in 0..20 {
        while a.get_json(&format!("/orders/pn-{i}")).await.0 != 200 {
            assert!(Instant::now() < deadline, "NORMAL was held back by the paused VIP queue");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for i in 0..20 {
        assert_eq!(a.get_json(&format!("/orders/pv-{i}")).await.0, 404, "pv-{i} ran although VIP was paused");
    }
    assert_eq!(b.post_authorized("/queues/vip/resume").await.status(), 200);
    for i in 0..20 {
        while a.get_json(&format!("/orders/pv-{i}")).await.0 != 200 {
            assert!(Instant::now() < deadline, "VIP never ran after the resume");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_on_one_instance_reaches_the_other() {
    if !distributed() {
        eprintln!("plugin replication needs Kafka: it runs in the distributed pass");
        return;
    }
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(dir_a.path()).await;
    let b = Server::start_beside(dir_b.path(), &a).await;
    let wait_for = |s: &Server, version: u64| {
        let s = s.url("/plugins");
        async move {
            // 4 s alone; CI once needed over 30 s with the other scale tests beside it
            // (a debug build hashes and encodes the 20 MB several times on each side).
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let slots: Value = client().get(&s).send().await.unwrap().json().await.unwrap();
                if slots[0]["active"]["version"] == version {
                    return slots;
                }
                assert!(Instant::now() < deadline, "version {version} never became active at {s}: {slots}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // A component larger than a record (as Python's and JS's are) goes round in chunks.
    // On main it was refused on Kafka: one record carried at most about 6 MB.
    let large = common::padded(common::plugin("fixture_rules_v2"), 20 << 20);
    let size = large.len() as u64;
    let deployed = a.deploy_ok("order-rules", large, false).await;
    let on_b = wait_for(&b, 2).await;
    assert_eq!(on_b[0]["active"]["sha256"], deployed["sha256"], "the same bytes on B");
    assert_eq!(on_b[0]["active"]["size_bytes"].as_u64(), Some(size), "{on_b}");
    // Whichever instance processes it, v2 decides (free shipping from 150.00).
    let events: Vec<Value> =
        (0..50).map(|i| created(&format!("rep-{i}"), &format!("rep-{i}"), "GOLD", 16_000)).collect();
    assert_eq!(b.post_events(&Value::Array(events)).await.status(), 202);
    b.drain(Duration::from_secs(60)).await;
    for i in 0..50 {
        let (_, row) = b.get_json(&format!("/orders/rep-{i}")).await;
        assert_eq!(row["shipping_fee_cents"], 0, "{row}");
        assert!(row["decided_by"].as_str().unwrap().starts_with("order-rules@2#"));
    }
    // A rollback on B reaches A, with B's rollback stack: A has nothing earlier than v1
    // either (on main A pushed v1 on top of its own [1, 2] and rolled back to v2 next).
    assert_eq!(b.post_authorized("/plugins/order-rules/rollback").await.status(), 200);
    wait_for(&a, 1).await;
    assert_eq!(a.post_authorized("/plugins/order-rules/rollback").await.status(), 409);
    assert_eq!(b.active("order-rules").await.0, 1, "B's own state, come back round, changed nothing");
    // A version deployed and replaced since (v3), then the large one again, which sends
    // its chunks again.
    a.deploy_ok("order-rules", common::plugin("fixture_rules_v2"), false).await;
    wait_for(&b, 3).await;
    assert_eq!(a.post_authorized("/plugins/order-rules/versions/2/activate").await.status(), 200);
    wait_for(&b, 2).await;
    // A third instance catches up from the channel's start: it runs v2, keeps v3 for
    // `--to 3`, and compiles only what it runs (the built-in rules and resolver, and v2).
    let dir_c = tempfile::tempdir().unwrap();
    let c = Server::start_beside(dir_c.path(), &a).await;
    let on_c = wait_for(&c, 2).await;
    assert_eq!(on_c[0]["active"]["sha256"], deployed["sha256"], "the same bytes on C");
    let versions: Vec<u64> =
        on_c[0]["versions"].as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, [1, 2, 3], "{on_c}");
    let metrics = client().get(c.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let compiled =
        metrics.lines().find_map(|l| l.strip_prefix("orchestrator_plugin_compilations_total{source=\"compiled\"} "));
    assert_eq!(compiled, Some("3"), "C compiled the versions it runs only");
}
