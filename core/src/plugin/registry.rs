//! The plugin registry: every uploaded version per slot, which one is active (and which
//! runs in shadow), kept durably in `plugins.sqlite` and mirrored into the [`Rulebook`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use utoipa::ToSchema;

use super::calls::LoadedCalls;
use super::host::{Handle, LoadedMemory, Runtime};
use super::{PluginError, Slot, sha256_hex};
use crate::rules::{OrderRules, Rulebook, ShadowReport, ShadowRun};
use crate::sqlite::{from_micros, micros, open};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS versions (
    slot TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    bytes BLOB NOT NULL,
    origin TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (slot, version)
);
CREATE TABLE IF NOT EXISTS slots (
    slot TEXT PRIMARY KEY,
    active INTEGER NOT NULL,
    shadow INTEGER,
    -- Versions activated in turn, as a JSON array; rollback pops the last one.
    stack TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS activations (
    seq INTEGER PRIMARY KEY,
    slot TEXT NOT NULL,
    version INTEGER NOT NULL,
    action TEXT NOT NULL,
    at INTEGER NOT NULL
);
";

/// One stored version.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VersionInfo {
    pub slot: Slot,
    pub version: u64,
    pub sha256: String,
    /// `builtin` or `upload`.
    pub origin: String,
    pub size_bytes: u64,
    pub created_at: DateTime<Utc>,
    /// What rows record as `decided_by` when this version decides.
    pub decided_by: String,
    /// What it holds in memory, while it is loaded on this instance: the active and
    /// shadow versions, and the one a rollback goes to first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<LoadedMemory>,
    /// Its calls on this instance since it was loaded, while it is loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls: Option<LoadedCalls>,
}

/// One change of a slot's active or shadow version.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Activation {
    pub version: u64,
    /// builtin, deploy, shadow, promote, discard, rollback
    pub action: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SlotInfo {
    pub slot: Slot,
    pub active: VersionInfo,
    pub shadow: Option<VersionInfo>,
    pub versions: Vec<VersionInfo>,
    /// Oldest first.
    pub history: Vec<Activation>,
}

/// The answer to a deploy.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deployed {
    pub slot: Slot,
    pub version: u64,
    pub sha256: String,
    pub shadow: bool,
    /// From request to active (or shadowing), including compilation.
    pub activation_ms: f64,
    /// The bytes were a stored version's: that version was made active (or shadowed)
    /// again, and nothing was compiled or stored.
    pub reused: bool,
}

/// Why an upload failed its first call, with what usually causes it.
fn failed_smoke_check(e: &crate::rules::RuleError) -> String {
    if e.kind == crate::rules::RuleErrorKind::Timeout {
        return format!(
            "the component's first call ran past its deadline on every try, with the deadline \
             doubled each time ({e}): it loops, or needs a longer --plugin-deadline-ms"
        );
    }
    format!(
        "the component failed its first call ({e}). The host gives plugins no WASI: a component that \
         reaches for it (a clock, the environment, files) traps. Build Python with `componentize-py \
         ... --stub-wasi` and JavaScript with `componentize-js ... -d all`; in Rust, leave out std's \
         clock, env and fs"
    )
}

const SHADOW_RULES_ONLY: &str = "shadow mode is available for the order-rules slot only";

pub struct Registry {
    runtime: Arc<Runtime>,
    rulebook: Arc<Rulebook>,
    db: Mutex<Connection>,
    /// Loaded versions by (slot, version): compiled once, reused on rollback.
    loaded: Mutex<HashMap<(Slot, u64), Handle>>,
    /// Deploys, promotions and rollbacks happen one at a time.
    changes: tokio::sync::Mutex<()>,
    max_bytes: usize,
}

/// A slot's row: the active version, the shadow one, and the stack rollback pops.
struct SlotRow {
    active: u64,
    shadow: Option<u64>,
    /// Versions that were active, oldest first; the last is the active one.
    stack: Vec<u64>,
}

