//! Behaviour every store backend must show, one reusable check per port: insert-if-absent,
//! compare-and-set, idempotency by event id, history and paging (`Orders`); dead letters
//! and replay claims; parked events; webhook claims and audit; run records, audits and
//! purges (`Runs`); recorded cases (`Cases`).

use chrono::{Duration, Utc};

use super::{
    ActionLog, ActionRecord, Backend, Base, Case, CaseRetention, Cases, Claim, Compliance, ComplianceRecord,
    DeadLetter, DeadLetters, ListQuery, Orders, Outcome, Page, ParkedEvent, Parking, ReplayClaim, RunKeys, RunRecord,
    Runs, Sort, StoreError, Trace, WebhookDelivery, WebhookLedger, Write, WriteResult,
};
use crate::domain::{ChangedAt, Order, Priority, Status, Tier};

/// An order as the checks write it.
pub fn row(id: &str, version: u64, note: &str) -> Order {
    Order {
        id: id.into(),
        shopify_order_id: None,
        customer: format!("{id}@example.com"),
        tier: Tier::Diamond,
        priority: Priority::Vip,
        status: Status::Pending,
        total_cents: 1_000,
        shipping_fee_cents: 999,
        currency: "EUR".into(),
        note: note.into(),
        version,
        created_at: Utc::now(),
        updated_at: Utc::now(),
        source_updated_at: Some(Utc::now()),
        decided_by: "conformance".into(),
        // Distinct per version, so a store that drops or mixes them up fails the reads.
        changed_at: ChangedAt { created: 1_000, note: 2_000 + version as i64, ..ChangedAt::default() },
        // Kept, and read back, by every store.
        shop: Some("conformance.myshopify.com".into()),
    }
}

/// A write over version `expected`, whose base the test does not keep: it is taken as the
/// new row a millisecond earlier, so a CQL store retires an index entry that may not exist
/// and its listing must still tell the stale entry from the row.
fn apply(event_id: &str, expected: Option<u64>, row: Order) -> Write {
    let base = expected.map(|version| Base {
        version,
        updated_at: row.updated_at - Duration::milliseconds(1),
        status: row.status,
        priority: row.priority,
        has_shop: row.shop.is_some(),
    });
    Write::Apply { event_id: event_id.into(), source: "test".into(), base, row, trace: Trace::default() }
}

/// `w` with `trace` as its journey.
fn traced(mut w: Write, with: Trace) -> Write {
    match &mut w {
        Write::Apply { trace, .. } | Write::Record { trace, .. } => *trace = with,
    }
    w
}

/// A journey with every part set, distinct per event.
fn journey_of(event_id: &str) -> Trace {
    use crate::journey::{Conflict, FieldChange, LogPlace, Said, Verdict};
    let at = chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("a time");
    let verdict = |by: &str, said| Verdict { by: by.into(), said, reason: Some(format!("for {event_id}")) };
    Trace {
        occurred_at: Some(at),
        accepted_at: Some(at + Duration::milliseconds(1)),
        appended_at: Some(at + Duration::milliseconds(2)),
        log: Some(LogPlace { priority: Priority::Vip, partition: 3, offset: 42 }),
        parked_at: Some(at + Duration::milliseconds(3)),
        rules: Some(verdict("rules@1", Said::Upsert)),
        conflicts: vec![Conflict {
            expected: Some(1),
            found: Some(2),
            resolver: Some(verdict("resolver@1", Said::Merge)),
        }],
        changes: vec![
            FieldChange {
                field: "status".into(),
                before: Some("PENDING".into()),
                after: Some("PAID".into()),
                withheld: false,
            },
            FieldChange { field: "note".into(), before: None, after: None, withheld: true },
        ],
    }
}

async fn one(store: &(impl Orders + ?Sized), w: Write) -> WriteResult {
    store.write(vec![w]).await.expect("store answers").pop().expect("one result").1
}

/// Every port's check. Panics with a message naming the first behaviour the store gets
/// wrong. Uses order ids prefixed with `prefix`, so it can share a store with other data.
pub async fn check<B: Backend>(store: &B, prefix: &str) {
    orders(store, prefix).await;
    counts_and_search(store, prefix).await;
    dead_letters(store, prefix).await;
    parking(store, prefix).await;
    webhook_ledger(store, prefix).await;
    runs(store, prefix).await;
    action_log(store, prefix).await;
    cases(store, prefix).await;
    compliance(store, prefix).await;
    shop_orders(store, prefix).await;
}

