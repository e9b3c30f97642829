//! The CQL store against a real Cassandra 5 (the CQL stand-in for ScyllaDB): the same
//! behaviour as the embedded store, checked by the same conformance code.

mod common;

use chrono::{Duration, Utc};
use common::{service, unique};
use orchestrator::domain::{Order, Priority, Status};
use orchestrator::sqlite::{from_micros, micros};
use orchestrator::store::cql::{CqlStore, IndexSpan};
use orchestrator::store::embedded::EmbeddedStore;
use orchestrator::store::{
    Base, DeadLetter, DeadLetters, ListQuery, Orders, Outcome, Page, Sort, Write, WriteResult, conformance,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_store_conforms() {
    let Some(nodes) = service("CQL_NODES") else { return };
    let config = common::cql_config(&nodes, &unique("conf"));
    let store = CqlStore::open(config.clone()).await.unwrap();
    conformance::check(&store, "c").await;
    // Reopening applies the schema again without harm, and sees the same rows.
    let again = CqlStore::open(config).await.unwrap();
    assert_eq!(again.get("c-a").await.unwrap().unwrap().version, 2);
    assert_eq!(again.history("c-a", 100, None).await.unwrap().items.len(), 3);
}

/// The listing by time (#15): 10k orders over three days, in every status and both
/// priorities, with ties in time, updates, and updates whose old index entry was never
/// retired (as a crash would leave it). Paged by the CQL store's time index, each listing
/// must give exactly what the embedded store gives; then again after the index is rebuilt
/// from the rows by the backfill that runs when a store opens without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_listing_by_time_matches_the_embedded_store() {
    let Some(nodes) = service("CQL_NODES") else { return };
    let keyspace = unique("listing");
    let cql = CqlStore::open(common::cql_config(&nodes, &keyspace)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("orders.db")).unwrap();
    let start = Utc::now() - Duration::days(3);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let shops = [Some("north.myshopify.com"), Some("south.myshopify.com"), None];
    let mut orders = Vec::new();
    for i in 0..10_000u64 {
        let mut o = conformance::row(&format!("L{:05}", next(1_000_000)), 1, "");
        o.id = format!("{}-{i:05}", o.id);
        o.status = Status::ALL[next(6) as usize];
        o.priority = Priority::ALL[next(2) as usize];
        // Every fifth order shares its time with the one before: ties break by id.
        let at = if i % 5 == 1 { orders.last().map_or(0, |p: &Order| micros(p.updated_at)) } else { 0 };
        o.updated_at = if at > 0 { from_micros(at) } else { start + Duration::seconds(next(3 * 86_400) as i64) };
        o.customer = format!("c{}@example.com", next(50));
        o.shop = shops[next(3) as usize].map(str::to_string);
        orders.push(o);
    }
    let creates = orders.iter().map(|o| (None, o.clone())).collect();
    write_both(&cql, &embedded, creates).await;
    // 2,000 updates move orders in time and status; every tenth one's base is wrong, so its
    // old entry stays behind in the index.
    let mut updates = Vec::new();
    for (n, o) in orders.iter_mut().step_by(5).enumerate() {
        let mut base = Base::of(o);
        if n % 10 == 0 {
            base.updated_at += Duration::microseconds(1);
        }
        o.version = 2;
        o.status = Status::ALL[next(6) as usize];
        o.updated_at += Duration::seconds(next(7_200) as i64);
        updates.push((Some(base), o.clone()));
    }
    write_both(&cql, &embedded, updates).await;

    let queries = listing_queries();
    for (q, what) in &queries {
        assert_same_listing(&cql, &embedded, q, what).await;
    }

    // The index goes, as if the rows predated it; a store that opens rebuilds it.
    common::cqlsh(&format!(
        "TRUNCATE {keyspace}.order_index_by_minute; TRUNCATE {keyspace}.order_index_minutes; \
         TRUNCATE {keyspace}.order_index_by_minute_hours; TRUNCATE {keyspace}.data_migrations;"
    ));
    let empty = cql.list(ListQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert!(empty.items.is_empty(), "the index is gone: {:?}", empty.items.len());
    let reopened = CqlStore::open(common::cql_config(&nodes, &keyspace)).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while count(&reopened, ListQuery { limit: 1000, ..Default::default() }).await < 10_000 {
        assert!(std::time::Instant::now() < deadline, "the backfill did not list 10k orders in 120 s");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    for (q, what) in queries.iter().take(3) {
        assert_same_listing(&reopened, &embedded, q, what).await;
    }
}

/// A search that matches one order, 600 hours back, among orders one per hour: each
/// request walks a bounded number of hours (and reads a bounded number of hour markers),
/// answering short pages with a cursor, and paging still finds it, once, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_listing_walks_sparse_hours_in_bounded_steps() {
    let Some(nodes) = service("CQL_NODES") else { return };
    let cql = CqlStore::open(common::cql_config(&nodes, &unique("hours"))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("orders.db")).unwrap();
    let now = Utc::now();
    let orders: Vec<(Option<Base>, Order)> = (0..600)
        .map(|h| {
            let mut o = conformance::row(&format!("H{h:04}"), 1, "");
            o.updated_at = now - Duration::hours(h);
            o.customer = if h == 599 { "needle@example.com".into() } else { format!("hay{h}@example.com") };
            (None, o)
        })
        .collect();
    write_both(&cql, &embedded, orders).await;
    for sort in [Sort::UpdatedDesc, Sort::UpdatedAsc] {
        let q = ListQuery { q: Some("needle".into()), limit: 10, sort, ..Default::default() };
        let (want, _) = all_pages(&embedded, &q).await;
        let (got, pages) = all_pages(&cql, &q).await;
        assert_eq!(want.len(), 1, "the embedded store finds the needle");
        assert_eq!(got, want, "{sort:?}: CQL finds the same, once");
        if sort == Sort::UpdatedDesc {
            assert!(pages >= 4, "600 hours take several bounded requests, not {pages}");
        }
    }
}

/// Hours whose orders all moved on (#15): their markers stayed, so every listing of that
/// status walked them again, 168 a request. Now the listing that finds such an hour
/// empty forgets its marker, and the next listing answers in one request. A marker
/// written after a listing's read found its hour empty (an entry that read missed) is
/// not forgotten by that listing's late delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_listing_forgets_hours_whose_orders_moved_on() {
    let Some(nodes) = service("CQL_NODES") else { return };
    let cql = CqlStore::open(common::cql_config(&nodes, &unique("gone"))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("orders.db")).unwrap();
    let now = Utc::now();
    let pending: Vec<Order> = (0..400)
        .map(|h| Order { updated_at: now - Duration::hours(3 + h), ..conformance::row(&format!("G{h:03}"), 1, "") })
        .collect();
    write_both(&cql, &embedded, pending.iter().map(|o| (None, o.clone())).collect()).await;
    let shipped = pending
        .iter()
        .map(|o| (Some(Base::of(o)), Order { version: 2, status: Status::Shipped, updated_at: now, ..o.clone() }))
        .collect();
    write_both(&cql, &embedded, shipped).await;
    // Past the clock skew a forgotten marker's delete allows for.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let q = ListQuery { status: Some(Status::Pending), limit: 10, ..Default::default() };
    let (first, pages) = all_pages(&cql, &q).await;
    assert!(first.is_empty() && pages >= 3, "400 empty hours take bounded requests: {pages}, {first:?}");
    let (again, pages) = all_pages(&cql, &q).await;
    assert!(again.is_empty());
    assert_eq!(pages, 1, "the empty hours were forgotten by the listing that walked them");
    let shipped_q = ListQuery { status: Some(Status::Shipped), limit: 100, ..Default::default() };
    assert_same_listing(&cql, &embedded, &shipped_q, "the orders that moved on").await;

    // A listing reads a minute (and its hour) empty; an order is listed there before the
    // listing's deletes.
    let seen_empty_at = Utc::now();
    let late = Order { updated_at: now - Duration::hours(10), ..conformance::row("G-late", 1, "") };
    write_both(&cql, &embedded, vec![(None, late.clone())]).await;
    for span in [IndexSpan::Minute, IndexSpan::Hour] {
        cql.forget_marker(span, late.status, late.priority, late.updated_at, seen_empty_at).await.unwrap();
    }
    let (listed, _) = all_pages(&cql, &q).await;
    assert_eq!(listed, vec![("G-late".to_string(), 1, Status::Pending, micros(late.updated_at))]);
}

