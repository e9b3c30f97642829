//! The Kafka log: one topic per priority, records keyed by order id, idempotent
//! producers, a consumer group whose members pause NORMAL partitions while VIP work
//! waits, and commits only after the store write.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::kafka_appender::Appender;
use super::{Delivery, LogConsumer, LogError, LogStart, OrderLog, Record};
use crate::domain::{PerPriority, Priority};

/// Where and how to reach Kafka.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub vip_topic: String,
    pub normal_topic: String,
    /// Applied changes, which every instance follows to feed its WebSocket clients.
    pub changes_topic: String,
    /// Dead letters (JSON, keyed by order id), for tools outside the engine.
    pub dlq_topic: String,
    /// Plugin deployments (compacted, keyed by slot): how a deploy reaches every instance.
    pub plugins_topic: String,
    /// Operator switches such as queue pauses (compacted, keyed by switch).
    pub control_topic: String,
    /// Each instance's beacon once a second (kept 10 minutes): the cluster's figures.
    pub pulse_topic: String,
    pub partitions: i32,
    pub replication: i32,
    /// The consumer group the engine instances share.
    pub group: String,
    /// Encryption and authentication of every connection to the brokers.
    pub security: KafkaSecurity,
}

/// How the engine's Kafka clients reach the brokers: the protocol, the CA that verifies
/// them, and SASL credentials.
#[derive(Debug, Clone, Default)]
pub struct KafkaSecurity {
    pub protocol: KafkaProtocol,
    /// PEM certificates of the CAs that sign the brokers' (TLS); the system's by default.
    pub ca_file: Option<std::path::PathBuf>,
    /// Needed by the SASL protocols.
    pub sasl: Option<SaslLogin>,
}

/// Kafka's `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KafkaProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaProtocol {
    pub const NAMES: [&'static str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];

    pub fn parse(name: &str) -> Option<Self> {
        let all = [Self::Plaintext, Self::Ssl, Self::SaslPlaintext, Self::SaslSsl];
        all.into_iter().find(|p| p.as_str().eq_ignore_ascii_case(name))
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn is_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// A SASL login: SCRAM-SHA-512 unless told otherwise.
#[derive(Debug, Clone)]
pub struct SaslLogin {
    pub mechanism: String,
    pub username: String,
    pub password: crate::secret::Secret,
}

impl KafkaConfig {
    /// The transactional id of `instance`'s appends.
    pub fn transactional_id(&self, instance: &str) -> String {
        format!("{}.append.{instance}", self.group)
    }

    /// Names the seven topics `<prefix>.vip`, `.normal`, `.changes`, `.dlq`, `.plugins`,
    /// `.control` and `.pulse`.
    pub fn with_topic_prefix(self, prefix: &str) -> Self {
        Self {
            vip_topic: format!("{prefix}.vip"),
            normal_topic: format!("{prefix}.normal"),
            changes_topic: format!("{prefix}.changes"),
            dlq_topic: format!("{prefix}.dlq"),
            plugins_topic: format!("{prefix}.plugins"),
            control_topic: format!("{prefix}.control"),
            pulse_topic: format!("{prefix}.pulse"),
            ..self
        }
    }
}

impl KafkaConfig {
    /// Every Kafka client of the engine starts from this: the brokers and how to reach
    /// them securely.
    pub(crate) fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers).set("security.protocol", self.security.protocol.as_str());
        if let Some(ca) = &self.security.ca_file {
            c.set("ssl.ca.location", ca.display().to_string());
        }
        if let Some(login) = &self.security.sasl {
            c.set("sasl.mechanisms", &login.mechanism)
                .set("sasl.username", &login.username)
                .set("sasl.password", login.password.expose());
        }
        c
    }

    pub fn topic(&self, p: Priority) -> &str {
        match p {
            Priority::Vip => &self.vip_topic,
            Priority::Normal => &self.normal_topic,
        }
    }

    fn priority_of(&self, topic: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| self.topic(*p) == topic)
    }
}

/// Keeps the brokers' last refusal (of the login, or of TLS) and when the first came, so
/// that opening the log fails soon naming it instead of timing out. librdkafka also files
/// a connection reset during a handshake under these codes, so a refusal stops the start
/// only while the brokers still cannot be reached a while after it.
#[derive(Clone, Default)]
struct Refusals(Arc<Mutex<Option<(Instant, String)>>>);

/// How long the brokers may stay unreachable after a refusal before the start stops: a
/// passing reset is retried and answered well within it.
const REFUSAL_GRACE: Duration = Duration::from_secs(3);

impl ClientContext for Refusals {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!("librdkafka: {error}: {reason}");
        use RDKafkaErrorCode::{Authentication, SSL, SaslAuthenticationFailed};
        if matches!(error.rdkafka_error_code(), Some(Authentication | SaslAuthenticationFailed | SSL)) {
            let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let first = seen.as_ref().map_or_else(Instant::now, |(at, _)| *at);
            *seen = Some((first, reason.to_string()));
        }
    }
}

