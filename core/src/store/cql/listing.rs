//! Orders listed by time on CQL, from the `order_index_by_minute` table (schema 014):
//! entries partitioned by the minute of `updated_at`, status and priority, written after
//! each conditional batch, with markers naming the hours and the minutes of each hour
//! that hold entries. Every entry a listing reads is checked against its row,
//! so the index may lag or hold stale entries without a listing ever showing a wrong row.
//! A listing that finds a minute or an hour past empty forgets its marker, so spans whose
//! orders all moved on are walked once, not by every listing after.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use scylla::statement::prepared::PreparedStatement;

use super::{CONCURRENCY, CqlStore, StaticRow, backend, order_from};
use crate::domain::{Order, Priority, Status};
use crate::sqlite::{from_micros, micros};
use crate::store::{Base, ListQuery, Orders, Page, Sort, StoreError};

/// A marker of `order_index_by_minute_hours` names an hour of `updated_at`.
const HOUR_US: i64 = 3_600_000_000;
/// An index partition holds one minute: each move of an entry leaves a tombstone in
/// its old partition, and a read crosses them, so a partition gathers only a minute's.
const MINUTE_US: i64 = 60_000_000;
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
/// Entry partitions (a minute of one status and priority) one request reads at most,
/// for the same reason: a page that needs more ends before the next minute, with a cursor.
const MINUTE_READS_MAX: usize = 2_048;
/// How far a marker's delete is dated before the read that found its span empty, so
/// that clocks this far apart (the engine's, Cassandra's) cannot date it after a marker
/// written once that read began.
const CLOCK_SKEW_US: i64 = 1_000_000;
/// Tries of an index write that meets a brief outage.
const INDEX_ATTEMPTS: u32 = 3;
/// The data migration that fills the indexes (by time, schema 014; by shop, 012) with
/// the rows written before they existed. Renamed at each new index, so a store that ran
/// it before runs it once more.
const BACKFILL: &str = "014_order_index_by_minute_backfill";
/// Its name before 014: done means the shops' index (012) holds every row.
const SHOPS_BACKFILL: &str = "012_order_and_shop_index_backfill";

/// The statements of the index, prepared with the store's.
pub(super) struct ListingStatements {
    put: PreparedStatement,
    retire: PreparedStatement,
    note_minute: PreparedStatement,
    forget_minute: PreparedStatement,
    minutes_down: PreparedStatement,
    minutes_up: PreparedStatement,
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
        let partition = "minute = ? AND status = ? AND priority = ?";
        let hour = "hour = ? AND status = ? AND priority = ?";
        let index = format!("{ks}.order_index_by_minute");
        let minutes = format!("{ks}.order_index_minutes");
        let hours = format!("{ks}.order_index_by_minute_hours");
        Ok(ListingStatements {
            put: prepare(format!(
                "INSERT INTO {index} (minute, status, priority, updated_at, id) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            retire: prepare(format!("DELETE FROM {index} WHERE {partition} AND updated_at = ? AND id = ?")).await?,
            note_minute: prepare(format!("INSERT INTO {minutes} (hour, status, priority, minute) VALUES (?, ?, ?, ?)"))
                .await?,
            forget_minute: prepare(format!("DELETE FROM {minutes} USING TIMESTAMP ? WHERE {hour} AND minute = ?"))
                .await?,
            minutes_down: prepare(format!("SELECT minute FROM {minutes} WHERE {hour} AND minute <= ?")).await?,
            minutes_up: prepare(format!(
                "SELECT minute FROM {minutes} WHERE {hour} AND minute >= ? ORDER BY minute ASC"
            ))
            .await?,
            note_hour: prepare(format!("INSERT INTO {hours} (status, priority, hour) VALUES (?, ?, ?)")).await?,
            forget_hour: prepare(format!(
                "DELETE FROM {hours} USING TIMESTAMP ? WHERE status = ? AND priority = ? AND hour = ?"
            ))
            .await?,
            hours_down: prepare(format!(
                "SELECT hour FROM {hours} WHERE status = ? AND priority = ? AND hour <= ? LIMIT ?"
            ))
            .await?,
            hours_up: prepare(format!(
                "SELECT hour FROM {hours} WHERE status = ? AND priority = ? AND hour >= ? ORDER BY hour ASC LIMIT ?"
            ))
            .await?,
            page_down: prepare(format!(
                "SELECT updated_at, id FROM {index} WHERE {partition} AND (updated_at, id) < (?, ?) LIMIT ?"
            ))
            .await?,
            page_up: prepare(format!(
                "SELECT updated_at, id FROM {index} WHERE {partition} AND (updated_at, id) > (?, ?) \
                 ORDER BY updated_at ASC, id ASC LIMIT ?"
            ))
            .await?,
            migration_done: prepare(format!("SELECT done_at FROM {ks}.data_migrations WHERE name = ?")).await?,
            mark_migration: prepare(format!("INSERT INTO {ks}.data_migrations (name, done_at) VALUES (?, ?)")).await?,
        })
    }
}

/// A span of `updated_at` that a marker names: an hour (`order_index_by_minute_hours`)
/// or a minute (`order_index_minutes`, whose minutes are the entries' partitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexSpan {
    Hour,
    Minute,
}

