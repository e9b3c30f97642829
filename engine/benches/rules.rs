//! Cost of one decision: the default rules natively, and the same code as a Wasm
//! component, one order per call and batched, through the packed fast path and the
//! typed WIT calls; plus compile and instantiate times.
//! Run: `cargo bench --bench rules` (`BENCH_RULES_COMPONENT=file.wasm` measures another
//! build of the default rules in place of the embedded one).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use orchestrator::domain::{Order, OrderEvent};
use orchestrator::generator::{self, TierMix};
use orchestrator::plugin::Slot;
use orchestrator::plugin::host::{Handle, Limits, Path, Runtime};
use orchestrator::plugin::native::NativeRules;
use orchestrator::rules::OrderRules;
use rand::SeedableRng;
use rand::rngs::SmallRng;

fn events(n: u64) -> Vec<OrderEvent> {
    let mut rng = SmallRng::seed_from_u64(1);
    (0..n).map(|i| generator::created("bench", i, "bench", &TierMix::default(), &mut rng)).collect()
}

fn decisions(c: &mut Criterion) {
    let runtime = Runtime::new(Limits::default()).unwrap();
    // Another build of the default rules can be measured in their place.
    let bytes = match std::env::var_os("BENCH_RULES_COMPONENT") {
        Some(path) => std::fs::read(path).expect("BENCH_RULES_COMPONENT names a readable component"),
        None => Slot::OrderRules.builtin().to_vec(),
    };
    let compiled = runtime.compile(Slot::OrderRules, &bytes).unwrap();
    let Handle::Rules(plugin) = compiled.load(1, "bench00000000") else { panic!("order rules load as rules") };
    let evs = events(100);
    let inputs: Vec<(&OrderEvent, Option<&Order>)> = evs.iter().map(|e| (e, None)).collect();

    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1));
    g.bench_function("native, 1 order", |b| b.iter(|| black_box(NativeRules.decide_batch(black_box(&inputs[..1])))));
    let paths: &[(&str, Path)] = if plugin.has_packed_path() {
        &[("packed", Path::Packed), ("typed", Path::Typed)]
    } else {
        &[("typed", Path::Typed)]
    };
    for &(name, path) in paths {
        g.bench_function(format!("component ({name}), 1 order per call"), |b| {
            b.iter(|| black_box(plugin.decide_batch_by(path, black_box(&inputs[..1]))))
        });
    }
    g.throughput(Throughput::Elements(100));
    g.bench_function("native, 100 orders", |b| b.iter(|| black_box(NativeRules.decide_batch(black_box(&inputs)))));
    for &(name, path) in paths {
        g.bench_function(format!("component ({name}), 100 orders per call"), |b| {
            b.iter(|| black_box(plugin.decide_batch_by(path, black_box(&inputs))))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("plugin lifecycle");
    g.sample_size(20);
    g.bench_function("compile + contract check", |b| {
        b.iter(|| black_box(runtime.compile(Slot::OrderRules, &bytes).unwrap()))
    });
    g.sample_size(100);
    g.bench_function("instantiate (pooled)", |b| {
        b.iter_batched(|| (), |_| plugin.check_instantiates().unwrap(), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