impl rdkafka::producer::ProducerContext for Refusals {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl Refusals {
    /// Asks the brokers for their metadata through a client whose errors are served (an
    /// admin client's are not), so that a refused login or certificate stops the engine
    /// at start, named, instead of ending as a timeout.
    async fn check(config: &KafkaConfig) -> Result<(), LogError> {
        let refusals = Refusals::default();
        let probe: rdkafka::producer::ThreadedProducer<Refusals> =
            config.client().create_with_context(refusals.clone()).map_err(backend)?;
        let brokers = config.brokers.clone();
        // Short tries, so that a refusal ends the wait within one of them.
        let checked = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let tried =
                    rdkafka::producer::Producer::client(&probe).fetch_metadata(None, Duration::from_millis(500));
                let Err(e) = tried else { return Ok(()) };
                if let Some(refused) = refusals.reason(&brokers) {
                    return Err(refused);
                }
                if Instant::now() >= deadline {
                    return Err(LogError::Unavailable(
                        format!("Kafka at {brokers} did not answer in 30 s: {e}").into(),
                    ));
                }
            }
        });
        checked.await.map_err(|e| LogError::Backend(Box::new(e)))?
    }

    /// A refusal that has stood for the grace period, while the brokers still cannot be
    /// reached.
    fn reason(&self, brokers: &str) -> Option<LogError> {
        let (first, reason) = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        let refused = format!("Kafka at {brokers} refused the connection: {reason}");
        (first.elapsed() >= REFUSAL_GRACE).then(|| LogError::Backend(refused.into()))
    }
}

/// Whether every broker is on this machine (a local setup, where one replica is expected).
fn only_loopback(brokers: &str) -> bool {
    brokers.split(',').all(|b| {
        let host = b.trim().rsplit_once(':').map_or(b.trim(), |(h, _)| h).trim_matches(['[', ']']);
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    })
}

/// Kafka's error as a [`LogError`]: an outage when the cluster was away, slow or moving
/// leaders (a retry may pass), else a refusal.
pub(crate) fn backend(e: KafkaError) -> LogError {
    if is_outage(&e) { LogError::Unavailable(e.into()) } else { LogError::Backend(e.into()) }
}

/// Kafka's error with what was being done, classified as [`backend`] does.
pub(crate) fn backend_while(doing: impl Into<String>, e: KafkaError) -> LogError {
    let outage = is_outage(&e);
    let e = Box::new(KafkaFailed { doing: doing.into(), source: e });
    if outage { LogError::Unavailable(e) } else { LogError::Backend(e) }
}

#[derive(Debug, thiserror::Error)]
#[error("{doing}: {source}")]
pub(crate) struct KafkaFailed {
    doing: String,
    #[source]
    source: KafkaError,
}

fn is_outage(e: &KafkaError) -> bool {
    match e {
        // A transaction whose records timed out (brokers away) must be aborted and is
        // not "retriable" as such, but a new one may pass: the code tells.
        KafkaError::Transaction(t) => t.is_retriable() || code_is_outage(t.code()),
        other => other.rdkafka_error_code().is_some_and(code_is_outage),
    }
}

/// The codes of a cluster that is away or busy, not of a request it will never take.
pub(crate) fn code_is_outage(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        BrokerTransportFailure
            | Resolve
            | MessageTimedOut
            | AllBrokersDown
            | OperationTimedOut
            | QueueFull
            | TimedOutQueue
            | LeaderNotAvailable
            | NotLeaderForPartition
            | RequestTimedOut
            | NetworkException
            | CoordinatorLoadInProgress
            | CoordinatorNotAvailable
            | NotCoordinator
            | NotEnoughReplicas
            | NotEnoughReplicasAfterAppend
            | RebalanceInProgress
            | KafkaStorageError
    )
}

/// A refused or failed admin step on one topic, classified by its code.
fn admin_error(what: String, code: RDKafkaErrorCode) -> LogError {
    let e = format!("{what}: {code}").into();
    if code_is_outage(code) { LogError::Unavailable(e) } else { LogError::Backend(e) }
}

/// The producer settings the order log and the cluster channels share.
pub(crate) fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = config.client();
    // Exactly one copy of each record per partition, in order, even across retries.
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.max.bytes", PLUGIN_RECORD_MAX)
        .set("message.timeout.ms", "10000");
    c
}

/// Lag per priority (records not yet committed by the group), kept fresh by a monitor thread.
#[derive(Default)]
struct Lag {
    depth: PerPriority<AtomicU64>,
    healthy: AtomicBool,
    /// The group's lag per partition, as last measured.
    partitions: Mutex<PerPriority<Vec<(i32, u64)>>>,
    /// The partitions this instance's consumer holds, as of its last rebalance.
    assigned: Mutex<PerPriority<Vec<i32>>>,
}

/// Where a reset left each partition's log start: consumers move past it.
#[derive(Default)]
struct Cleared {
    epoch: AtomicU64,
    starts: Mutex<HashMap<(Priority, i32), i64>>,
}

pub struct KafkaLog {
    config: KafkaConfig,
    /// This instance's name: its consumer's `client.id`, so the group's members say
    /// which instances they are (a reset waits for each of them).
    instance: String,
    cleared: Arc<Cleared>,
    /// Order events: transactional.
    appender: Appender,
    lag: Arc<Lag>,
    /// Where each order's records go (shared by the instances); without one, a record
    /// goes by its own priority.
    routes: std::sync::OnceLock<Arc<dyn super::RouteBook>>,
}

