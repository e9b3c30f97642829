//! The live change feed at `/ws`: one task per client with a bounded, order-coalescing
//! buffer, so a slow client falls behind (and is told to resync) instead of slowing the engine.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::AppState;
use crate::stream::Change;
use crate::telemetry;

/// Most changes taken from the stream per send cycle; duplicates of an order within
/// one cycle are coalesced to the newest. A client further behind than the stream's
/// capacity gets a resync instead.
const DRAIN_MAX: usize = 1024;
const RESYNC: &str = r#"{"type":"resync","reason":"client fell behind; re-fetch the orders you show"}"#;

pub async fn upgrade(State(s): State<AppState>, ws: WebSocketUpgrade) -> Response {
    // Subscribe before the upgrade completes, so no change applied after the
    // handshake answer can be missed.
    let rx = s.engine.changes().subscribe();
    let notices = s.engine.changes().subscribe_notices();
    // Selecting the dashboard's subprotocol lets it offer its token beside it.
    ws.protocols([super::auth::WS_PROTOCOL]).on_upgrade(move |socket| serve(socket, rx, notices))
}

async fn serve(
    socket: WebSocket,
    mut rx: tokio::sync::broadcast::Receiver<Arc<Change>>,
    mut notices: tokio::sync::broadcast::Receiver<Arc<str>>,
) {
    let gauge = metrics::gauge!(telemetry::WS_CLIENTS);
    gauge.increment(1.0);
    let (mut sink, mut stream) = socket.split();
    // The client sends nothing we need; reading notices when it goes away.
    let mut closed = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    });
    let hello = r#"{"type":"hello"}"#;
    if sink.send(Message::Text(hello.into())).await.is_err() {
        gauge.decrement(1.0);
        return;
    }
    'outer: loop {
        // Wait for the next change (or the client leaving), then take up to DRAIN_MAX
        // that queued up meanwhile, keeping only the newest row per order.
        let mut lagged = false;
        let received = tokio::select! {
            r = rx.recv() => r,
            n = notices.recv() => {
                // A client too slow for a handful of notices a second resyncs like any other.
                let text = match n {
                    Ok(text) => text.to_string(),
                    Err(RecvError::Lagged(_)) => RESYNC.to_string(),
                    Err(RecvError::Closed) => break,
                };
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
                continue;
            }
            _ = &mut closed => break,
        };
        let mut next = match received {
            Ok(c) => Some(c),
            Err(RecvError::Lagged(_)) => {
                lagged = true;
                None
            }
            Err(RecvError::Closed) => break,
        };
        let mut batch: Vec<Arc<Change>> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        while !lagged {
            if let Some(c) = next.take() {
                match index.get(&c.order.id) {
                    Some(&i) if batch[i].order.version < c.order.version => batch[i] = c,
                    Some(_) => {}
                    None => {
                        index.insert(c.order.id.clone(), batch.len());
                        batch.push(c);
                    }
                }
            }
            if batch.len() >= DRAIN_MAX {
                break;
            }
            match rx.try_recv() {
                Ok(c) => next = Some(c),
                Err(TryRecvError::Lagged(_)) => lagged = true,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => break 'outer,
            }
        }
        if lagged {
            metrics::counter!(telemetry::WS_RESYNCS).increment(1);
            if sink.send(Message::Text(RESYNC.into())).await.is_err() {
                break;
            }
            continue;
        }
        for change in batch {
            if sink.send(Message::Text(change.message.clone().into())).await.is_err() {
                break 'outer;
            }
        }
    }
    closed.abort();
    gauge.decrement(1.0);
}
