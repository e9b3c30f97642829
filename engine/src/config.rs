//! The command line: every flag of `serve` can also come from an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::log::kafka::{KafkaProtocol, KafkaSecurity, SaslLogin};
use crate::secret::Secret;
use crate::store::cql::{CqlLogin, CqlTls};

#[derive(Debug, Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Atomic Order Orchestrator: priority order pipeline with versioned, idempotent storage"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine with its HTTP and WebSocket API.
    Serve(ServeArgs),
    /// Push events through the embedded pipeline and report throughput and latency;
    /// `bench run` times a whole generated run instead.
    #[command(args_conflicts_with_subcommands = true)]
    Bench(BenchArgs),
    /// Write (or check) the JSON Schemas in schemas/json.
    Schema(SchemaArgs),
    /// Shopify webhook tools.
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// Start a generated run on a running engine and follow it with a progress bar.
    Generate(GenerateArgs),
    /// Run the Shopify bridge alone: signed webhooks in, order events to Kafka out
    /// (deduplicated in the CQL store). Needs --kafka-brokers, --cql-nodes and a secret.
    Bridge(BridgeArgs),
    /// Rule plugins on a running engine: status, deploy, promote, rollback, discard.
    #[command(subcommand)]
    Plugin(crate::devkit::PluginCommand),
    /// Shopify tools for a running engine.
    #[command(subcommand)]
    Shopify(ShopifyCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum ShopifyCommand {
    /// Read the orders a shop updated since a time from the Admin API and send on what
    /// the engine missed (the engine holds the access token).
    Reconcile(ReconcileArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// The shop's domain (example.myshopify.com).
    #[arg(long)]
    pub shop: String,
    /// Orders updated since: an RFC 3339 time, or a span back from now (90m, 24h, 7d).
    #[arg(long)]
    pub since: String,
    /// And until (the same forms): a window of a large shop at a time.
    #[arg(long)]
    pub until: Option<String>,
    #[command(flatten)]
    pub target: crate::devkit::Target,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// How many orders to generate.
    #[arg(long)]
    pub quantity: i64,
    /// Tier shares in percent, DIAMOND,GOLD,SILVER,BRONZE (default 5,15,30,50).
    #[arg(long, value_delimiter = ',', num_args = 4)]
    pub tier_mix: Option<Vec<u32>>,
    /// The engine's base URL.
    #[arg(long, env = "ORCHESTRATOR_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The engine's API token (serve writes one to <data-dir>/api-token on loopback).
    #[arg(long, env = "ORCHESTRATOR_API_TOKEN", hide_env_values = true)]
    pub api_token: String,
    /// Return once the run has started instead of following it.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Sign and send a realistic Shopify order payload (or a chaos burst) to a URL.
    Send(WebhookSendArgs),
}

#[derive(Debug, Clone, Args)]
pub struct WebhookSendArgs {
    /// Where to send: the engine's webhook endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080/webhooks/shopify")]
    pub url: String,
    /// The secret to sign with.
    #[arg(long, env = "SHOPIFY_WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: String,
    /// orders/create, orders/updated, orders/paid, orders/cancelled, orders/fulfilled,
    /// orders/partially_fulfilled, orders/edited or orders/delete.
    #[arg(long, default_value = "orders/create")]
    pub topic: String,
    /// The Shopify order id to put in the payload.
    #[arg(long, default_value_t = 820982911946154508)]
    pub order_id: i64,
    /// Send N concurrent orders/updated deliveries for the order, half of them duplicate
    /// deliveries (same webhook id), and report what the engine answered.
    #[arg(long)]
    pub chaos: Option<usize>,
    /// Load mode: send this many orders/create deliveries (distinct orders) at --rate per
    /// second, and report accepted/s and time-to-200 percentiles.
    #[arg(long)]
    pub load: Option<u64>,
    /// Offered deliveries per second in load mode.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Also write the load report as JSON here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// Bounds on the HTTP connections of `serve` and `bridge`.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Seconds a client has to send a request's headers; an idle keep-alive connection
    /// gets the same to start its next request, then closes.
    #[arg(long, env = "ORCHESTRATOR_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a whole request body (408 past it).
    #[arg(long, env = "ORCHESTRATOR_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub body_timeout_secs: u64,
    /// Seconds a write of an answer (or of a WebSocket frame) may wait for the client to
    /// take any of it; a client that stops reading is disconnected past it.
    #[arg(long, env = "ORCHESTRATOR_WRITE_TIMEOUT_SECS", default_value_t = 30)]
    pub write_timeout_secs: u64,
    /// Open connections at most; one more gets 503 and is closed. Lowered to fit the
    /// open-file limit, which the engine raises to its hard limit at start.
    #[arg(long, env = "ORCHESTRATOR_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// WebSocket clients of `/ws` at most; one more gets 503.
    #[arg(long, env = "ORCHESTRATOR_MAX_WS_CLIENTS", default_value_t = 256)]
    pub max_ws_clients: usize,
    /// Largest list answer (a page of orders, history, dead letters, ...) in bytes: a page
    /// that would be larger holds fewer items than its `limit`, and `next_cursor` goes on.
    #[arg(long, env = "ORCHESTRATOR_MAX_PAGE_BYTES", default_value_t = 2 << 20,
          value_parser = clap::value_parser!(u64).range(16_384..=(256 << 20)))]
    pub max_page_bytes: u64,
}