impl KafkaLog {
    /// From now on, records follow their order's route in `book` (see `OrderLog::append`).
    pub fn set_route_book(&self, book: Arc<dyn super::RouteBook>) {
        let _ = self.routes.set(book);
    }

    /// [`KafkaLog::open_as`] a new instance, known to no one (tests and tools).
    pub async fn open(config: KafkaConfig) -> Result<Arc<Self>, LogError> {
        Self::open_as(config, &uuid::Uuid::now_v7().to_string()).await
    }

    /// Connects, creates the topics if missing, and starts the lag monitor, as
    /// `instance`: a name that stays the same across the instance's restarts. Appends go
    /// in transactions under an id made from it, so the restarted instance fences its
    /// earlier self at start, and the broker aborts a transaction a crash left open at
    /// once, instead of holding its partitions' readers back until it times out.
    pub async fn open_as(config: KafkaConfig, instance: &str) -> Result<Arc<Self>, LogError> {
        if config.replication < 3 && !only_loopback(&config.brokers) {
            tracing::warn!(
                replication = config.replication,
                brokers = %config.brokers,
                "the topics get fewer than 3 replicas: one broker lost can lose acknowledged events \
                 (production: --kafka-replication 3, which also sets min.insync.replicas=2)"
            );
        }
        // With 3 replicas or more, an append waits for 2 of them (acks=all).
        let min_insync = if config.replication >= 3 { "2" } else { "1" };
        Refusals::check(&config).await?;
        let admin: AdminClient<DefaultClientContext> = config.client().create().map_err(backend)?;
        let topics: Vec<NewTopic<'_>> =
            [config.topic(Priority::Vip), config.topic(Priority::Normal), &config.changes_topic, &config.dlq_topic]
                .into_iter()
                .map(|t| {
                    NewTopic::new(t, config.partitions, TopicReplication::Fixed(config.replication))
                        .set("min.insync.replicas", min_insync)
                })
                .chain([
                    NewTopic::new(&config.plugins_topic, 1, TopicReplication::Fixed(config.replication))
                        .set("cleanup.policy", "compact")
                        .set("max.message.bytes", PLUGIN_RECORD_MAX),
                    NewTopic::new(&config.control_topic, 1, TopicReplication::Fixed(config.replication))
                        .set("cleanup.policy", "compact"),
                    // Beacons are of the moment: ten minutes is all a late reader wants.
                    NewTopic::new(&config.pulse_topic, 1, TopicReplication::Fixed(config.replication))
                        .set("retention.ms", "600000"),
                ])
                .collect();
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(15)));
        let created = tokio::time::timeout(Duration::from_secs(30), admin.create_topics(&topics, &opts))
            .await
            .map_err(|_| LogError::Unavailable(format!("Kafka at {} did not answer in 30 s", config.brokers).into()))?;
        for result in created.map_err(backend)? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(admin_error(format!("creating topic {topic}"), code)),
            }
        }
        // Order events go in transactions, so a request is on the log whole or not at
        // all. The id is this instance's own: nothing else writes under it.
        let mut appends = producer_config(&config);
        appends
            .set("transactional.id", config.transactional_id(instance))
            // An instance that crashed and does not come back holds its partitions'
            // readers back until the broker aborts its open transaction: at most this long.
            .set("transaction.timeout.ms", "15000");
        let appender = Appender::start(config.clone(), appends)?;
        let log = Arc::new(Self {
            config,
            instance: instance.to_string(),
            cleared: Arc::default(),
            appender,
            lag: Arc::default(),
            routes: std::sync::OnceLock::new(),
        });
        spawn_lag_monitor(Arc::downgrade(&log))?;
        Ok(log)
    }

    fn consumer_config(&self) -> ClientConfig {
        let mut c = self.config.client();
        c.set("group.id", &self.config.group)
            .set("client.id", &self.instance)
            .set("enable.auto.commit", "false")
            // Only committed transactions: a failed append leaves nothing to consume.
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "20")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000");
        c
    }
}

/// Plugin records carry the component (base64): room for the largest upload.
pub(crate) const PLUGIN_RECORD_MAX: &str = "16777216";

