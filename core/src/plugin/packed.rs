//! The host side of the packed batch path: the engine's events and rows written
//! straight into the layout of `orchestrator_sdk::packed`, and decisions read back.
//!
//! Writing from the domain types, not from WIT records, is the point: no string is
//! cloned per event. The SDK's layout is the one definition; a test holds these writers
//! to it byte for byte.

use orchestrator_sdk::packed::{self as layout, Packed as _, PackedError};

use super::convert::native as wire;
use crate::domain::{Order, OrderEvent};
use crate::rules::Decision;

fn ms(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

/// One batch of rule inputs, as `decide-packed` takes it.
pub fn encode_inputs(inputs: &[(&OrderEvent, Option<&Order>)]) -> Vec<u8> {
    // About 150 bytes for a new order's event, twice that with its row.
    let mut out = Vec::with_capacity(5 + inputs.len() * 256);
    layout::put_header(inputs.len(), &mut out);
    for (event, current) in inputs {
        put_event(event, &mut out);
        match current {
            None => out.push(0),
            Some(row) => {
                out.push(1);
                put_order(row, &mut out);
            }
        }
    }
    out
}

fn put_event(e: &OrderEvent, out: &mut Vec<u8>) {
    e.event_id.put(out);
    e.order_id.put(out);
    wire::kind(e.kind).put(out);
    e.source.put(out);
    ms(e.occurred_at).put(out);
    let p = &e.payload;
    p.shopify_order_id.put(out);
    layout::put_opt_str(p.customer.as_deref(), out);
    p.tier.map(wire::tier).put(out);
    p.status.map(wire::status).put(out);
    p.financial_status.map(wire::financial).put(out);
    p.fulfillment_status.map(wire::fulfillment).put(out);
    p.total_cents.put(out);
    p.shipping_fee_cents.put(out);
    layout::put_opt_str(p.currency.as_deref(), out);
    layout::put_opt_str(p.note.as_deref(), out);
}

fn put_order(o: &Order, out: &mut Vec<u8>) {
    o.id.put(out);
    o.shopify_order_id.put(out);
    o.customer.put(out);
    wire::tier(o.tier).put(out);
    wire::status(o.status).put(out);
    o.total_cents.put(out);
    o.shipping_fee_cents.put(out);
    o.currency.put(out);
    o.note.put(out);
    o.version.put(out);
    ms(o.created_at).put(out);
    ms(o.updated_at).put(out);
    o.source_updated_at.map(ms).put(out);
}

/// The decisions `decide-packed` returned.
pub fn decode_decisions(bytes: &[u8]) -> Result<Vec<Decision>, PackedError> {
    Ok(layout::decode_decisions(bytes)?.into_iter().map(wire::decision_back).collect())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::domain::{FinancialStatus, FulfillmentStatus, OrderChange, Status};
    use crate::generator::{self, TierMix};
    use crate::plugin::convert::native;

    /// Events of every shape the engine passes: new orders, and updates with the rows
    /// they meet, every optional field set in some and unset in others.
    fn events_and_rows() -> Vec<(OrderEvent, Option<Order>)> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut out = Vec::new();
        for i in 0..20 {
            let created = generator::created("packed", i, "test", &TierMix::default(), &mut rng);
            let mut row = super::super::host::sample_row(&created);
            if i % 2 == 0 {
                row.shopify_order_id = Some(i as i64);
                row.source_updated_at = Some(created.occurred_at);
                row.note = format!("note ü {i}");
            }
            let mut update = created.clone();
            update.kind = crate::domain::EventKind::Updated;
            update.event_id = format!("{}-u", created.event_id);
            update.payload = OrderChange {
                financial_status: (i % 3 == 0).then_some(FinancialStatus::PartiallyRefunded),
                fulfillment_status: (i % 4 == 0).then_some(FulfillmentStatus::Restocked),
                status: (i % 5 == 0).then_some(Status::Delivered),
                shipping_fee_cents: (i % 2 == 1).then_some(-(i as i64)),
                note: (i % 3 == 1).then(|| "x".repeat(i as usize)),
                ..OrderChange::default()
            };
            out.push((created, None));
            out.push((update, Some(row)));
        }
        out
    }

    #[test]
    fn the_host_writes_exactly_the_sdk_layout() {
        let owned = events_and_rows();
        let inputs: Vec<(&OrderEvent, Option<&Order>)> = owned.iter().map(|(e, r)| (e, r.as_ref())).collect();
        let sdk: Vec<_> = inputs.iter().map(|(e, r)| native::input(e, *r)).collect();
        assert_eq!(encode_inputs(&inputs), layout::encode_inputs(&sdk));
    }

    #[test]
    fn decisions_read_back_as_the_typed_path_reads_them() {
        let (_, row) = events_and_rows().swap_remove(1);
        let row = row.expect("the first update meets a row");
        let sdk = vec![
            orchestrator_sdk::Decision::Upsert(native::fields(&row.fields())),
            orchestrator_sdk::Decision::Skip("no change".into()),
            orchestrator_sdk::Decision::Reject("negative total_cents -1".into()),
        ];
        let expected: Vec<Decision> = sdk.iter().cloned().map(native::decision_back).collect();
        assert_eq!(decode_decisions(&layout::encode_decisions(&sdk)).unwrap(), expected);
        assert!(decode_decisions(&[layout::LAYOUT, 1, 0, 0, 0, 9]).is_err(), "an unknown decision case is refused");
    }
}
