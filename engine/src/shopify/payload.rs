//! Shopify's REST Order payloads to order events: topics to event kinds, money strings to
//! minor units without floating point, and only the fields we use (the rest is ignored).

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::domain::{EventKind, FinancialStatus, FulfillmentStatus, OrderChange, OrderEvent, Tier};

/// What a webhook topic means for an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicAction {
    Event(EventKind),
    /// A topic we do not act on: answered 200 and counted.
    Ignored,
}

pub fn topic_action(topic: &str) -> TopicAction {
    match topic {
        "orders/create" => TopicAction::Event(EventKind::Created),
        "orders/updated" | "orders/paid" | "orders/fulfilled" | "orders/partially_fulfilled" | "orders/edited" => {
            TopicAction::Event(EventKind::Updated)
        }
        "orders/cancelled" | "orders/delete" => TopicAction::Event(EventKind::Cancelled),
        _ => TopicAction::Ignored,
    }
}

#[derive(Debug, Deserialize)]
struct ShopifyOrder {
    id: Option<serde_json::Value>,
    updated_at: Option<String>,
    created_at: Option<String>,
    total_price: Option<serde_json::Value>,
    currency: Option<String>,
    financial_status: Option<String>,
    fulfillment_status: Option<String>,
    email: Option<String>,
    customer: Option<Customer>,
    note: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Customer {
    email: Option<String>,
    tags: Option<String>,
}

/// `"398.50"` in `currency` → minor units, exactly: digits are read as digits.
pub fn parse_money(text: &str, currency: &str) -> Result<i64, String> {
    let exponent = crate::domain::minor_digits(currency) as usize;
    let bad = || format!("{text:?} is not an amount in {currency}");
    let (negative, digits) = match text.trim().strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.trim()),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // Extra decimals are fine only as trailing zeros ("10.500" is 10.50).
    let (kept, extra) = fraction.split_at(fraction.len().min(exponent));
    if !extra.bytes().all(|b| b == b'0') {
        return Err(format!("{text:?} has more decimals than {currency} allows"));
    }
    let mut units: i64 = whole.parse().map_err(|_| bad())?;
    for i in 0..exponent {
        let digit = kept.as_bytes().get(i).map_or(0, |b| (b - b'0') as i64);
        units = units.checked_mul(10).and_then(|u| u.checked_add(digit)).ok_or_else(bad)?;
    }
    Ok(if negative { -units } else { units })
}

/// The customer's tier from their Shopify tags (`diamond`/`vip`, `gold`, `silver`).
fn tier_from_tags(tags: Option<&str>) -> Tier {
    let tags: Vec<String> = tags.unwrap_or("").split(',').map(|t| t.trim().to_ascii_lowercase()).collect();
    let has = |t: &str| tags.iter().any(|x| x == t);
    if has("diamond") || has("vip") {
        Tier::Diamond
    } else if has("gold") {
        Tier::Gold
    } else if has("silver") {
        Tier::Silver
    } else {
        Tier::Bronze
    }
}

fn time(field: &str, value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{field} {value:?} is not a timestamp: {e}"))
}

