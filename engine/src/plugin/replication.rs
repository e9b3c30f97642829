//! Plugin deployments across instances. Each local change of a slot goes round the
//! cluster's plugins channel (the latest per slot is kept) before the request that made
//! it is answered, and every instance applies what the others deployed, with the same
//! version numbers, checked bytes and rollback stack. An instance skips its own states
//! as they come back, and states older than one it has seen.
//!
//! A component larger than [`INLINE_MAX`] (Python and JavaScript ones are 12-18 MB) goes
//! round in chunks, each a record keyed by its hash and place, sent before every state
//! that names it: the state then refers to it by hash. A reader that catches up from the
//! channel's start meets a state's chunks before the state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use super::registry::{Registry, Shipped, SlotState};
use super::{PluginError, Slot, sha256_hex};
use crate::cluster::{Channel, Cluster};
use crate::log::LogError;

/// Components up to this size travel inside their slot's state (as engines before
/// chunks expect); larger ones in chunks of this size.
const INLINE_MAX: usize = 1 << 20;
/// Most chunk bytes an instance holds while it waits for the state that names them.
const HELD_MAX: usize = 512 << 20;

/// One piece of a component, on the plugins channel.
#[derive(Debug, Serialize, Deserialize)]
struct Chunk {
    /// The instance that sent it (which skips its own).
    origin: String,
    sha256: String,
    index: u32,
    count: u32,
    /// Base64.
    data: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChunkRecord {
    chunk: Chunk,
}

/// Chunks that came, by the component's hash, until a state names them.
#[derive(Default)]
struct Held {
    parts: HashMap<String, Vec<Option<Vec<u8>>>>,
    bytes: usize,
}

impl Held {
    fn add(&mut self, chunk: Chunk) -> Result<(), String> {
        let data = BASE64.decode(&chunk.data).map_err(|e| format!("chunk of {}: {e}", chunk.sha256))?;
        if chunk.index >= chunk.count || chunk.count > 10_000 {
            return Err(format!("chunk {} of {} for {}", chunk.index, chunk.count, chunk.sha256));
        }
        if self.bytes + data.len() > HELD_MAX {
            // A flood of chunks no state named: start over rather than grow.
            tracing::warn!(held = self.bytes, "plugin chunks held past {HELD_MAX} bytes; dropping them");
            *self = Held::default();
        }
        let parts = self.parts.entry(chunk.sha256).or_insert_with(|| vec![None; chunk.count as usize]);
        if parts.len() != chunk.count as usize {
            return Err("chunks of one component disagree on their count".into());
        }
        self.bytes += data.len();
        if let Some(old) = parts[chunk.index as usize].replace(data) {
            self.bytes -= old.len();
        }
        Ok(())
    }

    /// Puts the component back into a state that ships it in chunks.
    fn fill(&mut self, shipped: &mut Shipped) -> Result<(), String> {
        if shipped.chunks == 0 {
            return Ok(());
        }
        let parts = self.parts.get(&shipped.sha256).ok_or_else(|| format!("no chunks of {}", shipped.sha256))?;
        if parts.len() != shipped.chunks as usize || parts.iter().any(Option::is_none) {
            let have = parts.iter().flatten().count();
            return Err(format!("{have} of {} chunks of {}", shipped.chunks, shipped.sha256));
        }
        let bytes: Vec<u8> = parts.iter().flatten().flatten().copied().collect();
        if sha256_hex(&bytes) != shipped.sha256 {
            return Err(format!("the chunks of {} do not match their hash", shipped.sha256));
        }
        shipped.component = BASE64.encode(&bytes);
        Ok(())
    }

