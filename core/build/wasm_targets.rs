//! Makes sure the wasm targets the build needs are installed, before a nested cargo
//! fails on them: rustup installs a missing target itself when it is present (with
//! `RUSTUP_AUTO_INSTALL=0` it will not do so on first use); otherwise one clear line
//! says what to run. Shared by both build scripts, `plugin new`, and the test that drives it with a stub rustup.

use std::path::PathBuf;
use std::process::Command;

/// What the check did.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// Every target was already there.
    Present,
    /// rustup installed these.
    Installed(Vec<String>),
}

/// Installs the missing `targets` with rustup, or explains in one line what to run.
pub fn ensure(targets: &[&str]) -> Result<Checked, String> {
    // The rustc that builds is the judge: a target in its sysroot needs nothing more
    // (and a distro rustc beside some rustup is never "fixed" through the wrong one).
    if targets.iter().all(|t| in_sysroot(t)) {
        return Ok(Checked::Present);
    }
    match installed_by_rustup() {
        Some(installed) => {
            let missing: Vec<String> =
                targets.iter().filter(|t| !installed.iter().any(|i| i == *t)).map(|t| t.to_string()).collect();
            if missing.is_empty() {
                return Ok(Checked::Present);
            }
            let status = Command::new("rustup").args(["target", "add"]).args(&missing).status();
            match status {
                Ok(s) if s.success() => Ok(Checked::Installed(missing)),
                Ok(s) => Err(format!(
                    "`rustup target add {}` failed ({s}); run it by hand and build again",
                    missing.join(" ")
                )),
                Err(e) => Err(format!("could not run `rustup target add {}`: {e}", missing.join(" "))),
            }
        }
        None => {
            let missing: Vec<&str> = targets.iter().copied().filter(|t| !in_sysroot(t)).collect();
            if missing.is_empty() {
                return Ok(Checked::Present);
            }
            Err(format!(
                "the Rust standard library for {} is missing and rustup is not on PATH: install it for this \
                 toolchain (with rustup: `rustup target add {}`) and build again",
                missing.join(" and "),
                missing.join(" ")
            ))
        }
    }
}

/// The targets rustup reports installed for the active toolchain; None without rustup.
fn installed_by_rustup() -> Option<Vec<String>> {
    let out = Command::new("rustup").args(["target", "list", "--installed"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect())
}

/// Whether the active rustc's sysroot holds the standard library for `target`.
fn in_sysroot(target: &str) -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else { return false };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    sysroot.join("lib/rustlib").join(target).join("lib").is_dir()
}
