//! The JSON Schemas in schemas/json are exactly what the Rust types generate.

#[test]
fn json_schemas_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/json");
    for (name, generated) in orchestrator::schema::json_schemas() {
        let on_disk = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(on_disk == generated, "schemas/json/{name} is out of date: run `cargo run -- schema`");
        let schema: serde_json::Value = serde_json::from_str(&on_disk).unwrap();
        assert!(schema["properties"].is_object(), "{name} describes an object");
    }
}