impl ConnectionArgs {
    pub fn limits(&self) -> crate::api::listener::ConnectionLimits {
        crate::api::listener::ConnectionLimits {
            header_timeout: std::time::Duration::from_secs(self.header_timeout_secs.max(1)),
            body_timeout: std::time::Duration::from_secs(self.body_timeout_secs.max(1)),
            write_timeout: std::time::Duration::from_secs(self.write_timeout_secs.max(1)),
            max_connections: crate::api::listener::fit_connection_cap(self.max_connections.max(1), self.max_ws_clients),
        }
    }
}

/// The API's tokens. Prefer the environment or a file to `--api-token`: a flag's value
/// shows in the process list.
#[derive(Debug, Clone, Args)]
pub struct AccessArgs {
    /// The admin token (named "admin"). Without any, `serve` makes one up on a loopback
    /// bind (written to <data-dir>/api-token) and refuses to start otherwise.
    #[arg(long, env = "ORCHESTRATOR_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// A file holding the admin token (its first line), instead of --api-token.
    #[arg(long, env = "ORCHESTRATOR_API_TOKEN_FILE", conflicts_with = "api_token")]
    pub api_token_file: Option<PathBuf>,
    /// More tokens, one per line: `<name> <role> <token>`, role producer, operator or
    /// admin. The file must be private to the engine's user (chmod 600).
    #[arg(long, env = "ORCHESTRATOR_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Host names a loopback-bound engine answers to besides loopback ones (comma-separated),
    /// as when a proxy forwards `orders.example.com` to it. Other hosts get 403.
    #[arg(long, env = "ORCHESTRATOR_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the HTTP server binds.
    #[arg(long, env = "ORCHESTRATOR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the embedded log and store keep their files.
    #[arg(long, env = "ORCHESTRATOR_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub tuning: Tuning,
    #[command(flatten)]
    pub backends: Backends,
    /// Largest accepted request body in bytes; larger ones get 413.
    #[arg(long, env = "ORCHESTRATOR_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub access: AccessArgs,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// Per-call deadline of a rule plugin, in milliseconds.
    #[arg(long, env = "ORCHESTRATOR_PLUGIN_DEADLINE_MS", default_value_t = 10)]
    pub plugin_deadline_ms: u64,
    /// Memory cap of one plugin instance, in MiB.
    #[arg(long, env = "ORCHESTRATOR_PLUGIN_MEMORY_MIB", default_value_t = 16)]
    pub plugin_memory_mib: usize,
    /// Largest accepted plugin upload, in bytes: room for a Python component (about
    /// 18 MB from componentize-py) or a JavaScript one (about 12 MB).
    #[arg(long, env = "ORCHESTRATOR_MAX_PLUGIN_BYTES", default_value_t = 32 << 20)]
    pub max_plugin_bytes: usize,
    /// How long decided events (each with the row it met) are kept for what-if runs
    /// (`plugin replay`); 0 keeps none.
    #[arg(long, env = "ORCHESTRATOR_CASE_RETENTION_HOURS", default_value_t = 24,
          value_parser = clap::value_parser!(u64).range(0..=720))]
    pub case_retention_hours: u64,
    /// Most decided events the embedded store keeps for what-if runs (the oldest go
    /// first); on CQL the retention alone bounds them.
    #[arg(long, env = "ORCHESTRATOR_MAX_CASES", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_cases: u64,
    #[command(flatten)]
    pub shopify: ShopifyArgs,
    /// Largest quantity a generated run may ask for.
    #[arg(long, env = "ORCHESTRATOR_MAX_RUN_QUANTITY", default_value_t = 1_500_000)]
    pub max_run_quantity: u64,
    /// A run that its instance has not recorded for this long is reported FAILED by any
    /// instance (its instance stopped). The running instance records it every ninth of
    /// this, and fails the run itself when it cannot for two thirds of it.
    #[arg(long, env = "ORCHESTRATOR_RUN_LEASE_SECS", default_value_t = 90,
          value_parser = clap::value_parser!(u64).range(9..=3600))]
    pub run_lease_secs: u64,
    /// Log output format.
    #[arg(long, env = "ORCHESTRATOR_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

