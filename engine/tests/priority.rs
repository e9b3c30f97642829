//! Strict priority: VIP events are applied before NORMAL ones, both when everything
//! is queued up front and when VIP arrives while NORMAL is being processed.

mod common;

use std::time::Duration;

use common::{Server, created, updated};
use futures::StreamExt;
use orchestrator::domain::{OrderEvent, Priority};
use orchestrator::engine::{Backend, Engine, EngineConfig};
use orchestrator::store::Outcome;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

fn event(v: Value) -> OrderEvent {
    serde_json::from_value(v).unwrap()
}

/// 10k NORMAL queued, then 1k VIP: every VIP is applied before any NORMAL.
#[tokio::test]
async fn queued_vip_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(Backend::Embedded, dir.path(), EngineConfig::default()).await.unwrap();
    for p in Priority::ALL {
        engine.pauses().set(p, true);
    }
    let normal: Vec<_> =
        (0..10_000).map(|i| event(created(&format!("n-{i}"), &format!("n-{i}"), "BRONZE", 100))).collect();
    let vip: Vec<_> =
        (0..1_000).map(|i| event(created(&format!("v-{i}"), &format!("v-{i}"), "DIAMOND", 100))).collect();
    engine.ingest(&normal).await.unwrap();
    engine.ingest(&vip).await.unwrap();
    let mut changes = engine.changes().subscribe();
    engine.start().await.unwrap();
    for p in Priority::ALL {
        engine.pauses().set(p, false);
    }
    let mut order = Vec::with_capacity(11_000);
    while order.len() < 11_000 {
        let c =
            tokio::time::timeout(Duration::from_secs(30), changes.recv()).await.expect("changes keep coming").unwrap();
        order.push(c.order.priority);
    }
    let first_normal = order.iter().position(|p| *p == Priority::Normal).unwrap();
    assert_eq!(first_normal, 1_000, "all 1000 VIP events before the first NORMAL one");
    assert!(order[1_000..].iter().all(|p| *p == Priority::Normal));
    engine.shutdown().await;
}

/// An order keeps its partition when a later event names another tier: an update that
/// upgrades a GOLD order to DIAMOND, in the same request as its create or after it, goes
/// behind the create and applies (it used to overtake it on VIP and be dead-lettered).
#[tokio::test]
async fn a_tier_upgrade_follows_its_orders_earlier_events() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(Backend::Embedded, dir.path(), EngineConfig::default()).await.unwrap();
    // Both queues are held until everything is on the log, so VIP would run first.
    for p in Priority::ALL {
        engine.pauses().set(p, true);
    }
    let upgrade = |id: &str, event: &str, note: &str| {
        self::event(updated(id, event, serde_json::json!({"tier": "DIAMOND", "note": note})))
    };
    let same_request = [event(created("up-1", "up-1-c", "GOLD", 100)), upgrade("up-1", "up-1-u", "upgraded")];
    engine.ingest(&same_request).await.unwrap();
    engine.start().await.unwrap();
    // The second order's create is applied first; its upgrade comes in a later request.
    engine.pauses().set(Priority::Normal, false);
    engine.ingest(&[event(created("up-2", "up-2-c", "SILVER", 100))]).await.unwrap();
    let stored = |id: &'static str| {
        let engine = engine.clone();
        async move {
            for _ in 0..600 {
                if let Some(o) = engine.order(id).await.unwrap() {
                    return o;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{id} was never stored");
        }
    };
    stored("up-2").await;
    engine.pauses().set(Priority::Normal, true);
    engine.ingest(&[upgrade("up-2", "up-2-u", "later")]).await.unwrap();
    for p in Priority::ALL {
        engine.pauses().set(p, false);
    }
    for (id, note) in [("up-1", "upgraded"), ("up-2", "later")] {
        let mut row = stored(id).await;
        for _ in 0..600 {
            if row.version == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            row = stored(id).await;
        }
        assert_eq!((row.version, row.note.as_str(), row.tier.as_str()), (2, note, "DIAMOND"), "{row:?}");
        let outcomes: Vec<_> =
            engine.history(id, 100, None).await.unwrap().unwrap().items.iter().map(|h| h.outcome).collect();
        assert_eq!(outcomes, [Outcome::Applied, Outcome::Applied], "{id}: the create, then the upgrade");
    }
    assert!(engine.dead_letters(10, None).await.unwrap().items.is_empty(), "nothing dead-lettered");
    engine.shutdown().await;
}

