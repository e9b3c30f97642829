//! Conformance: the default plugins, run in the Wasm sandbox, decide exactly as their
//! code run natively (the reference rules) on 10k generated events and 10k races; and
//! their ports to Python and JavaScript (`plugins/ports`), built and run through
//! `orchestrator plugin build` and `plugin test`, decide exactly alike on 2,000 events.

mod common;

use chrono::{DateTime, Duration, Utc};
use orchestrator::domain::*;
use orchestrator::plugin::Slot;
use orchestrator::plugin::host::{Handle, Limits, Path, Runtime};
use orchestrator::plugin::native::{NativeResolver, NativeRules};
use orchestrator::rules::{ConflictResolver, OrderRules};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn pick<T: Copy>(rng: &mut SmallRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

fn maybe<T>(rng: &mut SmallRng, f: impl FnOnce(&mut SmallRng) -> T) -> Option<T> {
    if rng.random_bool(0.35) { Some(f(rng)) } else { None }
}

const TIERS: [Tier; 4] = [Tier::Bronze, Tier::Silver, Tier::Gold, Tier::Diamond];
const STATUSES: [Status; 6] =
    [Status::Pending, Status::Confirmed, Status::Processing, Status::Shipped, Status::Delivered, Status::Cancelled];

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

fn order(rng: &mut SmallRng, id: &str) -> Order {
    let tier = pick(rng, &TIERS);
    Order {
        id: id.into(),
        shopify_order_id: maybe(rng, |r| r.random_range(1..1_000_000_000)),
        customer: format!("c{}@example.com", rng.random_range(0..50)),
        tier,
        priority: tier.priority(),
        status: pick(rng, &STATUSES),
        total_cents: rng.random_range(0..40_000),
        shipping_fee_cents: pick(rng, &[0, 599, 799, 999]),
        currency: pick(rng, &["USD", "EUR"]).into(),
        note: pick(rng, &["", "gift", "fragile"]).into(),
        version: rng.random_range(1..20),
        created_at: at(1_700_000_000_000),
        updated_at: at(1_700_000_000_000 + rng.random_range(0..1_000_000)),
        source_updated_at: if rng.random_bool(0.5) {
            Some(at(1_700_000_000_000 + rng.random_range(0..1_000_000)))
        } else {
            None
        },
        decided_by: "x".into(),
        changed_at: ChangedAt::default(),
        shop: None,
    }
}

fn event(rng: &mut SmallRng, i: usize) -> OrderEvent {
    OrderEvent {
        event_id: format!("e{i}"),
        order_id: format!("o{}", i % 500),
        kind: pick(rng, &[EventKind::Created, EventKind::Updated, EventKind::Updated, EventKind::Cancelled]),
        source: pick(rng, &["shopify", "api"]).into(),
        occurred_at: at(1_700_000_000_000) + Duration::milliseconds(rng.random_range(0..1_000_000)),
        accepted_at: None,
        shop: None,
        payload: OrderChange {
            shopify_order_id: maybe(rng, |r| r.random_range(1..1_000_000_000)),
            customer: maybe(rng, |r| format!("c{}@example.com", r.random_range(0..50))),
            tier: maybe(rng, |r| pick(r, &TIERS)),
            status: maybe(rng, |r| pick(r, &STATUSES)),
            financial_status: maybe(rng, |r| {
                pick(
                    r,
                    &[
                        FinancialStatus::Pending,
                        FinancialStatus::Authorized,
                        FinancialStatus::PartiallyPaid,
                        FinancialStatus::Paid,
                        FinancialStatus::PartiallyRefunded,
                        FinancialStatus::Refunded,
                        FinancialStatus::Voided,
                    ],
                )
            }),
            fulfillment_status: maybe(rng, |r| {
                pick(r, &[FulfillmentStatus::Fulfilled, FulfillmentStatus::Partial, FulfillmentStatus::Restocked])
            }),
            total_cents: maybe(rng, |r| r.random_range(-100..40_000)),
            shipping_fee_cents: maybe(rng, |r| r.random_range(-10..2_000)),
            currency: maybe(rng, |r| pick(r, &["USD", "EUR", "GBP"]).into()),
            note: maybe(rng, |r| pick(r, &["", "gift", "leave at door"]).into()),
        },
    }
}

fn load(slot: Slot) -> Handle {
    let runtime = Runtime::new(Limits::default()).unwrap();
    runtime.compile(slot, slot.builtin()).unwrap().load(1, "conformance00")
}

#[test]
fn order_rules_plugin_matches_the_native_rules_on_10k_events_on_both_paths() {
    let Handle::Rules(plugin) = load(Slot::OrderRules) else { panic!("order rules load as rules") };
    let mut rng = SmallRng::seed_from_u64(2026);
    let events: Vec<OrderEvent> = (0..10_000).map(|i| event(&mut rng, i)).collect();
    let rows: Vec<Option<Order>> =
        events.iter().map(|e| if rng.random_bool(0.7) { Some(order(&mut rng, &e.order_id)) } else { None }).collect();
    let inputs: Vec<(&OrderEvent, Option<&Order>)> = events.iter().zip(&rows).map(|(e, r)| (e, r.as_ref())).collect();
    let native = NativeRules.decide_batch(&inputs);
    // In batches of 100, as the pipeline calls it: through the packed fast path the SDK
    // exports (what the engine uses), and through the typed WIT calls.
    assert!(plugin.has_packed_path(), "the default rules export decide-packed");
    let packed: Vec<_> = inputs.chunks(100).flat_map(|c| plugin.decide_batch(c)).collect();
    let typed: Vec<_> = inputs.chunks(100).flat_map(|c| plugin.decide_batch_by(Path::Typed, c)).collect();
    assert_eq!(native.len(), 10_000);
    assert_eq!((packed.len(), typed.len()), (10_000, 10_000));
    let mut kinds = std::collections::HashMap::new();
    for (i, ((n, p), t)) in native.iter().zip(&packed).zip(&typed).enumerate() {
        assert_eq!(n, p, "packed decision {i} differs for {:?} on {:?}", events[i], rows[i]);
        assert_eq!(n, t, "typed decision {i} differs for {:?} on {:?}", events[i], rows[i]);
        let kind = match n.as_ref().unwrap() {
            orchestrator::rules::Decision::Upsert(_) => "upsert",
            orchestrator::rules::Decision::Skip(_) => "skip",
            orchestrator::rules::Decision::Reject(_) => "reject",
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    eprintln!("conformance: 10k identical decisions: {kinds:?}");
    assert!(
        kinds.len() == 3 && kinds.values().all(|n| *n > 100),
        "the events exercise every kind of decision: {kinds:?}"
    );
}

#[test]
fn conflict_resolver_plugin_matches_the_native_resolver_on_10k_races() {
    let Handle::Resolver(plugin) = load(Slot::ConflictResolver) else { panic!("a resolver loads as one") };
    let mut rng = SmallRng::seed_from_u64(7);
    let mut outcomes = std::collections::HashMap::new();
    for i in 0..10_000 {
        let id = format!("o{i}");
        let base = if rng.random_bool(0.8) { Some(order(&mut rng, &id)) } else { None };
        // The stored row and the change both start from the base and change some fields.
        let mutate = |rng: &mut SmallRng, from: &Order| {
            let mut o = from.clone();
            if rng.random_bool(0.5) {
                o.note = format!("n{}", rng.random_range(0..3));
            }
            if rng.random_bool(0.5) {
                o.status = pick(rng, &STATUSES);
            }
            if rng.random_bool(0.3) {
                o.total_cents = rng.random_range(0..40_000);
            }
            if rng.random_bool(0.2) {
                o.customer = format!("c{}@example.com", rng.random_range(0..3));
            }
            o.updated_at = at(1_700_000_000_000 + rng.random_range(0..2_000_000));
            o
        };
        let seed = base.clone().unwrap_or_else(|| order(&mut rng, &id));
        let current = mutate(&mut rng, &seed);
        let change = mutate(&mut rng, &seed);
        let native = NativeResolver.resolve(base.as_ref(), &current, &change).unwrap();
        let wasm = plugin.resolve(base.as_ref(), &current, &change).unwrap();
        assert_eq!(native, wasm, "race {i}: base {base:?} current {current:?} change {change:?}");
        *outcomes.entry(native.is_ok()).or_insert(0) += 1;
    }
    eprintln!("conformance: 10k identical merges (ok/rejected): {outcomes:?}");
    assert_eq!(outcomes.len(), 2, "both merges and rejections occur");
}

/// Copies a port and the WIT into a project of its own, builds it with `plugin build`,
/// and returns the component's path.
fn build_port(lang: &str, dir: &std::path::Path) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let project = dir.join(format!("{lang}-port"));
    std::fs::create_dir_all(project.join("wit")).unwrap();
    let app = if lang == "python" { "app.py" } else { "app.js" };
    std::fs::copy(root.join("plugins/ports").join(lang).join(app), project.join(app)).unwrap();
    std::fs::copy(root.join("plugins/sdk/wit/orchestrator.wit"), project.join("wit/orchestrator.wit")).unwrap();
    let out = common::orchestrator().current_dir(&project).args(["plugin", "build"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "building the {lang} port: {err}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn ports_of_the_default_rules_decide_like_the_reference() {
    let mut rng = SmallRng::seed_from_u64(2027);
    let mut inputs: Vec<(OrderEvent, Option<Order>)> = Vec::new();
    let mut i = 0;
    while inputs.len() < 2_000 {
        i += 1;
        let e = event(&mut rng, i);
        // What the engine would never hand to rules (a negative total, say) is left out.
        if e.validate().is_err() {
            continue;
        }
        let current = if rng.random_bool(0.7) { Some(order(&mut rng, &e.order_id)) } else { None };
        inputs.push((e, current));
    }
    let refs: Vec<(&OrderEvent, Option<&Order>)> = inputs.iter().map(|(e, c)| (e, c.as_ref())).collect();
    let expected: Vec<serde_json::Value> =
        NativeRules.decide_batch(&refs).iter().map(orchestrator::rules::outcome_json).collect();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let lines: Vec<String> =
        inputs.iter().map(|(e, c)| serde_json::json!({ "event": e, "current": c }).to_string()).collect();
    std::fs::write(&events, lines.join("\n")).unwrap();

    for (lang, tool) in [("python", "COMPONENTIZE_PY"), ("js", "COMPONENTIZE_JS")] {
        if common::tool(tool).is_none() {
            continue;
        }
        let component = build_port(lang, dir.path());
        let out = common::orchestrator()
            .args(["plugin", "test", &component, "--events", events.to_str().unwrap(), "--against-native"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{lang}: {err}");
        // `--against-native` finds what the comparison below finds: nothing.
        assert!(err.contains("0 of 2000 decisions differ from theirs"), "{lang}: {err}");
        let decided: Vec<serde_json::Value> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(decided.len(), expected.len(), "{lang}: one decision per event");
        for (n, (got, want)) in decided.iter().zip(&expected).enumerate() {
            assert_eq!(&got["outcome"], want, "{lang} differs on {:?} with {:?}", inputs[n].0, inputs[n].1);
        }
        eprintln!("{lang} port: {} identical decisions; {}", decided.len(), err.lines().last().unwrap_or_default());
    }
}
