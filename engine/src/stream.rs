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

/// Carries applied changes to every engine instance (Kafka's changelog topic), which
/// hand them back through [`ChangeStream::deliver`].
#[async_trait::async_trait]
pub trait ChangeRelay: Send + Sync {
    fn send(&self, order: &Order);
    /// Dead letters travel too (Kafka's dead-letter topic), for tools outside the engine.
    fn dead_letter(&self, letter: &crate::store::DeadLetter);
    /// Waits until every change sent so far is durably relayed.
    async fn flush(&self) -> Result<(), String>;
    /// Relays one change and waits for that one only (an operator's edit, outside the
    /// pipeline's batches).
    async fn send_now(&self, order: &Order) -> Result<(), String>;
}

#[derive(Clone)]
pub struct ChangeStream {
    tx: broadcast::Sender<Arc<Change>>,
    relay: Option<Arc<dyn ChangeRelay>>,
    /// Engine notices for clients (`run.phase`, `run.progress`): few, and never coalesced.
    notices: broadcast::Sender<Arc<str>>,
}

impl ChangeStream {
    /// `capacity` bounds how far a subscriber may fall behind before it must resync.
    pub fn new(capacity: usize) -> Self {
        Self { tx: broadcast::channel(capacity).0, relay: None, notices: broadcast::channel(256).0 }
    }

    /// Changes go through `relay` (and come back to every instance) instead of straight
    /// to this instance's subscribers.
    pub fn with_relay(mut self, relay: Arc<dyn ChangeRelay>) -> Self {
        self.relay = Some(relay);
        self
    }

    pub fn publish(&self, order: Order) {
        match &self.relay {
            Some(relay) => relay.send(&order),
            None => self.deliver(order),
        }
    }

    /// Publishes one change and, where it is relayed, waits until it is durable there.
    pub async fn publish_now(&self, order: Order) -> Result<(), String> {
        match &self.relay {
            Some(relay) => relay.send_now(&order).await,
            None => {
                self.deliver(order);
                Ok(())
            }
        }
    }

    /// Relays a dead letter beside the changes, where the backend has a place for them.
    pub fn dead_letter(&self, letter: &crate::store::DeadLetter) {
        if let Some(relay) = &self.relay {
            relay.dead_letter(letter);
        }
    }

    /// Hands a change to this instance's subscribers.
    pub fn deliver(&self, order: Order) {
        // Rendering costs more than the send; skip it when nobody listens.
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(Change::new(order)));
        }
    }

    /// Before the log commit: the changes of the batch must not be lost with the process.
    pub async fn flush(&self) -> Result<(), String> {
        match &self.relay {
            Some(relay) => relay.flush().await,
            None => Ok(()),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// Sends a notice (a rendered JSON message) to this instance's clients.
    pub fn notify(&self, message: String) {
        let _ = self.notices.send(message.into());
    }

    pub fn subscribe_notices(&self) -> broadcast::Receiver<Arc<str>> {
        self.notices.subscribe()
    }
}
