//! The embedded store on SQLite: one writer connection whose transactions are group
//! commits (concurrent writes share one), and a pool of readers. Cases for what-if runs
//! live in a database of their own beside it, so recording them never waits on the
//! order writer.

mod group_commit;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    ActionLog, ActionRecord, Audit, Case, CaseRetention, Cases, Claim, Compliance, ComplianceRecord, DeadLetter,
    DeadLetters, ErasureMatch, HistoryEntry, LetterTally, ListQuery, OrderCounts, Orders, Outcome, Page, ParkedEvent,
    Parking, Redact, ReplayClaim, RunKeys, RunRecord, Runs, ShopRecord, Sort, StoreError, StoreStats, WebhookDelivery,
    WebhookLedger, Write, WriteResult,
};
use crate::domain::{ChangedAt, Order, Priority, Status, Tier};
use crate::sqlite::{ReadPool, from_micros, micros, open};
use group_commit::{GroupCommit, WriteFailed};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    shopify_order_id INTEGER,
    customer TEXT NOT NULL,
    tier TEXT NOT NULL,
    priority TEXT NOT NULL,
    status TEXT NOT NULL,
    total_cents INTEGER NOT NULL,
    shipping_fee_cents INTEGER NOT NULL,
    currency TEXT NOT NULL,
    note TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    decided_by TEXT NOT NULL,
    source_updated_at INTEGER,
    changed_at TEXT,
    shop TEXT
) WITHOUT ROWID;
-- Each list filter has an index ending in the sort key, so cursor paging is a range scan.
CREATE INDEX IF NOT EXISTS orders_updated ON orders(updated_at, id);
CREATE INDEX IF NOT EXISTS orders_status ON orders(status, updated_at, id);
CREATE INDEX IF NOT EXISTS orders_priority ON orders(priority, updated_at, id);
-- No index on customer: random keys made every commit rewrite most of that index
-- (3.5x fewer rows/s in `orchestrator bench`). Customer search scans in sort order instead.

-- The history doubles as the idempotency ledger: one row per event id, whatever its outcome.
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    order_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    source TEXT NOT NULL,
    decided_by TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    -- The event's journey (JSON, see orchestrator_types::journey::Trace).
    trace TEXT
);
CREATE INDEX IF NOT EXISTS history_order ON history(order_id, seq);

CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    order_id TEXT,
    stage TEXT NOT NULL,
    error_type TEXT NOT NULL,
    reason TEXT NOT NULL,
    decided_by TEXT,
    payload TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    replayed_at INTEGER
);
CREATE INDEX IF NOT EXISTS dead_letters_order ON dead_letters(order_id);

-- A claim is 'pending' until its event is durable on the log, then 'done'.
CREATE TABLE IF NOT EXISTS webhook_claims (
    key TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'done',
    claimed_at INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);

-- Each shop's standing with the app (a ShopRecord as JSON); a shop never seen is active.
CREATE TABLE IF NOT EXISTS shops (domain TEXT PRIMARY KEY, body TEXT NOT NULL);

-- Operator and admin actions (the audit behind GET /audit), as JSON.
CREATE TABLE IF NOT EXISTS actions (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);

-- Events that came before their order's created event, in log order per order.
CREATE TABLE IF NOT EXISTS parked (
    order_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    priority TEXT NOT NULL,
    appended_at INTEGER NOT NULL,
    log_offset INTEGER NOT NULL,
    parked_at INTEGER NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (order_id, event_id)
);
CREATE INDEX IF NOT EXISTS parked_order ON parked(order_id, appended_at, log_offset);
CREATE INDEX IF NOT EXISTS parked_age ON parked(parked_at, appended_at);

-- Generated runs, as JSON: they are few and always read whole.
CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, started_at INTEGER NOT NULL, body TEXT NOT NULL);

-- Data subject requests (Shopify's compliance webhooks), as the engine's JSON.
CREATE TABLE IF NOT EXISTS compliance (id TEXT PRIMARY KEY, received_at INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_started ON runs(started_at, id);
";

/// The most event ids an ingest looks up on the calling task (`point_read`): a webhook
/// delivery has one; a large batch goes to a blocking thread.
const POINT_READ_MAX: usize = 16;

const ORDER_COLUMNS: &str = "id, shopify_order_id, customer, tier, priority, status, total_cents, \
    shipping_fee_cents, currency, note, version, created_at, updated_at, decided_by, source_updated_at, \
    changed_at, shop";

/// Decided events for what-if runs: the case as JSON (`{"event", "current"}`), keyed by
/// event id so a retried batch records once, and pruned by age and count.
const CASES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cases (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    recorded_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_at ON cases(recorded_at);
";

pub struct EmbeddedStore {
    writer: Arc<GroupCommit>,
    readers: Arc<ReadPool>,
    /// `<store>.cases.sqlite`: written off the pipeline's path, read by what-if runs.
    cases: Arc<Mutex<Connection>>,
}

impl EmbeddedStore {
    /// Write transactions committed so far: each is one fsync, shared by the writes of
    /// its group.
    pub fn commits(&self) -> u64 {
        self.writer.commits()
    }

    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let writer = open(path).map_err(backend)?;
        crate::sqlite::writer_cache(&writer).map_err(backend)?;
        writer.execute_batch(SCHEMA).map_err(backend)?;
        migrate(&writer).map_err(backend)?;
        let readers = ReadPool::open(path, 4).map_err(backend)?;
        let cases = open(&path.with_extension("cases.sqlite")).map_err(backend)?;
        // A case lost in a power cut costs a what-if run one sample, not an order: no
        // fsync per commit here.
        cases.execute_batch("PRAGMA synchronous = NORMAL;").map_err(backend)?;
        crate::sqlite::writer_cache(&cases).map_err(backend)?;
        cases.execute_batch(CASES_SCHEMA).map_err(backend)?;
        let cases = Arc::new(Mutex::new(cases));
        Ok(Self { writer: GroupCommit::new(writer), readers: Arc::new(readers), cases })
    }

    async fn with_cases<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.cases.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock().unwrap_or_else(|p| p.into_inner())).map_err(backend))
            .await
            .map_err(|e| StoreError::Backend(e.into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(f)).await.map_err(|e| StoreError::Backend(e.into()))?
    }

    /// `read` for a few indexed lookups on a request's path: done on the calling task
    /// when a connection is free, which spares the hand-off to a blocking thread and
    /// back (two context switches, more than the lookups cost); else as `read`.
    async fn point_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        match self.readers.try_with(f) {
            Ok(done) => done,
            Err(f) => self.read(f).await,
        }
    }
}

