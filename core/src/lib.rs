//! The engine of the Atomic Order Orchestrator: the domain, the order log, the stores,
//! the rules and their Wasm host, the pipeline, and `Engine`, which ties them together.
//! No HTTP, CLI or terminal code lives here; the `orchestrator` crate adds those edges.

// Lints, as linkerd does: no unsafe in the host, 2018 idioms, and clippy's defaults
// (CI runs clippy with warnings as errors).
// `plugin/cache.rs` alone may allow it, to load compiled code it wrote itself.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cluster;
pub mod compliance;
pub mod domain;
pub mod engine;
pub mod error;
pub mod failure;
pub mod generator;
pub mod journey;
pub mod log;
pub mod ordering;
pub mod pipeline;
pub mod plugin;
pub mod rules;
pub mod secret;
pub mod sqlite;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod whatif;