/// A slot's active and shadow versions with their bytes: what other instances need to
/// run the same plugins. Kafka keeps the latest per slot on a compacted topic.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SlotState {
    pub slot: Slot,
    pub active: Shipped,
    pub shadow: Option<Shipped>,
    /// The versions activated in turn (what rollback pops), so every instance rolls
    /// back alike. Empty from engines before it: then the active version is pushed.
    #[serde(default)]
    pub stack: Vec<u64>,
    /// The instance that published it, which skips its own echo.
    #[serde(default)]
    pub origin: String,
    /// Per slot, later states have higher numbers; an instance skips older ones.
    #[serde(default)]
    pub seq: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Shipped {
    pub version: u64,
    pub sha256: String,
    /// The component, base64; empty when it went round in `chunks` records before the
    /// state (see `replication.rs`).
    pub component: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunks: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `orchestrator_plugin_memory_bytes` of one version and kind (`code`, `instances`).
fn memory_gauge(slot: Slot, version: u64, kind: &'static str) -> metrics::Gauge {
    let labels = [("plugin", slot.name().to_string()), ("version", version.to_string()), ("kind", kind.into())];
    metrics::gauge!(crate::telemetry::PLUGIN_MEMORY, &labels)
}

fn repo(e: rusqlite::Error) -> PluginError {
    PluginError::Repo(e.to_string())
}

impl Registry {
    /// Opens the registry, installing the built-in plugins in empty slots, and puts the
    /// active versions (and shadow) into the rulebook.
    pub fn open(
        path: &Path,
        runtime: Arc<Runtime>,
        rulebook: Arc<Rulebook>,
        max_bytes: usize,
    ) -> Result<Arc<Self>, PluginError> {
        let db = open(path).map_err(repo)?;
        db.execute_batch(SCHEMA).map_err(repo)?;
        let registry = Arc::new(Self {
            runtime,
            rulebook,
            db: Mutex::new(db),
            loaded: Mutex::default(),
            changes: Default::default(),
            max_bytes,
        });
        for slot in Slot::ALL {
            if registry.find_slot_row(slot)?.is_none() {
                registry.insert_version(slot, 1, slot.builtin(), "builtin")?;
                registry.set_slot(slot, SlotRow { active: 1, shadow: None, stack: vec![1] }, "builtin", 1)?;
            }
            let SlotRow { active, shadow, .. } = registry.slot_row(slot)?;
            let loaded = registry.load(slot, active)?;
            registry.install_active(loaded);
            if let Some(v) = shadow {
                registry.install_shadow(Some(registry.load(slot, v)?), v)?;
            }
        }
        // Compiled code of what no stored version is (what-if candidates, say) goes.
        let mut keep = std::collections::HashSet::new();
        for slot in Slot::ALL {
            keep.extend(registry.versions(slot)?.into_iter().map(|v| v.sha256));
        }
        registry.runtime.prune_cache(&keep);
        Ok(registry)
    }

    fn install_active(&self, loaded: Handle) {
        match loaded {
            Handle::Rules(rules) => self.rulebook.set_rules(rules),
            Handle::Resolver(resolver) => self.rulebook.set_resolver(resolver),
        }
    }

    /// Runs `loaded` beside the active rules; only order rules have a shadow.
    fn install_shadow(&self, loaded: Option<Handle>, version: u64) -> Result<(), PluginError> {
        let run = match loaded {
            None => None,
            Some(Handle::Rules(rules)) => Some(ShadowRun::new(rules, version)),
            Some(Handle::Resolver(_)) => return Err(PluginError::State(SHADOW_RULES_ONLY.into())),
        };
        self.rulebook.set_shadow(run);
        Ok(())
    }

    /// The slot's row, which every slot has once the registry is open.
    fn slot_row(&self, slot: Slot) -> Result<SlotRow, PluginError> {
        self.find_slot_row(slot)?.ok_or_else(|| PluginError::Repo(format!("slot {slot} has no row")))
    }

    fn find_slot_row(&self, slot: Slot) -> Result<Option<SlotRow>, PluginError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let row = db
            .query_row("SELECT active, shadow, stack FROM slots WHERE slot = ?1", [slot.name()], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<i64>>(1)?.map(|v| v as u64), r.get::<_, String>(2)?))
            })
            .optional()
            .map_err(repo)?;
        let Some((active, shadow, stack)) = row else { return Ok(None) };
        let stack = serde_json::from_str(&stack).map_err(|e| PluginError::Repo(format!("slot {slot}'s stack: {e}")))?;
        Ok(Some(SlotRow { active, shadow, stack }))
    }

    /// Records the slot's new state, and `action` on version `subject` in its history.
    fn set_slot(&self, slot: Slot, row: SlotRow, action: &str, subject: u64) -> Result<(), PluginError> {
        let SlotRow { active, shadow, stack } = row;
        let rollback_target = stack.len().checked_sub(2).map(|i| stack[i]);
        let stack = serde_json::to_string(&stack).map_err(|e| PluginError::Repo(e.to_string()))?;
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let tx = db.transaction().map_err(repo)?;
        tx.execute(
            "INSERT INTO slots (slot, active, shadow, stack) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(slot) DO UPDATE
             SET active = excluded.active, shadow = excluded.shadow, stack = excluded.stack",
            params![slot.name(), active as i64, shadow.map(|v| v as i64), stack],
        )
        .map_err(repo)?;
        tx.execute(
            "INSERT INTO activations (slot, version, action, at) VALUES (?1, ?2, ?3, ?4)",
            params![slot.name(), subject as i64, action, micros(Utc::now())],
        )
        .map_err(repo)?;
        tx.commit().map_err(repo)?;
        drop(db);
        self.unload_idle(slot, [Some(active), shadow, rollback_target]);
        Ok(())
    }

    /// Drops the loaded versions of `slot` other than `keep` (what runs, and the version
    /// a rollback goes to first): each holds its compiled code and idle instances, tens
    /// of MiB for a Python plugin. One needed again loads from the compile cache.
    fn unload_idle(&self, slot: Slot, keep: [Option<u64>; 3]) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let idle: Vec<u64> =
            loaded.keys().filter(|(s, v)| *s == slot && !keep.contains(&Some(*v))).map(|(_, v)| *v).collect();
        for version in idle {
            loaded.remove(&(slot, version));
            // Its series read zero from now on, not what it held when last reported.
            for kind in ["code", "instances"] {
                memory_gauge(slot, version, kind).set(0.0);
            }
        }
    }

    fn next_version(&self, slot: Slot) -> Result<u64, PluginError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        db.query_row("SELECT coalesce(max(version), 0) + 1 FROM versions WHERE slot = ?1", [slot.name()], |r| {
            r.get::<_, i64>(0)
        })
        .map(|v| v as u64)
        .map_err(repo)
    }

    fn insert_version(&self, slot: Slot, version: u64, bytes: &[u8], origin: &str) -> Result<(), PluginError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        db.execute(
            "INSERT INTO versions (slot, version, sha256, bytes, origin, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![slot.name(), version as i64, sha256_hex(bytes), bytes, origin, micros(Utc::now())],
        )
        .map_err(repo)?;
        Ok(())
    }

    /// The loaded version, compiling it from the repository on first use.
    fn load(&self, slot: Slot, version: u64) -> Result<Handle, PluginError> {
        if let Some(l) = self.loaded.lock().unwrap_or_else(|p| p.into_inner()).get(&(slot, version)) {
            return Ok(l.clone());
        }
        let (bytes, sha) = self.version_bytes(slot, version)?;
        let loaded = self.runtime.compile(slot, &bytes)?.load(version, &sha);
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).insert((slot, version), loaded.clone());
        Ok(loaded)
    }

    /// Whether this instance stores `version` of `slot` with these bytes.
    pub fn holds(&self, slot: Slot, version: u64, sha256: &str) -> bool {
        self.versions(slot).is_ok_and(|vs| vs.iter().any(|v| v.version == version && v.sha256 == sha256))
    }

    /// A stored version's component and its sha256.
    fn version_bytes(&self, slot: Slot, version: u64) -> Result<(Vec<u8>, String), PluginError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        db.query_row(
            "SELECT bytes, sha256 FROM versions WHERE slot = ?1 AND version = ?2",
            params![slot.name(), version as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(repo)
    }

    /// Checks, stores and activates (or shadows) an uploaded component.
    pub async fn deploy(self: &Arc<Self>, slot: Slot, bytes: Vec<u8>, shadow: bool) -> Result<Deployed, PluginError> {
        let started = Instant::now();
        if bytes.len() > self.max_bytes {
            return Err(PluginError::Invalid(format!(
                "the module is {} bytes; the limit is {} bytes (raise it with --max-plugin-bytes)",
                bytes.len(),
                self.max_bytes
            )));
        }
        if shadow && slot != Slot::OrderRules {
            return Err(PluginError::Invalid(SHADOW_RULES_ONLY.into()));
        }
        let _one_at_a_time = self.changes.lock().await;
        let me = self.clone();
        let deployed = tokio::task::spawn_blocking(move || {
            let sha256 = sha256_hex(&bytes);
            let took = || started.elapsed().as_secs_f64() * 1e3;
            // The bytes of a stored version: that version again, nothing compiled or stored.
            if let Some(v) = me.versions(slot)?.into_iter().find(|v| v.sha256 == sha256) {
                me.install_version(slot, v.version, shadow, "deploy")?;
                let version = v.version;
                return Ok(Deployed { slot, version, sha256, shadow, reused: true, activation_ms: took() });
            }
            // Compile and call once before storing anything: a component that cannot run
            // never becomes a version.
            let version = me.next_version(slot)?;
            let loaded = me.runtime.compile(slot, &bytes)?.load(version, &sha256);
            loaded.smoke_check().map_err(|e| PluginError::Invalid(failed_smoke_check(&e)))?;
            me.insert_version(slot, version, &bytes, "upload")?;
            me.loaded.lock().unwrap_or_else(|p| p.into_inner()).insert((slot, version), loaded);
            me.install_version(slot, version, shadow, "deploy")?;
            Ok(Deployed { slot, version, sha256, shadow, reused: false, activation_ms: took() })
        })
        .await
        .map_err(|e| PluginError::Runtime(e.to_string()))??;
        Ok(deployed)
    }

    /// The two sides of a what-if run, each loaded apart from the live versions (own
    /// instances, no plugin metrics): the active order rules, and `candidate` under the
    /// same size limit and first call as a deploy. Nothing is stored; compiled code goes
    /// to the cache, so deploying the same bytes next compiles nothing.
    pub async fn what_if_pair(
        self: &Arc<Self>,
        candidate: Vec<u8>,
    ) -> Result<(Arc<dyn OrderRules>, Arc<dyn OrderRules>), PluginError> {
        if candidate.len() > self.max_bytes {
            return Err(PluginError::Invalid(format!(
                "the module is {} bytes; the limit is {} bytes (raise it with --max-plugin-bytes)",
                candidate.len(),
                self.max_bytes
            )));
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let rules = |handle: Handle| match handle {
                Handle::Rules(rules) => Ok(rules as Arc<dyn OrderRules>),
                Handle::Resolver(_) => Err(PluginError::Invalid("the component is not order rules".into())),
            };
            let slot = Slot::OrderRules;
            let handle = me.runtime.compile(slot, &candidate)?.load_apart(&sha256_hex(&candidate));
            handle.smoke_check().map_err(|e| PluginError::Invalid(failed_smoke_check(&e)))?;
            let (bytes, sha) = me.version_bytes(slot, me.slot_row(slot)?.active)?;
            let active = me.runtime.compile(slot, &bytes)?.load_apart(&sha);
            Ok((rules(active)?, rules(handle)?))
        })
        .await
        .map_err(|e| PluginError::Runtime(e.to_string()))?
    }

    /// Makes a stored version active, or (`shadow`) runs it beside the active one.
    fn install_version(&self, slot: Slot, version: u64, shadow: bool, action: &str) -> Result<(), PluginError> {
        let SlotRow { active, shadow: shadowed, mut stack } = self.slot_row(slot)?;
        if shadow {
            if version == active {
                let why = format!("{slot}@{version} is the active version; a shadow runs a different one");
                return Err(PluginError::State(why));
            }
            if shadowed != Some(version) {
                let loaded = self.load(slot, version)?;
                self.set_slot(slot, SlotRow { active, shadow: Some(version), stack }, "shadow", version)?;
                self.install_shadow(Some(loaded), version)?;
            }
            return Ok(());
        }
        if version == active {
            if shadowed == Some(version) {
                self.set_slot(slot, SlotRow { active, shadow: None, stack }, action, version)?;
                self.rulebook.set_shadow(None);
            }
            return Ok(());
        }
        let loaded = self.load(slot, version)?;
        stack.push(version);
        // Activating the shadow version ends its shadow run.
        let still_shadowed = shadowed.filter(|v| *v != version);
        self.set_slot(slot, SlotRow { active: version, shadow: still_shadowed, stack }, action, version)?;
        if still_shadowed != shadowed {
            self.rulebook.set_shadow(None);
        }
        self.install_active(loaded);
        Ok(())
    }

    /// Makes the shadow version the active one.
    pub async fn promote(&self, slot: Slot) -> Result<VersionInfo, PluginError> {
        let _one_at_a_time = self.changes.lock().await;
        let SlotRow { shadow, .. } = self.slot_row(slot)?;
        let version = shadow.ok_or_else(|| PluginError::State(format!("{slot} has no shadow version to promote")))?;
        self.install_version(slot, version, false, "promote")?;
        self.version_info(slot, version)
    }

    /// Makes any stored version active (`plugin rollback --to VERSION`).
    pub async fn activate(&self, slot: Slot, version: u64) -> Result<VersionInfo, PluginError> {
        let _one_at_a_time = self.changes.lock().await;
        let stored: Vec<u64> = self.versions(slot)?.iter().map(|v| v.version).collect();
        if !stored.contains(&version) {
            let list = stored.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
            return Err(PluginError::NoVersion(format!("{slot} has no version {version}; it keeps {list}")));
        }
        self.install_version(slot, version, false, "activate")?;
        self.version_info(slot, version)
    }

    /// Stops the shadow run without promoting it.
    pub async fn discard_shadow(&self, slot: Slot) -> Result<(), PluginError> {
        let _one_at_a_time = self.changes.lock().await;
        let SlotRow { active, shadow, stack } = self.slot_row(slot)?;
        let version = shadow.ok_or_else(|| PluginError::State(format!("{slot} has no shadow version")))?;
        self.set_slot(slot, SlotRow { active, shadow: None, stack }, "discard", version)?;
        self.rulebook.set_shadow(None);
        Ok(())
    }

    /// Re-activates the version that was active before the current one.
    pub async fn rollback(&self, slot: Slot) -> Result<VersionInfo, PluginError> {
        let _one_at_a_time = self.changes.lock().await;
        let SlotRow { shadow, mut stack, .. } = self.slot_row(slot)?;
        if stack.len() < 2 {
            return Err(PluginError::State(format!("{slot} has no earlier version to roll back to")));
        }
        stack.pop();
        let Some(&version) = stack.last() else {
            return Err(PluginError::State(format!("{slot} has no earlier version to roll back to")));
        };
        let loaded = self.load(slot, version)?;
        // The version rolled back to may be the one in shadow: it runs live now instead.
        let still_shadowed = shadow.filter(|v| *v != version);
        self.set_slot(slot, SlotRow { active: version, shadow: still_shadowed, stack }, "rollback", version)?;
        if still_shadowed != shadow {
            self.rulebook.set_shadow(None);
        }
        self.install_active(loaded);
        self.version_info(slot, version)
    }

    fn shipped(&self, slot: Slot, version: u64) -> Result<Shipped, PluginError> {
        use base64::Engine as _;
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        db.query_row(
            "SELECT bytes, sha256 FROM versions WHERE slot = ?1 AND version = ?2",
            params![slot.name(), version as i64],
            |r| {
                Ok(Shipped {
                    version,
                    sha256: r.get(1)?,
                    component: base64::engine::general_purpose::STANDARD.encode(r.get::<_, Vec<u8>>(0)?),
                    chunks: 0,
                })
            },
        )
        .map_err(repo)
    }

    /// The slot's state as it goes round the cluster; `replication` fills in its origin
    /// and number.
    pub fn state(&self, slot: Slot) -> Result<SlotState, PluginError> {
        let SlotRow { active, shadow, stack } = self.slot_row(slot)?;
        Ok(SlotState {
            slot,
            active: self.shipped(slot, active)?,
            shadow: shadow.map(|v| self.shipped(slot, v)).transpose()?,
            stack,
            origin: String::new(),
            seq: 0,
        })
    }

    /// Makes this instance run what another instance deployed: the same version
    /// numbers, bytes checked against their hashes.
    pub async fn apply(&self, state: SlotState) -> Result<(), PluginError> {
        let _one_at_a_time = self.changes.lock().await;
        self.keep(&state)?;
        self.apply_row(state).await
    }

    /// Stores the versions a state ships that this instance does not hold, checked
    /// against their hashes, without loading them: what `--to VERSION` can activate here.
    pub fn keep(&self, state: &SlotState) -> Result<(), PluginError> {
        use base64::Engine as _;
        let slot = state.slot;
        for shipped in std::iter::once(&state.active).chain(state.shadow.as_ref()) {
            match self.versions(slot)?.into_iter().find(|v| v.version == shipped.version) {
                // Held here already: a state may then come without the bytes.
                Some(v) if v.sha256 == shipped.sha256 => {}
                Some(v) => {
                    return Err(PluginError::State(format!(
                        "{slot}@{} here is {} but another instance shipped {}: deploy through one instance at a time",
                        shipped.version, v.sha256, shipped.sha256
                    )));
                }
                None => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(&shipped.component)
                        .map_err(|e| PluginError::Invalid(format!("replicated {slot}@{}: {e}", shipped.version)))?;
                    if sha256_hex(&bytes) != shipped.sha256 {
                        return Err(PluginError::Invalid(format!(
                            "replicated {slot}@{}: the bytes do not match their hash",
                            shipped.version
                        )));
                    }
                    self.insert_version(slot, shipped.version, &bytes, "replicated")?
                }
            }
        }
        Ok(())
    }

    /// Applies the versions another instance deployed (after [`Registry::keep`]).
    async fn apply_row(&self, state: SlotState) -> Result<(), PluginError> {
        let slot = state.slot;
        let SlotRow { active, shadow, mut stack } = self.slot_row(slot)?;
        // Loaded before the row names them: a row naming a version that cannot load here
        // would stop the next start.
        let wanted = state.shadow.as_ref().map(|s| s.version);
        let active_loaded =
            (active != state.active.version).then(|| self.load(slot, state.active.version)).transpose()?;
        let shadow_loaded = (shadow != wanted).then(|| wanted.map(|v| self.load(slot, v)).transpose()).transpose()?;
        if state.stack.last() == Some(&state.active.version) {
            stack = state.stack.clone();
        } else if active != state.active.version {
            stack.push(state.active.version);
        }
        if let Some(loaded) = active_loaded {
            let row = SlotRow { active: state.active.version, shadow, stack: stack.clone() };
            self.set_slot(slot, row, "replicated", state.active.version)?;
            self.install_active(loaded);
        }
        if let Some(loaded) = shadow_loaded {
            let row = SlotRow { active: state.active.version, shadow: wanted, stack: stack.clone() };
            self.set_slot(slot, row, "replicated-shadow", wanted.unwrap_or(state.active.version))?;
            self.install_shadow(loaded, wanted.unwrap_or_default())?;
        }
        // The stack alone may differ (a rollback elsewhere that landed on this version).
        let row = self.slot_row(slot)?;
        if row.stack != stack {
            self.set_slot(slot, SlotRow { stack, ..row }, "replicated-stack", state.active.version)?;
        }
        Ok(())
    }

    pub fn shadow_report(&self, slot: Slot) -> Result<ShadowReport, PluginError> {
        if slot != Slot::OrderRules {
            return Err(PluginError::State(SHADOW_RULES_ONLY.into()));
        }
        self.rulebook
            .shadow()
            .map(|s| s.report())
            .ok_or_else(|| PluginError::State(format!("{slot} has no shadow version")))
    }

    fn version_info(&self, slot: Slot, version: u64) -> Result<VersionInfo, PluginError> {
        self.versions(slot)?
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| PluginError::Repo(format!("{slot}@{version} is missing")))
    }

    fn versions(&self, slot: Slot) -> Result<Vec<VersionInfo>, PluginError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = db
            .prepare(
                "SELECT version, sha256, origin, length(bytes), created_at FROM versions \
                 WHERE slot = ?1 ORDER BY version",
            )
            .map_err(repo)?;
        stmt.query_map([slot.name()], |r| {
            let version = r.get::<_, i64>(0)? as u64;
            let sha256: String = r.get(1)?;
            Ok(VersionInfo {
                slot,
                version,
                decided_by: format!("{}@{version}#sha256:{}", slot.name(), &sha256[..12]),
                sha256,
                origin: r.get(2)?,
                size_bytes: r.get::<_, i64>(3)? as u64,
                created_at: from_micros(r.get(4)?),
                memory: None,
                calls: None,
            })
        })
        .map_err(repo)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(repo)
        .map(|mut versions| {
            let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
            for v in &mut versions {
                let handle = loaded.get(&(slot, v.version));
                (v.memory, v.calls) = (handle.map(Handle::memory), handle.map(Handle::calls));
            }
            versions
        })
    }

    /// Sets `orchestrator_plugin_memory_bytes` for every loaded version, so a scrape
    /// reads what they hold now.
    pub fn report_memory(&self) {
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        for ((slot, version), handle) in loaded.iter() {
            let m = handle.memory();
            for (kind, bytes) in [("code", m.code_bytes), ("instances", m.instance_bytes)] {
                memory_gauge(*slot, *version, kind).set(bytes as f64);
            }
        }
    }

    pub fn describe(&self) -> Result<Vec<SlotInfo>, PluginError> {
        Slot::ALL
            .into_iter()
            .map(|slot| {
                let SlotRow { active, shadow, .. } = self.slot_row(slot)?;
                let versions = self.versions(slot)?;
                let find = |v: u64| versions.iter().find(|i| i.version == v).cloned();
                let history = {
                    let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
                    let mut stmt = db
                        .prepare("SELECT version, action, at FROM activations WHERE slot = ?1 ORDER BY seq")
                        .map_err(repo)?;
                    stmt.query_map([slot.name()], |r| {
                        Ok(Activation {
                            version: r.get::<_, i64>(0)? as u64,
                            action: r.get(1)?,
                            at: from_micros(r.get(2)?),
                        })
                    })
                    .map_err(repo)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(repo)?
                };
                Ok(SlotInfo {
                    slot,
                    active: find(active).ok_or_else(|| PluginError::Repo(format!("{slot}@{active} is missing")))?,
                    shadow: shadow.and_then(find),
                    versions,
                    history,
                })
            })
            .collect()
    }
}