/// Tombstones in the listing's index (#15): each move of an entry leaves one at its old
/// place, and a read crosses those between the entries it returns. 3,000 pending orders,
/// one a second over most of an hour, move on; the 10 oldest stay. With a partition an
/// hour, listing the pending orders read across all 2,990 tombstones in one read (at
/// peak an hour gathered millions, and Cassandra fails a read that crosses 100,000).
/// With a partition a minute, no read crosses more than one minute's moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_listing_reads_cross_at_most_a_minute_of_moved_entries() {
    let Some(nodes) = service("CQL_NODES") else { return };
    let keyspace = unique("moved");
    let cql = CqlStore::open(common::cql_config(&nodes, &keyspace)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("orders.db")).unwrap();
    let hour_us = 3_600_000_000;
    let hour = (micros(Utc::now()) / hour_us - 2) * hour_us;
    let pending: Vec<Order> = (0..3_000)
        .map(|i| Order {
            updated_at: from_micros(hour + i * 1_000_000),
            ..conformance::row(&format!("M{i:04}"), 1, "")
        })
        .collect();
    write_both(&cql, &embedded, pending.iter().map(|o| (None, o.clone())).collect()).await;
    let now = Utc::now();
    let moved = pending[10..]
        .iter()
        .map(|o| (Some(Base::of(o)), Order { version: 2, status: Status::Shipped, updated_at: now, ..o.clone() }))
        .collect();
    write_both(&cql, &embedded, moved).await;

    for sort in [Sort::UpdatedDesc, Sort::UpdatedAsc] {
        let q = ListQuery { status: Some(Status::Pending), limit: 4, sort, ..Default::default() };
        let (want, _) = all_pages(&embedded, &q).await;
        let (got, _) = all_pages(&cql, &q).await;
        assert_eq!(want.len(), 10, "the embedded store lists the 10 that stayed");
        assert_eq!(got, want, "{sort:?}: CQL lists the same");
    }
    // Cassandra's own count, per table, of the tombstones each read crossed (a histogram,
    // so it rounds up: 60 reads as 72). Cassandra's alone: ScyllaDB has no such table.
    let crossed = common::cqlsh(&format!(
        "SELECT table_name, count, max FROM system_views.tombstones_per_read \
         WHERE keyspace_name = '{keyspace}' ALLOW FILTERING"
    ));
    let index_reads: Vec<(String, f64, f64)> = crossed
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let (table, count, max) = (cells.first()?, cells.get(1)?.parse().ok()?, cells.get(2)?.parse().ok()?);
            table.starts_with("order_index").then(|| (table.to_string(), count, max))
        })
        .collect();
    let read = |t: &(String, f64, f64)| t.1 > 0.0;
    assert!(index_reads.iter().any(read), "Cassandra counted no reads of the listing's index: {crossed}");
    for (table, _, max) in index_reads {
        assert!(max <= 150.0, "a read of {table} crossed {max} tombstones, more than a minute's moves: {crossed}");
    }
}