/// Columns added after a table was first created, for data dirs of earlier versions.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names: Vec<String> = stmt.query_map([], |r| r.get(1))?.collect::<rusqlite::Result<_>>()?;
        Ok(names.iter().any(|n| n == column))
    };
    if !has("orders", "source_updated_at")? {
        conn.execute_batch("ALTER TABLE orders ADD COLUMN source_updated_at INTEGER")?;
    }
    if !has("orders", "changed_at")? {
        conn.execute_batch("ALTER TABLE orders ADD COLUMN changed_at TEXT")?;
    }
    if !has("history", "trace")? {
        conn.execute_batch("ALTER TABLE history ADD COLUMN trace TEXT")?;
    }
    if !has("orders", "shop")? {
        conn.execute_batch("ALTER TABLE orders ADD COLUMN shop TEXT")?;
    }
    // After the column: a data dir of an earlier version gets it above first.
    conn.execute_batch("CREATE INDEX IF NOT EXISTS orders_shop ON orders(shop, updated_at, id)")?;
    // Claims of earlier versions were only kept once their event was on the log.
    if !has("webhook_claims", "state")? {
        conn.execute_batch(
            "ALTER TABLE webhook_claims ADD COLUMN state TEXT NOT NULL DEFAULT 'done';
             ALTER TABLE webhook_claims ADD COLUMN claimed_at INTEGER NOT NULL DEFAULT 0;",
        )?;
    }
    Ok(())
}

/// SQLite's busy, locked, I/O and full-disk failures pass; anything else is permanent.
fn backend(e: rusqlite::Error) -> StoreError {
    if crate::sqlite::is_transient(&e) { StoreError::Unavailable(e.into()) } else { StoreError::Backend(e.into()) }
}

fn order_from_row(r: &Row<'_>) -> rusqlite::Result<Order> {
    let text = |i: usize| -> rusqlite::Result<String> { r.get(i) };
    let bad = |i: usize, what: &str, v: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, format!("bad {what} {v:?}").into())
    };
    let tier = text(3)?;
    let priority = text(4)?;
    let status = text(5)?;
    Ok(Order {
        id: text(0)?,
        shopify_order_id: r.get(1)?,
        customer: text(2)?,
        tier: Tier::parse(&tier).ok_or_else(|| bad(3, "tier", tier.clone()))?,
        priority: Priority::parse(&priority).ok_or_else(|| bad(4, "priority", priority.clone()))?,
        status: Status::parse(&status).ok_or_else(|| bad(5, "status", status.clone()))?,
        total_cents: r.get(6)?,
        shipping_fee_cents: r.get(7)?,
        currency: text(8)?,
        note: text(9)?,
        version: r.get::<_, i64>(10)? as u64,
        created_at: from_micros(r.get(11)?),
        updated_at: from_micros(r.get(12)?),
        decided_by: text(13)?,
        source_updated_at: r.get::<_, Option<i64>>(14)?.map(from_micros),
        changed_at: ChangedAt::from_column(r.get::<_, Option<String>>(15)?.as_deref()),
        shop: r.get(16)?,
    })
}

fn get_order(conn: &Connection, id: &str) -> rusqlite::Result<Option<Order>> {
    conn.prepare_cached(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?1"))?
        .query_row([id], order_from_row)
        .optional()
}

/// The order an event id was recorded for, if it was.
fn recorded_for(conn: &Connection, event_id: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT order_id FROM history WHERE event_id = ?1")?
        .query_row([event_id], |r| r.get(0))
        .optional()
}

/// The history entry of `w`, with the order's version after it.
fn insert_history(conn: &Connection, w: &Write, version: u64) -> rusqlite::Result<()> {
    let (order_id, outcome, reason, source, decided_by, trace) = match w {
        Write::Apply { source, row, trace, .. } => (&row.id, Outcome::Applied, None, source, &row.decided_by, trace),
        Write::Record { source, order_id, outcome, reason, decided_by, trace, .. } => {
            (order_id, *outcome, Some(reason), source, decided_by, trace)
        }
    };
    // Kept only when there is one: an empty trace costs nothing.
    let trace = (!trace.is_empty()).then(|| serde_json::to_string(trace).expect("a trace serializes"));
    conn.prepare_cached(
        "INSERT INTO history (event_id, order_id, version, outcome, reason, source, decided_by, recorded_at, trace)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        w.event_id(),
        order_id,
        version as i64,
        outcome.as_str(),
        reason,
        source,
        decided_by,
        micros(Utc::now()),
        trace
    ])?;
    Ok(())
}

/// Inserts the row if absent (`expected: None`) or updates it if its version matches.
/// Returns whether it was written.
fn put_order(conn: &Connection, row: &Order, expected: Option<u64>) -> rusqlite::Result<bool> {
    let values = params![
        row.id,
        row.shopify_order_id,
        row.customer,
        row.tier.as_str(),
        row.priority.as_str(),
        row.status.as_str(),
        row.total_cents,
        row.shipping_fee_cents,
        row.currency,
        row.note,
        row.version as i64,
        micros(row.created_at),
        micros(row.updated_at),
        row.decided_by,
        row.source_updated_at.map(micros),
        row.changed_at.to_column(),
        row.shop,
    ];
    let changed = match expected {
        None => conn
            .prepare_cached(&format!(
                "INSERT INTO orders ({ORDER_COLUMNS})
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)
                 ON CONFLICT(id) DO NOTHING"
            ))?
            .execute(values)?,
        Some(expected) => {
            let mut stmt = conn.prepare_cached(
                "UPDATE orders SET shopify_order_id=?2, customer=?3, tier=?4, priority=?5, status=?6,
                 total_cents=?7, shipping_fee_cents=?8, currency=?9, note=?10, version=?11,
                 created_at=?12, updated_at=?13, decided_by=?14, source_updated_at=?15,
                 changed_at=?16, shop=?17 WHERE id=?1 AND version=?18",
            )?;
            let mut all: Vec<&dyn rusqlite::ToSql> = values.to_vec();
            let expected = expected as i64;
            all.push(&expected);
            stmt.execute(all.as_slice())?
        }
    };
    Ok(changed == 1)
}

