//! Interleaved A/B timing of rule builds, for noisy shared machines: the native default
//! rules, then each component given, through the packed and the typed path, timed in
//! alternating rounds so that a slow minute hits every variant alike. Prints the median
//! and the 10th percentile per variant, per order, for batches of 100 new orders.
//!
//! `cargo run --release --example rules_ab -- [COMPONENT.wasm ...]` (none: the embedded
//! default rules).

use std::hint::black_box;
use std::time::Instant;

use orchestrator::domain::{Order, OrderEvent};
use orchestrator::generator::{self, TierMix};
use orchestrator::plugin::Slot;
use orchestrator::plugin::host::{Handle, Limits, Path, Runtime};
use orchestrator::plugin::native::NativeRules;
use orchestrator::rules::OrderRules;
use rand::SeedableRng;

const BATCH: u64 = 100;
const CALLS_PER_ROUND: u32 = 100;
const ROUNDS: usize = 60;

type Variant<'a> = (String, Box<dyn Fn() + 'a>);

fn main() -> anyhow::Result<()> {
    let runtime = Runtime::new(Limits::default())?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let events: Vec<OrderEvent> =
        (0..BATCH).map(|i| generator::created("ab", i, "ab", &TierMix::default(), &mut rng)).collect();
    let inputs: Vec<(&OrderEvent, Option<&Order>)> = events.iter().map(|e| (e, None)).collect();

    let mut files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        files.push("embedded".into());
    }
    let mut variants: Vec<Variant<'_>> =
        vec![("native".into(), Box::new(|| drop(black_box(NativeRules.decide_batch(&inputs)))))];
    for file in &files {
        let bytes = match file.as_str() {
            "embedded" => Slot::OrderRules.builtin().to_vec(),
            path => std::fs::read(path)?,
        };
        let Handle::Rules(plugin) = runtime.compile(Slot::OrderRules, &bytes)?.load(1, "rules-ab-0000") else {
            anyhow::bail!("{file} is not an order-rules component")
        };
        for (name, path) in [("packed", Path::Packed), ("typed", Path::Typed)] {
            let plugin = plugin.clone();
            let inputs = &inputs;
            variants.push((
                format!("{file} ({name})"),
                Box::new(move || drop(black_box(plugin.decide_batch_by(path, inputs)))),
            ));
        }
    }

    for (_, run) in &variants {
        (0..300).for_each(|_| run());
    }
    let mut nanos: Vec<Vec<f64>> = vec![Vec::with_capacity(ROUNDS); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, run)) in variants.iter().enumerate() {
            let started = Instant::now();
            (0..CALLS_PER_ROUND).for_each(|_| run());
            nanos[i].push(started.elapsed().as_nanos() as f64 / f64::from(CALLS_PER_ROUND) / BATCH as f64);
        }
    }
    let native_median = median(&mut nanos[0]);
    for (i, (name, _)) in variants.iter().enumerate() {
        let m = median(&mut nanos[i]);
        let p10 = nanos[i][ROUNDS / 10];
        println!("{name:60} median {m:7.1} ns/order  p10 {p10:7.1}  ×native {:4.2}", m / native_median);
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
