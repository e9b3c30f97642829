//! The change stream: every applied row, fanned out to WebSocket clients and
//! in-process watchers without ever blocking the writer.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::cluster::{Channel, Cluster};
use crate::domain::Order;
use crate::failure::DeadLetter;
use crate::log::LogError;

fn to_json(order: &Order) -> Vec<u8> {
    serde_json::to_vec(order).expect("an order always serializes")
}

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
    /// Where instances share a log, changes go round the cluster and come back to every
    /// instance through [`ChangeStream::deliver_json`].
    relay: Option<Arc<dyn Cluster>>,
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
    pub fn with_relay(mut self, relay: Arc<dyn Cluster>) -> Self {
        self.relay = Some(relay);
        self
    }

    pub fn publish(&self, order: Order) {
        match &self.relay {
            Some(relay) => relay.send(Channel::Changes, &order.id, &to_json(&order)),
            None => self.deliver(order),
        }
    }

    /// Publishes one change and, where it is relayed, waits until it is durable there.
    pub async fn publish_now(&self, order: Order) -> Result<(), LogError> {
        match &self.relay {
            Some(relay) => relay.send_now(Channel::Changes, &order.id, &to_json(&order)).await,
            None => {
                self.deliver(order);
                Ok(())
            }
        }
    }

    /// Relays a dead letter beside the changes, where the backend has a place for them.
    pub fn dead_letter(&self, letter: &DeadLetter) {
        if let Some(relay) = &self.relay {
            let key = letter.order_id.as_deref().unwrap_or(&letter.id);
            let payload = serde_json::to_vec(letter).expect("a dead letter always serializes");
            relay.send(Channel::DeadLetters, key, &payload);
        }
    }

    /// Hands a change that came round the cluster to this instance's subscribers.
    pub fn deliver_json(&self, payload: &[u8]) {
        match serde_json::from_slice::<Order>(payload) {
            Ok(order) => self.deliver(order),
            Err(e) => tracing::warn!(error = %e, "unreadable record on the changelog"),
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
    pub async fn flush(&self) -> Result<(), LogError> {
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
