//! `orchestrator bench`: throughput and latency of the embedded pipeline, next to
//! baselines measured in the same run (native rule cost, raw store writes).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;

use crate::config::{BenchArgs, BenchCommand, BenchFsyncArgs, BenchSeedArgs};
use crate::domain::OrderEvent;
use crate::engine::{Backend, Engine, EngineConfig};
use crate::generator::{self, TierMix};
use crate::journey::{self, LogPlace, Said, Trace};
use crate::log::kafka::KafkaConfig;
use crate::pipeline::build_row;
use crate::plugin::Slot;
use crate::plugin::native::NativeRules;
use crate::rules::Decision;
use crate::store::cql::CqlConfig;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Case, CaseRetention, Cases, Orders, RunKeys, Write, WriteResult};

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub events: u64,
    pub offered_rate: u64,
    pub machine: String,
    /// The pipeline with the default rules as Wasm plugins (as `serve` runs).
    pub plugins: PipelineRun,
    /// The same pipeline with the same rules run natively: the baseline.
    pub native: PipelineRun,
    pub plugins_vs_native: f64,
    /// Rows/s written straight into the store, no log and no rules: the ceiling.
    pub raw_store_rows_per_s: f64,
    pub plugins_vs_raw_store: f64,
    /// Native rule cost per event.
    pub native_rule_ns_per_event: f64,
    /// From a deploy request to the new version deciding (compile, check, persist, swap).
    pub deploy_to_active_ms: f64,
    pub peak_rss_mib: f64,
    /// The plugins pipeline again, keeping no cases for what-if runs: what recording costs.
    pub plugins_without_cases: PipelineRun,
    pub with_cases_vs_without: f64,
    /// A what-if run of the default rules over the cases the plugins run recorded.
    pub what_if: WhatIfRun,
}

#[derive(Debug, Serialize)]
pub struct WhatIfRun {
    /// Cases decided (by both versions), at most the route's limit.
    pub cases: u64,
    /// Cases/s from reading them to the report: the read, and both versions deciding.
    pub events_per_s: f64,
    /// Microseconds per event of each side's rules alone.
    pub active_us_per_event: f64,
    pub candidate_us_per_event: f64,
}

#[derive(Debug, Serialize)]
pub struct PipelineRun {
    /// Events/s through append → log → rules → store → commit.
    pub events_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Decided events the run could not keep for what-if runs (its recorder was behind).
    pub cases_lost: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command.clone() {
        Some(BenchCommand::Run(run_args)) => return generated_run(*run_args).await,
        Some(BenchCommand::Seed(seed_args)) => return seed(seed_args).await,
        Some(BenchCommand::Fsync(fsync_args)) => return fsync_ceiling(fsync_args),
        None => {}
    }
    if let Backend::Distributed { kafka, cql } = args.backends.backend()? {
        return run_distributed(args, kafka, cql).await;
    }
    let tmp = tempdir_for(&args)?;
    let dir = tmp.as_deref().unwrap_or_else(|| args.data_dir.as_deref().expect("a data dir"));
    eprintln!("bench: {} events, data in {}", args.events, dir.display());

    // The pipelines first, so peak RSS is the pipeline's own.
    let plugins = pipeline(&dir.join("plugins"), &args, true).await?;
    let peak_rss = peak_rss_mib();
    eprintln!("pipeline with plugins: {plugins:?}, peak RSS {peak_rss:.0} MiB");
    let native = pipeline(&dir.join("native"), &args, false).await?;
    eprintln!("pipeline with native rules: {native:?}");
    let what_if = what_if_run(&dir.join("plugins")).await?;
    eprintln!("what-if run over the recorded cases: {what_if:?}");
    let config = EngineConfig { pipeline: args.tuning.pipeline(), cases: None, ..Default::default() };
    let engine = Engine::open(Backend::Embedded, &dir.join("no-cases"), config).await?;
    let without_cases = drive(engine, &args, "no cases").await?;
    eprintln!("pipeline with plugins, no cases kept: {without_cases:?}");

    let raw = raw_store(&dir.join("raw"), args.events, args.tuning.pipeline().batch_max, &Shape::bench()).await?;
    eprintln!("raw store: {raw:.0} rows/s");

