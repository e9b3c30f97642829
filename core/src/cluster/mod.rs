//! State that every engine instance on one log must share: the `Cluster` port, with a
//! channel each for operator switches, plugin deployments, applied changes and dead
//! letters. Kafka implements it (`kafka.rs`); the embedded default has no cluster, and
//! keeps its switches in a file (`file.rs`).

pub mod file;
pub mod kafka;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{PerPriority, Priority};
use crate::log::{LogError, LogStart};

/// One operator switch, as it goes round the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "switch", rename_all = "snake_case")]
pub enum Control {
    /// An operator's pause or resume of one priority.
    Pause { priority: Priority, paused: bool },
    /// Events of orders under this id prefix are dropped unprocessed (a cancelled run).
    Purge { prefix: String },
    /// A run holds one priority on every instance until `until` (renewed while the run
    /// goes, so that a dead instance's hold lapses by itself); `None` releases it.
    Hold { priority: Priority, until: Option<chrono::DateTime<chrono::Utc>> },
    /// A reset in its stages (see `Engine::reset`).
    Reset { id: String, stage: ResetStage },
    /// `instance` has stopped for reset `id`: its appends and its step in hand are done.
    Stopped { id: String, instance: String },
}

/// How far a cluster-wide reset has gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum ResetStage {
    /// Every instance stops consuming and appending until `until` (a lease, so that a
    /// resetter that dies does not stop the cluster for good) and says it stopped.
    Stop { until: chrono::DateTime<chrono::Utc> },
    /// The log starts at `starts` now and the store is empty: records fetched from
    /// before the starts are dropped, and every instance goes on.
    Done { starts: Vec<LogStart> },
    /// The reset failed before clearing anything: every instance goes on as it was.
    Abandoned,
}

impl Control {
    /// The compaction key: the latest switch per key is what a restart reads back.
    pub fn key(&self) -> String {
        match self {
            Control::Pause { priority, .. } => format!("pause:{}", priority.label()),
            Control::Purge { prefix } => format!("purge:{prefix}"),
            Control::Hold { priority, .. } => format!("hold:{}", priority.label()),
            Control::Reset { .. } => "reset".to_string(),
            Control::Stopped { instance, .. } => format!("stopped:{instance}"),
        }
    }
}

/// What a follower does with each record of a channel.
pub type Apply = Box<dyn FnMut(&[u8]) + Send>;

/// What goes round the cluster, each on a channel of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Operator switches; the latest per key is kept, so a restart reads them back.
    Control,
    /// Plugin deployments; the latest per slot is kept.
    Plugins,
    /// Applied rows, for every instance's WebSocket clients; followed from now on.
    Changes,
    /// Dead letters, for tools outside the engine; the engine never reads them back.
    DeadLetters,
    /// Each instance's beacon once a second (what it did, what it holds); followed from
    /// now on, so every instance can show the whole cluster.
    Pulse,
}

/// Replicated state. Present only where several instances share a log.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Queues a record; [`Cluster::flush`] waits for its acknowledgement. A record the
    /// cluster can never take (too large) is said, counted and skipped, so it cannot
    /// stall the pipeline for ever.
    fn send(&self, channel: Channel, key: &str, payload: &[u8]);

    /// Waits until every record queued so far is acknowledged.
    async fn flush(&self) -> Result<(), LogError>;

    /// Sends one record and waits for its acknowledgement only.
    async fn send_now(&self, channel: Channel, key: &str, payload: &[u8]) -> Result<(), LogError>;

    /// The largest record a channel takes, in bytes.
    fn max_record_bytes(&self) -> usize;

    /// Hands `channel`'s records to `apply`, on a thread of its own: a kept channel's
    /// from its start, caught up before this returns; the changes' from now on. Blocks
    /// while it catches up.
    fn follow(&self, channel: Channel, apply: Apply) -> Result<(), LogError>;

    /// Puts a switch round the cluster, acknowledged: every instance (this one too)
    /// applies it when it comes round, and a restarted one reads it back.
    async fn publish(&self, control: Control) -> Result<(), LogError> {
        let payload = serde_json::to_vec(&control).expect("a switch always serializes");
        self.send_now(Channel::Control, &control.key(), &payload).await
    }
}

/// What the embedded default keeps of its switches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    #[serde(default)]
    pub paused: Vec<Priority>,
    #[serde(default)]
    pub purged: Vec<String>,
}

impl Saved {
    pub fn paused(&self) -> PerPriority<bool> {
        PerPriority::from_fn(|p| self.paused.contains(&p))
    }
}
