//! Builds the operator dashboard (`dashboard/`, wasm32-unknown-unknown) and runs
//! wasm-bindgen on it in-process, so the binary embeds the app it serves at `/`. (The
//! rule plugins are built by `orchestrator-core`'s build script.)
//!
//! The nested cargo uses its own target dir: sharing the outer build's would deadlock
//! on cargo's lock.

#[path = "../core/build/nested.rs"]
mod nested;
#[path = "../core/build/wasm_targets.rs"]
mod wasm_targets;

use std::path::{Path, PathBuf};

const DASHBOARD_TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    nested::ensure_targets(&[DASHBOARD_TARGET]);
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = nested::beside_target_dir(&out_dir, "wasm-dashboard");
    build_dashboard(&root, &target_dir, &out_dir);
}

/// Builds `dashboard/` with its own Cargo.lock (it is not a workspace member), then
/// generates the `--target web` JS glue into OUT_DIR/dashboard. No wasm-opt: Debian's
/// binaryen breaks wasm-bindgen's output (see dashboard/README.md).
fn build_dashboard(root: &Path, target_dir: &Path, out_dir: &Path) {
    let dir = root.join("dashboard");
    for f in ["src", "Cargo.toml", "Cargo.lock", "index.html", "style.css"] {
        println!("cargo:rerun-if-changed=../dashboard/{f}");
    }
    // The wire types it shares with the engine.
    println!("cargo:rerun-if-changed=../types");
    let mut cmd = nested::cargo();
    cmd.current_dir(&dir)
        .args(["build", "--locked", "--release", "--target", DASHBOARD_TARGET, "--target-dir"])
        .arg(target_dir);
    let status = cmd.status().expect("cargo runs");
    if !status.success() {
        panic!(
            "building the dashboard for {DASHBOARD_TARGET} failed (see above). \
             If the target is missing, run `rustup target add {DASHBOARD_TARGET}`."
        );
    }
    let wasm = target_dir.join("wasm32-unknown-unknown/release/dashboard.wasm");
    let dest = out_dir.join("dashboard");
    std::fs::create_dir_all(&dest).unwrap();
    wasm_bindgen_cli_support::Bindgen::new()
        .input_path(&wasm)
        .out_name("dashboard")
        .web(true)
        .expect("web target")
        .typescript(false)
        .generate(&dest)
        .unwrap_or_else(|e| panic!("wasm-bindgen on {}: {e:#}", wasm.display()));
    for f in ["index.html", "style.css"] {
        nested::copy(&dir.join(f), &dest.join(f));
    }
}