async fn write_both(cql: &CqlStore, embedded: &EmbeddedStore, writes: Vec<(Option<Base>, Order)>) {
    let writes: Vec<Write> = writes
        .into_iter()
        .map(|(base, row)| {
            let event_id = format!("{}@{}", row.id, row.version);
            Write::Apply { event_id, source: "test".into(), base, row, trace: Default::default() }
        })
        .collect();
    for chunk in writes.chunks(500) {
        for store in [cql as &dyn Orders, embedded as &dyn Orders] {
            let results = store.write(chunk.to_vec()).await.unwrap();
            assert!(results.iter().all(|(_, r)| *r == WriteResult::Done), "{} refused a write", store.backend());
        }
    }
}

fn listing_queries() -> Vec<(ListQuery, &'static str)> {
    let q = |sort: Sort, limit: usize| ListQuery { sort, limit, ..Default::default() };
    vec![
        (q(Sort::UpdatedDesc, 250), "newest first"),
        (ListQuery { status: Some(Status::Shipped), ..q(Sort::UpdatedDesc, 100) }, "shipped, newest first"),
        (ListQuery { priority: Some(Priority::Vip), ..q(Sort::UpdatedAsc, 300) }, "VIP, oldest first"),
        (
            ListQuery { status: Some(Status::Pending), priority: Some(Priority::Normal), ..q(Sort::UpdatedDesc, 77) },
            "pending NORMAL, newest first",
        ),
        (ListQuery { q: Some("c7".into()), ..q(Sort::UpdatedDesc, 50) }, "customer prefix"),
        (ListQuery { q: Some("L1".into()), status: Some(Status::Cancelled), ..q(Sort::UpdatedAsc, 40) }, "id prefix"),
        (ListQuery { shop: Some("south.myshopify.com".into()), ..q(Sort::UpdatedDesc, 200) }, "one shop"),
    ]
}

/// Pages through both stores and compares what they list, in order.
async fn assert_same_listing(cql: &CqlStore, embedded: &EmbeddedStore, q: &ListQuery, what: &str) {
    let (want, pages) = all_pages(embedded, q).await;
    let (got, _) = all_pages(cql, q).await;
    assert!(want.len() >= 50, "{what}: the check needs a real listing, the embedded store lists {}", want.len());
    assert!(pages > 1, "{what}: the check needs several pages");
    assert_eq!(got.len(), want.len(), "{what}: CQL lists {} orders, the embedded store {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{what}: item {i} differs");
    }
}