/// `orchestrator_received_events_total` of one priority, read from `/metrics`.
async fn received(s: &Server, priority: &str) -> u64 {
    let text = common::client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let series = format!("orchestrator_received_events_total{{priority=\"{priority}\"}} ");
    let line = text.lines().find(|l| l.starts_with(&series)).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    line[series.len()..].trim().parse().unwrap()
}

/// An order's events follow its first one: an update with no tier, sent while the
/// order's DIAMOND create still waits on a paused VIP, queues behind the create on VIP.
/// It used to go NORMAL (no stored row yet), and once the create was applied a later
/// update went VIP and overtook it: the fault suite found it (seed 1).
#[tokio::test]
async fn an_update_follows_its_create_while_the_create_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    for p in ["vip", "normal"] {
        assert_eq!(s.post_authorized(&format!("/queues/{p}/pause")).await.status(), 200);
    }
    assert_eq!(s.post_events(&created("route-1", "route-1-c", "DIAMOND", 100)).await.status(), 202);
    let first = updated("route-1", "route-1-a", serde_json::json!({"note": "first"}));
    assert_eq!(s.post_events(&first).await.status(), 202);
    // The metric counts where the events went, not the priority they asked for.
    assert_eq!((received(&s, "vip").await, received(&s, "normal").await), (2, 0), "both went VIP");
    assert_eq!(s.post_authorized("/queues/vip/resume").await.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while s.get_json("/orders/route-1").await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "route-1 was never created: {}", s.health().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = updated("route-1", "route-1-b", serde_json::json!({"note": "second"}));
    assert_eq!(s.post_events(&second).await.status(), 202);
    assert_eq!(s.post_authorized("/queues/normal/resume").await.status(), 200);
    s.drain(Duration::from_secs(60)).await;
    let h: Vec<(String, String)> = common::history(&s, "route-1")
        .await
        .iter()
        .map(|e| (e["event_id"].as_str().unwrap().into(), e["outcome"].as_str().unwrap().into()))
        .collect();
    let applied = |id: &str| (id.to_string(), "applied".to_string());
    assert_eq!(h, [applied("route-1-c"), applied("route-1-a"), applied("route-1-b")], "in the order produced");
    let row = s.get_json("/orders/route-1").await.1;
    assert_eq!((row["note"].as_str(), row["version"].as_u64()), (Some("second"), Some(3)), "{row}");
}

