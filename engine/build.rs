//! Builds the rule plugins in `plugins/` to wasm32-wasip2, so the binary embeds the
//! default plugins and the tests find their fixtures.
//!
//! Then builds the operator dashboard (`dashboard/`, wasm32-unknown-unknown) and runs
//! wasm-bindgen on it in-process, so the binary embeds the app it serves at `/`.
//!
//! The nested cargo uses its own target dir and profile: sharing the outer build's
//! would deadlock on cargo's lock.

#[path = "build/wasm_targets.rs"]
mod wasm_targets;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Plugins the binary embeds, then test fixtures.
const PACKAGES: &[&str] = &["order-rules", "conflict-resolver"];
const FIXTURES: &[&str] =
    &["fixture-trap", "fixture-spin", "fixture-hog", "fixture-wrong-world", "fixture-rules-v2", "fixture-wasi"];
const TARGET: &str = "wasm32-wasip2";
const DASHBOARD_TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    match wasm_targets::ensure(&[TARGET, DASHBOARD_TARGET]) {
        Ok(wasm_targets::Checked::Present) => {}
        Ok(wasm_targets::Checked::Installed(t)) => {
            println!("cargo:warning=installed the missing Rust targets {}", t.join(", "))
        }
        Err(line) => {
            eprintln!("error: {line}");
            std::process::exit(1);
        }
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    // Relative to engine/, never absolute: clones at other paths share this build
    // script's output through the target dir, and an absolute path would keep watching
    // the clone that ran it first (and embed its stale plugins). The WIT is in the SDK.
    println!("cargo:rerun-if-changed=../plugins");
    println!("cargo:rerun-if-changed=../Cargo.lock");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // Beside the outer target dir (…/target/wasm-plugins), so it survives `cargo clean -p`.
    let target_dir =
        out_dir.ancestors().nth(4).map(|t| t.join("wasm-plugins")).unwrap_or_else(|| out_dir.join("wasm-plugins"));

    // Two builds: fixtures reuse order-rules as a library without its exports, and one
    // cargo invocation would unify that feature away. The second rebuilds
    // order_rules.wasm without exports, so the defaults are copied out in between.
    let built = target_dir.join(TARGET).join("plugin");
    build(&root, &target_dir, PACKAGES);
    for p in PACKAGES {
        let file = format!("{}.wasm", p.replace('-', "_"));
        copy(&built.join(&file), &out_dir.join(&file));
    }
    // The hostile fixtures are for the tests (the `testing` feature) only.
    if std::env::var_os("CARGO_FEATURE_TESTING").is_some() {
        build(&root, &target_dir, FIXTURES);
        println!("cargo:rustc-env=ORCHESTRATOR_PLUGIN_FIXTURES={}", built.display());
    }

    let dashboard_target = target_dir.with_file_name("wasm-dashboard");
    build_dashboard(&root, &dashboard_target, &out_dir);
}

/// Builds `dashboard/` with its own Cargo.lock (it is not a workspace member), then
/// generates the `--target web` JS glue into OUT_DIR/dashboard. No wasm-opt: Debian's
/// binaryen breaks wasm-bindgen's output (see dashboard/README.md).
fn build_dashboard(root: &Path, target_dir: &Path, out_dir: &Path) {
    let dir = root.join("dashboard");
    for f in ["src", "Cargo.toml", "Cargo.lock", "index.html", "style.css"] {
        println!("cargo:rerun-if-changed=../dashboard/{f}");
    }
    let mut cmd = cargo();
    cmd.current_dir(&dir)
        .args(["build", "--locked", "--release", "--target", "wasm32-unknown-unknown", "--target-dir"])
        .arg(target_dir);
    let status = cmd.status().expect("cargo runs");
    if !status.success() {
        panic!(
            "building the dashboard for wasm32-unknown-unknown failed (see above). If the target is missing, run `rustup target add wasm32-unknown-unknown`."
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
        copy(&dir.join(f), &dest.join(f));
    }
}

/// A nested cargo without the outer build's flags and target settings.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}

fn build(root: &Path, target_dir: &Path, packages: &[&str]) {
    let mut cmd = cargo();
    cmd.current_dir(root).args(["build", "--profile", "plugin", "--target", TARGET, "--target-dir"]).arg(target_dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let status = cmd.status().expect("cargo runs");
    if !status.success() {
        panic!(
            "building the rule plugins for {TARGET} failed (see above). If the target is missing, run `rustup target add {TARGET}`."
        );
    }
}
