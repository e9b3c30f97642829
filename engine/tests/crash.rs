//! Crash: SIGKILL the engine while it applies 50k events (10k on Kafka + CQL, whose
//! conditional writes are slower), restart it, and find every acknowledged event applied
//! exactly once.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, authorized, client, created, updated};
use futures::StreamExt;
use serde_json::{Value, json};

const ORDERS: usize = 1000;

/// Updates per order: the kill still comes after `kill_after()` applied with more queued.
fn updates() -> usize {
    if common::distributed() { 9 } else { 49 }
}

fn kill_after() -> u64 {
    if common::distributed() { 3_000 } else { 5_000 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_apply_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path()).await;

    // Chunk 0 creates every order; chunk k (1..=updates) updates each once.
    let mut chunks: Vec<Vec<Value>> =
        vec![(0..ORDERS).map(|o| created(&format!("c-{o}"), &format!("c-{o}-0"), "SILVER", 5_000)).collect()];
    for k in 1..=updates() {
        chunks.push(
            (0..ORDERS)
                .map(|o| updated(&format!("c-{o}"), &format!("c-{o}-{k}"), json!({"note": format!("update {k}")})))
                .collect(),
        );
    }
    let acked: Arc<Mutex<Vec<usize>>> = Arc::default();
    let poster = {
        let (url, acked) = (s.url("/orders/events"), acked.clone());
        tokio::spawn(async move {
            let c = authorized();
            let mut chunks = chunks.into_iter().enumerate();
            let (k, creates) = chunks.next().unwrap();
            assert_eq!(c.post(&url).json(&creates).send().await.unwrap().status(), 202);
            acked.lock().unwrap().push(k);
            // Updates commute, so four requests in flight keep the log ahead of the pipeline.
            futures::stream::iter(chunks)
                .for_each_concurrent(4, |(k, chunk)| {
                    let (c, url, acked) = (c.clone(), url.clone(), acked.clone());
                    async move {
                        if let Ok(r) = c.post(&url).json(&chunk).send().await
                            && r.status() == 202
                        {
                            acked.lock().unwrap().push(k);
                        }
                    }
                })
                .await;
        })
    };

    // Kill while the pipeline is mid-way: some applied, more still queued. Judged by the
    // engine's counts, not the clock: a slow machine (debug build, CQL) only waits longer.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let h = s.health().await;
        let applied = h["applied"].as_u64().unwrap_or(0);
        let queued = h["queue_depth"]["normal"].as_u64().unwrap_or(0);
        if applied >= kill_after() && queued > 0 {
            eprintln!("killing at {h}");
            break;
        }
        assert!(Instant::now() < deadline, "the pipeline stalled: {h}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.kill();
    poster.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    eprintln!("acknowledged chunks before the kill: {}", acked.len());
    assert!(!acked.is_empty());

    s.restart().await;
    s.drain(Duration::from_secs(300)).await;

    let c = client();
    let mut total_applied = 0;
    for o in 0..ORDERS {
        let url = s.url(&format!("/orders/c-{o}/history?limit=1000"));
        let page: Value = c.get(url).send().await.unwrap().json().await.unwrap();
        let h = page["items"].as_array().unwrap();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for e in h {
            assert_eq!(e["outcome"], "applied", "c-{o}: {e}");
            *seen.entry(e["event_id"].as_str().unwrap().to_string()).or_default() += 1;
        }
        for &k in &acked {
            assert_eq!(seen.get(&format!("c-{o}-{k}")), Some(&1), "acknowledged event c-{o}-{k} applied exactly once");
        }
        assert!(seen.values().all(|&n| n == 1), "no event applied twice on c-{o}");
        let order: Value = c.get(s.url(&format!("/orders/c-{o}"))).send().await.unwrap().json().await.unwrap();
        assert_eq!(order["version"].as_u64().unwrap(), h.len() as u64, "c-{o}: version counts the applied changes");
        total_applied += h.len();
    }
    eprintln!("after restart: {total_applied} events applied for {} acknowledged", acked.len() * ORDERS);
    assert!(total_applied >= acked.len() * ORDERS);
}