/// `Compliance` for a whole shop: its orders found page by page (another shop's and a
/// row that got its shop on a later write too), and deleted with their history, only
/// where the row records that shop.
pub async fn shop_orders(s: &(impl Orders + Compliance), prefix: &str) {
    let (shop, elsewhere) = (format!("{prefix}-a.myshopify.com"), format!("{prefix}-b.myshopify.com"));
    let of =
        |id: &str, shop: &str| Order { shop: Some(shop.to_string()), ..row(&format!("{prefix}-shop-{id}"), 1, "") };
    for o in [of("1", &shop), of("2", &shop), of("3", &elsewhere)] {
        assert_eq!(one(s, apply(&format!("{}-e1", o.id), None, o)).await, WriteResult::Done);
    }
    // Stored without a shop, then given one by its next version.
    let late = Order { shop: None, ..of("4", &shop) };
    assert_eq!(one(s, apply(&format!("{}-e1", late.id), None, late.clone())).await, WriteResult::Done);
    let late_v2 = Order { version: 2, shop: Some(shop.clone()), ..late.clone() };
    let write = Write::Apply {
        event_id: format!("{}-e2", late.id),
        source: "test".into(),
        base: Some(Base::of(&late)),
        row: late_v2,
        trace: Trace::default(),
    };
    assert_eq!(one(s, write).await, WriteResult::Done);
    let mut found = Vec::new();
    let mut cursor = None;
    for _ in 0..10 {
        let page = shop_page(s, &shop, 2, cursor).await;
        assert!(page.items.len() <= 2, "at most the limit: {:?}", page.items);
        found.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    found.sort();
    let ids = |n: &[&str]| n.iter().map(|n| format!("{prefix}-shop-{n}")).collect::<Vec<_>>();
    assert_eq!(found, ids(&["1", "2", "4"]), "the shop's orders, each once, and no other shop's");
    let doomed = ids(&["1", "3", "4"]);
    assert_eq!(s.delete_shop_orders(&shop, &doomed).await.unwrap(), 2, "only the shop's rows go");
    for (id, kept) in [("1", false), ("2", true), ("3", true), ("4", false)] {
        let id = format!("{prefix}-shop-{id}");
        assert_eq!(s.get(&id).await.unwrap().is_some(), kept, "{id}");
        let history = s.history(&id, 10, None).await.unwrap().items;
        assert_eq!(!history.is_empty(), kept, "{id}'s history goes with its row: {history:?}");
    }
    let left = shop_page(s, &shop, 100, None).await;
    assert_eq!(left.items, ids(&["2"]), "what is left of the shop");
    assert_eq!(left.next_cursor, None);

    // As an erasure pages: each page deleted before the next is read.
    for n in 5..12 {
        let o = of(&n.to_string(), &shop);
        assert_eq!(one(s, apply(&format!("{}-e1", o.id), None, o)).await, WriteResult::Done);
    }
    let (mut erased, mut cursor) = (Vec::new(), None);
    for _ in 0..20 {
        let page = shop_page(s, &shop, 3, cursor).await;
        assert_eq!(s.delete_shop_orders(&shop, &page.items).await.unwrap(), page.items.len() as u64);
        erased.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    erased.sort();
    assert_eq!(erased, ids(&["10", "11", "2", "5", "6", "7", "8", "9"]), "each order once, none missed");
    assert!(shop_page(s, &shop, 100, None).await.items.is_empty(), "nothing of the shop is left");
}

/// A page of the shop's orders; a CQL store answers Unavailable until its background
/// backfill of the index is done, so that is waited out.
async fn shop_page(s: &(impl Compliance + ?Sized), shop: &str, limit: usize, cursor: Option<String>) -> Page<String> {
    for _ in 0..600 {
        match s.shop_orders(shop, limit, cursor.clone()).await {
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            other => return other.expect("the store answers"),
        }
    }
    panic!("the shops' order index was not ready within 60 s");
}

/// `Compliance`: dead letters redacted by order or by what their payload holds, parked
/// events by order, cases forgotten by order, and requests saved, replaced and listed.
pub async fn compliance(s: &(impl Orders + DeadLetters + Parking + Cases + Compliance), prefix: &str) {
    let e = |n: &str| format!("{prefix}-gdpr-{n}");
    let (mine, other) = (e("o1"), e("o2"));
    let email = format!("{prefix}-ada@example.com");
    let redact: super::Redact = |p| if p.contains("@") { "{\"x\":1}".to_string() } else { p.to_string() };
    let letter = |id: &str, order: &str, payload: String| {
        let letter = DeadLetter { order_id: Some(order.into()), payload, ..letter_template(id) };
        Write::Record {
            event_id: id.into(),
            source: "test".into(),
            order_id: order.into(),
            outcome: Outcome::Rejected,
            reason: "r".into(),
            decided_by: "t".into(),
            dead_letter: Some(letter),
            trace: Trace::default(),
        }
    };
    let (by_order, by_payload, untouched) = (e("l1"), e("l2"), e("l3"));
    one(s, letter(&by_order, &mine, format!("{{\"c\":\"{email}\"}}"))).await;
    one(s, letter(&by_payload, &other, format!("{{\"raw\":\"{email}\"}}"))).await;
    one(s, letter(&untouched, &other, "{\"c\":\"bob@example.com\"}".into())).await;
    // Events of a shop being erased, and of another shop.
    let (erased, kept_shop) = (format!("{prefix}-erased.myshopify.com"), format!("{prefix}-kept.myshopify.com"));
    let (by_shop, other_shop) = (e("l4"), e("l5"));
    one(s, letter(&by_shop, &e("o3"), format!("{{\"shop\":\"{erased}\",\"c\":\"zed@example.com\"}}"))).await;
    one(s, letter(&other_shop, &e("o4"), format!("{{\"shop\":\"{kept_shop}\",\"c\":\"zed@example.com\"}}"))).await;
    let which =
        super::ErasureMatch { order_ids: [mine.clone()].into(), contact: vec![email.clone()], shop: Some(erased) };
    let changed = s.redact_dead_letters(which, redact).await;
    assert_eq!(changed.unwrap(), 3, "letters of the order, holding the needle, and of the shop");
    for id in [&by_order, &by_payload, &by_shop] {
        assert_eq!(s.dead_letter(id).await.unwrap().unwrap().payload, "{\"x\":1}", "{id} redacted");
    }
    for id in [&untouched, &other_shop] {
        let kept = s.dead_letter(id).await.unwrap().unwrap().payload;
        assert!(kept.contains("@example.com"), "another customer's or shop's letter stays: {kept}");
    }

    let parked = |order: &str, n: &str| ParkedEvent {
        order_id: order.into(),
        event_id: e(n),
        priority: Priority::Normal,
        appended_at_us: 1,
        offset: 1,
        parked_at: Utc::now(),
        payload: format!("{{\"c\":\"{email}\"}}"),
    };
    s.park(vec![parked(&mine, "p1"), parked(&other, "p2")]).await.unwrap();
    assert_eq!(s.redact_parked(std::slice::from_ref(&mine), redact).await.unwrap(), 1);
    let left = s.parked(vec![mine.clone(), other.clone()]).await.unwrap();
    let payload = |order: &str| left.iter().find(|p| p.order_id == order).unwrap().payload.clone();
    assert_eq!((payload(&mine).as_str(), payload(&other).contains("@")), ("{\"x\":1}", true));
    s.unpark(&left).await.unwrap();

    let case = |order: &str, n: &str| Case {
        event: crate::domain::OrderEvent {
            event_id: e(n),
            order_id: order.into(),
            kind: crate::domain::EventKind::Updated,
            source: "test".into(),
            occurred_at: Utc::now(),
            payload: Default::default(),
            accepted_at: None,
            shop: None,
        },
        current: Some(row(order, 1, "n")),
        recorded_at: Utc::now(),
    };
    let keep = std::time::Duration::from_secs(3_600);
    s.record_cases(vec![case(&mine, "c1"), case(&mine, "c2"), case(&other, "c3")], keep).await.unwrap();
    let which = super::ErasureMatch { order_ids: [mine.clone()].into(), ..Default::default() };
    assert_eq!(s.forget_cases(which).await.unwrap(), 2, "the order's cases go");
    let since = Utc::now() - Duration::minutes(5);
    let orders: Vec<String> =
        s.cases_since(since, 100_000).await.unwrap().into_iter().map(|c| c.event.order_id).collect();
    assert!(!orders.contains(&mine) && orders.contains(&other), "only the order's cases go: {orders:?}");
    let of_shop = |order: &str, n: &str, shop: &str| {
        let mut c = case(order, n);
        c.event.shop = Some(shop.to_string());
        c
    };
    let (erased_shop, kept_shop) = (format!("{prefix}-erased.example"), format!("{prefix}-kept.example"));
    let strays = vec![of_shop(&e("o5"), "c4", &erased_shop), of_shop(&e("o6"), "c5", &kept_shop)];
    s.record_cases(strays, keep).await.unwrap();
    let which = super::ErasureMatch { shop: Some(erased_shop), ..Default::default() };
    assert_eq!(s.forget_cases(which).await.unwrap(), 1, "the shop's case goes, another shop's stays");

    let at = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let request = |id: &str, secs: i64, body: &str| ComplianceRecord {
        id: e(id),
        received_at: at + Duration::seconds(secs),
        body: body.into(),
    };
    s.save_request(&request("r1", 0, "{\"state\":\"pending\"}")).await.unwrap();
    s.save_request(&request("r2", 1, "{}")).await.unwrap();
    s.save_request(&request("r1", 0, "{\"state\":\"done\"}")).await.unwrap();
    assert_eq!(s.request(&e("r1")).await.unwrap(), Some(request("r1", 0, "{\"state\":\"done\"}")), "replaced");
    assert_eq!(s.request(&e("none")).await.unwrap(), None);
    let listed: Vec<String> =
        s.requests(1000).await.unwrap().into_iter().map(|r| r.id).filter(|id| id.starts_with(prefix)).collect();
    assert_eq!(listed, [e("r2"), e("r1")], "newest first");
}

/// `Cases`: oldest first from a time, one case per event id, bounded by the limit, and
/// pruned once past the retention. Its cases are two hours old, so other tests' cases
/// (recorded now) are not in its window.
pub async fn cases(s: &(impl Cases + ?Sized), prefix: &str) {
    let t0 = Utc::now() - Duration::hours(2) - Duration::seconds(prefix.len() as i64);
    let t0 = chrono::DateTime::from_timestamp_micros(t0.timestamp_micros()).unwrap();
    let case = |i: i64, note: &str| {
        let mut current = row(&format!("{prefix}-case-{i}"), 1, note);
        current.created_at = t0;
        let event = crate::domain::OrderEvent {
            event_id: format!("{prefix}-case-e{i}"),
            order_id: current.id.clone(),
            kind: crate::domain::EventKind::Updated,
            source: "test".into(),
            occurred_at: t0,
            payload: crate::domain::OrderChange { note: Some(note.into()), ..Default::default() },
            accepted_at: None,
            shop: None,
        };
        Case { event, current: Some(current), recorded_at: t0 + Duration::milliseconds(i) }
    };
    let keep = std::time::Duration::from_secs(86_400);
    let first = case(0, "a");
    s.record_cases(vec![first.clone(), case(1, "b"), case(2, "c")], keep).await.unwrap();
    // Recorded again, later (a retried round): still one case, as first recorded.
    s.record_cases(vec![Case { recorded_at: t0 + Duration::milliseconds(5), ..case(1, "b2") }], keep).await.unwrap();
    let mine =
        |all: Vec<Case>| -> Vec<Case> { all.into_iter().filter(|c| c.event.event_id.starts_with(prefix)).collect() };
    let all = mine(s.cases_since(t0, 100).await.unwrap());
    let notes: Vec<_> = all.iter().filter_map(|c| c.event.payload.note.clone()).collect();
    assert_eq!(notes, ["a", "b", "c"], "cases oldest first, one per event id, as first recorded");
    assert_eq!(all[0], first, "a case reads back as it was recorded (event, row met, time)");
    let later = mine(s.cases_since(t0 + Duration::milliseconds(1), 100).await.unwrap());
    assert_eq!(later.len(), 2, "cases before `since` are left out");
    assert_eq!(s.cases_since(t0, 2).await.unwrap().len(), 2, "at most `limit` cases");
    let retention = CaseRetention { keep_for: std::time::Duration::from_secs(3_600), max_cases: u64::MAX };
    s.prune_cases(retention).await.unwrap();
    assert!(mine(s.cases_since(t0, 100).await.unwrap()).is_empty(), "cases past the retention are pruned");
}

/// `ActionLog`: newest first, paged by cursor. Other tests may record actions in the same
/// store, so it looks for its own (the token named `prefix`).
pub async fn action_log(s: &(impl ActionLog + ?Sized), prefix: &str) {
    let at = Utc::now();
    for (i, target) in ["/a", "/b", "/c"].into_iter().enumerate() {
        let action = ActionRecord {
            at: at + chrono::Duration::milliseconds(i as i64),
            token: prefix.to_string(),
            role: "operator".into(),
            action: "POST /x".into(),
            target: target.into(),
            status: 200,
            outcome: "done".into(),
        };
        s.record_action(action).await.unwrap();
    }
    let (mut mine, mut cursor, mut pages) = (Vec::new(), None, 0);
    loop {
        let page = s.actions(2, cursor).await.unwrap();
        assert!(page.items.len() <= 2, "a page holds at most its limit");
        mine.extend(page.items.into_iter().filter(|a| a.token == prefix).map(|a| a.target));
        pages += 1;
        match page.next_cursor {
            Some(c) if mine.len() < 3 && pages < 100 => cursor = Some(c),
            _ => break,
        }
    }
    assert_eq!(mine, ["/c", "/b", "/a"], "actions newest first, across pages");
}

/// `Parking`: per-order log order, idempotent parking, oldest first, unparking.
/// Leaves nothing parked under `prefix`.
pub async fn parking(s: &(impl Parking + ?Sized), prefix: &str) {
    let (a, b) = (format!("{prefix}-park-a"), format!("{prefix}-park-b"));
    // Whole microseconds: what every backend keeps.
    let at = chrono::DateTime::from_timestamp_micros((Utc::now() - Duration::seconds(60)).timestamp_micros())
        .expect("a time in range");
    let event = |order: &str, event_id: &str, appended: i64, parked_after_s: i64| ParkedEvent {
        order_id: order.into(),
        event_id: format!("{prefix}-{event_id}"),
        priority: Priority::Vip,
        appended_at_us: appended,
        offset: 7,
        parked_at: at + Duration::seconds(parked_after_s),
        payload: format!("{{\"event\":\"{event_id}\"}}"),
    };
    // Parked out of log order, and b's event parked before a's. a0 and a1 were appended
    // together (one time): their offsets order them, whatever their ids.
    let (a2, a1, b1) = (event(&a, "a2", 20, 2), event(&a, "a1", 10, 3), event(&b, "b1", 5, 1));
    let a0 = ParkedEvent { event_id: format!("{prefix}-z0"), offset: 6, ..a1.clone() };
    // The same event id for another order is another parked event.
    let b_same = ParkedEvent { order_id: b.clone(), ..a2.clone() };
    s.park(vec![a2.clone(), a1.clone(), a0.clone()]).await.expect("park");
    s.park(vec![b1.clone(), a1.clone(), b_same.clone()]).await.expect("parking again changes nothing");

    let of_a = s.parked(vec![a.clone()]).await.expect("parked of a");
    assert_eq!(of_a, [a0.clone(), a1.clone(), a2.clone()], "one order's parked events in log order, each once");
    let oldest: Vec<ParkedEvent> = s
        .parked_oldest(1000)
        .await
        .expect("oldest")
        .into_iter()
        .filter(|e| e.event_id.starts_with(&format!("{prefix}-")))
        .collect();
    assert_eq!(oldest.len(), 5, "{oldest:?}");
    assert_eq!(oldest[0], b1, "the longest parked first");

    s.unpark(&[a1.clone(), b1.clone(), a0, b_same]).await.expect("unpark");
    let left = s.parked(vec![a.clone(), b.clone()]).await.expect("parked");
    assert_eq!(left, [a2], "unparked ones are gone");
    s.unpark(&left).await.expect("unpark the last");
    assert!(s.parked(vec![a, b]).await.expect("parked").is_empty());
}

/// `Orders`: counts by status and priority follow a new row and its change of status,
/// and a search by a Shopify order id's digits finds `shopify-<id>`.
pub async fn counts_and_search(s: &(impl Orders + ?Sized), prefix: &str) {
    let before = s.counts().await.expect("counts");
    let first = row(&format!("{prefix}-count"), 1, "");
    assert_eq!(one(s, apply(&format!("{prefix}-count-1"), None, first.clone())).await, WriteResult::Done);
    let confirmed = Order { status: Status::Confirmed, version: 2, ..first.clone() };
    let moved = Write::Apply {
        event_id: format!("{prefix}-count-2"),
        source: "test".into(),
        base: Some(Base::of(&first)),
        row: confirmed,
        trace: Trace::default(),
    };
    assert_eq!(one(s, moved).await, WriteResult::Done);
    let after = s.counts().await.expect("counts");
    let n = |c: &super::OrderCounts, status: &str| c.by_status.get(status).copied().unwrap_or(0);
    assert_eq!(after.total, before.total + 1, "one more order: {before:?} then {after:?}");
    assert_eq!(n(&after, "CONFIRMED"), n(&before, "CONFIRMED") + 1, "counted where it is now");
    assert_eq!(n(&after, "PENDING"), n(&before, "PENDING"), "and no longer where it was");
    let vip = |c: &super::OrderCounts| c.by_priority.get("VIP").copied().unwrap_or(0);
    assert_eq!(vip(&after), vip(&before) + 1);
    assert!(after.counted_at >= before.counted_at);

    let digits = (Utc::now().timestamp_micros() % 1_000_000_000_000).to_string();
    let shopify = row(&format!("shopify-{digits}"), 1, "");
    assert_eq!(one(s, apply(&format!("{prefix}-shopify-1"), None, shopify)).await, WriteResult::Done);
    for sort in [Sort::UpdatedDesc, Sort::IdAsc] {
        // Page by page: a CQL page by id filters one page of partitions, so it may be empty.
        let (mut found, mut cursor) = (Vec::new(), None);
        for _ in 0..1000 {
            let q = ListQuery { limit: 10, q: Some(digits.clone()), sort, cursor, ..Default::default() };
            let page = s.list(q).await.expect("list");
            found.extend(page.items.into_iter().map(|o| o.id));
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(found, [format!("shopify-{digits}")], "a Shopify order id finds its order ({sort:?})");
    }
}

/// `Orders`: leaves `<prefix>-a` at version 2 with three history entries.
pub async fn orders(s: &(impl Orders + ?Sized), prefix: &str) {
    let id = format!("{prefix}-a");
    let e = |n: &str| format!("{prefix}-{n}");

    assert_eq!(
        one(s, apply(&e("1"), None, row(&id, 1, "one"))).await,
        WriteResult::Done,
        "insert-if-absent on a new row"
    );
    let lost = one(s, apply(&e("2"), None, row(&id, 1, "two"))).await;
    assert!(
        matches!(&lost, WriteResult::Conflict(Some(r)) if r.note == "one"),
        "insert-if-absent on an existing row must conflict with the stored row, got {lost:?}"
    );

    assert_eq!(
        one(s, traced(apply(&e("3"), Some(1), row(&id, 2, "three")), journey_of(&e("3")))).await,
        WriteResult::Done,
        "compare-and-set at the stored version"
    );
    let lost = one(s, apply(&e("4"), Some(1), row(&id, 2, "four"))).await;
    assert!(
        matches!(&lost, WriteResult::Conflict(Some(r)) if r.version == 2 && r.note == "three"),
        "stale compare-and-set must conflict, got {lost:?}"
    );
    let missing = one(s, apply(&e("5"), Some(1), row(&format!("{prefix}-none"), 2, "x"))).await;
    assert_eq!(missing, WriteResult::Conflict(None), "compare-and-set on a missing row");

    // The same event id again changes nothing, even with a valid version.
    assert_eq!(
        one(s, apply(&e("3"), Some(2), row(&id, 3, "again"))).await,
        WriteResult::Duplicate,
        "idempotent on event id"
    );
    let stored = s.get(&id).await.unwrap().expect("row exists");
    assert_eq!((stored.version, stored.note.as_str()), (2, "three"));

    let skip = Write::Record {
        event_id: e("6"),
        source: "test".into(),
        order_id: id.clone(),
        outcome: Outcome::Skipped,
        reason: "no change".into(),
        decided_by: "rules@1".into(),
        dead_letter: None,
        trace: journey_of(&e("6")),
    };
    assert_eq!(one(s, skip.clone()).await, WriteResult::Done);
    assert_eq!(one(s, skip).await, WriteResult::Duplicate, "a recorded skip is idempotent too");

    let history = s.history(&id, 100, None).await.unwrap().items;
    let got: Vec<_> = history.iter().map(|h| (h.event_id.clone(), h.version, h.outcome)).collect();
    assert_eq!(
        got,
        [(e("1"), 1, Outcome::Applied), (e("3"), 2, Outcome::Applied), (e("6"), 2, Outcome::Skipped)],
        "history holds every outcome once, oldest first"
    );
    assert_eq!(history[2].reason.as_deref(), Some("no change"));
    let traces: Vec<_> = history.iter().map(|h| h.trace.clone()).collect();
    assert_eq!(traces, [None, Some(journey_of(&e("3"))), Some(journey_of(&e("6")))], "each entry keeps its trace");
    // Paged, in the same order.
    let first = s.history(&id, 2, None).await.unwrap();
    assert_eq!(first.items, history[..2], "the first page");
    let rest = s.history(&id, 2, first.next_cursor.clone()).await.unwrap();
    assert!(first.next_cursor.is_some() && rest.next_cursor.is_none(), "two pages: {:?}", rest.next_cursor);
    assert_eq!(rest.items, history[2..], "the second page");
    assert!(s.history(&id, 2, Some("no cursor".into())).await.is_err(), "a cursor it did not issue");

    // A batch: each write is judged on its own.
    let batch = vec![
        apply(&e("8"), None, row(&format!("{prefix}-b"), 1, "b")),
        apply(&e("9"), Some(7), row(&id, 8, "stale")),
        apply(&e("1"), None, row(&format!("{prefix}-c"), 1, "dup")),
        apply(&e("3"), Some(2), row(&id, 3, "replayed")),
    ];
    let results: Vec<_> = s.write(batch).await.unwrap().into_iter().map(|(_, r)| r).collect();
    assert!(
        matches!(results.as_slice(), [WriteResult::Done, WriteResult::Conflict(Some(_)), _, WriteResult::Duplicate]),
        "{results:?}"
    );
    // The same event id on another order: a backend with a global ledger names the order
    // that holds it and changes nothing; one whose ledger is per order applies it there.
    match s.recorded_for(vec![e("1"), e("never")]).await.expect("recorded_for") {
        Some(found) => {
            assert_eq!(found, [(e("1"), id.clone())].into(), "each recorded id with its order, and only those");
            assert_eq!(results[2], WriteResult::IdTaken(id.clone()), "a reused id names its order");
            assert_eq!(s.get(&format!("{prefix}-c")).await.unwrap(), None, "a reused id changes nothing");
        }
        None => assert_eq!(results[2], WriteResult::Done, "a per-order ledger applies it to its own order"),
    }

    // Paging walks every row once (the order depends on the backend).
    for i in 0..25 {
        one(s, apply(&e(&format!("p{i}")), None, row(&format!("{prefix}-p{i:02}"), 1, "page"))).await;
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .list(ListQuery {
                limit: 10,
                cursor: cursor.take(),
                q: Some(format!("{prefix}-p")),
                sort: Sort::IdAsc,
                ..Default::default()
            })
            .await
            .unwrap();
        seen.extend(page.items.into_iter().map(|o| o.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, (0..25).map(|i| format!("{prefix}-p{i:02}")).collect::<Vec<_>>(), "cursor paging");

    // A row's shop is kept, set by an update on a row that had none, and filters the list.
    let (shop_a, shop_b) = (format!("{prefix}-a.example.com"), format!("{prefix}-b.example.com"));
    let with_shop =
        |id: &str, version: u64, shop: Option<&String>| Order { shop: shop.cloned(), ..row(id, version, "s") };
    one(s, apply(&e("s0"), None, with_shop(&e("s0"), 1, Some(&shop_a)))).await;
    one(s, apply(&e("s1"), None, with_shop(&e("s1"), 1, Some(&shop_b)))).await;
    one(s, apply(&e("s2"), None, with_shop(&e("s2"), 1, None))).await;
    assert_eq!(s.get(&e("s2")).await.unwrap().unwrap().shop, None, "a row without a shop");
    one(s, apply(&e("s2-u"), Some(1), with_shop(&e("s2"), 2, Some(&shop_a)))).await;
    assert_eq!(s.get(&e("s2")).await.unwrap().unwrap().shop.as_ref(), Some(&shop_a), "set by an update");
    let (mut of_a, mut cursor) = (Vec::new(), None);
    loop {
        let query = ListQuery { limit: 10, cursor: cursor.take(), shop: Some(shop_a.clone()), ..Default::default() };
        let page = s.list(query).await.unwrap();
        of_a.extend(page.items.into_iter().map(|o| o.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    of_a.sort();
    assert_eq!(of_a, [e("s0"), e("s2")], "the list of one shop");

    let page_rows = s.stats().await.unwrap();
    assert!(page_rows.orders >= 27 && page_rows.history >= 28, "row counts: {page_rows:?}");
}

/// `DeadLetters`: a rejection recorded through `Orders` lands there and is replayed once.
pub async fn dead_letters(s: &(impl Orders + DeadLetters), prefix: &str) {
    let before = s.tally().await.unwrap();
    let started = Utc::now();
    let id = format!("{prefix}-dl");
    let e = |n: &str| format!("{prefix}-{n}");
    let letter = DeadLetter {
        id: e("7"),
        order_id: Some(id.clone()),
        stage: "rules".into(),
        error_type: "rejected".into(),
        reason: "negative total".into(),
        decided_by: Some("rules@1".into()),
        payload: "{}".into(),
        recorded_at: Utc::now(),
        replayed_at: None,
    };
    let reject = Write::Record {
        event_id: e("7"),
        source: "test".into(),
        order_id: id.clone(),
        outcome: Outcome::Rejected,
        reason: "negative total".into(),
        decided_by: "rules@1".into(),
        dead_letter: Some(letter),
        trace: Trace::default(),
    };
    assert_eq!(one(s, reject).await, WriteResult::Done);

    let history = s.history(&id, 100, None).await.unwrap().items;
    assert_eq!(history.len(), 1, "the rejection is in the order's history");
    assert_eq!((history[0].outcome, history[0].reason.as_deref()), (Outcome::Rejected, Some("negative total")));
    let letters = s.dead_letters(1000, None).await.unwrap();
    assert!(
        letters.items.iter().any(|d| d.id == e("7") && d.reason == "negative total"),
        "rejection reached the dead letters"
    );
    assert!(
        matches!(s.claim_replay(&e("7"), false).await.unwrap(), ReplayClaim::Claimed(d) if d.replayed_at.is_some()),
        "first claim marks it replayed"
    );
    assert!(
        matches!(
            s.claim_replay(&e("7"), false).await.unwrap(),
            ReplayClaim::AlreadyReplayed(d) if d.replayed_at.is_some()
        ),
        "a dead letter is replayed once"
    );
    assert!(
        matches!(s.claim_replay(&e("7"), true).await.unwrap(), ReplayClaim::Claimed(d) if d.replayed_at.is_none()),
        "undo"
    );
    assert!(
        matches!(s.claim_replay(&e("7"), false).await.unwrap(), ReplayClaim::Claimed(_)),
        "claimable again after undo"
    );
    assert_eq!(s.claim_replay(&e("none"), false).await.unwrap(), ReplayClaim::NotFound);
    assert_eq!(s.dead_letter(&e("none")).await.unwrap(), None);
    assert_eq!(s.dead_letter(&e("7")).await.unwrap().map(|d| d.reason), Some("negative total".into()));

    // A rejection of an event the ledger already holds as applied (a redelivery decided
    // differently) is a duplicate, and leaves no letter: replaying one would apply the
    // event twice.
    let applied = apply(&e("dl8"), None, row(&format!("{prefix}-dl2"), 1, "applied"));
    assert_eq!(one(s, applied).await, WriteResult::Done);
    let phantom = DeadLetter { id: e("dl8"), order_id: Some(format!("{prefix}-dl2")), ..letter_template(&e("dl8")) };
    let late_reject = Write::Record {
        event_id: e("dl8"),
        source: "test".into(),
        order_id: format!("{prefix}-dl2"),
        outcome: Outcome::Rejected,
        reason: "decided differently".into(),
        decided_by: "rules@2".into(),
        dead_letter: Some(phantom),
        trace: Trace::default(),
    };
    assert_eq!(one(s, late_reject).await, WriteResult::Duplicate);
    assert_eq!(s.dead_letter(&e("dl8")).await.unwrap(), None, "no letter for an applied event");

    // Where event ids are per order (the ledger is not global), one id rejected for two
    // orders keeps both letters: the second under `<id>@<order>`.
    if s.recorded_for(Vec::new()).await.unwrap().is_none() {
        let reject_for = |order: String| Write::Record {
            event_id: e("dl9"),
            source: "test".into(),
            order_id: order.clone(),
            outcome: Outcome::Rejected,
            reason: "decided differently".into(),
            decided_by: "rules@2".into(),
            dead_letter: Some(DeadLetter { order_id: Some(order), ..letter_template(&e("dl9")) }),
            trace: Trace::default(),
        };
        let (first, second) = (format!("{prefix}-dl9a"), format!("{prefix}-dl9b"));
        assert_eq!(one(s, reject_for(first.clone())).await, WriteResult::Done);
        assert_eq!(one(s, reject_for(second.clone())).await, WriteResult::Done);
        let kept = s.dead_letter(&e("dl9")).await.unwrap().and_then(|d| d.order_id);
        assert_eq!(kept, Some(first), "the first order's letter is not overwritten");
        let own = s.dead_letter(&format!("{}@{second}", e("dl9"))).await.unwrap().and_then(|d| d.order_id);
        assert_eq!(own, Some(second), "the second under an id of its own");
    }
    // The tally counts what was filed here (other checks may share the store).
    let after = s.tally().await.unwrap();
    let mut filed = 0;
    let mut cursor = None;
    loop {
        let page = s.dead_letters(1000, cursor).await.unwrap();
        filed += page.items.iter().filter(|l| l.recorded_at >= started).count() as u64;
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert!(filed > 0, "this check filed letters");
    assert_eq!(after.held, before.held + filed, "the tally counts every letter held");
    assert!(after.oldest.is_some_and(|o| o <= Utc::now()), "the oldest letter's time: {after:?}");

    // A purge deletes for good, and counts each letter once.
    let purged = [e("7"), e("none")];
    assert_eq!(s.purge_letters(&purged).await.unwrap(), [e("7")], "only the one held");
    assert_eq!(s.purge_letters(&purged).await.unwrap(), Vec::<String>::new(), "gone already");
    assert_eq!(s.dead_letter(&e("7")).await.unwrap(), None, "purged");
    assert_eq!(s.claim_replay(&e("7"), false).await.unwrap(), ReplayClaim::NotFound);
    let mut listed = false;
    let mut cursor = None;
    loop {
        let page = s.dead_letters(1000, cursor).await.unwrap();
        listed |= page.items.iter().any(|l| l.id == e("7"));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert!(!listed, "a purged letter is not listed");
    assert_eq!(s.tally().await.unwrap().held, after.held - 1, "the tally counts it gone");
    // The replay claimed above, after the purge, left no trace of the id (on CQL it wrote
    // an id row without a place): a letter filed under it again is kept, and replayable.
    let refiled = Write::Record {
        event_id: e("7-again"),
        source: "test".into(),
        order_id: id.clone(),
        outcome: Outcome::Rejected,
        reason: "decided differently".into(),
        decided_by: "rules@2".into(),
        dead_letter: Some(DeadLetter { order_id: Some(id.clone()), ..letter_template(&e("7")) }),
        trace: Trace::default(),
    };
    assert_eq!(one(s, refiled).await, WriteResult::Done);
    let again = s.dead_letter(&e("7")).await.unwrap();
    assert_eq!(again.map(|d| d.reason), Some("decided differently".into()), "filed again after its purge");
    assert!(matches!(s.claim_replay(&e("7"), false).await.unwrap(), ReplayClaim::Claimed(_)), "and replayable");
}

/// A dead letter as the checks file it, to vary with struct update syntax.
pub fn letter_template(id: &str) -> DeadLetter {
    DeadLetter {
        id: id.into(),
        order_id: None,
        stage: "rules".into(),
        error_type: "rejected".into(),
        reason: "decided differently".into(),
        decided_by: Some("rules@2".into()),
        payload: "{}".into(),
        recorded_at: Utc::now(),
        replayed_at: None,
    }
}

/// `WebhookLedger`: one claim per key, a delivery's keys claimed all or none, released
/// keys claimable again, the audit.
pub async fn webhook_ledger(s: &(impl WebhookLedger + ?Sized), prefix: &str) {
    let key = format!("{prefix}-webhook-1");
    let one = std::slice::from_ref(&key);
    let ttl = std::time::Duration::from_secs(3600);
    let (long, short) = (std::time::Duration::from_secs(600), std::time::Duration::from_millis(1));
    assert_eq!(s.claim_delivery(one, ttl, long).await.unwrap(), Claim::Claimed, "first claim");
    assert_eq!(s.claim_delivery(one, ttl, long).await.unwrap(), Claim::InFlight, "held, not yet durable");
    // A delivery whose other key is held takes neither: its own key stays free.
    let (other, both) = (format!("{prefix}-event-1"), [format!("{prefix}-event-1"), key.clone()]);
    assert_eq!(s.claim_delivery(&both, ttl, long).await.unwrap(), Claim::InFlight, "one key of two held");
    let free = std::slice::from_ref(&other);
    assert_eq!(s.claim_delivery(free, ttl, long).await.unwrap(), Claim::Claimed, "left free by the refused pair");
    s.release_delivery(&both).await.unwrap();
    assert_eq!(s.claim_delivery(&both, ttl, long).await.unwrap(), Claim::Claimed, "both free after release");
    s.release_delivery(&both).await.unwrap();
    assert_eq!(s.claim_delivery(one, ttl, long).await.unwrap(), Claim::Claimed, "claimable after release");
    // An attempt that never confirmed (it crashed, or its release failed): once its
    // lease runs out, the next attempt takes the key over.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(s.claim_delivery(one, ttl, short).await.unwrap(), Claim::Claimed, "a stale claim is taken over");
    s.confirm_delivery(one, ttl).await.unwrap();
    assert_eq!(s.claim_delivery(one, ttl, short).await.unwrap(), Claim::Done, "confirmed: a duplicate");
    s.release_delivery(one).await.unwrap();
    assert_eq!(s.claim_delivery(one, ttl, short).await.unwrap(), Claim::Done, "a confirmed claim stays");
    // A delivery with one key confirmed is a duplicate, and takes none of the others.
    let third = [format!("{prefix}-event-2"), key.clone()];
    assert_eq!(s.claim_delivery(&third, ttl, long).await.unwrap(), Claim::Done, "one of two confirmed");
    let fresh = std::slice::from_ref(&third[0]);
    assert_eq!(s.claim_delivery(fresh, ttl, long).await.unwrap(), Claim::Claimed, "left free by the duplicate");
    let delivery = WebhookDelivery {
        webhook_id: Some(key.clone()),
        event_id: None,
        topic: Some("orders/create".into()),
        shop: None,
        outcome: "received".into(),
        reason: None,
        order_id: Some(format!("{prefix}-a")),
        received_at: Utc::now(),
    };
    s.record_delivery(delivery.clone()).await.unwrap();
    // A record past the retention goes (pruned, or never kept under a TTL); a new one stays.
    let old_id = format!("{prefix}-webhook-old");
    let old = WebhookDelivery {
        webhook_id: Some(old_id.clone()),
        received_at: Utc::now() - chrono::Duration::days(40),
        ..delivery.clone()
    };
    s.record_delivery(old).await.unwrap();
    s.prune_deliveries(Utc::now() - super::DELIVERY_RETENTION).await.unwrap();
    let (mut seen, mut cursor) = (Vec::new(), None);
    loop {
        let page = s.deliveries(1000, cursor).await.unwrap();
        seen.extend(page.items.into_iter().filter_map(|d| d.webhook_id.map(|w| (w, d.outcome))));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert!(seen.contains(&(key.clone(), "received".into())), "the delivery audit");
    assert!(!seen.iter().any(|(w, _)| *w == old_id), "a delivery past the retention is gone");

    // A shop's standing: none until it changes, then the latest.
    let domain = format!("{prefix}-shop.myshopify.com");
    assert_eq!(s.shop(&domain).await.unwrap(), None);
    let mut shop = super::ShopRecord {
        domain: domain.clone(),
        active: false,
        reason: "app/uninstalled".into(),
        changed_at: Utc::now(),
    };
    s.set_shop(&shop).await.unwrap();
    assert_eq!(s.shop(&domain).await.unwrap().map(|s| s.active), Some(false));
    shop.active = true;
    s.set_shop(&shop).await.unwrap();
    assert_eq!(s.shop(&domain).await.unwrap(), Some(shop));
}

/// A purge racing updates deletes only what still has the status when it goes: an update
/// that was applied is never lost with its order.
async fn purge_races_writes(s: &(impl Orders + Runs), prefix: &str) {
    const N: usize = 200;
    let race = RunKeys { prefix: format!("{prefix}-race-"), count: N as u64 };
    let id = |i: usize| race.id(i as u64);
    for i in 0..N {
        one(s, apply(&format!("{prefix}-race-c{i}"), None, row(&id(i), 1, "new"))).await;
    }
    let confirm = async {
        let mut applied = Vec::new();
        for i in (0..N).rev() {
            let confirmed = Order { status: Status::Confirmed, ..row(&id(i), 2, "paid") };
            if one(s, apply(&format!("{prefix}-race-u{i}"), Some(1), confirmed)).await == WriteResult::Done {
                applied.push(id(i));
            }
        }
        applied
    };
    let (deleted, applied) = tokio::join!(s.delete_orders(&race, Status::Pending), confirm);
    let deleted = deleted.unwrap();
    for id in &applied {
        let row = s.get(id).await.unwrap();
        assert!(
            matches!(&row, Some(r) if r.status == Status::Confirmed && r.version == 2),
            "{id}: its update was applied, then the purge of PENDING orders took it: {row:?}"
        );
    }
    assert_eq!(deleted as usize + applied.len(), N, "each order was either deleted or confirmed");
}

/// `Runs`: audits of a run's orders, purges by status, and run records saved in place.
pub async fn runs(s: &(impl Orders + Runs), prefix: &str) {
    let e = |n: &str| format!("{prefix}-{n}");
    let run = RunKeys { prefix: format!("{prefix}-r-"), count: 25 };
    for i in 0..25 {
        one(s, apply(&e(&format!("r{i}")), None, row(&run.id(i), 1, "run"))).await;
    }
    one(s, apply(&e("r3-again"), Some(1), row(&run.id(3), 2, "two"))).await;
    // Orders beside the run: past its count, and under a longer prefix.
    for other in [run.id(25), format!("{}x", run.id(1))] {
        one(s, apply(&e(&other), None, row(&other, 1, "not the run's"))).await;
    }
    // A run's audit counts exactly the run's rows and their entries.
    let audit = s.audit(&run).await.unwrap();
    assert_eq!(
        (audit.orders, audit.not_first_version, audit.applied, audit.other),
        (25, 1, 26, 0),
        "audit of a run (25 rows, one at version 2): {audit:?}"
    );
    assert!(audit.first_applied.is_some() && audit.first_applied <= audit.last_applied, "audit window: {audit:?}");
    let first = RunKeys { count: 10, ..run.clone() };
    let narrow = s.audit(&first).await.unwrap();
    assert_eq!((narrow.orders, narrow.applied), (10, 11), "audit of the run's first ten: {narrow:?}");
    assert_eq!(
        s.delete_orders(&run, crate::domain::Status::Confirmed).await.unwrap(),
        0,
        "only the named status is deleted"
    );
    assert_eq!(s.delete_orders(&first, crate::domain::Status::Pending).await.unwrap(), 10);
    assert_eq!(s.audit(&first).await.unwrap(), Default::default(), "deleted with their history");
    assert!(s.get(&run.id(10)).await.unwrap().is_some(), "the run's later orders stay");
    assert!(s.get(&run.id(25)).await.unwrap().is_some(), "orders past the run stay");
    purge_races_writes(s, prefix).await;

    // Run records: saved, read back, replaced in place, listed newest first.
    let at = Utc::now();
    let older = RunRecord { id: e("run-old"), started_at: at - Duration::hours(1), body: "{\"n\":0}".into() };
    let mut run = RunRecord { id: e("run"), started_at: at, body: "{\"n\":1}".into() };
    s.save_run(&older).await.unwrap();
    s.save_run(&run).await.unwrap();
    run.body = "{\"n\":2}".into();
    s.save_run(&run).await.unwrap();
    let read = s.run(&run.id).await.unwrap().expect("the run reads back");
    assert_eq!((read.id.as_str(), read.body.as_str()), (run.id.as_str(), run.body.as_str()), "as saved last");
    assert_eq!(read.started_at.timestamp_micros(), run.started_at.timestamp_micros());
    assert_eq!(s.run(&e("no-run")).await.unwrap(), None);
    let listed: Vec<_> = s
        .runs(100, None)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|r| r.id.starts_with(&e("run")))
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, [e("run"), e("run-old")], "listed once each, newest first");
}
