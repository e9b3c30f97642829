//! What both build scripts (this crate's plugins, the binary's dashboard) share: the
//! target check before a nested cargo, the nested cargo itself, and where it builds.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::wasm_targets::{Checked, ensure};

/// Makes sure `targets` are installed, or stops the build with one line on what to run.
pub fn ensure_targets(targets: &[&str]) {
    match ensure(targets) {
        Ok(Checked::Present) => {}
        Ok(Checked::Installed(t)) => println!("cargo:warning=installed the missing Rust targets {}", t.join(", ")),
        Err(line) => {
            eprintln!("error: {line}");
            std::process::exit(1);
        }
    }
}

/// A directory named `name` beside the outer target dir (…/target/NAME), so it survives
/// `cargo clean -p` and is shared by clones that share the target dir.
pub fn beside_target_dir(out_dir: &Path, name: &str) -> PathBuf {
    out_dir.ancestors().nth(4).map(|t| t.join(name)).unwrap_or_else(|| out_dir.join(name))
}

/// A nested cargo without the outer build's flags and target settings.
pub fn cargo() -> Command {
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

pub fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}
