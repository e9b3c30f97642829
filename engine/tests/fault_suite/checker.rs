//! The checker: once the faults stop and the engines settle, every order the clients
//! touched is read back and judged against the journal and a sequential model of the
//! README's Semantics:
//! - every acknowledged event took effect exactly once (applied, or skipped or
//!   dead-lettered for a documented reason), an unacknowledged one at most once;
//! - an order's changes were applied in the order they were produced;
//! - versions are contiguous from 1;
//! - each row equals the model's (when every event's outcome is known);
//! - dead letters can be replayed, and a replay keeps its event's place.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::common::{Server, TOKEN, client};
use crate::journal::{Ack, Change, Edit, Journal, OrderLog, Origin, Sent};

pub async fn check(engines: &[Server], journal: &Journal) -> Vec<String> {
    let main = &engines[0];
    settle(engines).await;
    create_orphans(main, journal).await;
    settle(engines).await;
    let mut findings = Vec::new();
    let replayed = replay_letters(main, journal, &mut findings).await;
    settle(engines).await;
    check_runs(main, journal, &mut findings).await;

    let (orders, edits, problems, faults, requests) = journal.with(|r| {
        let faults = r.faults.iter().filter(|(_, what)| what.ends_with("begins")).count();
        (r.orders.clone(), r.edits.clone(), r.problems.clone(), faults, r.requests.clone())
    });
    findings.extend(problems);
    let read = futures::stream::iter(orders.keys().map(|id| read_order(main, id)))
        .buffer_unordered(16)
        .collect::<HashMap<String, (Option<Value>, Vec<Value>)>>()
        .await;
    let mut tally = Tally::default();
    for (id, log) in &orders {
        let (row, history) = &read[id];
        let edits: Vec<&Edit> = edits.iter().filter(|e| &e.order_id == id).collect();
        check_order(id, log, row.as_ref(), history, &edits, &mut tally, &mut findings);
    }
    eprintln!(
        "fault suite: {} orders, {} events sent ({} acknowledged), {} edits, {faults} faults; \
         requests {requests:?}",
        orders.len(),
        tally.sent,
        tally.acked,
        edits.len()
    );
    eprintln!(
        "fault suite: {} applied, {} skipped, {} dead-lettered and replayed ({replayed} replays sent); \
         {} orders left out of the row comparison (an outcome unknown to the client)",
        tally.applied, tally.skipped, tally.rejected, tally.uncertain
    );
    findings
}