impl ServeArgs {
    /// What the engine keeps for what-if runs, from the flags.
    pub fn case_retention(&self) -> Option<crate::store::CaseRetention> {
        (self.case_retention_hours > 0).then(|| crate::store::CaseRetention {
            keep_for: std::time::Duration::from_secs(self.case_retention_hours * 3_600),
            max_cases: self.max_cases,
        })
    }
}

/// The Shopify bridge's settings, shared by `serve` and `bridge`.
#[derive(Debug, Clone, Args)]
pub struct ShopifyArgs {
    /// Shopify webhook secret: enables POST /webhooks/shopify.
    #[arg(long, env = "SHOPIFY_WEBHOOK_SECRET", hide_env_values = true)]
    pub shopify_secret: Option<String>,
    /// The previous secret, still accepted during a rotation.
    #[arg(long, env = "SHOPIFY_WEBHOOK_SECRET_PREVIOUS", hide_env_values = true)]
    pub shopify_secret_previous: Option<String>,
    /// How long webhook and event ids are remembered for deduplication, in hours.
    #[arg(long, env = "ORCHESTRATOR_SHOPIFY_DEDUP_HOURS", default_value_t = 48)]
    pub shopify_dedup_hours: u64,
    /// Largest accepted webhook body in bytes; larger ones get 413.
    #[arg(long, env = "ORCHESTRATOR_SHOPIFY_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub shopify_max_body_bytes: usize,
    /// Deliveries per second per shop before 429 (with Retry-After). Off by default.
    #[arg(long, env = "ORCHESTRATOR_SHOPIFY_RATE_LIMIT")]
    pub shopify_rate_limit: Option<u32>,
    /// Secrets per shop, for one custom app per shop: a file (mode 600) of lines
    /// `<shop-domain> <secret> [<previous secret>]`. A shop not in it uses --shopify-secret.
    #[arg(long, env = "ORCHESTRATOR_SHOPIFY_SECRETS_FILE")]
    pub shopify_secrets_file: Option<std::path::PathBuf>,
    /// A file holding the Admin API access token (first line, mode 0600), for
    /// reconciliation; or the environment's SHOPIFY_ADMIN_TOKEN. Never a flag's value.
    #[arg(long, env = "ORCHESTRATOR_SHOPIFY_ADMIN_TOKEN_FILE")]
    pub shopify_admin_token_file: Option<std::path::PathBuf>,
    /// The Admin API's base URL; `{shop}` is replaced by the shop's domain.
    #[arg(long, env = "ORCHESTRATOR_SHOPIFY_ADMIN_URL", default_value = DEFAULT_ADMIN_URL)]
    pub shopify_admin_url: String,
    /// Reconcile this shop periodically (with --shopify-reconcile-every-mins).
    #[arg(long, env = "ORCHESTRATOR_SHOPIFY_SHOP")]
    pub shopify_shop: Option<String>,
    /// Minutes between periodic reconciliations of --shopify-shop; 0 (the default) is off.
    #[arg(long, env = "ORCHESTRATOR_SHOPIFY_RECONCILE_EVERY_MINS", default_value_t = 0)]
    pub shopify_reconcile_every_mins: u64,
    /// How many shops get their own `shop` label on the per-shop webhook metric; later
    /// shops count as "other", so many shops cannot flood Prometheus with series.
    #[arg(long, env = "ORCHESTRATOR_SHOP_METRIC_LIMIT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub shop_metric_limit: u32,
}