    let rule_ns = native_rule_cost(100_000);
    eprintln!("native rules: {rule_ns:.1} ns/event");

    let deploy_ms = deploy_to_active(&dir.join("deploy")).await?;
    eprintln!("deploy to active: {deploy_ms:.1} ms");
    let plugins_run_rate = plugins.events_per_s;
    let report = BenchReport {
        events: args.events,
        offered_rate: args.rate,
        machine: machine(),
        plugins_vs_native: plugins.events_per_s / native.events_per_s,
        plugins_vs_raw_store: plugins.events_per_s / raw,
        plugins,
        native,
        raw_store_rows_per_s: raw,
        native_rule_ns_per_event: rule_ns,
        deploy_to_active_ms: deploy_ms,
        peak_rss_mib: peak_rss,
        with_cases_vs_without: plugins_run_rate / without_cases.events_per_s,
        plugins_without_cases: without_cases,
        what_if,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(out) = &args.out {
        std::fs::write(out, json + "\n")?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(tmp) = tmp {
        let _ = std::fs::remove_dir_all(tmp);
    }
    Ok(())
}

fn tempdir_for(args: &BenchArgs) -> anyhow::Result<Option<std::path::PathBuf>> {
    if args.data_dir.is_some() {
        return Ok(None);
    }
    let dir = std::env::temp_dir().join(format!("orchestrator-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(Some(dir))
}

fn native_rule_cost(n: u64) -> f64 {
    let mut rng = SmallRng::seed_from_u64(7);
    let events: Vec<_> =
        (0..n).map(|i| generator::created("rule", i, "bench", &TierMix::default(), &mut rng)).collect();
    let started = Instant::now();
    let mut upserts = 0u64;
    for e in &events {
        if matches!(std::hint::black_box(NativeRules.decide(e, None)), Decision::Upsert(_)) {
            upserts += 1;
        }
    }
    assert_eq!(upserts, n);
    started.elapsed().as_nanos() as f64 / n as f64
}

/// What the ceiling's rows look like. They are shaped as the pipeline's of the same
/// bench (ids of the same length and order, the same decider), because the cost of a
/// write follows its keys: longer ids make every index larger and slower.
struct Shape {
    /// The id of the `i`th row.
    id: Box<dyn Fn(u64) -> String + Send + Sync>,
    /// Who decided the rows, as the pipeline's rows name their rule version.
    by: String,
}

impl Shape {
    /// Ids `{prefix}-{i}`, as the bench's generated events have.
    fn numbered(prefix: String, by: &str) -> Self {
        Self { id: Box::new(move |i| format!("{prefix}-{i}")), by: by.into() }
    }

    /// The orders `bench` generates (`produce`).
    fn bench() -> Self {
        Self::numbered("bench".into(), "bench")
    }

    /// A run's orders of one priority (`keys`), decided by `by`.
    fn of_run(keys: RunKeys, by: String) -> Self {
        Self { id: Box::new(move |i| keys.id(i)), by }
    }
}

/// Rows/s of `store.write` alone, in batches of `batch` (the pipeline's batch size).
async fn raw_store(dir: &Path, n: u64, batch: usize, shape: &Shape) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    raw_writes(&EmbeddedStore::open(&dir.join("store.sqlite"))?, None, n, batch, shape).await
}

/// Batches the ceiling keeps in flight: as many as the pipeline does, which sends the
/// next batch's write while one is written (`Pipeline::send_ahead`).
const CEILING_IN_FLIGHT: usize = 2;

/// With `cases`, each batch's what-if cases are also written, beside the batch's own
/// write as the pipeline's recorder writes them: the pipeline's full write set.
async fn raw_writes(
    store: &dyn Orders,
    cases: Option<&dyn Cases>,
    n: u64,
    batch: usize,
    shape: &Shape,
) -> anyhow::Result<f64> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let mut rng = SmallRng::seed_from_u64(11);
    let keep = CaseRetention::default().keep_for;
    // Each batch is made while the one before is written, as the pipeline decides its
    // next batch meanwhile; only the first one's making is on the clock.
    let started = Instant::now();
    futures::stream::iter(batches(n, batch))
        .map(|ids| {
            let (writes, events) = creates(shape, ids, &mut rng);
            async move {
                let record = async {
                    match cases {
                        Some(c) => c.record_cases(cases_of(events), keep).await,
                        None => Ok(()),
                    }
                };
                let (written, recorded) = futures::join!(store.write(writes), record);
                written?;
                anyhow::Ok(recorded?)
            }
        })
        .buffered(CEILING_IN_FLIGHT)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The cases the recorder keeps of created orders: each event, having met no row.
fn cases_of(events: Vec<OrderEvent>) -> Vec<Case> {
    let now = chrono::Utc::now();
    events.into_iter().map(|event| Case { event, current: None, recorded_at: now }).collect()
}

/// `0..n` in consecutive ranges of `size` (the last one shorter).
fn batches(n: u64, size: usize) -> impl Iterator<Item = std::ops::Range<u64>> {
    let size = size.max(1) as u64;
    (0..n.div_ceil(size)).map(move |k| k * size..((k + 1) * size).min(n))
}

/// Generated orders of `shape` as the pipeline writes a create with the default rules,
/// and their events.
fn creates(shape: &Shape, ids: std::ops::Range<u64>, rng: &mut SmallRng) -> (Vec<Write>, Vec<OrderEvent>) {
    let (mix, by) = (TierMix::default(), shape.by.as_str());
    ids.map(|i| {
        let mut e = generator::order((shape.id)(i), mix.pick(rng), rng);
        e.source = by.into();
        let Decision::Upsert(fields) = NativeRules.decide(&e, None) else { unreachable!("creates are upserts") };
        let row = build_row(&e, None, fields, by);
        // As large as the pipeline's: the ceiling is of the same write set.
        let trace = Trace {
            occurred_at: Some(e.occurred_at),
            accepted_at: e.accepted_at,
            appended_at: Some(e.occurred_at),
            log: Some(LogPlace { priority: row.priority, partition: 0, offset: i }),
            rules: Some(journey::verdict(by, Said::Upsert, None)),
            changes: journey::changes(None, &row),
            ..Trace::default()
        };
        (Write::Apply { event_id: e.event_id.clone(), source: e.source.clone(), base: None, row, trace }, e)
    })
    .unzip()
}

/// A bar for `len` items named `unit`, with the rate and the time left.
fn progress(len: u64, unit: &str) -> ProgressBar {
    let template = format!("{{spinner}} {{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit}  {{per_sec}}  eta {{eta}}");
    let style = ProgressStyle::with_template(&template).expect("template is valid").progress_chars("=> ");
    ProgressBar::new(len).with_style(style)
}

/// `bench seed`: generated orders straight into a stopped engine's embedded store.
async fn seed(args: BenchSeedArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    anyhow::ensure!(dir.is_dir(), "no data dir at {}: start the engine on it once first", dir.display());
    // The engine's own lock: seeding under a live engine would bypass its caches.
    let _lock = crate::engine::lock_data_dir(dir)?;
    let store = EmbeddedStore::open(&dir.join("store.sqlite"))?;
    let shape = Shape::numbered(args.prefix.clone(), "seed");
    let bar = progress(args.quantity, "orders");
    bar.set_message("seeding");
    let (started, mut rng) = (Instant::now(), SmallRng::from_os_rng());
    let (mut added, mut existed) = (0u64, 0u64);
    for ids in batches(args.quantity, 1024) {
        let end = ids.end;
        for (_, result) in store.write(creates(&shape, ids, &mut rng).0).await? {
            match result {
                WriteResult::Done => added += 1,
                _ => existed += 1,
            }
        }
        bar.set_position(end);
    }
    bar.finish_and_clear();
    let took = started.elapsed().as_secs_f64();
    eprintln!(
        "seeded {added} orders into {} in {took:.1} s ({:.0}/s); {existed} ids were taken already",
        dir.display(),
        added as f64 / took
    );
    Ok(())
}

/// `bench fsync`: serial one-row commits/s with the engine's SQLite settings.
fn fsync_ceiling(args: BenchFsyncArgs) -> anyhow::Result<()> {
    let path = args.dir.join(format!("fsync-bench-{}.sqlite", std::process::id()));
    let conn = crate::sqlite::open(&path)?;
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")?;
    let started = Instant::now();
    for i in 0..args.commits {
        conn.execute("INSERT INTO t (id, v) VALUES (?1, 'x')", [i as i64])?;
    }
    let per_s = args.commits as f64 / started.elapsed().as_secs_f64();
    drop(conn);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let report = serde_json::json!({ "dir": args.dir, "commits": args.commits, "fsynced_commits_per_s": per_s });
    println!("{report}");
    Ok(())
}

/// The default rules as the candidate, over the cases a pipeline run in `dir` recorded.
async fn what_if_run(dir: &Path) -> anyhow::Result<WhatIfRun> {
    let engine = Engine::open(Backend::Embedded, dir, EngineConfig::default()).await?;
    let since = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    let report = engine
        .what_if(Slot::OrderRules.builtin().to_vec(), since, crate::whatif::MAX_CASES)
        .await
        .map_err(|e| anyhow::anyhow!("the what-if run failed: {e}"))?;
    anyhow::ensure!(report.differed == 0, "the default rules differ from themselves: {report:?}");
    Ok(WhatIfRun {
        cases: report.cases,
        events_per_s: report.cases as f64 / (report.took_ms / 1e3),
        active_us_per_event: report.cost_us_per_event.active,
        candidate_us_per_event: report.cost_us_per_event.candidate,
    })
}

/// Deploys the default order rules as a new version and reports how long until active.
async fn deploy_to_active(dir: &Path) -> anyhow::Result<f64> {
    let engine = Engine::open(Backend::Embedded, dir, EngineConfig::default()).await?;
    let registry = engine.plugins().cloned().expect("plugins are on by default");
    let mut best = f64::MAX;
    for _ in 0..5 {
        let deployed = registry.deploy(Slot::OrderRules, Slot::OrderRules.builtin().to_vec(), false).await?;
        best = best.min(deployed.activation_ms);
    }
    Ok(best)
}

async fn pipeline(dir: &Path, args: &BenchArgs, plugins: bool) -> anyhow::Result<PipelineRun> {
    let mut config = EngineConfig { pipeline: args.tuning.pipeline(), ..Default::default() };
    if !plugins {
        config.plugins = None;
    }
    let engine = Engine::open(Backend::Embedded, dir, config).await?;
    drive(engine, args, if plugins { "plugins" } else { "native " }).await
}

/// When the bench's events are appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// While the pipeline consumes them: end to end, appends and processing together.
    Concurrent,
    /// Appended already, before the pipeline starts: processing alone, over a backlog.
    Backlog,
}

/// Pushes `args.events` through a started engine and measures it.
async fn drive(engine: Arc<Engine>, args: &BenchArgs, label: &'static str) -> anyhow::Result<PipelineRun> {
    drive_with(engine, args, label, Load::Concurrent).await
}

/// [`drive`], with the events appended as `load` says; the clock starts when the
/// pipeline does.
async fn drive_with(
    engine: Arc<Engine>,
    args: &BenchArgs,
    label: &'static str,
    load: Load,
) -> anyhow::Result<PipelineRun> {
    engine.start().await?;
    let bar = progress(args.events, "events");
    bar.set_message(label);
    let producer = match load {
        Load::Concurrent => tokio::spawn(produce(engine.clone(), args.events, args.append_batch.max(1), args.rate)),
        Load::Backlog => tokio::spawn(async { Ok(()) }),
    };
    let started = Instant::now();
    // A duplicate is an event found written already: after a failed step, the batch
    // sent ahead of the failed one comes again so.
    let processed = || {
        let s = engine.stats();
        [&s.applied, &s.skipped, &s.rejected, &s.duplicates].iter().map(|n| n.load(Ordering::Relaxed)).sum::<u64>()
    };
    // Progress is the test: a pipeline that stops moving for 30 s has lost something.
    let (mut last, mut last_change) = (0, Instant::now());
    while processed() < args.events {
        let now = processed();
        bar.set_position(now);
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if producer.is_finished() && last_change.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("the pipeline stopped at {now} of {} events", args.events);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    bar.finish_with_message("done");
    producer.await??;
    engine.shutdown().await;
    let (latency_p50_ms, latency_p99_ms) = {
        let h = engine.stats().latency_us.lock().unwrap_or_else(|p| p.into_inner());
        h.as_ref()
            .map_or((0.0, 0.0), |h| (h.value_at_quantile(0.5) as f64 / 1e3, h.value_at_quantile(0.99) as f64 / 1e3))
    };
    let cases_lost = engine.stats().cases_lost.load(Ordering::Relaxed);
    let events_per_s = args.events as f64 / elapsed.as_secs_f64();
    Ok(PipelineRun { events_per_s, latency_p50_ms, latency_p99_ms, cases_lost })
}

/// Appends `n` created events in batches, paced to `rate` events/s when non-zero.
async fn produce(engine: Arc<Engine>, n: u64, batch: usize, rate: u64) -> anyhow::Result<()> {
    let mut rng = SmallRng::seed_from_u64(42);
    let mix = TierMix::default();
    let started = Instant::now();
    let mut sent = 0u64;
    // Two appends in flight let the log's group commit fill while the next batch is built.
    let mut inflight: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    while sent < n {
        let take = (n - sent).min(batch as u64);
        let events: Vec<_> =
            (sent..sent + take).map(|i| generator::created("bench", i, "generator", &mix, &mut rng)).collect();
        sent += take;
        if let Some(prev) = inflight.take() {
            prev.await??;
        }
        let e = engine.clone();
        inflight = Some(tokio::spawn(async move { e.ingest(&events).await.map(|_| ()).map_err(Into::into) }));
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    if let Some(prev) = inflight {
        prev.await??;
    }
    Ok(())
}

/// Peak resident set size of this process, from /proc.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("{} cores, {cpu}", std::thread::available_parallelism().map_or(0, |n| n.get()))
}

#[derive(Debug, Serialize)]
pub struct DistributedReport {
    pub events: u64,
    pub machine: String,
    /// Conditional-batch writes/s the CQL store sustains at the engine's concurrency (64),
    /// measured just before the end-to-end run (each ceiling on a keyspace of its own,
    /// dropped after it, as each run's is).
    pub raw_lwt_writes_per_s: f64,
    /// The pipeline on Kafka + CQL with the default plugins; the burst is appended as
    /// fast as Kafka takes it, so the run's length is also the lag recovery time.
    pub pipeline: PipelineRun,
    /// End to end: the appends (Kafka, and each order's route in CQL) on the same
    /// cores while the pipeline runs.
    pub pipeline_vs_raw_lwt: f64,
    pub lag_recovery_s: f64,
    /// The same events appended first (at this rate), on a keyspace and topics of their
    /// own, then the ceiling measured again, then the events processed alone (latency
    /// there is mostly the wait before the start).
    pub backlog_appended_per_s: f64,
    pub raw_lwt_before_processing_per_s: f64,
    pub processing_only: PipelineRun,
    pub processing_only_vs_raw_lwt: f64,
    /// The ceiling again, right after, with each batch's what-if cases written beside
    /// it as the pipeline's recorder does: its full write set, the yardstick the
    /// embedded ceiling uses (issue #15, item 1).
    pub full_write_set_before_processing_per_s: f64,
    pub processing_only_vs_full_write_set: f64,
    /// The full write set's ceiling once more, right after processing, while its
    /// keyspace still stands: Cassandra then carries what the earlier phases left it
    /// (memtables to flush, sstables to compact), as processing did.
    pub full_write_set_after_processing_per_s: f64,
    /// Processing alone against the mean of the ceilings either side of it.
    pub processing_only_vs_full_write_set_bracket: f64,
}

/// The bench on Kafka and a CQL store: the store's own LWT ceiling, then the pipeline.
async fn run_distributed(args: BenchArgs, kafka: KafkaConfig, cql: CqlConfig) -> anyhow::Result<()> {
    // 80 random bits: a keyspace's name takes 48 characters at most.
    let run = uuid::Uuid::new_v4().simple().to_string()[..20].to_string();
    // Cassandra drifts over minutes (compaction, its JIT, data grown): each ratio's
    // ceiling is measured shortly before the pipeline it is compared with (before
    // processing alone: the bare ceiling, then the full write set's, then the pipeline,
    // then the full write set's again, so that processing sits between two).
    // With `cases`, of the pipeline's full write set: the rows and their what-if cases.
    let ceiling = |tag: &'static str, cases: bool| {
        let config = CqlConfig { keyspace: format!("bench_raw_{tag}_{run}"), ..cql.clone() };
        // As many rows as the pipeline writes: Cassandra flushes and compacts a large
        // write set within the run (a 20k ceiling paid for little of that: two of them a
        // minute apart differed by up to 40%).
        let (n, batch) = (args.events, args.tuning.pipeline().batch_max);
        async move {
            let store = crate::store::cql::CqlStore::open(config.clone()).await?;
            let recorder = cases.then_some(&store as &dyn Cases);
            // Dropped whether the ceiling ended or failed, so no keyspace outlives it.
            let raw = raw_writes(&store, recorder, n, batch, &Shape::bench()).await;
            drop(store);
            crate::store::cql::CqlStore::drop_keyspace(&config).await?;
            let raw = raw?;
            eprintln!("raw CQL conditional writes ({tag}): {raw:.0}/s");
            anyhow::Ok(raw)
        }
    };
    let dir = std::env::temp_dir().join(format!("orchestrator-bench-{run}"));
    let config = EngineConfig { pipeline: args.tuning.pipeline(), ..Default::default() };
    let backend = Backend::Distributed { kafka, cql: cql.clone() };
    // Each run's keyspace (and topic prefix), named once: it is dropped by that name.
    let (e2e, backlog) = (format!("bench_{run}"), format!("bench_backlog_{run}"));

    let raw = ceiling("e2e", false).await?;
    let engine = Engine::open(backend.clone().isolated(&e2e), &dir.join("e2e"), config.clone()).await?;
    let started = Instant::now();
    let pipeline = drive(engine, &args, "kafka+cql").await?;
    let lag_recovery_s = started.elapsed().as_secs_f64();
    drop_keyspace(&cql, &e2e).await?;
    eprintln!("end to end: {:.0} events/s", pipeline.events_per_s);

    let engine = Engine::open(backend.isolated(&backlog), &dir.join("backlog"), config).await?;
    let started = Instant::now();
    produce(engine.clone(), args.events, args.append_batch.max(1), args.rate).await?;
    let backlog_appended_per_s = args.events as f64 / started.elapsed().as_secs_f64();
    eprintln!("backlog: {} events appended, {backlog_appended_per_s:.0}/s", args.events);
    let raw_before = ceiling("backlog", false).await?;
    let full_before = ceiling("full", true).await?;
    let processing_only = drive_with(engine, &args, "backlog", Load::Backlog).await?;
    let full_after = ceiling("after", true).await;
    drop_keyspace(&cql, &backlog).await?;
    // A ceiling retries nothing, and Cassandra on shared cores sometimes times a write
    // out: the figures measured by then are reported, with this one missing (NaN).
    let full_after = full_after.unwrap_or_else(|e| {
        eprintln!("the full write set's ceiling after processing failed: {e:#}");
        f64::NAN
    });
    let bracket = (full_before + full_after) / 2.0;
    let report = DistributedReport {
        events: args.events,
        machine: machine(),
        raw_lwt_writes_per_s: raw,
        pipeline_vs_raw_lwt: pipeline.events_per_s / raw,
        lag_recovery_s,
        pipeline,
        backlog_appended_per_s,
        raw_lwt_before_processing_per_s: raw_before,
        processing_only_vs_raw_lwt: processing_only.events_per_s / raw_before,
        full_write_set_before_processing_per_s: full_before,
        processing_only_vs_full_write_set: processing_only.events_per_s / full_before,
        full_write_set_after_processing_per_s: full_after,
        processing_only_vs_full_write_set_bracket: processing_only.events_per_s / bracket,
        processing_only,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(out) = &args.out {
        std::fs::write(out, json + "\n")?;
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Drops a keyspace the bench made, so that the next phase's Cassandra does not compact it.
async fn drop_keyspace(cql: &CqlConfig, keyspace: &str) -> anyhow::Result<()> {
    let config = CqlConfig { keyspace: keyspace.into(), ..cql.clone() };
    Ok(crate::store::cql::CqlStore::drop_keyspace(&config).await?)
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub machine: String,
    pub backend: String,
    pub quantity: u64,
    /// The run as the engine recorded it (phases, windows, verification).
    pub run: crate::runs::model::Run,
    /// Orders/s from the run's start to its verified end.
    pub orders_per_s: f64,
    /// The store's raw write ceiling, measured in this process after the run:
    /// embedded row writes/s, or CQL conditional writes/s.
    pub raw_store_writes_per_s: f64,
    /// Orders/s while processing (first applied to last applied) against that ceiling.
    pub processing_vs_raw_store: f64,
    /// The NORMAL drain's orders/s (a backlog the pipeline works off alone, once
    /// generation is done) against that ceiling: the pipeline's own ratio.
    pub drain_vs_raw_store: f64,
    pub peak_rss_mib: f64,
}

/// Most rows the embedded ceiling of `bench run` writes (about 30 s here).
const RUN_CEILING_MAX: u64 = 2_000_000;
/// Most rows its CQL ceiling writes (about a minute here): enough for Cassandra to
/// flush and compact within it, as it does within the run.
const CQL_RUN_CEILING_MAX: u64 = 200_000;

/// `orchestrator bench run`: one generated run on a fresh engine, timed end to end.
async fn generated_run(args: crate::config::BenchRunArgs) -> anyhow::Result<()> {
    use crate::runs::model::RunRequest;
    use crate::runs::{RunConfig, Runs};
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("orchestrator-bench-run-{tag}"));
    let config = EngineConfig { pipeline: args.tuning.pipeline(), ..Default::default() };
    // The ceiling writes in the pipeline's batch size, whatever it was set to.
    let batch = config.pipeline.batch_max;
    let backend = args.backends.backend()?;
    let engine = Engine::open(backend.clone().isolated(&format!("benchrun_{tag}")), &dir, config).await?;
    engine.start().await?;
    let runs = Runs::new(engine.clone(), RunConfig { max_quantity: args.quantity, ..Default::default() });
    let started = runs
        .start(RunRequest { quantity: args.quantity as i64, tier_mix: None })
        .await
        .map_err(|e| anyhow::anyhow!("starting the run: {e}"))?;
    eprintln!("bench run {}: {} orders on {}", started.id, args.quantity, engine.backend());
    let run =
        crate::runs::cli::follow(args.quantity, || async { Ok(runs.current().await.expect("the run just started")) })
            .await?;
    let peak_rss = peak_rss_mib();
    // The ceiling's rows are shaped as the run's NORMAL orders: their ids (52 characters,
    // each index entry as long) and their decider.
    let decider = engine.order(&run.order_id(false, 0)).await?.map(|o| o.decided_by);
    engine.shutdown().await;
    let shape = Shape::of_run(run.keys(false, 0), decider.unwrap_or_else(|| "bench".into()));
    // As many rows as the run wrote, so that the ceiling meets tables as large as the
    // run's did (a ceiling on small tables is higher, and the ratio lower).
    let ceiling_n = args.quantity.min(RUN_CEILING_MAX);
    let raw = match backend {
        Backend::Embedded => raw_store(&dir.join("raw"), ceiling_n, batch, &shape).await?,
        Backend::Distributed { cql, .. } => {
            // The run's keyspace goes first, so that Cassandra does not compact it
            // during the ceiling; the ceiling's goes after it, ended or failed.
            drop_keyspace(&cql, &format!("benchrun_{tag}")).await?;
            let config = CqlConfig { keyspace: format!("benchrun_raw_{tag}"), ..cql };
            let store = crate::store::cql::CqlStore::open(config.clone()).await?;
            let raw = raw_writes(&store, None, ceiling_n.min(CQL_RUN_CEILING_MAX), batch, &shape).await;
            drop(store);
            crate::store::cql::CqlStore::drop_keyspace(&config).await?;
            raw?
        }
    };
    let processing_ms = match (run.vip.started_at, run.normal.ended_at.or(run.vip.ended_at)) {
        (Some(a), Some(b)) => (b - a).num_milliseconds().max(1) as f64,
        _ => f64::NAN,
    };
    let report = RunReport {
        machine: machine(),
        backend: engine.backend(),
        quantity: args.quantity,
        orders_per_s: args.quantity as f64 * 1000.0 / run.total_ms.unwrap_or(1).max(1) as f64,
        raw_store_writes_per_s: raw,
        processing_vs_raw_store: args.quantity as f64 * 1000.0 / processing_ms / raw,
        drain_vs_raw_store: run.normal.orders_per_s.unwrap_or(f64::NAN) / raw,
        peak_rss_mib: peak_rss,
        run,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(out) = &args.out {
        std::fs::write(out, json + "\n")?;
        eprintln!("wrote {}", out.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    match &report.run.verification {
        Some(v) if v.passed => Ok(()),
        Some(v) => anyhow::bail!("the run's verification failed: {}", v.failures.join("; ")),
        None => anyhow::bail!("the run ended {:?}: {}", report.run.phase, report.run.error.clone().unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bench run --batch-size 4096` compared its pipeline with a ceiling written in
    /// batches of 1024: larger batches commit less often, so the ratio was not of like
    /// with like. The ceiling now writes in the batch size it is given.
    #[tokio::test]
    async fn the_ceiling_writes_in_the_pipeline_batch_size() {
        let sizes: Vec<u64> = batches(10_000, 4096).map(|r| r.end - r.start).collect();
        assert_eq!(sizes, [4096, 4096, 1808]);
        assert_eq!(batches(4096, 4096).count(), 1);
        assert_eq!(batches(0, 1024).count(), 0);
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.sqlite")).unwrap();
        raw_writes(&store, None, 5000, 4096, &Shape::bench()).await.unwrap();
        assert_eq!(store.stats().await.unwrap().orders, 5000, "every row of the ceiling is written once");
    }

    /// The full write set's ceiling writes each row's what-if case too, as the
    /// pipeline's recorder does; the bare one writes none.
    #[tokio::test]
    async fn the_full_write_sets_ceiling_writes_a_case_per_row() {
        let dir = tempfile::tempdir().unwrap();
        let since = chrono::Utc::now() - chrono::Duration::seconds(1);
        let bare = EmbeddedStore::open(&dir.path().join("bare.sqlite")).unwrap();
        raw_writes(&bare, None, 1500, 1024, &Shape::bench()).await.unwrap();
        assert_eq!(bare.cases_since(since, 10_000).await.unwrap().len(), 0);
        let full = EmbeddedStore::open(&dir.path().join("full.sqlite")).unwrap();
        raw_writes(&full, Some(&full), 1500, 1024, &Shape::bench()).await.unwrap();
        let cases = full.cases_since(since, 10_000).await.unwrap();
        assert_eq!((cases.len(), full.stats().await.unwrap().orders), (1500, 1500));
        assert!(cases.iter().all(|c| c.current.is_none() && c.event.order_id.starts_with("bench-")));
    }

    /// A run's ceiling wrote `raw-<n>` ids (at most 11 characters) while the run wrote
    /// 52-character ones, so its rows were about a fifth cheaper than the run's and the
    /// ratio compared unlike writes. It now writes the run's own ids and decider.
    #[tokio::test]
    async fn a_runs_ceiling_writes_the_runs_ids_and_decider() {
        let keys = RunKeys { prefix: "run-01a24a1cda8c7484a25faa69f488779c-normal-".into(), count: 3000 };
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.sqlite")).unwrap();
        let by = "order-rules@1#sha256:ae112e643ef8";
        raw_writes(&store, None, 3000, 1024, &Shape::of_run(keys.clone(), by.into())).await.unwrap();
        for seq in [0, 1, 2999] {
            let row = store.get(&keys.id(seq)).await.unwrap().expect("the run's id is in the ceiling's table");
            assert_eq!((row.id.len(), row.decided_by.as_str()), (keys.id_chars(), by));
        }
        assert_eq!(store.stats().await.unwrap().orders, 3000);
    }
}
