//! `orchestrator plugin test`: decides events with a component on this machine, under
//! the engine's own sandbox (the same deadline, memory cap and import policy), before
//! it goes anywhere near an engine.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use serde::Deserialize;

use crate::domain::{Order, OrderEvent};
use crate::generator::{self, TierMix};
use crate::plugin::Slot;
use crate::plugin::host::{Handle, Limits, Runtime};
use crate::rules::{Decision, OrderRules, outcome_json};

/// The largest events file read, and the longest line in it.
const MAX_FILE_BYTES: u64 = 256 << 20;
const MAX_LINE_BYTES: usize = 1 << 20;
/// Events decided per call, as the pipeline batches them.
const BATCH: usize = 100;

#[derive(Debug, Clone, Args)]
pub struct TestArgs {
    /// The component (`.wasm`) to try.
    pub component: PathBuf,
    /// JSON lines of `{"event": OrderEvent, "current": Order|null}`; each decision is
    /// printed as a JSON line.
    #[arg(long, conflicts_with = "generated")]
    pub events: Option<PathBuf>,
    /// Decide this many new orders from the load generator instead, and print a summary.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub generated: Option<u64>,
    /// The per-call deadline, as the engine's --plugin-deadline-ms.
    #[arg(long, default_value_t = 10)]
    pub plugin_deadline_ms: u64,
    /// The memory cap, as the engine's --plugin-memory-mib.
    #[arg(long, default_value_t = 16)]
    pub plugin_memory_mib: usize,
    /// Also decide the same events with the engine's default rules run natively: their
    /// cost is the yardstick (the summary gives the ratio), and a port of the default
    /// rules sees every decision that differs.
    #[arg(long)]
    pub against_native: bool,
}

/// One line of an events file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    event: OrderEvent,
    #[serde(default)]
    current: Option<Order>,
}

#[derive(Default)]
struct Tally {
    upsert: u64,
    skip: u64,
    reject: u64,
    failed: u64,
}

pub fn run(args: TestArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.component)
        .with_context(|| format!("cannot read the component {}", args.component.display()))?;
    let limits = Limits {
        deadline: std::time::Duration::from_millis(args.plugin_deadline_ms.max(1)),
        memory_bytes: args.plugin_memory_mib.max(1) << 20,
    };
    // Compiled once per component and kept, as the engine does: a Python component
    // takes seconds to compile.
    let runtime = match cache_dir() {
        Some(dir) => Runtime::with_cache(limits, &dir)?,
        None => Runtime::new(limits)?,
    };
    let handle = runtime.compile(Slot::OrderRules, &bytes)?.load(0, &crate::plugin::sha256_hex(&bytes));
    handle.smoke_check().map_err(|e| anyhow::anyhow!("the engine would refuse this component: {e}"))?;
    let Handle::Rules(rules) = handle else { anyhow::bail!("the component is not order rules") };
    let (inputs, print_each) = match (&args.events, args.generated) {
        (Some(file), _) => (read_events(file)?, true),
        (None, Some(n)) => (generated(n), false),
        (None, None) => anyhow::bail!("say what to decide: --events FILE or --generated N"),
    };
    let bar = ProgressBar::new(inputs.len() as u64);
    bar.set_style(ProgressStyle::with_template("{spinner} deciding [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")?);
    if print_each {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let (mut tally, started) = (Tally::default(), Instant::now());
    for chunk in inputs.chunks(BATCH) {
        let batch: Vec<(&OrderEvent, Option<&Order>)> = chunk.iter().map(|i| (&i.event, i.current.as_ref())).collect();
        for (input, decided) in chunk.iter().zip(rules.decide_batch(&batch)) {
            match &decided {
                Ok(Decision::Upsert(_)) => tally.upsert += 1,
                Ok(Decision::Skip(_)) => tally.skip += 1,
                Ok(Decision::Reject(_)) => tally.reject += 1,
                Err(e) => {
                    tally.failed += 1;
                    eprintln!("event {}: the plugin failed: {e}", input.event.event_id);
                }
            }
            if print_each {
                let line = serde_json::json!({ "event_id": input.event.event_id, "outcome": outcome_json(&decided) });
                println!("{line}");
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let n = inputs.len().max(1) as f64;
    let per_event = started.elapsed().as_secs_f64() * 1e6 / n;
    eprintln!(
        "{} events: {} upsert, {} skip, {} reject, {} failed; {per_event:.2} µs per event",
        inputs.len(),
        tally.upsert,
        tally.skip,
        tally.reject,
        tally.failed,
    );
    if args.against_native {
        against_native(&*rules, &inputs, per_event);
    }
    if tally.failed > 0 {
        anyhow::bail!("the plugin failed on {} event(s): the engine would dead-letter them", tally.failed);
    }
    Ok(())
}

/// Decides `inputs` again with the native default rules: the cost yardstick, and the
/// decisions that differ from the plugin's.
fn against_native(plugin: &dyn OrderRules, inputs: &[Input], per_event: f64) {
    let native = crate::plugin::native::NativeRules;
    let started = Instant::now();
    let mut reference = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(BATCH) {
        let batch: Vec<(&OrderEvent, Option<&Order>)> = chunk.iter().map(|i| (&i.event, i.current.as_ref())).collect();
        reference.extend(native.decide_batch(&batch));
    }
    let native_per_event = started.elapsed().as_secs_f64() * 1e6 / inputs.len().max(1) as f64;
    let mut differ = 0;
    for (chunk, expected) in inputs.chunks(BATCH).zip(reference.chunks(BATCH)) {
        let batch: Vec<(&OrderEvent, Option<&Order>)> = chunk.iter().map(|i| (&i.event, i.current.as_ref())).collect();
        for ((input, got), want) in chunk.iter().zip(plugin.decide_batch(&batch)).zip(expected) {
            if outcome_json(&got) != outcome_json(want) {
                differ += 1;
                if differ <= 5 {
                    eprintln!(
                        "event {}: the plugin {}, the default rules {}",
                        input.event.event_id,
                        outcome_json(&got),
                        outcome_json(want)
                    );
                }
            }
        }
    }
    eprintln!(
        "native default rules: {native_per_event:.2} µs per event; this plugin costs {:.1}x that; \
         {differ} of {} decisions differ from theirs",
        per_event / native_per_event.max(1e-3),
        inputs.len()
    );
}

fn read_events(path: &std::path::Path) -> anyhow::Result<Vec<Input>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata()?.len();
    anyhow::ensure!(size <= MAX_FILE_BYTES, "{} is {size} bytes; the limit is {MAX_FILE_BYTES}", path.display());
    let mut inputs = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        anyhow::ensure!(
            line.len() <= MAX_LINE_BYTES,
            "{}: line {} is over {MAX_LINE_BYTES} bytes",
            path.display(),
            n + 1
        );
        let input: Input = serde_json::from_str(&line).with_context(|| {
            format!("{}: line {} is not {{\"event\": OrderEvent, \"current\": Order|null}}", path.display(), n + 1)
        })?;
        input.event.validate().map_err(|why| anyhow::anyhow!("{}: line {}: {why}", path.display(), n + 1))?;
        inputs.push(input);
    }
    Ok(inputs)
}

/// `$XDG_CACHE_HOME/orchestrator/plugin-cache`, or under `~/.cache`.
fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("orchestrator").join("plugin-cache"))
}

/// New orders as the load generator makes them, the same ones on every run.
fn generated(n: u64) -> Vec<Input> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mix = TierMix::default();
    (0..n)
        .map(|i| Input { event: generator::created("plugin-test", i, "plugin-test", &mix, &mut rng), current: None })
        .collect()
}