const DEFAULT_ADMIN_URL: &str = "https://{shop}/admin/api/2025-10";

impl ShopifyArgs {
    /// The Admin API settings, if an access token is given; an error for a token file
    /// others can read, or a periodic mode without its shop.
    pub fn admin(&self) -> anyhow::Result<Option<crate::shopify::AdminSettings>> {
        let token = match &self.shopify_admin_token_file {
            Some(path) => {
                crate::api::auth::check_private(path)?;
                let token = Secret::from_file(path).with_context(|| format!("reading {}", path.display()))?;
                anyhow::ensure!(!token.expose().trim().is_empty(), "{} holds no token", path.display());
                Some(token)
            }
            None => std::env::var("SHOPIFY_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()).map(Secret::new),
        };
        anyhow::ensure!(
            self.shopify_reconcile_every_mins <= 7 * 24 * 60,
            "--shopify-reconcile-every-mins is at most a week (10080)"
        );
        let periodic = match (self.shopify_reconcile_every_mins, &self.shopify_shop) {
            (0, _) => None,
            (mins, Some(shop)) => {
                Some((crate::shopify::reconcile::checked_shop(shop)?, std::time::Duration::from_secs(mins * 60)))
            }
            (_, None) => anyhow::bail!("--shopify-reconcile-every-mins needs --shopify-shop"),
        };
        anyhow::ensure!(
            token.is_some() || periodic.is_none(),
            "periodic reconciliation needs an Admin API token (--shopify-admin-token-file or SHOPIFY_ADMIN_TOKEN)"
        );
        anyhow::ensure!(
            self.shopify_admin_url.contains("{shop}"),
            "--shopify-admin-url needs {{shop}} where the shop's domain goes"
        );
        crate::shopify::admin::check_base(&self.shopify_admin_url.replace("{shop}", "example.myshopify.com"))?;
        Ok(token.map(|token| crate::shopify::AdminSettings { url: self.shopify_admin_url.clone(), token, periodic }))
    }

    /// The bridge's settings, if a secret (or a secrets file) is given; an error for a
    /// secrets file that others can read or that is malformed.
    pub fn config(&self) -> anyhow::Result<Option<crate::shopify::ShopifyConfig>> {
        let secrets =
            self.shopify_secret.clone().filter(|s| !s.is_empty()).map(|current| crate::shopify::signature::Secrets {
                current,
                previous: self.shopify_secret_previous.clone().filter(|s| !s.is_empty()),
            });
        let shop_secrets = match &self.shopify_secrets_file {
            Some(path) => crate::shopify::signature::read_secrets_file(path)?,
            None => Default::default(),
        };
        if secrets.is_none() && shop_secrets.is_empty() {
            return Ok(None);
        }
        Ok(Some(crate::shopify::ShopifyConfig {
            secrets,
            shop_secrets: std::sync::Arc::new(shop_secrets),
            dedup_ttl: std::time::Duration::from_secs(self.shopify_dedup_hours * 3600),
            max_body_bytes: self.shopify_max_body_bytes,
            rate_limit: self.shopify_rate_limit.map(|n| std::sync::Arc::new(crate::shopify::RateLimit::new(n))),
            shop_labels: std::sync::Arc::new(crate::shopify::ShopLabels::new(self.shop_metric_limit as usize)),
            admin: None,
            compliance: Default::default(),
        }))
    }
}

/// `orchestrator bridge`: only the webhook endpoint, producing to Kafka.
#[derive(Debug, Clone, Args)]
pub struct BridgeArgs {
    #[arg(long, env = "ORCHESTRATOR_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub backends: Backends,
    #[command(flatten)]
    pub shopify: ShopifyArgs,
    #[command(flatten)]
    pub access: AccessArgs,
    #[command(flatten)]
    pub connections: ConnectionArgs,
}

/// Kafka and a CQL store (ScyllaDB) instead of the embedded default. Both or neither.
#[derive(Debug, Clone, Args)]
pub struct Backends {
    /// Kafka bootstrap servers, comma-separated (with --cql-nodes).
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// CQL contact points (ScyllaDB), comma-separated host:port (with --kafka-brokers).
    #[arg(long, env = "CQL_NODES")]
    pub cql_nodes: Option<String>,
    /// Topics are `<prefix>.vip`, `<prefix>.normal`, `<prefix>.changes`, `<prefix>.dlq` and `<prefix>.plugins`.
    #[arg(long, env = "ORCHESTRATOR_KAFKA_TOPIC_PREFIX", default_value = "orders")]
    pub kafka_topic_prefix: String,
    /// Partitions per priority topic, when the engine creates the topics.
    #[arg(long, env = "ORCHESTRATOR_KAFKA_PARTITIONS", default_value_t = 6)]
    pub kafka_partitions: i32,
    #[arg(long, env = "ORCHESTRATOR_KAFKA_REPLICATION", default_value_t = 1)]
    pub kafka_replication: i32,
    /// The consumer group the engine instances share.
    #[arg(long, env = "ORCHESTRATOR_KAFKA_GROUP", default_value = "orchestrator")]
    pub kafka_group: String,
    #[arg(long, env = "ORCHESTRATOR_CQL_KEYSPACE", default_value = "orchestrator")]
    pub cql_keyspace: String,
    #[arg(long, env = "ORCHESTRATOR_CQL_REPLICATION", default_value_t = 1)]
    pub cql_replication: u32,
    #[command(flatten)]
    pub secure: SecureBackends,
}

/// Encryption and credentials for Kafka and the CQL nodes. Passwords come from a file or
/// the environment, never from a flag (a flag's value shows in the process list).
#[derive(Debug, Clone, Args)]
pub struct SecureBackends {
    /// plaintext, ssl, sasl_plaintext or sasl_ssl (any case).
    #[arg(long, env = "ORCHESTRATOR_KAFKA_SECURITY_PROTOCOL", default_value = "plaintext", ignore_case = true,
          value_parser = clap::builder::PossibleValuesParser::new(KafkaProtocol::NAMES))]
    pub kafka_security_protocol: String,
    /// PEM certificates of the CAs that sign the brokers' (the system's by default).
    #[arg(long, env = "ORCHESTRATOR_KAFKA_CA_FILE")]
    pub kafka_ca_file: Option<PathBuf>,
    #[arg(long, env = "ORCHESTRATOR_KAFKA_SASL_MECHANISM", default_value = "SCRAM-SHA-512",
          value_parser = ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])]
    pub kafka_sasl_mechanism: String,
    #[arg(long, env = "ORCHESTRATOR_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// A file whose first line is the SASL password (or ORCHESTRATOR_KAFKA_SASL_PASSWORD).
    #[arg(long, env = "ORCHESTRATOR_KAFKA_SASL_PASSWORD_FILE")]
    pub kafka_sasl_password_file: Option<PathBuf>,
    /// The CQL role, for a cluster with password authentication.
    #[arg(long, env = "ORCHESTRATOR_CQL_USERNAME")]
    pub cql_username: Option<String>,
    /// A file whose first line is the CQL password (or ORCHESTRATOR_CQL_PASSWORD).
    #[arg(long, env = "ORCHESTRATOR_CQL_PASSWORD_FILE")]
    pub cql_password_file: Option<PathBuf>,
    /// TLS to the CQL nodes (each must show a certificate for its IP address).
    #[arg(long, env = "ORCHESTRATOR_CQL_TLS")]
    pub cql_tls: bool,
    /// PEM certificates of the CAs that sign the CQL nodes' (implies --cql-tls).
    #[arg(long, env = "ORCHESTRATOR_CQL_CA_FILE")]
    pub cql_ca_file: Option<PathBuf>,
}

