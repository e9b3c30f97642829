//! The HTTP API end to end against the real binary: bad input, paging, edits,
//! health, metrics (checked by promtool) and the OpenAPI document.

mod common;

use std::time::Duration;

use common::{Server, TOKEN, client, created, history, updated};
use serde_json::{Value, json};

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_engine_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--max-body-bytes", "65536"]).await;
    let c = client();
    let post_raw = |body: String| {
        c.post(s.url("/orders/events")).bearer_auth(TOKEN).header("content-type", "application/json").body(body).send()
    };

    // Malformed JSON.
    let r = post_raw("{\"event_id\": ".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "malformed event");
    assert!(body["detail"]["message"].as_str().unwrap().contains("EOF"), "{body}");

    // A wrong type.
    let mut e = created("o-bad", "e-bad", "GOLD", 100);
    e["payload"]["total_cents"] = json!("a lot");
    let r = s.post_events(&e).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["detail"]["message"].as_str().unwrap().contains("invalid type"), "{body}");

    // An unknown kind.
    let mut e = created("o-bad", "e-bad", "GOLD", 100);
    e["kind"] = json!("exploded");
    let r = s.post_events(&e).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["detail"]["message"].as_str().unwrap().contains("unknown variant `exploded`"), "{body}");

    // A semantically invalid event inside an array: nothing of the array is written.
    let batch = json!([
        created("o-half", "e-half-1", "GOLD", 100),
        {"event_id": "", "order_id": "o-half", "kind": "updated", "source": "t", "occurred_at": "2026-11-21T10:00:00Z"}
    ]);
    let r = s.post_events(&batch).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["detail"]["index"], 1, "{body}");

    // An oversized body.
    let big = json!([created("o-big", "e-big", "GOLD", 100)]).to_string() + &" ".repeat(70_000);
    let r = post_raw(big).await.unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["detail"]["limit_bytes"], 65536, "{body}");

    // A note over the limit: every row must fit one changelog record, so it is refused
    // at the edge instead of blocking its order later.
    let mut e = created("o-note", "e-note", "GOLD", 100);
    e["payload"]["note"] = json!("n".repeat(20_000));
    let r = s.post_events(&e).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body.to_string().contains("note must be at most 16384 bytes, got 20000"), "{body}");
    // A customer (an email) over its limit (a 3 MB one was accepted on main; this engine's
    // body limit is 64 KiB).
    let mut e = created("o-customer", "e-customer", "GOLD", 100);
    e["payload"]["customer"] = json!(format!("{}@example.com", "c".repeat(10_000)));
    let r = s.post_events(&e).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body.to_string().contains("customer must be at most 320 bytes"), "{body}");

    // An empty array.
    assert_eq!(s.post_events(&json!([])).await.status(), 400);

    // Still serving: a good event is accepted and applied; the half-array left nothing.
    let r = s.post_events(&created("o-good", "e-good", "GOLD", 100)).await;
    assert_eq!(r.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(s.get_json("/orders/o-good").await.0, 200);
    assert_eq!(s.get_json("/orders/o-half").await.0, 404);
    assert_eq!(s.get_json("/orders/o-half/history").await.0, 404);

    // PATCH without If-Match, with a garbage one, with a stale one, and on a missing order.
    let patch = |id: &str, if_match: Option<&str>, body: Value| {
        let mut req = c.patch(s.url(&format!("/orders/{id}"))).bearer_auth(TOKEN).json(&body);
        if let Some(v) = if_match {
            req = req.header("if-match", v);
        }
        req.send()
    };
    let r = patch("o-good", None, json!({"note": "x"})).await.unwrap();
    assert_eq!(r.status(), 428);
    assert!(r.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("If-Match"));
    assert_eq!(patch("o-good", Some("soon"), json!({"note": "x"})).await.unwrap().status(), 400);
    assert_eq!(patch("o-good", Some("1"), json!({"colour": "red"})).await.unwrap().status(), 400);
    assert_eq!(patch("o-good", Some("1"), json!({"shipping_fee_cents": -5})).await.unwrap().status(), 400);
    assert_eq!(patch("o-missing", Some("1"), json!({"note": "x"})).await.unwrap().status(), 404);
    // An edit's note has the events' limit (a 200 KB one was accepted on main).
    let r = patch("o-good", Some("1"), json!({"note": "n".repeat(20_000)})).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body.to_string().contains("note must be at most 16384 bytes"), "{body}");

    let r = patch("o-good", Some("1"), json!({"note": "first edit"})).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"2\"");
    let row: Value = r.json().await.unwrap();
    assert_eq!(
        (row["version"].as_u64(), row["note"].as_str(), row["decided_by"].as_str()),
        (Some(2), Some("first edit"), Some("operator"))
    );

    let r = patch("o-good", Some("1"), json!({"note": "stale edit"})).await.unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["current"]["version"], 2, "{body}");
    assert_eq!(body["current"]["note"], "first edit");

    // The edit went through the same history as stream events.
    let h = history(&s, "o-good").await;
    assert_eq!(h.len(), 2);
    assert_eq!((h[0]["source"].as_str(), h[1]["source"].as_str()), (Some("test"), Some("operator")));
    // A page at a time (on main the whole history came as one array, however long).
    let (_, first) = s.get_json("/orders/o-good/history?limit=1").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(first["items"][0], h[0]);
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let (_, second) = s.get_json(&format!("/orders/o-good/history?limit=1&cursor={cursor}")).await;
    assert_eq!((second["items"][0].clone(), second["next_cursor"].clone()), (h[1].clone(), Value::Null));
    assert_eq!(s.get_json("/orders/o-good/history?limit=0").await.0, 400);
    assert_eq!(s.get_json("/orders/o-good/history?cursor=nonsense").await.0, 400);
    assert_eq!(s.health().await["status"], "ok");
}

