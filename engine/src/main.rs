//! The `orchestrator` binary: parses the command line and runs a subcommand.

// Lints, as linkerd does: no unsafe in the host, 2018 idioms, and clippy's defaults
// (CI runs clippy with warnings as errors).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use anyhow::Context;
use clap::Parser;
use orchestrator::api::auth::{self, Access};
use orchestrator::api::listener;
use orchestrator::api::origin::Hosts;
use orchestrator::api::ws::WsLimits;
use orchestrator::api::{self, ApiConfig, AppState};
use orchestrator::config::{
    AccessArgs, BridgeArgs, Cli, Command, SchemaArgs, ServeArgs, ShopifyCommand, WebhookCommand,
};
use orchestrator::engine::{Backend, Engine, EngineConfig, PluginConfig};
use orchestrator::plugin::host::Limits;
use orchestrator::runs::{RunConfig, Runs};

use orchestrator::{bench, schema, telemetry};
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;

/// Many small, short-lived blocks cross threads on the hot paths (events, rows, traces);
/// mimalloc serves them faster than glibc's allocator (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let json_logs = matches!(&cli.command, Command::Serve(a) if a.log_format == "json");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // stderr follows RUST_LOG; the in-memory lines for GET /logs keep INFO and above regardless.
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = if json_logs { stderr.json().with_filter(filter).boxed() } else { stderr.with_filter(filter).boxed() };
    tracing_subscriber::registry()
        .with(stderr)
        .with(orchestrator::recent_logs::Recent.with_filter(LevelFilter::INFO))
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::Schema(args) => write_schemas(args),
        Command::Webhook(WebhookCommand::Send(args)) => runtime.block_on(orchestrator::shopify::send::run(args)),
        Command::Bridge(args) => runtime.block_on(bridge(args)),
        Command::Generate(args) => runtime.block_on(orchestrator::runs::cli::generate(args)),
        Command::Plugin(command) => runtime.block_on(orchestrator::devkit::run(command)),
        Command::Shopify(ShopifyCommand::Reconcile(args)) => {
            runtime.block_on(orchestrator::shopify::reconcile::run_cli(args))
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let access = access(&args.access, args.listen, Some(&args.data_dir))?;
    let admin = args.shopify.admin()?;
    let shopify = args.shopify.config()?.map(|c| orchestrator::shopify::ShopifyConfig { admin: admin.clone(), ..c });
    if admin.is_some() && shopify.is_none() {
        anyhow::bail!("reconciliation delivers through the webhook path: it needs --shopify-secret too");
    }
    let hosts = Hosts::new(args.listen.ip().is_loopback(), &args.access.allowed_hosts);
    let metrics = install_metrics();
    let plugins = PluginConfig {
        limits: Limits {
            deadline: Duration::from_millis(args.plugin_deadline_ms.max(1)),
            memory_bytes: args.plugin_memory_mib.max(1) << 20,
        },
        max_bytes: args.max_plugin_bytes,
    };
    let config = EngineConfig {
        pipeline: args.tuning.pipeline(),
        plugins: Some(plugins),
        cases: args.case_retention(),
        ..Default::default()
    };
    let backend = args.backends.backend()?;
    let where_ = match &backend {
        Backend::Embedded => format!("opening the embedded log and store in {}", args.data_dir.display()),
        Backend::Distributed { kafka, cql } => {
            format!("connecting to Kafka at {} and CQL at {:?}", kafka.brokers, cql.nodes)
        }
    };
    let embedded = backend.is_embedded();
    let engine = Engine::open(backend, &args.data_dir, config).await.context(where_)?;
    engine.start().await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is another engine running? set --listen)", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?, data_dir = %args.data_dir.display(), backend = %engine.backend(),
        "engine ready: API at http://{}/ (see /openapi.json), metrics at /metrics", listener.local_addr()?
    );
    if let Some(config) = &shopify {
        orchestrator::shopify::reconcile::spawn_periodic(engine.clone(), config.clone());
        orchestrator::shopify::compliance::spawn_worker(engine.clone(), config.compliance.clone());
    }
    let runs = Runs::new(
        engine.clone(),
        RunConfig {
            max_quantity: args.max_run_quantity,
            lease: Duration::from_secs(args.run_lease_secs),
            ..Default::default()
        },
    );
    if embedded {
        let failed = runs.fail_interrupted().await?;
        if failed > 0 {
            tracing::warn!(failed, "runs interrupted by the last stop are marked FAILED");
        }
    }
    let limits = args.connections.limits();
    let config = ApiConfig {
        max_body_bytes: args.max_body_bytes,
        max_page_bytes: args.connections.max_page_bytes as usize,
        access,
        hosts,
        body_timeout: limits.body_timeout,
        ws: WsLimits::new(args.connections.max_ws_clients),
        refusals: Default::default(),
        shopify,
    };
    let pulse = orchestrator::pulse::Pulse::start(engine.clone());
    let state = AppState { engine: engine.clone(), runs, metrics, config: std::sync::Arc::new(config), pulse };
    listener::serve(listener, api::router(state), &limits, shutdown_signal()).await?;
    tracing::info!("shutting down: finishing the batch in hand");
    engine.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The bridge alone: an engine whose pipeline never starts, serving only the webhook routes.
