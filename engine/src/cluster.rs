//! Operator state that every engine instance on one log must share and keep across
//! restarts (a queue pause, for now): the `Cluster` port, which the Kafka log implements
//! with a compacted topic, and the embedded default's file in the data dir.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{PerPriority, Priority};
use crate::log::LogError;

/// An operator's pause switch of one priority, as it goes round the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseState {
    pub priority: Priority,
    pub paused: bool,
}

/// Replicated operator state. Present only where several instances share a log.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Puts the switch on the replicated log, acknowledged: every instance (this one
    /// too) applies it when it comes round, and a restarted one reads it back.
    async fn publish_pause(&self, state: PauseState) -> Result<(), LogError>;
}

/// The embedded default's pauses: `pauses.json` in the data dir, private to the
/// engine's user, written whole, synced and renamed into place. Callers serialise saves.
pub struct PauseFile(PathBuf);

impl PauseFile {
    pub fn new(data_dir: &Path) -> Self {
        Self(data_dir.join("pauses.json"))
    }

    /// The pauses saved by an earlier run; none when there is no file yet.
    pub fn load(&self) -> std::io::Result<PerPriority<bool>> {
        let text = match std::fs::read_to_string(&self.0) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PerPriority::default()),
            Err(e) => return Err(e),
        };
        let states: Vec<PauseState> = serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", self.0.display())))?;
        let mut paused = PerPriority::default();
        for s in states {
            paused[s.priority] = s.paused;
        }
        Ok(paused)
    }

    pub fn save(&self, paused: PerPriority<bool>) -> std::io::Result<()> {
        let states: Vec<PauseState> =
            Priority::ALL.into_iter().map(|priority| PauseState { priority, paused: paused[priority] }).collect();
        let tmp = self.0.with_extension("json.tmp");
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&tmp)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            file.write_all(&serde_json::to_vec(&states).expect("pause states always serialize"))?;
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
