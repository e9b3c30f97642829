//! The rules, called natively: `cargo test`.

use orchestrator_sdk::testing::{created, empty_change, order, updated};
use orchestrator_sdk::*;
use {{crate}}::Rules;

fn upsert(d: Decision) -> OrderFields {
    match d {
        Decision::Upsert(f) => f,
        other => panic!("expected an upsert, got {other:?}"),
    }
}

#[test]
fn a_new_order_is_accepted_with_its_fee() {
    let f = upsert(Rules::decide(created("ada@example.com", Tier::Gold, 12_000), None));
    assert_eq!((f.status, f.shipping_fee_cents), (Status::Pending, 0));
    let f = upsert(Rules::decide(created("bo@example.com", Tier::Bronze, 12_000), None));
    assert_eq!(f.shipping_fee_cents, 499);
}

#[test]
fn an_update_changes_only_what_it_names() {
    let e = updated(OrderChange { note: Some("gift".into()), ..empty_change() });
    let f = upsert(Rules::decide(e, Some(order(1, Status::Confirmed))));
    assert_eq!((f.note.as_str(), f.status), ("gift", Status::Confirmed));
}

#[test]
fn an_update_to_an_unknown_order_is_rejected() {
    let e = updated(OrderChange { note: Some("gift".into()), ..empty_change() });
    assert!(matches!(Rules::decide(e, None), Decision::Reject(_)));
}
