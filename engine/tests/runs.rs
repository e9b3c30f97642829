//! Generated runs through the real binary: phases in order on the WebSocket, persisted
//! metrics that add up, verification, cancel then a new run, reset, and bad requests.
//! The small run also runs in the distributed pass (Kafka + Cassandra).

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{Server, TOKEN, client, created};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn post(s: &Server, path: &str, body: Value, token: bool) -> (u16, Value) {
    let mut r = client().post(s.url(path)).json(&body);
    if token {
        r = r.bearer_auth(TOKEN);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn wait_final(s: &Server, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, run) = s.get_json(&format!("/runs/{id}")).await;
        assert_eq!(code, 200, "{run}");
        if ["DONE", "CANCELLED", "FAILED"].contains(&run["phase"].as_str().unwrap()) {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} did not end in {timeout:?}: {run}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn at(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap_or_else(|| panic!("a timestamp, got {v}")).parse().unwrap()
}

/// All stored orders whose id starts with `prefix`, through the public list API.
async fn stored_ids(s: &Server, prefix: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("/orders?limit=1000&sort=id&q={prefix}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let (code, page) = s.get_json(&url).await;
        assert_eq!(code, 200, "{page}");
        out.extend(
            page["items"].as_array().unwrap().iter().filter(|o| o["id"].as_str().unwrap().starts_with(prefix)).cloned(),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_run_goes_through_its_phases_and_verifies() {
    // Enough for several progress messages; Kafka + CQL's debug-build conditional writes
    // take about 4 s per thousand, so a third of it there.
    let quantity: u64 = if common::distributed() { 3_000 } else { 10_000 };
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let (ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let watcher = tokio::spawn(async move {
        let mut ws = ws;
        let mut phases = Vec::new();
        // (engine-clock ms, orders processed, phases seen before it) of each progress message.
        let mut progress = Vec::new();
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(120), ws.next()).await {
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            match v["type"].as_str() {
                Some("run.phase") => {
                    let phase = v["phase"].as_str().unwrap().to_string();
                    phases.push(phase.clone());
                    if phase == "DONE" || phase == "FAILED" {
                        break;
                    }
                }
                Some("run.progress") => {
                    let ms = v["elapsed_ms"].as_u64().unwrap_or_else(|| panic!("progress without elapsed_ms: {v}"));
                    let done = v["run"]["vip"]["processed"].as_u64().unwrap()
                        + v["run"]["normal"]["processed"].as_u64().unwrap();
                    progress.push((ms, done, phases.len()));
                }
                _ => {}
            }
        }
        (phases, progress)
    });

    let (code, run) = post(
        &s,
        "/runs",
        json!({"quantity": quantity, "tier_mix": {"DIAMOND": 10, "GOLD": 20, "SILVER": 30, "BRONZE": 40}}),
        true,
    )
    .await;
    assert_eq!(code, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    assert_eq!(run["phase"], "GENERATING");
    // A second run while this one is active is refused.
    let (code, body) = post(&s, "/runs", json!({"quantity": 5}), true).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["detail"]["run_id"], id.as_str());

    let run = wait_final(&s, &id, Duration::from_secs(180)).await;
    assert_eq!(run["phase"], "DONE", "{run}");
    let (phases, progress) = watcher.await.unwrap();
    assert_eq!(phases, ["GENERATING", "VIP_PROCESSING", "VIP_DRAINED", "NORMAL_PROCESSING", "DONE"]);
    // At most one progress message per 250 ms of the engine's clock (phase changes are
    // `run.phase`, not progress), judged by the engine's stamps, never by arrival times,
    // which a busy machine bunches up. Counts only grow, and all of it precedes DONE.
    assert!(!progress.is_empty(), "a run of {quantity} sends progress");
    for pair in progress.windows(2) {
        let ((a, done_a, _), (b, done_b, _)) = (pair[0], pair[1]);
        assert!(b >= a + 250, "progress stamped {a} ms then {b} ms into the run");
        assert!(done_b >= done_a, "processed went back from {done_a} to {done_b}");
    }
    assert!(
        progress.iter().all(|&(_, _, seen)| (1..phases.len()).contains(&seen)),
        "progress between GENERATING and DONE"
    );

    // The verification the engine recorded, and the metrics adding up.
    let v = &run["verification"];
    assert_eq!(v["passed"], true, "{run}");
    assert_eq!(v["generated"], quantity);
    assert_eq!(v["stored"], quantity);
    assert_eq!(v["applied_entries"], quantity);
    assert_eq!(v["vip_before_normal"], true);
    let (vip, normal) = (&run["vip"], &run["normal"]);
    assert_eq!(vip["count"].as_u64().unwrap() + normal["count"].as_u64().unwrap(), quantity);
    assert_eq!(vip["processed"], vip["count"]);
    assert_eq!(normal["processed"], normal["count"]);
    // 10% DIAMOND: VIP is far from empty and far from all.
    assert!((quantity / 20..quantity / 5).contains(&vip["count"].as_u64().unwrap()), "{vip}");
    let (start, end) = (at(&run["started_at"]), at(&run["ended_at"]));
    for w in [vip, normal] {
        let (ws, we) = (at(&w["started_at"]), at(&w["ended_at"]));
        assert!(start <= ws && ws <= we && we <= end, "window {w} outside the run {start}..{end}");
        assert_eq!(w["duration_ms"].as_i64().unwrap(), (we - ws).num_milliseconds());
        assert!(w["orders_per_s"].as_f64().unwrap() > 0.0);
    }
    assert!(at(&vip["ended_at"]) <= at(&normal["started_at"]), "VIP finished before NORMAL started");
    assert_eq!(run["total_ms"].as_i64().unwrap(), (end - start).num_milliseconds());
    assert!(run["generation_ms"].as_u64().unwrap() <= run["total_ms"].as_u64().unwrap());
    assert_eq!(run["progress_percent"], 100.0);
    let (p50, p99) = (run["latency_p50_ms"].as_f64().unwrap(), run["latency_p99_ms"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99, "p50 {p50} p99 {p99}");
    assert_eq!(run["dead_letters"], 0);

    // The record is persisted: by id and in the history.
    let (_, stored) = s.get_json(&format!("/runs/{id}")).await;
    assert_eq!(stored, run);
    let (_, history) = s.get_json("/runs").await;
    assert_eq!(history["items"][0]["id"], id.as_str());
    let (_, current) = s.get_json("/runs/current").await;
    assert_eq!(current["id"], id.as_str());

    // Checked independently through the orders API: every order once, decided by the rules.
    let orders = stored_ids(&s, &id).await;
    assert_eq!(orders.len() as u64, quantity);
    let vips = orders.iter().filter(|o| o["priority"] == "VIP").count() as u64;
    assert_eq!(vips, vip["count"].as_u64().unwrap());
    for o in orders.iter().step_by(997) {
        assert_eq!(o["version"], 1, "{o}");
        assert!(o["decided_by"].as_str().unwrap().starts_with("order-rules@"), "{o}");
        let h = common::history(&s, o["id"].as_str().unwrap()).await;
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[0]["source"], "generator");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_then_a_new_run_then_reset() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let (code, run) = post(&s, "/runs", json!({"quantity": 300_000}), true).await;
    assert_eq!(code, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    // Cancel once it is under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, r) = s.get_json(&format!("/runs/{id}")).await;
        if r["generated"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the run never generated: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(post(&s, &format!("/runs/{id}/cancel"), json!({}), false).await.0, 401);
    let (code, cancelled) =
        post(&s, &format!("/runs/{id}/cancel"), json!({"purge": true, "delete_pending": true}), true).await;
    assert_eq!(code, 200, "{cancelled}");
    assert_eq!(cancelled["phase"], "CANCELLED");
    let report = &cancelled["cancel"];
    assert_eq!(report["purged"], true);
    let produced = report["produced"].as_u64().unwrap();
    assert!(produced > 0 && produced < 300_000, "{report}");
    assert!(report["unprocessed"].as_u64().unwrap() <= produced);
    // Cancelling again: it has ended.
    assert_eq!(post(&s, &format!("/runs/{id}/cancel"), json!({}), true).await.0, 409);
    assert_eq!(post(&s, "/runs/run-nope/cancel", json!({}), true).await.0, 404);

    // A new run starts at once and finishes, verified, while the purge drains the old one.
    let (code, next) = post(&s, "/runs", json!({"quantity": 2_000}), true).await;
    assert_eq!(code, 201, "{next}");
    let next = wait_final(&s, next["id"].as_str().unwrap(), Duration::from_secs(180)).await;
    assert_eq!(next["phase"], "DONE", "{next}");
    assert_eq!(next["verification"]["passed"], true, "{next}");

    // The cancelled run's purged events left no rows, and no PENDING order of it remains.
    s.drain(Duration::from_secs(120)).await;
    let left = stored_ids(&s, &id).await;
    assert!(left.len() as u64 <= produced);
    assert!(left.iter().all(|o| o["status"] != "PENDING"), "a PENDING order of the cancelled run survived");
    let (_, persisted) = s.get_json(&format!("/runs/{id}")).await;
    assert_eq!(persisted["phase"], "CANCELLED");

    // Reset: guarded, then everything is gone.
    assert_eq!(post(&s, "/reset", json!({"confirm": "reset"}), false).await.0, 401);
    assert_eq!(post(&s, "/reset", json!({"confirm": "yes"}), true).await.0, 400);
    let (code, body) = post(&s, "/reset", json!({"confirm": "reset"}), true).await;
    assert_eq!(code, 200, "{body}");
    let (_, orders) = s.get_json("/orders?limit=10").await;
    assert_eq!(orders["items"].as_array().unwrap().len(), 0, "{orders}");
    let (_, runs) = s.get_json("/runs").await;
    assert_eq!(runs["items"].as_array().unwrap().len(), 0, "{runs}");
    let (_, letters) = s.get_json("/dead-letters").await;
    assert_eq!(letters["items"].as_array().unwrap().len(), 0, "{letters}");
    assert_eq!(s.get_json("/runs/current").await.0, 404);
}

/// Starts a run that holds NORMAL for a while (300k orders) and waits until it generates.
async fn a_run_under_way(s: &Server) -> String {
    let (code, run) = post(s, "/runs", json!({"quantity": 300_000}), true).await;
    assert_eq!(code, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.get_json(&format!("/runs/{id}")).await.1["generated"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < deadline, "run {id} never generated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.get_json("/queues/normal").await.1["held_by_run"], true);
    id
}

/// After a cancel, whatever became of it: NORMAL is free again and a new run starts.
async fn assert_released(s: &Server) {
    let (_, normal) = s.get_json("/queues/normal").await;
    assert_eq!(normal["held_by_run"], false, "the cancelled run still holds NORMAL: {normal}");
    let (code, next) = post(s, "/runs", json!({"quantity": 10}), true).await;
    assert_eq!(code, 201, "{next}");
    assert_eq!(wait_final(s, next["id"].as_str().unwrap(), Duration::from_secs(120)).await["phase"], "DONE");
}

/// A cancel whose store work fails (the store refuses to read the run's orders) still
/// ends the run, FAILED with the reason, and lets NORMAL go: on main the run stayed
/// active with its generator stopped and NORMAL held for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_the_store_refuses_still_ends_the_run_and_its_hold() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let id = a_run_under_way(&s).await;
    let store = rusqlite::Connection::open(dir.path().join("store.sqlite")).unwrap();
    store.busy_timeout(Duration::from_secs(10)).unwrap();
    store.execute_batch("ALTER TABLE orders RENAME TO orders_away").unwrap();
    let (code, body) = post(&s, &format!("/runs/{id}/cancel"), json!({"purge": true}), true).await;
    store.execute_batch("ALTER TABLE orders_away RENAME TO orders").unwrap();
    assert!(code >= 500, "the cancel could not count the run's orders: {code} {body}");
    assert!(body["error"].as_str().is_some(), "a JSON error: {body}");
    let (_, run) = s.get_json(&format!("/runs/{id}")).await;
    assert_eq!(run["phase"], "FAILED", "{run}");
    assert!(run["error"].as_str().unwrap().contains("cancelled, but"), "{run}");
    assert_released(&s).await;
}

/// A reset empties the log too: events queued behind a pause when it came are never
/// applied after it, and the engine takes new events at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_drops_what_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    for q in ["vip", "normal"] {
        assert_eq!(s.post_authorized(&format!("/queues/{q}/pause")).await.status(), 200);
    }
    let queued = json!([created("queued-1", "q1", "GOLD", 100), created("queued-2", "q2", "DIAMOND", 100)]);
    assert_eq!(s.post_events(&queued).await.status(), 202);
    let (code, body) = post(&s, "/reset", json!({"confirm": "reset"}), true).await;
    assert_eq!(code, 200, "{body}");
    for q in ["vip", "normal"] {
        assert_eq!(s.post_authorized(&format!("/queues/{q}/resume")).await.status(), 200);
    }
    assert_eq!(s.post_events(&created("after-reset", "a1", "GOLD", 100)).await.status(), 202);
    s.drain(Duration::from_secs(60)).await;
    assert_eq!(s.get_json("/orders/after-reset").await.0, 200, "an event after the reset is applied");
    for id in ["queued-1", "queued-2"] {
        assert_eq!(s.get_json(&format!("/orders/{id}")).await.0, 404, "{id} was queued before the reset");
    }
}

/// A reset stops every instance on the log before it empties the store, and each drops
/// what it fetched from before the reset. On main only the instance that took the reset
/// stopped: the other went on applying its share of the backlog into the emptied store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_stops_every_instance_first() {
    if !common::distributed() {
        return; // One instance: `a_reset_drops_what_is_queued`.
    }
    let brokers = common::service("KAFKA_BROKERS").unwrap();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(a_dir.path()).await;
    let b = Server::start_beside(b_dir.path(), &a).await;
    // A backlog for both, produced from outside (kcat: key, tab, event).
    let normal = format!("{}.normal", a.kafka_prefix().unwrap());
    let lines: String = (0..40_000)
        .map(|i| format!("r{i}\t{}\n", created(&format!("r{i}"), &format!("r{i}-c"), "SILVER", 100)))
        .collect();
    common::kcat(&["-b", &brokers, "-P", "-t", &normal, "-K", "\t"], &lines);
    let applied = r#"orchestrator_applied_events_total{priority="normal"}"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::counter(&a, applied).await == 0 || common::counter(&b, applied).await == 0 {
        assert!(Instant::now() < deadline, "both instances never took a share of the backlog");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = post(&a, "/reset", json!({"confirm": "reset"}), true).await;
    assert_eq!(code, 200, "{body}");
    let counts = (common::counter(&a, applied).await, common::counter(&b, applied).await);
    assert!(counts.0 + counts.1 < 40_000, "the reset came before the backlog's end: {counts:?}");
    // Nothing from before the reset is applied after it, by either instance.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, page) = a.get_json("/orders?limit=5").await;
    assert_eq!(page["items"], json!([]), "rows from before the reset came back");
    // Both go on: events after the reset are applied, sent to either instance.
    for (s, id) in [(&a, "after-a"), (&b, "after-b")] {
        assert_eq!(s.post_events(&created(id, id, "GOLD", 100)).await.status(), 202);
    }
    for id in ["after-a", "after-b"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.get_json(&format!("/orders/{id}")).await.0 != 200 {
            assert!(Instant::now() < deadline, "{id}, sent after the reset, was never applied");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_run_requests_get_clear_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--max-run-quantity", "1000"]).await;
    for (body, want) in [
        (json!({"quantity": 0}), 400),
        (json!({"quantity": -5}), 400),
        (json!({"quantity": 1001}), 400),
        (json!({"quantity": "ten"}), 400),
        (json!({"quantity": 10, "tier_mix": {"DIAMOND": 50, "GOLD": 50, "SILVER": 50, "BRONZE": 50}}), 400),
        (json!({"quantity": 10, "extra": true}), 400),
    ] {
        let (code, err) = post(&s, "/runs", body.clone(), true).await;
        assert_eq!(code, want, "{body} → {err}");
        assert!(err["error"].as_str().is_some_and(|e| !e.is_empty()), "a clear error for {body}: {err}");
    }
    let (code, err) = post(&s, "/runs", json!({"quantity": 1001}), true).await;
    assert!(err["detail"]["message"].as_str().unwrap().contains("1000"), "{code} {err}");
    assert_eq!(post(&s, "/runs", json!({"quantity": 10}), false).await.0, 401);
    let raw = client()
        .post(s.url("/runs"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    assert_eq!(s.get_json("/runs/run-missing").await.0, 404);
    assert_eq!(s.get_json("/runs?limit=0").await.0, 400);

    // Queues: token required, unknown queue 404, pause then resume.
    assert_eq!(post(&s, "/queues/vip/pause", json!({}), false).await.0, 401);
    assert_eq!(post(&s, "/queues/gold/pause", json!({}), true).await.0, 404);
    let (code, q) = post(&s, "/queues/normal/pause", json!({}), true).await;
    assert_eq!((code, &q["paused"]), (200, &json!(true)));
    // Paused NORMAL: a NORMAL order waits on the log.
    assert_eq!(s.post_events(&common::created("q-1", "q-1", "GOLD", 1000)).await.status(), 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.get_json("/orders/q-1").await.0, 404);
    assert_eq!(s.health().await["queue_depth"]["normal"], 1);
    let (code, q) = post(&s, "/queues/normal/resume", json!({}), true).await;
    assert_eq!((code, &q["paused"]), (200, &json!(false)));
    s.drain(Duration::from_secs(30)).await;
    assert_eq!(s.get_json("/orders/q-1").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_cut_short_by_a_crash_is_marked_failed_and_does_not_block() {
    if common::distributed() {
        return; // Interrupted runs are failed on restart only by a single-instance engine.
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path()).await;
    let (code, run) = post(&s, "/runs", json!({"quantity": 1_000_000}), true).await;
    assert_eq!(code, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.restart().await; // SIGKILL, then start again on the same data.
    let (_, after) = s.get_json(&format!("/runs/{id}")).await;
    assert_eq!(after["phase"], "FAILED", "{after}");
    assert!(after["error"].as_str().unwrap().contains("stopped during the run"), "{after}");
    let (code, next) = post(&s, "/runs", json!({"quantity": 500}), true).await;
    assert_eq!(code, 201, "{next}");
    let next = wait_final(&s, next["id"].as_str().unwrap(), Duration::from_secs(120)).await;
    assert_eq!(next["verification"]["passed"], true, "{next}");
}

/// With several instances nobody restarts a killed one's run: every instance reports a
/// run its instance stopped recording for the run lease as FAILED, and a live run keeps
/// its lease by its heartbeat, however long it takes (found by the fault suite, seed 4 on
/// Kafka: a run stayed NORMAL_PROCESSING for ever after its instance was killed). A
/// run's hold of NORMAL holds on every instance, so its VIP-first check passes with two
/// (on main the other instance applied NORMAL orders during the run's VIP phase).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_whose_instance_dies_ends_failed_on_the_others() {
    if !common::distributed() {
        return; // A single instance fails its interrupted runs at restart (above).
    }
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start_with(a_dir.path(), &["--run-lease-secs", "9"]).await;
    let mut b = Server::start_beside(b_dir.path(), &a).await;
    let (code, run) = post(&b, "/runs", json!({"quantity": 1_000_000}), true).await;
    assert_eq!(code, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill();
    let (_, seen) = a.get_json(&format!("/runs/{id}")).await;
    assert_ne!(seen["phase"], "FAILED", "not before its lease lapsed: {seen}");
    let failed = wait_final(&a, &id, Duration::from_secs(30)).await;
    assert_eq!(failed["phase"], "FAILED", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("stopped recording it"), "{failed}");
    // Recorded so: the list says the same.
    let (_, list) = a.get_json("/runs?limit=10").await;
    let listed = list["items"].as_array().unwrap().iter().find(|r| r["id"] == id.as_str()).cloned();
    assert_eq!(listed.unwrap()["phase"], "FAILED", "{list}");

    // A live run that outlasts the lease is never called lost by the other instance. An
    // operator's pause of VIP keeps it in its VIP phase, heartbeating, for longer than
    // the lease: the clock, not the machine's speed, makes it outlast the lease.
    b.restart().await;
    assert_eq!(a.post_authorized("/queues/vip/pause").await.status(), 200);
    let (code, run) = post(&a, "/runs", json!({"quantity": 2_000}), true).await;
    assert_eq!(code, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    let held_until = Instant::now() + Duration::from_secs(12);
    let deadline = held_until + Duration::from_secs(180);
    let mut resumed = false;
    let done = loop {
        let (_, seen) = b.get_json(&format!("/runs/{id}")).await;
        assert_ne!(seen["phase"], "FAILED", "{seen}");
        if seen["phase"] == "DONE" {
            break seen;
        }
        if !resumed && Instant::now() >= held_until {
            assert_eq!(seen["phase"], "VIP_PROCESSING", "held by the pause: {seen}");
            assert_eq!(b.post_authorized("/queues/vip/resume").await.status(), 200);
            resumed = true;
        }
        assert!(Instant::now() < deadline, "run {id} did not end: {seen}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Its hold of NORMAL held on the other instance too: every VIP order went first.
    assert_eq!(done["verification"]["passed"], true, "{done}");
    assert_eq!(done["verification"]["stored"], 2_000, "{done}");
    let took = at(&done["ended_at"]) - at(&done["started_at"]);
    assert!(took.num_seconds() > 9, "the run must outlast the lease to show anything: {} s", took.num_seconds());
}

/// A cancelled run's purge and an operator's pause are kept in the data dir: after a
/// restart the purged run's events still on the log are dropped, not applied.
#[tokio::test]
async fn a_purge_and_a_pause_outlive_a_restart() {
    use orchestrator::domain::{OrderEvent, Priority};
    use orchestrator::engine::{Backend, Engine, EngineConfig};
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(Backend::Embedded, dir.path(), EngineConfig::default()).await.unwrap();
    engine.purge("run-gone-".into()).await.unwrap();
    engine.set_pause(Priority::Vip, true).await.unwrap();
    let event = |id: &str| -> OrderEvent { serde_json::from_value(common::created(id, id, "SILVER", 100)).unwrap() };
    engine.ingest(&[event("run-gone-normal-1"), event("kept-1")]).await.unwrap();
    engine.shutdown().await;
    drop(engine);

    let again = Engine::open(Backend::Embedded, dir.path(), EngineConfig::default()).await.unwrap();
    assert!(again.pauses().operator_paused(Priority::Vip), "the pause was kept");
    again.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while again.order("kept-1").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the event after the purged one was never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(again.order("run-gone-normal-1").await.unwrap(), None, "the purged run's event was dropped");
    assert_eq!(again.discards().dropped.load(std::sync::atomic::Ordering::Relaxed), 1);
    again.shutdown().await;
}