impl SecureBackends {
    pub fn kafka(&self) -> anyhow::Result<KafkaSecurity> {
        let protocol = KafkaProtocol::parse(&self.kafka_security_protocol)
            .with_context(|| format!("unknown Kafka security protocol {:?}", self.kafka_security_protocol))?;
        let sasl = match (&self.kafka_sasl_username, protocol.is_sasl()) {
            (Some(username), true) => Some(SaslLogin {
                mechanism: self.kafka_sasl_mechanism.clone(),
                username: username.clone(),
                password: password(self.kafka_sasl_password_file.as_deref(), "ORCHESTRATOR_KAFKA_SASL_PASSWORD")?
                    .context("SASL needs a password: --kafka-sasl-password-file or ORCHESTRATOR_KAFKA_SASL_PASSWORD")?,
            }),
            (None, true) => {
                anyhow::bail!("--kafka-security-protocol {} needs --kafka-sasl-username", protocol.as_str())
            }
            (Some(_), false) => {
                anyhow::bail!("a SASL username needs --kafka-security-protocol sasl_ssl (or sasl_plaintext)")
            }
            (None, false) => None,
        };
        if self.kafka_ca_file.is_some() && !matches!(protocol, KafkaProtocol::Ssl | KafkaProtocol::SaslSsl) {
            anyhow::bail!("--kafka-ca-file is for TLS: give --kafka-security-protocol ssl or sasl_ssl");
        }
        Ok(KafkaSecurity { protocol, ca_file: self.kafka_ca_file.clone(), sasl })
    }