async fn all_pages(store: &dyn Orders, q: &ListQuery) -> (Vec<(String, u64, Status, i64)>, usize) {
    let (mut items, mut pages, mut cursor) = (Vec::new(), 0, None);
    loop {
        let page = store.list(ListQuery { cursor: cursor.clone(), ..q.clone() }).await.unwrap();
        assert!(page.items.len() <= q.limit, "a page holds at most its limit");
        items.extend(page.items.into_iter().map(|o| (o.id, o.version, o.status, micros(o.updated_at))));
        pages += 1;
        assert!(pages < 10_000, "paging does not end");
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return (items, pages),
        }
    }
}

async fn count(store: &dyn Orders, q: ListQuery) -> usize {
    all_pages(store, &q).await.0.len()
}

/// Dead letters live in one partition per day (#15), and letters from before the day
/// buckets (all in bucket 0) are still listed, first, as the oldest; a cursor from then
/// still pages on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_dead_letters_are_bucketed_by_day() {
    let Some(nodes) = service("CQL_NODES") else { return };
    let keyspace = unique("letters");
    let store = CqlStore::open(common::cql_config(&nodes, &keyspace)).await.unwrap();
    // A letter as a store before schema 011 wrote it.
    common::cqlsh(&format!(
        "INSERT INTO {keyspace}.dead_letters (bucket, seq, id, stage, error_type, reason, payload, recorded_at) \
         VALUES (0, minTimeuuid('2026-01-01 00:00+0000'), 'legacy', 'decode', 'malformed', 'old', '{{}}', 0); \
         INSERT INTO {keyspace}.dead_letter_ids (id, seq) VALUES ('legacy', minTimeuuid('2026-01-01 00:00+0000'));"
    ));
    let writes: Vec<Write> = (0..600)
        .map(|i| {
            let id = format!("dl-{i:04}");
            let letter = DeadLetter {
                id: id.clone(),
                order_id: Some(format!("o-{i}")),
                stage: "rules".into(),
                error_type: "rejected".into(),
                reason: "refused".into(),
                decided_by: Some("test".into()),
                payload: "{}".into(),
                recorded_at: Utc::now(),
                replayed_at: None,
            };
            Write::Record {
                event_id: id,
                source: "test".into(),
                order_id: format!("o-{i}"),
                outcome: Outcome::Rejected,
                reason: "refused".into(),
                decided_by: "test".into(),
                dead_letter: Some(letter),
                trace: Default::default(),
            }
        })
        .collect();
    for chunk in writes.chunks(100) {
        store.write(chunk.to_vec()).await.unwrap();
    }
    let today = Utc::now().timestamp().div_euclid(86_400);
    let buckets = common::cqlsh(&format!("SELECT DISTINCT bucket FROM {keyspace}.dead_letters;"));
    let mut buckets: Vec<i64> = buckets.lines().filter_map(|l| l.trim().parse().ok()).collect();
    buckets.sort();
    // Around midnight the letters may span two days.
    assert!(buckets.len() <= 3 && buckets[0] == 0, "bucket 0 and today's: {buckets:?}");
    assert!(buckets[1..].iter().all(|b| (today - 1..=today).contains(b)), "today's buckets: {buckets:?}");

    // The reopened store lists the legacy letter first, then all of today's, in order.
    let reopened = CqlStore::open(common::cql_config(&nodes, &keyspace)).await.unwrap();
    let (mut ids, mut cursor) = (Vec::new(), None);
    loop {
        let page = reopened.dead_letters(64, cursor).await.unwrap();
        ids.extend(page.items.into_iter().map(|l| l.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(ids.len(), 601, "every letter, once");
    assert_eq!(ids[0], "legacy");
    // A cursor a store before schema 011 gave (the bare timeuuid of the last letter read,
    // in the one partition there was) reads on from that letter, as today's would.
    let first = reopened.dead_letters(1, None).await.unwrap();
    let cursor = first.next_cursor.expect("more letters follow");
    let old_cursor = cursor.strip_prefix("0/").expect("the legacy letter's place is in bucket 0").to_string();
    let ids_from = |page: Page<DeadLetter>| page.items.into_iter().map(|l| l.id).collect::<Vec<_>>();
    let from_old = ids_from(reopened.dead_letters(64, Some(old_cursor)).await.unwrap());
    assert_eq!(from_old, ids[1..65], "an old cursor goes on after its letter");
    assert_eq!(from_old, ids_from(reopened.dead_letters(64, Some(cursor)).await.unwrap()));
    let legacy = reopened.dead_letter("legacy").await.unwrap().expect("found by id in bucket 0");
    assert_eq!(legacy.reason, "old");
    let fresh = reopened.dead_letter("dl-0599").await.unwrap().expect("found by id in its day");
    assert_eq!(fresh.order_id.as_deref(), Some("o-599"));
}
