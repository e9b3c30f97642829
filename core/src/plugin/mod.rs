//! Rule plugins: the host bindings of the WIT contract, the Wasm sandbox, conversions
//! to and from the domain types, and the registry of deployed versions per slot.

pub mod cache;
pub mod calls;
pub mod convert;
pub mod host;
pub mod native;
pub mod packed;
pub mod registry;
pub mod replication;

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A component's identity: the hex sha256 of its bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Host bindings generated from the WIT the SDK bundles (`plugins/sdk/wit`).
pub mod bindings {
    pub mod rules {
        wasmtime::component::bindgen!({ world: "order-rules", path: "../plugins/sdk/wit" });
    }
    pub mod resolver {
        wasmtime::component::bindgen!({
            world: "conflict-resolver",
            path: "../plugins/sdk/wit",
            with: {
                "orchestrator:rules/types": super::rules::orchestrator::rules::types,
                "orchestrator:rules/host": super::rules::orchestrator::rules::host,
            },
        });
    }
}

/// The default plugins, built from `plugins/` by build.rs and embedded in the binary.
pub mod builtin {
    pub const ORDER_RULES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/order_rules.wasm"));
    pub const CONFLICT_RESOLVER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/conflict_resolver.wasm"));
}

/// Where the test fixtures (hostile and variant plugins) were built.
#[cfg(feature = "testing")]
pub const FIXTURES_DIR: &str = env!("ORCHESTRATOR_PLUGIN_FIXTURES");

/// A named place for a plugin; each holds one active version (and maybe a shadow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Slot {
    OrderRules,
    ConflictResolver,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::OrderRules, Slot::ConflictResolver];

    /// Its place in [`Slot::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Slot::OrderRules => "order-rules",
            Slot::ConflictResolver => "conflict-resolver",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|slot| slot.name() == s)
    }

    pub fn builtin(self) -> &'static [u8] {
        match self {
            Slot::OrderRules => builtin::ORDER_RULES,
            Slot::ConflictResolver => builtin::CONFLICT_RESOLVER,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The upload is not a component for this slot (garbage, wrong world, too big...).
    #[error("{0}")]
    Invalid(String),
    /// The request does not fit the slot's state (no shadow to promote, nothing to roll back to).
    #[error("{0}")]
    State(String),
    /// No such version is stored.
    #[error("{0}")]
    NoVersion(String),
    /// The change holds here but did not reach the other instances.
    #[error("{0}")]
    Unreplicated(String),
    /// The engine runs its rules natively (the bridge).
    #[error("plugins are disabled: the engine runs the native rules")]
    Disabled,
    #[error("plugin runtime: {0}")]
    Runtime(String),
    #[error("plugin repository: {0}")]
    Repo(String),
}
