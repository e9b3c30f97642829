//! A plugin author's first hour, scripted in Rust, Python and JavaScript: `plugin new`
//! in a directory outside the repository, (`cargo test`), `plugin build`, `plugin test`,
//! then deploy as a shadow to a real engine, promote, check the rows it decides, and roll
//! back. Python and JS need componentize-py and componentize-js (COMPONENTIZE_PY,
//! COMPONENTIZE_JS; scripts/test.sh installs both).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Server, TOKEN, created};

/// Runs `orchestrator plugin ARGS` in `dir`; its success and both outputs.
fn plugin(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = common::orchestrator().current_dir(dir).arg("plugin").args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Builds outside the temp dir, so a second CI run finds the dependencies compiled.
fn build_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    base.join("plugin-newcomer").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_plugin_from_new_to_rollback() {
    let home = tempfile::tempdir().unwrap();
    let (ok, _, err) = plugin(home.path(), &["new", "free-gold", "--lang", "rust"]);
    assert!(ok, "{err}");
    let project = home.path().join("free-gold");
    let (ok, _, err) = plugin(home.path(), &["new", "free-gold", "--lang", "rust"]);
    assert!(!ok && err.contains("exists already"), "{err}");

    // The project's own tests pass, natively.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tested = Command::new(&cargo)
        .args(["test", "--quiet", "--target-dir"])
        .arg(build_dir("host"))
        .current_dir(&project)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(tested.status.success(), "{}", String::from_utf8_lossy(&tested.stderr));

    let target = build_dir("wasm");
    let (ok, out, err) = plugin(&project, &["build", ".", "--target-dir", target.to_str().unwrap()]);
    assert!(ok, "{err}");
    let component = out.trim().to_string();
    assert!(component.ends_with("free_gold.wasm") && err.contains("imports: "), "{out}{err}");
    assert!(err.contains("orchestrator:rules/host@1.0.0"), "the imports are listed: {err}");

    live(&project, &component, "rust").await;
}

/// The second half of the first hour, alike in every language: `plugin test`, then a
/// what-if run over a real engine's history (`plugin replay`), a shadow deploy, promote,
/// the new rule's fees on new rows (free from 100.00 for GOLD, 4.99 for BRONZE), and a
/// rollback.
async fn live(project: &Path, component: &str, lang: &str) {
    let (ok, _, err) = plugin(project, &["test", component, "--generated", "200"]);
    assert!(ok && err.contains("200 events: 200 upsert"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let url = s.url("");
    let remote = |args: &[&str]| plugin(project, &[args, &["--url", &url, "--api-token", TOKEN]].concat());
    // History first, decided by the default rules (5.99 under 200.00); then a what-if
    // run of the new rule over it, before anything is deployed.
    let (gold, bronze) = (format!("{lang}-gold-0"), format!("{lang}-bronze-0"));
    let events =
        serde_json::json!([created(&gold, &gold, "GOLD", 15_000), created(&bronze, &bronze, "BRONZE", 15_000)]);
    assert_eq!(s.post_events(&events).await.status(), 202);
    s.drain(Duration::from_secs(30)).await;
    let mut out = String::new();
    for _ in 0..100 {
        let (ok, o, err) = remote(&["replay", component, "--since", "10m"]);
        assert!(ok, "{err}");
        out = o;
        if out.starts_with("2 recorded events") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(out.starts_with("2 recorded events") && out.contains("agreed 0, differed 2"), "{out}");
    assert!(out.contains(&format!("{gold}): shipping_fee_cents: 599 -> 0")), "{out}");
    assert!(out.contains(&format!("{bronze}): shipping_fee_cents: 599 -> 499")), "{out}");
    let (ok, out, err) = remote(&["deploy", component, "--shadow"]);
    assert!(ok && out.contains("new version 2"), "{out}{err}");
    let (ok, out, err) = remote(&["promote"]);
    assert!(ok && out.contains("version 2"), "{out}{err}");
    let (gold, bronze) = (format!("{lang}-gold-1"), format!("{lang}-bronze-1"));
    let events =
        serde_json::json!([created(&gold, &gold, "GOLD", 15_000), created(&bronze, &bronze, "BRONZE", 15_000)]);
    assert_eq!(s.post_events(&events).await.status(), 202);
    s.drain(Duration::from_secs(30)).await;
    for (id, fee) in [(gold, 0), (bronze, 499)] {
        let row = s.get_json(&format!("/orders/{id}")).await.1;
        assert!(row["decided_by"].as_str().unwrap().starts_with("order-rules@2#"), "{row}");
        assert_eq!(row["shipping_fee_cents"], fee, "the {lang} rule's fee: {row}");
    }
    // The loaded version's memory, in `plugin status` and /metrics: its code, and its
    // instances' linear memory within the cap (16 MiB each).
    let (ok, out, err) = remote(&["status"]);
    assert!(ok && out.contains("active  version 2") && out.contains("loaded: code"), "{out}{err}");
    let (_, slots) = s.get_json("/plugins").await;
    let memory = &slots[0]["active"]["memory"];
    let (code, instances, bytes) = (
        memory["code_bytes"].as_u64().unwrap(),
        memory["instances"].as_u64().unwrap(),
        memory["instance_bytes"].as_u64().unwrap(),
    );
    assert!(code > 0 && instances >= 1 && bytes > 0 && bytes <= instances * (16 << 20), "{lang}: {memory}");
    eprintln!("{lang}: code {code} bytes, {instances} instances, {bytes} bytes of linear memory");
    let metrics = common::client().get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let series = "orchestrator_plugin_memory_bytes{plugin=\"order-rules\",version=\"2\",kind=\"instances\"} ";
    let value = metrics.lines().find_map(|l| l.strip_prefix(series)).unwrap_or_else(|| panic!("no {series}"));
    assert!(value.parse::<f64>().unwrap() > 0.0, "{series}{value}");
    let (ok, out, err) = remote(&["rollback"]);
    assert!(ok && out.contains("version 1"), "{out}{err}");
    assert_eq!(s.active("order-rules").await.0, 1);
}

/// The same first hour in Python (componentize-py, WASI stubbed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_from_new_to_rollback() {
    if common::tool("COMPONENTIZE_PY").is_some() {
        componentized_flow("python", "py-gold").await;
    }
}

/// The same first hour in JavaScript (componentize-js, WASI features disabled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_plugin_from_new_to_rollback() {
    if common::tool("COMPONENTIZE_JS").is_some() {
        componentized_flow("js", "js-gold").await;
    }
}

/// new, build (no WASI left), test, then deploy as a shadow to a real engine, promote,
/// check that it decides like the Rust template, and roll back.
async fn componentized_flow(lang: &str, name: &str) {
    let home = tempfile::tempdir().unwrap();
    let (ok, _, err) = plugin(home.path(), &["new", name, "--lang", lang]);
    assert!(ok, "{err}");
    let project = home.path().join(name);
    let (ok, out, err) = plugin(&project, &["build"]);
    assert!(ok, "{err}");
    let component = out.trim().to_string();
    assert!(component.ends_with(&format!("{}.wasm", name.replace('-', "_"))), "{out}");
    let imports = err.lines().last().unwrap_or_default();
    assert!(imports.contains("orchestrator:rules/") && !imports.contains("wasi:"), "WASI is left out: {imports}");

    live(&project, &component, lang).await;
}

#[test]
fn a_project_from_the_default_rules_is_a_copy_of_them() {
    let home = tempfile::tempdir().unwrap();
    let (ok, _, err) = plugin(home.path(), &["new", "house-rules", "--from-default"]);
    assert!(ok, "{err}");
    let lib = std::fs::read_to_string(home.path().join("house-rules/src/lib.rs")).unwrap();
    assert!(lib.contains("pub fn shipping_fee_cents") && lib.contains("export_order_rules!(Rules);"), "{lib}");
    assert!(!lib.contains("cfg(feature = \"export\")"), "a copy always exports");
    let sdk = home.path().join("house-rules/orchestrator-sdk");
    assert!(sdk.join("wit/orchestrator.wit").is_file() && sdk.join("src/lib.rs").is_file());
    let manifest = std::fs::read_to_string(sdk.join("Cargo.toml")).unwrap();
    assert!(!manifest.contains(".workspace"), "the SDK stands alone: {manifest}");
    // Python and JavaScript start from the ports the conformance suite holds to the
    // native reference (engine/tests/conformance.rs builds and runs them).
    let ports = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/ports");
    for (lang, file) in [("python", "python/app.py"), ("js", "js/app.js")] {
        let name = format!("house-{lang}");
        let (ok, _, err) = plugin(home.path(), &["new", &name, "--lang", lang, "--from-default"]);
        assert!(ok, "{err}");
        let app = std::fs::read_to_string(home.path().join(&name).join(file.split('/').nth(1).unwrap())).unwrap();
        assert_eq!(app, std::fs::read_to_string(format!("{ports}/{file}")).unwrap(), "{lang}");
    }
    let (ok, _, err) = plugin(home.path(), &["new", "9lives"]);
    assert!(!ok && err.contains("must start with a letter"), "{err}");
}