/// Every 200 ms: lag = high watermark − the group's committed offset, per priority.
fn spawn_lag_monitor(log: Weak<KafkaLog>) -> Result<(), LogError> {
    // A client that keeps failing is made anew: after a broker restart, librdkafka's idle
    // client has been seen to fail its offset checks for minutes while a new one works.
    const REBUILD_AFTER: Duration = Duration::from_secs(10);
    let (mut client, topics) = {
        let log = log.upgrade().ok_or(LogError::Closed)?;
        let client: BaseConsumer = log.consumer_config().create().map_err(backend)?;
        (client, PerPriority::from_fn(|p| log.config.topic(p).to_string()))
    };
    std::thread::Builder::new()
        .name("kafka-lag".into())
        .spawn(move || {
            let mut failing_since: Option<Instant> = None;
            while let Some(log) = log.upgrade() {
                let result = measure_lag(&client, &topics, &log.lag);
                log.lag.healthy.store(result.is_ok(), Ordering::Relaxed);
                match (result, failing_since) {
                    (Ok(()), _) => failing_since = None,
                    (Err(e), None) => {
                        let why = "the Kafka offset check failed; health says degraded until it answers";
                        tracing::warn!(error = %e, "{why}");
                        failing_since = Some(Instant::now());
                    }
                    (Err(e), Some(since)) if since.elapsed() >= REBUILD_AFTER => {
                        tracing::warn!(error = %e, "the Kafka offset check keeps failing; making its client anew");
                        match log.consumer_config().create() {
                            Ok(fresh) => client = fresh,
                            Err(e) => tracing::warn!(error = %e, "could not make a new offset-check client"),
                        }
                        failing_since = Some(Instant::now());
                    }
                    (Err(_), Some(_)) => {}
                }
                drop(log);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .map_err(|e| LogError::Unavailable(e.into()))?;
    Ok(())
}

fn measure_lag(client: &BaseConsumer, topics: &PerPriority<String>, lag: &Lag) -> Result<(), LogError> {
    let timeout = Duration::from_secs(2);
    // Every partition of both topics in one list, so that the committed offsets, the log
    // starts and the log ends take a request each, not one per partition: five times a
    // second, per-partition requests cost the broker a tenth of a core while idle.
    let mut all = TopicPartitionList::new();
    for priority in Priority::ALL {
        let topic = &topics[priority];
        // This topic's alone: a broker shared by many deployments (or tests) holds many
        // topics, and the whole cluster's metadata can outgrow the timeout.
        let metadata = client.fetch_metadata(Some(topic), timeout).map_err(backend)?;
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                all.add_partition(topic, p.id());
            }
        }
    }
    if all.count() == 0 {
        // Topics just created, whose partitions the metadata does not list yet: nothing
        // to measure (and librdkafka refuses an empty list as an invalid argument).
        return Ok(());
    }
    let committed = client.committed_offsets(all.clone(), timeout).map_err(backend)?;
    // Timestamps -2 and -1 ask for each partition's start and end (at the isolation
    // level: the last stable offset for a read_committed client).
    let at = |edge: Offset| {
        let mut tpl = all.clone();
        tpl.set_all_offsets(edge).map_err(backend)?;
        let found = client.offsets_for_times(tpl, timeout).map_err(backend)?;
        for e in found.elements() {
            e.error().map_err(backend)?;
        }
        Ok::<_, LogError>(found)
    };
    let (starts, ends) = (at(Offset::Beginning)?, at(Offset::End)?);
    let offset = |tpl: &TopicPartitionList, topic: &str, p: i32| match tpl.find_partition(topic, p).map(|e| e.offset())
    {
        Some(Offset::Offset(o)) => o,
        _ => 0,
    };
    for priority in Priority::ALL {
        let topic = &topics[priority];
        let mut total = 0u64;
        let mut each = Vec::new();
        for e in committed.elements_for_topic(topic) {
            let (low, high) = (offset(&starts, topic, e.partition()), offset(&ends, topic, e.partition()));
            // Below the log start (a reset deleted the records): nothing is left there.
            let done = match e.offset() {
                Offset::Offset(o) => o.max(low),
                _ => low,
            };
            total += (high - done).max(0) as u64;
            each.push((e.partition(), (high - done).max(0) as u64));
        }
        lag.depth[priority].store(total, Ordering::Relaxed);
        lag.partitions.lock().unwrap_or_else(|p| p.into_inner())[priority] = each;
    }
    Ok(())
}

#[async_trait]
impl OrderLog for KafkaLog {
    fn backend(&self) -> &'static str {
        "kafka"
    }

    async fn append(&self, mut records: Vec<Record>) -> Result<PerPriority<u64>, LogError> {
        if let Some(book) = self.routes.get() {
            // A key whose first record here creates its order is claimed without a
            // read: a claim that loses reads the winner's route. A read per new order
            // was most of an append's reads of the route book. A sole producer's key
            // is still read, since its route is set unconditionally and must not
            // overwrite one an outside producer claimed first.
            let mut creates: HashMap<&str, bool> = HashMap::new();
            for r in &records {
                creates.entry(r.key.as_str()).or_insert(r.creates && !r.sole_producer);
            }
            let keys: Vec<String> = creates.into_iter().filter(|(_, c)| !c).map(|(k, _)| k.to_string()).collect();
            let mut routes = if keys.is_empty() { HashMap::new() } else { book.routes(keys).await? };
            // A new key's first record here asks for its route: claimed, unless this
            // producer alone appends the key.
            let (mut claims, mut sole) = (Vec::new(), Vec::new());
            for r in &records {
                if !routes.contains_key(&r.key) {
                    routes.insert(r.key.clone(), r.priority);
                    let asks = if r.sole_producer { &mut sole } else { &mut claims };
                    asks.push((r.key.clone(), r.priority));
                }
            }
            // Before the append: a failed append leaves a route that its retry follows.
            book.set_routes(sole).await?;
            if !claims.is_empty() {
                routes.extend(book.claim_routes(claims).await?);
            }
            for r in &mut records {
                r.priority = routes[&r.key];
            }
        }
        let mut routed = PerPriority::<u64>::default();
        for r in &records {
            routed[r.priority] += 1;
        }
        // Acknowledged by every in-sync replica (acks=all) once the transaction commits.
        self.appender.append(records).await.map(|()| routed)
    }

    async fn consumer(&self) -> Result<Box<dyn LogConsumer>, LogError> {
        let shared = Arc::new(Buffers::default());
        let context = GroupContext { shared: shared.clone(), config: self.config.clone() };
        let consumer: BaseConsumer<GroupContext> =
            self.consumer_config().create_with_context(context).map_err(backend)?;
        consumer.subscribe(&[&self.config.vip_topic, &self.config.normal_topic]).map_err(backend)?;
        Ok(Box::new(KafkaConsumer {
            consumer,
            shared,
            config: self.config.clone(),
            lag: self.lag.clone(),
            cleared: self.cleared.clone(),
            cleared_seen: AtomicU64::new(self.cleared.epoch.load(Ordering::SeqCst)),
        }))
    }

    fn depth(&self, p: Priority) -> u64 {
        self.lag.depth[p].load(Ordering::Relaxed)
    }

    async fn clear(&self) -> Result<Vec<LogStart>, LogError> {
        // DeleteRecords up to each partition's end: the topics stay (with their
        // configuration and the group's offsets); only their records go.
        let admin: AdminClient<DefaultClientContext> = self.config.client().create().map_err(backend)?;
        let timeout = Duration::from_secs(10);
        let admin = Arc::new(admin);
        let (meta_admin, config) = (admin.clone(), self.config.clone());
        // The metadata call blocks: off the async workers.
        let upto = tokio::task::spawn_blocking(move || -> Result<TopicPartitionList, LogError> {
            let mut upto = TopicPartitionList::new();
            for p in Priority::ALL {
                let topic = config.topic(p);
                let metadata = meta_admin.inner().fetch_metadata(Some(topic), timeout).map_err(backend)?;
                for t in metadata.topics() {
                    for partition in t.partitions() {
                        upto.add_partition_offset(topic, partition.id(), Offset::End).map_err(backend)?;
                    }
                }
            }
            Ok(upto)
        })
        .await
        .map_err(|e| LogError::Backend(e.into()))??;
        let opts = AdminOptions::new().operation_timeout(Some(timeout)).request_timeout(Some(timeout));
        let deleted = tokio::time::timeout(Duration::from_secs(30), admin.delete_records(&upto, &opts))
            .await
            .map_err(|_| LogError::Unavailable("Kafka did not delete the records in 30 s".into()))?
            .map_err(backend)?;
        let mut starts = Vec::new();
        for e in deleted.elements() {
            if let Err(err) = e.error() {
                return Err(backend_while(format!("deleting {}[{}]", e.topic(), e.partition()), err));
            }
            if let (Some(priority), Offset::Offset(offset)) = (self.config.priority_of(e.topic()), e.offset()) {
                starts.push(LogStart { priority, partition: e.partition(), offset });
            }
        }
        self.cleared_elsewhere(&starts);
        Ok(starts)
    }

    fn cleared_elsewhere(&self, starts: &[LogStart]) {
        let mut cleared = self.cleared.starts.lock().unwrap_or_else(|p| p.into_inner());
        for s in starts {
            let start = cleared.entry((s.priority, s.partition)).or_insert(s.offset);
            *start = (*start).max(s.offset);
        }
        self.cleared.epoch.fetch_add(1, Ordering::SeqCst);
    }

    async fn members(&self) -> Result<Option<Vec<String>>, LogError> {
        let client: BaseConsumer = self.config.client().create().map_err(backend)?;
        let group = self.config.group.clone();
        // The group call blocks: off the async workers.
        let members = tokio::task::spawn_blocking(move || {
            let list = client.fetch_group_list(Some(&group), Duration::from_secs(10)).map_err(backend)?;
            let members = list.groups().iter().flat_map(|g| g.members().iter().map(|m| m.client_id().to_string()));
            Ok::<_, LogError>(members.collect::<Vec<_>>())
        })
        .await
        .map_err(|e| LogError::Backend(e.into()))??;
        Ok(Some(members))
    }

    fn member_name(&self) -> Option<String> {
        Some(self.instance.clone())
    }

    async fn flush(&self) -> Result<(), LogError> {
        // Appends are acknowledged before they return, and commits go to the group's
        // coordinator as they are made: nothing is held here.
        Ok(())
    }

    fn placement(&self) -> Option<super::Placement> {
        let lags = self.lag.partitions.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let held = self.lag.assigned.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let of = |p: Priority| {
            let state = |&(partition, lag): &(i32, u64)| super::PartitionState {
                partition,
                lag,
                mine: held[p].contains(&partition),
            };
            lags[p].iter().map(state).collect()
        };
        Some(super::Placement { vip: of(Priority::Vip), normal: of(Priority::Normal) })
    }

    fn problem(&self) -> Option<String> {
        let ok = self.lag.healthy.load(Ordering::Relaxed);
        (!ok).then(|| format!("kafka at {} did not answer the last offset check", self.config.brokers))
    }
}

