//! The engine: wires a log, a store, the rules and the change stream together, and
//! offers the operations the API and the CLI call (ingest, edit, start, shutdown).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::cluster::file::ControlFile;
use crate::cluster::kafka::KafkaCluster;
use crate::cluster::{Channel, Cluster, Control, ResetStage, Saved};
use crate::domain::{EventKind, Order, OrderEvent, Priority, Status};
use crate::failure::LetterFilter;
use crate::journey;
use crate::log::{LogError, OrderLog, Record, embedded::EmbeddedLog};
use crate::pipeline::{Controls, Discards, Pauses, Pipeline, PipelineConfig, RetryCause, Stats};
use crate::plugin::host::{Limits, Runtime};
use crate::plugin::registry::Registry;
use crate::plugin::replication::Replication;
use crate::plugin::{PluginError, Slot};
use crate::rules::Rulebook;
use crate::store::{
    self, Base, DeadLetter, HistoryEntry, ListQuery, Page, StoreError, Stores, Trace, WebhookLedger, Write,
    WriteResult, embedded::EmbeddedStore,
};
use crate::stream::ChangeStream;
use crate::telemetry;
use crate::whatif::{self, WhatIfReport, recorder::Recorder};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub pipeline: PipelineConfig,
    /// How many changes a WebSocket client may fall behind before it must resync.
    pub change_buffer: usize,
    /// Rules as Wasm plugins (the default), or `None` for the native reference rules.
    pub plugins: Option<PluginConfig>,
    /// Whether this instance follows the cluster's changelog for its WebSocket clients
    /// (the default); the bridge, which serves none, does not.
    pub follow_changes: bool,
    /// How long decided events are kept for what-if runs; `None` records none.
    pub cases: Option<store::CaseRetention>,
}

/// Where the order log and the store live: the one switch between backends. A new
/// backend is a variant here and its arm in [`Engine::open`].
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant, reason = "built once at start; boxing buys nothing")]
pub enum Backend {
    /// `log.sqlite` and `store.sqlite` in the data dir: one machine, nothing to run.
    Embedded,
    /// Kafka for the log and a CQL cluster (ScyllaDB) for the store.
    Distributed { kafka: crate::log::kafka::KafkaConfig, cql: crate::store::cql::CqlConfig },
}

impl Backend {
    pub fn is_embedded(&self) -> bool {
        matches!(self, Backend::Embedded)
    }

    /// The same cluster with topics, consumer group and keyspace of its own (benches).
    pub fn isolated(self, name: &str) -> Self {
        match self {
            Backend::Embedded => Backend::Embedded,
            Backend::Distributed { kafka, cql } => Backend::Distributed {
                kafka: crate::log::kafka::KafkaConfig { group: name.to_string(), ..kafka.with_topic_prefix(name) },
                cql: crate::store::cql::CqlConfig { keyspace: name.to_string(), ..cql },
            },
        }
    }
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
        Self {
            pipeline: PipelineConfig::default(),
            change_buffer: 16_384,
            plugins: Some(PluginConfig::default()),
            follow_changes: true,
            cases: Some(store::CaseRetention::default()),
        }
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
    #[error("event {0} was applied after all; replaying it would apply it twice")]
    AlreadyApplied(String),
    #[error("{0}")]
    NotAnEvent(String),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Most dead letters one bulk replay or purge looks at; the answer's cursor goes on
/// from there.
pub const BULK_REPLAY_SCAN: u64 = 100_000;

/// What a purge of dead letters did.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct BulkPurge {
    /// The letters deleted, oldest first.
    pub purged: Vec<String>,
    /// Letters looked at.
    pub scanned: u64,
    /// Where to go on, when letters were left unread (the cap or `limit` came first).
    pub next_cursor: Option<String>,
}

/// Letters a bulk action takes, and how far it read.
struct Matched {
    letters: Vec<DeadLetter>,
    scanned: u64,
    next_cursor: Option<String>,
}

/// What a bulk replay did.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct BulkReplay {
    /// The letters sent through the pipeline again, oldest first.
    pub replayed: Vec<String>,
    /// Matching letters that could not be replayed, with why.
    pub failed: Vec<LetterFailed>,
    /// Letters looked at.
    pub scanned: u64,
    /// Where to go on, when letters were left unread (the cap or `limit` came first).
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LetterFailed {
    pub id: String,
    pub error: String,
}

/// Why a what-if run did not report.
#[derive(Debug, thiserror::Error)]
pub enum WhatIfError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("this engine keeps no decided events (--case-retention-hours 0)")]
    NotRecorded,
    #[error("a what-if run is going on this instance; one at a time")]
    Busy,
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

/// One engine instance. Its parts are private: the API, the runs and the CLI go through
/// the operations below, so each invariant has one owner.
pub struct Engine {
    log: Arc<dyn OrderLog>,
    pub(crate) stores: Stores,
    pub(crate) changes: ChangeStream,
    stats: Arc<Stats>,
    pauses: Arc<Pauses>,
    discards: Arc<Discards>,
    rulebook: Arc<Rulebook>,
    /// Deployed plugin versions; `None` when the engine runs the native rules.
    plugins: Option<Arc<Registry>>,
    config: EngineConfig,
    shutdown: watch::Sender<bool>,
    pipeline: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// Where operator pauses are kept: the cluster (Kafka), or a file (embedded).
    cluster: OnceLock<Arc<dyn Cluster>>,
    /// Carries plugin deployments to the other instances, where there are any.
    replication: OnceLock<Arc<Replication>>,
    /// Plugin changes one at a time, each with its replication, so the cluster sees
    /// them in the order they were made here.
    plugin_changes: Arc<tokio::sync::Mutex<()>>,
    /// What-if runs one at a time: each takes a core while it lasts, to its end even
    /// when its caller goes away.
    what_ifs: Arc<tokio::sync::Mutex<()>>,
    /// Where decided events go for what-if runs, and its writer; set by `start`.
    recorder: Mutex<Option<(Recorder, tokio::task::JoinHandle<()>)>>,
    control_file: OnceLock<ControlFile>,
    /// `instance-id`, locked from open to shutdown (see [`instance_name`]).
    instance_lock: Mutex<Option<std::fs::File>>,
    /// One switch at a time, so none is saved from a stale copy.
    switching: tokio::sync::Mutex<()>,
    /// Appends share it; a reset takes it whole, so no append is half done when the log
    /// is cleared (its events would be gone after a 202).
    appending: tokio::sync::RwLock<()>,
    /// Per instance, the last reset it stopped for (from the control channel).
    reset_stops: Arc<Mutex<HashMap<String, String>>>,
    /// The last order counts and when they were taken: dashboards share one count per
    /// [`COUNTS_FRESH`] (a million rows take a while to count).
    counts: tokio::sync::Mutex<Option<(Instant, store::OrderCounts)>>,
}