    pub fn cql(&self) -> anyhow::Result<(Option<CqlLogin>, Option<CqlTls>)> {
        let login = match &self.cql_username {
            Some(username) => Some(CqlLogin {
                username: username.clone(),
                password: password(self.cql_password_file.as_deref(), "ORCHESTRATOR_CQL_PASSWORD")?
                    .context("--cql-username needs a password: --cql-password-file or ORCHESTRATOR_CQL_PASSWORD")?,
            }),
            None if self.cql_password_file.is_some() => anyhow::bail!("--cql-password-file needs --cql-username"),
            None => None,
        };
        let tls = (self.cql_tls || self.cql_ca_file.is_some()).then(|| CqlTls { ca_file: self.cql_ca_file.clone() });
        Ok((login, tls))
    }
}

/// A password from its file, else from the environment variable `var`.
fn password(file: Option<&std::path::Path>, var: &str) -> anyhow::Result<Option<Secret>> {
    if let Some(file) = file {
        // As the tokens file: a secret others can read is refused.
        crate::api::auth::check_private(file)?;
        let secret =
            Secret::from_file(file).with_context(|| format!("cannot read the password file {}", file.display()))?;
        return Ok(Some(secret));
    }
    Ok(std::env::var(var).ok().filter(|p| !p.is_empty()).map(Secret::new))
}