#[tokio::test]
async fn rules_decide_rows_and_rejections_land_in_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let events = json!([
        created("r-1", "r-1-c", "DIAMOND", 4_000),
        updated("r-1", "r-1-paid", json!({"financial_status": "paid"})),
        created("r-2", "r-2-c", "SILVER", 25_000),
        updated("r-2", "r-2-ship", json!({"fulfillment_status": "fulfilled", "financial_status": "pending"})),
        created("r-3", "r-3-c", "GOLD", -1),
        updated("r-ghost", "r-ghost-u", json!({"note": "no such order"})),
        created("r-1", "r-1-again", "DIAMOND", 1),
    ]);
    assert_eq!(s.post_events(&events).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;

    let (_, r1) = s.get_json("/orders/r-1").await;
    assert_eq!(
        (r1["status"].as_str(), r1["shipping_fee_cents"].as_i64(), r1["priority"].as_str(), r1["version"].as_u64()),
        (Some("CONFIRMED"), Some(999), Some("VIP"), Some(2))
    );
    assert!(
        r1["decided_by"].as_str().unwrap().starts_with("order-rules@1#sha256:"),
        "the built-in plugin decided: {r1}"
    );
    let (_, r2) = s.get_json("/orders/r-2").await;
    assert_eq!(
        (r2["status"].as_str(), r2["shipping_fee_cents"].as_i64(), r2["priority"].as_str()),
        (Some("SHIPPED"), Some(0), Some("NORMAL"))
    );
    assert_eq!(s.get_json("/orders/r-3").await.0, 404);

    // The second create of r-1 is skipped, with the reason in the history.
    let h = history(&s, "r-1").await;
    let outcomes: Vec<_> = h.iter().map(|e| (e["outcome"].as_str().unwrap(), e["version"].as_u64().unwrap())).collect();
    assert_eq!(outcomes, [("applied", 1), ("applied", 2), ("skipped", 2)]);
    assert_eq!(h[2]["reason"], "order already exists");

    let h3 = history(&s, "r-3").await;
    assert_eq!(h3[0]["outcome"], "rejected");
    assert!(h3[0]["reason"].as_str().unwrap().contains("negative total_cents"));
    // The update of an order never created waits for its create instead of failing.
    let h = s.health().await;
    assert_eq!(
        (h["applied"].as_u64(), h["skipped"].as_u64(), h["rejected"].as_u64(), h["parked"].as_u64()),
        (Some(4), Some(1), Some(1), Some(1)),
        "{h}"
    );
    assert_eq!(s.get_json("/orders/r-ghost").await.0, 404);
}

