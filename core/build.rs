//! Builds the rule plugins in `plugins/` to wasm32-wasip2, so the engine embeds the
//! default plugins and the tests find their fixtures.
//!
//! The nested cargo uses its own target dir and profile: sharing the outer build's
//! would deadlock on cargo's lock.

#[path = "build/nested.rs"]
mod nested;
#[path = "build/wasm_targets.rs"]
mod wasm_targets;

use std::path::{Path, PathBuf};

/// Plugins the engine embeds, then test fixtures.
const PACKAGES: &[&str] = &["order-rules", "conflict-resolver"];
const FIXTURES: &[&str] = &[
    "fixture-trap",
    "fixture-spin",
    "fixture-slow",
    "fixture-hog",
    "fixture-wrong-world",
    "fixture-rules-v2",
    "fixture-wasi",
    "fixture-packed-liar",
];
const TARGET: &str = "wasm32-wasip2";

fn main() {
    nested::ensure_targets(&[TARGET]);
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    // Relative to core/, never absolute: clones at other paths share this build
    // script's output through the target dir, and an absolute path would keep watching
    // the clone that ran it first (and embed its stale plugins). The WIT is in the SDK.
    println!("cargo:rerun-if-changed=../plugins");
    println!("cargo:rerun-if-changed=../Cargo.lock");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // Beside the outer target dir (…/target/wasm-plugins), so it survives `cargo clean -p`.
    let target_dir = nested::beside_target_dir(&out_dir, "wasm-plugins");

    // Two builds: fixtures reuse order-rules as a library without its exports, and one
    // cargo invocation would unify that feature away. The second rebuilds
    // order_rules.wasm without exports, so the defaults are copied out in between.
    let built = target_dir.join(TARGET).join("plugin");
    build(&root, &target_dir, PACKAGES);
    for p in PACKAGES {
        let file = format!("{}.wasm", p.replace('-', "_"));
        nested::copy(&built.join(&file), &out_dir.join(&file));
    }
    // The hostile fixtures are for the tests (the `testing` feature) only.
    if std::env::var_os("CARGO_FEATURE_TESTING").is_some() {
        build(&root, &target_dir, FIXTURES);
        println!("cargo:rustc-env=ORCHESTRATOR_PLUGIN_FIXTURES={}", built.display());
    }
}

fn build(root: &Path, target_dir: &Path, packages: &[&str]) {
    let mut cmd = nested::cargo();
    cmd.current_dir(root).args(["build", "--profile", "plugin", "--target", TARGET, "--target-dir"]).arg(target_dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let status = cmd.status().expect("cargo runs");
    if !status.success() {
        panic!(
            "building the rule plugins for {TARGET} failed (see above). \
             If the target is missing, run `rustup target add {TARGET}`."
        );
    }
}