/// Fetched records not yet handed out, and the lowest uncommitted offset handed out
/// per partition (where a rewind seeks back to).
#[derive(Default)]
struct Buffers {
    state: Mutex<BufferState>,
}

#[derive(Default)]
struct BufferState {
    queued: PerPriority<VecDeque<Delivery>>,
    handed: HashMap<(Priority, i32), i64>,
    /// The highest offset handed out per partition: a commit of it may step over the
    /// transaction markers after it.
    last_handed: HashMap<(Priority, i32), i64>,
    /// What this member committed last, per partition.
    committed: HashMap<(Priority, i32), i64>,
    /// Commits the broker failed, tried again until one passes.
    retries: CommitRetries,
    /// Where a reset left each partition: records before it are never handed out.
    cleared_starts: HashMap<(Priority, i32), i64>,
    normal_paused: bool,
    /// VIP paused by the operator: its lag then holds nothing back.
    vip_paused: bool,
    /// Set by a rebalance: the pause must be applied again to the new assignment.
    reapply_pause: bool,
}

/// Offset commits are asynchronous: the broker's answer comes later, through the
/// consumer's callback. A failed one must be sent again, or the group's committed offset
/// (and so its lag, which holds NORMAL back while VIP has some) stays behind for good
/// when no new record comes to commit. Kept per partition, the highest offset failed.
#[derive(Default)]
struct CommitRetries {
    failed: HashMap<(Priority, i32), i64>,
    next_try: Option<Instant>,
}