/// An order's journey: each event from its source to its outcome, with the plugin
/// version that decided it and the fields it changed; an operator's edit and a refusal
/// among them; personal values never shown.
#[tokio::test]
async fn an_orders_journey_shows_each_event_from_source_to_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let events = json!([
        created("j-1", "j-1-c", "DIAMOND", 4_000),
        updated("j-1", "j-1-paid", json!({"financial_status": "paid"})),
        created("j-1", "j-1-again", "DIAMOND", 1),
    ]);
    assert_eq!(s.post_events(&events).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    let edit = client().patch(s.url("/orders/j-1")).bearer_auth(TOKEN).header("If-Match", "2");
    assert_eq!(edit.json(&json!({"note": "call first"})).send().await.unwrap().status(), 200);
    let bad = json!([updated("j-1", "j-1-bad", json!({"total_cents": -5}))]);
    assert_eq!(s.post_events(&bad).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;

    let (status, j) = s.get_json("/orders/j-1/journey").await;
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["order"], s.get_json("/orders/j-1").await.1, "the row as it is now");
    assert_eq!(j["truncated"], false);
    let events = j["events"].as_array().unwrap();
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            let kinds: Vec<_> = e["steps"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap()).collect();
            (e["event_id"].as_str().unwrap().to_string(), e["outcome"].as_str().unwrap(), kinds.join(" "))
        })
        .collect();
    let summary: Vec<_> = summary.iter().map(|(id, outcome, kinds)| (id.as_str(), *outcome, kinds.as_str())).collect();
    let edit_id = events[3]["event_id"].as_str().unwrap();
    assert!(edit_id.starts_with("edit:"), "{edit_id}");
    assert_eq!(
        summary,
        [
            ("j-1-c", "applied", "occurred received appended decided applied published"),
            ("j-1-paid", "applied", "occurred received appended decided applied published"),
            ("j-1-again", "skipped", "occurred received appended decided skipped"),
            (edit_id, "applied", "applied published"),
            ("j-1-bad", "rejected", "occurred received appended decided dead_lettered"),
        ]
    );
    let step = |e: usize, kind: &str| -> Value {
        events[e]["steps"].as_array().unwrap().iter().find(|s| s["kind"] == kind).cloned().unwrap()
    };
    // Decided by the built-in plugin, named with its version, on the VIP log.
    let decided = step(1, "decided")["detail"].as_str().unwrap().to_string();
    assert!(decided.starts_with("order-rules@1#sha256:") && decided.ends_with(": upsert"), "{decided}");
    let appended = step(1, "appended")["detail"].as_str().unwrap().to_string();
    assert!(appended.starts_with("vip log, partition ") && appended.contains(", offset "), "{appended}");
    assert_eq!(step(1, "occurred")["at"], "2026-11-21T10:00:01Z");
    assert_eq!(step(2, "skipped")["detail"], "order already exists");
    assert!(step(2, "decided")["detail"].as_str().unwrap().ends_with("skip (order already exists)"));
    let refused = step(4, "dead_lettered")["detail"].as_str().unwrap().to_string();
    assert!(refused.contains("negative total_cents"), "{refused}");
    assert!(step(4, "decided")["detail"].as_str().unwrap().contains(": reject ("));

    // What each applied event changed; personal fields are named, never shown.
    let changes = |e: usize| -> Vec<(String, Value, Value)> {
        let list = events[e]["changes"].as_array().unwrap();
        list.iter()
            .map(|c| (c["field"].as_str().unwrap().to_string(), c["before"].clone(), c["after"].clone()))
            .collect()
    };
    let paid = changes(1);
    assert_eq!(paid[0], ("status".into(), json!("PENDING"), json!("CONFIRMED")), "{paid:?}");
    let created = changes(0);
    assert!(created.contains(&("tier".into(), Value::Null, json!("DIAMOND"))), "{created:?}");
    let customer = events[0]["changes"].as_array().unwrap().iter().find(|c| c["field"] == "customer").unwrap();
    assert_eq!(customer, &json!({"field": "customer", "withheld": true}));
    assert_eq!(events[3]["changes"], json!([{"field": "note", "withheld": true}]));
    assert!(events.iter().all(|e| !e.to_string().contains("@example.com")), "no customer in the journey");

    let (status, body) = s.get_json("/orders/nope/journey").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("order not found")), "{body}");
}

