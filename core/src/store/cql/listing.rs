//! Orders listed by time on CQL, from the `order_index` table (schema 010): entries
//! partitioned by the hour of `updated_at`, status and priority, written after each
//! conditional batch. Every entry a listing reads is checked against its row, so the
//! index may lag or hold stale entries without a listing ever showing a wrong row.
//! A listing that finds an hour past empty forgets its marker, so hours whose orders
//! all moved on are walked once, not by every listing after.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use scylla::statement::prepared::PreparedStatement;

use super::{CONCURRENCY, CqlStore, StaticRow, backend, order_from};
use crate::domain::{Order, Priority, Status};
use crate::sqlite::{from_micros, micros};
use crate::store::{Base, ListQuery, Orders, Page, Sort, StoreError};

/// An index partition holds one hour of `updated_at`.
const HOUR_US: i64 = 3_600_000_000;
/// Hours a request reads per status and priority (three weeks of busy hours); past
/// them the page ends short, with a cursor to go on.
const HOURS_READ: i32 = 512;
/// Entries one request examines at most: a page that a search or a shop filter leaves
/// short ends there, and its cursor carries on.
const EXAMINE_MAX: usize = 10_000;
/// Entries read per index partition beyond what the page still needs, for stale ones.
const SLACK: usize = 16;
/// Hours one request walks at most: a filter whose orders are rare (or gone) may leave
/// many hours empty, and each costs a read; the page ends there, with a cursor.
const HOURS_WALKED_MAX: usize = 168;
/// How far a marker's delete is dated before the read that found its hour empty, so
/// that clocks this far apart (the engine's, Cassandra's) cannot date it after a marker
/// written once that read began.
const CLOCK_SKEW_US: i64 = 1_000_000;
/// Tries of an index write that meets a brief outage.
const INDEX_ATTEMPTS: u32 = 3;
/// The data migration that fills the indexes (by time, schema 010; by shop, 012) with
/// the rows written before they existed. Renamed when 012 came: a store that ran it for
/// 010 alone runs it once more.
const BACKFILL: &str = "012_order_and_shop_index_backfill";

/// The statements of the index, prepared with the store's.
pub(super) struct ListingStatements {
    put: PreparedStatement,
    retire: PreparedStatement,
    note_hour: PreparedStatement,
    forget_hour: PreparedStatement,
    hours_down: PreparedStatement,
    hours_up: PreparedStatement,
    page_down: PreparedStatement,
    page_up: PreparedStatement,
    migration_done: PreparedStatement,
    mark_migration: PreparedStatement,
}

