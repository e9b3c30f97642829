//! Atomic Order Orchestrator: a priority order pipeline whose rules decide each row,
//! with a versioned, idempotent store and a live change stream.

pub mod api;
pub mod bench;
pub mod config;
pub mod domain;
pub mod engine;
pub mod generator;
pub mod log;
pub mod logs;
pub mod pipeline;
pub mod plugin;
pub mod rules;
pub mod runs;
pub mod schema;
pub mod shopify;
pub mod sqlite;
pub mod store;
pub mod stream;
pub mod telemetry;