/// How often failed commits are sent again.
const COMMIT_RETRY_EVERY: Duration = Duration::from_secs(1);

impl CommitRetries {
    /// The broker's answer to a commit of `offset` on partition `k`.
    fn answered(&mut self, k: (Priority, i32), offset: i64, ok: bool, now: Instant) {
        if ok {
            if self.failed.get(&k).is_some_and(|f| *f <= offset) {
                self.failed.remove(&k);
            }
            if self.failed.is_empty() {
                self.next_try = None;
            }
        } else {
            let f = self.failed.entry(k).or_insert(offset);
            *f = (*f).max(offset);
            self.next_try.get_or_insert(now + COMMIT_RETRY_EVERY);
        }
    }

    /// The partitions to commit again now, if a retry is due.
    fn due(&mut self, now: Instant) -> Vec<(Priority, i32)> {
        if self.failed.is_empty() || self.next_try.is_some_and(|t| now < t) {
            return Vec::new();
        }
        self.next_try = Some(now + COMMIT_RETRY_EVERY);
        self.failed.keys().copied().collect()
    }

    /// A revoked partition's commits are its new owner's.
    fn forget(&mut self, k: (Priority, i32)) {
        self.failed.remove(&k);
    }
}

struct GroupContext {
    shared: Arc<Buffers>,
    config: KafkaConfig,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Records of revoked partitions now belong to another member: drop them unprocessed.
            let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            for e in tpl.elements() {
                if let Some(p) = self.config.priority_of(e.topic()) {
                    s.queued[p].retain(|d| d.partition != e.partition());
                    s.handed.remove(&(p, e.partition()));
                    s.last_handed.remove(&(p, e.partition()));
                    s.committed.remove(&(p, e.partition()));
                    s.retries.forget((p, e.partition()));
                }
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).reapply_pause = true;
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = &result {
            tracing::warn!(error = %e, "a Kafka offset commit failed; it is sent again");
        }
        let now = Instant::now();
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        for e in offsets.elements() {
            if let (Some(p), Offset::Offset(offset)) = (self.config.priority_of(e.topic()), e.offset()) {
                s.retries.answered((p, e.partition()), offset, result.is_ok() && e.error().is_ok(), now);
            }
        }
    }
}

struct KafkaConsumer {
    consumer: BaseConsumer<GroupContext>,
    shared: Arc<Buffers>,
    config: KafkaConfig,
    lag: Arc<Lag>,
    cleared: Arc<Cleared>,
    /// The reset this consumer last moved past.
    cleared_seen: AtomicU64,
}

/// Most records buffered per priority before fetching pauses.
const BUFFER_MAX: usize = 20_000;

