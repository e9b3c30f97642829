//! Atomic Order Orchestrator: the edges around `orchestrator-core`'s engine (the HTTP
//! API with the Shopify routes, generated runs, the CLI, the plugin dev kit, the bench).

#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

// The engine's modules keep their paths here (`orchestrator::store`, `crate::domain`),
// so the edges and the tests read as before the split.
pub use orchestrator_core::{
    cluster, compliance, domain, engine, failure, generator, journey, log, ordering, pipeline, plugin, rules, secret,
    sqlite, store, stream, telemetry, whatif,
};

pub mod api;
pub mod bench;
pub mod config;
pub mod devkit;
pub mod pulse;
pub mod recent_logs;
pub mod runs;
pub mod schema;
pub mod shopify;
