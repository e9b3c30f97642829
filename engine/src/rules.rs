//! The rule stage: the interfaces the pipeline calls to decide rows and merge races,
//! and the native reference rules (prior system A's status and shipping-fee rules).

use crate::domain::{
    EventKind, FinancialStatus, FulfillmentStatus, Order, OrderEvent, OrderFields, Status,
};

/// What the order rules decided for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write these fields as the order's next version.
    Upsert(OrderFields),
    /// Leave the row alone; the reason is kept in the order's history.
    Skip(String),
    /// Send the event to the dead-letter log with this reason.
    Reject(String),
}

/// Order-processing rules: decide the next row from an event and the current row.
pub trait OrderRules: Send + Sync {
    /// `slot@version` (plus a hash once rules are plugins), recorded as `decided_by`.
    fn id(&self) -> &str;
    fn decide(&self, event: &OrderEvent, current: Option<&Order>) -> Decision;
}

/// Conflict resolution: when a versioned write lost a race, merge the row the writer
/// based its change on, the row now stored, and the writer's change.
pub trait ConflictResolver: Send + Sync {
    fn id(&self) -> &str;
    fn resolve(
        &self,
        base: Option<&Order>,
        current: &Order,
        change: &OrderFields,
    ) -> Result<OrderFields, String>;
}

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
pub fn mapped_status(
    financial: Option<FinancialStatus>,
    fulfillment: Option<FulfillmentStatus>,
) -> Option<Status> {
    if let Some(f) = fulfillment {
        return Some(match f {
            FulfillmentStatus::Fulfilled => Status::Shipped,
            FulfillmentStatus::Partial => Status::Confirmed,
            FulfillmentStatus::Restocked => Status::Cancelled,
        });
    }
    financial.map(|f| match f {
        FinancialStatus::Pending | FinancialStatus::Authorized => Status::Pending,
        FinancialStatus::Paid
        | FinancialStatus::PartiallyPaid
        | FinancialStatus::PartiallyRefunded => Status::Confirmed,
        FinancialStatus::Refunded | FinancialStatus::Voided => Status::Cancelled,
    })
}

/// The native reference rules. The Wasm `order-rules` plugin must decide the same.
#[derive(Debug, Default)]
pub struct NativeRules;

impl NativeRules {
    pub const ID: &'static str = "native:order-rules@1";
}

impl OrderRules for NativeRules {
    fn id(&self) -> &str {
        Self::ID
    }

    fn decide(&self, event: &OrderEvent, current: Option<&Order>) -> Decision {
        let p = &event.payload;
        if event.kind == EventKind::Created && current.is_some() {
            return Decision::Skip("order already exists".into());
        }
        if let Some(total) = p.total_cents
            && total < 0
        {
            return Decision::Reject(format!("negative total_cents {total}"));
        }
        if let Some(fee) = p.shipping_fee_cents
            && fee < 0
        {
            return Decision::Reject(format!("negative shipping_fee_cents {fee}"));
        }
        let mut fields = match current {
            Some(row) => row.fields(),
            None => {
                // An update may arrive before (or without) its create; it can only
                // create the row when it carries everything a create needs.
                let (Some(customer), Some(tier), Some(total)) =
                    (p.customer.clone(), p.tier, p.total_cents)
                else {
                    return Decision::Reject(format!(
                        "order {} does not exist and the {:?} event lacks customer, tier or total_cents",
                        event.order_id, event.kind
                    ));
                };
                OrderFields {
                    shopify_order_id: None,
                    customer,
                    tier,
                    status: Status::Pending,
                    total_cents: total,
                    shipping_fee_cents: shipping_fee_cents(total),
                    currency: "USD".into(),
                    note: String::new(),
                }
            }
        };
        if let Some(v) = p.shopify_order_id {
            fields.shopify_order_id = Some(v);
        }
        if let Some(v) = &p.customer {
            fields.customer.clone_from(v);
        }
        if let Some(v) = p.tier {
            fields.tier = v;
        }
        if let Some(v) = &p.currency {
            fields.currency.clone_from(v);
        }
        if let Some(v) = &p.note {
            fields.note.clone_from(v);
        }
        if let Some(total) = p.total_cents {
            fields.total_cents = total;
            fields.shipping_fee_cents = shipping_fee_cents(total);
        }
        if let Some(fee) = p.shipping_fee_cents {
            fields.shipping_fee_cents = fee;
        }
        if let Some(status) = mapped_status(p.financial_status, p.fulfillment_status).or(p.status)
        {
            fields.status = status;
        }
        if event.kind == EventKind::Cancelled {
            fields.status = Status::Cancelled;
        }
        match current {
            Some(row) if row.fields() == fields => Decision::Skip("no change".into()),
            _ => Decision::Upsert(fields),
        }
    }
}

/// Field-level merge: a field the writer changed (relative to its base) takes the
/// writer's value; every other field keeps the stored value.
#[derive(Debug, Default)]
pub struct NativeResolver;

impl NativeResolver {
    pub const ID: &'static str = "native:conflict-resolver@1";
}

impl ConflictResolver for NativeResolver {
    fn id(&self) -> &str {
        Self::ID
    }