/// Builds the order event for a delivery. `delivery_id` (the webhook id) makes the event
/// id, so Shopify's retries of one delivery are one event.
pub fn to_event(kind: EventKind, body: &[u8], delivery_id: &str) -> Result<OrderEvent, String> {
    let order: ShopifyOrder =
        serde_json::from_slice(body).map_err(|e| format!("the body is not a Shopify order: {e}"))?;
    let id = match order.id {
        Some(serde_json::Value::Number(n)) => n.as_i64().ok_or_else(|| format!("id {n} is not a 64-bit integer"))?,
        Some(other) => return Err(format!("id must be an integer, got {other}")),
        None => return Err("the order has no id".into()),
    };
    let occurred_at = match (&order.updated_at, &order.created_at) {
        (Some(t), _) => time("updated_at", t)?,
        (None, Some(t)) if kind == EventKind::Created => time("created_at", t)?,
        _ if kind == EventKind::Cancelled => Utc::now(),
        _ => return Err("the order has no updated_at".into()),
    };
    let currency = order.currency.clone().unwrap_or_else(|| "USD".into()).to_ascii_uppercase();
    let total_cents = match &order.total_price {
        Some(serde_json::Value::String(s)) => Some(parse_money(s, &currency)?),
        Some(other) => return Err(format!("total_price must be a string, got {other}")),
        None if kind == EventKind::Created => return Err("an orders/create payload needs total_price".into()),
        None => None,
    };
    let customer = order.customer.as_ref().and_then(|c| c.email.clone()).or(order.email.clone());
    if kind == EventKind::Created && customer.is_none() {
        return Err("an orders/create payload needs email or customer.email".into());
    }
    let financial_status = order.financial_status.as_deref().and_then(|s| match s {
        "pending" => Some(FinancialStatus::Pending),
        "authorized" => Some(FinancialStatus::Authorized),
        "partially_paid" => Some(FinancialStatus::PartiallyPaid),
        "paid" => Some(FinancialStatus::Paid),
        "partially_refunded" => Some(FinancialStatus::PartiallyRefunded),
        "refunded" => Some(FinancialStatus::Refunded),
        "voided" => Some(FinancialStatus::Voided),
        _ => None,
    });
    let fulfillment_status = order.fulfillment_status.as_deref().and_then(|s| match s {
        "fulfilled" => Some(FulfillmentStatus::Fulfilled),
        "partial" => Some(FulfillmentStatus::Partial),
        "restocked" => Some(FulfillmentStatus::Restocked),
        _ => None,
    });
    Ok(OrderEvent {
        event_id: format!("shopify:{delivery_id}"),
        order_id: format!("shopify-{id}"),
        kind,
        source: "shopify".into(),
        occurred_at,
        accepted_at: None,
        // The bridge sets it from the delivery's X-Shopify-Shop-Domain.
        shop: None,
        payload: OrderChange {
            shopify_order_id: Some(id),
            customer: if kind == EventKind::Created { customer } else { None },
            // The tier decides the partition: set it on create, keep it after.
            tier: (kind == EventKind::Created)
                .then(|| tier_from_tags(order.customer.as_ref().and_then(|c| c.tags.as_deref()))),
            financial_status,
            fulfillment_status,
            total_cents,
            currency: order.total_price.as_ref().map(|_| currency),
            // Shopify's notes may be longer than ours: the rest is cut, never refused
            // (a refusal would make Shopify retry the delivery for two days).
            note: order.note.filter(|n| !n.is_empty()).map(crate::domain::truncate_note),
            ..Default::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_exact() {
        assert_eq!(parse_money("398.00", "USD"), Ok(39_800));
        assert_eq!(parse_money("0.1", "EUR"), Ok(10));
        assert_eq!(parse_money("19.99", "USD"), Ok(1_999));
        assert_eq!(parse_money("10.500", "USD"), Ok(1_050));
        assert_eq!(parse_money("7", "USD"), Ok(700));
        assert_eq!(parse_money("-5.25", "USD"), Ok(-525));
        assert_eq!(parse_money("1500", "JPY"), Ok(1_500));
        assert_eq!(parse_money("1500.00", "JPY"), Ok(1_500));
        // The sum a float would get wrong stays exact.
        assert_eq!(parse_money("0.29", "USD"), Ok(29));
        for bad in ["", ".5", "1.2.3", "12,50", "1e3", "NaN", " - 1", "10.555", "1500.5x", "99999999999999999999"] {
            assert!(parse_money(bad, "USD").is_err(), "{bad:?}");
        }
        assert!(parse_money("1500.5", "JPY").is_err());
    }

    #[test]
    fn topics_map_to_kinds() {
        assert_eq!(topic_action("orders/create"), TopicAction::Event(EventKind::Created));
        for t in ["orders/updated", "orders/paid", "orders/fulfilled", "orders/partially_fulfilled", "orders/edited"] {
            assert_eq!(topic_action(t), TopicAction::Event(EventKind::Updated), "{t}");
        }
        assert_eq!(topic_action("orders/cancelled"), TopicAction::Event(EventKind::Cancelled));
        assert_eq!(topic_action("orders/delete"), TopicAction::Event(EventKind::Cancelled));
        assert_eq!(topic_action("products/update"), TopicAction::Ignored);
    }

    #[test]
    fn a_real_payload_with_extra_fields_maps() {
        let body = include_bytes!("fixtures/orders_create.json");
        let e = to_event(EventKind::Created, body, "wh-1").unwrap();
        assert_eq!(
            (e.order_id.as_str(), e.event_id.as_str(), e.source.as_str()),
            ("shopify-820982911946154508", "shopify:wh-1", "shopify")
        );
        assert_eq!(e.payload.shopify_order_id, Some(820982911946154508));
        assert_eq!((e.payload.total_cents, e.payload.currency.as_deref()), (Some(59_895), Some("USD")));
        assert_eq!(e.payload.customer.as_deref(), Some("jon@example.com"));
        assert_eq!(e.payload.tier, Some(Tier::Gold));
        assert_eq!(e.payload.financial_status, Some(FinancialStatus::Authorized));
        assert_eq!(e.occurred_at.to_rfc3339(), "2026-11-21T15:04:26+00:00");
    }

    #[test]
    fn missing_or_wrong_fields_say_which() {
        let err = |body: &str, kind| to_event(kind, body.as_bytes(), "w").unwrap_err();
        assert!(err(r#"{"updated_at":"2026-01-01T00:00:00Z"}"#, EventKind::Updated).contains("no id"));
        assert!(
            err(r#"{"id":"12","updated_at":"2026-01-01T00:00:00Z"}"#, EventKind::Updated)
                .contains("must be an integer")
        );
        assert!(err(r#"{"id":12}"#, EventKind::Updated).contains("no updated_at"));
        assert!(
            err(r#"{"id":12,"updated_at":"2026-01-01T00:00:00Z","email":"a@b"}"#, EventKind::Created)
                .contains("needs total_price")
        );
        assert!(
            err(r#"{"id":12,"updated_at":"2026-01-01T00:00:00Z","total_price":12.5}"#, EventKind::Updated)
                .contains("must be a string")
        );
        assert!(err("[1,2]", EventKind::Updated).contains("not a Shopify order"));
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), kind in 0..3u8) {
            let kind = [EventKind::Created, EventKind::Updated, EventKind::Cancelled][kind as usize];
            let _ = to_event(kind, &body, "fuzz");
        }

        /// JSON-shaped bodies with hostile values never panic either.
        #[test]
        fn hostile_json_never_panics(
            id in any::<i64>(),
            price in ".{0,24}",
            updated in ".{0,40}",
            currency in "[A-Za-z]{0,4}",
            tags in ".{0,30}"
        ) {
            let body = serde_json::json!({
                "id": id, "total_price": price, "updated_at": updated, "currency": currency, "email": "x@y",
                "customer": {"tags": tags}
            });
            let _ = to_event(EventKind::Created, body.to_string().as_bytes(), "fuzz");
            let _ = parse_money(&price, &currency);
        }
    }
}
