//! The live change feed at `/ws`: one task per client with a bounded, order-coalescing
//! buffer, so a slow client falls behind (and is told to resync) instead of slowing the engine.

use std::collections::HashMap;
use std::sync::Arc;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::{ApiError, ApiQuery, AppState};
use crate::stream::{Change, batch_message};
use crate::telemetry;

/// Most changes taken from the stream per send cycle; duplicates of an order within
/// one cycle are coalesced to the newest. A client further behind than the stream's
/// capacity gets a resync instead.
const DRAIN_MAX: usize = 1024;
const RESYNC: &str = r#"{"type":"resync","reason":"client fell behind; re-fetch the orders you show"}"#;

/// Inbound messages larger than this close the socket: clients send nothing we read, so
/// a few KiB bound what an unfinished fragmented message can pin.
const MAX_INBOUND_BYTES: usize = 4096;
/// How long one send may wait on a client that does not read before it is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How many clients `/ws` serves at once, and how many it serves now.
#[derive(Debug, Clone)]
pub struct WsLimits {
    max_clients: usize,
    clients: Arc<AtomicUsize>,
}

impl WsLimits {
    pub fn new(max_clients: usize) -> Self {
        Self { max_clients, clients: Arc::default() }
    }
}

/// One client's place, given back when its task ends.
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `/ws?batch=true`: each send cycle's changes as one `orders.synced` message.
#[derive(Debug, Default, serde::Deserialize)]
pub struct FeedParams {
    #[serde(default)]
    batch: bool,
}

pub async fn upgrade(State(s): State<AppState>, ApiQuery(p): ApiQuery<FeedParams>, ws: WebSocketUpgrade) -> Response {
    let limits = &s.config.ws;
    if limits.clients.fetch_add(1, Ordering::Relaxed) >= limits.max_clients {
        limits.clients.fetch_sub(1, Ordering::Relaxed);
        metrics::counter!(telemetry::CONNECTIONS_REFUSED, "reason" => "ws_cap").increment(1);
        let detail = serde_json::json!({ "max_ws_clients": limits.max_clients, "message": "retry shortly" });
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many feed clients", detail);
        e.retry_after = Some(5);
        return e.into_response();
    }
    let place = Place(limits.clients.clone());
    // Subscribe before the upgrade completes, so no change applied after the
    // handshake answer can be missed.
    let rx = s.engine.changes().subscribe();
    let notices = s.engine.changes().subscribe_notices();
    let history = s.pulse.history_message();
    // Selecting the dashboard's subprotocol lets it offer its token beside it.
    ws.protocols([super::auth::WS_PROTOCOL])
        .max_message_size(MAX_INBOUND_BYTES)
        .max_frame_size(MAX_INBOUND_BYTES)
        .on_upgrade(move |socket| async move {
            serve(socket, rx, notices, history, p.batch).await;
            drop(place);
        })
}

async fn serve(
    socket: WebSocket,
    mut rx: tokio::sync::broadcast::Receiver<Arc<Change>>,
    mut notices: tokio::sync::broadcast::Receiver<Arc<str>>,
    history: String,
    batched: bool,
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
    // Then the charts' last 10 minutes, so a client draws them before the next second.
    if !send(&mut sink, hello.to_string()).await || !send(&mut sink, history).await {
        closed.abort();
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
                if !send(&mut sink, text).await {
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
            if !send(&mut sink, RESYNC.to_string()).await {
                break;
            }
            continue;
        }
        if batched {
            if !send(&mut sink, batch_message(batch.iter().map(|c| &**c))).await {
                break;
            }
            continue;
        }
        for change in batch {
            if !send(&mut sink, change.message.clone()).await {
                break 'outer;
            }
        }
    }
    closed.abort();
    gauge.decrement(1.0);
}

/// Sends one text message; false when the client is gone or has not read for
/// [`SEND_TIMEOUT`] (then it is dropped: a client that never reads would otherwise hold
/// its buffers for ever).
async fn send(sink: &mut futures::stream::SplitSink<WebSocket, Message>, text: String) -> bool {
    match tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(text.into()))).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            metrics::counter!(telemetry::WS_DROPPED, "reason" => "not_reading").increment(1);
            false
        }
    }
}