/// Waits until every engine's log is drained, and parked events had a sweep to go.
async fn settle(engines: &[Server]) {
    for _ in 0..2 {
        for s in engines {
            s.drain(Duration::from_secs(120)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// The creates that orphans never got, so that their parked or dead-lettered updates
/// can land.
async fn create_orphans(s: &Server, journal: &Journal) {
    let orphans: Vec<String> =
        journal.with(|r| r.orders.iter().filter(|(_, l)| l.orphan).map(|(id, _)| id.clone()).collect());
    for id in orphans {
        let (customer, event_id) = (format!("{id}@example.com"), format!("{id}-create"));
        let e = json!({"event_id": event_id, "order_id": id, "kind": "created", "source": "fault-suite",
                       "occurred_at": chrono::Utc::now().to_rfc3339(),
                       "payload": {"customer": customer, "tier": "SILVER", "total_cents": 30_000}});
        let r = s.post_events(&json!([e])).await;
        let ack = if r.status() == 202 { Ack::Acked } else { Ack::Unknown };
        assert_eq!(ack, Ack::Acked, "the checker's create for orphan {id}: {}", r.text().await.unwrap());
        let change = Change::Create { customer, tier: "SILVER".into(), total: 30_000 };
        journal.sent(&id, Origin::Api, vec![Sent { event_id, change, ack }]);
    }
}

/// Replays every dead letter of the suite's orders once; a letter of anything else is a
/// finding (nothing in the workload is malformed).
async fn replay_letters(s: &Server, journal: &Journal, findings: &mut Vec<String>) -> usize {
    let ours: Vec<String> = journal.with(|r| r.orders.keys().cloned().collect());
    let mut letters = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/dead-letters?limit=1000&cursor={c}"),
            None => "/dead-letters?limit=1000".to_string(),
        };
        let (status, page) = s.get_json(&path).await;
        assert_eq!(status, 200, "GET {path}: {page}");
        letters.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut replayed = 0;
    for l in letters {
        let order = l["order_id"].as_str().unwrap_or_default();
        if !ours.iter().any(|o| o == order) {
            findings.push(format!("a dead letter no client's event explains: {l}"));
            continue;
        }
        let id = l["id"].as_str().unwrap();
        let r = client().post(s.url(&format!("/dead-letters/{id}/replay"))).bearer_auth(TOKEN).send().await.unwrap();
        match r.status().as_u16() {
            202 => replayed += 1,
            // Marked already, or its event is applied: documented answers.
            409 => {}
            status => {
                findings.push(format!("replaying dead letter {id} answered {status}: {}", r.text().await.unwrap()))
            }
        }
    }
    replayed
}

/// Every run the clients started ends (DONE, CANCELLED, or FAILED with a reason).
async fn check_runs(s: &Server, journal: &Journal, findings: &mut Vec<String>) {
    let runs = journal.with(|r| r.runs.clone());
    for id in runs {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, run) = s.get_json(&format!("/runs/{id}")).await;
            let phase = run["phase"].as_str().unwrap_or("?").to_string();
            if ["DONE", "CANCELLED", "FAILED"].contains(&phase.as_str()) {
                eprintln!("fault suite: run {id} ended {phase}");
                break;
            }
            if Instant::now() > deadline {
                findings.push(format!("run {id} is still {phase} two minutes after the faults stopped: {run}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn read_order(s: &Server, id: &str) -> (String, (Option<Value>, Vec<Value>)) {
    let (status, row) = s.get_json(&format!("/orders/{id}")).await;
    let row = (status == 200).then_some(row);
    let (status, history) = s.get_json(&format!("/orders/{id}/history?limit=1000")).await;
    let history = if status == 200 { history["items"].as_array().cloned().unwrap_or_default() } else { Vec::new() };
    (id.to_string(), (row, history))
}

#[derive(Default)]
struct Tally {
    sent: usize,
    acked: usize,
    applied: usize,
    skipped: usize,
    rejected: usize,
    uncertain: usize,
}

/// Skips the documented rules allow for this workload.
fn allowed_skip(reason: &str) -> bool {
    ["no change", "superseded", "discarded: stale", "order already exists"].iter().any(|r| reason.starts_with(r))
}

fn check_order(
    id: &str,
    log: &OrderLog,
    row: Option<&Value>,
    history: &[Value],
    edits: &[&Edit],
    tally: &mut Tally,
    findings: &mut Vec<String>,
) {
    let mut fail = |what: String| findings.push(format!("{id}: {what}"));
    let entries = |event_id: &str| history.iter().filter(|e| e["event_id"] == event_id).collect::<Vec<_>>();
    // Exactly once, for a documented reason.
    for s in &log.events {
        tally.sent += 1;
        tally.acked += usize::from(s.ack == Ack::Acked);
        let found = entries(&s.event_id);
        match (s.ack, found.len()) {
            (Ack::Acked, 1) | (Ack::Unknown, 0 | 1) => {}
            (Ack::Acked, n) => fail(format!("acknowledged event {} is in the history {n} times", s.event_id)),
            (Ack::Unknown, n) => fail(format!("event {} is in the history {n} times", s.event_id)),
        }
        let Some(entry) = found.first() else { continue };
        let reason = entry["reason"].as_str().unwrap_or_default();
        match entry["outcome"].as_str() {
            Some("applied") => tally.applied += 1,
            Some("skipped") if allowed_skip(reason) => tally.skipped += 1,
            Some("rejected") if reason.contains("no created event for order") => {
                tally.rejected += 1;
                let replays = entries(&format!("{}#replay", s.event_id));
                let decided = replays.iter().filter(|e| e["outcome"] == "applied" || e["outcome"] == "skipped");
                if decided.count() != 1 || replays.len() != 1 {
                    fail(format!("dead letter {} was replayed but its replay is {replays:?}", s.event_id));
                }
            }
            other => fail(format!("event {} ended {other:?}: {reason}", s.event_id)),
        }
    }
    // Nothing in the history that nobody sent.
    let known = |e: &str| log.events.iter().any(|s| s.event_id == e || format!("{}#replay", s.event_id) == e);
    for e in history {
        if e["source"] != "operator" && !known(e["event_id"].as_str().unwrap_or_default()) {
            fail(format!("the history holds an event no client sent: {e}"));
        }
    }
    // Contiguous versions, and the row at the last.
    let applied: Vec<&Value> = history.iter().filter(|e| e["outcome"] == "applied").collect();
    let versions: Vec<u64> = applied.iter().map(|e| e["version"].as_u64().unwrap_or(0)).collect();
    if versions != (1..=applied.len() as u64).collect::<Vec<_>>() {
        fail(format!("applied versions are not 1..={}: {versions:?}", applied.len()));
    }
    let row_version = row.and_then(|r| r["version"].as_u64()).unwrap_or(0);
    if row_version != applied.len() as u64 {
        fail(format!("the row is at version {row_version} after {} applied changes", applied.len()));
    }
    // Edits: each acknowledged one applied, each unanswered one at most.
    let by_operator = applied.iter().filter(|e| e["source"] == "operator").count();
    let (acked, unknown) = (edits.iter().filter(|e| e.version.is_some()).count(), edits.len());
    if !(acked..=unknown).contains(&by_operator) {
        fail(format!("{by_operator} edits applied; {acked} were acknowledged and {unknown} sent"));
    }
    // The order they were produced in: the create first, then the rest as sent.
    let model_order: Vec<&str> = creates_first(&log.events).map(|s| s.event_id.as_str()).collect();
    let places: Vec<usize> =
        applied.iter().filter_map(|e| model_order.iter().position(|m| e["event_id"] == *m)).collect();
    if places.windows(2).any(|w| w[0] > w[1]) {
        let ids: Vec<&str> = places.iter().map(|&i| model_order[i]).collect();
        fail(format!("changes applied out of the order they were produced in: {ids:?}"));
    }
    // The row against the model.
    if log.events.iter().any(|s| s.ack == Ack::Unknown) {
        tally.uncertain += 1;
        return;
    }
    let Some(row) = row else {
        fail("no row, though its create was acknowledged".into());
        return;
    };
    let expected = model(log, edits);
    let fees: Vec<Value> = expected.fees.iter().map(|f| json!(f)).collect();
    let fields = [
        ("customer", json!(expected.customer)),
        ("tier", json!(expected.tier)),
        ("status", json!(expected.status)),
        ("total_cents", json!(expected.total)),
        ("note", json!(expected.note)),
    ];
    for (field, want) in fields {
        if log.origin == Origin::Shopify && field != "status" {
            continue;
        }
        if row[field] != want {
            fail(format!("{field} is {} but the model says {want}", row[field]));
        }
    }
    if log.origin != Origin::Shopify && !fees.contains(&row["shipping_fee_cents"]) {
        fail(format!("shipping_fee_cents is {} but the model allows {fees:?}", row["shipping_fee_cents"]));
    }
}

/// The events in model order: the create first (an early event waits for it), the rest
/// in the order sent.
fn creates_first(events: &[Sent]) -> impl Iterator<Item = &Sent> {
    let create = events.iter().filter(|s| matches!(s.change, Change::Create { .. }));
    create.chain(events.iter().filter(|s| !matches!(s.change, Change::Create { .. })))
}

struct Expected {
    customer: String,
    tier: String,
    status: String,
    total: i64,
    note: String,
    /// The fee the last acknowledged edit set (or the rules derived), and those of edits
    /// whose answer never came, any of which may have been last.
    fees: Vec<i64>,
}

const LATTICE: [&str; 6] = ["PENDING", "CONFIRMED", "PROCESSING", "SHIPPED", "DELIVERED", "CANCELLED"];

fn rank(status: &str) -> usize {
    LATTICE.iter().position(|s| *s == status).unwrap_or_else(|| panic!("unknown status {status}"))
}

/// The sequential model: the README's rules applied one change at a time, in the order
/// the clients produced them (every event here was answered before the next was sent).
fn model(log: &OrderLog, edits: &[&Edit]) -> Expected {
    let mut m = Expected {
        customer: String::new(),
        tier: String::new(),
        status: "PENDING".into(),
        total: 0,
        note: String::new(),
        fees: vec![],
    };
    // A status never moves back along the lattice (only an operator's edit could).
    let status = |m: &mut Expected, s: &str| {
        if rank(s) >= rank(&m.status) {
            m.status = s.to_string();
        }
    };
    for s in creates_first(&log.events) {
        match &s.change {
            Change::Create { customer, tier, total } => {
                (m.customer, m.tier, m.total) = (customer.clone(), tier.clone(), *total);
            }
            Change::Update { note, tier, status: st } => {
                if let Some(n) = note {
                    m.note = n.clone();
                }
                if let Some(t) = tier {
                    m.tier = t.clone();
                }
                if let Some(st) = st {
                    status(&mut m, st);
                }
            }
            Change::Cancel => status(&mut m, "CANCELLED"),
            Change::Shopify { status: st, .. } => status(&mut m, st),
        }
    }
    let derived = order_rules::shipping_fee_cents(m.total);
    let last = edits.iter().filter(|e| e.version.is_some()).max_by_key(|e| e.version);
    m.fees.push(last.map_or(derived, |e| e.fee));
    m.fees.extend(edits.iter().filter(|e| e.version.is_none()).map(|e| e.fee));
    m
}