/// How long order counts are served from the last count.
const COUNTS_FRESH: Duration = Duration::from_secs(2);

/// Why a reset did not finish. It can be sent again: each part empties what is left.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("clearing the log: {0}")]
    Log(#[source] LogError),
    #[error("emptying the store: {0}")]
    Store(#[source] StoreError),
    #[error("telling the other instances: {0}")]
    Cluster(#[source] LogError),
    #[error("instances that did not stop within {RESET_STOP_WAIT:?}: {}", .0.join(", "))]
    NotStopped(Vec<String>),
}

/// How long a reset waits for every instance to stop before it gives up.
const RESET_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long every instance stays stopped for a reset at most: a resetter that dies
/// midway holds the cluster this long.
const RESET_LEASE: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Why an operator's pause or resume was not kept.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("the cluster did not take the switch: {0}")]
    Cluster(#[source] LogError),
    #[error("saving the switch in the data dir: {0}")]
    File(#[source] std::io::Error),
}

/// Applies an operator switch to this instance.
fn apply_switch(pauses: &Pauses, discards: &Discards, control: Control) {
    match control {
        Control::Pause { priority, paused } => pauses.set(priority, paused),
        Control::Purge { prefix } => discards.add(prefix),
        Control::Hold { priority, until } => pauses.hold_until(priority, until),
        // Resets go round the cluster only, with work to do: `Engine::follow_controls`.
        Control::Reset { .. } | Control::Stopped { .. } => {}
    }
}

/// The data dir holds customer emails and tokens: mode 0700, its files 0600, once the
/// engine has opened them (SQLite gives the files it makes later its database's mode).
fn make_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// How often the engine prunes what webhooks leave behind.
const HOUSEKEEPING_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// How often the dead-letter gauges are read.
const LETTER_TALLY_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// This instance's name, kept in its data dir so that it outlives restarts (the Kafka
/// appender's transactional id is made from it), and the file that holds it, locked:
/// two live instances with one data dir would fence each other's appends for ever (or,
/// on the embedded default, both consume one log), so the second refuses to start.
fn instance_name(data_dir: &Path) -> anyhow::Result<(String, std::fs::File)> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = data_dir.join("instance-id");
    let failed = |e: std::io::Error| anyhow::anyhow!("{}: {e}", path.display());
    let mut file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(failed)?;
    if let Err(e) = file.try_lock() {
        anyhow::bail!(
            "another engine runs with the data dir {} (it holds {}: {e}); give each instance its own --data-dir",
            data_dir.display(),
            path.display()
        );
    }
    let mut name = String::new();
    file.read_to_string(&mut name).map_err(failed)?;
    let name = name.trim().to_string();
    if !name.is_empty() {
        return Ok((name, file));
    }
    let name = uuid::Uuid::now_v7().to_string();
    file.rewind().and_then(|()| file.write_all(name.as_bytes())).and_then(|()| file.sync_all()).map_err(failed)?;
    Ok((name, file))
}

/// Takes a data dir's lock as a starting engine does, for a tool that writes into a
/// stopped engine's files; it is refused while an engine runs there.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    instance_name(data_dir).map(|(_, lock)| lock)
}

impl Engine {
    /// Opens the backend's log and store, with plugin deployments in
    /// `data_dir/plugins.sqlite` (on every backend), ready to [`start`](Self::start).
    /// The data dir is created only when something goes into it.
    pub async fn open(backend: Backend, data_dir: &Path, config: EngineConfig) -> anyhow::Result<Arc<Self>> {
        let keeps_files = backend.is_embedded() || config.plugins.is_some();
        if keeps_files {
            std::fs::create_dir_all(data_dir)
                .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", data_dir.display()))?;
        }
        let engine = Self::open_in(backend, data_dir, config).await?;
        if keeps_files {
            make_private(data_dir).map_err(|e| anyhow::anyhow!("cannot make {} private: {e}", data_dir.display()))?;
        }
        Ok(engine)
    }

    async fn open_in(backend: Backend, data_dir: &Path, config: EngineConfig) -> anyhow::Result<Arc<Self>> {
        let rulebook = crate::plugin::native::rulebook();
        let plugins = match &config.plugins {
            Some(p) => {
                let runtime = Runtime::with_cache(p.limits.clone(), &data_dir.join("plugin-cache"))?;
                Some(Registry::open(&data_dir.join("plugins.sqlite"), runtime, rulebook.clone(), p.max_bytes)?)
            }
            None => None,
        };
        match backend {
            Backend::Embedded => {
                let lock = lock_data_dir(data_dir)?;
                let log = EmbeddedLog::open(&data_dir.join("log.sqlite"))?;
                let store = EmbeddedStore::open(&data_dir.join("store.sqlite"))?;
                let engine = Self::new(Arc::new(log), Stores::of(Arc::new(store)), rulebook, plugins, config);
                // Operator switches outlive the process.
                let file = ControlFile::new(data_dir);
                match file.load() {
                    Ok(saved) => {
                        let paused = saved.paused();
                        for p in Priority::ALL {
                            engine.pauses.set(p, paused[p]);
                        }
                        for prefix in saved.purged {
                            engine.discards.add(prefix);
                        }
                    }
                    // Starting beats not starting: say so loudly; the operator acts again.
                    Err(e) => tracing::error!(error = %e, "saved pauses and purges are unreadable; starting without"),
                }
                let _ = engine.control_file.set(file);
                *engine.instance_lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
                Ok(engine)
            }
            Backend::Distributed { kafka, cql } => {
                // An instance that keeps a data dir has a name that outlives its restarts;
                // one that keeps none (the bridge) is new at every start.
                let (log, instance_lock) = match config.plugins {
                    Some(_) => {
                        let (name, lock) = instance_name(data_dir)?;
                        (crate::log::kafka::KafkaLog::open_as(kafka.clone(), &name).await?, Some(lock))
                    }
                    None => (crate::log::kafka::KafkaLog::open(kafka.clone()).await?, None),
                };
                let cluster: Arc<dyn Cluster> = Arc::new(KafkaCluster::open(kafka)?);
                let cql = Arc::new(crate::store::cql::CqlStore::open(cql).await?);
                log.set_route_book(cql.clone());
                let stores = Stores::of(cql);
                // Deployments go round the cluster: catch up before consuming orders.
                let replication = match plugins.clone() {
                    Some(registry) => {
                        let cluster = cluster.clone();
                        Some(tokio::task::spawn_blocking(move || Replication::start(registry, cluster)).await??)
                    }
                    None => None,
                };
                let engine = if config.follow_changes {
                    // Changes go round the cluster, so every instance's clients see all of them.
                    let changes = ChangeStream::new(config.change_buffer).with_relay(cluster.clone());
                    let stream = changes.clone();
                    let deliver = Box::new(move |payload: &[u8]| stream.deliver_json(payload));
                    let follower = cluster.clone();
                    tokio::task::spawn_blocking(move || follower.follow(Channel::Changes, deliver)).await??;
                    Self::with_changes(log, stores, rulebook, plugins, config, changes)
                } else {
                    Self::new(log, stores, rulebook, plugins, config)
                };
                // Pauses are cluster-wide: catch up on the switches before consuming.
                engine.follow_controls(&cluster).await?;
                let _ = engine.cluster.set(cluster);
                if let Some(lock) = instance_lock {
                    *engine.instance_lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
                }
                if let Some(replication) = replication {
                    let _ = engine.replication.set(replication);
                }
                Ok(engine)
            }
        }
    }

    /// Applies the cluster's switches here as they come round (those made before, first).
    async fn follow_controls(self: &Arc<Self>, cluster: &Arc<dyn Cluster>) -> anyhow::Result<()> {
        let (pauses, discards, log) = (self.pauses.clone(), self.discards.clone(), self.log.clone());
        let (stops, engine, runtime) =
            (self.reset_stops.clone(), Arc::downgrade(self), tokio::runtime::Handle::current());
        let apply = Box::new(move |payload: &[u8]| match serde_json::from_slice::<Control>(payload) {
            Ok(Control::Reset { id, stage: ResetStage::Stop { until } }) if until > Utc::now() => {
                pauses.resetting_until(Some(until));
                let engine = engine.clone();
                runtime.spawn(async move {
                    if let Some(engine) = engine.upgrade() {
                        engine.stop_for_reset(id).await;
                    }
                });
            }
            Ok(Control::Reset { stage: ResetStage::Stop { .. }, .. }) => {}
            Ok(Control::Reset { stage: ResetStage::Done { starts }, .. }) => {
                // Before going on: what was fetched from before the reset is dropped.
                log.cleared_elsewhere(&starts);
                pauses.resetting_until(None);
            }
            Ok(Control::Reset { stage: ResetStage::Abandoned, .. }) => pauses.resetting_until(None),
            Ok(Control::Stopped { id, instance }) => {
                stops.lock().unwrap_or_else(|p| p.into_inner()).insert(instance, id);
            }
            Ok(control) => apply_switch(&pauses, &discards, control),
            Err(e) => tracing::warn!(error = %e, "unreadable record on the control channel"),
        });
        let follower = cluster.clone();
        tokio::task::spawn_blocking(move || follower.follow(Channel::Control, apply)).await??;
        Ok(())
    }

    /// This instance's part in another's (or its own) reset: the appends under way and
    /// the step in hand end, then it says so round the cluster. Its pipeline and its
    /// appends stay stopped until the reset is done (or its lease lapses).
    async fn stop_for_reset(&self, id: String) {
        let stopped = {
            let _appending = self.appending.write().await;
            self.stats.step_boundary(RESET_STOP_WAIT).await
        };
        let (Some(cluster), Some(instance)) = (self.cluster.get(), self.log.member_name()) else { return };
        if !stopped {
            tracing::warn!(reset = %id, "the step in hand did not end in time; not confirming the reset");
            return;
        }
        let payload = serde_json::to_vec(&Control::Stopped { id: id.clone(), instance: instance.clone() })
            .expect("a switch always serializes");
        if let Err(e) = cluster.send_now(Channel::Control, &format!("stopped:{instance}"), &payload).await {
            tracing::warn!(reset = %id, error = %e, "could not confirm the reset's stop");
        }
    }

    /// An engine on any log and store ports (the in-memory test backend uses this).
    pub fn new(
        log: Arc<dyn OrderLog>,
        stores: Stores,
        rulebook: Arc<Rulebook>,
        plugins: Option<Arc<Registry>>,
        config: EngineConfig,
    ) -> Arc<Self> {
        let changes = ChangeStream::new(config.change_buffer);
        Self::with_changes(log, stores, rulebook, plugins, config, changes)
    }

    fn with_changes(
        log: Arc<dyn OrderLog>,
        stores: Stores,
        rulebook: Arc<Rulebook>,
        plugins: Option<Arc<Registry>>,
        config: EngineConfig,
        changes: ChangeStream,
    ) -> Arc<Self> {
        Arc::new(Self {
            log,
            stores,
            changes,
            stats: Arc::new(Stats::new()),
            pauses: Arc::new(Pauses::default()),
            discards: Arc::new(Discards::default()),
            rulebook,
            plugins,
            config,
            shutdown: watch::channel(false).0,
            pipeline: Mutex::new(None),
            cluster: OnceLock::new(),
            replication: OnceLock::new(),
            plugin_changes: Arc::default(),
            what_ifs: Arc::default(),
            recorder: Mutex::new(None),
            control_file: OnceLock::new(),
            instance_lock: Mutex::new(None),
            switching: tokio::sync::Mutex::new(()),
            appending: tokio::sync::RwLock::new(()),
            reset_stops: Arc::default(),
            counts: tokio::sync::Mutex::new(None),
        })
    }

    /// An operator's pause or resume of a priority. Where instances share a log it goes
    /// round the cluster, so every instance follows it; on the embedded default it is
    /// saved in the data dir. Either way it survives restarts.
    pub async fn set_pause(&self, priority: Priority, paused: bool) -> Result<(), SwitchError> {
        self.switch(Control::Pause { priority, paused }).await
    }

    /// A run's hold of a priority (NORMAL while its VIP orders go first), or its release.
    /// Here at once; where instances share a log, also on every other instance until
    /// `lease` from now, so a run renews it while it goes and a dead instance's hold
    /// lapses. Not kept across restarts: a run does not outlive its process.
    pub async fn hold(&self, priority: Priority, held: bool, lease: std::time::Duration) -> Result<(), SwitchError> {
        self.pauses.hold(priority, held);
        if let Some(cluster) = self.cluster.get() {
            let until = held.then(|| chrono::Utc::now() + lease);
            cluster.publish(Control::Hold { priority, until }).await.map_err(SwitchError::Cluster)?;
        }
        Ok(())
    }

    /// Drops every later event of orders under `prefix` unprocessed (a cancelled run's
    /// purge), on every instance and across restarts, like a pause.
    pub async fn purge(&self, prefix: String) -> Result<(), SwitchError> {
        self.switch(Control::Purge { prefix }).await
    }

    /// Keeps a switch where it outlives this process (the cluster, or the data dir), then
    /// applies it here, all under one lock so no save starts from a stale copy.
    async fn switch(&self, control: Control) -> Result<(), SwitchError> {
        let _one_at_a_time = self.switching.lock().await;
        self.keep(&control).await?;
        // Now here too; the cluster's copy comes round to this instance as well.
        apply_switch(&self.pauses, &self.discards, control);
        Ok(())
    }

    async fn keep(&self, control: &Control) -> Result<(), SwitchError> {
        if let Some(cluster) = self.cluster.get() {
            cluster.publish(control.clone()).await.map_err(SwitchError::Cluster)?;
        } else if let Some(file) = self.control_file.get() {
            let mut saved = Saved {
                paused: Priority::ALL.into_iter().filter(|p| self.pauses.operator_paused(*p)).collect(),
                purged: self.discards.prefixes(),
            };
            match control {
                Control::Pause { priority, paused } => {
                    saved.paused.retain(|p| p != priority);
                    if *paused {
                        saved.paused.push(*priority);
                    }
                }
                Control::Purge { prefix } if !saved.purged.contains(prefix) => saved.purged.push(prefix.clone()),
                Control::Purge { .. } | Control::Hold { .. } | Control::Reset { .. } | Control::Stopped { .. } => {}
            }
            file.save(&saved).map_err(SwitchError::File)?;
        }
        Ok(())
    }

    /// Starts consuming the log on a thread of its own: rule calls are CPU work that
    /// must not stall the API's runtime.
    pub async fn start(&self) -> anyhow::Result<()> {
        let consumer = self.log.consumer().await?;
        let controls =
            Controls { stats: self.stats.clone(), pauses: self.pauses.clone(), discards: self.discards.clone() };
        let mut pipeline = Pipeline::new(
            self.stores.orders.clone(),
            self.stores.parking.clone(),
            self.rulebook.clone(),
            self.changes.clone(),
            controls,
            self.config.pipeline.clone(),
        );
        match self.config.cases {
            Some(retention) => {
                let shutdown = self.shutdown.subscribe();
                let stats = self.stats.clone();
                let (recorder, writer) = Recorder::start(self.stores.cases.clone(), retention, stats, shutdown);
                pipeline = pipeline.with_recorder(recorder.clone());
                *self.recorder.lock().unwrap_or_else(|p| p.into_inner()) = Some((recorder, writer));
            }
            // Cases an earlier run kept hold customer data: none is kept now, so they go.
            None => {
                let cases = self.stores.cases.clone();
                tokio::spawn(async move {
                    let none = store::CaseRetention { keep_for: std::time::Duration::ZERO, max_cases: 0 };
                    if let Err(e) = cases.prune_cases(none).await {
                        tracing::warn!(error = %e, "deleting the cases an earlier run kept failed");
                    }
                });
            }
        }
        let shutdown = self.shutdown.subscribe();
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("pipeline".into()).spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime for the pipeline");
            runtime.block_on(pipeline.run(consumer, shutdown));
            let _ = done.send(());
        })?;
        *self.pipeline.lock().unwrap_or_else(|p| p.into_inner()) = Some(finished);
        self.spawn_housekeeping();
        Ok(())
    }

    /// Prunes the webhook delivery audit and expired claims every [`HOUSEKEEPING_EVERY`],
    /// until shutdown: nothing a webhook leaves behind grows without bound.
    fn spawn_housekeeping(&self) {
        self.spawn_letter_tally();
        let webhooks = self.stores.webhooks.clone();
        let mut shutdown = self.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                let before = chrono::Utc::now() - store::DELIVERY_RETENTION;
                match webhooks.prune_deliveries(before).await {
                    Ok(0) => {}
                    Ok(gone) => tracing::info!(gone, "pruned the webhook audit and expired claims"),
                    Err(e) => tracing::warn!(error = %e, "pruning the webhook audit failed; trying again later"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Reads how many dead letters are held, and how old the oldest is, into the gauges
    /// every [`LETTER_TALLY_EVERY`]: letters are kept until an operator deals with them,
    /// so a growing count or age is what an alert watches.
    fn spawn_letter_tally(&self) {
        let letters = self.stores.dead_letters.clone();
        let mut shutdown = self.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                match letters.tally().await {
                    Ok(t) => {
                        let age = t.oldest.map_or(0.0, |at| (chrono::Utc::now() - at).num_milliseconds() as f64 / 1e3);
                        metrics::gauge!(telemetry::DEAD_LETTERS_HELD).set(t.held as f64);
                        metrics::gauge!(telemetry::DEAD_LETTERS_OLDEST_AGE).set(age.max(0.0));
                    }
                    Err(e) => tracing::warn!(error = %e, "counting the dead letters failed; trying again later"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(LETTER_TALLY_EVERY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Finishes the batch in hand, commits it, and makes the commits durable.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let finished = self.pipeline.lock().unwrap_or_else(|p| p.into_inner()).take();
        // The recorder's writer ends once the pipeline's batch in hand is recorded.
        let recorder = self.recorder.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(finished) = finished {
            let _ = finished.await;
        }
        if let Some((recorder, writer)) = recorder {
            drop(recorder);
            if tokio::time::timeout(std::time::Duration::from_secs(10), writer).await.is_err() {
                tracing::warn!("the last recorded cases were not written within 10 s; leaving them");
            }
        }
        if let Err(e) = self.log.flush().await {
            tracing::warn!(error = %e, "flushing the log on shutdown failed");
        }
        if let Some(cluster) = self.cluster.get()
            && let Err(e) = cluster.flush().await
        {
            tracing::warn!(error = %e, "relaying the last changes on shutdown failed");
        }
        // Another engine may take the data dir from here on.
        self.instance_lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Validates and appends events; `Ok` means all of them are durable, `Err` that none is.
    pub async fn ingest(&self, events: &[OrderEvent]) -> Result<usize, IngestError> {
        self.ingest_from(events, false).await
    }

    /// `ingest` for a generated run, the only producer of its orders: their routes need
    /// no claim (on Kafka, a conditional write per new order).
    pub async fn ingest_generated(&self, events: &[OrderEvent]) -> Result<usize, IngestError> {
        self.ingest_from(events, true).await
    }

    async fn ingest_from(&self, events: &[OrderEvent], sole_producer: bool) -> Result<usize, IngestError> {
        let mut ids: HashMap<&str, &str> = HashMap::with_capacity(events.len());
        for (index, e) in events.iter().enumerate() {
            e.validate().map_err(|reason| IngestError::Invalid { index, reason })?;
            if let Some(other) = ids.insert(&e.event_id, &e.order_id)
                && other != e.order_id
            {
                let reason = format!("event_id {} is used for order {other} earlier in this request", e.event_id);
                return Err(IngestError::Invalid { index, reason });
            }
        }
        // An event id names one event of one order. Where the ledger is global (the
        // embedded store), an id already recorded for another order is refused here.
        let recorded = self.stores.orders.recorded_for(ids.keys().map(|id| id.to_string()).collect()).await?;
        for (index, e) in events.iter().enumerate() {
            if let Some(other) = recorded.as_ref().and_then(|r| r.get(&e.event_id))
                && *other != e.order_id
            {
                let reason =
                    format!("event_id {} is already used by order {other}; event ids must be unique", e.event_id);
                return Err(IngestError::Invalid { index, reason });
            }
        }
        // An order keeps its partition, whatever tier a later event names, so its events
        // apply in the order they were produced. The log has the last word: an order with
        // events still queued has a route, which every record of it follows. Without one,
        // an earlier event of this request decides, else the stored row (its priority from
        // creation), else the event's own tier. A create names its order's tier and needs
        // no row lookup (a second create of a stored order is skipped anyway).
        let lookup: Vec<String> = events
            .iter()
            .filter(|e| e.kind != EventKind::Created || e.priority_hint().is_none())
            .map(|e| e.order_id.clone())
            .collect();
        let known = if lookup.is_empty() { Default::default() } else { self.stores.orders.get_many(lookup).await? };
        let mut in_request: HashMap<&str, Priority> = HashMap::new();
        let records: Vec<Record> = events
            .iter()
            .map(|e| {
                let earlier = in_request.get(e.order_id.as_str()).copied();
                let stored = known.get(&e.order_id).map(|o| o.priority);
                let priority = earlier.or(stored).or_else(|| e.priority_hint()).unwrap_or(Priority::Normal);
                in_request.insert(&e.order_id, priority);
                Record {
                    priority,
                    key: e.order_id.clone(),
                    payload: serde_json::to_vec(e).expect("an event always serializes"),
                    sole_producer,
                    creates: e.kind == EventKind::Created && earlier.is_none() && stored.is_none(),
                }
            })
            .collect();
        let _appending = self.appending.read().await;
        // A reset here holds `appending` whole; one from the cluster stops by its hold.
        if self.cluster.get().is_some() && self.pauses.is_resetting() {
            let why = "a reset is under way on the cluster; send the events again once it ends";
            return Err(LogError::Unavailable(why.into()).into());
        }
        // Counted where the records went: a route may differ from the priority asked for.
        let routed = self.log.append(records).await?;
        for p in Priority::ALL {
            metrics::counter!(telemetry::RECEIVED, "priority" => p.label()).increment(routed[p]);
        }
        Ok(events.len())
    }

    /// Applies an operator's edit if the order is still at `expected` version.
    /// Files a delivery that can never become a valid event (a signed webhook with a bad
    /// field) as a dead letter, with a rejected entry in its order's history, and relays
    /// the letter to the dashboards. The letter's id is its event id.
    pub async fn reject_delivery(&self, letter: DeadLetter) -> Result<(), StoreError> {
        let record = Write::Record {
            event_id: letter.id.clone(),
            source: "shopify".into(),
            order_id: letter.order_id.clone().unwrap_or_else(|| "shopify-unknown".into()),
            outcome: store::Outcome::Rejected,
            reason: letter.reason.clone(),
            decided_by: "webhook".into(),
            dead_letter: Some(letter.clone()),
            trace: Trace::default(),
        };
        let written = self.stores.orders.write(vec![record]).await?;
        // A letter under this id exists already (a retry of the same delivery): nothing new to relay.
        if matches!(written.first(), Some((_, WriteResult::Done))) {
            self.changes.dead_letter(&letter);
        }
        Ok(())
    }

    pub async fn edit(&self, id: &str, expected: u64, edit: OrderEdit) -> Result<Order, EditError> {
        if let Some(fee) = edit.shipping_fee_cents
            && fee < 0
        {
            return Err(EditError::Invalid(format!("shipping_fee_cents must not be negative, got {fee}")));
        }
        if let Some(note) = &edit.note {
            crate::domain::check_note(note).map_err(EditError::Invalid)?;
        }
        let current = self.stores.orders.get(id).await?.ok_or(EditError::NotFound)?;
        if current.version != expected {
            return Err(EditError::Stale { expected, current: Box::new(current) });
        }
        let named = crate::ordering::Named {
            status: edit.status.is_some(),
            note: edit.note.is_some(),
            shipping_fee_cents: edit.shipping_fee_cents.is_some(),
            ..Default::default()
        };
        let mut fields = current.fields();
        if let Some(s) = edit.status {
            fields.status = s;
        }
        if let Some(n) = edit.note {
            fields.note = n;
        }
        if let Some(f) = edit.shipping_fee_cents {
            fields.shipping_fee_cents = f;
        }
        if fields == current.fields() {
            return Ok(current);
        }
        // The edit takes its place at its commit, after every change the row holds.
        let row = crate::ordering::edited(&current, fields, named, crate::ordering::edit_place(&current));
        let write = Write::Apply {
            event_id: format!("edit:{}", uuid::Uuid::now_v7()),
            source: "operator".into(),
            base: Some(Base::of(&current)),
            row: row.clone(),
            trace: Trace { changes: crate::journey::changes(Some(&current), &row), ..Trace::default() },
        };
        match self.stores.orders.write(vec![write]).await?.pop().map(|(_, r)| r) {
            Some(WriteResult::Done) => {
                metrics::counter!(telemetry::APPLIED, "priority" => row.priority.label()).increment(1);
                // The edit is committed either way; other instances' clients see it once
                // the changelog has it, or at their next resync.
                if let Err(e) = self.changes.publish_now(row.clone()).await {
                    tracing::warn!(error = %e, order = %row.id, "relaying an edit failed");
                }
                Ok(row)
            }
            Some(WriteResult::Conflict(Some(now))) => Err(EditError::Stale { expected, current: now }),
            Some(WriteResult::Conflict(None)) => Err(EditError::NotFound),
            Some(WriteResult::Duplicate | WriteResult::IdTaken(_)) | None => {
                Err(EditError::Store(StoreError::Backend("the store did not record the edit".into())))
            }
        }
    }

    /// Sends a dead-lettered event through the pipeline again, as a new event
    /// (`<letter id>#replay`), so the original rejection stays in the history. The event
    /// goes on the log first and the letter is marked after: a replay that fails or
    /// crashes in between can be sent again, and its fixed id makes the second copy a
    /// duplicate. Once marked, a letter is not replayed again.
    pub async fn replay(&self, id: &str) -> Result<OrderEvent, ReplayError> {
        let letter = self.stores.dead_letters.dead_letter(id).await?.ok_or(ReplayError::NotFound)?;
        if letter.replayed_at.is_some() {
            return Err(ReplayError::AlreadyReplayed(letter.replayed_at));
        }
        let mut event: OrderEvent = serde_json::from_str(&letter.payload).map_err(|e| {
            ReplayError::NotAnEvent(format!("the dead letter holds no valid event ({e}); fix it and send it again"))
        })?;
        // A letter left by a crash for an event a redelivery then applied: replaying it
        // would apply the event twice.
        if self.was_applied(&event.order_id, &event.event_id).await? {
            return Err(ReplayError::AlreadyApplied(event.event_id));
        }
        // From the letter's id, which is unique (`<event id>@<order>` for a reused id).
        event.event_id = format!("{}#replay", letter.id);
        self.ingest(std::slice::from_ref(&event)).await?;
        // A concurrent replay of the same letter marked it first: the same event went on
        // the log twice, and the ledger applies it once.
        self.stores.dead_letters.claim_replay(id, false).await?;
        Ok(event)
    }

    /// Replays, oldest first, up to `limit` dead letters that `filter` matches and that
    /// were not replayed yet, looking at no more than [`BULK_REPLAY_SCAN`] letters from
    /// `cursor`. Each goes as [`Engine::replay`] sends one; one that fails is reported
    /// and the rest go on, but a store or log that fails stops the whole request.
    pub async fn replay_matching(
        &self,
        filter: &LetterFilter,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<BulkReplay, ReplayError> {
        let found = self.letters_matching(limit, cursor, |l| l.replayed_at.is_none() && filter.matches(l)).await?;
        let mut out = BulkReplay { scanned: found.scanned, next_cursor: found.next_cursor, ..Default::default() };
        for letter in found.letters {
            match self.replay(&letter.id).await {
                Ok(_) => out.replayed.push(letter.id),
                Err(e @ (ReplayError::Store(_) | ReplayError::Ingest(_))) => return Err(e),
                Err(e) => out.failed.push(LetterFailed { id: letter.id, error: e.to_string() }),
            }
        }
        Ok(out)
    }

    /// Deletes for good, oldest first, up to `limit` dead letters that `filter` matches
    /// (and, when `replayed` is given, that were or were not replayed), looking at no
    /// more than [`BULK_REPLAY_SCAN`] letters from `cursor`.
    pub async fn purge_matching(
        &self,
        filter: &LetterFilter,
        replayed: Option<bool>,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<BulkPurge, StoreError> {
        let takes = |l: &DeadLetter| replayed.is_none_or(|r| r == l.replayed_at.is_some()) && filter.matches(l);
        let found = self.letters_matching(limit, cursor, takes).await?;
        let ids: Vec<String> = found.letters.into_iter().map(|l| l.id).collect();
        let purged = self.stores.dead_letters.purge_letters(&ids).await?;
        metrics::counter!(telemetry::DEAD_LETTERS_PURGED).increment(purged.len() as u64);
        tracing::info!(purged = purged.len(), matched = ids.len(), "dead letters purged by an operator");
        Ok(BulkPurge { purged, scanned: found.scanned, next_cursor: found.next_cursor })
    }

    /// Up to `limit` letters that `takes` keeps, oldest first from `cursor`, reading no
    /// more than [`BULK_REPLAY_SCAN`]; the cursor goes on after the last letter looked at.
    async fn letters_matching(
        &self,
        limit: usize,
        mut cursor: Option<String>,
        takes: impl Fn(&DeadLetter) -> bool,
    ) -> Result<Matched, StoreError> {
        let mut out = Matched { letters: Vec::new(), scanned: 0, next_cursor: None };
        loop {
            let page = self.stores.dead_letters.dead_letters(500, cursor.clone()).await?;
            let ids: Vec<String> = page.items.iter().map(|l| l.id.clone()).collect();
            for (looked, letter) in page.items.into_iter().enumerate() {
                if out.letters.len() >= limit {
                    out.next_cursor = self.cursor_after(&cursor, &ids[..looked]).await?;
                    return Ok(out);
                }
                out.scanned += 1;
                if takes(&letter) {
                    out.letters.push(letter);
                }
            }
            cursor = page.next_cursor;
            if cursor.is_none() || out.scanned >= BULK_REPLAY_SCAN || out.letters.len() >= limit {
                out.next_cursor = cursor;
                return Ok(out);
            }
        }
    }

    /// The cursor just after `looked`, the first letters of the page that starts at
    /// `start`. Stores hand out cursors at page ends, so that page is read again up to
    /// there. If a letter looked at was purged meanwhile, the reread reaches past the
    /// last one looked at: it is read once more, up to the last letter looked at that is
    /// still there.
    async fn cursor_after(&self, start: &Option<String>, looked: &[String]) -> Result<Option<String>, StoreError> {
        let letters = &self.stores.dead_letters;
        let Some(last) = looked.last() else { return Ok(start.clone()) };
        let again = letters.dead_letters(looked.len(), start.clone()).await?;
        if again.items.last().is_some_and(|l| &l.id == last) {
            return Ok(again.next_cursor);
        }
        Ok(match again.items.iter().rposition(|l| looked.contains(&l.id)) {
            Some(at) => letters.dead_letters(at + 1, start.clone()).await?.next_cursor,
            None => start.clone(),
        })
    }

    /// Empties the engine: the log's records (so nothing queued before is applied
    /// after), then the store's orders, history, runs and dead letters. The audit stays.
    /// Every instance's pipeline stops meanwhile, and its step in hand ends first; where
    /// instances share the log, their appends and steps in hand too (see
    /// [`Engine::reset_cluster`]).
    pub async fn reset(&self) -> Result<(), ResetError> {
        if let Some(cluster) = self.cluster.get() {
            return self.reset_cluster(cluster).await;
        }
        self.pauses.resetting(true);
        let result = async {
            let _appending = self.appending.write().await;
            self.stats.step_boundary(RESET_STOP_WAIT).await;
            self.log.clear().await.map_err(ResetError::Log)?;
            self.empty_store().await
        }
        .await;
        self.pauses.resetting(false);
        result
    }

    /// A reset of every instance on the log, in three stages round the cluster:
    /// 1. *stop*: each instance ends its appends under way and its step in hand, stops
    ///    both (until a lease), and confirms; this waits for every member of the
    ///    consumer group, or gives up naming those that did not answer;
    /// 2. the log is cleared and the store emptied, here;
    /// 3. *done*, with where the log starts now: each instance drops what it fetched
    ///    from before and goes on (or *abandoned*, when nothing was cleared).
    async fn reset_cluster(&self, cluster: &Arc<dyn Cluster>) -> Result<(), ResetError> {
        let id = uuid::Uuid::now_v7().to_string();
        let until = Utc::now() + RESET_LEASE;
        let stop = Control::Reset { id: id.clone(), stage: ResetStage::Stop { until } };
        cluster.publish(stop).await.map_err(ResetError::Cluster)?;
        let cleared = async {
            self.await_stopped(&id).await?;
            self.log.clear().await.map_err(ResetError::Log)
        }
        .await;
        let emptied = match &cleared {
            Ok(_) => self.empty_store().await,
            Err(_) => Ok(()),
        };
        let stage = match &cleared {
            Ok(starts) => ResetStage::Done { starts: starts.clone() },
            Err(_) => ResetStage::Abandoned,
        };
        let released = cluster.publish(Control::Reset { id, stage }).await;
        cleared?;
        emptied?;
        // Unreleased, the instances go on when the lease lapses.
        released.map_err(ResetError::Cluster)
    }

    /// Waits until every instance consuming the log has stopped for reset `id`.
    async fn await_stopped(&self, id: &str) -> Result<(), ResetError> {
        let deadline = tokio::time::Instant::now() + RESET_STOP_WAIT;
        loop {
            let members = self.log.members().await.map_err(ResetError::Log)?.unwrap_or_default();
            let missing: Vec<String> = {
                let stops = self.reset_stops.lock().unwrap_or_else(|p| p.into_inner());
                members.into_iter().filter(|m| stops.get(m).is_none_or(|stopped| stopped != id)).collect()
            };
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ResetError::NotStopped(missing));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The store's part of a reset.
    async fn empty_store(&self) -> Result<(), ResetError> {
        // Cases still queued would outlive the reset (customer data included).
        self.flush_recorder().await;
        self.stores.runs.reset().await.map_err(ResetError::Store)
    }

    /// Waits until the cases this instance decided so far are written (or given up on).
    async fn flush_recorder(&self) {
        let recorder = self.recorder.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|r| r.0.clone());
        if let Some(recorder) = recorder {
            recorder.flush().await;
        }
    }

    pub fn backend(&self) -> String {
        format!("log={} store={}", self.log.backend(), self.stores.orders.backend())
    }

    /// Whether the log can write and the store reads a row within 2 s (a store that hangs
    /// reads as failing rather than hanging the probe); else what is wrong.
    pub async fn health(&self) -> Result<(), String> {
        let probe = tokio::time::timeout(std::time::Duration::from_secs(2), self.stores.orders.get("__health__")).await;
        let store = match probe {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("the store failed a read: {e}")),
            Err(_) => Some("the store did not answer a read in 2 s".to_string()),
        };
        // An outage shows in the probes above; a fault only here.
        let stuck = self.stats.stalls().into_iter().filter(|s| s.cause == RetryCause::Fault).map(|s| {
            format!("the pipeline cannot process {} events ({} attempts): {}", s.priority.as_str(), s.attempts, s.error)
        });
        let problems: Vec<String> = self.log.problem().into_iter().chain(store).chain(stuck).collect();
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }

    /// Records of this priority on the log, not yet applied.
    pub fn queue_depth(&self, priority: Priority) -> u64 {
        self.log.depth(priority)
    }

    /// Makes every append so far durable (the bridge's shutdown).
    pub async fn flush_log(&self) -> Result<(), LogError> {
        self.log.flush().await
    }

    pub async fn order(&self, id: &str) -> Result<Option<Order>, StoreError> {
        self.stores.orders.get(id).await
    }

    pub async fn orders(&self, query: ListQuery) -> Result<Page<Order>, StoreError> {
        self.stores.orders.list(query).await
    }

    /// Orders by status and priority, at most [`COUNTS_FRESH`] old. One count at a time:
    /// callers meanwhile wait for it rather than start their own.
    pub async fn counts(&self) -> Result<store::OrderCounts, StoreError> {
        let mut last = self.counts.lock().await;
        if let Some((at, counts)) = last.as_ref()
            && at.elapsed() < COUNTS_FRESH
        {
            return Ok(counts.clone());
        }
        let counts = self.stores.orders.counts().await?;
        *last = Some((Instant::now(), counts.clone()));
        Ok(counts)
    }

    /// The order's history, oldest first; `None` when no such order was ever seen.
    /// A page of the order's history; `None` when the order does not exist.
    pub async fn history(
        &self,
        id: &str,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<Option<Page<HistoryEntry>>, StoreError> {
        let history = self.stores.orders.history(id, limit, cursor).await?;
        if history.items.is_empty() && self.stores.orders.get(id).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(history))
    }

    /// The order's row and the journey of its first [`journey::JOURNEY_MAX`] events. The
    /// row is read last, so it is never older than the events shown.
    pub async fn journey(&self, id: &str) -> Result<Option<journey::Journey>, StoreError> {
        let page = self.stores.orders.history(id, journey::JOURNEY_MAX, None).await?;
        let Some(order) = self.stores.orders.get(id).await? else { return Ok(None) };
        Ok(Some(journey::journey(order, page.items, page.next_cursor.is_some())))
    }

    /// Whether the order's history holds `event_id` as applied, page by page.
    async fn was_applied(&self, order_id: &str, event_id: &str) -> Result<bool, StoreError> {
        let mut cursor = None;
        loop {
            let page = self.stores.orders.history(order_id, 1000, cursor).await?;
            if page.items.iter().any(|h| h.event_id == event_id && h.outcome == crate::store::Outcome::Applied) {
                return Ok(true);
            }
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(false),
            }
        }
    }

    pub async fn dead_letters(&self, limit: usize, cursor: Option<String>) -> Result<Page<DeadLetter>, StoreError> {
        self.stores.dead_letters.dead_letters(limit, cursor).await
    }

    /// Webhook deduplication claims and the delivery audit.
    pub fn webhooks(&self) -> &dyn WebhookLedger {
        &*self.stores.webhooks
    }

    /// The audit of operator and admin actions.
    pub fn action_log(&self) -> &dyn store::ActionLog {
        &*self.stores.actions
    }

    /// Generated runs' records, audit, purge and reset.
    pub fn run_store(&self) -> &dyn store::Runs {
        &*self.stores.runs
    }

    /// Applied changes and notices, for WebSocket clients.
    pub fn changes(&self) -> &ChangeStream {
        &self.changes
    }

    /// The pipeline's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Operator pauses and run holds, per priority.
    pub fn pauses(&self) -> &Pauses {
        &self.pauses
    }

    /// Order-id prefixes whose remaining events the pipeline drops (a cancelled run).
    pub fn discards(&self) -> &Discards {
        &self.discards
    }

    /// Deployed plugin versions; `None` when the engine runs the native rules.
    pub fn plugins(&self) -> Option<&Arc<Registry>> {
        self.plugins.as_ref()
    }

    /// This instance's name in its group (`embedded` on the embedded default).
    pub fn instance(&self) -> String {
        self.log.member_name().unwrap_or_else(|| "embedded".into())
    }

    /// The log's partitions: their lag and which this instance holds (Kafka only).
    pub fn placement(&self) -> Option<crate::log::Placement> {
        self.log.placement()
    }

    /// The cluster this instance shares state through; `None` on the embedded default.
    pub fn cluster(&self) -> Option<&Arc<dyn Cluster>> {
        self.cluster.get()
    }

    /// Whether an operator paused `priority` (cluster-wide where there is a cluster).
    pub fn operator_paused(&self, priority: Priority) -> bool {
        self.pauses.operator_paused(priority)
    }

    /// The rules and the resolver deciding now, by slot (`slot@version#sha256:…`).
    pub fn deciding(&self) -> [(&'static str, String); 2] {
        [
            ("order-rules", self.rulebook.rules().id().to_string()),
            ("conflict-resolver", self.rulebook.resolver().id().to_string()),
        ]
    }

    /// A what-if run: `candidate` (order rules) and the active rules decide the events
    /// recorded since `since`, up to `limit`, and the report compares them. Writes nothing.
    pub async fn what_if(
        &self,
        candidate: Vec<u8>,
        since: chrono::DateTime<Utc>,
        limit: usize,
    ) -> Result<WhatIfReport, WhatIfError> {
        let registry = self.plugins.clone().ok_or(PluginError::Disabled)?;
        if self.config.cases.is_none() {
            return Err(WhatIfError::NotRecorded);
        }
        let one_at_a_time = self.what_ifs.clone().try_lock_owned().map_err(|_| WhatIfError::Busy)?;
        // The window holds every event this instance decided before the request, even
        // those still queued for the recorder's writer.
        self.flush_recorder().await;
        let (cases, live_id) = (self.stores.cases.clone(), self.rulebook.rules().id().to_string());
        // On a task of its own, holding the lock to the end: a caller that goes away
        // does not free the core for a second run while this one still decides.
        let run = tokio::spawn(async move {
            let _one_at_a_time = one_at_a_time;
            let sha256 = crate::plugin::sha256_hex(&candidate);
            let (active, candidate) = registry.what_if_pair(candidate).await?;
            let started = std::time::Instant::now();
            let limit = limit.clamp(1, whatif::MAX_CASES);
            // One more than asked: whether the window held more than the limit let in.
            let mut cases = cases.cases_since(since, limit + 1).await?;
            let limited = cases.len() > limit;
            cases.truncate(limit);
            let run = whatif::Run { active_id: live_id, candidate_sha256: sha256, since, limited, started };
            let compared = tokio::task::spawn_blocking(move || {
                whatif::compare(&*active, &*candidate, run, &cases, whatif::DEADLINE)
            });
            compared.await.map_err(|e| PluginError::Runtime(format!("the what-if run stopped: {e}")).into())
        });
        run.await.map_err(|e| PluginError::Runtime(format!("the what-if run stopped: {e}")))?
    }

    /// Runs one change of `slot`'s plugins, then carries the slot's state to the other
    /// instances before answering. It runs to the end on a task of its own, even when
    /// the caller goes away, so no change is left half made.
    pub async fn change_plugins<T, F>(
        &self,
        slot: Slot,
        change: impl FnOnce(Arc<Registry>) -> F + Send + 'static,
    ) -> Result<T, PluginError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, PluginError>> + Send,
    {
        let registry = self.plugins.clone().ok_or(PluginError::Disabled)?;
        let (lock, replication) = (self.plugin_changes.clone(), self.replication.get().cloned());
        let task = tokio::spawn(async move {
            let _one_at_a_time = lock.lock().await;
            let done = change(registry).await?;
            if let Some(replication) = replication {
                replication.publish(slot).await?;
            }
            Ok(done)
        });
        task.await.map_err(|e| PluginError::Runtime(format!("the plugin change stopped: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::instance_name;

    #[test]
    fn an_instance_keeps_its_name_and_a_second_one_in_its_data_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (name, held) = instance_name(dir.path()).unwrap();
        let refused = instance_name(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("give each instance its own --data-dir"), "{refused}");
        drop(held);
        let (again, _held) = instance_name(dir.path()).unwrap();
        assert_eq!(again, name, "the name outlives a restart");
    }

    #[tokio::test]
    async fn a_second_embedded_engine_on_one_data_dir_is_refused() {
        use super::{Backend, Engine, EngineConfig};
        let dir = tempfile::tempdir().unwrap();
        let first = Engine::open(Backend::Embedded, dir.path(), EngineConfig::default()).await.unwrap();
        let Err(refused) = Engine::open(Backend::Embedded, dir.path(), EngineConfig::default()).await else {
            panic!("two engines consumed one embedded log");
        };
        assert!(refused.to_string().contains("another engine runs with the data dir"), "{refused}");
        drop(first);
        Engine::open(Backend::Embedded, dir.path(), EngineConfig::default())
            .await
            .expect("free once the first is gone");
    }
}
