//! Plugins through the API against the real binary: deploy errors, hostile plugins,
//! shadow runs, promote/rollback, durability across restarts, and hot swap under load.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Server, TOKEN, authorized, client, counter, created, history, plugin};
use serde_json::{Value, json};

async fn dead_letters(s: &Server) -> Vec<Value> {
    let (status, page) = s.get_json("/dead-letters?limit=1000").await;
    assert_eq!(status, 200);
    page["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn deploy_errors_leave_the_active_version_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--max-plugin-bytes", "200000"]).await;
    let before = s.active("order-rules").await;
    assert!(before.1.starts_with("order-rules@1#sha256:"), "{before:?}");

    // No token, a wrong token.
    let url = s.url("/plugins/order-rules");
    let r = client().put(&url).body(plugin("fixture_rules_v2")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client().put(&url).bearer_auth("not-the-token").body(plugin("fixture_rules_v2")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid API token");
    assert_eq!(client().post(s.url("/plugins/order-rules/rollback")).send().await.unwrap().status(), 401);

    // Garbage, an empty body, the wrong world, an oversized module, an unknown slot.
    let r = s.deploy("order-rules", b"\0asm garbage that is not wasm".to_vec(), false).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["detail"]["message"].as_str().unwrap().contains("not a valid WebAssembly component"), "{body}");
    assert_eq!(s.deploy("order-rules", Vec::new(), false).await.status(), 400);
    let r = s.deploy("order-rules", plugin("fixture_wrong_world"), false).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"]["message"].as_str().unwrap().contains("does not implement the `order-rules` world"),
        "{body}"
    );
    // A packed fast path that decides unlike the typed calls would fail every batch
    // once and fall back, slowly and silently: it is refused at upload instead.
    let r = s.deploy("order-rules", plugin("fixture_packed_liar"), false).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let message = body["detail"]["message"].as_str().unwrap();
    assert!(message.contains("decide-packed decided") && message.contains("the fast path skips"), "{body}");
    let r = s.deploy("conflict-resolver", plugin("order_rules"), false).await;
    assert_eq!(r.status(), 400, "rules deployed as a resolver");
    let r = s.deploy("order-rules", vec![0u8; 300_000], false).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["detail"]["message"].as_str().unwrap().contains("the limit is 200000 bytes"), "{body}");
    assert_eq!(s.deploy("pricing", plugin("order_rules"), false).await.status(), 404);
    assert_eq!(s.post_authorized("/plugins/order-rules/rollback").await.status(), 409, "nothing to roll back to");
    assert_eq!(s.post_authorized("/plugins/order-rules/promote").await.status(), 409, "no shadow to promote");

    // A component that reaches for WASI when it decides (an unstubbed Python or JS
    // build does) is refused at upload with the hint; on main it went live and then
    // failed every event.
    let r = s.deploy("order-rules", plugin("fixture_wasi"), false).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let message = body["detail"]["message"].as_str().unwrap();
    assert!(message.contains("failed its first call") && message.contains("--stub-wasi"), "{body}");
    assert_eq!(s.post_authorized("/plugins/order-rules/versions/7/activate").await.status(), 404);

    assert_eq!(s.active("order-rules").await, before, "the active version is unchanged");
    assert_eq!(s.post_events(&created("after", "after", "GOLD", 100)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(s.get_json("/orders/after").await.1["decided_by"], before.1.as_str());
}

/// Deploying bytes the slot already holds answers with that version (on main each
/// upload was a new version, compiled again), and any stored version can be activated.
#[tokio::test]
async fn identical_bytes_reuse_their_version_and_any_stored_version_can_be_activated() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let first = s.deploy_ok("order-rules", plugin("fixture_rules_v2"), false).await;
    assert_eq!((first["version"].as_u64(), first["reused"].as_bool()), (Some(2), Some(false)), "{first}");
    let r = s.deploy("order-rules", plugin("fixture_rules_v2"), false).await;
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!((again["version"].as_u64(), again["reused"].as_bool()), (Some(2), Some(true)), "{again}");
    assert_eq!(again["sha256"], first["sha256"]);

    // The built-in bytes are version 1: deploying them activates it again.
    let builtin = orchestrator::plugin::Slot::OrderRules.builtin().to_vec();
    let r = s.deploy("order-rules", builtin, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 1);
    assert_eq!(s.active("order-rules").await.0, 1);

    // Any stored version, by number; the active one is left as it is; a shadow of the
    // active version makes no sense.
    let r = s.post_authorized("/plugins/order-rules/versions/2/activate").await;
    assert_eq!(r.status(), 200);
    assert_eq!(s.active("order-rules").await.0, 2);
    assert_eq!(s.post_authorized("/plugins/order-rules/versions/2/activate").await.status(), 200);
    assert_eq!(s.deploy("order-rules", plugin("fixture_rules_v2"), true).await.status(), 409);
    let r = s.post_authorized("/plugins/order-rules/versions/3/activate").await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert!(body.to_string().contains("it keeps 1, 2"), "{body}");
    let r = client().post(s.url("/plugins/order-rules/versions/1/activate")).send().await.unwrap();
    assert_eq!(r.status(), 401, "activation needs the admin token");

    let (_, slots) = s.get_json("/plugins").await;
    assert_eq!(slots[0]["versions"].as_array().unwrap().len(), 2, "no version was stored twice: {slots}");
    let actions: Vec<&str> =
        slots[0]["history"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["builtin", "deploy", "deploy", "activate"]);
    assert_eq!(s.post_events(&created("reused", "reused", "SILVER", 16_000)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(s.get_json("/orders/reused").await.1["shipping_fee_cents"], 0, "v2 decides");
}

/// `orchestrator plugin` against a running engine: deploy as a shadow, status, promote,
/// rollback to a version by number, and a refusal shown with the engine's reason.
#[tokio::test]
async fn the_plugin_command_deploys_promotes_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let component = dir.path().join("rules-v2.wasm");
    std::fs::write(&component, plugin("fixture_rules_v2")).unwrap();
    let url = s.url("");
    let local = |args: &[&str]| {
        let out = common::orchestrator().arg("plugin").args(args).output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let cli = |args: &[&str]| local(&[args, &["--url", &url, "--api-token", TOKEN]].concat());
    let (ok, out, err) = cli(&["deploy", component.to_str().unwrap(), "--shadow"]);
    assert!(ok && out.contains("new version 2 of order-rules is shadowing"), "{out}{err}");
    let (ok, out, err) = cli(&["status"]);
    assert!(ok && out.contains("shadow  version 2") && out.contains("shadow report:"), "{out}{err}");
    let (ok, out, _) = cli(&["promote", "--json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["version"], 2);
    assert_eq!(s.active("order-rules").await.0, 2);
    let (ok, out, err) = cli(&["rollback", "--to", "1"]);
    assert!(ok && out.contains("version 1"), "{out}{err}");
    assert_eq!(s.active("order-rules").await.0, 1);
    // A plugin's own words (here a panic's) come back through `plugin logs`.
    let (ok, out, err) = cli(&["deploy", &{
        let trap = dir.path().join("trap.wasm");
        std::fs::write(&trap, plugin("fixture_trap")).unwrap();
        trap.to_str().unwrap().to_string()
    }]);
    assert!(ok && out.contains("new version 3"), "{out}{err}");
    assert_eq!(s.post_events(&created("poison-cli", "poison-cli", "GOLD", 100)).await.status(), 202);
    s.drain(Duration::from_secs(20)).await;
    let (ok, out, err) = cli(&["logs"]);
    assert!(ok && out.contains("plugin=order-rules@3") && out.contains("poison order poison-cli"), "{out}{err}");
    let (ok, out, err) = cli(&["logs", "--slot", "conflict-resolver"]);
    assert!(ok && out.is_empty() && err.contains("no log lines"), "{out}{err}");
    let (ok, out, err) = cli(&["rollback", "--to", "1"]);
    assert!(ok && out.contains("version 1"), "{out}{err}");
    let (ok, _, err) = cli(&["rollback", "--to", "9"]);
    assert!(!ok && err.contains("404") && err.contains("it keeps 1, 2, 3"), "{err}");
    let (ok, _, err) = cli(&["deploy", "/nonexistent.wasm"]);
    assert!(!ok && err.contains("cannot read the component /nonexistent.wasm"), "{err}");

    // `plugin test` decides here, under the same sandbox, and fails on a trap.
    let fixture = |name: &str| {
        let path = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&path, plugin(name)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let events = dir.path().join("events.jsonl");
    let line = |id: &str| json!({ "event": created(id, id, "GOLD", 1_000), "current": null }).to_string();
    std::fs::write(&events, format!("{}\n{}\n", line("fine-1"), line("poison-1"))).unwrap();
    let (ok, out, err) = local(&["test", &fixture("fixture_trap"), "--events", events.to_str().unwrap()]);
    assert!(!ok && err.contains("failed on 1 event"), "{out}{err}");
    let decided: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(decided.len(), 2, "{out}");
    assert_eq!(decided[0]["outcome"]["decision"], "upsert", "{out}");
    assert_eq!(decided[1]["outcome"]["decision"], "error", "{out}");
    let (ok, _, err) = local(&["test", &fixture("fixture_rules_v2"), "--generated", "500", "--against-native"]);
    assert!(ok && err.contains("500 events: 500 upsert, 0 skip, 0 reject, 0 failed"), "{err}");
    // v2 ships free from 150.00 where the default charges 5.99: those decisions differ.
    let differ = err.lines().find_map(|l| l.split("; ").last()?.strip_suffix(" of 500 decisions differ from theirs"));
    let differ: usize = differ.unwrap_or_else(|| panic!("no comparison in {err}")).parse().unwrap();
    assert!((1..500).contains(&differ), "{err}");
    let (ok, _, err) = local(&["test", &fixture("fixture_wasi"), "--generated", "1"]);
    assert!(!ok && err.contains("the engine would refuse this component"), "{err}");
}

/// Deploys a hostile fixture and checks that `poison` orders go to the dead letters with
/// the reason while every other order flows through the same plugin.
async fn contained(fixture: &str, error_type: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let r = s.deploy("order-rules", plugin(fixture), false).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let (version, decided_by) = s.active("order-rules").await;
    assert_eq!(version, 2);

    let mut events: Vec<Value> =
        (0..50).map(|i| created(&format!("ok-{i}"), &format!("ok-{i}"), "GOLD", 100)).collect();
    events.insert(20, created("poison-1", "poison-1", "GOLD", 100));
    let started = Instant::now();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    s.drain(Duration::from_secs(60)).await;
    eprintln!("{fixture}: 51 events drained in {:?}", started.elapsed());

    let letters = dead_letters(&s).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let d = &letters[0];
    assert_eq!(
        (d["id"].as_str(), d["order_id"].as_str(), d["stage"].as_str()),
        (Some("poison-1"), Some("poison-1"), Some("rules"))
    );
    assert_eq!(d["error_type"], error_type, "{d}");
    assert_eq!(d["decided_by"], decided_by.as_str());
    let text = d["reason"].as_str().unwrap();
    assert!(
        text.contains(&decided_by) && text.contains(reason),
        "reason {text:?} names the plugin and says {reason:?}"
    );
    for i in 0..50 {
        let (status, row) = s.get_json(&format!("/orders/ok-{i}")).await;
        assert_eq!(status, 200);
        assert_eq!(row["decided_by"], decided_by.as_str());
    }
    assert_eq!(s.get_json("/orders/poison-1").await.0, 404);
    assert_eq!(history(&s, "poison-1").await[0]["outcome"], "rejected");
    // The engine keeps going after the poison event.
    assert_eq!(s.post_events(&created("later", "later", "GOLD", 100)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(s.get_json("/orders/later").await.0, 200);
    let metrics = client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(&format!("error_type=\"{error_type}\"")), "plugin error counted by type");
}

#[tokio::test]
async fn a_trapping_plugin_fails_only_the_poison_event() {
    contained("fixture_trap", "trap", "poison order poison-1").await;
}

/// A timeout is transient (a stalled machine looks like a loop), so only a plugin that
/// runs out of time on every attempt, with the deadline doubled each time, fails the
/// event; the reason says so.
#[tokio::test]
async fn a_looping_plugin_is_stopped_by_the_deadline() {
    contained("fixture_spin", "timeout", "ran past its deadline (5 attempts, the last one 160ms)").await;
}

#[tokio::test]
async fn a_memory_hog_is_stopped_by_the_cap() {
    contained("fixture_hog", "memory_limit", "past 16777216 bytes").await;
}

/// The shadow report once the candidate has caught up with every live event offered.
async fn settled_shadow_report(s: &Server) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, report) = s.get_json("/plugins/order-rules/shadow-report").await;
        assert_eq!(status, 200, "{report}");
        if report["queued"] == 0 {
            return report;
        }
        assert!(Instant::now() < deadline, "the shadow candidate never caught up: {report}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A looping candidate in shadow never delays the live path: every live event is applied
/// while the candidate is still far behind, and the report accounts for every event.
#[tokio::test]
async fn a_looping_shadow_candidate_does_not_slow_live_events() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    // The candidate loops on every `poison*` order; the active rules decide them at once.
    s.deploy_ok("order-rules", plugin("fixture_spin"), true).await;
    let events: Vec<Value> =
        (0..300).map(|i| created(&format!("poison-{i}"), &format!("poison-{i}"), "SILVER", 1_000 + i)).collect();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    s.drain(Duration::from_secs(20)).await;
    assert_eq!(s.health().await["applied"], 300, "the live rules applied every event");
    let (_, early) = s.get_json("/plugins/order-rules/shadow-report").await;
    let count = |r: &Value, k: &str| r[k].as_u64().unwrap();
    assert_eq!(count(&early, "compared") + count(&early, "skipped") + count(&early, "queued"), 300, "{early}");
    // Each candidate call runs into its deadline: had the live path waited for it, every
    // event would be compared by now.
    assert!(count(&early, "compared") < 300, "the live path waited for the candidate: {early}");
    let done = settled_shadow_report(&s).await;
    assert_eq!(count(&done, "compared") + count(&done, "skipped"), 300, "{done}");
    assert_eq!(count(&done, "agreed"), 0, "a candidate that never answers agrees with nothing: {done}");
}

#[tokio::test]
async fn shadow_reports_exactly_the_differing_events_then_promote_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path()).await;
    let r = s.deploy("order-rules", plugin("fixture_rules_v2"), true).await;
    assert_eq!(r.status(), 201);
    let deployed: Value = r.json().await.unwrap();
    assert_eq!((deployed["version"].as_u64(), deployed["shadow"].as_bool()), (Some(2), Some(true)));
    let (_, slots) = s.get_json("/plugins").await;
    assert_eq!(slots[0]["shadow"]["version"], 2);
    assert_eq!(slots[0]["active"]["version"], 1);

    // v2 ships free from 150.00: it differs exactly on totals in [150.00, 200.00).
    let totals: Vec<i64> = (0..200).map(|i| 1_000 + i * 137).collect();
    let differing: Vec<String> = totals
        .iter()
        .enumerate()
        .filter(|(_, t)| (15_000..20_000).contains(*t))
        .map(|(i, _)| format!("s-{i}"))
        .collect();
    assert!(!differing.is_empty() && differing.len() < 200);
    let events: Vec<Value> =
        totals.iter().enumerate().map(|(i, t)| created(&format!("s-{i}"), &format!("s-{i}"), "SILVER", *t)).collect();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    s.drain(Duration::from_secs(20)).await;

    let report = settled_shadow_report(&s).await;
    assert_eq!((report["compared"].as_u64(), report["skipped"].as_u64()), (Some(200), Some(0)), "{report}");
    assert_eq!(report["differed"].as_u64().unwrap() as usize, differing.len(), "{report}");
    assert_eq!(report["agreed"].as_u64().unwrap() as usize, 200 - differing.len());
    let mut sampled: Vec<String> =
        report["samples"].as_array().unwrap().iter().map(|d| d["event_id"].as_str().unwrap().to_string()).collect();
    sampled.sort();
    let mut expected = differing.clone();
    expected.sort();
    assert_eq!(sampled, expected, "the samples are exactly the differing events");
    let sample = &report["samples"][0];
    assert_eq!(
        (
            sample["active"]["value"]["shipping_fee_cents"].as_i64(),
            sample["candidate"]["value"]["shipping_fee_cents"].as_i64()
        ),
        (Some(599), Some(0))
    );
    // Shadow decisions were never written.
    assert_eq!(s.get_json(&format!("/orders/{}", differing[0])).await.1["shipping_fee_cents"], 599);

    // Promote: v2 decides from now on.
    let r = s.post_authorized("/plugins/order-rules/promote").await;
    assert_eq!(r.status(), 200);
    assert_eq!(s.active("order-rules").await.0, 2);
    assert_eq!(s.get_json("/plugins/order-rules/shadow-report").await.0, 409, "no shadow after promotion");
    assert_eq!(s.post_events(&created("after-promote", "after-promote", "SILVER", 16_000)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    let row = s.get_json("/orders/after-promote").await.1;
    assert_eq!(row["shipping_fee_cents"], 0);
    assert!(row["decided_by"].as_str().unwrap().starts_with("order-rules@2#"));

    // Deployments survive a restart, and nothing is compiled again: the active
    // versions come from the compile cache (on main every start compiled them all).
    s.restart().await;
    assert_eq!(s.active("order-rules").await.0, 2);
    let metrics = client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let count = |source: &str| {
        let line = format!("orchestrator_plugin_compilations_total{{source=\"{source}\"}} ");
        let value = metrics.lines().find_map(|l| l.strip_prefix(line.as_str()));
        value.unwrap_or_else(|| panic!("no {line} in /metrics")).parse::<u64>().unwrap()
    };
    assert_eq!(count("compiled"), 0, "a restart compiles nothing");
    assert!(count("cache") >= 2, "the active rules and resolver come from the cache");

    // Rollback: v1 again, in one call.
    let r = s.post_authorized("/plugins/order-rules/rollback").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 1);
    assert_eq!(s.post_events(&created("after-rollback", "after-rollback", "SILVER", 16_000)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(s.get_json("/orders/after-rollback").await.1["shipping_fee_cents"], 599);

    // A shadow can be discarded too. The same bytes again shadow the stored v2: nothing
    // is compiled or stored anew.
    let r = s.deploy("order-rules", plugin("fixture_rules_v2"), true).await;
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!((again["version"].as_u64(), again["reused"].as_bool()), (Some(2), Some(true)), "{again}");
    let r = client().delete(s.url("/plugins/order-rules/shadow")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let (_, slots) = s.get_json("/plugins").await;
    assert!(slots[0]["shadow"].is_null());
    let actions: Vec<&str> =
        slots[0]["history"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["builtin", "shadow", "promote", "rollback", "shadow", "discard"]);
}

/// The order-rules versions loaded on `s` (those `GET /plugins` gives a `memory`).
async fn loaded_versions(s: &Server) -> Vec<u64> {
    let (_, slots) = s.get_json("/plugins").await;
    let versions = slots[0]["versions"].as_array().unwrap().clone();
    versions.iter().filter(|v| v["memory"].is_object()).map(|v| v["version"].as_u64().unwrap()).collect()
}

/// Each loaded version holds its compiled code and idle instances (tens of MiB for a
/// Python plugin). Only the active and shadow versions, and the one a rollback goes to
/// first, stay loaded; one needed again loads from the compile cache, not the compiler.
/// On main every version activated since the start stayed loaded.
#[tokio::test]
async fn only_running_versions_and_the_rollback_target_stay_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    // v2, v3 and v4 go live in turn; v5 shadows v4. Each is the v2 fixture with other bytes.
    for pad in 1..=3 {
        s.deploy_ok("order-rules", common::padded(plugin("fixture_rules_v2"), pad), false).await;
    }
    s.deploy_ok("order-rules", common::padded(plugin("fixture_rules_v2"), 4), true).await;
    assert_eq!(loaded_versions(&s).await, [3, 4, 5], "v3 is where a rollback goes; v4 is active, v5 its shadow");
    let metrics = client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let code_bytes = |v: u64| -> f64 {
        let labels = ["kind=\"code\"".to_string(), "plugin=\"order-rules\"".into(), format!("version=\"{v}\"")];
        let line = metrics.lines().find(|l| {
            l.starts_with("orchestrator_plugin_memory_bytes{") && labels.iter().all(|label| l.contains(label.as_str()))
        });
        line.and_then(|l| l.rsplit(' ').next()).unwrap_or_else(|| panic!("no memory series of v{v}")).parse().unwrap()
    };
    assert_eq!(code_bytes(1), 0.0, "an unloaded version's series reads zero");
    assert!(code_bytes(4) > 0.0);

    // Rolling back to v3 drops v4; rolling back again brings v2 back from the cache.
    let compiled = r#"orchestrator_plugin_compilations_total{source="compiled"}"#;
    let cached = r#"orchestrator_plugin_compilations_total{source="cache"}"#;
    let (compiles, from_cache) = (counter(&s, compiled).await, counter(&s, cached).await);
    assert_eq!(s.post_authorized("/plugins/order-rules/rollback").await.status(), 200);
    assert_eq!(loaded_versions(&s).await, [3, 5]);
    assert_eq!(s.post_authorized("/plugins/order-rules/rollback").await.status(), 200);
    assert_eq!(loaded_versions(&s).await, [2, 5]);
    assert_eq!(counter(&s, compiled).await, compiles, "nothing compiled again");
    assert_eq!(counter(&s, cached).await, from_cache + 1);
}

/// `POST /plugins/order-rules/replay` with a component, as the admin.
async fn what_if(s: &Server, query: &str, bytes: Vec<u8>) -> (u16, Value) {
    let url = s.url(&format!("/plugins/order-rules/replay?{query}"));
    let r = client().post(url).bearer_auth(TOKEN).body(bytes).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A what-if run decides the recorded events (each with the row it met) with a
/// candidate and the active rules, reports where they differ field by field, and
/// writes nothing. On main there was no way to try a rule on history.
#[tokio::test]
async fn a_what_if_run_replays_recorded_events_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path()).await;
    // As in the shadow test: v2 differs exactly on new orders with totals in [150, 200).
    let prefix = common::unique("w");
    let totals: Vec<i64> = (0..200).map(|i| 1_000 + i * 137).collect();
    let differing: Vec<String> = totals
        .iter()
        .enumerate()
        .filter(|(_, t)| (15_000..20_000).contains(*t))
        .map(|(i, _)| format!("{prefix}-{i}"))
        .collect();
    let id = |i: usize| format!("{prefix}-{i}");
    let events: Vec<Value> = totals.iter().enumerate().map(|(i, t)| created(&id(i), &id(i), "SILVER", *t)).collect();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    s.drain(Duration::from_secs(20)).await;
    // Updates meet a row: the case keeps it, and both versions decide the same on them.
    let updates: Vec<Value> =
        (0..10).map(|i| common::updated(&id(i), &format!("{}-note", id(i)), json!({"note": "gift wrap"}))).collect();
    assert_eq!(s.post_events(&Value::Array(updates)).await.status(), 202);
    s.drain(Duration::from_secs(20)).await;
    let recorded = "orchestrator_whatif_cases_total{outcome=\"recorded\"}";
    let waited = Instant::now();
    while counter(&s, recorded).await < 210 {
        assert!(waited.elapsed() < Duration::from_secs(30), "the recorder wrote the 210 cases");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = (s.get_json(&format!("/orders/{}", differing[0])).await.1, history(&s, &differing[0]).await);

    let (status, r) = what_if(&s, "since=1h", plugin("fixture_rules_v2")).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (r["cases"].as_u64(), r["limited"].as_bool(), r["cut_short"].as_bool()),
        (Some(210), Some(false), Some(false)),
        "{r}"
    );
    assert_eq!(r["differed"].as_u64().unwrap() as usize, differing.len(), "{r}");
    assert_eq!(r["agreed"].as_u64().unwrap() as usize, 210 - differing.len(), "{r}");
    assert_eq!((r["errors"]["active"].as_u64(), r["errors"]["candidate"].as_u64()), (Some(0), Some(0)));
    assert_eq!(r["decisions"]["active"]["upsert"], 210, "{r}");
    assert!(r["cost_us_per_event"]["candidate"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["active"].as_str().unwrap().starts_with("order-rules@1#"), "{r}");
    let mut sampled: Vec<&str> =
        r["samples"].as_array().unwrap().iter().map(|d| d["order_id"].as_str().unwrap()).collect();
    sampled.sort();
    let mut expected: Vec<&str> = differing.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(sampled, expected, "the samples are exactly the differing events");
    assert_eq!(
        r["samples"][0]["fields"],
        json!([{"field": "shipping_fee_cents", "active": 599, "candidate": 0}]),
        "the difference is named field by field"
    );

    // The active version's own bytes agree everywhere; the window and limit bound the run.
    let builtin = |slot: orchestrator::plugin::Slot| slot.builtin().to_vec();
    let (_, same) = what_if(&s, "since=1h", builtin(orchestrator::plugin::Slot::OrderRules)).await;
    assert_eq!((same["cases"].as_u64(), same["differed"].as_u64()), (Some(210), Some(0)), "{same}");
    let (_, few) = what_if(&s, "since=1h&limit=5", plugin("fixture_rules_v2")).await;
    assert_eq!((few["cases"].as_u64(), few["limited"].as_bool()), (Some(5), Some(true)), "{few}");
    let (_, all) = what_if(&s, "since=1h&limit=210", plugin("fixture_rules_v2")).await;
    assert_eq!((all["cases"].as_u64(), all["limited"].as_bool()), (Some(210), Some(false)), "{all}");
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (_, none) = what_if(&s, &format!("since={later}"), plugin("fixture_rules_v2")).await;
    assert_eq!(none["cases"], 0, "{none}");

    // Bad requests name what was wrong.
    let (status, bad) = what_if(&s, "since=yesterday", plugin("fixture_rules_v2")).await;
    assert_eq!(status, 400);
    assert!(bad["detail"]["message"].as_str().unwrap().contains("neither a duration"), "{bad}");
    assert_eq!(what_if(&s, "since=1h&limit=0", plugin("fixture_rules_v2")).await.0, 400);
    assert_eq!(what_if(&s, "since=1h", b"\0asm nonsense".to_vec()).await.0, 400);
    let (status, wasi) = what_if(&s, "since=1h", plugin("fixture_wasi")).await;
    assert_eq!(status, 400, "{wasi}");
    let url = s.url("/plugins/conflict-resolver/replay?since=1h");
    let r = client()
        .post(url)
        .bearer_auth(TOKEN)
        .body(builtin(orchestrator::plugin::Slot::ConflictResolver))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let url = s.url("/plugins/order-rules/replay?since=1h");
    assert_eq!(client().post(url).body(plugin("fixture_rules_v2")).send().await.unwrap().status(), 401);

    // Nothing was written or deployed.
    let after = (s.get_json(&format!("/orders/{}", differing[0])).await.1, history(&s, &differing[0]).await);
    assert_eq!(after, before, "the order and its history are as they were");
    assert_eq!(after.0["shipping_fee_cents"], 599);
    let (_, slots) = s.get_json("/plugins").await;
    assert_eq!(slots[0]["versions"].as_array().unwrap().len(), 1, "no version was stored: {slots}");

    // The candidates' compiled code is not kept past a restart, only stored versions'.
    let cache = dir.path().join("plugin-cache");
    let files = || std::fs::read_dir(&cache).unwrap().count();
    assert!(files() > 2, "the candidates were compiled into the cache");
    s.restart().await;
    assert_eq!(files(), 2, "the built-in rules and resolver");

    // A reset empties the cases with the orders (they hold customer emails).
    let r = client().post(s.url("/reset")).bearer_auth(TOKEN).json(&json!({"confirm": "reset"})).send().await;
    assert_eq!(r.unwrap().status(), 200);
    let (_, gone) = what_if(&s, "since=1h", plugin("fixture_rules_v2")).await;
    assert_eq!(gone["cases"], 0, "{gone}");

    // An engine that keeps no cases says so.
    let other = tempfile::tempdir().unwrap();
    let off = Server::start_with(other.path(), &["--case-retention-hours", "0"]).await;
    let (status, refused) = what_if(&off, "since=1h", plugin("fixture_rules_v2")).await;
    assert_eq!(status, 409, "{refused}");
    assert!(refused["detail"]["message"].as_str().unwrap().contains("--case-retention-hours 0"), "{refused}");
}

#[tokio::test]
async fn dead_letters_can_be_replayed_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--park-timeout-secs", "1"]).await;
    // An update for an order that does not exist yet waits for its create; once its wait
    // runs out, the rules decide it as it is and reject it...
    let update = json!({
        "event_id": "early", "order_id": "late-order", "kind": "updated", "source": "test",
        "occurred_at": "2026-11-21T10:00:00Z", "payload": {"note": "hello"}
    });
    assert_eq!(s.post_events(&update).await.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    let letter = loop {
        if let Some(l) = dead_letters(&s).await.first() {
            break l.clone();
        }
        assert!(Instant::now() < deadline, "the parked update never reached the dead letters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letter["id"], "early");
    let reason = letter["reason"].as_str().unwrap();
    assert!(reason.contains("no created event for order late-order arrived while this event was parked"), "{reason}");
    assert!(reason.contains("the updated event lacks customer"), "{reason}");
    // ...and once the order exists, replaying it applies it.
    assert_eq!(s.post_events(&created("late-order", "late-order-c", "GOLD", 100)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(client().post(s.url("/dead-letters/early/replay")).send().await.unwrap().status(), 401);
    let r = s.post_authorized("/dead-letters/early/replay").await;
    assert_eq!(r.status(), 202);
    let replayed = r.json::<Value>().await.unwrap()["event_id"].as_str().unwrap().to_string();
    assert_eq!(replayed, "early#replay");
    s.drain(Duration::from_secs(10)).await;
    let row = s.get_json("/orders/late-order").await.1;
    assert_eq!((row["note"].as_str(), row["version"].as_u64()), (Some("hello"), Some(2)));
    assert_eq!(s.post_authorized("/dead-letters/early/replay").await.status(), 409, "only once");
    assert_eq!(s.post_authorized("/dead-letters/nope/replay").await.status(), 404);
    let outcomes: Vec<(String, String)> = history(&s, "late-order")
        .await
        .iter()
        .map(|h| (h["event_id"].as_str().unwrap().into(), h["outcome"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        outcomes,
        [("early".into(), "rejected".into()), ("late-order-c".into(), "applied".into()), (replayed, "applied".into())]
    );
}

/// `POST /dead-letters/replay` sends the letters a filter matches, up to the cap the
/// operator gave, each once; the others stay as they were. `POST /dead-letters/purge`
/// then deletes the replayed ones for good.
#[tokio::test]
async fn dead_letters_are_replayed_and_purged_in_bulk_by_filter_up_to_a_cap() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--park-timeout-secs", "1"]).await;
    // Updates of orders that do not exist yet are dead-lettered once their wait runs out.
    let update = |order: &str| {
        json!({"event_id": format!("{order}-early"), "order_id": order, "kind": "updated", "source": "test",
               "occurred_at": "2026-11-21T10:00:00Z", "payload": {"note": "replayed"}})
    };
    let ours: Vec<String> = (0..5).map(|i| format!("bulk-a-{i}")).collect();
    let others = ["bulk-b-0", "bulk-b-1"];
    for order in ours.iter().map(String::as_str).chain(others) {
        assert_eq!(s.post_events(&update(order)).await.status(), 202);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while dead_letters(&s).await.len() < 7 {
        assert!(Instant::now() < deadline, "the parked updates never reached the dead letters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for order in ours.iter().map(String::as_str).chain(others) {
        assert_eq!(s.post_events(&created(order, &format!("{order}-c"), "GOLD", 100)).await.status(), 202);
    }
    s.drain(Duration::from_secs(10)).await;

    let bulk_at = |path: &str, body: Value| {
        let url = s.url(path);
        async move {
            let r = client().post(url).bearer_auth(TOKEN).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let bulk = |body: Value| bulk_at("/dead-letters/replay", body);
    let purge = |body: Value| bulk_at("/dead-letters/purge", body);
    for path in ["/dead-letters/replay", "/dead-letters/purge"] {
        let anonymous = client().post(s.url(path)).json(&json!({"limit": 1})).send().await.unwrap();
        assert_eq!(anonymous.status(), 401);
        for bad in [json!({"limit": 0}), json!({"limit": 1001}), json!({"limit": 1, "colour": "red"}), json!({})] {
            let (code, body) = bulk_at(path, bad.clone()).await;
            assert_eq!(code, 400, "{path}: {bad} → {body}");
            assert!(body["error"].is_string(), "{body}");
        }
    }
    let replayed = |body: &Value| -> Vec<String> {
        body["replayed"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    let (code, first) = bulk(json!({"limit": 3, "order_prefix": "bulk-a-"})).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(replayed(&first).len(), 3, "the cap: {first}");
    assert_eq!(first["failed"], json!([]), "{first}");
    // Letters are left: the answer says where to go on.
    assert!(first["next_cursor"].is_string(), "{first}");
    let (_, rest) = bulk(json!({"limit": 10, "order_prefix": "bulk-a-", "cursor": first["next_cursor"]})).await;
    let mut all: Vec<String> = replayed(&first).into_iter().chain(replayed(&rest)).collect();
    all.sort();
    let expected: Vec<String> = ours.iter().map(|o| format!("{o}-early")).collect();
    assert_eq!(all, expected, "each of ours once, no other: {rest}");
    assert_eq!(rest["next_cursor"], Value::Null, "{rest}");
    let (_, again) = bulk(json!({"limit": 10, "order_prefix": "bulk-a-"})).await;
    assert_eq!(replayed(&again), Vec::<String>::new(), "none twice: {again}");
    let (_, none) = bulk(json!({"limit": 10, "stage": "no-such-stage"})).await;
    assert_eq!((replayed(&none).len(), none["scanned"].as_u64()), (0, Some(7)), "{none}");

    s.drain(Duration::from_secs(10)).await;
    for order in &ours {
        let row = s.get_json(&format!("/orders/{order}")).await.1;
        assert_eq!((row["note"].as_str(), row["version"].as_u64()), (Some("replayed"), Some(2)), "{row}");
    }
    for order in others {
        let row = s.get_json(&format!("/orders/{order}")).await.1;
        assert_eq!(row["version"], 1, "not replayed: {row}");
    }
    let letters = dead_letters(&s).await;
    let untouched = letters.iter().filter(|l| l["replayed_at"].is_null()).count();
    assert_eq!(untouched, 2, "{letters:?}");

    // The replayed letters are purged; the others are kept.
    let (code, purged) = purge(json!({"limit": 10, "replayed": true})).await;
    assert_eq!(code, 200, "{purged}");
    let mut gone: Vec<String> =
        purged["purged"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    gone.sort();
    assert_eq!(gone, expected, "{purged}");
    let mut left: Vec<String> = dead_letters(&s).await.iter().map(|l| l["id"].as_str().unwrap().into()).collect();
    left.sort();
    assert_eq!(left, ["bulk-b-0-early", "bulk-b-1-early"], "only the unreplayed letters are left");
    assert_eq!(s.post_authorized("/dead-letters/bulk-a-0-early/replay").await.status(), 404, "gone for good");
    assert_eq!(counter(&s, "orchestrator_dead_letters_purged_total").await, 5);
    let (_, again) = purge(json!({"limit": 10, "replayed": true})).await;
    assert_eq!((again["purged"].as_array().unwrap().len(), again["scanned"].as_u64()), (0, Some(2)), "{again}");
    // Who purged is audited.
    let (status, audit) = s.get_json("/audit").await;
    assert_eq!(status, 200, "{audit}");
    let items = audit["items"].as_array().unwrap();
    assert!(items.iter().any(|a| a["target"] == "/dead-letters/purge" && a["status"] == 200), "{audit}");
}

/// A replayed dead letter keeps its place (README, Semantics): it cannot overwrite a
/// change accepted after it, and sets what nothing later changed.
#[tokio::test]
async fn dead_letters_can_be_replayed_without_overwriting_later_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &["--park-timeout-secs", "1"]).await;
    let update = |id: &str, payload: Value| {
        json!({"event_id": id, "order_id": "kept-order", "kind": "updated", "source": "test",
               "occurred_at": "2026-11-21T10:00:00Z", "payload": payload})
    };
    let early = update("kept-early", json!({"note": "early", "shipping_fee_cents": 123}));
    assert_eq!(s.post_events(&early).await.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    while dead_letters(&s).await.is_empty() {
        assert!(Instant::now() < deadline, "the parked update never reached the dead letters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.post_events(&created("kept-order", "kept-order-c", "GOLD", 100)).await.status(), 202);
    assert_eq!(s.post_events(&update("kept-later", json!({"note": "later"}))).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    let r = s.post_authorized("/dead-letters/kept-early/replay").await;
    assert_eq!(r.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    let row = s.get_json("/orders/kept-order").await.1;
    assert_eq!(row["note"], "later", "the replay was accepted before the later note: {row}");
    assert_eq!(row["shipping_fee_cents"], 123, "nothing later set the fee: {row}");
    assert_eq!(row["version"], 3, "{row}");
    // The API keeps places for the engine to set.
    let placed = json!({"event_id": "placed", "order_id": "kept-order", "kind": "updated", "source": "test",
                        "occurred_at": "2026-11-21T10:00:00Z", "accepted_at": "2030-01-01T00:00:00Z",
                        "payload": {"note": "mine for ever"}});
    let r = s.post_events(&placed).await;
    assert_eq!(r.status(), 400);
    let body = r.json::<Value>().await.unwrap();
    assert!(body["detail"]["reason"].as_str().unwrap().contains("accepted_at"), "{body}");
}

/// Under load (10k events/s offered): deploy, roll back, deploy again. Every event is applied exactly
/// once, by a version that was active when it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swap_under_load_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // 250 events every 25 ms: 10k/s offered, all with totals where v1 and v2 differ.
    let producer = {
        let (url, sent, stop) = (s.url("/orders/events"), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let c = authorized();
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let base = sent.load(Ordering::Relaxed);
                let batch: Vec<Value> =
                    (base..base + 250).map(|i| created(&format!("h-{i}"), &format!("h-{i}"), "GOLD", 16_000)).collect();
                let r = c.post(&url).json(&batch).send().await.unwrap();
                assert_eq!(r.status(), 202);
                sent.fetch_add(250, Ordering::Relaxed);
            }
            sent.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
        })
    };
    // Each version decides events before the next swap: the test waits for the engine's
    // applied count, not for the clock, so a slow machine slows it down, never fails it.
    let flowed = |n: u64| {
        let s = &s;
        async move {
            let applied = |h: Value| h["applied"].as_u64().unwrap();
            let (mark, deadline) = (applied(s.health().await) + n, Instant::now() + Duration::from_secs(120));
            while applied(s.health().await) < mark {
                assert!(Instant::now() < deadline, "the pipeline stopped applying events");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    flowed(3_000).await;
    s.deploy_ok("order-rules", plugin("fixture_rules_v2"), false).await;
    flowed(3_000).await;
    assert_eq!(s.post_authorized("/plugins/order-rules/rollback").await.status(), 200);
    flowed(3_000).await;
    // The same bytes again: v2 is active again, not a new version.
    let r = s.deploy("order-rules", plugin("fixture_rules_v2"), false).await;
    assert_eq!(r.status(), 200, "identical bytes reuse their version");
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 2);
    flowed(3_000).await;
    stop.store(true, Ordering::Relaxed);
    let rate = producer.await.unwrap();
    let total = sent.load(Ordering::Relaxed);
    eprintln!("hot swap: {total} events offered at {rate:.0}/s (10k/s asked)");
    s.drain(Duration::from_secs(60)).await;

    let h = s.health().await;
    assert_eq!(h["applied"].as_u64().unwrap() as usize, total, "every event applied: {h}");
    assert_eq!(h["duplicates"], 0);
    // Each row's fee matches the version that decided it (v1: 5.99; v2: free), and
    // every version took part.
    let mut by_version: HashMap<String, usize> = HashMap::new();
    let mut decided: Vec<(usize, String)> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut rows = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/orders?limit=1000&sort=id&cursor={c}"),
            None => "/orders?limit=1000&sort=id".into(),
        };
        let (_, page) = s.get_json(&path).await;
        for o in page["items"].as_array().unwrap() {
            rows += 1;
            assert_eq!(o["version"], 1);
            let by = o["decided_by"].as_str().unwrap();
            let fee = o["shipping_fee_cents"].as_i64().unwrap();
            let version = by.split('#').next().unwrap().to_string();
            match version.as_str() {
                "order-rules@1" => assert_eq!(fee, 599, "{o}"),
                "order-rules@2" => assert_eq!(fee, 0, "{o}"),
                other => panic!("unexpected decided_by {other}"),
            }
            *by_version.entry(version.clone()).or_default() += 1;
            decided.push((o["id"].as_str().unwrap()[2..].parse().unwrap(), version));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.into()),
            None => break,
        }
    }
    eprintln!("hot swap: rows by version {by_version:?}");
    assert_eq!(rows, total);
    assert_eq!(by_version.len(), 2, "v1 and v2 both decided, each twice: {by_version:?}");
    // Events run in order, so the versions that decided them, in event order, are the
    // activations in order: v1, v2, v1 (rolled back), v2 (the same bytes again).
    decided.sort();
    let mut runs: Vec<&str> = Vec::new();
    for (_, v) in &decided {
        if runs.last() != Some(&v.as_str()) {
            runs.push(v);
        }
    }
    assert_eq!(runs, ["order-rules@1", "order-rules@2", "order-rules@1", "order-rules@2"]);
}

/// A replay whose event never reached the log (the log refused it) is not lost: the
/// letter is marked only once the event is on the log, so the operator can send it
/// again, and it applies once.
#[tokio::test]
async fn a_failed_replay_can_be_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let bad = created("rp-1", "rp-1", "GOLD", -5);
    assert_eq!(s.post_events(&bad).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    assert_eq!(dead_letters(&s).await[0]["id"], "rp-1");
    // The log refuses appends (a full disk). The old order (mark, append, un-mark on
    // failure) lost the replay when the un-mark failed too; refuse that as well.
    let open = |file: &str| {
        let c = rusqlite::Connection::open(dir.path().join(file)).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    };
    open("log.sqlite")
        .execute_batch(
            "CREATE TRIGGER refuse_vip BEFORE INSERT ON records_vip BEGIN SELECT RAISE(ABORT, 'injected'); END;
             CREATE TRIGGER refuse_normal BEFORE INSERT ON records_normal BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .unwrap();
    open("store.sqlite")
        .execute_batch(
            "CREATE TRIGGER refuse_unmark BEFORE UPDATE ON dead_letters WHEN NEW.replayed_at IS NULL
             BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .unwrap();
    let r = s.post_authorized("/dead-letters/rp-1/replay").await;
    assert!(r.status().is_server_error(), "the log refused the replay: {}", r.status());
    open("log.sqlite").execute_batch("DROP TRIGGER refuse_vip; DROP TRIGGER refuse_normal;").unwrap();
    open("store.sqlite").execute_batch("DROP TRIGGER refuse_unmark;").unwrap();

    let r = s.post_authorized("/dead-letters/rp-1/replay").await;
    assert_eq!(r.status(), 202, "the failed replay is not counted as done");
    assert_eq!(s.post_authorized("/dead-letters/rp-1/replay").await.status(), 409, "once it went through, only once");
    s.drain(Duration::from_secs(10)).await;
    let h = history(&s, "rp-1").await;
    let ids: Vec<&str> = h.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    // (Still a negative total: the replay is rejected again, and decided once.)
    assert_eq!(ids, ["rp-1", "rp-1#replay"], "the replay was decided exactly once");
}
