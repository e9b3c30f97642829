//! The CQL store for ScyllaDB (and Apache Cassandra 5 in tests): lightweight
//! transactions on one partition per order, so a row's compare-and-set and its event's
//! ledger entry commit together or not at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::ExecutionError;
use scylla::frame::types::{Consistency, SerialConsistency};
use scylla::response::{PagingState, PagingStateResponse};
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimeuuid, MaybeUnset, Row};

mod counts;
mod listing;
pub use listing::IndexSpan;
mod shops;

use super::{
    ActionLog, ActionRecord, Audit, Case, CaseRetention, Cases, Claim, Compliance, ComplianceRecord, DeadLetter,
    DeadLetters, ErasureMatch, HistoryEntry, LetterTally, ListQuery, OrderCounts, Orders, Outcome, Page, ParkedEvent,
    Parking, Redact, ReplayClaim, RunKeys, RunRecord, Runs, ShopRecord, Sort, StoreError, StoreStats, Trace,
    WebhookDelivery, WebhookLedger, Write, WriteResult,
};
use crate::domain::{ChangedAt, Order, Priority, Status, Tier};
use crate::sqlite::{from_micros, micros};

/// The schema files in the order they apply; each statement is idempotent (IF NOT EXISTS).
const MIGRATIONS: [&str; 14] = [
    include_str!("../../../../schemas/cql/001_init.cql"),
    include_str!("../../../../schemas/cql/002_parking.cql"),
    include_str!("../../../../schemas/cql/003_delivery_claims.cql"),
    include_str!("../../../../schemas/cql/004_actions.cql"),
    include_str!("../../../../schemas/cql/005_delivery_days.cql"),
    include_str!("../../../../schemas/cql/006_routes.cql"),
    include_str!("../../../../schemas/cql/007_cases.cql"),
    include_str!("../../../../schemas/cql/008_shops.cql"),
    include_str!("../../../../schemas/cql/009_compliance.cql"),
    include_str!("../../../../schemas/cql/010_order_index.cql"),
    include_str!("../../../../schemas/cql/011_dead_letter_days.cql"),
    include_str!("../../../../schemas/cql/012_shop_orders.cql"),
    include_str!("../../../../schemas/cql/013_order_counts.cql"),
    include_str!("../../../../schemas/cql/014_order_index_by_minute.cql"),
];

/// Where and how to reach the CQL cluster.
#[derive(Debug, Clone)]
pub struct CqlConfig {
    pub nodes: Vec<String>,
    pub keyspace: String,
    pub replication_factor: u32,
    /// For a cluster with password authentication.
    pub login: Option<CqlLogin>,
    /// TLS to every node, which must show a certificate for its IP address.
    pub tls: Option<CqlTls>,
}

/// A role and its password (PasswordAuthenticator).
#[derive(Debug, Clone)]
pub struct CqlLogin {
    pub username: String,
    pub password: crate::secret::Secret,
}

/// Encrypted connections to the nodes.
#[derive(Debug, Clone, Default)]
pub struct CqlTls {
    /// PEM certificates of the CAs that sign the nodes'; the system's by default.
    pub ca_file: Option<std::path::PathBuf>,
}

impl CqlTls {
    fn connector(&self) -> Result<scylla::client::session::OpenSsl010Config, StoreError> {
        let failed = |e: openssl::error::ErrorStack| StoreError::Backend(Box::new(TlsSetup(e)));
        let mut builder = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).map_err(failed)?;
        if let Some(ca) = &self.ca_file {
            // The file's CAs alone (the builder starts from the system's), as
            // librdkafka's `ssl.ca.location` does for Kafka.
            let unreadable = |e: String| StoreError::Backend(format!("the CQL CA file {}: {e}", ca.display()).into());
            let pem = std::fs::read(ca).map_err(|e| unreadable(e.to_string()))?;
            let certs = openssl::x509::X509::stack_from_pem(&pem).map_err(|e| unreadable(e.to_string()))?;
            if certs.is_empty() {
                return Err(unreadable("it holds no PEM certificate".into()));
            }
            let mut store = openssl::x509::store::X509StoreBuilder::new().map_err(failed)?;
            for cert in certs {
                store.add_cert(cert).map_err(failed)?;
            }
            builder.set_cert_store(store.build());
        }
        Ok(scylla::client::session::OpenSsl010Config::new(builder))
    }
}

/// OpenSSL could not set up the TLS context for the CQL connections.
#[derive(Debug, thiserror::Error)]
#[error("setting up TLS to the CQL nodes")]
struct TlsSetup(#[source] openssl::error::ErrorStack);

/// The row's columns as an insert's `UPDATE ... SET` binds them, in the order the writes bind.
const ROW_SET: &str = "shopify_order_id = ?, customer = ?, tier = ?, priority = ?, status = ?, total_cents = ?, \
    shipping_fee_cents = ?, currency = ?, note = ?, version = ?, created_at = ?, updated_at = ?, decided_by = ?, \
    source_updated_at = ?, changed_at = ?";
/// The same for a later version: `created_at` never changes (and a bound row holds at most 16 values).
const ROW_UPDATE_SET: &str = "shopify_order_id = ?, customer = ?, tier = ?, priority = ?, status = ?, \
    total_cents = ?, shipping_fee_cents = ?, currency = ?, note = ?, version = ?, updated_at = ?, decided_by = ?, \
    source_updated_at = ?, changed_at = ?";
/// A history entry's columns (clustered by `event_id` in the order's partition).
const ENTRY_COLUMNS: &str = "event_id, h_version, h_outcome, h_reason, h_source, h_decided_by, h_recorded_at, h_trace";
/// A dead letter's columns, as the reads decode them.
const LETTER_COLUMNS: &str = "seq, id, order_id, stage, error_type, reason, decided_by, payload, recorded_at";
/// A parked event's columns, as `ParkedRow` decodes them.
const PARKED_COLUMNS: &str = "order_id, appended_at, log_offset, event_id, priority, parked_at, payload";
/// The most parked events one sweep reads: the table is small unless something is wrong.
const PARKED_SCAN_MAX: usize = 10_000;

type ParkedRow = (String, i64, i64, String, Option<String>, Option<i64>, Option<String>);

fn parked_from((order_id, appended_at_us, offset, event_id, priority, parked_at, payload): ParkedRow) -> ParkedEvent {
    ParkedEvent {
        order_id,
        event_id,
        priority: priority.as_deref().and_then(Priority::parse).unwrap_or(Priority::Normal),
        appended_at_us,
        offset: offset as u64,
        parked_at: from_micros(parked_at.unwrap_or(0)),
        payload: payload.unwrap_or_default(),
    }
}

/// How many single-partition transactions run at once for one batch of writes (and for
/// all order writes of a store together).
const CONCURRENCY: usize = 64;
/// Retries of a write whose outcome is unknown (timeout, unavailable).
const MAX_ATTEMPTS: u32 = 5;

const STATICS: &str = "id, shopify_order_id, customer, tier, priority, status, total_cents, shipping_fee_cents, \
    currency, note, version, created_at, updated_at, decided_by, source_updated_at, changed_at, shop";

/// The static columns of an order's partition, in [`STATICS`]' order (a struct: a tuple
/// reads 16 columns at most).
#[derive(scylla::DeserializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
struct StaticRow {
    id: String,
    shopify_order_id: Option<i64>,
    customer: Option<String>,
    tier: Option<String>,
    priority: Option<String>,
    status: Option<String>,
    total: Option<i64>,
    fee: Option<i64>,
    currency: Option<String>,
    note: Option<String>,
    version: Option<i64>,
    created: Option<i64>,
    updated: Option<i64>,
    decided_by: Option<String>,
    source_updated: Option<i64>,
    changed_at: Option<String>,
    shop: Option<String>,
}

struct Statements {
    get: PreparedStatement,
    get_serial: PreparedStatement,
    event_serial: PreparedStatement,
    outcome_serial: PreparedStatement,
    letter_seq_serial: PreparedStatement,
    insert_row: PreparedStatement,
    update_row: PreparedStatement,
    insert_entry: PreparedStatement,
    set_shop: PreparedStatement,
    /// A row's partition, deleted if the row is at a version (a batch: fence, then all).
    purge: Batch,
    history: PreparedStatement,
    list: PreparedStatement,
    letter_claim_id: PreparedStatement,
    letter_insert: PreparedStatement,
    letters: PreparedStatement,
    note_letter_day: PreparedStatement,
    letter_count: PreparedStatement,
    letter_first: PreparedStatement,
    letter_days: PreparedStatement,
    letter_by_id: PreparedStatement,
    run_partition: PreparedStatement,
    letter_by_seq: PreparedStatement,
    replay_claim: PreparedStatement,
    replay_undo: PreparedStatement,
    letter_delete: PreparedStatement,
    letter_id_delete: PreparedStatement,
    claim_delivery: PreparedStatement,
    claim_read: PreparedStatement,
    claim_takeover: PreparedStatement,
    confirm_update: PreparedStatement,
    confirm_insert: PreparedStatement,
    release_delivery: PreparedStatement,
    record_delivery: PreparedStatement,
    note_delivery_day: PreparedStatement,
    delivery_days: PreparedStatement,
    deliveries: PreparedStatement,
    record_action: PreparedStatement,
    note_action_day: PreparedStatement,
    action_days: PreparedStatement,
    actions: PreparedStatement,
    park: PreparedStatement,
    parked: PreparedStatement,
    unpark: PreparedStatement,
    route: PreparedStatement,
    route_serial: PreparedStatement,
    set_route: PreparedStatement,
    claim_route: PreparedStatement,
    record_case: PreparedStatement,
    note_case_minute: PreparedStatement,
    case_minutes: PreparedStatement,
    cases: PreparedStatement,
    drop_case_shard: PreparedStatement,
    drop_case_minute: PreparedStatement,
}

/// Most history entries of one order a read takes (an order's whole history, in practice:
/// the generator and Shopify give an order a handful of events).
const HISTORY_READ_MAX: usize = 10_000;

/// How long a settled day's dead-letter count is taken as read: this instance's purges
/// drop it at once, another instance's show in the gauges within this.
const TALLY_KEPT: Duration = Duration::from_secs(600);

/// Shards per minute of cases: spreads one busy minute over several partitions.
const CASE_SHARDS: i32 = 8;

#[derive(Clone)]
pub struct CqlStore {
    session: Arc<Session>,
    st: Arc<Statements>,
    listing: Arc<listing::ListingStatements>,
    shops: Arc<shops::ShopStatements>,
    counts: Arc<counts::CountStatements>,
    keyspace: String,
    /// Dead letters per settled day, as `tally` counted them, and when.
    tallied: Arc<std::sync::Mutex<HashMap<i32, (i64, Instant)>>>,
    /// Order writes in flight over every `write` call, at most [`CONCURRENCY`]: a batch
    /// sent while another is written (`Pipeline::send_ahead`) fills the slots the first
    /// one frees as it ends, instead of doubling the load on the cluster.
    write_slots: Arc<tokio::sync::Semaphore>,
}

fn unset_none<T>(v: Option<T>) -> MaybeUnset<T> {
    v.map_or(MaybeUnset::Unset, MaybeUnset::Set)
}

/// A history entry's trace column: unset when empty (no tombstone, no bytes).
fn trace_column(trace: &Trace) -> MaybeUnset<String> {
    unset_none((!trace.is_empty()).then(|| serde_json::to_string(trace).expect("a trace serializes")))
}

/// A request the cluster failed to serve (no connection, timeout, an attempt that
/// failed) may pass later; a bad or unpreparable statement, or a row that does not
/// decode, will not.
fn backend<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    let failed = (&e as &dyn std::any::Any).downcast_ref::<ExecutionError>();
    if failed.is_some_and(may_pass) { StoreError::Unavailable(e.into()) } else { StoreError::Backend(e.into()) }
}