impl KafkaConsumer {
    /// Moves fetched records into the buffers (waiting up to `timeout` for the first),
    /// then pauses NORMAL partitions while VIP work waits, and resumes them after.
    fn pump(&self, timeout: Duration) {
        self.skip_cleared();
        let mut first = true;
        loop {
            let t = if first { timeout } else { Duration::ZERO };
            first = false;
            match self.consumer.poll(t) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consumer");
                    break;
                }
                Some(Ok(m)) => {
                    let Some(priority) = self.config.priority_of(m.topic()) else { continue };
                    let appended_at_us = match m.timestamp() {
                        Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => ms * 1000,
                        Timestamp::NotAvailable => 0,
                    };
                    let d = Delivery {
                        priority,
                        partition: m.partition(),
                        offset: m.offset() as u64,
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        appended_at_us,
                    };
                    let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
                    if s.cleared_starts.get(&(priority, d.partition)).is_some_and(|start| (d.offset as i64) < *start) {
                        continue;
                    }
                    s.queued[priority].push_back(d);
                    if s.queued[priority].len() >= BUFFER_MAX {
                        break;
                    }
                }
            }
        }
        self.apply_pause();
    }

    /// After a reset: drops what was fetched from before it and seeks every assigned
    /// partition to its new start. (The engine stops the pipeline first, so nothing
    /// handed out is in process.)
    fn skip_cleared(&self) {
        let epoch = self.cleared.epoch.load(Ordering::SeqCst);
        if self.cleared_seen.load(Ordering::SeqCst) == epoch {
            return;
        }
        let starts = self.cleared.starts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let before = |p: Priority, d: &Delivery| starts.get(&(p, d.partition)).is_some_and(|s| (d.offset as i64) < *s);
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            for p in Priority::ALL {
                s.queued[p].retain(|d| !before(p, d));
            }
            s.handed.retain(|k, o| starts.get(k).is_none_or(|s| *o >= *s));
            s.last_handed.retain(|k, o| starts.get(k).is_none_or(|s| *o >= *s));
            s.cleared_starts = starts.clone();
        }
        let Ok(positions) = self.consumer.position() else { return };
        for e in positions.elements() {
            let Some(p) = self.config.priority_of(e.topic()) else { continue };
            let Some(start) = starts.get(&(p, e.partition())) else { continue };
            // A fetch from a deleted offset resets to the log start by itself
            // (auto.offset.reset=earliest); the seek only saves the round trip.
            let behind = match e.offset() {
                Offset::Offset(o) => o < *start,
                _ => false,
            };
            if behind
                && let Err(err) =
                    self.consumer.seek(e.topic(), e.partition(), Offset::Offset(*start), Duration::from_secs(5))
            {
                tracing::warn!(error = %err, topic = e.topic(), "seek past a reset failed");
            }
        }
        self.cleared_seen.store(epoch, Ordering::SeqCst);
    }

    /// A transaction's commit marker takes an offset that is never handed out. Where a
    /// commit covers everything fetched from a partition, it goes to the consumer's
    /// position instead, past such markers, so that the group's lag can reach zero.
    fn step_over_markers(&self, next: &mut HashMap<(Priority, i32), i64>) {
        let s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let drained = |(p, part): (Priority, i32), offset: i64| {
            s.last_handed.get(&(p, part)) == Some(&(offset - 1)) && !s.queued[p].iter().any(|d| d.partition == part)
        };
        if !next.iter().any(|(k, o)| drained(*k, *o)) {
            return;
        }
        let Ok(positions) = self.consumer.position() else { return };
        for ((p, part), offset) in next.iter_mut() {
            if !drained((*p, *part), *offset) {
                continue;
            }
            if let Some(Offset::Offset(position)) =
                positions.find_partition(self.config.topic(*p), *part).map(|e| e.offset())
                && position > *offset
            {
                *offset = position;
            }
        }
    }

    /// While idle: a marker the consumer reached only after the last commit (it came in
    /// a later fetch), or a partition that holds nothing but markers (an aborted append),
    /// is stepped over now, or the group's lag would never read zero.
    fn commit_past_markers(&self) {
        let Ok(positions) = self.consumer.position() else { return };
        let moved: Vec<((Priority, i32), i64)> = {
            let s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            positions
                .elements()
                .iter()
                .filter_map(|e| {
                    let (Some(p), Offset::Offset(position)) = (self.config.priority_of(e.topic()), e.offset()) else {
                        return None;
                    };
                    let k = (p, e.partition());
                    let committed = s.committed.get(&k).copied();
                    // Something handed out and not committed yet: the pipeline commits it.
                    let outstanding = s.last_handed.get(&k).is_some_and(|last| committed.is_none_or(|c| c <= *last));
                    let queued = s.queued[p].iter().any(|d| d.partition == e.partition());
                    (!outstanding && !queued && committed.is_none_or(|c| position > c)).then_some((k, position))
                })
                .collect()
        };
        if moved.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((p, partition), offset) in &moved {
            if tpl.add_partition_offset(self.config.topic(*p), *partition, Offset::Offset(*offset)).is_err() {
                return;
            }
        }
        if self.consumer.commit(&tpl, CommitMode::Async).is_ok() {
            self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).committed.extend(moved);
        }
    }

    /// Sends again, with what this member committed last, the commits the broker failed.
    fn retry_failed_commits(&self) {
        let mut tpl = TopicPartitionList::new();
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            for k in s.retries.due(Instant::now()) {
                let Some(offset) = s.committed.get(&k).copied() else {
                    s.retries.forget(k);
                    continue;
                };
                if tpl.add_partition_offset(self.config.topic(k.0), k.1, Offset::Offset(offset)).is_err() {
                    return;
                }
            }
        }
        if tpl.count() > 0 {
            // Its answer comes through the callback again.
            let _ = self.consumer.commit(&tpl, CommitMode::Async);
        }
    }

    fn apply_pause(&self) {
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let vip_waiting = !s.vip_paused
            && (!s.queued[Priority::Vip].is_empty() || self.lag.depth[Priority::Vip].load(Ordering::Relaxed) > 0);
        let want_paused = vip_waiting || s.queued[Priority::Normal].len() >= BUFFER_MAX;
        if want_paused == s.normal_paused && !s.reapply_pause {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else { return };
        // Read after each rebalance (which sets `reapply_pause`): what this instance holds.
        let held = PerPriority::from_fn(|p| {
            let topic = self.config.topic(p);
            assignment.elements().iter().filter(|e| e.topic() == topic).map(|e| e.partition()).collect()
        });
        *self.lag.assigned.lock().unwrap_or_else(|p| p.into_inner()) = held;
        let mut normal = TopicPartitionList::new();
        for e in assignment.elements().iter().filter(|e| e.topic() == self.config.normal_topic) {
            normal.add_partition(e.topic(), e.partition());
        }
        let result = if want_paused { self.consumer.pause(&normal) } else { self.consumer.resume(&normal) };
        if result.is_ok() {
            s.normal_paused = want_paused;
            s.reapply_pause = false;
        }
    }
}

