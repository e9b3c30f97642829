//! Plugin deployments across instances. Each local change of a slot goes round the
//! cluster's plugins channel (the latest per slot is kept) before the request that made
//! it is answered, and every instance applies what the others deployed, with the same
//! version numbers, checked bytes and rollback stack. An instance skips its own states
//! as they come back, and states older than one it has seen.

use std::sync::{Arc, Mutex};

use super::registry::{Registry, SlotState};
use super::{PluginError, Slot};
use crate::cluster::{Channel, Cluster};
use crate::log::LogError;

/// Room in a slot's record for what is not a component: the JSON around them.
const STATE_OVERHEAD: usize = 64 << 10;

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
        // A slot's state carries its active and its shadow component, base64 (4/3 the bytes).
        let room = cluster.max_record_bytes().saturating_sub(STATE_OVERHEAD);
        registry.limit_to_replicable(room / 2 / 4 * 3);
        let origin = uuid::Uuid::new_v4().simple().to_string();
        let seen = Arc::new(Mutex::new([0u64; 2]));
        let runtime = tokio::runtime::Handle::current();
        let (applier, me, last) = (registry.clone(), origin.clone(), seen.clone());
        let apply = move |payload: &[u8]| match serde_json::from_slice::<SlotState>(payload) {
            Ok(state) if state.origin == me => {}
            Ok(state) => {
                let slot = state.slot;
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
            }
            Err(e) => tracing::warn!(error = %e, "unreadable record on the plugins channel"),
        };
        cluster.follow(Channel::Plugins, Box::new(apply))?;
        Ok(Arc::new(Self { registry, cluster, origin, seen }))
    }

    /// Puts the slot's current state round the cluster and waits for its acknowledgement.
    pub async fn publish(&self, slot: Slot) -> Result<(), PluginError> {
        let mut state = self.registry.state(slot)?;
        state.origin = self.origin.clone();
        state.seq = self.seen.lock().unwrap_or_else(|p| p.into_inner())[slot.index()] + 1;
        let payload = serde_json::to_vec(&state).expect("a slot state always serializes");
        self.cluster.send_now(Channel::Plugins, slot.name(), &payload).await.map_err(|e| {
            PluginError::Unreplicated(format!(
                "{slot} changed here, but the other instances did not get it ({e}); send the same request \
                 again (the same bytes reuse their version), or activate the version you want"
            ))
        })?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen[slot.index()] = seen[slot.index()].max(state.seq);
        Ok(())
    }
}
