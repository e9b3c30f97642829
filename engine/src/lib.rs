//! Atomic Order Orchestrator: a priority order pipeline whose rules decide each row,
//! with a versioned, idempotent store and a live change stream.

// Lints, as linkerd does: no unsafe in the host, 2018 idioms, and clippy's defaults
// (CI runs clippy with warnings as errors).
// `plugin/cache.rs` alone may allow it, to load compiled code it wrote itself.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod bench;
pub mod cluster;
pub mod config;
pub mod devkit;
pub mod domain;
pub mod engine;
pub mod failure;
pub mod generator;
pub mod log;
pub mod ordering;
pub mod pipeline;
pub mod plugin;
pub mod recent_logs;
pub mod rules;
pub mod runs;
pub mod schema;
pub mod shopify;
pub mod sqlite;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod whatif;
