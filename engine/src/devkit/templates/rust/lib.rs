//! {{name}}: order rules for the Atomic Order Orchestrator.
//!
//! A new order takes its fields from its created event; an update changes only what it
//! names. The house rule: shipping is free from 100.00 for GOLD and DIAMOND customers,
//! and costs 4.99 below that.

use orchestrator_sdk::*;

pub struct Rules;

/// The shipping fee, in cents.
pub fn shipping_fee_cents(tier: Tier, total_cents: i64) -> i64 {
    match tier {
        Tier::Gold | Tier::Diamond if total_cents >= 10_000 => 0,
        _ => 499,
    }
}

impl OrderRules for Rules {
    fn decide(event: OrderEvent, current: Option<Order>) -> Decision {
        let change = event.payload;
        if change.total_cents.is_some_and(|t| t < 0) {
            return Decision::Reject("the total is negative".into());
        }
        let mut fields = match current {
            Some(order) if event.kind == EventKind::Created => {
                return Decision::Skip(format!("order {} exists already", order.id));
            }
            Some(order) => order.fields,
            None => {
                let (Some(customer), Some(tier), Some(total)) =
                    (change.customer.clone(), change.tier, change.total_cents)
                else {
                    return Decision::Reject("a new order needs a customer, a tier and a total".into());
                };
                OrderFields {
                    shopify_order_id: None,
                    customer,
                    tier,
                    status: Status::Pending,
                    total_cents: total,
                    shipping_fee_cents: 0,
                    currency: "USD".into(),
                    note: String::new(),
                }
            }
        };
        if let Some(v) = change.customer {
            fields.customer = v;
        }
        if let Some(v) = change.tier {
            fields.tier = v;
        }
        if let Some(v) = change.total_cents {
            fields.total_cents = v;
        }
        if let Some(v) = change.currency {
            fields.currency = v;
        }
        if let Some(v) = change.note {
            fields.note = v;
        }
        if let Some(v) = change.status {
            fields.status = v;
        }
        if event.kind == EventKind::Cancelled {
            fields.status = Status::Cancelled;
        }
        fields.shipping_fee_cents = shipping_fee_cents(fields.tier, fields.total_cents);
        Decision::Upsert(fields)
    }
}

export_order_rules!(Rules);