async fn bridge(args: BridgeArgs) -> anyhow::Result<()> {
    let backend = args.backends.backend()?;
    if backend.is_embedded() {
        anyhow::bail!(
            "the bridge produces to Kafka and deduplicates in the CQL store: give --kafka-brokers and --cql-nodes"
        );
    }
    let shopify = args.shopify.config()?.ok_or_else(|| {
        anyhow::anyhow!("the bridge needs --shopify-secret (SHOPIFY_WEBHOOK_SECRET) or --shopify-secrets-file")
    })?;
    let access = access(&args.access, args.listen, None)?;
    let hosts = Hosts::new(args.listen.ip().is_loopback(), &args.access.allowed_hosts);
    let metrics = install_metrics();
    // No pipeline, no plugins, no WebSocket clients: webhooks in, events on the log out.
    let config = EngineConfig { plugins: None, follow_changes: false, ..Default::default() };
    // Nothing is kept on disk, so no data dir is made.
    let engine = Engine::open(backend, std::path::Path::new("data"), config).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "Shopify bridge ready: POST /webhooks/shopify");
    // The bridge's only write is the signed webhook; tokens guard its audit off loopback.
    let runs = Runs::new(engine.clone(), RunConfig::default());
    let limits = args.connections.limits();
    let config = ApiConfig {
        max_body_bytes: 1 << 20,
        max_page_bytes: args.connections.max_page_bytes as usize,
        access,
        hosts,
        body_timeout: limits.body_timeout,
        ws: WsLimits::new(0),
        refusals: Default::default(),
        shopify: Some(shopify),
    };
    let pulse = orchestrator::pulse::Pulse::start(engine.clone());
    let state = AppState { engine: engine.clone(), runs, metrics, config: std::sync::Arc::new(config), pulse };
    listener::serve(listener, api::bridge_router(state), &limits, shutdown_signal()).await?;
    engine.flush_log().await?;
    Ok(())
}

/// The API's tokens: the admin token (configured; or, on loopback only, made up and
/// written to `<data-dir>/api-token`), and those of the tokens file.
fn access(
    args: &AccessArgs,
    listen: std::net::SocketAddr,
    data_dir: Option<&std::path::Path>,
) -> anyhow::Result<Access> {
    let others = match &args.tokens_file {
        Some(path) => auth::read_tokens_file(path)?,
        None => Vec::new(),
    };
    let configured = match (&args.api_token, &args.api_token_file) {
        (Some(t), _) if !t.is_empty() => Some(t.clone()),
        (_, Some(path)) => {
            auth::check_private(path)?;
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let token = text.lines().next().unwrap_or_default().trim().to_string();
            Some(token).filter(|t| !t.is_empty())
        }
        _ => None,
    };
    let loopback = listen.ip().is_loopback();
    let admin = match (configured, data_dir) {
        (Some(t), _) if t.len() < auth::MIN_TOKEN_LEN && !loopback => {
            anyhow::bail!(
                "the API token is shorter than {} characters: too easy to guess off loopback",
                auth::MIN_TOKEN_LEN
            )
        }
        (Some(t), _) => t,
        (None, _) if !loopback => anyhow::bail!(
            "refusing to serve on {listen} without an admin token: set ORCHESTRATOR_API_TOKEN or --api-token-file"
        ),
        // Nobody knows this one: only the tokens file's tokens work.
        (None, None) => uuid::Uuid::new_v4().simple().to_string(),
        (None, Some(dir)) => {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            let token = uuid::Uuid::new_v4().simple().to_string();
            // Private from the first byte: never readable by another user, not even briefly.
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            let path = dir.join("api-token");
            let _ = std::fs::remove_file(&path);
            let writing = || format!("writing {}", path.display());
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path);
            file.as_mut().map_err(|e| anyhow::anyhow!("{e}")).with_context(writing)?.write_all(token.as_bytes())?;
            tracing::warn!(
                path = %path.display(),
                "no API token configured: generated one for this loopback-only engine \
                 (set ORCHESTRATOR_API_TOKEN to choose)"
            );
            token
        }
    };
    if let Some(name) = auth::reuses_admin(&admin, &others) {
        anyhow::bail!("the tokens file gives {name} the admin token; each token names one caller");
    }
    // Reads are open only to this machine's users: not where a proxy brings others in
    // (it makes `--allowed-hosts` necessary on a loopback bind).
    let open_reads = loopback && args.allowed_hosts.is_empty();
    Ok(Access::new(&admin, others, open_reads))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn write_schemas(args: SchemaArgs) -> anyhow::Result<()> {
    let mut stale = Vec::new();
    for (name, text) in schema::json_schemas() {
        let path = args.out_dir.join(name);
        if args.check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(path.display().to_string());
            }
        } else {
            std::fs::create_dir_all(&args.out_dir)?;
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        anyhow::bail!("out of date (run `orchestrator schema`): {}", stale.join(", "));
    }
    Ok(())
}

/// The Prometheus recorder, with every error series counted from zero.
fn install_metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    let handle = telemetry::install();
    orchestrator::failure::count_from_zero();
    handle
}