impl Backends {
    /// The embedded default, or Kafka + CQL; an error when only one of the two is given.
    pub fn backend(&self) -> anyhow::Result<crate::engine::Backend> {
        let (brokers, nodes) = match (&self.kafka_brokers, &self.cql_nodes) {
            (None, None) => return Ok(crate::engine::Backend::Embedded),
            (Some(b), Some(n)) if !b.is_empty() && !n.is_empty() => (b, n),
            _ => anyhow::bail!(
                "Kafka and the CQL store go together: give both --kafka-brokers (KAFKA_BROKERS) and \
                 --cql-nodes (CQL_NODES), or neither for the embedded default"
            ),
        };
        let kafka = crate::log::kafka::KafkaConfig {
            brokers: brokers.clone(),
            vip_topic: String::new(),
            normal_topic: String::new(),
            changes_topic: String::new(),
            dlq_topic: String::new(),
            plugins_topic: String::new(),
            control_topic: String::new(),
            pulse_topic: String::new(),
            partitions: self.kafka_partitions,
            replication: self.kafka_replication,
            group: self.kafka_group.clone(),
            security: self.secure.kafka()?,
        };
        let (login, tls) = self.secure.cql()?;
        Ok(crate::engine::Backend::Distributed {
            kafka: kafka.with_topic_prefix(&self.kafka_topic_prefix),
            cql: crate::store::cql::CqlConfig {
                nodes: nodes.split(',').map(|s| s.trim().to_string()).collect(),
                keyspace: self.cql_keyspace.clone(),
                replication_factor: self.cql_replication,
                login,
                tls,
            },
        })
    }
}