    fn forget(&mut self, sha256: &str) {
        if let Some(parts) = self.parts.remove(sha256) {
            self.bytes -= parts.iter().flatten().map(Vec::len).sum::<usize>();
        }
    }
}

pub struct Replication {
    registry: Arc<Registry>,
    cluster: Arc<dyn Cluster>,
    /// This process, as the origin of the states it publishes.
    origin: String,
    /// Per slot, the highest state number seen or published.
    seen: Arc<Mutex<[u64; 2]>>,
}

impl Replication {
    /// Applies every deployment on the cluster to `registry`: first all that are there
    /// (before the engine consumes orders), then new ones as they come. Blocks while it
    /// catches up. The returned handle publishes this instance's changes.
    pub fn start(registry: Arc<Registry>, cluster: Arc<dyn Cluster>) -> Result<Arc<Self>, LogError> {
        let origin = uuid::Uuid::new_v4().simple().to_string();
        let seen = Arc::new(Mutex::new([0u64; 2]));
        let runtime = tokio::runtime::Handle::current();
        let (applier, me, last) = (registry.clone(), origin.clone(), seen.clone());
        let mut held = Held::default();
        let apply = move |payload: &[u8]| {
            if let Ok(ChunkRecord { chunk }) = serde_json::from_slice::<ChunkRecord>(payload) {
                if chunk.origin != me
                    && let Err(e) = held.add(chunk)
                {
                    tracing::warn!(error = %e, "unusable plugin chunk on the plugins channel");
                }
                return;
            }
            let mut state = match serde_json::from_slice::<SlotState>(payload) {
                Ok(state) if state.origin == me => return,
                Ok(state) => state,
                Err(e) => return tracing::warn!(error = %e, "unreadable record on the plugins channel"),
            };
            let slot = state.slot;
            let filled = held.fill(&mut state.active).and_then(|()| match state.shadow.as_mut() {
                Some(shadow) => held.fill(shadow),
                None => Ok(()),
            });
            if let Err(e) = filled {
                // A later state of the slot comes with its chunks again.
                return tracing::warn!(error = %e, %slot, "a plugin deployment came without its chunks; skipped");
            }
            for sha in std::iter::once(&state.active).chain(state.shadow.as_ref()).map(|s| s.sha256.clone()) {
                held.forget(&sha);
            }
            {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                // Equal numbers come from two instances that published at once: the
                // later one on the log wins, as compaction keeps it.
                if state.seq != 0 && state.seq < last[slot.index()] {
                    return;
                }
                last[slot.index()] = last[slot.index()].max(state.seq);
            }
            if let Err(e) = runtime.block_on(applier.apply(state)) {
                tracing::error!(error = %e, %slot, "could not apply a plugin deployment from another instance");
            }
        };
        cluster.follow(Channel::Plugins, Box::new(apply))?;
        Ok(Arc::new(Self { registry, cluster, origin, seen }))
    }

    /// Puts the slot's current state round the cluster (a large component's chunks
    /// first) and waits for its acknowledgement.
    pub async fn publish(&self, slot: Slot) -> Result<(), PluginError> {
        let mut state = self.registry.state(slot)?;
        state.origin = self.origin.clone();
        state.seq = self.seen.lock().unwrap_or_else(|p| p.into_inner())[slot.index()] + 1;
        let unreplicated = |e: LogError| {
            PluginError::Unreplicated(format!(
                "{slot} changed here, but the other instances did not get it ({e}); send the same request \
                 again (the same bytes reuse their version), or activate the version you want"
            ))
        };
        let chunk_size = INLINE_MAX.min(self.cluster.max_record_bytes() / 2);
        for shipped in std::iter::once(&mut state.active).chain(state.shadow.as_mut()) {
            let bytes = BASE64.decode(&shipped.component).map_err(|e| PluginError::Repo(e.to_string()))?;
            if bytes.len() <= INLINE_MAX {
                continue;
            }
            let count = bytes.len().div_ceil(chunk_size) as u32;
            for (index, part) in bytes.chunks(chunk_size).enumerate() {
                let chunk = Chunk {
                    origin: self.origin.clone(),
                    sha256: shipped.sha256.clone(),
                    index: index as u32,
                    count,
                    data: BASE64.encode(part),
                };
                let payload = serde_json::to_vec(&ChunkRecord { chunk }).expect("a chunk always serializes");
                let key = format!("chunk:{}:{index}", shipped.sha256);
                self.cluster.send_now(Channel::Plugins, &key, &payload).await.map_err(unreplicated)?;
            }
            shipped.component = String::new();
            shipped.chunks = count;
        }
        let payload = serde_json::to_vec(&state).expect("a slot state always serializes");
        self.cluster.send_now(Channel::Plugins, slot.name(), &payload).await.map_err(unreplicated)?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen[slot.index()] = seen[slot.index()].max(state.seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks_of(bytes: &[u8], size: usize) -> Vec<Chunk> {
        let count = bytes.len().div_ceil(size) as u32;
        bytes
            .chunks(size)
            .enumerate()
            .map(|(i, part)| Chunk {
                origin: "a".into(),
                sha256: sha256_hex(bytes),
                index: i as u32,
                count,
                data: BASE64.encode(part),
            })
            .collect()
    }

    #[test]
    fn chunks_come_back_whole_in_any_order_and_only_whole() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut shipped = Shipped { version: 2, sha256: sha256_hex(&bytes), component: String::new(), chunks: 4 };
        let mut held = Held::default();
        let mut chunks = chunks_of(&bytes, 2_500);
        let last = chunks.pop().unwrap();
        chunks.reverse();
        for c in chunks {
            held.add(c).unwrap();
        }
        assert!(held.fill(&mut shipped).unwrap_err().contains("3 of 4 chunks"));
        held.add(last).unwrap();
        held.fill(&mut shipped).unwrap();
        assert_eq!(BASE64.decode(&shipped.component).unwrap(), bytes);
        held.forget(&shipped.sha256);
        assert_eq!(held.bytes, 0);

        // A damaged chunk fails the hash check instead of loading something else.
        let mut bad = chunks_of(&bytes, 2_500);
        bad[1].data = BASE64.encode(vec![0u8; 2_500]);
        for c in bad {
            held.add(c).unwrap();
        }
        let mut shipped = Shipped { component: String::new(), ..shipped };
        assert!(held.fill(&mut shipped).unwrap_err().contains("do not match their hash"));
    }
}
