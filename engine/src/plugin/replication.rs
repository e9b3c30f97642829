//! Plugin deployments across instances: each local change of a slot goes round the
//! cluster's plugins channel (the latest per slot is kept), and every instance applies
//! what the others deployed, with the same version numbers and checked bytes.

use std::sync::Arc;
use std::time::Duration;

use super::Slot;
use super::registry::{Registry, SlotState};
use crate::cluster::{Channel, Cluster};
use crate::log::LogError;

/// Room in a slot's record for what is not a component: the JSON around them.
const STATE_OVERHEAD: usize = 64 << 10;

/// Attempts to publish one state before it is given up (a later change publishes anew).
const ATTEMPTS: u32 = 6;

/// Applies every deployment on the cluster to `registry`: first all that are there
/// (before the engine consumes orders), then new ones as they come. Then carries this
/// instance's own changes to the others. Blocks while it catches up.
pub fn start(registry: Arc<Registry>, cluster: Arc<dyn Cluster>) -> Result<(), LogError> {
    // A slot's state carries its active and its shadow component, base64 (4/3 the bytes).
    let room = cluster.max_record_bytes().saturating_sub(STATE_OVERHEAD);
    registry.limit_to_replicable(room / 2 / 4 * 3);
    let runtime = tokio::runtime::Handle::current();
    let applier = registry.clone();
    let apply = move |payload: &[u8]| match serde_json::from_slice::<SlotState>(payload) {
        Ok(state) => {
            let slot = state.slot;
            if let Err(e) = runtime.block_on(applier.apply(state)) {
                tracing::error!(error = %e, %slot, "could not apply a plugin deployment from another instance");
            }
        }
        Err(e) => tracing::warn!(error = %e, "unreadable record on the plugins channel"),
    };
    cluster.follow(Channel::Plugins, Box::new(apply))?;
    let changes = registry.watch_changes();
    tokio::runtime::Handle::current().spawn(publish_changes(registry, cluster, changes));
    Ok(())
}

/// Publishes each slot's state after a local change, until the registry is gone.
async fn publish_changes(
    registry: Arc<Registry>,
    cluster: Arc<dyn Cluster>,
    mut changes: tokio::sync::watch::Receiver<[u64; 2]>,
) {
    let mut published = *changes.borrow_and_update();
    while changes.changed().await.is_ok() {
        let now = *changes.borrow_and_update();
        for slot in Slot::ALL {
            if now[slot.index()] != published[slot.index()] {
                publish(&registry, &*cluster, slot).await;
            }
        }
        published = now;
    }
}

/// One slot's current state, tried with backoff; given up with an error after
/// [`ATTEMPTS`], since the cluster then stays behind until the next deploy.
async fn publish(registry: &Registry, cluster: &dyn Cluster, slot: Slot) {
    let mut pause = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        let sent = match registry.state(slot) {
            Ok(state) => {
                let payload = serde_json::to_vec(&state).expect("a slot state always serializes");
                cluster.send_now(Channel::Plugins, slot.name(), &payload).await.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match sent {
            Ok(()) => return,
            Err(e) if attempt == ATTEMPTS => {
                tracing::error!(error = %e, %slot, "could not publish a plugin deployment; other instances \
                    keep the previous version until the next deploy");
            }
            Err(e) => {
                tracing::warn!(error = %e, %slot, attempt, "publishing a plugin deployment failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
}