/// An event id names one event of one order. On the embedded default an id already
/// recorded for another order is refused at ingest; one that gets past (both still on
/// the log) is dead-lettered with the reason, never dropped.
#[tokio::test]
async fn an_event_id_reused_for_another_order_is_refused_or_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    assert_eq!(s.post_events(&created("id-1", "same", "GOLD", 100)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    let refused = s.post_events(&created("id-2", "same", "GOLD", 100)).await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert!(body.to_string().contains("event_id same is already used by order id-1"), "{body}");
    let both = json!([created("id-3", "twice", "GOLD", 100), created("id-4", "twice", "GOLD", 100)]);
    let refused = s.post_events(&both).await;
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("used for order id-3 earlier in this request"));

    // Both on the log before either is applied: the second is dead-lettered.
    assert_eq!(s.post_authorized("/queues/normal/pause").await.status(), 200);
    assert_eq!(s.post_events(&created("id-5", "window", "SILVER", 100)).await.status(), 202);
    assert_eq!(s.post_events(&created("id-6", "window", "SILVER", 100)).await.status(), 202);
    assert_eq!(s.post_authorized("/queues/normal/resume").await.status(), 200);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(s.get_json("/orders/id-5").await.1["version"], 1);
    assert_eq!(s.get_json("/orders/id-6").await.0, 404);
    let h = history(&s, "id-6").await;
    assert_eq!((h[0]["event_id"].as_str(), h[0]["outcome"].as_str()), (Some("window@id-6"), Some("rejected")));
    let letters = s.get_json("/dead-letters").await.1;
    let letter = &letters["items"][0];
    assert_eq!((letter["id"].as_str(), letter["error_type"].as_str()), (Some("window@id-6"), Some("event_id_reused")));
    assert!(letter["reason"].as_str().unwrap().contains("already used by order id-5"), "{letter}");
    // A replay takes a fresh id, so the operator can still apply it.
    assert_eq!(s.post_authorized("/dead-letters/window@id-6/replay").await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(s.get_json("/orders/id-6").await.1["version"], 1);
}

#[tokio::test]
async fn listing_pages_with_cursors_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let tiers = ["BRONZE", "SILVER", "GOLD", "DIAMOND"];
    let events: Vec<Value> = (0..250)
        .map(|i| created(&format!("p-{i:03}"), &format!("p-{i:03}-c"), tiers[i % 4], 1000 + i as i64))
        .collect();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    // Cancel every fifth order so the status filter has something to find.
    let cancels: Vec<Value> = (0..250)
        .step_by(5)
        .map(|i| {
            json!({
                "event_id": format!("p-{i:03}-x"),
                "order_id": format!("p-{i:03}"),
                "kind": "cancelled",
                "source": "test",
                "occurred_at": "2026-11-21T11:00:00Z"
            })
        })
        .collect();
    assert_eq!(s.post_events(&Value::Array(cancels)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;

    let walk = |query: &'static str| {
        let s = &s;
        async move {
            let mut ids = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(c) => format!("/orders?{query}&cursor={c}"),
                    None => format!("/orders?{query}"),
                };
                let (status, page) = s.get_json(&path).await;
                assert_eq!(status, 200, "{path}: {page}");
                ids.extend(page["items"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap().to_string()));
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => return ids,
                }
            }
        }
    };
    let all = walk("limit=40&sort=id").await;
    assert_eq!(all.len(), 250);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "sorted by id, no repeats");
    let newest_first = walk("limit=33").await;
    assert_eq!(newest_first.len(), 250);
    assert_eq!(newest_first.iter().collect::<std::collections::HashSet<_>>().len(), 250);
    assert!(newest_first[..50].iter().all(|id| id[2..].parse::<u32>().unwrap() % 5 == 0), "cancelled (latest) first");
    assert_eq!(walk("limit=7&status=CANCELLED").await.len(), 50);
    let vip = walk("limit=10&priority=VIP").await;
    assert_eq!(vip.len(), 62);
    let (_, page) = s.get_json("/orders?q=p-12&sort=id").await;
    let ids: Vec<_> = page["items"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, (120..130).map(|i| format!("p-{i}")).collect::<Vec<_>>());
    let (_, page) = s.get_json("/orders?q=p-007@").await;
    assert_eq!(page["items"][0]["id"], "p-007", "customer prefix search: {page}");

    for bad in [
        "/orders?limit=0",
        "/orders?limit=abc",
        "/orders?status=LOST",
        "/orders?priority=HIGH",
        "/orders?sort=colour",
        "/orders?cursor=%%%",
    ] {
        let (status, body) = s.get_json(bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string(), "{bad}: {body}");
    }
}