/// Whether a failed request may succeed if sent again (the cluster was busy, away or
/// slow), classified by the driver's error types: a request the cluster refuses as
/// invalid, unauthorized or malformed gets the same answer every time.
fn may_pass(e: &ExecutionError) -> bool {
    use scylla::errors::{DbError, RequestAttemptError};
    match e {
        ExecutionError::BadQuery(_) | ExecutionError::PrepareError(_) | ExecutionError::UseKeyspaceError(_) => false,
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::DbError(db, _) => !matches!(
                db,
                DbError::SyntaxError
                    | DbError::Invalid
                    | DbError::AlreadyExists { .. }
                    | DbError::FunctionFailure { .. }
                    | DbError::AuthenticationError
                    | DbError::Unauthorized
                    | DbError::ConfigError
                    | DbError::ProtocolError
            ),
            RequestAttemptError::SerializationError(_)
            | RequestAttemptError::CqlRequestSerialization(_)
            | RequestAttemptError::CqlResultParseError(_)
            | RequestAttemptError::UnexpectedResponse(_) => false,
            _ => true,
        },
        _ => true,
    }
}

impl CqlStore {
    /// Drops `config`'s keyspace with everything in it: for the keyspaces a bench makes
    /// for itself, never the engine's. Connects without applying the schema.
    pub async fn drop_keyspace(config: &CqlConfig) -> Result<(), StoreError> {
        let drop = format!("DROP KEYSPACE IF EXISTS {}", config.keyspace);
        Self::connect(config).await?.query_unpaged(drop, ()).await.map_err(backend)?;
        Ok(())
    }

    async fn connect(config: &CqlConfig) -> Result<Session, StoreError> {
        // Only this keyspace's metadata (for token-aware routing): by default the driver
        // reads every keyspace's tables and columns at connect and again on each schema
        // change anywhere in the cluster.
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(Duration::from_secs(5))
            .keyspaces_to_fetch([config.keyspace.clone()]);
        if let Some(login) = &config.login {
            builder = builder.user(&login.username, login.password.expose());
        }
        if let Some(tls) = &config.tls {
            builder = builder.tls_context(Some(tls.connector()?));
        }
        builder
            .build()
            .await
            .map_err(|e| StoreError::Unavailable(format!("connecting to {:?}: {e}", config.nodes).into()))
    }

