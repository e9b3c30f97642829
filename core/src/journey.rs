//! An order's journey: the trace the pipeline keeps with each history entry (where the
//! event came from, what decided it, the compare-and-sets it lost and how they were
//! resolved, what it changed), and the timeline `GET /orders/{id}/journey` serves.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

pub use orchestrator_types::journey::{
    Conflict, FieldChange, Journey, JourneyEvent, LogPlace, Outcome, Said, Step, StepKind, Trace, Verdict,
};

use crate::domain::{Order, OrderEvent};
use crate::log::Delivery;
use crate::store::HistoryEntry;

/// Most events a journey shows: an order's whole life, in practice.
pub const JOURNEY_MAX: usize = 1000;
/// Longest text a trace keeps of one value or reason, so an order's history stays small.
const TEXT_MAX: usize = 200;

/// The trace of an event as the pipeline reads it from the log.
pub fn arrived(event: Option<&OrderEvent>, d: &Delivery, parked_since: Option<DateTime<Utc>>) -> Trace {
    Trace {
        occurred_at: event.map(|e| e.occurred_at),
        accepted_at: event.and_then(|e| e.accepted_at),
        appended_at: (d.appended_at_us > 0).then(|| crate::sqlite::from_micros(d.appended_at_us)),
        log: Some(LogPlace { priority: d.priority, partition: d.partition, offset: d.offset }),
        parked_at: parked_since,
        ..Trace::default()
    }
}

/// A plugin's say, with its reason cut to a bounded length.
pub fn verdict(by: &str, said: Said, reason: Option<&str>) -> Verdict {
    Verdict { by: by.to_string(), said, reason: reason.map(clip) }
}