/// Before any event, every series the README lists is on `/metrics` with its help text,
/// so alerts and dashboards see zeros instead of gaps; promtool accepts the page.
#[tokio::test]
async fn a_fresh_engine_exports_every_listed_series_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let text = client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for needle in [
        "# HELP orchestrator_errors_total",
        "orchestrator_errors_total{error_type=\"timeout\",stage=\"rules\"} 0",
        "orchestrator_processed_events_total{priority=\"vip\",outcome=\"rejected\"} 0",
        "orchestrator_cas_conflicts_total 0",
        "orchestrator_parked_events_total{priority=\"normal\",action=\"parked\"} 0",
        "orchestrator_auth_refused_total{reason=\"forbidden\"} 0",
        "orchestrator_webhooks_received_total{outcome=\"received\"} 0",
        "# HELP orchestrator_degraded",
        "orchestrator_degraded 0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    common::check_with_promtool(&text);
}

#[tokio::test]
async fn metrics_pass_promtool_and_openapi_lists_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    assert_eq!(
        s.post_events(&json!([created("m-1", "m-1-c", "DIAMOND", 100), created("m-2", "m-2-c", "GOLD", 100)]))
            .await
            .status(),
        202
    );
    s.drain(Duration::from_secs(10)).await;
    let r = client().get(s.url("/metrics")).send().await.unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for needle in [
        "orchestrator_consumed_events_total{priority=\"vip\"} 1",
        "orchestrator_consumed_events_total{priority=\"normal\"} 1",
        "orchestrator_applied_events_total{priority=\"vip\"} 1",
        "orchestrator_queue_depth{priority=\"vip\"} 0",
        "orchestrator_rule_duration_seconds_bucket",
        "orchestrator_apply_latency_seconds_count{priority=\"normal\"} 1",
        "orchestrator_received_events_total{priority=\"vip\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    common::check_with_promtool(&text);

    let (status, doc) = s.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    for path in ["/health", "/metrics", "/orders/events", "/orders", "/orders/{id}", "/orders/{id}/history"] {
        assert!(doc["paths"][path].is_object(), "{path} missing from OpenAPI");
    }
    assert!(doc["paths"]["/orders/{id}"]["patch"]["responses"]["428"].is_object());
    // Every answer a route can give is listed, and none it cannot: the webhook's body
    // timeout (408), and 415 only where the body must be JSON (not a plugin upload).
    let answers = |path: &str, method: &str| doc["paths"][path][method]["responses"].clone();
    assert!(answers("/webhooks/shopify", "post")["408"].is_object(), "{}", answers("/webhooks/shopify", "post"));
    assert!(answers("/orders/events", "post")["415"].is_object());
    assert!(answers("/plugins/{slot}", "put")["415"].is_null(), "{}", answers("/plugins/{slot}", "put"));
    assert!(doc["components"]["schemas"]["OrderEvent"].is_object());
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly_and_a_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path()).await;
    let events: Vec<Value> = (0..2000).map(|i| created(&format!("t-{i}"), &format!("t-{i}-c"), "GOLD", 100)).collect();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    let status = s.terminate();
    assert!(status.success(), "clean exit on SIGTERM, got {status}");
    let s = Server::start(dir.path()).await;
    s.drain(Duration::from_secs(20)).await;
    let (_, page) = s.get_json("/orders?limit=1000&sort=id").await;
    let (_, page2) =
        s.get_json(&format!("/orders?limit=1000&sort=id&cursor={}", page["next_cursor"].as_str().unwrap())).await;
    let n = page["items"].as_array().unwrap().len() + page2["items"].as_array().unwrap().len();
    assert_eq!(n, 2000);
}

