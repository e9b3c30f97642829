//! Builds the rule plugins in `plugins/` to wasm32-wasip2, so the binary embeds the
//! default plugins and the tests find their fixtures.
//!
//! The nested cargo uses its own target dir and profile: sharing the outer build's
//! would deadlock on cargo's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Plugins the binary embeds, then test fixtures.
const PACKAGES: &[&str] = &["order-rules", "conflict-resolver"];
const FIXTURES: &[&str] = &["fixture-trap", "fixture-spin", "fixture-hog", "fixture-wrong-world", "fixture-rules-v2"];
const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    for dir in ["plugins", "schemas/wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-changed=../Cargo.lock");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // Beside the outer target dir (…/target/wasm-plugins), so it survives `cargo clean -p`.
    let target_dir = out_dir.ancestors().nth(4).map(|t| t.join("wasm-plugins")).unwrap_or_else(|| out_dir.join("wasm-plugins"));

    // Two builds: fixtures reuse order-rules as a library without its exports, and one
    // cargo invocation would unify that feature away. The second rebuilds
    // order_rules.wasm without exports, so the defaults are copied out in between.
    let built = target_dir.join(TARGET).join("plugin");
    build(&root, &target_dir, PACKAGES);
    for p in PACKAGES {
        let file = format!("{}.wasm", p.replace('-', "_"));
        copy(&built.join(&file), &out_dir.join(&file));
    }
    build(&root, &target_dir, FIXTURES);
    println!("cargo:rustc-env=ORCHESTRATOR_PLUGIN_FIXTURES={}", built.display());
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}

fn build(root: &Path, target_dir: &Path, packages: &[&str]) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args(["build", "--profile", "plugin", "--target", TARGET, "--target-dir"]).arg(target_dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER", "RUSTC_WRAPPER", "CARGO_MAKEFLAGS", "MAKEFLAGS", "MFLAGS"] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("cargo runs");
    if !status.success() {
        panic!("building the rule plugins for {TARGET} failed (see above). If the target is missing, run `rustup target add {TARGET}`.");
    }
}
