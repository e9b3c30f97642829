//! The change stream: every applied row, fanned out to WebSocket clients and
//! in-process watchers without ever blocking the writer.

use std::sync::Arc;

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

/// What a change's message holds before the order's JSON (and `}` after it).
const SYNCED_HEAD: &str = r#"{"type":"order.synced","order":"#;

impl Change {
    pub fn new(order: Order) -> Self {
        let json = serde_json::to_string(&order).expect("an order always serializes");
        let message = format!("{SYNCED_HEAD}{json}}}");
        Self { order, message }
    }

    /// The order's JSON inside the message, for clients that take changes in batches.
    pub fn order_json(&self) -> &str {
        &self.message[SYNCED_HEAD.len()..self.message.len() - 1]
    }
}

/// Changes as one message, `{"type":"orders.synced","orders":[{...},...]}`, for clients
/// that asked for batches: a browser pays per message, and 1k updates a second are 1k
/// messages otherwise.
pub fn batch_message<'a>(changes: impl IntoIterator<Item = &'a Change>) -> String {
    let mut message = String::from(r#"{"type":"orders.synced","orders":["#);
    for (n, change) in changes.into_iter().enumerate() {
        if n > 0 {
            message.push(',');
        }
        message.push_str(change.order_json());
    }
    message.push_str("]}");
    message
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::row;

    #[test]
    fn a_batch_carries_each_change_as_its_own_message_does() {
        let changes: Vec<Change> = ["a", "b\"quoted\"", "c"].iter().map(|id| Change::new(row(id, 3, "n"))).collect();
        for c in &changes {
            let single: serde_json::Value = serde_json::from_str(&c.message).unwrap();
            assert_eq!(single["type"], "order.synced");
            assert_eq!(serde_json::from_value::<Order>(single["order"].clone()).unwrap(), c.order);
        }
        let batch: serde_json::Value = serde_json::from_str(&batch_message(&changes)).unwrap();
        assert_eq!(batch["type"], "orders.synced");
        let orders: Vec<Order> = serde_json::from_value(batch["orders"].clone()).unwrap();
        assert_eq!(orders, changes.iter().map(|c| c.order.clone()).collect::<Vec<_>>());
        let empty: serde_json::Value = serde_json::from_str(&batch_message([])).unwrap();
        assert_eq!(empty["orders"], serde_json::json!([]));
    }
}
