//! Builders for native unit tests of plugins: events and rows with sensible defaults.

use crate::{EventKind, Order, OrderChange, OrderEvent, OrderFields, Status, Tier};

/// An event of `kind` for order `o-1` with an empty change; set fields on the result.
pub fn event(kind: EventKind) -> OrderEvent {
    OrderEvent {
        event_id: "e-1".into(),
        order_id: "o-1".into(),
        kind,
        source: "test".into(),
        occurred_at_ms: 1_700_000_000_000,
        payload: empty_change(),
    }
}

/// A `created` event for a customer, tier and total.
pub fn created(customer: &str, tier: Tier, total_cents: i64) -> OrderEvent {
    let mut e = event(EventKind::Created);
    e.payload.customer = Some(customer.into());
    e.payload.tier = Some(tier);
    e.payload.total_cents = Some(total_cents);
    e
}

/// An `updated` event carrying `change`.
pub fn updated(change: OrderChange) -> OrderEvent {
    OrderEvent { payload: change, ..event(EventKind::Updated) }
}

pub fn empty_change() -> OrderChange {
    OrderChange {
        shopify_order_id: None,
        customer: None,
        tier: None,
        status: None,
        financial_status: None,
        fulfillment_status: None,
        total_cents: None,
        shipping_fee_cents: None,
        currency: None,
        note: None,
    }
}

/// A stored row `o-1` at `version` with `status`.
pub fn order(version: u64, status: Status) -> Order {
    Order {
        id: "o-1".into(),
        fields: OrderFields {
            shopify_order_id: None,
            customer: "ada@example.com".into(),
            tier: Tier::Gold,
            status,
            total_cents: 10_000,
            shipping_fee_cents: 599,
            currency: "USD".into(),
            note: String::new(),
        },
        version,
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
        source_updated_at_ms: None,
    }
}
