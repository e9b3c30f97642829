//! The build script's wasm target check, driven with a stub `rustup` (and `rustc`) on
//! PATH: a missing target is installed through rustup, a present one is left alone, and
//! without rustup the error is one line naming the command to run.

#[path = "../build/wasm_targets.rs"]
mod wasm_targets;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use wasm_targets::{Checked, ensure};

fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// One test, so the PATH and RUSTC changes never race another test of this binary.
#[test]
fn missing_wasm_targets_are_installed_through_rustup_or_named_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, calls) = (dir.path().join("bin"), dir.path().join("calls"));
    std::fs::create_dir(&bin).unwrap();
    // A rustup that reports only the host target and records every install it is asked for.
    script(
        &bin.join("rustup"),
        &format!(
            r#"case "$1 $2" in
  "target list") echo x86_64-unknown-linux-gnu; cat "{installed}" 2>/dev/null; true ;;
  "target add") shift 2; echo "add $*" >> "{calls}"; for t in "$@"; do echo "$t" >> "{installed}"; done ;;
  *) exit 2 ;;
esac"#,
            calls = calls.display(),
            installed = dir.path().join("installed").display()
        ),
    );
    // A rustc whose sysroot holds the dashboard's target only.
    let sysroot = dir.path().join("sysroot");
    std::fs::create_dir_all(sysroot.join("lib/rustlib/wasm32-unknown-unknown/lib")).unwrap();
    script(&bin.join("rustc"), &format!("echo {}", sysroot.display()));
    // The stubs first; the system's tools (cat) after them, but not ~/.cargo/bin.
    // SAFETY: the only test in this binary; nothing else reads the environment meanwhile.
    unsafe {
        std::env::set_var("PATH", format!("{}:/usr/bin:/bin", bin.display()));
        std::env::set_var("RUSTC", bin.join("rustc"));
    }
    // What the building rustc has needs no rustup at all.
    assert_eq!(ensure(&["wasm32-unknown-unknown"]), Ok(Checked::Present));
    assert!(!calls.exists(), "rustup was not asked");
    let targets = ["wasm32-wasip2", "wasm32-unknown-unknown"];
    assert_eq!(ensure(&targets), Ok(Checked::Installed(targets.map(String::from).to_vec())));
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "add wasm32-wasip2 wasm32-unknown-unknown\n");
    // Installed now: no second call.
    assert_eq!(ensure(&targets), Ok(Checked::Present));
    assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 1);

    // A rustup whose install fails: the error names the command.
    script(&bin.join("rustup"), r#"[ "$2" = list ] && exit 0; exit 1"#);
    let err = ensure(&["wasm32-wasip2"]).unwrap_err();
    assert!(err.contains("`rustup target add wasm32-wasip2` failed"), "{err}");

    // No rustup at all, and a sysroot without the target: one line saying what to run.
    std::fs::remove_file(bin.join("rustup")).unwrap();
    // SAFETY: as above. Only the stubs' folder, so no system rustup is found either.
    unsafe { std::env::set_var("PATH", &bin) };
    let err = ensure(&targets).unwrap_err();
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(err.contains("wasm32-wasip2") && !err.contains("wasm32-unknown-unknown and"), "{err}");
    assert!(err.contains("rustup target add wasm32-wasip2"), "{err}");
    assert_eq!(ensure(&["wasm32-unknown-unknown"]), Ok(Checked::Present));
}
