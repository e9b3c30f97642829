//! The default order-processing rules, shipped inside the engine as the `order-rules`
//! plugin (and used natively as the reference the plugin is checked against):
//! - status from Shopify's statuses: fulfillment wins when present, then financial;
//! - shipping fee from the order total;
//! - validation: negative amounts are rejected, updates to unknown orders too;
//! - monotonic status: an event never moves an order back along the status lattice.

#![deny(rust_2018_idioms)]

use orchestrator_sdk::*;

pub struct Rules;

/// Shipping fee by order total, in cents: under 50 → 9.99, under 100 → 7.99,
/// under 200 → 5.99, otherwise free.
pub fn shipping_fee_cents(total_cents: i64) -> i64 {
    match total_cents {
        t if t < 5_000 => 999,
        t if t < 10_000 => 799,
        t if t < 20_000 => 599,
        _ => 0,
    }
}

/// Status from Shopify's statuses: fulfillment wins when present, then financial.
pub fn mapped_status(financial: Option<FinancialStatus>, fulfillment: Option<FulfillmentStatus>) -> Option<Status> {
    if let Some(f) = fulfillment {
        return Some(match f {
            FulfillmentStatus::Fulfilled => Status::Shipped,
            FulfillmentStatus::Partial => Status::Confirmed,
            FulfillmentStatus::Restocked => Status::Cancelled,
        });
    }
    financial.map(|f| match f {
        FinancialStatus::Pending | FinancialStatus::Authorized => Status::Pending,
        FinancialStatus::Paid | FinancialStatus::PartiallyPaid | FinancialStatus::PartiallyRefunded => {
            Status::Confirmed
        }
        FinancialStatus::Refunded | FinancialStatus::Voided => Status::Cancelled,
    })
}

impl OrderRules for Rules {
    fn decide(event: OrderEvent, current: Option<Order>) -> Decision {
        let p = event.payload;
        if event.kind == EventKind::Created && current.is_some() {
            return Decision::Skip("order already exists".into());
        }
        // Shopify delivers late and out of order: a change strictly older than the last
        // one applied from Shopify is discarded (and kept in the history with this reason).
        // An equal `updated_at` is a different change in the same second (Shopify's
        // resolution), not a stale one: true duplicates never get here, since the event-id
        // ledger absorbs them.
        if event.source == "shopify"
            && let Some(last) = current.as_ref().and_then(|c| c.source_updated_at_ms)
            && event.occurred_at_ms < last
        {
            return Decision::Skip(format!(
                "discarded: stale delivery (updated_at {} is older than {})",
                event.occurred_at_ms, last
            ));
        }
        if let Some(total) = p.total_cents.filter(|t| *t < 0) {
            return Decision::Reject(format!("negative total_cents {total}"));
        }
        if let Some(fee) = p.shipping_fee_cents.filter(|f| *f < 0) {
            return Decision::Reject(format!("negative shipping_fee_cents {fee}"));
        }
        let before = current.map(|row| row.fields);
        let mut fields = match &before {
            Some(fields) => fields.clone(),
            None => {
                // An update may arrive before (or without) its create; it can only
                // create the row when it carries everything a create needs.
                let (true, Some(tier), Some(total)) = (p.customer.is_some(), p.tier, p.total_cents) else {
                    let kind = match event.kind {
                        EventKind::Created => "created",
                        EventKind::Updated => "updated",
                        EventKind::Cancelled => "cancelled",
                    };
                    return Decision::Reject(format!(
                        "order {} does not exist and the {kind} event lacks customer, tier or total_cents",
                        event.order_id
                    ));
                };
                // The customer (and a currency, when the event has one) are moved in
                // from the change below rather than copied here.
                OrderFields {
                    shopify_order_id: None,
                    customer: String::new(),
                    tier,
                    status: Status::Pending,
                    total_cents: total,
                    shipping_fee_cents: shipping_fee_cents(total),
                    currency: if p.currency.is_some() { String::new() } else { "USD".into() },
                    note: String::new(),
                }
            }
        };
        if let Some(v) = p.shopify_order_id {
            fields.shopify_order_id = Some(v);
        }
        if let Some(v) = p.customer {
            fields.customer = v;
        }
        if let Some(v) = p.tier {
            fields.tier = v;
        }
        if let Some(v) = p.currency {
            fields.currency = v;
        }
        if let Some(v) = p.note {
            fields.note = v;
        }
        if let Some(total) = p.total_cents {
            fields.total_cents = total;
            fields.shipping_fee_cents = shipping_fee_cents(total);
        }
        if let Some(fee) = p.shipping_fee_cents {
            fields.shipping_fee_cents = fee;
        }
        let mut status = mapped_status(p.financial_status, p.fulfillment_status).or(p.status);
        if event.kind == EventKind::Cancelled {
            status = Some(Status::Cancelled);
        }
        // A late or stale event never moves the order back along the lattice.
        if let Some(s) = status.filter(|s| s.rank() >= fields.status.rank()) {
            fields.status = s;
        }
        match before {
            Some(b) if b == fields => Decision::Skip("no change".into()),
            _ => Decision::Upsert(fields),
        }
    }
}

