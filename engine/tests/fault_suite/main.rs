//! The fault suite, in the spirit of Jepsen: a seeded, randomized workload from several
//! clients at once (API producers, Shopify webhooks, kcat, operator edits, runs) against
//! real engines while a nemesis injects faults (kill -9, service restarts, pauses, a
//! plugin hot swap and rollback, a full disk). Afterwards a checker compares what the
//! engines hold with what the clients were told. TESTING.md describes it.
//!
//! `cargo test -p orchestrator --test fault_suite -- --seed 42 --duration 10m`
//! (`ORCHESTRATOR_TEST_BACKEND=distributed` for Kafka + CQL with two engines). With
//! `--scale 4` (Kafka + CQL) four engines share the group and instances leave and join
//! in turn instead of the faults; each instance's throughput and lag are reported.

#[path = "../common/mod.rs"]
mod common;

mod checker;
mod clients;
mod journal;
mod nemesis;
mod rng;
mod scale;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, distributed};

use crate::journal::Journal;
use crate::nemesis::{Disk, Mode};
use crate::rng::Rng;

/// How long a CI run injects faults, per backend (the budget is 4 minutes in all).
const CI_DURATION: Duration = Duration::from_secs(60);
/// Events parked longer than this are dead-lettered; short, so that a run sees it happen.
const PARK_TIMEOUT_SECS: &str = "20";
/// A killed engine's run holds NORMAL on the others until its lease lapses: shorter than
/// the default 90 s so the suite spends less time waiting, longer than a Cassandra
/// restart (about 23 s here) so a run rides one out.
const RUN_LEASE_SECS: &str = "60";
/// Shopify's signing secret in the suite.
pub const SECRET: &str = "shpss_fault_suite";

struct Args {
    seed: u64,
    duration: Duration,
    mode: Mode,
}

fn main() {
    let Some(args) = parse_args() else { return };
    // The faults make the engines log many expected errors: keep them out of the way.
    let logs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fault-suite-{}-engines", args.seed));
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!("fault suite: the engines log to {}", logs.display());
    // SAFETY: no other thread runs yet (the runtime starts below).
    unsafe { std::env::set_var("ORCHESTRATOR_TEST_ENGINE_LOGS", &logs) };
    let backend = match args.mode {
        Mode::Scale(n) => {
            assert!(distributed(), "a scale run needs Kafka + CQL (ORCHESTRATOR_TEST_BACKEND=distributed)");
            format!("Kafka + CQL with {n} engines leaving and joining")
        }
        Mode::Faults if distributed() => "Kafka + CQL with two engines".into(),
        Mode::Faults => "the embedded default".into(),
    };
    eprintln!("fault suite: seed {} for {:?} on {backend}", args.seed, args.duration);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let findings = runtime.block_on(run(&args));
    if findings.is_empty() {
        eprintln!("fault suite: PASS (seed {})", args.seed);
        return;
    }
    for f in findings.iter().take(50) {
        eprintln!("  - {f}");
    }
    eprintln!(
        "fault suite: FAIL with {} findings; rerun with `cargo test -p orchestrator --test fault_suite -- --seed {}`",
        findings.len(),
        args.seed
    );
    std::process::exit(1);
}

async fn run(args: &Args) -> Vec<String> {
    let disk = Disk::prepare();
    let extra =
        ["--shopify-secret", SECRET, "--park-timeout-secs", PARK_TIMEOUT_SECS, "--run-lease-secs", RUN_LEASE_SECS];
    let mut engines = vec![Server::start_with(&disk.engine_dir(0), &extra).await];
    let size = match args.mode {
        Mode::Scale(n) => n,
        Mode::Faults if distributed() => 2,
        Mode::Faults => 1,
    };
    for i in 1..size {
        let next = Server::start_beside(&disk.engine_dir(i), &engines[0]).await;
        engines.push(next);
    }
    let first = engines[0].base.clone();
    let bases: clients::Bases = Arc::new(std::sync::RwLock::new(engines.iter().map(|s| s.base.clone()).collect()));
    let kafka_prefix = engines[0].kafka_prefix();
    let journal = Arc::new(Journal::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut rng = Rng::new(args.seed);

    let clients = clients::spawn_all(&mut rng, bases.clone(), kafka_prefix, &journal, &stop);
    let watching = matches!(args.mode, Mode::Scale(_)).then(|| scale::watch(first, stop.clone()));
    let nemesis = nemesis::run(rng.fork(), engines, disk, journal.clone(), args.duration, args.mode, bases);
    let nemesis = tokio::spawn(nemesis);
    let (engines, disk) = nemesis.await.expect("the nemesis ran to its end");
    stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    for c in clients {
        c.await.expect("a client ran to its end");
    }
    eprintln!("fault suite: clients finished {:.1} s after the faults stopped", stopped.elapsed().as_secs_f64());

    let mut findings = checker::check(&engines, &journal).await;
    if let (Some(watching), Mode::Scale(n)) = (watching, args.mode) {
        let report = watching.await.expect("the scale report");
        report.print();
        if report.instances() <= n {
            findings.push(format!("only {} instances were seen in the group: none joined", report.instances()));
        }
    }
    journal.save(args.seed);
    drop(engines);
    drop(disk);
    findings
}

/// What the suite is told: `--seed N`, `--duration 90s|10m|1h` (or `FAULT_SEED`,
/// `FAULT_DURATION`), and `--scale N` for a scale run. Other libtest flags are ignored; name filters are honoured, so
/// `cargo test -- some_other_test` does not run the suite.
fn parse_args() -> Option<Args> {
    let mut seed = std::env::var("FAULT_SEED").ok().map(|s| s.parse().expect("FAULT_SEED is a number"));
    let mut duration = std::env::var("FAULT_DURATION").ok().map(|d| parse_duration(&d));
    let mut filters = Vec::new();
    let mut mode = Mode::Faults;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => seed = Some(args.next().and_then(|s| s.parse().ok()).expect("--seed takes a number")),
            "--duration" => duration = Some(parse_duration(&args.next().expect("--duration takes a value"))),
            "--scale" => {
                let n = args.next().and_then(|n| n.parse().ok()).filter(|n| *n >= 2);
                mode = Mode::Scale(n.expect("--scale takes the number of engines, 2 or more"));
            }
            "--list" => {
                println!("fault_suite: test");
                return None;
            }
            "--ignored" => return None,
            "--test-threads" | "--color" | "--format" | "--skip" | "-Z" => {
                args.next();
            }
            flag if flag.starts_with('-') => {}
            _ => filters.push(a),
        }
    }
    if !filters.is_empty() && !filters.iter().any(|f| "fault_suite".contains(f.as_str())) {
        println!("fault_suite: filtered out");
        return None;
    }
    let seed = seed.unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        now.as_nanos() as u64 % 1_000_000_000
    });
    Some(Args { seed, duration: duration.unwrap_or(CI_DURATION), mode })
}

/// `90`, `90s`, `10m` or `2h`.
fn parse_duration(text: &str) -> Duration {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("--duration {text:?}: expected a number and s, m or h"));
    match unit {
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => panic!("--duration {text:?}: the unit is s, m or h"),
    }
}
