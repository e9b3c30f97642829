//! JSON Schemas for the wire types, generated from the Rust types so they cannot drift.

use schemars::schema_for;

use crate::domain::{Order, OrderEvent};

/// `(file name, pretty JSON)` for every schema kept in `schemas/json/`.
pub fn json_schemas() -> Vec<(&'static str, String)> {
    let render = |s: schemars::Schema| serde_json::to_string_pretty(&s).expect("schemas serialize") + "\n";
    vec![
        ("order.schema.json", render(schema_for!(Order))),
        ("order_event.schema.json", render(schema_for!(OrderEvent))),
    ]
}
