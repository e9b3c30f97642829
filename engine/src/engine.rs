//! The engine: wires a log, a store, the rules and the change stream together, and
//! offers the operations the API and the CLI call (ingest, edit, start, shutdown).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;

use chrono::Utc;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::domain::{Order, OrderEvent, Priority, Status};
use crate::log::{LogError, OrderLog, Record, embedded::EmbeddedLog};
use crate::pipeline::{Discards, Pauses, Pipeline, PipelineConfig, Stats};
use crate::plugin::host::{Limits, Runtime};
use crate::plugin::registry::Registry;
use crate::rules::Rulebook;
use crate::store::{OrderStore, ReplayClaim, StoreError, Write, WriteResult, embedded::EmbeddedStore};
use crate::stream::ChangeStream;
use crate::telemetry;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub pipeline: PipelineConfig,
    /// How many changes a WebSocket client may fall behind before it must resync.
    pub change_buffer: usize,
    /// Rules as Wasm plugins (the default), or `None` for the native reference rules.
    pub plugins: Option<PluginConfig>,
}

#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub limits: Limits,
    /// Largest accepted plugin upload.
    pub max_bytes: usize,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self { limits: Limits::default(), max_bytes: 8 << 20 }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { pipeline: PipelineConfig::default(), change_buffer: 16_384, plugins: Some(PluginConfig::default()) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("event {index}: {reason}")]
    Invalid { index: usize, reason: String },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("dead letter not found")]
    NotFound,
    #[error("already replayed at {0:?}")]
    AlreadyReplayed(Option<chrono::DateTime<Utc>>),
    #[error("{0}")]
    NotAnEvent(String),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("order not found")]
    NotFound,
    #[error("version {expected} is stale; the order is at version {}", current.version)]
    Stale { expected: u64, current: Box<Order> },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An operator's edit. Absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderEdit {
    pub status: Option<Status>,
    pub note: Option<String>,
    pub shipping_fee_cents: Option<i64>,
}

pub struct Engine {
    pub log: Arc<dyn OrderLog>,
    pub store: Arc<dyn OrderStore>,
    pub changes: ChangeStream,
    pub stats: Arc<Stats>,
    pub pauses: Arc<Pauses>,
    pub discards: Arc<Discards>,
    pub rulebook: Arc<Rulebook>,
    /// Deployed plugin versions; `None` when the engine runs the native rules.
    pub plugins: Option<Arc<Registry>>,
    config: EngineConfig,
    shutdown: watch::Sender<bool>,
    pipeline: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl Engine {
    /// The embedded default: `log.sqlite`, `store.sqlite` and `plugins.sqlite` in `data_dir`.
    pub fn open_embedded(data_dir: &Path, config: EngineConfig) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", data_dir.display()))?;
        let log = EmbeddedLog::open(&data_dir.join("log.sqlite"))?;
        let store = EmbeddedStore::open(&data_dir.join("store.sqlite"))?;
        let rulebook = Rulebook::native();
        let plugins = match &config.plugins {
            Some(p) => Some(Registry::open(&data_dir.join("plugins.sqlite"), Runtime::new(p.limits.clone())?, rulebook.clone(), p.max_bytes)?),
            None => None,
        };
        Ok(Self::new(Arc::new(log), Arc::new(store), rulebook, plugins, config))
    }

