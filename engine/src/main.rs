//! The `orchestrator` binary: parses the command line and runs a subcommand.

// Lints, as linkerd does: no unsafe in the host, 2018 idioms, and clippy's defaults
// (CI runs clippy with warnings as errors).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use anyhow::Context;
use clap::Parser;
use orchestrator::api::{self, ApiConfig, AppState};
use orchestrator::config::{BridgeArgs, Cli, Command, SchemaArgs, ServeArgs, WebhookCommand};
use orchestrator::engine::{Backend, Engine, EngineConfig, PluginConfig};
use orchestrator::plugin::host::Limits;
use orchestrator::runs::{RunConfig, Runs};

use orchestrator::{bench, schema, telemetry};
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;

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
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let api_token = api_token(&args)?;
    let metrics = telemetry::install();
    let plugins = PluginConfig {
        limits: Limits {
            deadline: Duration::from_millis(args.plugin_deadline_ms.max(1)),
            memory_bytes: args.plugin_memory_mib.max(1) << 20,
        },
        max_bytes: args.max_plugin_bytes,
    };
    let config = EngineConfig { pipeline: args.tuning.pipeline(), plugins: Some(plugins), ..Default::default() };
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
    let shopify = args.shopify.config();
    let runs = Runs::new(engine.clone(), RunConfig { max_quantity: args.max_run_quantity, ..Default::default() });
    if embedded {
        let failed = runs.fail_interrupted().await?;
        if failed > 0 {
            tracing::warn!(failed, "runs interrupted by the last stop are marked FAILED");
        }
    }
    let state = AppState {
        engine: engine.clone(),
        runs,
        metrics,
        config: ApiConfig { max_body_bytes: args.max_body_bytes, api_token, shopify },
    };
    axum::serve(listener, api::router(state)).with_graceful_shutdown(shutdown_signal()).await?;
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
    let shopify = args
        .shopify
        .config()
        .ok_or_else(|| anyhow::anyhow!("the bridge needs --shopify-secret (SHOPIFY_WEBHOOK_SECRET)"))?;
    let metrics = telemetry::install();
    // No pipeline, no plugins, no WebSocket clients: webhooks in, events on the log out.
    let config = EngineConfig { plugins: None, follow_changes: false, ..Default::default() };
    // Nothing is kept on disk, so no data dir is made.
    let engine = Engine::open(backend, std::path::Path::new("data"), config).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "Shopify bridge ready: POST /webhooks/shopify");
    // No token is needed: the bridge has no mutating endpoint but the signed webhook.
    let runs = Runs::new(engine.clone(), RunConfig::default());
    let state = AppState {
        engine: engine.clone(),
        runs,
        metrics,
        config: ApiConfig { max_body_bytes: 1 << 20, api_token: String::new(), shopify: Some(shopify) },
    };
    axum::serve(listener, api::bridge_router(state)).with_graceful_shutdown(shutdown_signal()).await?;
    engine.flush_log().await?;
    Ok(())
}

/// The configured token; or, on loopback only, a fresh one written to `<data-dir>/api-token`.
fn api_token(args: &ServeArgs) -> anyhow::Result<String> {
    if let Some(t) = args.api_token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(t.clone());
    }
    if !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to expose plugin deployment on {} without a token: set --api-token or ORCHESTRATOR_API_TOKEN",
            args.listen
        );
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    std::fs::create_dir_all(&args.data_dir)?;
    let path = args.data_dir.join("api-token");
    std::fs::write(&path, &token).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tracing::warn!(path = %path.display(), "no API token configured: generated one for this loopback-only engine (set ORCHESTRATOR_API_TOKEN to choose)");
    Ok(token)
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