#[async_trait]
impl LogConsumer for KafkaConsumer {
    fn waiting(&self, p: Priority) -> u64 {
        // Cheap enough to run before every NORMAL event: no network round trip.
        self.pump(Duration::ZERO);
        let s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let queued = s.queued[p].len() as u64;
        match p {
            // VIP lag anywhere in the group holds NORMAL back (priority is global),
            // unless VIP is paused.
            Priority::Vip => queued.max(self.lag.depth[Priority::Vip].load(Ordering::Relaxed)),
            Priority::Normal => queued,
        }
    }

    async fn poll(&mut self, p: Priority, max: usize) -> Result<Vec<Delivery>, LogError> {
        let empty = self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).queued[p].is_empty();
        self.pump(if empty { Duration::from_millis(50) } else { Duration::ZERO });
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = s.queued[p].len().min(max);
        if n == 0 {
            // Lag with nothing to hand out: markers this member may step over (the
            // pipeline keeps polling VIP while the group's VIP lag is not zero).
            drop(s);
            self.commit_past_markers();
            self.retry_failed_commits();
            return Ok(Vec::new());
        }
        let out: Vec<Delivery> = s.queued[p].drain(..n).collect();
        for d in &out {
            s.handed.entry((p, d.partition)).or_insert(d.offset as i64);
            s.last_handed.insert((p, d.partition), d.offset as i64);
        }
        Ok(out)
    }

    async fn commit(&mut self, done: &[Delivery]) -> Result<(), LogError> {
        let mut next: HashMap<(Priority, i32), i64> = HashMap::new();
        for d in done {
            let e = next.entry((d.priority, d.partition)).or_insert(0);
            *e = (*e).max(d.offset as i64 + 1);
        }
        self.step_over_markers(&mut next);
        let mut tpl = TopicPartitionList::new();
        for ((p, partition), offset) in &next {
            tpl.add_partition_offset(self.config.topic(*p), *partition, Offset::Offset(*offset)).map_err(backend)?;
        }
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            for (k, offset) in &next {
                s.handed.insert(*k, *offset);
                s.committed.insert(*k, *offset);
            }
        }
        self.consumer.commit(&tpl, CommitMode::Async).map_err(backend)
    }

    fn rewind(&mut self, p: Priority) {
        // Per partition, the first record not committed: handed out, or still queued.
        let mut from: HashMap<i32, i64> = HashMap::new();
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            for d in s.queued[p].drain(..) {
                let e = from.entry(d.partition).or_insert(d.offset as i64);
                *e = (*e).min(d.offset as i64);
            }
            let keys: Vec<_> = s.handed.keys().filter(|(q, _)| *q == p).copied().collect();
            for k in keys {
                if let Some(o) = s.handed.remove(&k) {
                    let e = from.entry(k.1).or_insert(o);
                    *e = (*e).min(o);
                }
            }
        }
        // Everything from there comes again, in order.
        let topic = self.config.topic(p);
        for (partition, offset) in from {
            if let Err(err) = self.consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(5)) {
                tracing::warn!(error = %err, topic, partition, "seek after rewind failed");
            }
        }
    }

    fn set_paused(&mut self, p: Priority, paused: bool) {
        if p == Priority::Vip {
            self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).vip_paused = paused;
        }
    }

    async fn wait(&mut self, timeout: Duration) {
        // The pipeline has a thread of its own, so blocking here stalls nothing else.
        self.pump(timeout);
        self.commit_past_markers();
        self.retry_failed_commits();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_commit_is_sent_again_until_one_passes() {
        let (mut r, t0, k) = (CommitRetries::default(), Instant::now(), (Priority::Vip, 0));
        r.answered(k, 10, true, t0);
        assert!(r.due(t0 + COMMIT_RETRY_EVERY).is_empty(), "nothing failed");
        r.answered(k, 12, false, t0);
        assert!(r.due(t0).is_empty(), "not before its time");
        assert_eq!(r.due(t0 + COMMIT_RETRY_EVERY), [k]);
        assert!(r.due(t0 + COMMIT_RETRY_EVERY).is_empty(), "once a period");
        assert_eq!(r.due(t0 + 2 * COMMIT_RETRY_EVERY), [k], "and again while it fails");
        // An older offset passing leaves the failed one owed; a commit at or past it settles it.
        r.answered(k, 11, true, t0);
        assert_eq!(r.due(t0 + 3 * COMMIT_RETRY_EVERY), [k]);
        r.answered(k, 14, true, t0);
        assert!(r.due(t0 + 4 * COMMIT_RETRY_EVERY).is_empty());
        // A revoked partition is its new owner's to commit.
        r.answered(k, 20, false, t0);
        r.forget(k);
        assert!(r.due(t0 + 5 * COMMIT_RETRY_EVERY).is_empty());
    }

    #[test]
    fn only_brokers_on_this_machine_count_as_local() {
        assert!(only_loopback("127.0.0.1:9092"));
        assert!(only_loopback("localhost:9092,[::1]:9093"));
        assert!(!only_loopback("127.0.0.1:9092,kafka-2:9092"));
        assert!(!only_loopback("10.0.0.5:9092"));
    }
}