/// Events that reach the pipeline before their order's create wait for it: an update
/// produced before its create in one request fixes the order's route (NORMAL: it names
/// no tier), so the DIAMOND create follows it there, and it is parked until the create
/// is applied. An update sent after a create that waits on a paused VIP queues behind it.
#[tokio::test]
async fn an_event_before_its_create_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    assert_eq!(s.post_authorized("/queues/vip/pause").await.status(), 200);
    assert_eq!(s.post_events(&created("early-1", "early-1-c", "DIAMOND", 100)).await.status(), 202);
    // Its route is VIP (the create's): it waits behind the held create, never parked.
    let paid = updated("early-1", "early-1-paid", serde_json::json!({"financial_status": "paid"}));
    assert_eq!(s.post_events(&paid).await.status(), 202);
    let reversed = serde_json::json!([
        updated("early-2", "early-2-u", serde_json::json!({"note": "before its create"})),
        created("early-2", "early-2-c", "SILVER", 100),
    ]);
    assert_eq!(s.post_events(&reversed).await.status(), 202);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // early-2's update parked, then applied after its create.
    while s.health().await["parked"].as_u64() < Some(1) || s.get_json("/orders/early-2").await.1["version"] != 2 {
        assert!(std::time::Instant::now() < deadline, "early-2's update was never applied: {}", s.health().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let h = s.health().await;
    // (A redelivery after a Kafka rebalance parks again: at least one.)
    assert!(h["parked"].as_u64() >= Some(1), "early-2's update parked: {h}");
    assert_eq!(s.get_json("/orders/early-1").await.0, 404, "early-1's create is still held");
    assert_eq!(s.get_json("/orders/early-2").await.1["note"], "before its create");

    assert_eq!(s.post_authorized("/queues/vip/resume").await.status(), 200);
    while s.get_json("/orders/early-1").await.1["version"] != 2 {
        assert!(std::time::Instant::now() < deadline, "early-1's update was never applied: {}", s.health().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let row = s.get_json("/orders/early-1").await.1;
    assert_eq!((row["status"].as_str(), row["priority"].as_str()), (Some("CONFIRMED"), Some("VIP")), "{row}");
    for (id, events) in [("early-1", ["early-1-c", "early-1-paid"]), ("early-2", ["early-2-c", "early-2-u"])] {
        let h: Vec<(String, String)> = common::history(&s, id)
            .await
            .iter()
            .map(|e| (e["event_id"].as_str().unwrap().into(), e["outcome"].as_str().unwrap().into()))
            .collect();
        assert_eq!(h, events.map(|e| (e.to_string(), "applied".to_string())), "{id}: the create, then the update");
    }
    assert_eq!(s.get_json("/dead-letters").await.1["items"], serde_json::json!([]), "nothing dead-lettered");
}

/// An operator's pause holds its priority across a restart, and never holds the other
/// priority back.
#[tokio::test]
async fn a_pause_survives_a_restart_and_leaves_the_other_priority_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path()).await;
    assert_eq!(s.post_authorized("/queues/vip/pause").await.status(), 200);
    assert_eq!(s.post_events(&created("held-v", "held-v", "DIAMOND", 100)).await.status(), 202);
    assert_eq!(s.post_events(&created("free-n", "free-n", "BRONZE", 100)).await.status(), 202);
    applied(&s, "free-n").await;
    assert_eq!(s.get_json("/orders/held-v").await.0, 404, "VIP is paused");

    s.restart().await;
    assert_eq!(s.get_json("/queues/vip").await.1["paused"], true, "the pause outlived the restart");
    assert_eq!(s.post_events(&created("free-n2", "free-n2", "BRONZE", 100)).await.status(), 202);
    applied(&s, "free-n2").await;
    assert_eq!(s.get_json("/orders/held-v").await.0, 404, "still paused after the restart");
    assert_eq!(s.post_authorized("/queues/vip/resume").await.status(), 200);
    applied(&s, "held-v").await;
}

/// Waits until the order is stored.
async fn applied(s: &Server, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while s.get_json(&format!("/orders/{id}")).await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "{id} was never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With NORMAL being processed, a burst of VIP preempts it, and NORMAL events queued
/// after the VIP burst start only after every VIP event is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vip_preempts_normal_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--batch-size", "256"]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let normal: Vec<Value> =
        (0..10_000).map(|i| created(&format!("n-{i}"), &format!("n-{i}"), "SILVER", 100)).collect();
    for chunk in normal.chunks(2_000) {
        assert_eq!(s.post_events(&Value::Array(chunk.to_vec())).await.status(), 202);
    }
    let vip: Vec<Value> = (0..1_000).map(|i| created(&format!("v-{i}"), &format!("v-{i}"), "DIAMOND", 100)).collect();
    assert_eq!(s.post_events(&Value::Array(vip)).await.status(), 202);
    let late: Vec<Value> =
        (0..1_000).map(|i| created(&format!("late-{i}"), &format!("late-{i}"), "GOLD", 100)).collect();
    assert_eq!(s.post_events(&Value::Array(late)).await.status(), 202);

    let mut ids = Vec::with_capacity(12_000);
    while ids.len() < 12_000 {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("changes keep coming")
            .unwrap()
            .unwrap();
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(&text).unwrap();
        match v["type"].as_str() {
            Some("order.synced") => ids.push(v["order"]["id"].as_str().unwrap().to_string()),
            // The engine's pulse (once a second) is not a change.
            Some("hello" | "stats" | "stats.history") => {}
            other => panic!("unexpected message {other:?}: {v}"),
        }
    }
    let first_vip = ids.iter().position(|id| id.starts_with("v-")).unwrap();
    let last_vip = ids.iter().rposition(|id| id.starts_with("v-")).unwrap();
    let first_late = ids.iter().position(|id| id.starts_with("late-")).unwrap();
    let normal_after_vip = ids[last_vip..].iter().filter(|id| id.starts_with("n-")).count();
    eprintln!(
        "first VIP at {first_vip}, last VIP at {last_vip}, first late NORMAL at {first_late}, \
         {normal_after_vip} early NORMAL after the VIPs"
    );
    assert_eq!(last_vip - first_vip, 999, "no NORMAL event between the first and the last VIP");
    assert!(first_late > last_vip, "NORMAL queued after the VIP burst starts only after it");
    assert!(
        normal_after_vip > 0,
        "the VIP burst arrived while NORMAL work was still queued (else this test shows nothing)"
    );
}
