//! Plugin deployments across instances. Each local change of a slot goes round the
//! cluster's plugins channel (the latest per slot is kept) before the request that made
//! it is answered, and every instance applies what the others deployed, with the same
//! version numbers, checked bytes and rollback stack. An instance skips its own states
//! as they come back, and states older than one it has seen.
//!
//! A component larger than [`INLINE_MAX`] (Python and JavaScript ones are 12-18 MB) goes
//! round in chunks sent before every state that names it: the state then refers to it
//! by hash. Chunks are keyed by slot, role (active or shadow) and place, so compaction
//! keeps only the latest of each. A state whose chunks are not all there yet waits for
//! them (one per slot); one naming a version this instance already holds needs none.

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
    slot: Slot,
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

/// Chunks that came, by slot and the component's hash, and the state of each slot that
/// waits for some, until they make whole components.
#[derive(Default)]
struct Held {
    parts: HashMap<(Slot, String), Vec<Option<Vec<u8>>>>,
    bytes: usize,
    waiting: [Option<SlotState>; 2],
}

impl Held {
    fn add(&mut self, chunk: Chunk) -> Result<(), String> {
        let data = BASE64.decode(&chunk.data).map_err(|e| format!("chunk of {}: {e}", chunk.sha256))?;
        if chunk.index >= chunk.count || chunk.count > 10_000 {
            return Err(format!("chunk {} of {} for {}", chunk.index, chunk.count, chunk.sha256));
        }
        if self.bytes + data.len() > HELD_MAX {
            // Chunks no state named piled up: the oldest slot's go (a state still
            // waiting for them falls back to the versions held here).
            tracing::warn!(held = self.bytes, "plugin chunks held past {HELD_MAX} bytes; dropping them");
            self.parts.clear();
            self.bytes = 0;
        }
        let key = (chunk.slot, chunk.sha256);
        let parts = self.parts.entry(key).or_insert_with(|| vec![None; chunk.count as usize]);
        if parts.len() != chunk.count as usize {
            return Err("chunks of one component disagree on their count".into());
        }
        self.bytes += data.len();
        if let Some(old) = parts[chunk.index as usize].replace(data) {
            self.bytes -= old.len();
        }
        Ok(())
    }

    /// Puts the component back into a state that ships it in chunks; `Ok(false)` while
    /// some are still to come.
    fn fill(&self, slot: Slot, shipped: &mut Shipped) -> Result<bool, String> {
        if shipped.chunks == 0 || !shipped.component.is_empty() {
            return Ok(true);
        }
        let Some(parts) = self.parts.get(&(slot, shipped.sha256.clone())) else { return Ok(false) };
        if parts.len() != shipped.chunks as usize || parts.iter().any(Option::is_none) {
            return Ok(false);
        }
        let bytes: Vec<u8> = parts.iter().flatten().flatten().copied().collect();
        if sha256_hex(&bytes) != shipped.sha256 {
            return Err(format!("the chunks of {} do not match their hash", shipped.sha256));
        }
        shipped.component = BASE64.encode(&bytes);
        Ok(true)
    }