fn apply_one(conn: &Connection, w: &Write) -> rusqlite::Result<WriteResult> {
    match recorded_for(conn, w.event_id())? {
        Some(order) if order == w.order_id() => return Ok(WriteResult::Duplicate),
        Some(order) => return Ok(WriteResult::IdTaken(order)),
        None => {}
    }
    match w {
        Write::Apply { base, row, .. } => {
            if !put_order(conn, row, base.map(|b| b.version))? {
                return Ok(WriteResult::Conflict(get_order(conn, &row.id)?.map(Box::new)));
            }
            insert_history(conn, w, row.version)?;
        }
        Write::Record { order_id, dead_letter, .. } => {
            let version: i64 = conn
                .prepare_cached("SELECT version FROM orders WHERE id = ?1")?
                .query_row([order_id], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            insert_history(conn, w, version as u64)?;
            if let Some(letter) = dead_letter {
                insert_dead_letter(conn, letter)?;
            }
        }
    }
    Ok(WriteResult::Done)
}

fn insert_dead_letter(conn: &Connection, d: &DeadLetter) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO dead_letters (id, order_id, stage, error_type, reason, decided_by, payload, recorded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(id) DO NOTHING",
    )?
    .execute(params![
        d.id,
        d.order_id,
        d.stage,
        d.error_type,
        d.reason,
        d.decided_by,
        d.payload,
        micros(d.recorded_at)
    ])?;
    Ok(())
}

/// Cursor: the last item's sort key and id, so the next page starts strictly after it.
fn encode_cursor(order: &Order, sort: Sort) -> String {
    match sort {
        Sort::UpdatedDesc | Sort::UpdatedAsc => super::encode_cursor(Some(micros(order.updated_at)), &order.id),
        Sort::IdAsc | Sort::IdDesc => super::encode_cursor(None, &order.id),
    }
}

fn list_orders(conn: &Connection, q: &ListQuery) -> Result<Page<Order>, StoreError> {
    let mut clauses: Vec<String> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    if let Some(s) = q.status {
        clauses.push("status = ?".into());
        args.push(Value::Text(s.as_str().into()));
    }
    if let Some(p) = q.priority {
        clauses.push("priority = ?".into());
        args.push(Value::Text(p.as_str().into()));
    }
    if let Some(shop) = &q.shop {
        clauses.push("shop = ?".into());
        args.push(Value::Text(shop.clone()));
    }
    if let Some(prefix) = q.q.as_deref().filter(|s| !s.is_empty()) {
        // Prefixes as ranges: the primary key serves the ids; the customer is scanned.
        let range = |p: &str, args: &mut Vec<Value>| {
            args.push(Value::Text(p.into()));
            args.push(Value::Text(format!("{p}\u{10FFFF}")));
        };
        let mut any = Vec::new();
        for id in q.id_prefixes() {
            any.push("(id >= ? AND id < ?)");
            range(&id, &mut args);
        }
        any.push("(customer >= ? AND customer < ?)");
        range(prefix, &mut args);
        clauses.push(format!("({})", any.join(" OR ")));
    }
    let (order_by, after) = match q.sort {
        Sort::UpdatedDesc => ("updated_at DESC, id DESC", "(updated_at, id) < (?, ?)"),
        Sort::UpdatedAsc => ("updated_at ASC, id ASC", "(updated_at, id) > (?, ?)"),
        Sort::IdAsc => ("id ASC", "id > ?"),
        Sort::IdDesc => ("id DESC", "id < ?"),
    };
    if let Some(cursor) = &q.cursor {
        let (key, id) = super::decode_cursor(cursor)?;
        match (q.sort, key) {
            (Sort::UpdatedDesc | Sort::UpdatedAsc, Some(key)) => {
                args.push(Value::Integer(key));
                args.push(Value::Text(id));
            }
            (Sort::IdAsc | Sort::IdDesc, None) => args.push(Value::Text(id)),
            _ => return Err(StoreError::Cursor("the cursor belongs to another sort order".into())),
        }
        clauses.push(after.into());
    }
    let filter = if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
    let limit = q.limit.clamp(1, 1000);
    args.push(Value::Integer(limit as i64 + 1));
    let sql = format!("SELECT {ORDER_COLUMNS} FROM orders {filter} ORDER BY {order_by} LIMIT ?");
    let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
    let mut items = stmt
        .query_map(rusqlite::params_from_iter(args), order_from_row)
        .map_err(backend)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|o| encode_cursor(o, q.sort))
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

fn run_from_row(r: &Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord { id: r.get(0)?, started_at: from_micros(r.get(1)?), body: r.get(2)? })
}

fn history_from_row(r: &Row<'_>) -> rusqlite::Result<HistoryEntry> {
    let outcome: String = r.get(3)?;
    Ok(HistoryEntry {
        order_id: r.get(0)?,
        version: r.get::<_, i64>(1)? as u64,
        event_id: r.get(2)?,
        outcome: Outcome::parse(&outcome).unwrap_or(Outcome::Rejected),
        reason: r.get(4)?,
        source: r.get(5)?,
        decided_by: r.get(6)?,
        recorded_at: from_micros(r.get(7)?),
        // A trace this version cannot read is left out rather than failing the history.
        trace: r.get::<_, Option<String>>(9)?.and_then(|t| serde_json::from_str(&t).ok()),
    })
}

fn dead_letter_from_row(r: &Row<'_>) -> rusqlite::Result<(i64, DeadLetter)> {
    Ok((
        r.get(0)?,
        DeadLetter {
            id: r.get(1)?,
            order_id: r.get(2)?,
            stage: r.get(3)?,
            error_type: r.get(4)?,
            reason: r.get(5)?,
            decided_by: r.get(6)?,
            payload: r.get(7)?,
            recorded_at: from_micros(r.get(8)?),
            replayed_at: r.get::<_, Option<i64>>(9)?.map(from_micros),
        },
    ))
}

const DEAD_LETTER_COLUMNS: &str =
    "seq, id, order_id, stage, error_type, reason, decided_by, payload, recorded_at, replayed_at";