    /// Kafka and a CQL store; plugin deployments stay in `data_dir/plugins.sqlite`.
    pub async fn open_distributed(
        data_dir: &Path,
        kafka: crate::log::kafka::KafkaConfig,
        cql: crate::store::cql::CqlConfig,
        config: EngineConfig,
    ) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", data_dir.display()))?;
        let log = crate::log::kafka::KafkaLog::open(kafka).await?;
        let store = crate::store::cql::CqlStore::open(cql).await?;
        let rulebook = Rulebook::native();
        let plugins = match &config.plugins {
            Some(p) => Some(Registry::open(&data_dir.join("plugins.sqlite"), Runtime::new(p.limits.clone())?, rulebook.clone(), p.max_bytes)?),
            None => None,
        };
        // Deployments go round a compacted topic: catch up before consuming orders.
        if let Some(registry) = plugins.clone() {
            let follower = log.clone();
            let publisher = log.plugin_publisher();
            let reg = registry.clone();
            tokio::task::spawn_blocking(move || follower.follow_plugins(reg)).await??;
            registry.set_replicator(publisher);
        }
        // Changes go round the changelog topic, so every instance's clients see all of them.
        let changes = ChangeStream::new(config.change_buffer).with_relay(log.changelog());
        let follower = log.clone();
        let stream = changes.clone();
        tokio::task::spawn_blocking(move || follower.follow_changelog(stream)).await??;
        Ok(Self::with_changes(log, Arc::new(store), rulebook, plugins, config, changes))
    }

    pub fn new(
        log: Arc<dyn OrderLog>,
        store: Arc<dyn OrderStore>,
        rulebook: Arc<Rulebook>,
        plugins: Option<Arc<Registry>>,
        config: EngineConfig,
    ) -> Arc<Self> {
        let changes = ChangeStream::new(config.change_buffer);
        Self::with_changes(log, store, rulebook, plugins, config, changes)
    }

    fn with_changes(
        log: Arc<dyn OrderLog>,
        store: Arc<dyn OrderStore>,
        rulebook: Arc<Rulebook>,
        plugins: Option<Arc<Registry>>,
        config: EngineConfig,
        changes: ChangeStream,
    ) -> Arc<Self> {
        Arc::new(Self {
            log,
            store,
            changes,
            stats: Arc::new(Stats::new()),
            pauses: Arc::new(Pauses::default()),
            discards: Arc::new(Discards::default()),
            rulebook,
            plugins,
            config,
            shutdown: watch::channel(false).0,
            pipeline: Mutex::new(None),
        })
    }

    /// Starts consuming the log on a thread of its own: rule calls are CPU work that
    /// must not stall the API's runtime.
    pub async fn start(&self) -> anyhow::Result<()> {
        let consumer = self.log.consumer().await?;
        let pipeline = Pipeline::new(
            self.store.clone(),
            self.rulebook.clone(),
            self.changes.clone(),
            self.stats.clone(),
            self.pauses.clone(),
            self.discards.clone(),
            self.config.pipeline.clone(),
        );
        let shutdown = self.shutdown.subscribe();
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("pipeline".into()).spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime for the pipeline");
            runtime.block_on(pipeline.run(consumer, shutdown));
            let _ = done.send(());
        })?;
        *self.pipeline.lock().unwrap_or_else(|p| p.into_inner()) = Some(finished);
        Ok(())
    }

    /// Finishes the batch in hand, commits it, and makes the commits durable.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let finished = self.pipeline.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(finished) = finished {
            let _ = finished.await;
        }
        if let Err(e) = self.log.flush().await {
            tracing::warn!(error = %e, "flushing the log on shutdown failed");
        }
    }

    /// Validates and appends events; `Ok` means all of them are durable, `Err` that none is.
    pub async fn ingest(&self, events: &[OrderEvent]) -> Result<usize, IngestError> {
        for (index, e) in events.iter().enumerate() {
            e.validate().map_err(|reason| IngestError::Invalid { index, reason })?;
        }
        // Events that name no tier go where their order lives, so an order keeps its partition.
        let unknown: Vec<String> = events.iter().filter(|e| e.priority_hint().is_none()).map(|e| e.order_id.clone()).collect();
        let known = if unknown.is_empty() { Default::default() } else { self.store.get_many(unknown).await? };
        // An earlier event of the same request (its create, say) counts too.
        let mut in_request: HashMap<&str, Priority> = HashMap::new();
        let records: Vec<Record> = events
            .iter()
            .map(|e| {
                let priority = e
                    .priority_hint()
                    .or_else(|| in_request.get(e.order_id.as_str()).copied())
                    .or_else(|| known.get(&e.order_id).map(|o| o.priority))
                    .unwrap_or(Priority::Normal);
                in_request.insert(&e.order_id, priority);
                Record { priority, key: e.order_id.clone(), payload: serde_json::to_vec(e).expect("an event always serializes") }
            })
            .collect();
        let counts = Priority::ALL.map(|p| records.iter().filter(|r| r.priority == p).count() as u64);
        self.log.append(records).await?;
        for p in Priority::ALL {
            metrics::counter!(telemetry::RECEIVED, "priority" => p.label()).increment(counts[p as usize]);
        }
        Ok(events.len())
    }

    /// Applies an operator's edit if the order is still at `expected` version.
    pub async fn edit(&self, id: &str, expected: u64, edit: OrderEdit) -> Result<Order, EditError> {
        if let Some(fee) = edit.shipping_fee_cents
            && fee < 0
        {
            return Err(EditError::Invalid(format!("shipping_fee_cents must not be negative, got {fee}")));
        }
        let current = self.store.get(id).await?.ok_or(EditError::NotFound)?;
        if current.version != expected {
            return Err(EditError::Stale { expected, current: Box::new(current) });
        }
        let mut row = current.clone();
        if let Some(s) = edit.status {
            row.status = s;
        }
        if let Some(n) = edit.note {
            row.note = n;
        }
        if let Some(f) = edit.shipping_fee_cents {
            row.shipping_fee_cents = f;
        }
        if row.fields() == current.fields() {
            return Ok(current);
        }
        row.version = current.version + 1;
        row.updated_at = Utc::now();
        row.decided_by = "operator".into();
        let write = Write::Apply {
            event_id: format!("edit:{}", uuid::Uuid::now_v7()),
            source: "operator".into(),
            expected: Some(expected),
            row: row.clone(),
        };
        match self.store.write(vec![write]).await?.pop().map(|(_, r)| r) {
            Some(WriteResult::Done) => {
                metrics::counter!(telemetry::APPLIED, "priority" => row.priority.label()).increment(1);
                self.changes.publish(row.clone());
                Ok(row)
            }
            Some(WriteResult::Conflict(Some(now))) => Err(EditError::Stale { expected, current: Box::new(now) }),
            Some(WriteResult::Conflict(None)) => Err(EditError::NotFound),
            Some(WriteResult::Duplicate) | None => Err(EditError::Store(StoreError::Backend("edit was not recorded".into()))),
        }
    }

    /// Sends a dead-lettered event through the pipeline again, as a new event
    /// (`<event_id>#replay-<ms>`) so the original rejection stays in the history.
    pub async fn replay(&self, id: &str) -> Result<OrderEvent, ReplayError> {
        let letter = match self.store.claim_replay(id, false).await? {
            ReplayClaim::NotFound => return Err(ReplayError::NotFound),
            ReplayClaim::AlreadyReplayed(l) => return Err(ReplayError::AlreadyReplayed(l.replayed_at)),
            ReplayClaim::Claimed(l) => l,
        };
        let result = async {
            let mut event: OrderEvent = serde_json::from_str(&letter.payload)
                .map_err(|e| ReplayError::NotAnEvent(format!("the dead letter holds no valid event ({e}); fix it and send it again")))?;
            event.event_id = format!("{}#replay-{}", event.event_id, Utc::now().timestamp_millis());
            self.ingest(std::slice::from_ref(&event)).await?;
            Ok(event)
        }
        .await;
        if result.is_err() {
            self.store.claim_replay(id, true).await?;
        }
        result
    }

    pub fn backend(&self) -> String {
        format!("log={} store={}", self.log.backend(), self.store.backend())
    }
}
