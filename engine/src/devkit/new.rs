//! `orchestrator plugin new` and `plugin build`: a plugin project that builds anywhere
//! on disk (the SDK and its WIT come with it), and the toolchain run that turns it into
//! a component the engine takes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use clap::{Args, ValueEnum};

/// The plugin's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

/// The componentize-py and componentize-js releases the templates are built and tested with.
pub const COMPONENTIZE_PY: &str = "0.25.1";
pub const COMPONENTIZE_JS: &str = "0.23.0";
/// The WASI features a JavaScript build leaves out: the engine gives plugins none.
const JS_WITHOUT: &[&str] = &["stdio", "random", "clocks", "http", "fetch-event"];

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
    ("src/alloc.rs", include_str!("../../../plugins/sdk/src/alloc.rs")),
    ("src/lib.rs", include_str!("../../../plugins/sdk/src/lib.rs")),
    ("src/packed.rs", include_str!("../../../plugins/sdk/src/packed.rs")),
    ("src/testing.rs", include_str!("../../../plugins/sdk/src/testing.rs")),
    ("wit/orchestrator.wit", WIT),
];
const WIT: &str = include_str!("../../../plugins/sdk/wit/orchestrator.wit");
const DEFAULT_RULES: &str = include_str!("../../../plugins/order-rules/src/lib.rs");
/// The default rules ported line for line, which the conformance suite holds to the
/// native reference: what `--from-default` starts a Python or JavaScript project from.
const PYTHON_DEFAULT: &str = include_str!("../../../plugins/ports/python/app.py");
const JS_DEFAULT: &str = include_str!("../../../plugins/ports/js/app.js");
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
    let files = match args.lang {
        Lang::Rust => rust_project(&fill, args.from_default),
        Lang::Python => {
            let app = if args.from_default {
                PYTHON_DEFAULT.to_string()
            } else {
                fill(include_str!("templates/python/app.py"))
            };
            vec![
                ("app.py".to_string(), app),
                ("README.md".to_string(), fill(include_str!("templates/python/README.md"))),
                (".gitignore".to_string(), "/*.wasm\n/__pycache__\n".to_string()),
                ("wit/orchestrator.wit".to_string(), WIT.to_string()),
            ]
        }
        Lang::Js => {
            let app =
                if args.from_default { JS_DEFAULT.to_string() } else { fill(include_str!("templates/js/app.js")) };
            vec![
                ("app.js".to_string(), app),
                ("package.json".to_string(), fill(include_str!("templates/js/package.json"))),
                ("README.md".to_string(), fill(include_str!("templates/js/README.md"))),
                (".gitignore".to_string(), "/*.wasm\n/node_modules\n".to_string()),
                ("wit/orchestrator.wit".to_string(), WIT.to_string()),
            ]
        }
    };
    for (path, text) in &files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap_or(&dir))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("made {} ({} files); build it with `cd {name} && orchestrator plugin build`", dir.display(), files.len());
    Ok(())
}