/// Pipeline knobs shared by `serve` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct Tuning {
    /// Most events the pipeline takes from the log at once.
    #[arg(long, env = "ORCHESTRATOR_BATCH_SIZE", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub batch_size: u64,
    /// After this many consecutive VIP batches while NORMAL waits, run one NORMAL
    /// batch. Off by default: strict priority.
    #[arg(long, env = "ORCHESTRATOR_STARVATION_GUARD")]
    pub starvation_guard: Option<u32>,
    /// How many times a write that lost a compare-and-set is re-resolved before it is dead-lettered.
    #[arg(long, env = "ORCHESTRATOR_MAX_CONFLICT_RETRIES", default_value_t = 16)]
    pub max_conflict_retries: u32,
    /// How long an event whose order does not exist yet waits for the order's created
    /// event before the rules decide it as it is (and most likely dead-letter it).
    #[arg(long, env = "ORCHESTRATOR_PARK_TIMEOUT_SECS", default_value_t = 300)]
    pub park_timeout_secs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// How many events to push.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Events per append call.
    #[arg(long, default_value_t = 1_000)]
    pub append_batch: usize,
    /// Offered load in events/s; 0 appends as fast as the log takes them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Data directory (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: Tuning,
    /// With both, the bench runs on Kafka and the CQL store (fresh topics and keyspaces).
    #[command(flatten)]
    pub backends: Backends,
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// A whole generated run (phases, verification) on a fresh engine, with its metrics,
    /// peak RSS, and the store's raw write ceiling measured in the same process.
    Run(Box<BenchRunArgs>),
    /// Fill a stopped engine's embedded store with generated orders, written as the
    /// pipeline writes a create (row, ledger, history) but without the log or the rules:
    /// the dashboard and load tests at a million rows, in seconds.
    Seed(BenchSeedArgs),
    /// The fsync ceiling: one-row SQLite transactions committed one after another, as
    /// the engine's files are (WAL, synchronous = FULL), in a scratch file in a dir on
    /// the file system under test. A write that waits for its own fsync does no better.
    Fsync(BenchFsyncArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchFsyncArgs {
    /// A dir on the file system to measure (the engine's data dir, say); the scratch file
    /// is removed afterwards.
    #[arg(long)]
    pub dir: PathBuf,
    /// Commits to time.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    pub commits: u64,
}

#[derive(Debug, Clone, Args)]
pub struct BenchSeedArgs {
    /// The stopped engine's data dir (embedded default).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Orders to add (at most 10 million per call).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub quantity: u64,
    /// Their ids are `<prefix>-<n>`, n from 0; an id the store holds already is left alone.
    #[arg(long, default_value = "seed")]
    pub prefix: String,
}

#[derive(Debug, Clone, Args)]
pub struct BenchRunArgs {
    /// Orders in the run.
    #[arg(long, default_value_t = 1_500_000)]
    pub quantity: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: Tuning,
    /// With both, the run goes through Kafka and the CQL store (fresh topics and keyspaces).
    #[command(flatten)]
    pub backends: Backends,
}

#[derive(Debug, Clone, Args)]
pub struct SchemaArgs {
    /// Directory to write into.
    #[arg(long, default_value = "schemas/json")]
    pub out_dir: PathBuf,
    /// Only check that the files are current; exit 1 if not.
    #[arg(long)]
    pub check: bool,
}

impl Tuning {
    pub fn pipeline(&self) -> crate::pipeline::PipelineConfig {
        crate::pipeline::PipelineConfig {
            batch_max: self.batch_size.max(1) as usize,
            starvation_guard: self.starvation_guard,
            max_conflict_retries: self.max_conflict_retries,
            park_timeout: std::time::Duration::from_secs(self.park_timeout_secs),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(args: &[&str]) -> anyhow::Result<crate::engine::Backend> {
        let base = ["orchestrator", "serve", "--kafka-brokers", "k:9093", "--cql-nodes", "c:9042"];
        let cli = Cli::try_parse_from(base.iter().chain(args))?;
        let Command::Serve(serve) = cli.command else { unreachable!("serve parses as serve") };
        serve.backends.backend()
    }

    #[test]
    fn settings_that_would_quietly_not_apply_are_refused() {
        let ca = backends(&["--kafka-ca-file", "/ca.pem"]).unwrap_err().to_string();
        assert!(ca.contains("ssl or sasl_ssl"), "a CA file on plaintext: {ca}");
        let sasl = backends(&["--kafka-security-protocol", "SASL_SSL"]).unwrap_err().to_string();
        assert!(sasl.contains("--kafka-sasl-username"), "any case, and SASL needs a user: {sasl}");
        let user = backends(&["--kafka-sasl-username", "u"]).unwrap_err().to_string();
        assert!(user.contains("sasl_ssl"), "a SASL user on plaintext: {user}");
        // Built whole, as the CQL login may be in this process's environment.
        let cql = |password_file: Option<&str>, ca_file: Option<&str>| SecureBackends {
            kafka_security_protocol: "plaintext".into(),
            kafka_ca_file: None,
            kafka_sasl_mechanism: "SCRAM-SHA-512".into(),
            kafka_sasl_username: None,
            kafka_sasl_password_file: None,
            cql_username: None,
            cql_password_file: password_file.map(PathBuf::from),
            cql_tls: false,
            cql_ca_file: ca_file.map(PathBuf::from),
        };
        let lone = cql(Some("/p"), None).cql().unwrap_err().to_string();
        assert!(lone.contains("--cql-username"), "a CQL password without a user: {lone}");
        let (_, tls) = cql(None, Some("/ca.pem")).cql().unwrap();
        assert!(tls.is_some(), "a CQL CA file turns TLS on");
    }

    /// A batch of 0 took nothing and spun; one of millions held them all in memory.
    #[test]
    fn the_batch_size_is_bounded() {
        let parse = |n: &str| Cli::try_parse_from(["orchestrator", "serve", "--batch-size", n]);
        for n in ["0", "65537", "100000000"] {
            let e = parse(n).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("--batch-size") && e.contains("1..=65536"), "{n}: {e}");
        }
        let Command::Serve(serve) = parse("65536").unwrap().command else { unreachable!("serve parses as serve") };
        assert_eq!(serve.tuning.pipeline().batch_max, 65_536);
    }
}
