//! `orchestrator plugin`: the plugin author's commands. `new` and `build` make and
//! build a project, `test` runs a component here under the engine's sandbox; the others
//! (replay, status, deploy, promote, rollback, discard, logs) speak a running engine's
//! HTTP API, with a timeout on every call and the engine's JSON errors shown as they came.

pub mod client;
pub mod new;
pub mod test;

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::Value;

use client::Engine;

/// Where the engine is and how to prove who we are.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The engine's base URL.
    #[arg(long, env = "ORCHESTRATOR_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An admin token. Without one, the token a loopback engine wrote to
    /// <data-dir>/api-token is used.
    #[arg(long, env = "ORCHESTRATOR_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// The engine's data dir, for its token file.
    #[arg(long, env = "ORCHESTRATOR_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Print the engine's JSON answer instead of a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Make a plugin project in ./NAME that builds anywhere (the SDK and WIT come with it).
    New(new::NewArgs),
    /// Build the project into a component, and show its size and imports.
    Build(new::BuildArgs),
    /// Slots, their active and shadow versions, every stored version, and how the
    /// shadow compares.
    Status(SlotArgs),
    /// Upload a component (a `.wasm` file) to a slot; the same bytes as a stored version
    /// make that version active again.
    Deploy(DeployArgs),
    /// Make the shadow version active.
    Promote(SlotArgs),
    /// Go back to the version active before this one, or (`--to`) to any stored version.
    Rollback(RollbackArgs),
    /// Stop the shadow run without promoting it.
    Discard(SlotArgs),
    /// The slot's plugins' recent log lines (INFO and above; a panic's message too),
    /// from the engine's in-memory log, oldest first.
    Logs(LogsArgs),
    /// Decide events with an order-rules component here, under the engine's sandbox;
    /// fails when the plugin fails on any event. Needs no engine.
    Test(test::TestArgs),
    /// A what-if run on the engine: the component and the active rules decide the events
    /// the engine recorded (each with the row it met); shows where they differ and what
    /// each costs. Nothing is written or deployed.
    Replay(ReplayArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The order-rules component to try.
    pub component: PathBuf,
    /// How far back: a duration (`90s`, `30m`, `1h`, `2d`) or an RFC 3339 time.
    #[arg(long, default_value = "1h")]
    pub since: String,
    /// Most recorded events to decide, oldest first.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub limit: u64,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Clone, Args)]
pub struct SlotArgs {
    /// order-rules or conflict-resolver.
    #[arg(long, default_value = "order-rules", value_parser = ["order-rules", "conflict-resolver"])]
    pub slot: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Clone, Args)]
pub struct DeployArgs {
    /// The component to upload.
    pub component: PathBuf,
    /// Run it beside the active version, comparing decisions, instead of activating it.
    #[arg(long)]
    pub shadow: bool,
    #[command(flatten)]
    pub slot: SlotArgs,
}

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// How many of the engine's recent lines to look through.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: u32,
    #[command(flatten)]
    pub slot: SlotArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RollbackArgs {
    /// Activate this stored version instead of the previous one.
    #[arg(long)]
    pub to: Option<u64>,
    #[command(flatten)]
    pub slot: SlotArgs,
}

pub async fn run(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Status(a) => status(a).await,
        PluginCommand::Deploy(a) => deploy(a).await,
        PluginCommand::Promote(a) => {
            let engine = Engine::connect(&a.target)?;
            let version = engine.post(&format!("/plugins/{}/promote", a.slot)).await?;
            report(&a.target, &version, |v| format!("{} is now active", version_line(v)))
        }
        PluginCommand::Rollback(a) => {
            let engine = Engine::connect(&a.slot.target)?;
            let path = match a.to {
                Some(n) => format!("/plugins/{}/versions/{n}/activate", a.slot.slot),
                None => format!("/plugins/{}/rollback", a.slot.slot),
            };
            let version = engine.post(&path).await?;
            report(&a.slot.target, &version, |v| format!("{} is now active", version_line(v)))
        }
        PluginCommand::New(a) => new::new(a),
        PluginCommand::Build(a) => tokio::task::spawn_blocking(move || new::build(a)).await?,
        PluginCommand::Test(a) => tokio::task::spawn_blocking(move || test::run(a)).await?,
        PluginCommand::Logs(a) => logs(a).await,
        PluginCommand::Replay(a) => replay(a).await,
        PluginCommand::Discard(a) => {
            let engine = Engine::connect(&a.target)?;
            engine.delete(&format!("/plugins/{}/shadow", a.slot)).await?;
            eprintln!("the shadow run of {} is stopped", a.slot);
            Ok(())
        }
    }
}

async fn status(a: SlotArgs) -> anyhow::Result<()> {
    let engine = Engine::connect(&a.target)?;
    let slots = engine.get("/plugins").await?;
    let slot = slots
        .as_array()
        .and_then(|s| s.iter().find(|s| s["slot"] == a.slot.as_str()))
        .ok_or_else(|| anyhow::anyhow!("the engine has no slot {:?}", a.slot))?;
    let report = if slot["shadow"].is_null() {
        None
    } else {
        Some(engine.get(&format!("/plugins/{}/shadow-report", a.slot)).await?)
    };
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "slot": slot, "shadow_report": report }))?);
        return Ok(());
    }
    println!("{}", a.slot);
    println!("  active  {}", version_line(&slot["active"]));
    if !slot["shadow"].is_null() {
        println!("  shadow  {}", version_line(&slot["shadow"]));
    }
    if let Some(r) = &report {
        println!(
            "  shadow report: {} compared, {} agreed, {} differed, {} skipped, {} queued",
            r["compared"], r["agreed"], r["differed"], r["skipped"], r["queued"]
        );
    }
    println!("  stored versions:");
    for v in slot["versions"].as_array().into_iter().flatten() {
        println!("    {}", version_line(v));
    }
    Ok(())
}

