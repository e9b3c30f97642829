//! Chaos: 100 concurrent stream updates and 20 concurrent operator edits on one order.
//! Every change lands exactly once, versions stay contiguous, and a replay changes nothing.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Server, TOKEN, client, created, history, updated};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_events_and_edits_apply_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    assert_eq!(s.post_events(&created("chaos-1", "chaos-1-created", "GOLD", 12_000)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;

    let events: Vec<Value> =
        (0..100).map(|i| updated("chaos-1", &format!("chaos-ev-{i}"), json!({"note": format!("event {i}")}))).collect();
    let mut tasks = Vec::new();
    for e in events.clone() {
        let url = s.url("/orders/events");
        tasks.push(tokio::spawn(async move {
            let r = client().post(url).bearer_auth(TOKEN).json(&e).send().await.unwrap();
            assert_eq!(r.status(), 202);
            0u32
        }));
    }
    for j in 0..20 {
        let base = s.base.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut version =
                c.get(format!("{base}/orders/chaos-1")).send().await.unwrap().json::<Value>().await.unwrap()["version"]
                    .as_u64()
                    .unwrap();
            for attempt in 0..10_000u32 {
                let r = c
                    .patch(format!("{base}/orders/chaos-1"))
                    .bearer_auth(TOKEN)
                    .header("if-match", version.to_string())
                    // Edits touch the fee, events the note: every change survives the merge.
                    .json(&json!({"shipping_fee_cents": 100 + j}))
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    200 => return attempt,
                    409 => version = r.json::<Value>().await.unwrap()["current"]["version"].as_u64().unwrap(),
                    other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
                }
            }
            panic!("edit {j} never won a race");
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    s.drain(Duration::from_secs(30)).await;

    let (_, order) = s.get_json("/orders/chaos-1").await;
    let h = history(&s, "chaos-1").await;
    let applied: Vec<&Value> = h.iter().filter(|e| e["outcome"] == "applied").collect();
    let version = order["version"].as_u64().unwrap();
    eprintln!("chaos: final version {version}, {} history entries, {retries} edit retries on 409", h.len());

    // 1 create + 100 events + 20 edits, each applied once, versions 1..=121 without gaps.
    assert_eq!(applied.len(), 121, "every change applied: {h:#?}");
    assert_eq!(version, 1 + (applied.len() as u64 - 1));
    let versions: Vec<u64> = applied.iter().map(|e| e["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, (1..=121).collect::<Vec<_>>(), "contiguous versions");
    let mut per_event: HashMap<&str, usize> = HashMap::new();
    for e in &applied {
        *per_event.entry(e["event_id"].as_str().unwrap()).or_default() += 1;
    }
    for i in 0..100 {
        assert_eq!(per_event.get(format!("chaos-ev-{i}").as_str()), Some(&1), "event {i} applied exactly once");
    }
    assert_eq!(applied.iter().filter(|e| e["source"] == "operator").count(), 20);
    assert_eq!(h.len(), 121, "nothing skipped or rejected");

    // Replaying all 100 events changes nothing.
    let duplicates_before = s.health().await["duplicates"].as_u64().unwrap();
    assert_eq!(s.post_events(&Value::Array(events)).await.status(), 202);
    s.drain(Duration::from_secs(10)).await;
    let (_, after) = s.get_json("/orders/chaos-1").await;
    assert_eq!(after, order, "the replay left the row as it was");
    assert_eq!(history(&s, "chaos-1").await.len(), 121);
    assert_eq!(s.health().await["duplicates"].as_u64().unwrap() - duplicates_before, 100);
}