    fn resolve(
        &self,
        base: Option<&Order>,
        current: &Order,
        change: &OrderFields,
    ) -> Result<OrderFields, String> {
        let Some(base) = base.map(Order::fields) else {
            // The writer meant to create the row but someone else did first:
            // its fields are all "changed", but never overwrite an identity.
            if change.customer != current.customer {
                return Err(format!(
                    "order {} was created concurrently for another customer",
                    current.id
                ));
            }
            return Ok(change.clone());
        };
        let cur = current.fields();
        fn pick<T: PartialEq + Clone>(base: &T, cur: &T, change: &T) -> T {
            if change != base { change.clone() } else { cur.clone() }
        }
        Ok(OrderFields {
            shopify_order_id: pick(&base.shopify_order_id, &cur.shopify_order_id, &change.shopify_order_id),
            customer: pick(&base.customer, &cur.customer, &change.customer),
            tier: pick(&base.tier, &cur.tier, &change.tier),
            status: pick(&base.status, &cur.status, &change.status),
            total_cents: pick(&base.total_cents, &cur.total_cents, &change.total_cents),
            shipping_fee_cents: pick(&base.shipping_fee_cents, &cur.shipping_fee_cents, &change.shipping_fee_cents),
            currency: pick(&base.currency, &cur.currency, &change.currency),
            note: pick(&base.note, &cur.note, &change.note),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderChange, Tier};
    use chrono::Utc;

    fn event(kind: EventKind, payload: OrderChange) -> OrderEvent {
        OrderEvent {
            event_id: "e1".into(),
            order_id: "o1".into(),
            kind,
            source: "test".into(),
            occurred_at: Utc::now(),
            payload,
        }
    }

    fn row(fields: OrderFields) -> Order {
        Order {
            id: "o1".into(),
            shopify_order_id: fields.shopify_order_id,
            customer: fields.customer,
            tier: fields.tier,
            priority: fields.tier.priority(),
            status: fields.status,
            total_cents: fields.total_cents,
            shipping_fee_cents: fields.shipping_fee_cents,
            currency: fields.currency,
            note: fields.note,
            version: 3,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            decided_by: "t".into(),
        }
    }

    fn created(total: i64) -> OrderEvent {
        event(
            EventKind::Created,
            OrderChange {
                customer: Some("ada".into()),
                tier: Some(Tier::Gold),
                total_cents: Some(total),
                ..Default::default()
            },
        )
    }

    #[test]
    fn shipping_fee_brackets() {
        assert_eq!(shipping_fee_cents(0), 999);
        assert_eq!(shipping_fee_cents(4_999), 999);
        assert_eq!(shipping_fee_cents(5_000), 799);
        assert_eq!(shipping_fee_cents(9_999), 799);
        assert_eq!(shipping_fee_cents(10_000), 599);
        assert_eq!(shipping_fee_cents(19_999), 599);
        assert_eq!(shipping_fee_cents(20_000), 0);
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
        let Decision::Upsert(f) = NativeRules.decide(&created(12_000), None) else {
            panic!("expected upsert")
        };
        assert_eq!((f.status, f.shipping_fee_cents, f.currency.as_str()), (Status::Pending, 599, "USD"));
    }

    #[test]
    fn create_on_existing_row_is_skipped() {
        let Decision::Upsert(f) = NativeRules.decide(&created(100), None) else { panic!() };
        assert!(matches!(NativeRules.decide(&created(100), Some(&row(f))), Decision::Skip(_)));
    }

    #[test]
    fn negative_total_is_rejected() {
        assert!(matches!(NativeRules.decide(&created(-1), None), Decision::Reject(r) if r.contains("negative")));
    }

    #[test]
    fn update_without_row_and_fields_is_rejected() {
        let e = event(EventKind::Updated, OrderChange { note: Some("x".into()), ..Default::default() });
        assert!(matches!(NativeRules.decide(&e, None), Decision::Reject(r) if r.contains("does not exist")));
    }

    #[test]
    fn cancel_and_noop() {
        let Decision::Upsert(f) = NativeRules.decide(&created(100), None) else { panic!() };
        let current = row(f);
        let cancel = event(EventKind::Cancelled, OrderChange::default());
        assert!(matches!(NativeRules.decide(&cancel, Some(&current)), Decision::Upsert(f) if f.status == Status::Cancelled));
        let same = event(EventKind::Updated, OrderChange { note: Some(String::new()), ..Default::default() });
        assert_eq!(NativeRules.decide(&same, Some(&current)), Decision::Skip("no change".into()));
    }

    #[test]
    fn resolver_keeps_concurrent_changes_to_other_fields() {
        let Decision::Upsert(f) = NativeRules.decide(&created(100), None) else { panic!() };
        let base = row(f.clone());
        // Someone else changed the note meanwhile; the writer changed the status.
        let mut current = base.clone();
        current.note = "operator".into();
        current.version = 4;
        let mut change = f;
        change.status = Status::Shipped;
        let merged = NativeResolver.resolve(Some(&base), &current, &change).unwrap();
        assert_eq!((merged.status, merged.note.as_str()), (Status::Shipped, "operator"));
    }
}
