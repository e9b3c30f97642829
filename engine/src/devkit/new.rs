//! `orchestrator plugin new` and `plugin build`: a plugin project that builds anywhere
//! on disk (the SDK and its WIT come with it), and the toolchain run that turns it into
//! a component the engine takes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::plugin::Slot;
use crate::plugin::host::Runtime;

/// The plugin's language. Only Rust is made here so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
}

#[derive(Debug, Clone, Args)]
pub struct NewArgs {
    /// The project's name: a directory of that name is made here.
    pub name: String,
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: Lang,
    /// Start from a copy of the engine's default rules instead of a small example.
    #[arg(long)]
    pub from_default: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BuildArgs {
    /// The project's directory.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Where cargo builds (default: the project's `target/`).
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
}

/// The SDK, vendored into every new project until it is on crates.io.
const SDK: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../../plugins/sdk/Cargo.toml")),
    ("src/lib.rs", include_str!("../../../plugins/sdk/src/lib.rs")),
    ("src/testing.rs", include_str!("../../../plugins/sdk/src/testing.rs")),
    ("wit/orchestrator.wit", include_str!("../../../plugins/sdk/wit/orchestrator.wit")),
];
const DEFAULT_RULES: &str = include_str!("../../../plugins/order-rules/src/lib.rs");
/// The engine's own lockfile: cargo keeps the versions the SDK was tested with and
/// drops the rest, so a new project builds with known dependencies.
const LOCKFILE: &str = include_str!("../../../Cargo.lock");

pub fn new(args: NewArgs) -> anyhow::Result<()> {
    let name = &args.name;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.starts_with(|c: char| c.is_ascii_alphabetic());
    anyhow::ensure!(valid, "the name {name:?} must start with a letter and hold only letters, digits, - and _");
    let dir = PathBuf::from(name);
    anyhow::ensure!(!dir.exists(), "{} exists already; pick another name or remove it", dir.display());
    let crate_name = name.replace('-', "_");
    let fill = |t: &str| t.replace("{{name}}", name).replace("{{crate}}", &crate_name);
    let rules = if args.from_default {
        // The default rules export only with their `export` feature; a copy always does.
        DEFAULT_RULES.replace("#[cfg(feature = \"export\")]\n", "")
    } else {
        fill(include_str!("templates/rust/lib.rs"))
    };
    let mut files = vec![
        ("Cargo.toml".to_string(), fill(include_str!("templates/rust/Cargo.toml"))),
        ("README.md".to_string(), fill(include_str!("templates/rust/README.md"))),
        (".gitignore".to_string(), include_str!("templates/rust/gitignore").to_string()),
        ("Cargo.lock".to_string(), LOCKFILE.to_string()),
        ("src/lib.rs".to_string(), rules),
    ];
    if !args.from_default {
        files.push(("tests/rules.rs".to_string(), fill(include_str!("templates/rust/rules_test.rs"))));
    }
    files.extend(SDK.iter().map(|(path, text)| (format!("orchestrator-sdk/{path}"), text.to_string())));
    for (path, text) in &files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap_or(&dir))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("made {} ({} files): `cd {name} && cargo test && orchestrator plugin build`", dir.display(), files.len());
    Ok(())
}

pub fn build(args: BuildArgs) -> anyhow::Result<()> {
    let manifest = args.dir.join("Cargo.toml");
    anyhow::ensure!(manifest.is_file(), "{} has no Cargo.toml: is it a plugin project?", args.dir.display());
    if let Err(why) = wasm_targets::ensure(&[TARGET]) {
        anyhow::bail!("{why}");
    }
    let target_dir = args.target_dir.clone().unwrap_or_else(|| args.dir.join("target"));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("could not run cargo")?;
    anyhow::ensure!(status.success(), "cargo build failed ({status}); see above");
    let component = built_component(&manifest, &target_dir)?;
    let bytes = std::fs::read(&component)?;
    let runtime = Runtime::new(Default::default())?;
    let imports = runtime.imports(&bytes)?;
    // The contract check an upload gets, so a build that the engine refuses fails here.
    runtime.compile(Slot::OrderRules, &bytes).context("the engine would refuse it")?;
    println!("{}", component.display());
    eprintln!("{} bytes; imports: {}", bytes.len(), imports.join(", "));
    Ok(())
}

const TARGET: &str = "wasm32-wasip2";

#[path = "../../build/wasm_targets.rs"]
mod wasm_targets;

/// `target/wasm32-wasip2/release/<crate>.wasm`, the crate named in the manifest.
fn built_component(manifest: &Path, target_dir: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(manifest)?;
    let name = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("name = ").map(|n| n.trim_matches('"').replace('-', "_")))
        .context("the manifest names no package")?;
    let path = target_dir.join(TARGET).join("release").join(format!("{name}.wasm"));
    anyhow::ensure!(path.is_file(), "cargo built no {}", path.display());
    Ok(path)
}