impl IndexSpan {
    fn width(self) -> i64 {
        match self {
            IndexSpan::Hour => HOUR_US,
            IndexSpan::Minute => MINUTE_US,
        }
    }

    /// The span (hours or minutes since the epoch) that holds `updated_us`.
    fn of(self, updated_us: i64) -> i32 {
        updated_us.div_euclid(self.width()) as i32
    }

    /// A cursor just past the span `n`, whose entries are all read: the next page starts
    /// with the span after it, in the listing's direction.
    fn edge(self, n: i32, down: bool) -> String {
        // Down: every key below (start of span, ""); up: every key above (start of the
        // next span, ""), which takes in all of that next span, as no id is empty.
        let edge = if down { i64::from(n) * self.width() } else { (i64::from(n) + 1) * self.width() };
        super::super::encode_cursor(Some(edge), "")
    }

    /// Whether a read past `last` takes in all of the span `n`, in the listing's direction.
    fn covers(self, n: i32, last: Option<&(i64, String)>, down: bool) -> bool {
        let Some((at, id)) = last else { return true };
        let (start, end) = (i64::from(n) * self.width(), (i64::from(n) + 1) * self.width());
        // No id is empty, so (start, "") comes before every entry of the span.
        if down { *at >= end } else { (*at, id.as_str()) <= (start, "") }
    }
}

/// The partitions of one status and priority, as a listing's filters select them.
type Combo = (Status, Priority);

/// A page being read: what it holds, and where the reading stands.
struct PageSoFar<'q> {
    q: &'q ListQuery,
    down: bool,
    limit: usize,
    items: Vec<Order>,
    examined: usize,
    /// The last entry read; the next read starts past it.
    last: Option<(i64, String)>,
}