#[test]
fn refuses_to_expose_plugin_deployment_beyond_loopback_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        common::orchestrator().args(["serve", "--listen", "0.0.0.0:0", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without an admin token") && stderr.contains("ORCHESTRATOR_API_TOKEN"), "{stderr}");
}

#[tokio::test]
async fn on_loopback_without_a_token_one_is_generated_into_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = common::orchestrator()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let token_file = dir.path().join("api-token");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("http://127.0.0.1:{port}/health")).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "engine did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.len(), 32);
    let rollback = |t: Option<String>| {
        let mut req = client().post(format!("http://127.0.0.1:{port}/plugins/order-rules/rollback"));
        if let Some(t) = t {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(rollback(None).await.unwrap().status(), 401);
    assert_eq!(rollback(Some(token)).await.unwrap().status(), 409, "authorized; nothing to roll back to");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_half_configured_distributed_start_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [("--kafka-brokers", "127.0.0.1:9"), ("--cql-nodes", "127.0.0.1:9")] {
        let out = common::orchestrator()
            .args(["serve", "--listen", "127.0.0.1:0", "--api-token", "t", flag, value, "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("give both --kafka-brokers (KAFKA_BROKERS) and --cql-nodes (CQL_NODES)"), "{stderr}");
    }
}

#[tokio::test]
async fn recent_logs_are_served_whatever_the_stderr_level() {
    let dir = tempfile::tempdir().unwrap();
    // The harness runs the engine with RUST_LOG=warn: INFO lines still reach /logs.
    let s = common::Server::start(dir.path()).await;
    let (code, lines) = s.get_json("/logs?limit=500").await;
    assert_eq!(code, 200, "{lines}");
    let lines = lines.as_array().unwrap();
    let ready =
        lines.iter().find(|l| l["message"].as_str().unwrap_or("").contains("engine ready")).expect("the start-up line");
    assert_eq!(ready["level"], "INFO");
    assert!(ready["target"].as_str().unwrap().starts_with("orchestrator"));
    assert!(ready["at"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().is_ok());
    let (code, one) = s.get_json("/logs?limit=1").await;
    assert_eq!((code, one.as_array().unwrap().len()), (200, 1));
    assert_eq!(s.get_json("/logs?limit=0").await.0, 400);
}