async fn deploy(a: DeployArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.component)
        .map_err(|e| anyhow::anyhow!("cannot read the component {}: {e}", a.component.display()))?;
    let engine = Engine::connect(&a.slot.target)?;
    let path = format!("/plugins/{}{}", a.slot.slot, if a.shadow { "?shadow=true" } else { "" });
    eprintln!("uploading {} ({} bytes) to {}...", a.component.display(), bytes.len(), a.slot.slot);
    let deployed = engine.send_component(reqwest::Method::PUT, &path, bytes).await?;
    report(&a.slot.target, &deployed, |d| {
        let role = if d["shadow"] == true { "shadowing the active version" } else { "active" };
        let how = if d["reused"] == true { "the same bytes as stored version" } else { "new version" };
        format!(
            "{how} {} of {} is {role} ({:.0} ms)",
            d["version"],
            a.slot.slot,
            d["activation_ms"].as_f64().unwrap_or(0.0)
        )
    })
}

async fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.component)
        .map_err(|e| anyhow::anyhow!("cannot read the component {}: {e}", a.component.display()))?;
    let engine = Engine::connect(&a.target)?;
    // The query encoded by the URL type: an RFC 3339 time holds `+` and `:`.
    let mut url = reqwest::Url::parse("http://engine/plugins/order-rules/replay")?;
    url.query_pairs_mut().append_pair("since", &a.since).append_pair("limit", &a.limit.to_string());
    let path = format!("{}?{}", url.path(), url.query().unwrap_or_default());
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("the engine decides up to {} recorded events with both versions...", a.limit));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let answer = engine.send_component(reqwest::Method::POST, &path, bytes).await;
    spinner.finish_and_clear();
    let r = answer?;
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let limited = if r["limited"] == true { " (the limit left newer ones out)" } else { "" };
    let cut = if r["cut_short"] == true { "; the engine's deadline cut the run short" } else { "" };
    println!("{} recorded events since {}{limited}{cut}", r["cases"], r["since"].as_str().unwrap_or(""));
    println!("  agreed {}, differed {}", r["agreed"], r["differed"]);
    println!("  errors: active {}, candidate {}", r["errors"]["active"], r["errors"]["candidate"]);
    println!("  decisions: active {}, candidate {}", r["decisions"]["active"], r["decisions"]["candidate"]);
    let (active, candidate) = (
        r["cost_us_per_event"]["active"].as_f64().unwrap_or(0.0),
        r["cost_us_per_event"]["candidate"].as_f64().unwrap_or(0.0),
    );
    println!(
        "  cost: active {active:.2} µs per event, candidate {candidate:.2} µs ({:.1}x)",
        candidate / active.max(1e-3)
    );
    let samples = r["samples"].as_array().cloned().unwrap_or_default();
    if !samples.is_empty() {
        println!("  differences (the first {} of {}):", samples.len().min(10), r["differed"]);
    }
    for d in samples.iter().take(10) {
        let fields: Vec<String> = d["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| format!("{}: {} -> {}", f["field"].as_str().unwrap_or(""), f["active"], f["candidate"]))
            .collect();
        println!(
            "    {} (order {}): {}",
            d["event_id"].as_str().unwrap_or(""),
            d["order_id"].as_str().unwrap_or(""),
            fields.join(", ")
        );
    }
    Ok(())
}

async fn logs(a: LogsArgs) -> anyhow::Result<()> {
    let engine = Engine::connect(&a.slot.target)?;
    let lines = engine.get(&format!("/logs?limit={}", a.limit)).await?;
    // The sandbox tags each line a plugin logs with the plugin's id, `slot@version#sha`.
    let tag = format!("plugin={}@", a.slot.slot);
    let mine: Vec<&Value> = lines
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(&tag)))
        .collect();
    if a.slot.target.json {
        println!("{}", serde_json::to_string_pretty(&mine)?);
        return Ok(());
    }
    for line in &mine {
        let text = |k: &str| line[k].as_str().unwrap_or_default().to_string();
        println!("{}  {:<5}  {}", text("at"), text("level"), text("message"));
    }
    if mine.is_empty() {
        eprintln!("no log lines from {} plugins among the engine's last {}", a.slot.slot, a.limit);
    }
    Ok(())
}

/// `version 3  sha256:0123…  upload  1.2 MB  2026-12-02T10:00:00Z  decided_by …`
fn version_line(v: &Value) -> String {
    let sha = v["sha256"].as_str().unwrap_or("");
    let mib = |k: &str| v["memory"][k].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    let memory = match v["memory"].is_object() {
        true => format!(
            "  loaded: code {:.1} MiB, {} idle instances {:.1} MiB",
            mib("code_bytes"),
            v["memory"]["instances"],
            mib("instance_bytes")
        ),
        false => String::new(),
    };
    format!(
        "version {}  sha256:{}  {}  {} bytes  {}{memory}",
        v["version"],
        &sha[..sha.len().min(12)],
        v["origin"].as_str().unwrap_or(""),
        v["size_bytes"],
        v["created_at"].as_str().unwrap_or("")
    )
}

/// Prints the answer as JSON (`--json`) or as one line for people.
fn report(target: &Target, answer: &Value, line: impl Fn(&Value) -> String) -> anyhow::Result<()> {
    if target.json {
        println!("{}", serde_json::to_string_pretty(answer)?);
    } else {
        println!("{}", line(answer));
    }
    Ok(())
}