    /// The slot's state, once every component it names is here, or held already.
    fn ready(&mut self, mut state: SlotState, holds: &dyn Fn(&Shipped) -> bool) -> Result<Option<SlotState>, String> {
        let slot = state.slot;
        let mut whole = true;
        for shipped in std::iter::once(&mut state.active).chain(state.shadow.as_mut()) {
            whole &= holds(shipped) || self.fill(slot, shipped)?;
        }
        if !whole {
            self.waiting[slot.index()] = Some(state);
            return Ok(None);
        }
        // Every chunk of the slot is used now, or of a version no later state needs.
        self.parts.retain(|(s, _), _| *s != slot);
        self.bytes = self.parts.values().flatten().flatten().map(Vec::len).sum();
        self.waiting[slot.index()] = None;
        Ok(Some(state))
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
        // While the channel is read from its start, each slot's states are only kept (their
        // versions stored, not compiled) and the latest is applied once caught up: a
        // Python version deployed and replaced since costs no compile at start.
        let catching_up: Arc<Mutex<Option<[Option<SlotState>; 2]>>> = Arc::new(Mutex::new(Some([None, None])));
        let deferred = catching_up.clone();
        let holder = registry.clone();
        let holds = move |slot: Slot, shipped: &Shipped| holder.holds(slot, shipped.version, &shipped.sha256);
        let apply = move |payload: &[u8]| {
            let state = if let Ok(ChunkRecord { chunk }) = serde_json::from_slice::<ChunkRecord>(payload) {
                if chunk.origin == me {
                    return;
                }
                let slot = chunk.slot;
                if let Err(e) = held.add(chunk) {
                    return tracing::warn!(error = %e, "unusable plugin chunk on the plugins channel");
                }
                // The chunk may complete the state that waits for it.
                match held.waiting[slot.index()].take() {
                    Some(state) => state,
                    None => return,
                }
            } else {
                match serde_json::from_slice::<SlotState>(payload) {
                    Ok(state) if state.origin == me => return,
                    Ok(state) => {
                        let slot = state.slot;
                        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                        // Equal numbers come from two instances that published at once:
                        // the later one on the log wins, as compaction keeps it. Counted
                        // before its chunks are whole, so this instance's next state
                        // numbers above it.
                        if state.seq != 0 && state.seq < last[slot.index()] {
                            return;
                        }
                        last[slot.index()] = last[slot.index()].max(state.seq);
                        state
                    }
                    Err(e) => return tracing::warn!(error = %e, "unreadable record on the plugins channel"),
                }
            };
            let slot = state.slot;
            let ready = match held.ready(state, &|shipped| holds(slot, shipped)) {
                Ok(Some(state)) => state,
                Ok(None) => return,
                Err(e) => {
                    return tracing::error!(error = %e, %slot, "a plugin deployment from another instance is damaged");
                }
            };
            // Held while applying, so the catch-up's last states cannot land after newer ones.
            let mut catching_up = deferred.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(latest) = catching_up.as_mut() {
                match applier.keep(&ready) {
                    Ok(()) => latest[slot.index()] = Some(ready),
                    Err(e) => tracing::error!(error = %e, %slot, "could not keep a replicated plugin version"),
                }
                return;
            }
            if let Err(e) = runtime.block_on(applier.apply(ready)) {
                tracing::error!(error = %e, %slot, "could not apply a plugin deployment from another instance");
            }
        };
        cluster.follow(Channel::Plugins, Box::new(apply))?;
        let mut caught_up = catching_up.lock().unwrap_or_else(|p| p.into_inner());
        for state in caught_up.take().into_iter().flatten().flatten() {
            let slot = state.slot;
            if let Err(e) = tokio::runtime::Handle::current().block_on(registry.apply(state)) {
                tracing::error!(error = %e, %slot, "could not apply the cluster's plugin deployment");
            }
        }
        drop(caught_up);
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
        let roles = std::iter::once(("active", &mut state.active)).chain(state.shadow.as_mut().map(|s| ("shadow", s)));
        for (role, shipped) in roles {
            let bytes = BASE64.decode(&shipped.component).map_err(|e| PluginError::Repo(e.to_string()))?;
            if bytes.len() <= INLINE_MAX {
                continue;
            }
            let count = bytes.len().div_ceil(chunk_size) as u32;
            for (index, part) in bytes.chunks(chunk_size).enumerate() {
                let chunk = Chunk {
                    origin: self.origin.clone(),
                    slot,
                    sha256: shipped.sha256.clone(),
                    index: index as u32,
                    count,
                    data: BASE64.encode(part),
                };
                let payload = serde_json::to_vec(&ChunkRecord { chunk }).expect("a chunk always serializes");
                // Per slot, role and place: compaction keeps the latest of each.
                let key = format!("chunk:{slot}:{role}:{index}");
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
                slot: Slot::OrderRules,
                sha256: sha256_hex(bytes),
                index: i as u32,
                count,
                data: BASE64.encode(part),
            })
            .collect()
    }

    fn state(bytes: &[u8], chunks: u32) -> SlotState {
        let active = Shipped { version: 2, sha256: sha256_hex(bytes), component: String::new(), chunks };
        SlotState { slot: Slot::OrderRules, active, shadow: None, stack: vec![1, 2], origin: "a".into(), seq: 1 }
    }

    #[test]
    fn a_state_waits_for_its_chunks_in_any_order_and_takes_only_whole_ones() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let none = |_: &Shipped| false;
        let mut held = Held::default();
        let mut chunks = chunks_of(&bytes, 2_500);
        let last = chunks.pop().unwrap();
        chunks.reverse();
        for c in chunks {
            held.add(c).unwrap();
        }
        // The state came first (a publish cut short, then compaction): it waits.
        assert!(held.ready(state(&bytes, 4), &none).unwrap().is_none());
        held.add(last).unwrap();
        let waiting = held.waiting[0].take().expect("the state waits for its last chunk");
        let ready = held.ready(waiting, &none).unwrap().expect("whole now");
        assert_eq!(BASE64.decode(&ready.active.component).unwrap(), bytes);
        assert_eq!((held.bytes, held.parts.len()), (0, 0), "the chunks are let go");

        // A version this instance holds needs no chunks.
        let ready = held.ready(state(&bytes, 4), &|_| true).unwrap().expect("held here");
        assert!(ready.active.component.is_empty());

        // A damaged chunk fails the hash check instead of loading something else.
        let mut bad = chunks_of(&bytes, 2_500);
        bad[1].data = BASE64.encode(vec![0u8; 2_500]);
        for c in bad {
            held.add(c).unwrap();
        }
        assert!(held.ready(state(&bytes, 4), &none).unwrap_err().contains("do not match their hash"));
    }
}