    /// Connects, applies the schema, and prepares every statement.
    pub async fn open(config: CqlConfig) -> Result<Self, StoreError> {
        let session = Self::connect(&config).await?;
        for (number, file) in MIGRATIONS.iter().enumerate() {
            let schema = file
                .replace("{keyspace}", &config.keyspace)
                .replace("{replication_factor}", &config.replication_factor.to_string());
            for statement in strip_comments(&schema).split(';').map(str::trim).filter(|s| !s.is_empty()) {
                session
                    .query_unpaged(statement, ())
                    .await
                    .map_err(|e| StoreError::Backend(format!("applying schema file {:03}: {e}", number + 1).into()))?;
            }
        }
        // Columns added after a keyspace was first created: adding one that exists fails, harmlessly.
        let ks = &config.keyspace;
        let alters = [
            format!("ALTER TABLE {ks}.orders ADD source_updated_at bigint static"),
            format!("ALTER TABLE {ks}.orders ADD changed_at text static"),
            format!("ALTER TABLE {ks}.orders ADD shop text static"),
            format!("ALTER TABLE {ks}.orders ADD h_trace text"),
        ];
        for alter in alters {
            if let Err(e) = session.query_unpaged(alter, ()).await {
                tracing::debug!(error = %e, "schema migration step skipped");
            }
        }
        session.await_schema_agreement().await.map_err(backend)?;
        // Letters written before schema 011 (or by an instance not yet upgraded) sit in
        // bucket 0: that day is always listed.
        let legacy = format!("INSERT INTO {ks}.dead_letter_days (k, day) VALUES (0, 0)");
        session.query_unpaged(legacy, ()).await.map_err(backend)?;
        let prepare = |cql: String, serial: bool| {
            let session = &session;
            async move {
                let mut p = session.prepare(cql).await.map_err(backend)?;
                p.set_consistency(Consistency::Quorum);
                if serial {
                    p.set_serial_consistency(Some(SerialConsistency::Serial));
                }
                Ok::<_, StoreError>(p)
            }
        };
        let mut get_serial = prepare(format!("SELECT {STATICS} FROM {ks}.orders WHERE id = ? LIMIT 1"), false).await?;
        let mut route_serial = prepare(format!("SELECT priority FROM {ks}.routes WHERE order_id = ?"), false).await?;
        route_serial.set_consistency(Consistency::Serial);
        get_serial.set_consistency(Consistency::Serial);
        let mut event_serial =
            prepare(format!("SELECT event_id FROM {ks}.orders WHERE id = ? AND event_id = ?"), false).await?;
        event_serial.set_consistency(Consistency::Serial);
        let mut outcome_serial =
            prepare(format!("SELECT h_outcome FROM {ks}.orders WHERE id = ? AND event_id = ?"), false).await?;
        outcome_serial.set_consistency(Consistency::Serial);
        let mut letter_seq_serial =
            prepare(format!("SELECT seq FROM {ks}.dead_letter_ids WHERE id = ?"), false).await?;
        letter_seq_serial.set_consistency(Consistency::Serial);
        let mut claim_read =
            prepare(format!("SELECT state, claimed_at FROM {ks}.delivery_claims WHERE key = ?"), false).await?;
        claim_read.set_consistency(Consistency::Serial);
        let mut list = prepare(format!("SELECT DISTINCT {STATICS} FROM {ks}.orders"), false).await?;
        list.set_page_size(200);
        let st = Statements {
            get: prepare(format!("SELECT {STATICS} FROM {ks}.orders WHERE id = ? LIMIT 1"), false).await?,
            get_serial,
            event_serial,
            outcome_serial,
            letter_seq_serial,
            insert_row: prepare(format!("UPDATE {ks}.orders SET {ROW_SET} WHERE id = ? IF version = null"), true)
                .await?,
            update_row: prepare(format!("UPDATE {ks}.orders SET {ROW_UPDATE_SET} WHERE id = ? IF version = ?"), true)
                .await?,
            set_shop: prepare(format!("UPDATE {ks}.orders SET shop = ? WHERE id = ?"), true).await?,
            purge: {
                let statics = STATICS.trim_start_matches("id, ");
                let fence = format!("DELETE {statics} FROM {ks}.orders WHERE id = ? IF version = ?");
                let mut batch = Batch::new(BatchType::Logged);
                batch.set_consistency(Consistency::Quorum);
                batch.set_serial_consistency(Some(SerialConsistency::Serial));
                batch.append_statement(prepare(fence, true).await?);
                batch.append_statement(prepare(format!("DELETE FROM {ks}.orders WHERE id = ?"), true).await?);
                batch
            },
            insert_entry: prepare(
                format!(
                    "INSERT INTO {ks}.orders (id, {ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
                ),
                true,
            )
            .await?,
            history: prepare(
                format!("SELECT {ENTRY_COLUMNS} FROM {ks}.orders WHERE id = ? LIMIT {HISTORY_READ_MAX}"),
                false,
            )
            .await?,
            list,
            letter_claim_id: prepare(
                format!("INSERT INTO {ks}.dead_letter_ids (id, seq) VALUES (?, ?) IF NOT EXISTS"),
                true,
            )
            .await?,
            letter_insert: prepare(
                format!(
                    "INSERT INTO {ks}.dead_letters (bucket, {LETTER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                false,
            )
            .await?,
            letters: prepare(
                format!("SELECT {LETTER_COLUMNS} FROM {ks}.dead_letters WHERE bucket = ? AND seq > ? LIMIT ?"),
                false,
            )
            .await?,
            note_letter_day: prepare(format!("INSERT INTO {ks}.dead_letter_days (k, day) VALUES (0, ?)"), false)
                .await?,
            letter_count: prepare(format!("SELECT count(*) FROM {ks}.dead_letters WHERE bucket = ?"), false).await?,
            letter_first: prepare(format!("SELECT recorded_at FROM {ks}.dead_letters WHERE bucket = ? LIMIT 1"), false)
                .await?,
            letter_days: prepare(format!("SELECT day FROM {ks}.dead_letter_days WHERE k = 0 AND day >= ?"), false)
                .await?,
            run_partition: prepare(
                format!("SELECT version, h_outcome, h_recorded_at FROM {ks}.orders WHERE id = ?"),
                false,
            )
            .await?,
            letter_by_id: prepare(format!("SELECT seq, replayed_at FROM {ks}.dead_letter_ids WHERE id = ?"), false)
                .await?,
            letter_by_seq: prepare(
                format!("SELECT {LETTER_COLUMNS} FROM {ks}.dead_letters WHERE bucket = ? AND seq = ?"),
                false,
            )
            .await?,
            // `seq != null`: an UPDATE's condition on a missing row would write one, and
            // a claim racing a purge would leave an id without a letter behind.
            replay_claim: prepare(
                format!(
                    "UPDATE {ks}.dead_letter_ids SET replayed_at = ? WHERE id = ? IF seq != null AND replayed_at = null"
                ),
                true,
            )
            .await?,
            replay_undo: prepare(
                format!("UPDATE {ks}.dead_letter_ids SET replayed_at = null WHERE id = ? IF EXISTS"),
                true,
            )
            .await?,
            letter_delete: prepare(format!("DELETE FROM {ks}.dead_letters WHERE bucket = ? AND seq = ?"), false)
                .await?,
            letter_id_delete: prepare(format!("DELETE FROM {ks}.dead_letter_ids WHERE id = ? IF EXISTS"), true).await?,
            claim_delivery: prepare(
                format!(
                    "INSERT INTO {ks}.delivery_claims (key, state, claimed_at) VALUES (?, 'pending', ?) \
                     IF NOT EXISTS USING TTL ?"
                ),
                true,
            )
            .await?,
            claim_read,
            claim_takeover: prepare(
                format!(
                    "UPDATE {ks}.delivery_claims USING TTL ? SET state = 'pending', claimed_at = ? \
                     WHERE key = ? IF claimed_at = ?"
                ),
                true,
            )
            .await?,
            confirm_update: prepare(
                format!("UPDATE {ks}.delivery_claims USING TTL ? SET state = 'done' WHERE key = ? IF EXISTS"),
                true,
            )
            .await?,
            confirm_insert: prepare(
                format!(
                    "INSERT INTO {ks}.delivery_claims (key, state, claimed_at) VALUES (?, 'done', ?) \
                     IF NOT EXISTS USING TTL ?"
                ),
                true,
            )
            .await?,
            release_delivery: prepare(
                format!("DELETE FROM {ks}.delivery_claims WHERE key = ? IF state = 'pending'"),
                true,
            )
            .await?,
            record_delivery: prepare(
                format!("INSERT INTO {ks}.deliveries (day, seq, body) VALUES (?, ?, ?) USING TTL ?"),
                false,
            )
            .await?,
            note_delivery_day: prepare(format!("INSERT INTO {ks}.delivery_days (k, day) VALUES (0, ?)"), false).await?,
            delivery_days: prepare(format!("SELECT day FROM {ks}.delivery_days WHERE k = 0 AND day >= ?"), false)
                .await?,
            deliveries: prepare(
                format!("SELECT seq, body FROM {ks}.deliveries WHERE day = ? AND seq > ? LIMIT ?"),
                false,
            )
            .await?,
            record_action: prepare(format!("INSERT INTO {ks}.actions (day, at, body) VALUES (?, ?, ?)"), false).await?,
            note_action_day: prepare(format!("INSERT INTO {ks}.action_days (k, day) VALUES (0, ?)"), false).await?,
            action_days: prepare(format!("SELECT day FROM {ks}.action_days WHERE k = 0 AND day <= ?"), false).await?,
            actions: prepare(format!("SELECT at, body FROM {ks}.actions WHERE day = ? AND at < ? LIMIT ?"), false)
                .await?,
            park: prepare(format!("INSERT INTO {ks}.parked ({PARKED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"), false)
                .await?,
            parked: prepare(format!("SELECT {PARKED_COLUMNS} FROM {ks}.parked WHERE order_id = ?"), false).await?,
            unpark: prepare(
                format!(
                    "DELETE FROM {ks}.parked WHERE order_id = ? AND appended_at = ? AND log_offset = ? \
                     AND event_id = ?"
                ),
                false,
            )
            .await?,
            route: prepare(format!("SELECT priority FROM {ks}.routes WHERE order_id = ?"), false).await?,
            route_serial,
            set_route: prepare(format!("INSERT INTO {ks}.routes (order_id, priority) VALUES (?, ?)"), false).await?,
            claim_route: prepare(
                format!("INSERT INTO {ks}.routes (order_id, priority) VALUES (?, ?) IF NOT EXISTS"),
                true,
            )
            .await?,
            record_case: prepare(
                format!(
                    "INSERT INTO {ks}.cases (minute, shard, at, event_id, body) VALUES (?, ?, ?, ?, ?) USING TTL ?"
                ),
                false,
            )
            .await?,
            note_case_minute: prepare(format!("INSERT INTO {ks}.case_minutes (k, minute) VALUES (0, ?)"), false)
                .await?,
            case_minutes: prepare(
                format!("SELECT minute FROM {ks}.case_minutes WHERE k = 0 AND minute >= ? AND minute < ?"),
                false,
            )
            .await?,
            cases: {
                let cql = format!("SELECT at, body FROM {ks}.cases WHERE minute = ? AND shard = ? AND at >= ?");
                let mut p = prepare(cql, false).await?;
                p.set_page_size(500);
                p
            },
            drop_case_shard: prepare(format!("DELETE FROM {ks}.cases WHERE minute = ? AND shard = ?"), false).await?,
            drop_case_minute: prepare(format!("DELETE FROM {ks}.case_minutes WHERE k = 0 AND minute = ?"), false)
                .await?,
        };
        let listing = Arc::new(listing::ListingStatements::prepare(&session, ks).await?);
        let shops = Arc::new(shops::ShopStatements::prepare(&session, ks).await?);
        let counts = Arc::new(counts::CountStatements::prepare(&session, ks).await?);
        let store = Self {
            session: Arc::new(session),
            st: Arc::new(st),
            listing,
            shops,
            counts,
            keyspace: config.keyspace.clone(),
            tallied: Default::default(),
            write_slots: Arc::new(tokio::sync::Semaphore::new(CONCURRENCY)),
        };
        // Rows written before schema 014 join the time index in the background: a listing
        // shows them as the backfill reaches them.
        if !store.backfilled().await? {
            let backfill = store.clone();
            tokio::spawn(async move {
                match backfill.backfill_listing().await {
                    Ok(listed) => tracing::info!(listed, "the orders' time index is complete"),
                    Err(e) => {
                        let next = "it runs again at the next start";
                        tracing::error!(error = %e, "backfilling the orders' time index failed; {next}")
                    }
                }
            });
        }
        store.backfill_counts_once().await?;
        Ok(store)
    }

    async fn get_with(&self, id: &str, serial: bool) -> Result<Option<Order>, StoreError> {
        let st = if serial { &self.st.get_serial } else { &self.st.get };
        let rows =
            self.session.execute_unpaged(st, (id,)).await.map_err(backend)?.into_rows_result().map_err(backend)?;
        match rows.maybe_first_row::<StaticRow>().map_err(backend)? {
            Some(r) => order_from(r),
            None => Ok(None),
        }
    }

    /// Runs one conditional statement or batch; `[applied]` is read dynamically, as
    /// Cassandra and ScyllaDB return different columns beside it.
    async fn lwt(
        &self,
        run: impl std::future::Future<Output = Result<scylla::response::query_result::QueryResult, ExecutionError>>,
    ) -> Result<Option<bool>, StoreError> {
        match run.await {
            Ok(result) => {
                let rows = result.into_rows_result().map_err(backend)?;
                let first = rows.maybe_first_row::<Row>().map_err(backend)?;
                Ok(Some(
                    first
                        .and_then(|r| r.columns.first().cloned().flatten())
                        .and_then(|v| v.as_boolean())
                        .unwrap_or(false),
                ))
            }
            // The outcome is unknown (timeout, coordinator trouble): the caller reads back.
            Err(e) if is_uncertain(&e) => {
                tracing::warn!(error = %e, "CQL write outcome unknown; reading back at SERIAL");
                Ok(None)
            }
            Err(e) => Err(backend(e)),
        }
    }

    /// Deletes the row's partition (the row and its history) if the row is still at
    /// `row`'s version, and takes it out of the time index; whether it went.
    async fn purge(&self, row: &Order) -> Result<bool, StoreError> {
        let fenced = ((&row.id, row.version as i64), (&row.id,));
        let gone = match self.lwt(self.session.batch(&self.st.purge, fenced)).await? {
            Some(applied) => applied,
            // Unknown: it went if the row is absent now (an event may have written it
            // again since; a fresh row is listed by its own write).
            None => self.get_with(&row.id, true).await?.is_none(),
        };
        if gone {
            self.unlist(row).await?;
            self.uncount(row).await;
        }
        Ok(gone)
    }

    async fn event_recorded(&self, order_id: &str, event_id: &str) -> Result<bool, StoreError> {
        let rows = self.session.execute_unpaged(&self.st.event_serial, (order_id, event_id)).await.map_err(backend)?;
        Ok(rows.into_rows_result().map_err(backend)?.rows_num() > 0)
    }

    async fn write_one(&self, w: &Write) -> Result<WriteResult, StoreError> {
        let now = micros(Utc::now());
        let trace = trace_column(w.trace());
        let mut backoff = Duration::from_millis(20);
        for attempt in 1..=MAX_ATTEMPTS {
            let applied = match w {
                Write::Apply { event_id, source, base, row, .. } => {
                    let r = row;
                    // Unset, not null: a null would write a tombstone per entry for nothing.
                    let entry = (
                        &r.id,
                        event_id,
                        r.version as i64,
                        Outcome::Applied.as_str(),
                        MaybeUnset::<String>::Unset,
                        source,
                        &r.decided_by,
                        now,
                        &trace,
                    );
                    let mut batch = Batch::new(BatchType::Logged);
                    batch.set_serial_consistency(Some(SerialConsistency::Serial));
                    batch.set_consistency(Consistency::Quorum);
                    let (tier, priority, status) = (r.tier.as_str(), r.priority.as_str(), r.status.as_str());
                    let (version, created, updated) = (r.version as i64, micros(r.created_at), micros(r.updated_at));
                    let source_updated = r.source_updated_at.map(micros);
                    let changed_at = r.changed_at.to_column();
                    match base.map(|b| b.version) {
                        None => {
                            batch.append_statement(self.st.insert_row.clone());
                            batch.append_statement(self.st.insert_entry.clone());
                            // The shop in a statement of its own: the row's binds the 16
                            // values a statement takes at most.
                            batch.append_statement(self.st.set_shop.clone());
                            // A new row has nothing to clear: absent columns stay unset.
                            let (shopify_order_id, source_updated) =
                                (unset_none(r.shopify_order_id), unset_none(source_updated));
                            let set = (
                                shopify_order_id,
                                &r.customer,
                                tier,
                                priority,
                                status,
                                r.total_cents,
                                r.shipping_fee_cents,
                                &r.currency,
                                &r.note,
                                version,
                                created,
                                updated,
                                &r.decided_by,
                                source_updated,
                                &changed_at,
                                &r.id,
                            );
                            let shop = (unset_none(r.shop.as_deref()), &r.id);
                            self.lwt(self.session.batch(&batch, (set, entry, shop))).await?
                        }
                        Some(v) => {
                            batch.append_statement(self.st.update_row.clone());
                            batch.append_statement(self.st.insert_entry.clone());
                            // A row without a shop takes the first one an event brings.
                            batch.append_statement(self.st.set_shop.clone());
                            let set = (
                                r.shopify_order_id,
                                &r.customer,
                                tier,
                                priority,
                                status,
                                r.total_cents,
                                r.shipping_fee_cents,
                                &r.currency,
                                &r.note,
                                version,
                                updated,
                                &r.decided_by,
                                source_updated,
                                &changed_at,
                                &r.id,
                                v as i64,
                            );
                            let shop = (unset_none(r.shop.as_deref()), &r.id);
                            self.lwt(self.session.batch(&batch, (set, entry, shop))).await?
                        }
                    }
                }
                Write::Record { event_id, source, order_id, outcome, reason, decided_by, dead_letter, .. } => {
                    // The letter before the ledger entry, so no rejection ever lacks its
                    // letter; but none for an event the ledger holds already (applied, or
                    // rejected with its letter). A crash between the two can leave a
                    // letter for an event a redelivery then applies: replay refuses those.
                    if let Some(letter) = dead_letter
                        && self.recorded_outcome(order_id, event_id).await?.is_none()
                    {
                        self.put_dead_letter(letter).await?;
                    }
                    let version = self.get_with(order_id, false).await?.map_or(0, |o| o.version as i64);
                    let (outcome, reason) = (outcome.as_str(), Some(reason));
                    let entry = (order_id, event_id, version, outcome, reason, source, decided_by, now, &trace);
                    self.lwt(self.session.execute_unpaged(&self.st.insert_entry, entry)).await?
                }
            };
            let order_id = match w {
                Write::Apply { row, .. } => &row.id,
                Write::Record { order_id, .. } => order_id,
            };
            // Listed after the batch, which cannot span the index's partitions. A crash in
            // between leaves the order unlisted until its redelivery, a duplicate, relists it.
            match applied {
                Some(true) => {
                    if let Write::Apply { row, base, .. } = w {
                        self.index(row, base.as_ref()).await?;
                        self.recount(row, base.as_ref()).await;
                    }
                    return Ok(WriteResult::Done);
                }
                Some(false) => {
                    if self.event_recorded(order_id, w.event_id()).await? {
                        if matches!(w, Write::Apply { .. }) {
                            self.relist(order_id).await?;
                        }
                        return Ok(WriteResult::Duplicate);
                    }
                    return Ok(WriteResult::Conflict(self.get_with(order_id, true).await?.map(Box::new)));
                }
                None => {
                    // Unknown outcome: if the entry exists, this write (or an earlier
                    // attempt of it) applied; otherwise try again.
                    if self.event_recorded(order_id, w.event_id()).await? {
                        // Applied, by this attempt or an earlier delivery: the row as
                        // stored now is what gets listed.
                        if let Write::Apply { row, base, .. } = w {
                            self.relist_applied(order_id, row.version, base.as_ref()).await?;
                            // Most likely by this attempt: counted (approximate, see counts.rs).
                            self.recount(row, base.as_ref()).await;
                        }
                        return Ok(WriteResult::Done);
                    }
                    if attempt < MAX_ATTEMPTS {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
        }
        let why = format!("write of {} failed {MAX_ATTEMPTS} times with an unknown outcome", w.event_id());
        Err(StoreError::Unavailable(why.into()))
    }

    /// One order's partition as a run's audit counts it: the row's version, then each
    /// history entry's outcome and time.
    async fn run_partition(&self, id: &str) -> Result<Vec<PartitionRow>, StoreError> {
        let rows = self.session.execute_unpaged(&self.st.run_partition, (id,)).await.map_err(backend)?;
        let rows = rows.into_rows_result().map_err(backend)?;
        rows.rows::<PartitionRow>().map_err(backend)?.collect::<Result<_, _>>().map_err(backend)
    }

    async fn letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let claim = self
            .session
            .execute_unpaged(&self.st.letter_by_id, (id,))
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?;
        let Some((Some(seq), replayed_at)) =
            claim.maybe_first_row::<(Option<CqlTimeuuid>, Option<i64>)>().map_err(backend)?
        else {
            return Ok(None);
        };
        // At the day of its place, or in bucket 0 if it was written before schema 011.
        for bucket in [letter_day(seq), 0] {
            let rows = self
                .session
                .execute_unpaged(&self.st.letter_by_seq, (bucket, seq))
                .await
                .map_err(backend)?
                .into_rows_result()
                .map_err(backend)?;
            if let Some(r) = rows.maybe_first_row::<LetterRow>().map_err(backend)? {
                return Ok(Some(letter_from(r, replayed_at)));
            }
        }
        Ok(None)
    }

    /// Writes a dead letter once per id, whatever earlier attempts did: the id claims a
    /// place in arrival order, and the letter is (re)written at the place the id holds,
    /// so a claim whose outcome was unknown, or whose letter a crash kept from being
    /// written, still ends with exactly one letter.
    async fn put_dead_letter(&self, d: &DeadLetter) -> Result<(), StoreError> {
        let mine = CqlTimeuuid::from(uuid::Uuid::now_v1(&[0, 0, 0, 0, 0, 1]));
        let claimed = self.lwt(self.session.execute_unpaged(&self.st.letter_claim_id, (&d.id, mine))).await?;
        let seq = if claimed == Some(true) {
            mine
        } else {
            let rows = self.session.execute_unpaged(&self.st.letter_seq_serial, (&d.id,)).await.map_err(backend)?;
            let held = rows.into_rows_result().map_err(backend)?.maybe_first_row::<(Option<CqlTimeuuid>,)>();
            let seq = match held.map_err(backend)? {
                Some((Some(seq),)) => seq,
                _ => return Err(StoreError::Unavailable(format!("dead letter {}: its place is unknown", d.id).into())),
            };
            // Event ids are per order here: the id may hold another order's letter. This
            // one is then filed under an id of its own, never over the other.
            if let Some(other) = self.letter_by_id(&d.id).await?
                && other.order_id != d.order_id
            {
                let own = format!("{}@{}", d.id, d.order_id.as_deref().unwrap_or("none"));
                return Box::pin(self.put_dead_letter(&DeadLetter { id: own, ..d.clone() })).await;
            }
            seq
        };
        let day = letter_day(seq);
        let values = (
            day,
            seq,
            &d.id,
            &d.order_id,
            &d.stage,
            &d.error_type,
            &d.reason,
            &d.decided_by,
            &d.payload,
            micros(d.recorded_at),
        );
        self.session.execute_unpaged(&self.st.note_letter_day, (day,)).await.map_err(backend)?;
        self.session.execute_unpaged(&self.st.letter_insert, values).await.map_err(backend)?;
        Ok(())
    }

    /// The outcome the ledger holds for an event, read at SERIAL.
    async fn recorded_outcome(&self, order_id: &str, event_id: &str) -> Result<Option<Outcome>, StoreError> {
        let rows =
            self.session.execute_unpaged(&self.st.outcome_serial, (order_id, event_id)).await.map_err(backend)?;
        let row = rows.into_rows_result().map_err(backend)?.maybe_first_row::<(Option<String>,)>();
        Ok(row.map_err(backend)?.and_then(|(o,)| o.as_deref().and_then(Outcome::parse)))
    }
}

/// The partition of a dead letter: the UTC day of its place (its seq's time).
fn letter_day(seq: CqlTimeuuid) -> i32 {
    let secs = uuid::Uuid::from(seq).get_timestamp().map_or(0, |t| t.to_unix().0);
    (secs / 86_400) as i32
}

/// `version` (static), `h_outcome`, `h_recorded_at`.
type PartitionRow = (Option<i64>, Option<String>, Option<i64>);

/// Adds one order's partition to a run's audit: the row once, each entry by outcome.
fn audit_partition(audit: &mut Audit, rows: Vec<PartitionRow>) {
    if let Some(v) = rows.first().and_then(|r| r.0) {
        audit.orders += 1;
        audit.not_first_version += u64::from(v != 1);
    }
    for (_, outcome, recorded) in rows {
        match outcome.as_deref() {
            Some("applied") => {
                audit.applied += 1;
                if let Some(at) = recorded.map(from_micros) {
                    audit.first_applied = Some(audit.first_applied.map_or(at, |f| f.min(at)));
                    audit.last_applied = Some(audit.last_applied.map_or(at, |l| l.max(at)));
                }
            }
            Some(_) => audit.other += 1,
            None => {}
        }
    }
}

type LetterRow = (CqlTimeuuid, String, Option<String>, String, String, String, Option<String>, String, i64);

fn letter_from(r: LetterRow, replayed_at: Option<i64>) -> DeadLetter {
    let (_, id, order_id, stage, error_type, reason, decided_by, payload, at) = r;
    DeadLetter {
        id,
        order_id,
        stage,
        error_type,
        reason,
        decided_by,
        payload,
        recorded_at: from_micros(at),
        replayed_at: replayed_at.map(from_micros),
    }
}

/// Whether a conditional write may or may not have been applied: anything but a refusal
/// (see [`may_pass`]) is read back, which costs a read where the write surely failed.
fn is_uncertain(e: &ExecutionError) -> bool {
    may_pass(e)
}

fn strip_comments(s: &str) -> String {
    s.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n").trim().to_string()
}

fn order_from(r: StaticRow) -> Result<Option<Order>, StoreError> {
    let StaticRow {
        id,
        shopify_order_id,
        customer,
        tier,
        priority,
        status,
        total,
        fee,
        currency,
        note,
        version,
        created,
        updated,
        decided_by,
        source_updated,
        changed_at,
        shop,
    } = r;
    let Some(version) = version else { return Ok(None) };
    let bad = |what: &str, v: &Option<String>| StoreError::Corrupt(format!("order {id}: bad {what} {v:?}"));
    Ok(Some(Order {
        tier: tier.as_deref().and_then(Tier::parse).ok_or_else(|| bad("tier", &tier))?,
        priority: priority.as_deref().and_then(Priority::parse).ok_or_else(|| bad("priority", &priority))?,
        status: status.as_deref().and_then(Status::parse).ok_or_else(|| bad("status", &status))?,
        id,
        shopify_order_id,
        customer: customer.unwrap_or_default(),
        total_cents: total.unwrap_or_default(),
        shipping_fee_cents: fee.unwrap_or_default(),
        currency: currency.unwrap_or_default(),
        note: note.unwrap_or_default(),
        version: version as u64,
        created_at: from_micros(created.unwrap_or_default()),
        updated_at: from_micros(updated.unwrap_or_default()),
        decided_by: decided_by.unwrap_or_default(),
        source_updated_at: source_updated.map(from_micros),
        changed_at: ChangedAt::from_column(changed_at.as_deref()),
        shop,
    }))
}

#[async_trait]
impl Orders for CqlStore {
    fn backend(&self) -> &'static str {
        "cql"
    }

    async fn get(&self, id: &str) -> Result<Option<Order>, StoreError> {
        self.get_with(id, false).await
    }

    async fn get_many(&self, ids: Vec<String>) -> Result<HashMap<String, Order>, StoreError> {
        // A Vec of boxed futures first: a lazy map inside the stream trips the Send check.
        let reads: Vec<_> = ids.iter().map(|id| Box::pin(self.get_with(id, false))).collect();
        let found: Vec<Result<Option<Order>, StoreError>> =
            futures::stream::iter(reads).buffer_unordered(CONCURRENCY).collect().await;
        let mut out = HashMap::new();
        for o in found {
            if let Some(o) = o? {
                out.insert(o.id.clone(), o);
            }
        }
        Ok(out)
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<(Write, WriteResult)>, StoreError> {
        // Writes of one call touch distinct orders (the pipeline guarantees it), so their
        // transactions run concurrently; results keep the input order.
        let slotted = |w| async move {
            let _slot = self.write_slots.acquire().await.map_err(|e| StoreError::Backend(e.into()))?;
            self.write_one(w).await
        };
        let pending: Vec<_> = writes.iter().map(|w| Box::pin(slotted(w))).collect();
        let results: Vec<Result<WriteResult, StoreError>> =
            futures::stream::iter(pending).buffered(CONCURRENCY).collect().await;
        let results = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(writes.into_iter().zip(results).collect())
    }

    /// The partition is clustered by event id, and the history reads in version order:
    /// the first [`HISTORY_READ_MAX`] entries are read and sorted, then paged by place.
    async fn history(
        &self,
        order_id: &str,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<Page<HistoryEntry>, StoreError> {
        type H = (
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<String>,
        );
        let rows = self
            .session
            .execute_unpaged(&self.st.history, (order_id,))
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?;
        let mut entries: Vec<HistoryEntry> = rows
            .rows::<H>()
            .map_err(backend)?
            .filter_map(|r| r.ok())
            .filter_map(|(event_id, version, outcome, reason, source, decided_by, at, trace)| {
                Some(HistoryEntry {
                    order_id: order_id.to_string(),
                    version: version? as u64,
                    event_id: event_id?,
                    source: source.unwrap_or_default(),
                    outcome: Outcome::parse(outcome.as_deref()?)?,
                    reason,
                    decided_by: decided_by.unwrap_or_default(),
                    recorded_at: from_micros(at.unwrap_or_default()),
                    // A trace this version cannot read is left out rather than failing the history.
                    trace: trace.and_then(|t| serde_json::from_str(&t).ok()),
                })
            })
            .collect();
        // Clustered by event id; the history reads in version order, then time.
        entries.sort_by(|a, b| {
            (a.version, a.recorded_at, a.outcome != Outcome::Applied).cmp(&(
                b.version,
                b.recorded_at,
                b.outcome != Outcome::Applied,
            ))
        });
        super::page_by_place(&entries, limit, cursor)
    }

    async fn list(&self, q: ListQuery) -> Result<Page<Order>, StoreError> {
        match q.sort {
            Sort::UpdatedDesc | Sort::UpdatedAsc => return self.list_by_time(&q).await,
            Sort::IdAsc => {}
            Sort::IdDesc => {
                return Err(StoreError::Cursor(
                    "the CQL store lists by id in partition order only; use sort=id".into(),
                ));
            }
        }
        // By id: one page of partitions per request, in token order; filters apply to that
        // page, so a page may hold fewer items than the limit, and the cursor carries on.
        let paging = match &q.cursor {
            None => PagingState::start(),
            Some(c) => PagingState::new_from_raw_bytes(
                URL_SAFE_NO_PAD.decode(c).map_err(|_| StoreError::Cursor("not a cursor this server issued".into()))?,
            ),
        };
        let mut st = self.st.list.clone();
        st.set_page_size(q.limit.clamp(1, 1000) as i32);
        let (result, next) = self.session.execute_single_page(&st, (), paging).await.map_err(backend)?;
        let rows = result.into_rows_result().map_err(backend)?;
        let mut items = Vec::new();
        for r in rows.rows::<StaticRow>().map_err(backend)? {
            let Some(o) = order_from(r.map_err(backend)?)? else { continue };
            let prefix_ok = q.found(&o);
            let shop_ok = q.shop.is_none() || o.shop == q.shop;
            if q.status.is_none_or(|s| s == o.status)
                && q.priority.is_none_or(|p| p == o.priority)
                && prefix_ok
                && shop_ok
            {
                items.push(o);
            }
        }
        let next_cursor = match next {
            PagingStateResponse::HasMorePages { state } => state.as_bytes_slice().map(|b| URL_SAFE_NO_PAD.encode(b)),
            PagingStateResponse::NoMorePages => None,
        };
        Ok(Page { items, next_cursor })
    }

    async fn counts(&self) -> Result<OrderCounts, StoreError> {
        self.counted().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        // Counting a CQL table means reading it all; this is for tests and operators, not
        // the hot path. A partition holds the row (statics) and its history entries.
        let cql = format!("SELECT id, version, event_id FROM {}.orders", self.keyspace);
        let mut rows = self.scan::<(String, Option<i64>, Option<String>)>(cql).await?;
        let (mut orders, mut history, mut last) = (0u64, 0u64, None::<String>);
        while let Some(row) = rows.next().await {
            let (id, version, event_id) = row.map_err(backend)?;
            if last.as_deref() != Some(id.as_str()) {
                orders += u64::from(version.is_some());
                last = Some(id);
            }
            history += u64::from(event_id.is_some());
        }
        let mut dead_letters = 0u64;
        let mut letters =
            self.scan::<(CqlTimeuuid,)>(format!("SELECT seq FROM {}.dead_letters", self.keyspace)).await?;
        while let Some(row) = letters.next().await {
            row.map_err(backend)?;
            dead_letters += 1;
        }
        let parked = self.parked_scan().await?.len() as u64;
        Ok(StoreStats { orders, history, dead_letters, parked })
    }
}

#[async_trait]
impl Parking for CqlStore {
    async fn park(&self, events: Vec<ParkedEvent>) -> Result<(), StoreError> {
        let writes: Vec<_> = events
            .iter()
            .map(|e| {
                let offset = e.offset as i64;
                let values = (
                    &e.order_id,
                    e.appended_at_us,
                    offset,
                    &e.event_id,
                    e.priority.label(),
                    micros(e.parked_at),
                    &e.payload,
                );
                Box::pin(self.session.execute_unpaged(&self.st.park, values))
            })
            .collect();
        let results: Vec<_> = futures::stream::iter(writes).buffer_unordered(CONCURRENCY).collect().await;
        for r in results {
            r.map_err(backend)?;
        }
        Ok(())
    }

    async fn parked(&self, order_ids: Vec<String>) -> Result<Vec<ParkedEvent>, StoreError> {
        let reads: Vec<_> =
            order_ids.iter().map(|id| Box::pin(self.session.execute_unpaged(&self.st.parked, (id,)))).collect();
        let results: Vec<_> = futures::stream::iter(reads).buffered(CONCURRENCY).collect().await;
        let mut out = Vec::new();
        for r in results {
            let rows = r.map_err(backend)?.into_rows_result().map_err(backend)?;
            for row in rows.rows::<ParkedRow>().map_err(backend)? {
                out.push(parked_from(row.map_err(backend)?));
            }
        }
        Ok(out)
    }

    async fn parked_oldest(&self, limit: usize) -> Result<Vec<ParkedEvent>, StoreError> {
        let mut all = self.parked_scan().await?;
        all.sort_by_key(|e| (e.parked_at, e.appended_at_us, e.offset));
        all.truncate(limit);
        Ok(all)
    }

    async fn unpark(&self, events: &[ParkedEvent]) -> Result<(), StoreError> {
        let deletes: Vec<_> = events
            .iter()
            .map(|e| {
                let key = (&e.order_id, e.appended_at_us, e.offset as i64, &e.event_id);
                Box::pin(self.session.execute_unpaged(&self.st.unpark, key))
            })
            .collect();
        let results: Vec<_> = futures::stream::iter(deletes).buffer_unordered(CONCURRENCY).collect().await;
        for r in results {
            r.map_err(backend)?;
        }
        Ok(())
    }
}

#[async_trait]
impl DeadLetters for CqlStore {
    /// Oldest first, day by day.
    async fn dead_letters(&self, limit: usize, cursor: Option<String>) -> Result<Page<DeadLetter>, StoreError> {
        let (days, rows) = (&self.st.letter_days, &self.st.letters);
        let by_day = ByDay { days, rows, edge: OLDEST, first: 0, legacy: Some(0) };
        let page = self.by_day_page(by_day, cursor, limit, "dead-letter", |r: LetterRow| Ok((r.0, r))).await?;
        let mut items = Vec::new();
        for r in page.items {
            let claim = self
                .session
                .execute_unpaged(&self.st.letter_by_id, (&r.1,))
                .await
                .map_err(backend)?
                .into_rows_result()
                .map_err(backend)?;
            let replayed_at =
                claim.maybe_first_row::<(Option<CqlTimeuuid>, Option<i64>)>().map_err(backend)?.and_then(|c| c.1);
            items.push(letter_from(r, replayed_at));
        }
        Ok(Page { items, next_cursor: page.next_cursor })
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.letter_by_id(id).await
    }

    /// A count per day partition (each bounded by a day of letters), and the first
    /// letter of the oldest day. Days before yesterday change only by a purge or a
    /// reset, so their counts are kept for [`TALLY_KEPT`] (this instance's purges and
    /// resets drop them at once; another's show within that time).
    async fn tally(&self) -> Result<LetterTally, StoreError> {
        let settled = (Utc::now().timestamp().div_euclid(86_400) - 1) as i32;
        let days = self.session.execute_unpaged(&self.st.letter_days, (0,)).await.map_err(backend)?;
        let days: Vec<(i32,)> = days
            .into_rows_result()
            .map_err(backend)?
            .rows()
            .map_err(backend)?
            .collect::<Result<_, _>>()
            .map_err(backend)?;
        let mut tally = LetterTally::default();
        for (day,) in days {
            let known = self.tallied.lock().unwrap_or_else(|p| p.into_inner()).get(&day).copied();
            let known = known.filter(|(_, at)| at.elapsed() < TALLY_KEPT).map(|(n, _)| n);
            let n = match known {
                Some(n) => n,
                None => {
                    let counted = self.session.execute_unpaged(&self.st.letter_count, (day,)).await.map_err(backend)?;
                    let (n,) = counted.into_rows_result().map_err(backend)?.first_row::<(i64,)>().map_err(backend)?;
                    if day < settled {
                        self.tallied.lock().unwrap_or_else(|p| p.into_inner()).insert(day, (n, Instant::now()));
                    }
                    n
                }
            };
            tally.held += n as u64;
            if tally.oldest.is_none() && n > 0 {
                let first = self.session.execute_unpaged(&self.st.letter_first, (day,)).await.map_err(backend)?;
                let first = first.into_rows_result().map_err(backend)?.maybe_first_row::<(i64,)>().map_err(backend)?;
                tally.oldest = first.map(|(at,)| from_micros(at));
            }
        }
        Ok(tally)
    }

    /// The letter's row where it is, then its id (conditionally, so that concurrent
    /// purges count it once). A purge cut short between the two leaves an id without a
    /// letter, which reads as no letter.
    async fn purge_letters(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut gone = Vec::new();
        for id in ids {
            let rows = self.session.execute_unpaged(&self.st.letter_by_id, (id,)).await.map_err(backend)?;
            let place = rows.into_rows_result().map_err(backend)?;
            let Some((Some(seq), _)) =
                place.maybe_first_row::<(Option<CqlTimeuuid>, Option<i64>)>().map_err(backend)?
            else {
                continue;
            };
            // At the day of its place, or in bucket 0 if it was written before schema 011:
            // deleted only where it is, so that no partition collects needless tombstones.
            for bucket in [letter_day(seq), 0] {
                let found =
                    self.session.execute_unpaged(&self.st.letter_by_seq, (bucket, seq)).await.map_err(backend)?;
                if found.into_rows_result().map_err(backend)?.rows_num() == 0 {
                    continue;
                }
                self.session.execute_unpaged(&self.st.letter_delete, (bucket, seq)).await.map_err(backend)?;
                self.tallied.lock().unwrap_or_else(|p| p.into_inner()).remove(&bucket);
                break;
            }
            if self.lwt(self.session.execute_unpaged(&self.st.letter_id_delete, (id,))).await? == Some(true) {
                gone.push(id.clone());
            }
        }
        Ok(gone)
    }

    async fn claim_replay(&self, id: &str, undo: bool) -> Result<ReplayClaim, StoreError> {
        let applied = if undo {
            self.lwt(self.session.execute_unpaged(&self.st.replay_undo, (id,))).await?
        } else {
            self.lwt(self.session.execute_unpaged(&self.st.replay_claim, (micros(Utc::now()), id))).await?
        };
        let Some(letter) = self.letter_by_id(id).await? else { return Ok(ReplayClaim::NotFound) };
        Ok(match applied {
            Some(true) => ReplayClaim::Claimed(letter),
            _ => ReplayClaim::AlreadyReplayed(letter),
        })
    }
}

/// Webhook claims one key at a time: a lightweight transaction holds one partition.
impl CqlStore {
    async fn claim_key(&self, key: &str, ttl: Duration, lease: Duration) -> Result<Claim, StoreError> {
        let (ttl_s, now) = (ttl.as_secs() as i32, micros(Utc::now()));
        let fresh = self.lwt(self.session.execute_unpaged(&self.st.claim_delivery, (key, now, ttl_s))).await?;
        match fresh {
            Some(true) => return Ok(Claim::Claimed),
            // Unknown outcome: the key may be ours or another's; refuse, and let Shopify
            // retry. If it was ours, the lease lets that retry take it over.
            None => return Ok(Claim::InFlight),
            Some(false) => {}
        }
        let rows = self.session.execute_unpaged(&self.st.claim_read, (key,)).await.map_err(backend)?;
        let held = rows.into_rows_result().map_err(backend)?.maybe_first_row::<(Option<String>, Option<i64>)>();
        let (state, claimed_at) = match held.map_err(backend)? {
            Some((state, claimed_at)) => (state.unwrap_or_default(), claimed_at.unwrap_or(0)),
            // Expired or released between the two statements: the retry will claim it.
            None => return Ok(Claim::InFlight),
        };
        if state == "done" {
            return Ok(Claim::Done);
        }
        if claimed_at + lease.as_micros() as i64 > now {
            return Ok(Claim::InFlight);
        }
        // Left unconfirmed past its lease: take it over, unless another attempt just did.
        let taken =
            self.lwt(self.session.execute_unpaged(&self.st.claim_takeover, (ttl_s, now, key, claimed_at))).await?;
        Ok(if taken == Some(true) { Claim::Claimed } else { Claim::InFlight })
    }

    async fn confirm_key(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        let ttl_s = ttl.as_secs() as i32;
        let unknown = || StoreError::Unavailable(format!("confirming webhook key {key}: outcome unknown").into());
        match self.lwt(self.session.execute_unpaged(&self.st.confirm_update, (ttl_s, key))).await? {
            Some(true) => Ok(()),
            // Gone (expired or released): write it confirmed.
            Some(false) => {
                let values = (key, micros(Utc::now()), ttl_s);
                match self.lwt(self.session.execute_unpaged(&self.st.confirm_insert, values)).await? {
                    Some(_) => Ok(()),
                    None => Err(unknown()),
                }
            }
            None => Err(unknown()),
        }
    }
}

#[async_trait]
impl WebhookLedger for CqlStore {
    async fn claim_delivery(&self, keys: &[String], ttl: Duration, lease: Duration) -> Result<Claim, StoreError> {
        // One key after the other, always in the caller's order (two copies of a delivery
        // meet on the first); those taken are given back when a later one is held.
        for (taken, key) in keys.iter().enumerate() {
            let held = match self.claim_key(key, ttl, lease).await {
                Ok(Claim::Claimed) => continue,
                held => held,
            };
            if let Err(e) = self.release_delivery(&keys[..taken]).await {
                tracing::warn!(error = %e, "releasing webhook claims failed; they run out their lease");
            }
            return held;
        }
        Ok(Claim::Claimed)
    }

    async fn confirm_delivery(&self, keys: &[String], ttl: Duration) -> Result<(), StoreError> {
        futures::future::try_join_all(keys.iter().map(|key| self.confirm_key(key, ttl))).await.map(|_| ())
    }

    async fn release_delivery(&self, keys: &[String]) -> Result<(), StoreError> {
        let releases = keys.iter().map(|key| self.lwt(self.session.execute_unpaged(&self.st.release_delivery, (key,))));
        futures::future::try_join_all(releases).await.map(|_| ())
    }

    async fn record_delivery(&self, delivery: WebhookDelivery) -> Result<(), StoreError> {
        // Kept for the retention counted from when it was received, like the embedded
        // store's pruning: a record already past it is not kept at all.
        let age = (Utc::now() - delivery.received_at).num_seconds().max(0);
        let ttl = super::DELIVERY_RETENTION.as_secs() as i64 - age;
        if ttl <= 0 {
            return Ok(());
        }
        let day = delivery.received_at.timestamp().div_euclid(86_400) as i32;
        let seq = CqlTimeuuid::from(uuid::Uuid::now_v1(&[0, 0, 0, 0, 0, 2]));
        let body = serde_json::to_string(&delivery).map_err(backend)?;
        self.session.execute_unpaged(&self.st.note_delivery_day, (day,)).await.map_err(backend)?;
        self.session.execute_unpaged(&self.st.record_delivery, (day, seq, body, ttl as i32)).await.map_err(backend)?;
        Ok(())
    }

    /// Oldest first, day by day.
    async fn deliveries(&self, limit: usize, cursor: Option<String>) -> Result<Page<WebhookDelivery>, StoreError> {
        let (days, rows) = (&self.st.delivery_days, &self.st.deliveries);
        let by_day = ByDay { days, rows, edge: OLDEST, first: i32::MIN, legacy: None };
        self.by_day_page(by_day, cursor, limit, "deliveries", json_body).await
    }

    async fn prune_deliveries(&self, _before: DateTime<Utc>) -> Result<u64, StoreError> {
        // The tables' TTLs expire records and claims.
        Ok(0)
    }

    async fn shop(&self, domain: &str) -> Result<Option<ShopRecord>, StoreError> {
        let cql = format!("SELECT body FROM {}.shops WHERE domain = ?", self.keyspace);
        let rows = self.session.query_unpaged(cql, (domain,)).await.map_err(backend)?;
        let row = rows.into_rows_result().map_err(backend)?.maybe_first_row::<(Option<String>,)>().map_err(backend)?;
        let body = row.and_then(|(b,)| b);
        body.map(|b| serde_json::from_str(&b).map_err(|e| StoreError::Backend(e.into()))).transpose()
    }

    async fn set_shop(&self, shop: &ShopRecord) -> Result<(), StoreError> {
        let cql = format!("INSERT INTO {}.shops (domain, body) VALUES (?, ?)", self.keyspace);
        let body = serde_json::to_string(shop).expect("a shop serializes");
        self.session.query_unpaged(cql, (&shop.domain, body)).await.map_err(backend)?;
        Ok(())
    }
}

/// Redaction and requests are rare and run off any request path: plain statements, and
/// scans where the tables have no index for the question (dead letters by payload, cases
/// by order, both bounded by their retention).
#[async_trait]
impl Compliance for CqlStore {
    async fn shop_orders(&self, shop: &str, limit: usize, cursor: Option<String>) -> Result<Page<String>, StoreError> {
        self.shop_page(shop, limit, cursor).await
    }

    async fn delete_shop_orders(&self, shop: &str, ids: &[String]) -> Result<u64, StoreError> {
        self.delete_of_shop(shop, ids).await
    }

    async fn redact_dead_letters(&self, which: ErasureMatch, redact: Redact) -> Result<u64, StoreError> {
        let ks = &self.keyspace;
        let mut rows = self
            .scan::<(i32, CqlTimeuuid, Option<String>, Option<String>)>(format!(
                "SELECT bucket, seq, order_id, payload FROM {ks}.dead_letters"
            ))
            .await?;
        // IF EXISTS: a blind update of a row deleted meanwhile (a reset) would bring
        // back a ghost of it.
        let update = format!("UPDATE {ks}.dead_letters SET payload = ? WHERE bucket = ? AND seq = ? IF EXISTS");
        let mut changed = 0;
        while let Some(row) = rows.next().await {
            let (bucket, seq, order_id, payload) = row.map_err(backend)?;
            let payload = payload.unwrap_or_default();
            if !which.takes(order_id.as_deref(), &payload) {
                continue;
            }
            let redacted = redact(&payload);
            if redacted != payload {
                let applied = self.lwt(self.session.query_unpaged(update.as_str(), (redacted, bucket, seq))).await?;
                changed += u64::from(applied == Some(true));
            }
        }
        Ok(changed)
    }

    async fn redact_parked(&self, order_ids: &[String], redact: Redact) -> Result<u64, StoreError> {
        let update = format!(
            "UPDATE {}.parked SET payload = ? WHERE order_id = ? AND appended_at = ? AND log_offset = ? \
             AND event_id = ? IF EXISTS",
            self.keyspace
        );
        let mut changed = 0;
        for e in self.parked(order_ids.to_vec()).await? {
            let redacted = redact(&e.payload);
            if redacted != e.payload {
                let key = (&e.order_id, e.appended_at_us, e.offset as i64, &e.event_id);
                let values = (redacted, key.0, key.1, key.2, key.3);
                let applied = self.lwt(self.session.query_unpaged(update.as_str(), values)).await?;
                changed += u64::from(applied == Some(true));
            }
        }
        Ok(changed)
    }

    async fn forget_cases(&self, which: ErasureMatch) -> Result<u64, StoreError> {
        let ks = &self.keyspace;
        let cql = format!("SELECT minute, shard, at, event_id, body FROM {ks}.cases");
        let mut rows = self.scan::<(i32, i32, i64, String, Option<String>)>(cql).await?;
        let delete = format!("DELETE FROM {ks}.cases WHERE minute = ? AND shard = ? AND at = ? AND event_id = ?");
        let mut gone = 0;
        while let Some(row) = rows.next().await {
            let (minute, shard, at, event_id, body) = row.map_err(backend)?;
            if body.is_some_and(|b| which.takes_case_body(&b)) {
                self.session.query_unpaged(delete.as_str(), (minute, shard, at, event_id)).await.map_err(backend)?;
                gone += 1;
            }
        }
        Ok(gone)
    }

    async fn save_request(&self, request: &ComplianceRecord) -> Result<(), StoreError> {
        let cql = format!("INSERT INTO {}.compliance (id, received_at, body) VALUES (?, ?, ?)", self.keyspace);
        let values = (&request.id, micros(request.received_at), &request.body);
        self.session.query_unpaged(cql, values).await.map_err(backend)?;
        Ok(())
    }

    async fn request(&self, id: &str) -> Result<Option<ComplianceRecord>, StoreError> {
        let cql = format!("SELECT id, received_at, body FROM {}.compliance WHERE id = ?", self.keyspace);
        let rows = self.session.query_unpaged(cql, (id,)).await.map_err(backend)?;
        let row = rows.into_rows_result().map_err(backend)?.maybe_first_row::<RequestRow>().map_err(backend)?;
        Ok(row.and_then(request_record))
    }

    async fn requests(&self, limit: usize) -> Result<Vec<ComplianceRecord>, StoreError> {
        let cql = format!("SELECT id, received_at, body FROM {}.compliance", self.keyspace);
        let mut rows = self.scan::<RequestRow>(cql).await?;
        let mut all = Vec::new();
        while let Some(row) = rows.next().await {
            all.extend(request_record(row.map_err(backend)?));
        }
        all.sort_by(|a, b| b.received_at.cmp(&a.received_at).then_with(|| b.id.cmp(&a.id)));
        all.truncate(limit);
        Ok(all)
    }
}

type RequestRow = (String, Option<i64>, Option<String>);

fn request_record((id, received_at, body): RequestRow) -> Option<ComplianceRecord> {
    Some(ComplianceRecord { id, received_at: from_micros(received_at?), body: body? })
}

/// The minute (since the epoch) a time falls in.
fn minute_of(t: DateTime<Utc>) -> i32 {
    t.timestamp().div_euclid(60).clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

/// The shard of an order's cases: a stable hash, the same on every instance.
fn case_shard(order_id: &str) -> i32 {
    let h = order_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (h % CASE_SHARDS as u64) as i32
}

/// One case's row in `cases`: minute, shard, at, event id, body, TTL.
type CaseRow<'a> = (i32, i32, i64, &'a str, String, i32);

/// Most cases in one batch, and most bytes of their bodies: a single-partition batch is
/// one mutation, so it costs the cluster about what one write does. Cassandra and
/// ScyllaDB exempt single-partition batches from their batch size thresholds; these
/// bounds keep a batch to a size a node takes in one mutation without strain.
const CASES_PER_BATCH: usize = 100;
const CASE_BATCH_BYTES: usize = 64 * 1024;

/// The cases' rows as batches, each within one partition (a minute's shard) and the
/// bounds above.
fn case_batches(cases: &[Case], ttl: i32) -> Result<Vec<Vec<CaseRow<'_>>>, StoreError> {
    let mut partitions: std::collections::BTreeMap<(i32, i32), Vec<Vec<CaseRow<'_>>>> = Default::default();
    for c in cases {
        let body = serde_json::to_string(c).map_err(backend)?;
        let at = c.recorded_at;
        let key = (minute_of(at), case_shard(&c.event.order_id));
        let batches = partitions.entry(key).or_default();
        let fits = |b: &Vec<CaseRow<'_>>| {
            let bytes: usize = b.iter().map(|r| r.4.len()).sum();
            b.len() < CASES_PER_BATCH && (b.is_empty() || bytes + body.len() <= CASE_BATCH_BYTES)
        };
        if !batches.last().is_some_and(fits) {
            batches.push(Vec::new());
        }
        let last = batches.last_mut().expect("a batch was just pushed");
        last.push((key.0, key.1, micros(at), c.event.event_id.as_str(), body, ttl));
    }
    Ok(partitions.into_values().flatten().collect())
}

impl CqlStore {
    /// Writes one partition's cases as one unlogged batch.
    async fn record_case_batch(&self, rows: Vec<CaseRow<'_>>) -> Result<(), StoreError> {
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_consistency(self.st.record_case.get_consistency().unwrap_or(Consistency::Quorum));
        for _ in &rows {
            batch.append_statement(self.st.record_case.clone());
        }
        self.session.batch(&batch, rows).await.map_err(backend)?;
        Ok(())
    }

    /// The minutes in `from..until` that hold cases, oldest first.
    async fn case_minutes(&self, from: i32, until: i32) -> Result<Vec<i32>, StoreError> {
        let rows = self
            .session
            .execute_unpaged(&self.st.case_minutes, (from, until))
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?;
        rows.rows::<(i32,)>().map_err(backend)?.map(|r| r.map(|(m,)| m).map_err(backend)).collect()
    }
}

#[async_trait]
impl Cases for CqlStore {
    async fn record_cases(&self, cases: Vec<Case>, keep_for: Duration) -> Result<(), StoreError> {
        let ttl = keep_for.as_secs().clamp(1, i32::MAX as u64) as i32;
        let minutes: std::collections::BTreeSet<i32> = cases.iter().map(|c| minute_of(c.recorded_at)).collect();
        for minute in minutes {
            self.session.execute_unpaged(&self.st.note_case_minute, (minute,)).await.map_err(backend)?;
        }
        let batches = case_batches(&cases, ttl)?;
        let pending: Vec<_> = batches.into_iter().map(|rows| Box::pin(self.record_case_batch(rows))).collect();
        let results: Vec<_> = futures::stream::iter(pending).buffer_unordered(CONCURRENCY).collect().await;
        results.into_iter().collect()
    }

    /// Minute by minute; within a minute, the shards' pages merged by time, so at most
    /// a page per shard is held besides what is returned.
    async fn cases_since(&self, since: DateTime<Utc>, limit: usize) -> Result<Vec<Case>, StoreError> {
        let minutes = self.case_minutes(minute_of(since), minute_of(Utc::now()) + 2).await?;
        let (mut out, mut seen) = (Vec::new(), std::collections::HashSet::new());
        for minute in minutes {
            let mut shards = Vec::new();
            for shard in 0..CASE_SHARDS {
                let pager = self
                    .session
                    .execute_iter(self.st.cases.clone(), (minute, shard, micros(since)))
                    .await
                    .map_err(backend)?;
                shards.push(Box::pin(pager.rows_stream::<(i64, String)>().map_err(backend)?.peekable()));
            }
            loop {
                // The shard whose next case is the oldest (an error first, to surface it).
                let mut next: Option<(usize, i64)> = None;
                for (i, shard) in shards.iter_mut().enumerate() {
                    let at = match shard.as_mut().peek().await {
                        Some(Ok((at, _))) => *at,
                        Some(Err(_)) => i64::MIN,
                        None => continue,
                    };
                    if next.is_none_or(|(_, best)| at < best) {
                        next = Some((i, at));
                    }
                }
                let Some((i, _)) = next else { break };
                let Some(row) = shards[i].next().await else { break };
                let (at, body) = row.map_err(backend)?;
                let case: Case = serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                // An event recorded again (a retried round) reads back once, as first recorded.
                if seen.insert(case.event.event_id.clone()) {
                    out.push(Case { recorded_at: from_micros(at), ..case });
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Drops whole minutes past the retention (the rows' TTL would expire them too).
    async fn prune_cases(&self, retention: CaseRetention) -> Result<u64, StoreError> {
        let cutoff = minute_of(Utc::now() - retention.keep_for);
        let minutes = self.case_minutes(i32::MIN, cutoff).await?;
        for &minute in &minutes {
            for shard in 0..CASE_SHARDS {
                self.session.execute_unpaged(&self.st.drop_case_shard, (minute, shard)).await.map_err(backend)?;
            }
            self.session.execute_unpaged(&self.st.drop_case_minute, (minute,)).await.map_err(backend)?;
        }
        // CQL does not count what a partition delete removed: the count is of minutes.
        Ok(minutes.len() as u64)
    }
}

#[async_trait]
impl ActionLog for CqlStore {
    async fn record_action(&self, action: ActionRecord) -> Result<(), StoreError> {
        let day = action.at.timestamp().div_euclid(86_400) as i32;
        let at = CqlTimeuuid::from(uuid::Uuid::now_v1(&[0, 0, 0, 0, 0, 3]));
        let body = serde_json::to_string(&action).map_err(backend)?;
        self.session.execute_unpaged(&self.st.note_action_day, (day,)).await.map_err(backend)?;
        self.session.execute_unpaged(&self.st.record_action, (day, at, body)).await.map_err(backend)?;
        Ok(())
    }

    /// Newest first, day by day.
    async fn actions(&self, limit: usize, cursor: Option<String>) -> Result<Page<ActionRecord>, StoreError> {
        // The largest timeuuid of any time: CQL compares timeuuids by time first.
        let newest = uuid::Uuid::from_u128(0xffff_ffff_ffff_1fff_bfff_ffff_ffff_ffff);
        let (days, rows) = (&self.st.action_days, &self.st.actions);
        let by_day = ByDay { days, rows, edge: newest, first: i32::MAX, legacy: None };
        self.by_day_page(by_day, cursor, limit, "audit", json_body).await
    }
}

/// The smallest version-1 uuid: CQL refuses a nil one as a timeuuid.
const OLDEST: uuid::Uuid = uuid::Uuid::from_u128(0x0000_0000_0000_1000_8000_0000_0000_0000);

/// A row that keeps its record as JSON in `body`, behind its timeuuid.
fn json_body<T: serde::de::DeserializeOwned>(
    (at, body): (CqlTimeuuid, String),
) -> Result<(CqlTimeuuid, T), StoreError> {
    Ok((at, serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?))
}

/// A table partitioned by day, with its index of days: read in the order the statements
/// give (`days` lists days from a bound, `rows` reads one day past a timeuuid).
struct ByDay<'a> {
    days: &'a PreparedStatement,
    rows: &'a PreparedStatement,
    /// The timeuuid bound that takes a whole day.
    edge: uuid::Uuid,
    /// The day bound that takes every day.
    first: i32,
    /// The bucket that held every row before the table had days, if it had such a time:
    /// a cursor given then (a bare timeuuid) reads on from its place there.
    legacy: Option<i32>,
}

impl CqlStore {
    /// One page of a [`ByDay`] table; the cursor is `<day>/<timeuuid>` of the last item.
    async fn by_day_page<R, T>(
        &self,
        table: ByDay<'_>,
        cursor: Option<String>,
        limit: usize,
        what: &str,
        decode: impl Fn(R) -> Result<(CqlTimeuuid, T), StoreError>,
    ) -> Result<Page<T>, StoreError>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let limit = limit.clamp(1, 1000);
        let bad = || StoreError::Cursor(format!("bad {what} cursor"));
        let (mut day, mut bound) = match cursor {
            None => (table.first, table.edge),
            Some(c) => {
                let (day, u) = match (c.split_once('/'), table.legacy) {
                    (Some((d, u)), _) => (d.parse().map_err(|_| bad())?, u),
                    (None, Some(bucket)) => (bucket, c.as_str()),
                    (None, None) => return Err(bad()),
                };
                let at = uuid::Uuid::try_parse(u).ok().filter(|u| u.get_version_num() == 1).ok_or_else(bad)?;
                (day, at)
            }
        };
        let days = self.session.execute_unpaged(table.days, (day,)).await.map_err(backend)?;
        let days: Vec<i32> = days
            .into_rows_result()
            .map_err(backend)?
            .rows::<(i32,)>()
            .map_err(backend)?
            .map(|r| r.map(|(d,)| d).map_err(backend))
            .collect::<Result<_, _>>()?;
        let mut items: Vec<(i32, CqlTimeuuid, T)> = Vec::new();
        for d in days {
            if d != day {
                (day, bound) = (d, table.edge);
            }
            let want = (limit + 1 - items.len()) as i32;
            let rows = self
                .session
                .execute_unpaged(table.rows, (d, CqlTimeuuid::from(bound), want))
                .await
                .map_err(backend)?
                .into_rows_result()
                .map_err(backend)?;
            for r in rows.rows::<R>().map_err(backend)? {
                let (at, item) = decode(r.map_err(backend)?)?;
                items.push((d, at, item));
            }
            if items.len() > limit {
                break;
            }
        }
        let next_cursor = (items.len() > limit).then(|| {
            let (d, at, _) = &items[limit - 1];
            format!("{d}/{}", uuid::Uuid::from(*at))
        });
        Ok(Page { items: items.into_iter().take(limit).map(|(_, _, a)| a).collect(), next_cursor })
    }
}

#[async_trait]
impl Runs for CqlStore {
    /// The run's partitions, read one by one (never a scan of the orders table): the
    /// row's version and every history entry's outcome and time.
    async fn audit(&self, run: &RunKeys) -> Result<Audit, StoreError> {
        let mut audit = Audit::default();
        // In chunks, so a run of millions holds a chunk of reads in memory, not all.
        for chunk in run.id_chunks(4_096) {
            let reads: Vec<_> = chunk.iter().map(|id| Box::pin(self.run_partition(id))).collect();
            let found: Vec<_> = futures::stream::iter(reads).buffer_unordered(CONCURRENCY).collect().await;
            for rows in found {
                audit_partition(&mut audit, rows?);
            }
        }
        Ok(audit)
    }

    /// Each order goes only if it still has the status and the version just read: one
    /// conditional batch fences on the row (CQL allows a condition on static columns only)
    /// and deletes the whole partition, row and history together. It is a Paxos write, so
    /// an entry written after it (every write here is one) has a later timestamp and stays.
    async fn delete_orders(&self, run: &RunKeys, status: Status) -> Result<u64, StoreError> {
        let purge = |id: String| async move {
            match self.get_with(&id, true).await?.filter(|row| row.status == status) {
                Some(row) => self.purge(&row).await,
                None => Ok(false),
            }
        };
        let mut deleted = 0;
        for chunk in run.id_chunks(4_096) {
            let purges: Vec<_> = chunk.iter().map(|id| Box::pin(purge(id.clone()))).collect();
            let done: Vec<_> = futures::stream::iter(purges).buffer_unordered(CONCURRENCY).collect().await;
            for gone in done {
                deleted += u64::from(gone?);
            }
        }
        Ok(deleted)
    }

    async fn reset(&self) -> Result<(), StoreError> {
        let tables = [
            "orders",
            "order_index",
            "order_index_by_minute",
            "order_index_minutes",
            "order_index_by_minute_hours",
            "order_index_hours",
            "order_counts",
            "parked",
            "dead_letters",
            "dead_letter_days",
            "dead_letter_ids",
            "runs",
            "routes",
            "cases",
            "case_minutes",
        ];
        for table in tables {
            self.session.query_unpaged(format!("TRUNCATE {}.{table}", self.keyspace), ()).await.map_err(backend)?;
        }
        self.tallied.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    async fn save_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let cql = format!("INSERT INTO {}.runs (id, started_at, body) VALUES (?, ?, ?)", self.keyspace);
        self.session.query_unpaged(cql, (&run.id, micros(run.started_at), &run.body)).await.map_err(backend)?;
        Ok(())
    }

    async fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let cql = format!("SELECT id, started_at, body FROM {}.runs WHERE id = ?", self.keyspace);
        let rows =
            self.session.query_unpaged(cql, (id,)).await.map_err(backend)?.into_rows_result().map_err(backend)?;
        Ok(rows.maybe_first_row::<RunRow>().map_err(backend)?.and_then(run_record))
    }

    /// Runs are few (one per generated run), so they are read whole and sorted here.
    async fn runs(&self, limit: usize, cursor: Option<String>) -> Result<Page<RunRecord>, StoreError> {
        let offset: usize = match cursor {
            Some(c) => c.parse().map_err(|_| StoreError::Cursor(format!("{c:?} is not a runs cursor")))?,
            None => 0,
        };
        let mut rows = self.scan::<RunRow>(format!("SELECT id, started_at, body FROM {}.runs", self.keyspace)).await?;
        let mut all = Vec::new();
        while let Some(row) = rows.next().await {
            all.extend(run_record(row.map_err(backend)?));
        }
        all.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| b.id.cmp(&a.id)));
        let next_cursor = (all.len() > offset + limit).then(|| (offset + limit).to_string());
        Ok(Page { items: all.into_iter().skip(offset).take(limit).collect(), next_cursor })
    }
}

type RunRow = (String, Option<i64>, Option<String>);

fn run_record((id, started_at, body): RunRow) -> Option<RunRecord> {
    Some(RunRecord { id, started_at: from_micros(started_at?), body: body? })
}

/// The cursor after a page of a timeuuid-clustered table: the last key, if more follow.
impl CqlStore {
    /// The parked table, read whole up to [`PARKED_SCAN_MAX`] rows (it holds few).
    async fn parked_scan(&self) -> Result<Vec<ParkedEvent>, StoreError> {
        let cql = format!("SELECT {PARKED_COLUMNS} FROM {}.parked", self.keyspace);
        let mut rows = self.scan::<ParkedRow>(cql).await?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await {
            out.push(parked_from(row.map_err(backend)?));
            if out.len() >= PARKED_SCAN_MAX {
                break;
            }
        }
        Ok(out)
    }

    /// Every row a query returns, page by page.
    async fn scan<T>(
        &self,
        cql: String,
    ) -> Result<impl futures::Stream<Item = Result<T, scylla::errors::NextRowError>> + use<T>, StoreError>
    where
        T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + 'static,
    {
        let mut statement = scylla::statement::unprepared::Statement::new(cql);
        statement.set_page_size(1000);
        statement.set_consistency(Consistency::Quorum);
        let pager = self.session.query_iter(statement, ()).await.map_err(backend)?;
        pager.rows_stream::<T>().map_err(backend)
    }
}

/// Routes for the Kafka log, shared by every instance (see `log::RouteBook`).
#[async_trait]
impl crate::log::RouteBook for CqlStore {
    async fn routes(&self, keys: Vec<String>) -> Result<HashMap<String, Priority>, crate::log::LogError> {
        let reads: Vec<_> = keys.into_iter().map(|k| Box::pin(self.route_of(k, false))).collect();
        let found: Vec<_> = futures::stream::iter(reads).buffer_unordered(CONCURRENCY).collect().await;
        found.into_iter().filter_map(Result::transpose).collect()
    }

    async fn claim_routes(
        &self,
        routes: Vec<(String, Priority)>,
    ) -> Result<HashMap<String, Priority>, crate::log::LogError> {
        let claim = |(id, p): (String, Priority)| async move {
            let insert = self.session.execute_unpaged(&self.st.claim_route, (&id, p.label()));
            if self.lwt(insert).await.map_err(routes_failed)? == Some(true) {
                return Ok((id, p));
            }
            // Lost, or the outcome is unknown: the route is whichever claim won.
            match self.route_of(id.clone(), true).await? {
                Some(won) => Ok(won),
                None => Err(crate::log::LogError::Unavailable(
                    format!("the route claim of {id} has an unknown outcome and none is recorded").into(),
                )),
            }
        };
        let claims: Vec<_> = routes.into_iter().map(|r| Box::pin(claim(r))).collect();
        let done: Vec<_> = futures::stream::iter(claims).buffer_unordered(CONCURRENCY).collect().await;
        done.into_iter().collect()
    }

    async fn set_routes(&self, routes: Vec<(String, Priority)>) -> Result<(), crate::log::LogError> {
        let write = |(id, p): (String, Priority)| async move {
            self.session.execute_unpaged(&self.st.set_route, (id, p.label())).await.map(|_| ()).map_err(route_error)
        };
        let writes: Vec<_> = routes.into_iter().map(|r| Box::pin(write(r))).collect();
        let done: Vec<_> = futures::stream::iter(writes).buffer_unordered(CONCURRENCY).collect().await;
        done.into_iter().collect()
    }
}

impl CqlStore {
    /// The route of one key, at SERIAL when it must see every claim that won.
    async fn route_of(&self, id: String, serial: bool) -> Result<Option<(String, Priority)>, crate::log::LogError> {
        let st = if serial { &self.st.route_serial } else { &self.st.route };
        let rows = self.session.execute_unpaged(st, (&id,)).await.map_err(route_error)?;
        let rows = rows.into_rows_result().map_err(route_error)?;
        let label = rows.maybe_first_row::<(Option<String>,)>().map_err(route_error)?.and_then(|(p,)| p);
        Ok(label.as_deref().and_then(Priority::parse).map(|p| (id, p)))
    }
}

/// A route that cannot be read or written fails the append: it is refused as a whole
/// (503), and the producer retries. Classified as the store's own errors are.
fn route_error<E: std::error::Error + Send + Sync + 'static>(e: E) -> crate::log::LogError {
    routes_failed(backend(e))
}

fn routes_failed(e: StoreError) -> crate::log::LogError {
    use crate::log::LogError;
    match e {
        StoreError::Unavailable(e) => LogError::Unavailable(Box::new(RoutesFailed(e))),
        StoreError::Backend(e) => LogError::Backend(Box::new(RoutesFailed(e))),
        other => LogError::Backend(other.into()),
    }
}

/// The store failed the order routes the log keeps in it.
#[derive(Debug, thiserror::Error)]
#[error("order routes (CQL): {0}")]
struct RoutesFailed(#[source] crate::error::BoxError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_batched_per_partition_within_bounds() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let case = |i: usize, note_len: usize| {
            let current = crate::store::conformance::row(&format!("o{}", i % 5), 1, &"n".repeat(note_len));
            let event = crate::domain::OrderEvent {
                event_id: format!("e{i}"),
                order_id: current.id.clone(),
                kind: crate::domain::EventKind::Updated,
                source: "test".into(),
                occurred_at: t0,
                payload: Default::default(),
                accepted_at: None,
                shop: None,
            };
            // Two minutes' worth: the first half in one minute, the rest in the next.
            let at = t0 + chrono::Duration::seconds(if i < 500 { 1 } else { 61 });
            Case { event, current: Some(current), recorded_at: at }
        };
        let mut cases: Vec<Case> = (0..1000).map(|i| case(i, 10)).collect();
        // Large bodies: a batch holds fewer of them.
        cases.extend((1000..1040).map(|i| case(i, 20_000)));
        let batches = case_batches(&cases, 60).unwrap();
        let mut seen: Vec<&str> = batches.iter().flatten().map(|r| r.3).collect();
        seen.sort_unstable();
        let mut want: Vec<&str> = cases.iter().map(|c| c.event.event_id.as_str()).collect();
        want.sort_unstable();
        assert_eq!(seen, want, "every case is in exactly one batch");
        for b in &batches {
            assert!(b.iter().all(|r| (r.0, r.1) == (b[0].0, b[0].1)), "a batch spans one partition");
            assert!(b.len() <= CASES_PER_BATCH);
            let bytes: usize = b.iter().map(|r| r.4.len()).sum();
            assert!(b.len() == 1 || bytes <= CASE_BATCH_BYTES, "{bytes} bytes in {} cases", b.len());
        }
        // 5 orders over 2 minutes: 10 partitions at most; 100 small cases per partition
        // would need 2 batches each, the big ones 3 per batch at most.
        assert!(batches.len() < 60, "{} batches for 1,040 cases", batches.len());
        assert!(batches.iter().any(|b| b.len() == CASES_PER_BATCH), "small cases fill a batch");
    }
}