impl PageSoFar<'_> {
    /// The span to read from: the one holding the last entry, or the first one.
    fn start(&self, span: IndexSpan) -> i32 {
        let first = if self.down { i32::MAX } else { i32::MIN };
        self.last.as_ref().map_or(first, |(at, _)| span.of(*at))
    }

    /// Whether the page holds its limit, or its request examined as many entries as
    /// one may.
    fn full(&self) -> bool {
        self.items.len() == self.limit || self.examined >= EXAMINE_MAX
    }

    /// The page so far, stopped before the span `n` it has not read: the next request
    /// starts with that span, every span before it being read through.
    fn stop_before(self, span: IndexSpan, n: i32) -> Page<Order> {
        let edge = if self.down { n + 1 } else { n - 1 };
        Page { items: self.items, next_cursor: Some(span.edge(edge, self.down)) }
    }

    /// The page, with a cursor past its last entry.
    fn done(self) -> Page<Order> {
        let cursor = self.last.map(|(at, id)| super::super::encode_cursor(Some(at), &id));
        Page { items: self.items, next_cursor: cursor }
    }
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

    /// The entry, then its minute's marker, then its hour's: a marker written after what
    /// it names is dated after any read that missed that, so the fenced deletes of
    /// [`Self::forget_marker`] cannot remove it. A crash in between leaves the entry
    /// unlisted if its minute or hour has no other marker, until the order's redelivery or
    /// next write lists it again (as for a crash between the batch and the entry).
    async fn put_entry(&self, e: &Entry) -> Result<(), StoreError> {
        let (status, priority) = (e.status.as_str(), e.priority.as_str());
        let (minute, hour) = (IndexSpan::Minute.of(e.updated_us), IndexSpan::Hour.of(e.updated_us));
        let entry = (minute, status, priority, e.updated_us, &e.id);
        self.session.execute_unpaged(&self.listing.put, entry).await.map_err(backend)?;
        let marker = (hour, status, priority, minute);
        self.session.execute_unpaged(&self.listing.note_minute, marker).await.map_err(backend)?;
        self.session.execute_unpaged(&self.listing.note_hour, (status, priority, hour)).await.map_err(backend)?;
        Ok(())
    }

    /// Forgets the marker of the span holding `at` for this status and priority, which a
    /// read that began at `seen_empty_at` found without entries: listings stop walking a
    /// span whose orders all moved on. The delete is dated before that read (less the
    /// clock skew allowed), so a marker written since, by an entry the read missed,
    /// outlives it. Each forgotten span leaves a row tombstone in its markers' partition:
    /// at most 60 in a minutes' one; in the hours', the table's default
    /// `gc_grace_seconds` (10 days) bounds them to about 240.
    pub async fn forget_marker(
        &self,
        span: IndexSpan,
        status: Status,
        priority: Priority,
        at: DateTime<Utc>,
        seen_empty_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let dated = micros(seen_empty_at) - CLOCK_SKEW_US;
        let (s, p, at) = (status.as_str(), priority.as_str(), micros(at));
        let hour = IndexSpan::Hour.of(at);
        let done = match span {
            IndexSpan::Hour => self.session.execute_unpaged(&self.listing.forget_hour, (dated, s, p, hour)).await,
            IndexSpan::Minute => {
                let key = (dated, hour, s, p, IndexSpan::Minute.of(at));
                self.session.execute_unpaged(&self.listing.forget_minute, key).await
            }
        };
        done.map_err(backend)?;
        Ok(())
    }

    async fn retire_entry(&self, e: &Entry) -> Result<(), StoreError> {
        let minute = IndexSpan::Minute.of(e.updated_us);
        let key = (minute, e.status.as_str(), e.priority.as_str(), e.updated_us, &e.id);
        self.session.execute_unpaged(&self.listing.retire, key).await.map_err(backend)?;
        Ok(())
    }

    /// A page of orders by `updated_at` (either way), read from the index: the hours are
    /// walked in order, then each hour's minutes, and within a minute the partitions of
    /// each status and priority the filters allow are merged. Each entry is checked
    /// against its row.
    pub(super) async fn list_by_time(&self, q: &ListQuery) -> Result<Page<Order>, StoreError> {
        let down = match q.sort {
            Sort::UpdatedDesc => true,
            Sort::UpdatedAsc => false,
            _ => return Err(StoreError::Cursor("only the sorts by updated_at read the time index".into())),
        };
        let last: Option<(i64, String)> = match &q.cursor {
            None => None,
            Some(c) => match super::super::decode_cursor(c)? {
                (Some(at), id) => Some((at, id)),
                (None, _) => return Err(StoreError::Cursor("the cursor belongs to another sort order".into())),
            },
        };
        let combos: Vec<Combo> = Status::ALL
            .into_iter()
            .filter(|s| q.status.is_none_or(|f| f == *s))
            .flat_map(|s| Priority::ALL.into_iter().filter(|p| q.priority.is_none_or(|f| f == *p)).map(move |p| (s, p)))
            .collect();
        let mut page = PageSoFar { q, down, limit: q.limit.clamp(1, 1000), items: Vec::new(), examined: 0, last };
        let (hours, horizon) = self.hours(&combos, page.start(IndexSpan::Hour), down).await?;
        // A span past can be found empty by a read from its start (writes land in the
        // current one, and the one before while a batch straddles them).
        let now = micros(Utc::now());
        let (hour_now, minute_now) = (IndexSpan::Hour.of(now), IndexSpan::Minute.of(now));
        let mut minute_reads = 0;
        let mut walked = Vec::from_iter(hours.keys().copied());
        if down {
            walked.reverse();
        }
        for (n, hour) in walked.into_iter().enumerate() {
            if n == HOURS_WALKED_MAX {
                return Ok(page.stop_before(IndexSpan::Hour, hour));
            }
            let whole_hour = hour < hour_now - 1 && IndexSpan::Hour.covers(hour, page.last.as_ref(), down);
            let hour_read_at = Utc::now();
            let minutes = self.minutes(hour, &hours[&hour], page.start(IndexSpan::Minute), down).await?;
            // The partitions found holding an entry in this hour.
            let mut held = Vec::new();
            let mut in_hour = Vec::from_iter(minutes.keys().copied());
            if down {
                in_hour.reverse();
            }
            for minute in in_hour {
                let here = &minutes[&minute];
                if minute_reads > 0 && minute_reads + here.len() > MINUTE_READS_MAX {
                    return Ok(page.stop_before(IndexSpan::Minute, minute));
                }
                minute_reads += here.len();
                let past = minute < minute_now - 1;
                if self.read_minute(&mut page, minute, here, past, &mut held).await? {
                    return Ok(page.done());
                }
            }
            // Every minute of the hour was read through: a partition none of them held
            // an entry of is done with this hour.
            if whole_hour {
                let gone: Vec<Combo> = hours[&hour].iter().filter(|c| !held.contains(*c)).copied().collect();
                self.forget_markers(IndexSpan::Hour, hour, &gone, hour_read_at).await;
            }
        }
        // Hours past the horizon were not read: the cursor starts the next request there.
        Ok(Page { items: page.items, next_cursor: horizon.map(|hour| IndexSpan::Hour.edge(hour, down)) })
    }

    /// Reads the entries of one minute's partitions into the page, checking each against
    /// its row, until the minute is read through (`false`) or the page ends (`true`).
    /// Adds to `held` the partitions found holding entries; forgets the markers of those
    /// found empty, if the minute is `past` and read from its start.
    async fn read_minute(
        &self,
        page: &mut PageSoFar<'_>,
        minute: i32,
        here: &[Combo],
        past: bool,
        held: &mut Vec<Combo>,
    ) -> Result<bool, StoreError> {
        loop {
            let want = (page.limit - page.items.len() + SLACK).min(1000);
            let whole = past && IndexSpan::Minute.covers(minute, page.last.as_ref(), page.down);
            let read_at = Utc::now();
            let (mut entries, mut complete, empty) =
                self.entries(minute, here, page.last.as_ref(), want, page.down).await?;
            for c in here.iter().filter(|c| !empty.contains(c)) {
                if !held.contains(c) {
                    held.push(*c);
                }
            }
            if whole {
                self.forget_markers(IndexSpan::Minute, minute, &empty, read_at).await;
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
                page.examined += 1;
                page.last = Some((e.updated_us, e.id.clone()));
                match rows.get(&e.id) {
                    Some(row) if e.matches(row) => {
                        let shop_ok = page.q.shop.is_none() || row.shop == page.q.shop;
                        if shop_ok && page.q.found(row) {
                            page.items.push(row.clone());
                        }
                    }
                    // Dropped only when its row moved on (or went): never one a write may
                    // still be about to make true.
                    Some(row) if micros(row.updated_at) < e.updated_us => {}
                    _ => stale.push(e),
                }
                if page.full() {
                    break;
                }
            }
            self.drop_stale(stale).await;
            if page.full() {
                return Ok(true);
            }
            if complete {
                return Ok(false);
            }
        }
    }

    /// The hours that hold entries of these partitions, from `from` on, each with the
    /// partitions that hold it; and the horizon, the last hour known to be complete when
    /// a partition had more hours than one read takes.
    async fn hours(
        &self,
        combos: &[Combo],
        from: i32,
        down: bool,
    ) -> Result<(BTreeMap<i32, Vec<Combo>>, Option<i32>), StoreError> {
        let st = if down { &self.listing.hours_down } else { &self.listing.hours_up };
        let reads = combos.iter().map(|&(s, p)| ((s, p), (s.as_str(), p.as_str(), from, HOURS_READ)));
        let mut by_hour: BTreeMap<i32, Vec<Combo>> = Default::default();
        let mut horizon: Option<i32> = None;
        let found: Vec<(Combo, Vec<(i32,)>)> = self.read_each(st, reads).await?;
        for (combo, hours) in found {
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

    /// The minutes of `hour` that hold entries of these partitions, from `from` on, each
    /// with the partitions that hold it (at most 60 markers a partition, read at once).
    async fn minutes(
        &self,
        hour: i32,
        combos: &[Combo],
        from: i32,
        down: bool,
    ) -> Result<BTreeMap<i32, Vec<Combo>>, StoreError> {
        let st = if down { &self.listing.minutes_down } else { &self.listing.minutes_up };
        let reads = combos.iter().map(|&(s, p)| ((s, p), (hour, s.as_str(), p.as_str(), from)));
        let mut by_minute: BTreeMap<i32, Vec<Combo>> = Default::default();
        let found: Vec<(Combo, Vec<(i32,)>)> = self.read_each(st, reads).await?;
        for (combo, minutes) in found {
            for (minute,) in minutes {
                by_minute.entry(minute).or_default().push(combo);
            }
        }
        Ok(by_minute)
    }

    /// One read per partition, run at once; each answer's rows as `R`.
    async fn read_each<V, R>(
        &self,
        st: &PreparedStatement,
        reads: impl Iterator<Item = (Combo, V)>,
    ) -> Result<Vec<(Combo, Vec<R>)>, StoreError>
    where
        V: scylla::serialize::row::SerializeRow,
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let reads: Vec<_> = reads
            .map(|(combo, values)| {
                Box::pin(async move {
                    let rows = self
                        .session
                        .execute_unpaged(st, values)
                        .await
                        .map_err(backend)?
                        .into_rows_result()
                        .map_err(backend)?;
                    let found = rows.rows::<R>().map_err(backend)?.collect::<Result<Vec<_>, _>>();
                    Ok::<_, StoreError>((combo, found.map_err(backend)?))
                })
            })
            .collect();
        futures::stream::iter(reads).buffer_unordered(CONCURRENCY).collect::<Vec<_>>().await.into_iter().collect()
    }

    /// The next entries of one minute after `last`, merged over its partitions, in listing
    /// order; only as far as every partition was read (one that filled its read may hold
    /// more before the others' later entries). `true` when the minute has no more; and the
    /// partitions whose read found nothing.
    async fn entries(
        &self,
        minute: i32,
        combos: &[Combo],
        last: Option<&(i64, String)>,
        want: usize,
        down: bool,
    ) -> Result<(Vec<Entry>, bool, Vec<Combo>), StoreError> {
        let (st, edge) = if down { (&self.listing.page_down, i64::MAX) } else { (&self.listing.page_up, i64::MIN) };
        let (at, id) = last.map_or((edge, ""), |(at, id)| (*at, id.as_str()));
        let reads = combos.iter().map(|&(s, p)| ((s, p), (minute, s.as_str(), p.as_str(), at, id, want as i32)));
        let found: Vec<(Combo, Vec<(i64, String)>)> = self.read_each(st, reads).await?;
        let mut all = BTreeSet::new();
        // The nearest last entry of a partition that filled its read: past it, another
        // partition's entries may come before ones this read did not take.
        let mut bound: Option<(i64, String)> = None;
        let mut empty = Vec::new();
        for ((s, p), keys) in found {
            let entries: Vec<Entry> = keys.into_iter().map(|(at, id)| Entry::of(at, &id, s, p)).collect();
            if entries.is_empty() {
                empty.push((s, p));
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

    /// Forgets the markers of the span `n` for partitions a read found empty; a failure
    /// only leaves them for a later listing.
    async fn forget_markers(&self, span: IndexSpan, n: i32, empty: &[Combo], read_at: DateTime<Utc>) {
        let at = from_micros(i64::from(n) * span.width());
        let forgets: Vec<_> =
            empty.iter().map(|&(s, p)| Box::pin(self.forget_marker(span, s, p, at, read_at))).collect();
        let done: Vec<_> = futures::stream::iter(forgets).buffer_unordered(CONCURRENCY).collect().await;
        for r in done {
            if let Err(e) = r {
                tracing::debug!(error = %e, ?span, n, "an empty span's marker stays for a later listing");
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

    /// Whether the time index holds the rows written before it existed.
    pub(super) async fn backfilled(&self) -> Result<bool, StoreError> {
        self.migrated(BACKFILL).await
    }

    /// Whether the shops' index holds the rows written before it existed.
    pub(super) async fn shops_backfilled(&self) -> Result<bool, StoreError> {
        self.migrated(SHOPS_BACKFILL).await
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

    /// Lists every stored order in the indexes (one pass over the orders' partitions, the
    /// data migration of schemas 010, 012 and 014); safe to run again, or beside live writes, since
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
        self.mark_migrated(SHOPS_BACKFILL).await?;
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
    fn spans_split_at_their_edges_on_both_sides_of_the_epoch() {
        for span in [IndexSpan::Hour, IndexSpan::Minute] {
            let w = span.width();
            assert_eq!((span.of(0), span.of(w - 1), span.of(w), span.of(-1)), (0, 0, 1, -1));
        }
        // A minute's partition lies inside its hour's markers.
        let at = 5 * HOUR_US - 1;
        assert_eq!(IndexSpan::Minute.of(at) / 60, IndexSpan::Hour.of(at));
    }

    #[test]
    fn a_read_covers_a_span_only_from_past_its_edge() {
        let at = |us: i64, id: &str| Some((us, id.to_string()));
        for span in [IndexSpan::Hour, IndexSpan::Minute] {
            let (w, covers) =
                (span.width(), |n, last: Option<(i64, String)>, down| span.covers(n, last.as_ref(), down));
            assert!(covers(3, None, true) && covers(3, None, false));
            // Down: from the next span's edge (a cursor past the span) or beyond.
            assert!(covers(3, at(4 * w, ""), true));
            assert!(!covers(3, at(4 * w - 1, "z"), true));
            // Up: from the span's own edge, which no id reaches, or before.
            assert!(covers(3, at(3 * w, ""), false));
            assert!(covers(3, at(3 * w - 1, "z"), false));
            assert!(!covers(3, at(3 * w, "a"), false));
        }
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