/// The business fields `after` holds that `before` did not (every field of a new row).
/// Personal fields are named without their values: erasing the row erases them.
pub fn changes(before: Option<&Order>, after: &Order) -> Vec<FieldChange> {
    let values = |o: &Order| -> [(&'static str, Value, bool); 10] {
        [
            ("shopify_order_id", json!(o.shopify_order_id), false),
            ("customer", json!(o.customer), true),
            ("tier", json!(o.tier), false),
            ("priority", json!(o.priority), false),
            ("status", json!(o.status), false),
            ("total_cents", json!(o.total_cents), false),
            ("shipping_fee_cents", json!(o.shipping_fee_cents), false),
            ("currency", json!(o.currency), false),
            ("note", json!(o.note), true),
            ("shop", json!(o.shop), false),
        ]
    };
    let old = before.map(values);
    values(after)
        .into_iter()
        .enumerate()
        .filter_map(|(i, (field, now, personal))| {
            let was = old.as_ref().map(|o| o[i].1.clone());
            // A new row's empty values (no note, no shop) are not changes.
            let empty = now.is_null() || now == json!("");
            if was.as_ref() == Some(&now) || (was.is_none() && empty) {
                return None;
            }
            let field = field.to_string();
            Some(if personal {
                FieldChange { field, before: None, after: None, withheld: true }
            } else {
                FieldChange { field, before: was.map(clip_value), after: Some(clip_value(now)), withheld: false }
            })
        })
        .collect()
}

fn clip(s: &str) -> String {
    match s.char_indices().nth(TEXT_MAX) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

fn clip_value(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(clip(&s)),
        other => other,
    }
}

/// The journey of `order` from its history entries, oldest first.
pub fn journey(order: Order, entries: Vec<HistoryEntry>, truncated: bool) -> Journey {
    Journey { order, events: entries.into_iter().map(event).collect(), truncated }
}

fn event(h: HistoryEntry) -> JourneyEvent {
    let trace = h.trace.unwrap_or_default();
    let step = |kind, at, detail: String| Step { kind, at, detail };
    let mut steps = Vec::new();
    if let Some(at) = trace.occurred_at {
        steps.push(step(StepKind::Occurred, Some(at), format!("at the source ({})", h.source)));
    }
    if let Some(at) = trace.accepted_at {
        steps.push(step(StepKind::Received, Some(at), "accepted by the engine".into()));
    }
    if let Some(log) = &trace.log {
        let place = format!("{} log, partition {}, offset {}", log.priority.label(), log.partition, log.offset);
        steps.push(step(StepKind::Appended, trace.appended_at, place));
    }
    if let Some(at) = trace.parked_at {
        steps.push(step(StepKind::Parked, Some(at), "came before its order's created event, and waited".into()));
    }
    if let Some(v) = &trace.rules {
        steps.push(step(StepKind::Decided, None, said(v)));
    }
    for c in &trace.conflicts {
        let found = match (c.expected, c.found) {
            (Some(e), Some(f)) => format!("expected v{e}, found v{f}"),
            (None, Some(f)) => format!("expected no row, found v{f}"),
            (Some(e), None) => format!("expected v{e}, found the row gone"),
            (None, None) => "the row changed under the write".into(),
        };
        steps.push(step(StepKind::Conflict, None, format!("compare-and-set lost: {found}")));
        let resolved = match &c.resolver {
            Some(v) => said(v),
            None => "written as a new row".into(),
        };
        steps.push(step(StepKind::Resolved, None, resolved));
    }
    let reason = h.reason.clone().unwrap_or_default();
    let (kind, detail) = match h.outcome {
        Outcome::Applied => (StepKind::Applied, format!("v{} by {}", h.version, h.decided_by)),
        Outcome::Skipped => (StepKind::Skipped, reason),
        Outcome::Rejected => (StepKind::DeadLettered, reason),
    };
    steps.push(step(kind, Some(h.recorded_at), detail));
    if h.outcome == Outcome::Applied {
        let detail = "sent on the changelog to the dashboards once committed".into();
        steps.push(step(StepKind::Published, None, detail));
    }
    JourneyEvent {
        event_id: h.event_id,
        source: h.source,
        outcome: h.outcome,
        version: h.version,
        decided_by: h.decided_by,
        reason: h.reason,
        steps,
        changes: trace.changes,
    }
}

/// "order-rules@v2: upsert", with the reason when there is one.
fn said(v: &Verdict) -> String {
    match &v.reason {
        Some(r) => format!("{}: {} ({r})", v.by, v.said.as_str()),
        None => format!("{}: {}", v.by, v.said.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Priority, Status, Tier};

    fn order() -> Order {
        Order {
            id: "o1".into(),
            shopify_order_id: None,
            customer: "ada@example.com".into(),
            tier: Tier::Gold,
            priority: Priority::Normal,
            status: Status::Pending,
            total_cents: 1000,
            shipping_fee_cents: 500,
            currency: "EUR".into(),
            note: "ring twice".into(),
            version: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            source_updated_at: None,
            decided_by: "rules".into(),
            changed_at: Default::default(),
            shop: None,
        }
    }

    #[test]
    fn changes_name_each_changed_field_and_withhold_personal_values() {
        let created = changes(None, &order());
        let fields: Vec<&str> = created.iter().map(|c| c.field.as_str()).collect();
        // shopify_order_id and shop are absent on the new row, so not changes.
        let all = ["customer", "tier", "priority", "status", "total_cents", "shipping_fee_cents", "currency", "note"];
        assert_eq!(fields, all);
        let quiet = changes(None, &Order { note: String::new(), ..order() });
        assert!(quiet.iter().all(|c| c.field != "note"), "a new row's empty note is no change");
        assert!(created.iter().all(|c| c.before.is_none()));
        let customer = &created[0];
        assert!(customer.withheld && customer.after.is_none(), "{customer:?}");
        assert_eq!(created[3].after, Some(json!("PENDING")));

        let later = Order { status: Status::Confirmed, note: "x".repeat(500), version: 2, ..order() };
        let diff = changes(Some(&order()), &later);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert_eq!((diff[0].before.clone(), diff[0].after.clone()), (Some(json!("PENDING")), Some(json!("CONFIRMED"))));
        assert_eq!(diff[1].field, "note");
        assert!(diff[1].withheld && diff[1].after.is_none(), "a note is personal");
    }

    #[test]
    fn values_and_reasons_are_cut_to_a_bounded_length() {
        let long = Order { currency: "€".repeat(1000), ..order() };
        let diff = changes(Some(&order()), &long);
        let after = diff[0].after.as_ref().and_then(Value::as_str).unwrap();
        assert_eq!(after.chars().count(), TEXT_MAX + 1, "cut, with an ellipsis");
        let v = verdict("rules@1", Said::Reject, Some(&"why ".repeat(100)));
        assert!(v.reason.unwrap().chars().count() <= TEXT_MAX + 1);
    }
}