fn rust_project(fill: &dyn Fn(&str) -> String, from_default: bool) -> Vec<(String, String)> {
    let rules = if from_default {
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
    if !from_default {
        files.push(("tests/rules.rs".to_string(), fill(include_str!("templates/rust/rules_test.rs"))));
    }
    files.extend(SDK.iter().map(|(path, text)| (format!("orchestrator-sdk/{path}"), text.to_string())));
    files
}

pub fn build(args: BuildArgs) -> anyhow::Result<()> {
    // Rust's std links WASI in and never calls it; the other toolchains must leave it out.
    let (component, wasi_linked) = if args.dir.join("Cargo.toml").is_file() {
        (build_rust(&args)?, true)
    } else if args.dir.join("app.py").is_file() {
        (build_python(&args.dir)?, false)
    } else if args.dir.join("app.js").is_file() {
        (build_js(&args.dir)?, false)
    } else {
        anyhow::bail!("{} holds no Cargo.toml, app.py or app.js: is it a plugin project?", args.dir.display());
    };
    let bytes = std::fs::read(&component)?;
    let imports = imports(&bytes)?;
    let given = |i: &&String| i.starts_with("orchestrator:rules/") || (wasi_linked && i.starts_with("wasi:"));
    let outside: Vec<&String> = imports.iter().filter(|i| !given(i)).collect();
    anyhow::ensure!(
        outside.is_empty(),
        "the component imports {outside:?}; the engine gives only orchestrator:rules/*"
    );
    // The full path, so that scripts can hand it on from anywhere.
    println!("{}", component.canonicalize().unwrap_or(component).display());
    eprintln!("{} bytes; imports: {}", bytes.len(), imports.join(", "));
    Ok(())
}

fn build_rust(args: &BuildArgs) -> anyhow::Result<PathBuf> {
    if let Err(why) = wasm_targets::ensure(&[TARGET]) {
        anyhow::bail!("{why}");
    }
    let manifest = args.dir.join("Cargo.toml");
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
    built_component(&manifest, &target_dir)
}

/// `componentize-py` with WASI stubbed (the engine gives none).
fn build_python(dir: &Path) -> anyhow::Result<PathBuf> {
    let tool = std::env::var("COMPONENTIZE_PY").unwrap_or_else(|_| "componentize-py".into());
    let install = format!("pip install componentize-py=={COMPONENTIZE_PY}");
    let args = ["-d", "wit", "-w", "order-rules", "componentize", "app", "--stub-wasi", "-o"];
    componentize(dir, &tool, &install, "COMPONENTIZE_PY", &args)
}

/// `componentize-js` with every WASI feature disabled (the engine gives none). The
/// project's own install (`npm install`) comes first, then COMPONENTIZE_JS, then PATH.
fn build_js(dir: &Path) -> anyhow::Result<PathBuf> {
    // Absolute: the tool runs with the project as its working directory.
    let local = dir.canonicalize()?.join("node_modules/.bin/componentize-js");
    let tool = match std::env::var("COMPONENTIZE_JS") {
        _ if local.is_file() => local.to_string_lossy().into_owned(),
        Ok(tool) => tool,
        Err(_) => "componentize-js".into(),
    };
    let install = format!("npm install (package.json pins @bytecodealliance/componentize-js {COMPONENTIZE_JS})");
    let mut args = vec!["app.js", "--wit", "wit", "-n", "order-rules"];
    for feature in JS_WITHOUT {
        args.extend(["-d", feature]);
    }
    args.push("-o");
    componentize(dir, &tool, &install, "COMPONENTIZE_JS", &args)
}

/// Runs a componentize tool in `dir` with `args` and the output `<dir name>.wasm` last.
fn componentize(dir: &Path, tool: &str, install: &str, var: &str, args: &[&str]) -> anyhow::Result<PathBuf> {
    let name = dir.canonicalize()?.file_name().map(|n| n.to_string_lossy().replace('-', "_")).unwrap_or_default();
    let out = format!("{name}.wasm");
    // Its chatter goes to stderr: stdout is the component's path alone, for scripts.
    let status = Command::new(tool)
        .current_dir(dir)
        .args(args)
        .arg(&out)
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| anyhow::anyhow!("could not run {tool} ({e}): {install}, or name the tool in {var}"))?;
    anyhow::ensure!(status.success(), "{tool} failed ({status}); see above");
    Ok(dir.join(out))
}

/// The names a component imports, read without compiling it.
fn imports(bytes: &[u8]) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut depth = 0;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.context("not a WebAssembly component")? {
            wasmparser::Payload::Version { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth -= 1,
            wasmparser::Payload::ComponentImportSection(section) if depth == 1 => {
                for import in section {
                    names.push(import?.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(names)
}

const TARGET: &str = "wasm32-wasip2";

#[path = "../../../core/build/wasm_targets.rs"]
mod wasm_targets;

/// `target/wasm32-wasip2/release/<crate>.wasm`, the crate named in the manifest.
fn built_component(manifest: &Path, target_dir: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(manifest)?;
    // The first `name` key: the [package] table comes first in every manifest we make.
    let name = text
        .lines()
        .filter_map(|l| l.split('#').next()?.split_once('='))
        .find(|(key, _)| key.trim() == "name")
        .map(|(_, value)| value.trim().trim_matches('"').replace('-', "_"))
        .context("the manifest names no package")?;
    let path = target_dir.join(TARGET).join("release").join(format!("{name}.wasm"));
    anyhow::ensure!(path.is_file(), "cargo built no {}", path.display());
    Ok(path)
}