#[async_trait]
impl Orders for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, id: &str) -> Result<Option<Order>, StoreError> {
        let id = id.to_string();
        self.read(move |c| get_order(c, &id).map_err(backend)).await
    }

    async fn get_many(&self, ids: Vec<String>) -> Result<HashMap<String, Order>, StoreError> {
        self.read(move |c| {
            let mut out = HashMap::with_capacity(ids.len());
            for id in ids {
                if let Some(o) = get_order(c, &id).map_err(backend)? {
                    out.insert(id, o);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<(Write, WriteResult)>, StoreError> {
        let results = self
            .write_tx(move |tx| {
                writes.iter().map(|w| apply_one(tx, w)).collect::<rusqlite::Result<Vec<_>>>().map(|r| (writes, r))
            })
            .await?;
        let (writes, results) = results;
        Ok(writes.into_iter().zip(results).collect())
    }

    async fn recorded_for(&self, event_ids: Vec<String>) -> Result<Option<HashMap<String, String>>, StoreError> {
        let few = event_ids.len() <= POINT_READ_MAX;
        let lookup = move |c: &Connection| {
            let mut out = HashMap::new();
            for id in event_ids {
                if let Some(order) = recorded_for(c, &id).map_err(backend)? {
                    out.insert(id, order);
                }
            }
            Ok(Some(out))
        };
        if few { self.point_read(lookup).await } else { self.read(lookup).await }
    }

    /// Paged by the history's sequence number, which is the order of the writes.
    async fn history(
        &self,
        order_id: &str,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<Page<HistoryEntry>, StoreError> {
        let after: i64 = match cursor {
            None => 0,
            Some(c) => c.parse().map_err(|_| StoreError::Cursor("not a history cursor this server issued".into()))?,
        };
        let (id, limit) = (order_id.to_string(), limit.clamp(1, 1000));
        let rows: Vec<(i64, HistoryEntry)> = self
            .read(move |c| {
                c.prepare_cached(
                    "SELECT order_id, version, event_id, outcome, reason, source, decided_by, recorded_at, seq, trace
                     FROM history WHERE order_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )
                .and_then(|mut s| {
                    s.query_map(params![id, after, limit as i64 + 1], |r| Ok((r.get(8)?, history_from_row(r)?)))?
                        .collect()
                })
                .map_err(backend)
            })
            .await?;
        let next_cursor = (rows.len() > limit).then(|| rows[limit - 1].0.to_string());
        Ok(Page { items: rows.into_iter().take(limit).map(|(_, h)| h).collect(), next_cursor })
    }

    async fn list(&self, query: ListQuery) -> Result<Page<Order>, StoreError> {
        self.read(move |c| list_orders(c, &query)).await
    }

    async fn counts(&self) -> Result<OrderCounts, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT status, priority, count(*) FROM orders GROUP BY status, priority")
                .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
                .map(|groups: Vec<(String, String, i64)>| OrderCounts::of(groups, true))
                .map_err(backend)
        })
        .await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.read(|c| {
            let count = |table: &str| -> rusqlite::Result<u64> {
                c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).map(|n| n as u64)
            };
            Ok(StoreStats {
                orders: count("orders").map_err(backend)?,
                history: count("history").map_err(backend)?,
                dead_letters: count("dead_letters").map_err(backend)?,
                parked: count("parked").map_err(backend)?,
            })
        })
        .await
    }
}

const PARKED_COLUMNS: &str = "order_id, event_id, priority, appended_at, log_offset, parked_at, payload";

fn parked_from_row(r: &Row<'_>) -> rusqlite::Result<ParkedEvent> {
    let priority: String = r.get(2)?;
    Ok(ParkedEvent {
        order_id: r.get(0)?,
        event_id: r.get(1)?,
        priority: Priority::parse(&priority).unwrap_or(Priority::Normal),
        appended_at_us: r.get(3)?,
        offset: r.get::<_, i64>(4)? as u64,
        parked_at: from_micros(r.get(5)?),
        payload: r.get(6)?,
    })
}

#[async_trait]
impl Parking for EmbeddedStore {
    async fn park(&self, events: Vec<ParkedEvent>) -> Result<(), StoreError> {
        self.write_tx(move |tx| {
            let mut insert = tx.prepare_cached(&format!(
                "INSERT OR IGNORE INTO parked ({PARKED_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            ))?;
            for e in &events {
                let (at, offset) = (micros(e.parked_at), e.offset as i64);
                let p = e.priority.label();
                insert.execute(params![e.order_id, e.event_id, p, e.appended_at_us, offset, at, e.payload])?;
            }
            Ok(())
        })
        .await
    }

    async fn parked(&self, order_ids: Vec<String>) -> Result<Vec<ParkedEvent>, StoreError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {PARKED_COLUMNS} FROM parked WHERE order_id = ?1 ORDER BY appended_at, log_offset"
                ))
                .map_err(backend)?;
            let mut out = Vec::new();
            for id in order_ids {
                let rows = stmt.query_map([id], parked_from_row).map_err(backend)?;
                out.extend(rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)?);
            }
            Ok(out)
        })
        .await
    }

    async fn parked_oldest(&self, limit: usize) -> Result<Vec<ParkedEvent>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {PARKED_COLUMNS} FROM parked ORDER BY parked_at, appended_at, log_offset LIMIT ?1"
            ))
            .and_then(|mut s| s.query_map([limit as i64], parked_from_row)?.collect())
            .map_err(backend)
        })
        .await
    }

    async fn unpark(&self, events: &[ParkedEvent]) -> Result<(), StoreError> {
        let keys: Vec<(String, String)> = events.iter().map(|e| (e.order_id.clone(), e.event_id.clone())).collect();
        self.write_tx(move |tx| {
            let mut delete = tx.prepare_cached("DELETE FROM parked WHERE order_id = ?1 AND event_id = ?2")?;
            for (order, event) in &keys {
                delete.execute([order, event])?;
            }
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl DeadLetters for EmbeddedStore {
    async fn dead_letters(&self, limit: usize, cursor: Option<String>) -> Result<Page<DeadLetter>, StoreError> {
        let after: i64 = match cursor {
            None => 0,
            Some(c) => {
                super::decode_cursor(&c)?.0.ok_or_else(|| StoreError::Cursor("bad dead-letter cursor".into()))?
            }
        };
        let limit = limit.clamp(1, 1000);
        self.read(move |c| {
            let rows: Vec<(i64, DeadLetter)> = c
                .prepare_cached(&format!(
                    "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ))
                .and_then(|mut s| s.query_map(params![after, limit as i64 + 1], dead_letter_from_row)?.collect())
                .map_err(backend)?;
            let more = rows.len() > limit;
            let items: Vec<(i64, DeadLetter)> = rows.into_iter().take(limit).collect();
            let next_cursor = more.then(|| URL_SAFE_NO_PAD.encode(format!("{}:", items.last().map_or(0, |r| r.0))));
            Ok(Page { items: items.into_iter().map(|r| r.1).collect(), next_cursor })
        })
        .await
    }

    async fn tally(&self) -> Result<LetterTally, StoreError> {
        self.read(|c| {
            c.query_row("SELECT count(*), min(recorded_at) FROM dead_letters", [], |r| {
                let oldest = r.get::<_, Option<i64>>(1)?.map(from_micros);
                Ok(LetterTally { held: r.get::<_, i64>(0)? as u64, oldest })
            })
            .map_err(backend)
        })
        .await
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!("SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = ?1"))
                .and_then(|mut s| s.query_row([&id], dead_letter_from_row).optional())
                .map(|r| r.map(|r| r.1))
                .map_err(backend)
        })
        .await
    }

    async fn purge_letters(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let ids = ids.to_vec();
        self.write_tx(move |tx| {
            let mut delete = tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
            let mut gone = Vec::new();
            for id in ids {
                if delete.execute([&id])? > 0 {
                    gone.push(id);
                }
            }
            Ok(gone)
        })
        .await
    }

    async fn claim_replay(&self, id: &str, undo: bool) -> Result<ReplayClaim, StoreError> {
        let id = id.to_string();
        self.with_writer(move |conn| {
            let stamp = if undo { None } else { Some(micros(Utc::now())) };
            let changed = conn
                .prepare_cached(if undo {
                    "UPDATE dead_letters SET replayed_at = ?2 WHERE id = ?1 AND replayed_at IS NOT NULL"
                } else {
                    "UPDATE dead_letters SET replayed_at = ?2 WHERE id = ?1 AND replayed_at IS NULL"
                })
                .and_then(|mut s| s.execute(params![id, stamp]))
                .map_err(backend)?;
            let letter = conn
                .prepare_cached(&format!("SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = ?1"))
                .and_then(|mut s| s.query_row([&id], dead_letter_from_row).optional())
                .map_err(backend)?
                .map(|r| r.1);
            Ok(match (letter, changed) {
                (None, _) => ReplayClaim::NotFound,
                (Some(l), 1) => ReplayClaim::Claimed(l),
                (Some(l), _) => ReplayClaim::AlreadyReplayed(l),
            })
        })
        .await
    }
}

#[async_trait]
impl Compliance for EmbeddedStore {
    async fn redact_dead_letters(&self, which: ErasureMatch, redact: Redact) -> Result<u64, StoreError> {
        const CHUNK: i64 = 1000;
        let which = Arc::new(which);
        let (mut after, mut changed) = (0i64, 0u64);
        loop {
            // Read in chunks on a reader, so the pipeline's writes go on in between.
            let which = which.clone();
            let (found, last) = self
                .read(move |c| {
                    let mut stmt = c
                        .prepare_cached(
                            "SELECT seq, order_id, payload FROM dead_letters WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                        )
                        .map_err(backend)?;
                    let rows = stmt
                        .query_map(params![after, CHUNK], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, String>(2)?))
                        })
                        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                        .map_err(backend)?;
                    let last = rows.last().map(|r| r.0);
                    let found: Vec<(i64, String)> = rows
                        .into_iter()
                        .filter(|(_, order, payload)| which.takes(order.as_deref(), payload))
                        .map(|(seq, _, payload)| (seq, payload))
                        .collect();
                    Ok((found, last))
                })
                .await?;
            let rewrites: Vec<(i64, String, String)> = found
                .into_iter()
                .filter_map(|(seq, payload)| {
                    let redacted = redact(&payload);
                    (redacted != payload).then_some((seq, payload, redacted))
                })
                .collect();
            if !rewrites.is_empty() {
                changed += self
                    .write_tx(move |tx| {
                        // Only if unchanged since the read: a replay's mark does not touch it.
                        let mut update =
                            tx.prepare_cached("UPDATE dead_letters SET payload = ?3 WHERE seq = ?1 AND payload = ?2")?;
                        let mut n = 0;
                        for (seq, before, after) in &rewrites {
                            n += update.execute(params![seq, before, after])? as u64;
                        }
                        Ok(n)
                    })
                    .await?;
            }
            match last {
                Some(seq) => after = seq,
                None => return Ok(changed),
            }
        }
    }

    async fn redact_parked(&self, order_ids: &[String], redact: Redact) -> Result<u64, StoreError> {
        let ids = order_ids.to_vec();
        self.write_tx(move |tx| {
            let mut select = tx.prepare_cached("SELECT event_id, payload FROM parked WHERE order_id = ?1")?;
            let mut update =
                tx.prepare_cached("UPDATE parked SET payload = ?3 WHERE order_id = ?1 AND event_id = ?2")?;
            let mut changed = 0;
            for id in &ids {
                let rows: Vec<(String, String)> =
                    select.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
                for (event_id, payload) in rows {
                    let redacted = redact(&payload);
                    if redacted != payload {
                        changed += update.execute(params![id, event_id, redacted])? as u64;
                    }
                }
            }
            Ok(changed)
        })
        .await
    }

    /// In chunks, each its own short hold of the cases connection, so the recorder's
    /// writes go on in between.
    async fn forget_cases(&self, which: ErasureMatch) -> Result<u64, StoreError> {
        const CHUNK: i64 = 5000;
        let which = Arc::new(which);
        let (mut after, mut gone) = (0i64, 0u64);
        loop {
            let which = which.clone();
            let (deleted, last) = self
                .with_cases(move |conn| {
                    let rows: Vec<(i64, String)> = conn
                        .prepare_cached("SELECT seq, body FROM cases WHERE seq > ?1 ORDER BY seq LIMIT ?2")?
                        .query_map(params![after, CHUNK], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<_>>()?;
                    let last = rows.last().map(|r| r.0);
                    let mut delete = conn.prepare_cached("DELETE FROM cases WHERE seq = ?1")?;
                    let mut deleted = 0;
                    for (seq, body) in rows {
                        if which.takes_case_body(&body) {
                            deleted += delete.execute([seq])? as u64;
                        }
                    }
                    Ok((deleted, last))
                })
                .await?;
            gone += deleted;
            match last {
                Some(seq) => after = seq,
                None => return Ok(gone),
            }
        }
    }

    async fn shop_orders(&self, shop: &str, limit: usize, cursor: Option<String>) -> Result<Page<String>, StoreError> {
        // By (updated_at, id), the `orders_shop` index's order.
        let (after_us, after_id) = match cursor {
            Some(c) => super::decode_cursor(&c).map(|(us, id)| (us.unwrap_or(i64::MIN), id))?,
            None => (i64::MIN, String::new()),
        };
        let (shop, limit) = (shop.to_string(), limit.clamp(1, 10_000) as i64);
        let found: Vec<(i64, String)> = self
            .read(move |c| {
                c.prepare_cached(
                    "SELECT updated_at, id FROM orders WHERE shop = ?1 AND (updated_at, id) > (?2, ?3) \
                     ORDER BY updated_at, id LIMIT ?4",
                )
                .and_then(|mut st| {
                    st.query_map(params![shop, after_us, after_id, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(backend)
            })
            .await?;
        let next_cursor =
            (found.len() as i64 == limit).then(|| found.last().map(|(us, id)| super::encode_cursor(Some(*us), id)));
        Ok(Page { items: found.into_iter().map(|(_, id)| id).collect(), next_cursor: next_cursor.flatten() })
    }

    async fn delete_shop_orders(&self, shop: &str, ids: &[String]) -> Result<u64, StoreError> {
        let (shop, ids) = (shop.to_string(), ids.to_vec());
        self.write_tx(move |tx| {
            let mut history = tx.prepare_cached(
                "DELETE FROM history WHERE order_id = ?1 AND EXISTS (SELECT 1 FROM orders WHERE id = ?1 AND shop = ?2)",
            )?;
            let mut row = tx.prepare_cached("DELETE FROM orders WHERE id = ?1 AND shop = ?2")?;
            let mut deleted = 0;
            for id in &ids {
                history.execute(params![id, shop])?;
                deleted += row.execute(params![id, shop])? as u64;
            }
            Ok(deleted)
        })
        .await
    }

    async fn save_request(&self, request: &ComplianceRecord) -> Result<(), StoreError> {
        let (id, at, body) = (request.id.clone(), micros(request.received_at), request.body.clone());
        self.write_tx(move |tx| {
            tx.prepare_cached("INSERT OR REPLACE INTO compliance (id, received_at, body) VALUES (?1, ?2, ?3)")?
                .execute(params![id, at, body])
                .map(drop)
        })
        .await
    }

    async fn request(&self, id: &str) -> Result<Option<ComplianceRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT id, received_at, body FROM compliance WHERE id = ?1")
                .and_then(|mut s| s.query_row([&id], compliance_from_row).optional())
                .map_err(backend)
        })
        .await
    }

    async fn requests(&self, limit: usize) -> Result<Vec<ComplianceRecord>, StoreError> {
        self.read(move |c| {
            c.prepare_cached("SELECT id, received_at, body FROM compliance ORDER BY received_at DESC, id DESC LIMIT ?1")
                .and_then(|mut s| s.query_map([limit as i64], compliance_from_row)?.collect())
                .map_err(backend)
        })
        .await
    }
}

/// The order a recorded case is about, read loosely (a case the current schema cannot
/// read whole is still found).
fn compliance_from_row(r: &Row<'_>) -> rusqlite::Result<ComplianceRecord> {
    Ok(ComplianceRecord { id: r.get(0)?, received_at: from_micros(r.get(1)?), body: r.get(2)? })
}

#[async_trait]
impl Cases for EmbeddedStore {
    async fn record_cases(&self, cases: Vec<Case>, _keep_for: std::time::Duration) -> Result<(), StoreError> {
        let rows = cases
            .iter()
            .map(|c| Ok((c.event.event_id.clone(), micros(c.recorded_at), serde_json::to_string(c)?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with_cases(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut insert =
                    tx.prepare_cached("INSERT OR IGNORE INTO cases (event_id, recorded_at, body) VALUES (?1, ?2, ?3)")?;
                for (event_id, at, body) in &rows {
                    insert.execute(params![event_id, at, body])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn cases_since(&self, since: chrono::DateTime<Utc>, limit: usize) -> Result<Vec<Case>, StoreError> {
        let since = micros(since);
        let rows: Vec<(i64, String)> = self
            .with_cases(move |conn| {
                conn.prepare_cached(
                    "SELECT recorded_at, body FROM cases WHERE recorded_at >= ?1 ORDER BY recorded_at, seq LIMIT ?2",
                )?
                .query_map(params![since, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
            })
            .await?;
        rows.into_iter()
            .map(|(at, body)| {
                let case: Case = serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(Case { recorded_at: from_micros(at), ..case })
            })
            .collect()
    }

    /// In chunks, each its own transaction, so the recorder's writes go on in between.
    async fn prune_cases(&self, retention: CaseRetention) -> Result<u64, StoreError> {
        const CHUNK: i64 = 10_000;
        let before = micros(Utc::now() - retention.keep_for);
        let keep = retention.max_cases.min(i64::MAX as u64) as i64;
        let mut gone = 0u64;
        loop {
            let deleted = self
                .with_cases(move |conn| {
                    // Sequence numbers only grow, so the newest `keep` are the highest ones.
                    conn.execute(
                        "DELETE FROM cases WHERE seq IN (SELECT seq FROM cases \
                         WHERE recorded_at < ?1 OR seq <= (SELECT MAX(seq) FROM cases) - ?2 LIMIT ?3)",
                        params![before, keep, CHUNK],
                    )
                })
                .await?;
            gone += deleted as u64;
            if (deleted as i64) < CHUNK {
                return Ok(gone);
            }
        }
    }
}

#[async_trait]
impl ActionLog for EmbeddedStore {
    async fn record_action(&self, action: ActionRecord) -> Result<(), StoreError> {
        let body = serde_json::to_string(&action).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with_writer(move |conn| {
            conn.execute("INSERT INTO actions (body) VALUES (?1)", [body]).map(|_| ()).map_err(backend)
        })
        .await
    }

    async fn actions(&self, limit: usize, cursor: Option<String>) -> Result<Page<ActionRecord>, StoreError> {
        let before = match cursor {
            None => i64::MAX,
            Some(c) => c.parse().map_err(|_| StoreError::Cursor("bad audit cursor".into()))?,
        };
        self.json_page("SELECT seq, body FROM actions WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2", before, limit).await
    }
}

#[async_trait]
impl WebhookLedger for EmbeddedStore {
    async fn claim_delivery(
        &self,
        keys: &[String],
        ttl: std::time::Duration,
        lease: std::time::Duration,
    ) -> Result<Claim, StoreError> {
        let keys = keys.to_vec();
        // One transaction: the keys are all taken or none is, so two copies of a delivery
        // never each hold one of them.
        self.write_tx(move |tx| {
            let now = micros(Utc::now());
            let mut read =
                tx.prepare_cached("SELECT state, claimed_at, expires_at FROM webhook_claims WHERE key = ?1")?;
            let mut answer = Claim::Claimed;
            for key in &keys {
                let held: Option<(String, i64, i64)> =
                    read.query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional()?;
                match held {
                    Some((state, _, expires)) if expires >= now && state == "done" => return Ok(Claim::Done),
                    Some((_, claimed_at, expires)) if expires >= now && claimed_at + lease.as_micros() as i64 > now => {
                        answer = Claim::InFlight;
                    }
                    // Absent, expired, or left unconfirmed past its lease: ours to take.
                    _ => {}
                }
            }
            if answer != Claim::Claimed {
                return Ok(answer);
            }
            let mut claim = tx.prepare_cached(
                "INSERT INTO webhook_claims (key, expires_at, state, claimed_at) VALUES (?1, ?2, 'pending', ?3)
                 ON CONFLICT(key) DO UPDATE SET expires_at = excluded.expires_at, state = 'pending',
                 claimed_at = excluded.claimed_at",
            )?;
            for key in &keys {
                claim.execute(params![key, now + ttl.as_micros() as i64, now])?;
            }
            Ok(Claim::Claimed)
        })
        .await
    }

    async fn confirm_delivery(&self, keys: &[String], ttl: std::time::Duration) -> Result<(), StoreError> {
        let keys = keys.to_vec();
        self.write_tx(move |tx| {
            let now = micros(Utc::now());
            let mut confirm = tx.prepare_cached(
                "INSERT INTO webhook_claims (key, expires_at, state, claimed_at) VALUES (?1, ?2, 'done', ?3)
                 ON CONFLICT(key) DO UPDATE SET expires_at = excluded.expires_at, state = 'done'",
            )?;
            for key in &keys {
                confirm.execute(params![key, now + ttl.as_micros() as i64, now])?;
            }
            Ok(())
        })
        .await
    }

    async fn release_delivery(&self, keys: &[String]) -> Result<(), StoreError> {
        let keys = keys.to_vec();
        self.write_tx(move |tx| {
            let mut release = tx.prepare_cached("DELETE FROM webhook_claims WHERE key = ?1 AND state = 'pending'")?;
            for key in &keys {
                release.execute([key])?;
            }
            Ok(())
        })
        .await
    }

    async fn record_delivery(&self, delivery: WebhookDelivery) -> Result<(), StoreError> {
        let body = serde_json::to_string(&delivery).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.write_tx(move |conn| {
            conn.prepare_cached("INSERT INTO webhook_deliveries (body) VALUES (?1)")?.execute([body]).map(|_| ())
        })
        .await
    }

    async fn deliveries(&self, limit: usize, cursor: Option<String>) -> Result<Page<WebhookDelivery>, StoreError> {
        let after = match cursor {
            None => 0,
            Some(c) => c.parse().map_err(|_| StoreError::Cursor("bad deliveries cursor".into()))?,
        };
        let sql = "SELECT seq, body FROM webhook_deliveries WHERE seq > ?1 ORDER BY seq LIMIT ?2";
        self.json_page(sql, after, limit).await
    }

    async fn prune_deliveries(&self, before: chrono::DateTime<Utc>) -> Result<u64, StoreError> {
        let before = before.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        // Records are in time order by seq: old ones go from the front, a batch per turn
        // of the writer, so pipeline writes wait at most one batch.
        let mut gone = 0u64;
        loop {
            let before = before.clone();
            let n = self
                .with_writer(move |conn| {
                    conn.execute(
                        "DELETE FROM webhook_deliveries WHERE seq IN (SELECT seq FROM webhook_deliveries \
                         WHERE julianday(json_extract(body, '$.received_at')) < julianday(?1) ORDER BY seq LIMIT 1000)",
                        [&before],
                    )
                    .map_err(backend)
                })
                .await?;
            gone += n as u64;
            if n < 1000 {
                break;
            }
        }
        let now = micros(Utc::now());
        let claims = self
            .with_writer(move |conn| {
                conn.execute("DELETE FROM webhook_claims WHERE expires_at < ?1", [now]).map_err(backend)
            })
            .await?;
        Ok(gone + claims as u64)
    }

    async fn shop(&self, domain: &str) -> Result<Option<ShopRecord>, StoreError> {
        let domain = domain.to_string();
        let body: Option<String> = self
            .point_read(move |c| {
                c.prepare_cached("SELECT body FROM shops WHERE domain = ?1")
                    .and_then(|mut read| read.query_row([domain], |r| r.get(0)).optional())
                    .map_err(backend)
            })
            .await?;
        body.map(|b| serde_json::from_str(&b).map_err(|e| StoreError::Backend(e.into()))).transpose()
    }

    async fn set_shop(&self, shop: &ShopRecord) -> Result<(), StoreError> {
        let (domain, body) = (shop.domain.clone(), serde_json::to_string(shop).expect("a shop serializes"));
        self.with_writer(move |conn| {
            conn.execute("INSERT OR REPLACE INTO shops (domain, body) VALUES (?1, ?2)", [domain, body])
                .map(|_| ())
                .map_err(backend)
        })
        .await
    }
}

#[async_trait]
impl Runs for EmbeddedStore {
    async fn audit(&self, run: &RunKeys) -> Result<Audit, StoreError> {
        let ((from, to), chars) = (run.range(), run.id_chars() as i64);
        self.read(move |c| {
            let (orders, not_first_version) = c
                .query_row(
                    "SELECT count(*), coalesce(sum(version != 1), 0) FROM orders \
                     WHERE id >= ?1 AND id < ?2 AND length(id) = ?3",
                    params![from, to, chars],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
                )
                .map_err(backend)?;
            let (applied, other, first, last) = c
                .query_row(
                    "SELECT coalesce(sum(outcome = 'applied'), 0), coalesce(sum(outcome != 'applied'), 0), \
                     min(CASE WHEN outcome = 'applied' THEN recorded_at END), \
                     max(CASE WHEN outcome = 'applied' THEN recorded_at END) \
                     FROM history WHERE order_id >= ?1 AND order_id < ?2 AND length(order_id) = ?3",
                    params![from, to, chars],
                    |r| {
                        let count = |i| r.get::<_, i64>(i).map(|n| n as u64);
                        Ok((count(0)?, count(1)?, r.get::<_, Option<i64>>(2)?, r.get::<_, Option<i64>>(3)?))
                    },
                )
                .map_err(backend)?;
            let (first_applied, last_applied) = (first.map(from_micros), last.map(from_micros));
            Ok(Audit { orders, not_first_version, applied, other, first_applied, last_applied })
        })
        .await
    }

    async fn delete_orders(&self, run: &RunKeys, status: Status) -> Result<u64, StoreError> {
        let ((from, to), chars) = (run.range(), run.id_chars() as i64);
        self.write_tx(move |tx| {
            tx.execute(
                "DELETE FROM history WHERE order_id IN \
                 (SELECT id FROM orders WHERE id >= ?1 AND id < ?2 AND length(id) = ?4 AND status = ?3)",
                params![from, to, status.as_str(), chars],
            )?;
            let n = tx.execute(
                "DELETE FROM orders WHERE id >= ?1 AND id < ?2 AND length(id) = ?4 AND status = ?3",
                params![from, to, status.as_str(), chars],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn reset(&self) -> Result<(), StoreError> {
        self.write_tx(|tx| {
            tx.execute_batch(
                "DELETE FROM orders; DELETE FROM history; DELETE FROM parked; DELETE FROM dead_letters; \
                 DELETE FROM runs;",
            )
        })
        .await?;
        self.with_cases(|conn| conn.execute_batch("DELETE FROM cases;")).await
    }

    async fn save_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let (id, started, body) = (run.id.clone(), micros(run.started_at), run.body.clone());
        self.write_tx(move |tx| {
            tx.execute(
                "INSERT INTO runs (id, started_at, body) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                params![id, started, body],
            )
            .map(|_| ())
        })
        .await
    }

    async fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            c.query_row("SELECT id, started_at, body FROM runs WHERE id = ?1", params![id], run_from_row)
                .optional()
                .map_err(backend)
        })
        .await
    }

    async fn runs(&self, limit: usize, cursor: Option<String>) -> Result<Page<RunRecord>, StoreError> {
        let offset: usize = match cursor {
            Some(c) => c.parse().map_err(|_| StoreError::Cursor(format!("{c:?} is not a runs cursor")))?,
            None => 0,
        };
        self.read(move |c| {
            let mut stmt = c
                .prepare("SELECT id, started_at, body FROM runs ORDER BY started_at DESC, id DESC LIMIT ?1 OFFSET ?2")
                .map_err(backend)?;
            let mut items: Vec<RunRecord> = stmt
                .query_map(params![limit as i64 + 1, offset as i64], run_from_row)
                .map_err(backend)?
                .collect::<rusqlite::Result<_>>()
                .map_err(backend)?;
            let next_cursor = (items.len() > limit).then(|| (offset + limit).to_string());
            items.truncate(limit);
            Ok(Page { items, next_cursor })
        })
        .await
    }
}

impl EmbeddedStore {
    /// Runs `f` on the one writer connection, off the async runtime.
    /// One page of a table of JSON bodies keyed by `seq`: `sql` takes the cursor's seq
    /// and a row count, and its order decides the direction.
    async fn json_page<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        sql: &'static str,
        bound: i64,
        limit: usize,
    ) -> Result<Page<T>, StoreError> {
        let limit = limit.clamp(1, 1000);
        self.read(move |c| {
            let rows: Vec<(i64, String)> = c
                .prepare_cached(sql)
                .and_then(|mut s| {
                    s.query_map(params![bound, limit as i64 + 1], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
                })
                .map_err(backend)?;
            let next_cursor = (rows.len() > limit).then(|| rows[limit - 1].0.to_string());
            let items = rows
                .into_iter()
                .take(limit)
                .map(|(_, b)| serde_json::from_str(&b).map_err(|e| StoreError::Corrupt(e.to_string())))
                .collect::<Result<_, _>>()?;
            Ok(Page { items, next_cursor })
        })
        .await
    }

    async fn with_writer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || f(&mut writer.lock())).await.map_err(|e| StoreError::Backend(e.into()))?
    }

    /// Runs `f` atomically in the writer's next group commit; answers once it is durable.
    async fn write_tx<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.writer.write(f).await.map_err(|e| match e {
            WriteFailed::Own(e) => backend(e),
            WriteFailed::Group(e) => e.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.sqlite")).unwrap();
        super::super::conformance::check(&store, "conf").await;
    }

    /// The count bound keeps the newest cases; the time bound is in the conformance check.
    #[tokio::test]
    async fn cases_beyond_the_count_bound_go_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.sqlite")).unwrap();
        let event = |i: u64| {
            let mut e = crate::generator::created("cap", i, "test", &Default::default(), &mut rand::rng());
            e.event_id = format!("cap-{i}");
            Case { event: e, current: None, recorded_at: Utc::now() }
        };
        let keep = std::time::Duration::from_secs(3_600);
        store.record_cases((0..5).map(event).collect(), keep).await.unwrap();
        let retention = CaseRetention { keep_for: keep, max_cases: 2 };
        assert_eq!(store.prune_cases(retention).await.unwrap(), 3);
        let left: Vec<String> = store
            .cases_since(Utc::now() - chrono::Duration::hours(1), 10)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.event.event_id)
            .collect();
        assert_eq!(left, ["cap-3", "cap-4"]);
    }

    /// Expired claims were deleted only when their key came back: pruning takes them all.
    #[tokio::test]
    async fn pruning_takes_expired_claims_and_keeps_live_ones() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.sqlite")).unwrap();
        let (lease, short, long) = (Duration::from_secs(60), Duration::from_millis(1), Duration::from_secs(3_600));
        for i in 0..3 {
            let gone = [format!("gone-{i}")];
            store.claim_delivery(&gone, short, lease).await.unwrap();
            store.confirm_delivery(&gone, short).await.unwrap();
        }
        store.claim_delivery(&["kept".to_string()], long, lease).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.prune_deliveries(Utc::now() - super::super::DELIVERY_RETENTION).await.unwrap(), 3);
        let left: Vec<String> = store
            .read(|c| {
                let mut stmt = c.prepare("SELECT key FROM webhook_claims").map_err(backend)?;
                let keys = stmt.query_map([], |r| r.get(0)).map_err(backend)?;
                keys.collect::<rusqlite::Result<_>>().map_err(backend)
            })
            .await
            .unwrap();
        assert_eq!(left, ["kept"]);
    }

    /// Concurrent claims share commits (one fsync each group), each answer is its own,
    /// and a claim whose statements fail takes back only its own changes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_share_commits_and_a_failing_one_leaves_the_rest() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let store = EmbeddedStore::open(&path).unwrap();
        store
            .writer
            .lock()
            .execute_batch(
                "CREATE TRIGGER refuse_bad BEFORE INSERT ON webhook_claims WHEN NEW.key = 'bad'
                 BEGIN SELECT RAISE(ABORT, 'injected: refuse_bad'); END;",
            )
            .unwrap();
        let (ttl, lease) = (Duration::from_secs(3_600), Duration::from_secs(60));
        let before = store.commits();
        // 100 keys, each claimed twice, and the refused one among them.
        let keys: Vec<String> = (0..200).map(|i| format!("k-{}", i % 100)).chain(["bad".to_string()]).collect();
        let answers =
            futures::future::join_all(keys.iter().map(|k| store.claim_delivery(std::slice::from_ref(k), ttl, lease)))
                .await;
        let commits = store.commits() - before;
        let (refused, answers) = answers.split_last().unwrap();
        let refused = refused.as_ref().unwrap_err().to_string();
        assert!(refused.contains("injected: refuse_bad"), "{refused}");
        for k in 0..100 {
            let mine: Vec<&Claim> = answers.iter().skip(k).step_by(100).map(|a| a.as_ref().unwrap()).collect();
            assert_eq!(mine, [&Claim::Claimed, &Claim::InFlight], "k-{k}: exactly one of two claims holds");
        }
        assert!(commits < 50, "201 concurrent claims took {commits} commits");
        // What was answered is durable: a reopened store holds every claim, and not the
        // refused one.
        drop(store);
        let store = EmbeddedStore::open(&path).unwrap();
        let held: i64 = store
            .read(|c| c.query_row("SELECT COUNT(*) FROM webhook_claims", [], |r| r.get(0)).map_err(backend))
            .await
            .unwrap();
        assert_eq!(held, 100);
    }

    #[tokio::test]
    async fn rows_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            super::super::conformance::check(&store, "first").await;
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.get("first-a").await.unwrap().unwrap().version, 2);
        assert_eq!(store.history("first-a", 100, None).await.unwrap().items.len(), 3);
    }
}
