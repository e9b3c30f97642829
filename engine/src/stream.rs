//! The change stream: every applied row, fanned out to WebSocket clients and
//! in-process watchers without ever blocking the writer.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::domain::Order;

/// One applied change, with its wire message rendered once for all clients.
#[derive(Debug)]
pub struct Change {
    pub order: Order,
    /// `{"type":"order.synced","order":{...}}`
    pub message: String,
}

#[derive(Serialize)]
struct Synced<'a> {
    r#type: &'static str,
    order: &'a Order,
}

impl Change {
    pub fn new(order: Order) -> Self {
        let message = serde_json::to_string(&Synced { r#type: "order.synced", order: &order })
            .expect("an order always serializes");
        Self { order, message }
    }
}

#[derive(Clone)]
pub struct ChangeStream {
    tx: broadcast::Sender<Arc<Change>>,
}

impl ChangeStream {
    /// `capacity` bounds how far a subscriber may fall behind before it must resync.
    pub fn new(capacity: usize) -> Self {
        Self { tx: broadcast::channel(capacity).0 }
    }

    pub fn publish(&self, order: Order) {
        // Rendering costs more than the send; skip it when nobody listens.
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(Change::new(order)));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }
}