#[cfg(feature = "export")]
export_order_rules!(Rules);

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_sdk::testing::{created, empty_change, event, order, updated};

    fn upsert(d: Decision) -> OrderFields {
        match d {
            Decision::Upsert(f) => f,
            other => panic!("expected an upsert, got {other:?}"),
        }
    }

    #[test]
    fn shipping_fee_brackets() {
        let cases = [(0, 999), (4_999, 999), (5_000, 799), (9_999, 799), (10_000, 599), (19_999, 599), (20_000, 0)];
        for (total, fee) in cases {
            assert_eq!(shipping_fee_cents(total), fee, "total {total}");
        }
    }

    #[test]
    fn status_mapping_fulfillment_wins() {
        use FinancialStatus as F;
        use FulfillmentStatus as S;
        assert_eq!(mapped_status(Some(F::Pending), Some(S::Fulfilled)), Some(Status::Shipped));
        assert_eq!(mapped_status(Some(F::Paid), Some(S::Partial)), Some(Status::Confirmed));
        assert_eq!(mapped_status(None, Some(S::Restocked)), Some(Status::Cancelled));
        assert_eq!(mapped_status(Some(F::Authorized), None), Some(Status::Pending));
        assert_eq!(mapped_status(Some(F::PartiallyRefunded), None), Some(Status::Confirmed));
        assert_eq!(mapped_status(Some(F::Voided), None), Some(Status::Cancelled));
        assert_eq!(mapped_status(None, None), None);
    }

    #[test]
    fn create_sets_fee_and_pending() {
        let f = upsert(Rules::decide(created("ada", Tier::Gold, 12_000), None));
        assert_eq!((f.status, f.shipping_fee_cents, f.currency.as_str()), (Status::Pending, 599, "USD"));
    }

    #[test]
    fn create_on_existing_row_is_skipped() {
        let d = Rules::decide(created("ada", Tier::Gold, 100), Some(order(1, Status::Pending)));
        assert_eq!(d, Decision::Skip("order already exists".into()));
    }

    #[test]
    fn negative_amounts_are_rejected() {
        let negative_total = Rules::decide(created("ada", Tier::Gold, -1), None);
        assert!(matches!(negative_total, Decision::Reject(r) if r.contains("negative total")));
        let fee = updated(OrderChange { shipping_fee_cents: Some(-5), ..empty_change() });
        let negative_fee = Rules::decide(fee, Some(order(1, Status::Pending)));
        assert!(matches!(negative_fee, Decision::Reject(r) if r.contains("negative shipping")));
    }

    #[test]
    fn update_of_an_unknown_order_is_rejected() {
        let e = updated(OrderChange { note: Some("x".into()), ..empty_change() });
        assert!(matches!(Rules::decide(e, None), Decision::Reject(r) if r.contains("does not exist")));
    }

    #[test]
    fn status_never_moves_backwards() {
        let late_paid = updated(OrderChange { financial_status: Some(FinancialStatus::Paid), ..empty_change() });
        assert_eq!(
            Rules::decide(late_paid.clone(), Some(order(3, Status::Shipped))),
            Decision::Skip("no change".into())
        );
        assert_eq!(upsert(Rules::decide(late_paid, Some(order(1, Status::Pending)))).status, Status::Confirmed);
        let cancel = event(EventKind::Cancelled);
        assert_eq!(upsert(Rules::decide(cancel, Some(order(3, Status::Shipped)))).status, Status::Cancelled);
    }

    #[test]
    fn a_stale_shopify_delivery_is_discarded() {
        let mut row = order(2, Status::Confirmed);
        row.source_updated_at_ms = Some(2_000);
        let mut e = updated(OrderChange { note: Some("late".into()), ..empty_change() });
        e.source = "shopify".into();
        e.occurred_at_ms = 1_999;
        let stale = Rules::decide(e.clone(), Some(row.clone()));
        assert!(matches!(stale, Decision::Skip(r) if r.starts_with("discarded: stale")));
        // The same second is another change, not a stale one.
        e.occurred_at_ms = 2_000;
        assert!(matches!(Rules::decide(e.clone(), Some(row.clone())), Decision::Upsert(_)));
        e.occurred_at_ms = 2_001;
        assert!(matches!(Rules::decide(e.clone(), Some(row.clone())), Decision::Upsert(_)));
        // Other sources are not judged by Shopify's clock.
        e.source = "api".into();
        e.occurred_at_ms = 1;
        assert!(matches!(Rules::decide(e, Some(row)), Decision::Upsert(_)));
    }

    #[test]
    fn total_change_recomputes_the_fee() {
        let e = updated(OrderChange { total_cents: Some(30_000), ..empty_change() });
        let f = upsert(Rules::decide(e, Some(order(1, Status::Pending))));
        assert_eq!((f.total_cents, f.shipping_fee_cents), (30_000, 0));
    }
}
