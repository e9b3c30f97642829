//! All-or-nothing appends to Kafka: one transactional producer, and the requests that
//! arrive while a transaction commits share the next one (group commit).
//!
//! A request's records become visible to the engine's consumers (which read committed)
//! together, or not at all: a request answered 503 left nothing behind on the log.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio::sync::{mpsc, oneshot};

use super::kafka::KafkaConfig;
use super::{LogError, Record};

/// How long a commit (its flush included) may take before the transaction is aborted.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most records one transaction takes: later requests wait for the next.
const GROUP_MAX_RECORDS: usize = 50_000;
/// Requests queued for the committing thread.
const QUEUE: usize = 1024;

struct Request {
    records: Vec<Record>,
    done: oneshot::Sender<Result<(), LogError>>,
}

/// The handle appends go through; the transactions run on a thread of their own,
/// because the producer's transaction calls block.
pub struct Appender {
    queue: mpsc::Sender<Request>,
}

impl Appender {
    pub fn start(config: KafkaConfig, producer_config: ClientConfig) -> Result<Self, LogError> {
        let (queue, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("kafka-append".into())
            .spawn(move || run(config, producer_config, rx))
            .map_err(|e| LogError::Unavailable(format!("starting the append thread: {e}").into()))?;
        Ok(Self { queue })
    }

    /// Appends `records` in one transaction (possibly shared with other requests) and
    /// returns once it committed, or with the reason it did not.
    pub async fn append(&self, records: Vec<Record>) -> Result<(), LogError> {
        let (done, answer) = oneshot::channel();
        self.queue.send(Request { records, done }).await.map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?
    }
}

fn run(config: KafkaConfig, producer_config: ClientConfig, mut rx: mpsc::Receiver<Request>) {
    let mut txn = Transactions { config, producer_config, producer: None };
    // At once, not at the first append: registering the transactional id fences this
    // instance's earlier self and aborts the transaction a crash left open.
    if let Err(f) = txn.ensure_producer() {
        tracing::warn!(error = %f.error, "kafka appends: no transactional producer yet; trying at the first append");
    }
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        let mut records = group[0].records.len();
        while records < GROUP_MAX_RECORDS {
            let Ok(next) = rx.try_recv() else { break };
            records += next.records.len();
            group.push(next);
        }
        let all: Vec<&Record> = group.iter().flat_map(|r| &r.records).collect();
        match txn.commit(&all) {
            Ok(()) => {
                for r in group {
                    let _ = r.done.send(Ok(()));
                }
            }
            // A record the cluster refused (too large, say): each request alone, so one
            // that can never be written fails only itself.
            Err(Failure { refused: true, .. }) if group.len() > 1 => {
                for r in group {
                    let result = txn.commit(&r.records.iter().collect::<Vec<_>>());
                    let _ = r.done.send(result.map_err(|f| f.error));
                }
            }
            // Kafka is away: everyone gets the same answer now, not one timeout each.
            Err(f) => {
                // The cause's own words: the answers are made anew from it (LogError
                // cannot be cloned), and its prefix would be said twice.
                let reason = std::error::Error::source(&f.error).map_or_else(|| f.error.to_string(), |s| s.to_string());
                let outage = f.error.is_transient();
                for r in group {
                    let e = reason.clone().into();
                    let _ = r.done.send(Err(if outage { LogError::Unavailable(e) } else { LogError::Backend(e) }));
                }
            }
        }
    }
}

struct Transactions {
    config: KafkaConfig,
    producer_config: ClientConfig,
    /// Made on first use and after a fatal error (a fenced producer, say).
    producer: Option<BaseProducer>,
}

/// Why a transaction did not commit, and whether its content was to blame.
struct Failure {
    error: LogError,
    /// The cluster refused a record (as opposed to being away): other requests of the
    /// group may go through without it.
    refused: bool,
}

impl Transactions {
    /// Makes the producer (registering its transactional id) if there is none.
    fn ensure_producer(&mut self) -> Result<(), Failure> {
        let away = |e| Failure { error: txn_error(e), refused: false };
        if self.producer.is_none() {
            let producer: BaseProducer = self.producer_config.create().map_err(away)?;
            producer.init_transactions(COMMIT_TIMEOUT).map_err(away)?;
            self.producer = Some(producer);
        }
        Ok(())
    }

    fn commit(&mut self, records: &[&Record]) -> Result<(), Failure> {
        self.ensure_producer()?;
        let producer = self.producer.as_ref().expect("made above");
        let result = transact(producer, &self.config, records);
        if let Err(e) = &result {
            self.recover(e);
        }
        result.map_err(|e| {
            let refused = match &e {
                KafkaError::Transaction(t) => {
                    t.txn_requires_abort() && !t.is_retriable() && !super::kafka::code_is_outage(t.code())
                }
                KafkaError::MessageProduction(_) => true,
                _ => false,
            };
            Failure { error: txn_error(e), refused }
        })
    }

    /// After a failed transaction: abort it, or start over with a new producer when the
    /// old one can no longer be used.
    fn recover(&mut self, e: &KafkaError) {
        let fatal = matches!(e, KafkaError::Transaction(t) if t.is_fatal());
        let aborted = !fatal && self.producer.as_ref().is_some_and(|p| p.abort_transaction(COMMIT_TIMEOUT).is_ok());
        if !aborted {
            tracing::warn!(error = %e, "kafka appends: starting a new transactional producer");
            self.producer = None;
        }
    }
}

fn transact(producer: &BaseProducer, config: &KafkaConfig, records: &[&Record]) -> Result<(), KafkaError> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    producer.begin_transaction()?;
    for r in records {
        let record = BaseRecord::to(config.topic(r.priority)).key(&r.key).payload(&r.payload).timestamp(now_ms);
        producer.send(record).map_err(|(e, _)| e)?;
    }
    // Flushes every record first: one that failed makes the commit fail.
    producer.commit_transaction(COMMIT_TIMEOUT)
}

fn txn_error(e: KafkaError) -> LogError {
    super::kafka::backend_while("kafka transaction", e)
}