impl ListingStatements {
    pub(super) async fn prepare(session: &scylla::client::session::Session, ks: &str) -> Result<Self, StoreError> {
        let prepare = |cql: String| async move {
            let mut p = session.prepare(cql).await.map_err(backend)?;
            p.set_consistency(scylla::statement::Consistency::Quorum);
            Ok::<_, StoreError>(p)
        };
        let partition = "hour = ? AND status = ? AND priority = ?";
        Ok(ListingStatements {
            put: prepare(format!(
                "INSERT INTO {ks}.order_index (hour, status, priority, updated_at, id) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            retire: prepare(format!("DELETE FROM {ks}.order_index WHERE {partition} AND updated_at = ? AND id = ?"))
                .await?,
            note_hour: prepare(format!("INSERT INTO {ks}.order_index_hours (status, priority, hour) VALUES (?, ?, ?)"))
                .await?,
            forget_hour: prepare(format!(
                "DELETE FROM {ks}.order_index_hours USING TIMESTAMP ? WHERE status = ? AND priority = ? AND hour = ?"
            ))
            .await?,
            hours_down: prepare(format!(
                "SELECT hour FROM {ks}.order_index_hours WHERE status = ? AND priority = ? AND hour <= ? LIMIT ?"
            ))
            .await?,
            hours_up: prepare(format!(
                "SELECT hour FROM {ks}.order_index_hours WHERE status = ? AND priority = ? AND hour >= ? \
                 ORDER BY hour ASC LIMIT ?"
            ))
            .await?,
            page_down: prepare(format!(
                "SELECT updated_at, id FROM {ks}.order_index WHERE {partition} AND (updated_at, id) < (?, ?) LIMIT ?"
            ))
            .await?,
            page_up: prepare(format!(
                "SELECT updated_at, id FROM {ks}.order_index WHERE {partition} AND (updated_at, id) > (?, ?) \
                 ORDER BY updated_at ASC, id ASC LIMIT ?"
            ))
            .await?,
            migration_done: prepare(format!("SELECT done_at FROM {ks}.data_migrations WHERE name = ?")).await?,
            mark_migration: prepare(format!("INSERT INTO {ks}.data_migrations (name, done_at) VALUES (?, ?)")).await?,
        })
    }
}

fn hour_of(updated_us: i64) -> i32 {
    updated_us.div_euclid(HOUR_US) as i32
}

/// A cursor just past `hour`, whose entries are all read: the next page starts with the
/// hour after it, in the listing's direction.
fn hour_edge(hour: i32, down: bool) -> String {
    // Down: every key below (start of hour, ""); up: every key above (start of the next
    // hour, ""), which takes in all of that next hour, as no id is empty.
    let edge = if down { i64::from(hour) * HOUR_US } else { (i64::from(hour) + 1) * HOUR_US };
    super::super::encode_cursor(Some(edge), "")
}

/// Whether a read past `last` takes in all of `hour`, in the listing's direction.
fn covers(hour: i32, last: Option<&(i64, String)>, down: bool) -> bool {
    let Some((at, id)) = last else { return true };
    let (start, end) = (i64::from(hour) * HOUR_US, (i64::from(hour) + 1) * HOUR_US);
    // No id is empty, so (start, "") comes before every entry of the hour.
    if down { *at >= end } else { (*at, id.as_str()) <= (start, "") }
}

/// Where an entry sits: its partition and its clustering key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    updated_us: i64,
    id: String,
    status: Status,
    priority: Priority,
}

/// In listing order: time, then id (the partition only breaks ties between stale entries).
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        fn key(e: &Entry) -> (i64, &str, &'static str, &'static str) {
            (e.updated_us, &e.id, e.status.as_str(), e.priority.as_str())
        }
        key(self).cmp(&key(other))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Entry {
    fn of(updated_us: i64, id: &str, status: Status, priority: Priority) -> Self {
        Entry { updated_us, id: id.to_string(), status, priority }
    }

    fn key(&self) -> (i64, &str) {
        (self.updated_us, &self.id)
    }

    /// The entry of a row that still holds it: same time, status and priority.
    fn matches(&self, row: &Order) -> bool {
        micros(row.updated_at) == self.updated_us && row.status == self.status && row.priority == self.priority
    }
}

impl CqlStore {
    /// Lists `row` under its shop (once it records one), and at its new place by time;
    /// then retires the entry of the version it replaced:
    /// in that order, so a failure midway leaves a stale entry (skipped by reads), never
    /// an order without one. A brief outage is ridden out; past that the error goes to
    /// the writer, whose retry finds the write applied and lists the row again.
    pub(super) async fn index(&self, row: &Order, base: Option<&Base>) -> Result<(), StoreError> {
        self.note_shop_order(row, base).await?;
        let now = Entry::of(micros(row.updated_at), &row.id, row.status, row.priority);
        let was = base.map(|b| Entry::of(micros(b.updated_at), &row.id, b.status, b.priority));
        let mut backoff = std::time::Duration::from_millis(20);
        for attempt in 1..=INDEX_ATTEMPTS {
            let done = match self.put_entry(&now).await {
                Ok(()) => match was.as_ref().filter(|was| **was != now) {
                    Some(was) => self.retire_entry(was).await,
                    None => Ok(()),
                },
                Err(e) => Err(e),
            };
            match done {
                Err(StoreError::Unavailable(e)) if attempt < INDEX_ATTEMPTS => {
                    tracing::debug!(error = %e, order = %row.id, "listing the order failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                other => return other,
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Takes a deleted row out of the listing.
    pub(super) async fn unlist(&self, row: &Order) -> Result<(), StoreError> {
        self.retire_entry(&Entry::of(micros(row.updated_at), &row.id, row.status, row.priority)).await
    }

    /// The entry, then its hour's marker: a marker written after the entry is dated after
    /// any read that missed the entry, so the fenced delete of [`Self::forget_empty_hour`]
    /// cannot remove it. A crash in between leaves the entry unlisted if its hour has no
    /// other marker, until the order's redelivery or next write lists it again (as for a
    /// crash between the batch and the entry).
    async fn put_entry(&self, e: &Entry) -> Result<(), StoreError> {
        let (status, priority, hour) = (e.status.as_str(), e.priority.as_str(), hour_of(e.updated_us));
        let entry = (hour, status, priority, e.updated_us, &e.id);
        self.session.execute_unpaged(&self.listing.put, entry).await.map_err(backend)?;
        self.session.execute_unpaged(&self.listing.note_hour, (status, priority, hour)).await.map_err(backend)?;
        Ok(())
    }

    /// Forgets the marker of the hour holding `at` for this status and priority, which a
    /// read that began at `seen_empty_at` found without entries: listings stop walking an
    /// hour whose orders all moved on. The delete is dated before that read (less the
    /// clock skew allowed), so a marker written since, by an entry the read missed,
    /// outlives it. Each forgotten hour leaves a row tombstone in the markers' partition,
    /// which the table's default `gc_grace_seconds` (10 days) bounds to about 240 hours.
    pub async fn forget_empty_hour(
        &self,
        status: Status,
        priority: Priority,
        at: DateTime<Utc>,
        seen_empty_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let dated = micros(seen_empty_at) - CLOCK_SKEW_US;
        let values = (dated, status.as_str(), priority.as_str(), hour_of(micros(at)));
        self.session.execute_unpaged(&self.listing.forget_hour, values).await.map_err(backend)?;
        Ok(())
    }

    async fn retire_entry(&self, e: &Entry) -> Result<(), StoreError> {
        let key = (hour_of(e.updated_us), e.status.as_str(), e.priority.as_str(), e.updated_us, &e.id);
        self.session.execute_unpaged(&self.listing.retire, key).await.map_err(backend)?;
        Ok(())
    }

    /// A page of orders by `updated_at` (either way), read from the index: the hours are
    /// walked in order, and within an hour the partitions of each status and priority the
    /// filters allow are merged. Each entry is checked against its row.
    pub(super) async fn list_by_time(&self, q: &ListQuery) -> Result<Page<Order>, StoreError> {
        let down = match q.sort {
            Sort::UpdatedDesc => true,
            Sort::UpdatedAsc => false,
            _ => return Err(StoreError::Cursor("only the sorts by updated_at read the time index".into())),
        };
        let limit = q.limit.clamp(1, 1000);
        let mut last: Option<(i64, String)> = match &q.cursor {
            None => None,
            Some(c) => match super::super::decode_cursor(c)? {
                (Some(at), id) => Some((at, id)),
                (None, _) => return Err(StoreError::Cursor("the cursor belongs to another sort order".into())),
            },
        };
        let combos: Vec<(Status, Priority)> = Status::ALL
            .into_iter()
            .filter(|s| q.status.is_none_or(|f| f == *s))
            .flat_map(|s| Priority::ALL.into_iter().filter(|p| q.priority.is_none_or(|f| f == *p)).map(move |p| (s, p)))
            .collect();
        let from_hour = last.as_ref().map_or(if down { i32::MAX } else { i32::MIN }, |(at, _)| hour_of(*at));
        let (hours, horizon) = self.hours(&combos, from_hour, down).await?;
        let current = hour_of(micros(Utc::now()));
        let mut items = Vec::new();
        let mut examined = 0;
        let mut walked = Vec::from_iter(hours.keys().copied());
        if down {
            walked.reverse();
        }
        for (n, hour) in walked.into_iter().enumerate() {
            if n == HOURS_WALKED_MAX {
                // The hours walked are done: the next request starts past them.
                let edge = if down { hour + 1 } else { hour - 1 };
                return Ok(Page { items, next_cursor: Some(hour_edge(edge, down)) });
            }
            let here: Vec<_> = hours[&hour].clone();
            loop {
                let want = (limit - items.len() + SLACK).min(1000);
                // An hour past can be found empty by a read from its start (writes land in
                // the current hour, and the one before while a batch straddles them).
                let whole = hour < current - 1 && covers(hour, last.as_ref(), down);
                let read_at = Utc::now();
                let (mut entries, mut complete, empty) = self.entries(hour, &here, last.as_ref(), want, down).await?;
                if whole {
                    self.forget_empty(hour, empty, read_at).await;
                }
                // Only as many rows as the page may use are read; the rest come next round.
                if entries.len() > want {
                    entries.truncate(want);
                    complete = false;
                }
                let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
                let rows = self.get_many(ids).await?;
                let mut stale = Vec::new();
                for e in entries {
                    examined += 1;
                    last = Some((e.updated_us, e.id.clone()));
                    match rows.get(&e.id) {
                        Some(row) if e.matches(row) => {
                            let shop_ok = q.shop.is_none() || row.shop == q.shop;
                            if shop_ok && q.found(row) {
                                items.push(row.clone());
                            }
                        }
                        // Dropped only when its row moved on (or went): never one a
                        // write may still be about to make true.
                        Some(row) if micros(row.updated_at) < e.updated_us => {}
                        _ => stale.push(e),
                    }
                    if items.len() == limit || examined >= EXAMINE_MAX {
                        break;
                    }
                }
                self.drop_stale(stale).await;
                if items.len() == limit || examined >= EXAMINE_MAX {
                    let cursor = last.map(|(at, id)| super::super::encode_cursor(Some(at), &id));
                    return Ok(Page { items, next_cursor: cursor });
                }
                if complete {
                    break;
                }
            }
        }
        // Hours past the horizon were not read: the cursor starts the next request there.
        Ok(Page { items, next_cursor: horizon.map(|hour| hour_edge(hour, down)) })
    }

    /// The hours that hold entries of these partitions, from `from` on, each with the
    /// partitions that hold it; and the horizon, the last hour known to be complete when
    /// a partition had more hours than one read takes.
    async fn hours(
        &self,
        combos: &[(Status, Priority)],
        from: i32,
        down: bool,
    ) -> Result<(BTreeMap<i32, Vec<(Status, Priority)>>, Option<i32>), StoreError> {
        let st = if down { &self.listing.hours_down } else { &self.listing.hours_up };
        let reads: Vec<_> = combos
            .iter()
            .map(|&(s, p)| {
                Box::pin(async move {
                    let rows = self
                        .session
                        .execute_unpaged(st, (s.as_str(), p.as_str(), from, HOURS_READ))
                        .await
                        .map_err(backend)?
                        .into_rows_result()
                        .map_err(backend)?;
                    let hours = rows.rows::<(i32,)>().map_err(backend)?.collect::<Result<Vec<_>, _>>();
                    Ok::<_, StoreError>(((s, p), hours.map_err(backend)?))
                })
            })
            .collect();
        let found: Vec<_> = futures::stream::iter(reads).buffer_unordered(CONCURRENCY).collect().await;
        let mut by_hour: BTreeMap<i32, Vec<(Status, Priority)>> = Default::default();
        let mut horizon: Option<i32> = None;
        for read in found {
            let (combo, hours) = read?;
            if hours.len() as i32 == HOURS_READ
                && let Some(&(edge,)) = hours.last()
            {
                horizon = Some(horizon.map_or(edge, |h| if down { h.max(edge) } else { h.min(edge) }));
            }
            for (hour,) in hours {
                by_hour.entry(hour).or_default().push(combo);
            }
        }
        if let Some(edge) = horizon {
            by_hour.retain(|&hour, _| if down { hour >= edge } else { hour <= edge });
        }
        Ok((by_hour, horizon))
    }

    /// The next entries of one hour after `last`, merged over its partitions, in listing
    /// order; only as far as every partition was read (one that filled its read may hold
    /// more before the others' later entries). `true` when the hour has no more; and the
    /// partitions whose read found nothing.
    async fn entries(
        &self,
        hour: i32,
        combos: &[(Status, Priority)],
        last: Option<&(i64, String)>,
        want: usize,
        down: bool,
    ) -> Result<(Vec<Entry>, bool, Vec<(Status, Priority)>), StoreError> {
        let (st, edge) = if down { (&self.listing.page_down, i64::MAX) } else { (&self.listing.page_up, i64::MIN) };
        let (at, id) = last.map_or((edge, ""), |(at, id)| (*at, id.as_str()));
        let reads: Vec<_> = combos
            .iter()
            .map(|&(s, p)| {
                Box::pin(async move {
                    let values = (hour, s.as_str(), p.as_str(), at, id, want as i32);
                    let rows = self
                        .session
                        .execute_unpaged(st, values)
                        .await
                        .map_err(backend)?
                        .into_rows_result()
                        .map_err(backend)?;
                    let keys = rows.rows::<(i64, String)>().map_err(backend)?.collect::<Result<Vec<_>, _>>();
                    let entries: Vec<Entry> =
                        keys.map_err(backend)?.into_iter().map(|(at, id)| Entry::of(at, &id, s, p)).collect();
                    Ok::<_, StoreError>(((s, p), entries))
                })
            })
            .collect();
        let found: Vec<_> = futures::stream::iter(reads).buffer_unordered(CONCURRENCY).collect().await;
        let mut all = BTreeSet::new();
        // The nearest last entry of a partition that filled its read: past it, another
        // partition's entries may come before ones this read did not take.
        let mut bound: Option<(i64, String)> = None;
        let mut empty = Vec::new();
        for read in found {
            let (combo, entries) = read?;
            if entries.is_empty() {
                empty.push(combo);
            }
            if entries.len() == want
                && let Some(end) = entries.last()
            {
                let end = (end.updated_us, end.id.clone());
                let nearer = bound.as_ref().is_none_or(|b| if down { end > *b } else { end < *b });
                if nearer {
                    bound = Some(end);
                }
            }
            all.extend(entries);
        }
        let mut merged: Vec<Entry> = all.into_iter().collect();
        if down {
            merged.reverse();
        }
        if let Some(b) = &bound {
            let bound = (b.0, b.1.as_str());
            merged.retain(|e| if down { e.key() >= bound } else { e.key() <= bound });
        }
        Ok((merged, bound.is_none(), empty))
    }

    /// Forgets the markers of an hour whose partitions a read found empty; a failure only
    /// leaves them for a later listing.
    async fn forget_empty(&self, hour: i32, empty: Vec<(Status, Priority)>, read_at: DateTime<Utc>) {
        let at = from_micros(i64::from(hour) * HOUR_US);
        let forgets: Vec<_> = empty.iter().map(|&(s, p)| Box::pin(self.forget_empty_hour(s, p, at, read_at))).collect();
        let done: Vec<_> = futures::stream::iter(forgets).buffer_unordered(CONCURRENCY).collect().await;
        for r in done {
            if let Err(e) = r {
                tracing::debug!(error = %e, hour, "an empty hour's marker stays for a later listing");
            }
        }
    }

    /// Deletes entries whose rows moved on; a failure only leaves them for a later read.
    async fn drop_stale(&self, stale: Vec<Entry>) {
        let drops: Vec<_> = stale.iter().map(|e| Box::pin(self.retire_entry(e))).collect();
        let done: Vec<_> = futures::stream::iter(drops).buffer_unordered(CONCURRENCY).collect().await;
        for r in done {
            if let Err(e) = r {
                tracing::debug!(error = %e, "a stale listing entry stays for a later read");
            }
        }
    }

    /// Whether the index holds the rows written before it existed.
    pub(super) async fn backfilled(&self) -> Result<bool, StoreError> {
        self.migrated(BACKFILL).await
    }

    /// Whether the data migration `name` is done.
    pub(super) async fn migrated(&self, name: &str) -> Result<bool, StoreError> {
        let rows = self.session.execute_unpaged(&self.listing.migration_done, (name,)).await.map_err(backend)?;
        Ok(rows.into_rows_result().map_err(backend)?.rows_num() > 0)
    }

    /// Records the data migration `name` as done.
    pub(super) async fn mark_migrated(&self, name: &str) -> Result<(), StoreError> {
        let values = (name, micros(Utc::now()));
        self.session.execute_unpaged(&self.listing.mark_migration, values).await.map_err(backend)?;
        Ok(())
    }

    /// Lists every stored order in the index (one pass over the orders' partitions, the
    /// one data migration of schema 010); safe to run again, or beside live writes, since
    /// a listing checks every entry. Returns how many orders it listed.
    pub async fn backfill_listing(&self) -> Result<u64, StoreError> {
        let cql = format!("SELECT DISTINCT {} FROM {}.orders", super::STATICS, self.keyspace);
        let rows = self.scan::<StaticRow>(cql).await?;
        let mut chunks = rows.chunks(256);
        let mut listed = 0u64;
        while let Some(chunk) = chunks.next().await {
            let mut orders = Vec::new();
            for row in chunk {
                orders.extend(order_from(row.map_err(backend)?)?);
            }
            let puts: Vec<_> = orders.iter().map(|o| Box::pin(self.index(o, None))).collect();
            let done: Vec<_> = futures::stream::iter(puts).buffer_unordered(CONCURRENCY).collect().await;
            for r in done {
                r?;
            }
            listed += orders.len() as u64;
            if listed % 100_000 < orders.len() as u64 {
                tracing::info!(listed, "backfilling the orders' time index");
            }
        }
        self.mark_migrated(BACKFILL).await?;
        Ok(listed)
    }

    /// Re-lists rows a write found already applied: a crash between an order's batch and
    /// its entry left it unlisted, and the redelivery lands here.
    pub(super) async fn relist(&self, order_id: &str) -> Result<(), StoreError> {
        self.relist_applied(order_id, 0, None).await
    }

    /// Lists the row as stored now (read at SERIAL). The entry of `base` is retired only
    /// if the stored row is at `version`, the one written over that base: an earlier
    /// delivery of the event may have applied instead, over another base.
    pub(super) async fn relist_applied(
        &self,
        order_id: &str,
        version: u64,
        base: Option<&Base>,
    ) -> Result<(), StoreError> {
        if let Some(row) = self.get_with(order_id, true).await? {
            let base = base.filter(|_| row.version == version);
            self.index(&row, base).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_split_at_the_hour_on_both_sides_of_the_epoch() {
        assert_eq!(hour_of(0), 0);
        assert_eq!(hour_of(HOUR_US - 1), 0);
        assert_eq!(hour_of(HOUR_US), 1);
        assert_eq!(hour_of(-1), -1);
    }

    #[test]
    fn a_read_covers_an_hour_only_from_past_its_edge() {
        let at = |us: i64, id: &str| Some((us, id.to_string()));
        assert!(covers(3, None, true) && covers(3, None, false));
        // Down: from the next hour's edge (a cursor past the hour) or beyond.
        assert!(covers(3, at(4 * HOUR_US, "").as_ref(), true));
        assert!(!covers(3, at(4 * HOUR_US - 1, "z").as_ref(), true));
        // Up: from the hour's own edge, which no id reaches, or before.
        assert!(covers(3, at(3 * HOUR_US, "").as_ref(), false));
        assert!(covers(3, at(3 * HOUR_US - 1, "z").as_ref(), false));
        assert!(!covers(3, at(3 * HOUR_US, "a").as_ref(), false));
    }

    #[test]
    fn entries_order_by_time_then_id() {
        let a = Entry::of(5, "b", Status::Pending, Priority::Vip);
        let b = Entry::of(5, "c", Status::Pending, Priority::Normal);
        let c = Entry::of(6, "a", Status::Shipped, Priority::Vip);
        let mut all = vec![c.clone(), b.clone(), a.clone()];
        all.sort();
        assert_eq!(all, vec![a, b, c]);
    }

    #[test]
    fn an_entry_matches_only_the_row_at_its_place() {
        let row = Order { updated_at: crate::sqlite::from_micros(7), ..crate::store::conformance::row("o", 1, "") };
        assert!(Entry::of(7, "o", row.status, row.priority).matches(&row));
        assert!(!Entry::of(6, "o", row.status, row.priority).matches(&row));
        assert!(!Entry::of(7, "o", Status::Cancelled, row.priority).matches(&row));
    }
}
