//! The ordering rule: per field, the later-placed change wins, whatever the order in which
//! changes reach the store.
//!
//! A change's place is when the engine first accepted it: an event's append to the log
//! (kept by a replay), an operator's edit at its commit. Events of one order are applied
//! in log order, so places only matter where something applies out of that order: an
//! edit committed while earlier events were still queued, a replayed dead letter, a race
//! on the conflict path. Both the normal path and the conflict path settle through here.

use chrono::Utc;

use crate::domain::{ChangedAt, Order, OrderChange, OrderEvent, OrderFields};

/// An event's place in µs since the epoch: set when it was decoded from the log.
pub fn place(event: &OrderEvent) -> i64 {
    event.accepted_at.map_or_else(|| Utc::now().timestamp_micros(), |t| t.timestamp_micros())
}

/// An operator's edit goes after everything the row holds, whatever the clocks of the
/// instances that placed those changes: the operator saw them.
pub fn edit_place(current: &Order) -> i64 {
    Utc::now().timestamp_micros().max(current.changed_at.latest() + 1)
}

/// An operator's edit of `current` to `fields` (naming `named`) at `place`: the next version.
pub fn edited(current: &Order, fields: OrderFields, named: Named, place: i64) -> Order {
    let (fields, changed_at) = settle(current, fields, named, place);
    let mut row = Order {
        version: current.version + 1,
        updated_at: Utc::now(),
        decided_by: "operator".into(),
        changed_at,
        ..current.clone()
    };
    row.set_fields(fields);
    row
}

/// The fields a change names outright: it sets them even to the value they hold, so
/// that it still counts as their latest change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Named {
    pub shopify_order_id: bool,
    pub customer: bool,
    pub tier: bool,
    pub status: bool,
    pub total_cents: bool,
    pub shipping_fee_cents: bool,
    pub currency: bool,
    pub note: bool,
}

impl Named {
    pub fn of(change: &OrderChange) -> Self {
        Self {
            shopify_order_id: change.shopify_order_id.is_some(),
            customer: change.customer.is_some(),
            tier: change.tier.is_some(),
            status: change.status.is_some() || change.financial_status.is_some() || change.fulfillment_status.is_some(),
            total_cents: change.total_cents.is_some(),
            shipping_fee_cents: change.shipping_fee_cents.is_some(),
            currency: change.currency.is_some(),
            note: change.note.is_some(),
        }
    }
}

/// `proposed` laid over `current`, field by field: a field that `proposed` changes (or
/// names) takes its value and `place`, unless a change placed later set it. A field
/// as the create set it (place zero) takes any change, even one placed before the
/// create: an event that came early and waited for it.
pub fn settle(current: &Order, mut proposed: OrderFields, named: Named, place: i64) -> (OrderFields, ChangedAt) {
    let mut at = current.changed_at;
    macro_rules! field {
        ($($f:ident),*) => {$(
            if named.$f || proposed.$f != current.$f {
                if at.$f == 0 || place >= at.$f {
                    at.$f = place;
                } else {
                    proposed.$f = current.$f.clone();
                }
            }
        )*};
    }
    field!(shopify_order_id, customer, tier, status, total_cents, shipping_fee_cents, currency, note);
    (proposed, at)
}

/// The event's decided `fields` without the changes that a later-placed change (in
/// `current`) overrides, for the conflict resolver: what is left is newer than `current`.
pub fn without_overridden(current: &Order, base: Option<&Order>, mut fields: OrderFields, place: i64) -> OrderFields {
    let Some(base) = base else { return fields };
    let at = &current.changed_at;
    macro_rules! field {
        ($($f:ident),*) => {$(
            if fields.$f != base.$f && at.$f != 0 && at.$f > place {
                fields.$f = current.$f.clone();
            }
        )*};
    }
    field!(shopify_order_id, customer, tier, status, total_cents, shipping_fee_cents, currency, note);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Priority, Status, Tier};

    fn row(created: i64) -> Order {
        Order {
            id: "o".into(),
            shopify_order_id: None,
            customer: "c@example.com".into(),
            tier: Tier::Gold,
            priority: Priority::Normal,
            status: Status::Pending,
            total_cents: 1000,
            shipping_fee_cents: 0,
            currency: "EUR".into(),
            note: String::new(),
            version: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            source_updated_at: None,
            decided_by: "test".into(),
            changed_at: ChangedAt { created, ..ChangedAt::default() },
            shop: None,
        }
    }

    fn with_note(o: &Order, note: &str) -> OrderFields {
        OrderFields { note: note.into(), ..o.fields() }
    }

    #[test]
    fn a_later_change_wins_and_an_earlier_one_keeps_only_the_fields_nobody_set_since() {
        let base = row(100);
        let note = Named { note: true, ..Named::default() };
        let (fields, at) = settle(&base, with_note(&base, "edit"), note, 300);
        let edited = Order { note: fields.note, changed_at: at, ..base.clone() };
        assert_eq!(edited.changed_at.note, 300);
        // An event accepted at 200, applied after the edit: its note loses, its total stands.
        let proposed = OrderFields { total_cents: 5000, ..with_note(&edited, "event") };
        let both = Named { total_cents: true, ..note };
        let (fields, at) = settle(&edited, proposed, both, 200);
        assert_eq!((fields.note.as_str(), fields.total_cents), ("edit", 5000));
        assert_eq!((at.note, at.total_cents), (300, 200));
        // One accepted at 400 wins.
        assert_eq!(settle(&edited, with_note(&edited, "newer"), note, 400).0.note, "newer");
        // Naming the value a field holds still makes it that field's latest change.
        assert_eq!(settle(&edited, with_note(&edited, "edit"), note, 400).1.note, 400);
    }

    #[test]
    fn an_event_placed_before_its_create_still_changes_what_the_create_set() {
        let base = row(100);
        let note = Named { note: true, ..Named::default() };
        let (fields, at) = settle(&base, with_note(&base, "early"), note, 50);
        assert_eq!((fields.note.as_str(), at.note), ("early", 50));
        let later = Order { note: fields.note, changed_at: at, ..base };
        assert_eq!(settle(&later, with_note(&later, "earlier"), note, 40).0.note, "early");
    }

    #[test]
    fn an_edit_goes_after_every_place_the_row_holds() {
        let mut base = row(100);
        base.changed_at.note = i64::MAX / 2;
        assert!(edit_place(&base) > base.changed_at.note);
    }
}
