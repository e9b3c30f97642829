//! The WebSocket change feed: changes arrive promptly, and a client that stops
//! reading neither slows the engine nor silently misses changes (it gets a resync).

mod common;

use std::time::{Duration, Instant};

use common::{Server, created};
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

async fn next_json<S>(ws: &mut S) -> Value
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
