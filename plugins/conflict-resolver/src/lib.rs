//! The default conflict resolver, shipped inside the engine as the `conflict-resolver`
//! plugin: a field-level merge of a change that lost a race with the row now stored.
//! - a field only one side changed takes that side's value;
//! - a field both changed: status moves along its lattice, never backwards; any other
//!   field takes the newer side's value (so an operator's later edit wins);
//! - a create that raced another create of the same order for a different customer is rejected.

#![deny(rust_2018_idioms)]

use orchestrator_sdk::*;

pub struct Resolver;

impl ConflictResolver for Resolver {
    fn resolve(base: Option<Order>, current: Order, change: Order) -> Result<OrderFields, String> {
        let cur = &current.fields;
        let new = &change.fields;
        if base.is_none() && cur.customer != new.customer {
            return Err(format!("order {} was created concurrently for another customer", current.id));
        }
        let change_is_newer = change.updated_at_ms > current.updated_at_ms;
        let base = base.map(|b| b.fields);
        // The change's value wins a field it changed, unless the stored row changed it
        // too and is newer.
        let take_change = |ours: bool, theirs: bool| ours && (!theirs || change_is_newer);
        macro_rules! merge {
            ($field:ident) => {{
                let ours = base.as_ref().map_or(true, |b| b.$field != new.$field);
                let theirs = base.as_ref().map_or(true, |b| b.$field != cur.$field);
                if take_change(ours, theirs) { new.$field.clone() } else { cur.$field.clone() }
            }};
        }
        let status = if cur.status.rank() >= new.status.rank() { cur.status } else { new.status };
        Ok(OrderFields {
            shopify_order_id: merge!(shopify_order_id),
            customer: merge!(customer),
            tier: merge!(tier),
            status,
            total_cents: merge!(total_cents),
            shipping_fee_cents: merge!(shipping_fee_cents),
            currency: merge!(currency),
            note: merge!(note),
        })
    }
}

#[cfg(feature = "export")]
export_conflict_resolver!(Resolver);

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_sdk::testing::order;

    fn at(mut o: Order, version: u64, ms: i64) -> Order {
        o.version = version;
        o.updated_at_ms = ms;
        o
    }

    #[test]
    fn each_side_keeps_the_fields_only_it_changed() {
        let base = order(1, Status::Pending);
        let mut current = at(base.clone(), 2, 2_000);
        current.fields.note = "operator".into();
        let mut change = at(base.clone(), 2, 1_500);
        change.fields.total_cents = 50_000;
        let merged = Resolver::resolve(Some(base), current, change).unwrap();
        assert_eq!((merged.note.as_str(), merged.total_cents), ("operator", 50_000));
    }

    #[test]
    fn the_newer_side_wins_a_field_both_changed() {
        let base = order(1, Status::Pending);
        let mut current = at(base.clone(), 2, 2_000);
        current.fields.note = "operator".into();
        let mut older = at(base.clone(), 2, 1_000);
        older.fields.note = "stream".into();
        assert_eq!(Resolver::resolve(Some(base.clone()), current.clone(), older).unwrap().note, "operator");
        let mut newer = at(base.clone(), 2, 3_000);
        newer.fields.note = "stream".into();
        assert_eq!(Resolver::resolve(Some(base), current, newer).unwrap().note, "stream");
    }

    #[test]
    fn status_never_moves_backwards() {
        let base = order(1, Status::Pending);
        let current = at(order(2, Status::Shipped), 2, 1_000);
        let change = at(order(2, Status::Confirmed), 2, 9_000);
        assert_eq!(Resolver::resolve(Some(base), current, change).unwrap().status, Status::Shipped);
    }

    #[test]
    fn a_racing_create_for_another_customer_is_rejected() {
        let current = order(1, Status::Pending);
        let mut change = order(1, Status::Pending);
        change.fields.customer = "mallory@example.com".into();
        assert!(Resolver::resolve(None, current, change).unwrap_err().contains("another customer"));
    }
}
