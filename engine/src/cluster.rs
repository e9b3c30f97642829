//! Operator state that every engine instance on one log must share and keep across
//! restarts (queue pauses and a cancelled run's purge): the `Cluster` port, which the
//! Kafka log implements with a compacted topic, and the embedded default's file.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{PerPriority, Priority};
use crate::log::LogError;

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
}

impl Control {
    /// The compaction key: the latest switch per key is what a restart reads back.
    pub fn key(&self) -> String {
        match self {
            Control::Pause { priority, .. } => format!("pause:{}", priority.label()),
            Control::Purge { prefix } => format!("purge:{prefix}"),
            Control::Hold { priority, .. } => format!("hold:{}", priority.label()),
        }
    }
}

/// Replicated operator state. Present only where several instances share a log.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Puts the switch on the replicated log, acknowledged: every instance (this one
    /// too) applies it when it comes round, and a restarted one reads it back.
    async fn publish(&self, control: Control) -> Result<(), LogError>;
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

/// The embedded default's switches: `control.json` in the data dir, private to the
/// engine's user, written whole, synced and renamed into place. Callers serialise saves.
pub struct ControlFile(PathBuf);

impl ControlFile {
    pub fn new(data_dir: &Path) -> Self {
        Self(data_dir.join("control.json"))
    }

    /// The switches saved by an earlier run; none when there is no file yet.
    pub fn load(&self) -> std::io::Result<Saved> {
        match std::fs::read_to_string(&self.0) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", self.0.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, saved: &Saved) -> std::io::Result<()> {
        let tmp = self.0.with_extension("json.tmp");
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&tmp)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            file.write_all(&serde_json::to_vec(saved).expect("saved switches always serialize"))?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.0)?;
        // The rename itself is durable only once the directory is.
        if let Some(dir) = self.0.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}
