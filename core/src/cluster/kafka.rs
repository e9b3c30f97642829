//! The cluster on Kafka: a topic per channel (`.control` and `.plugins` compacted,
//! `.changes` and `.dlq`), written by one idempotent producer outside the order log's
//! transactions, and followed by consumers of their own.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{Apply, Channel, Cluster};
use crate::failure::{Failure, FailureKind, Stage};
use crate::log::LogError;
use crate::log::kafka::{KafkaConfig, PLUGIN_RECORD_MAX, backend, backend_while, producer_config};

/// How long a kept channel may take to catch up at start.
const CATCH_UP: Duration = Duration::from_secs(30);

pub struct KafkaCluster {
    config: KafkaConfig,
    producer: FutureProducer,
    /// Acknowledgements `flush` still waits for.
    pending: Mutex<Vec<DeliveryFuture>>,
    /// A record that could not even be queued for a reason that may pass: the next
    /// `flush` fails, so the batch is not committed and comes again.
    failed: Mutex<Option<LogError>>,
}

impl KafkaCluster {
    /// A producer for the channels' topics, which the order log created.
    pub fn open(config: KafkaConfig) -> Result<Self, LogError> {
        let producer = producer_config(&config).create().map_err(backend)?;
        Ok(Self { config, producer, pending: Mutex::default(), failed: Mutex::default() })
    }

    fn topic(&self, channel: Channel) -> &str {
        match channel {
            Channel::Control => &self.config.control_topic,
            Channel::Plugins => &self.config.plugins_topic,
            Channel::Changes => &self.config.changes_topic,
            Channel::DeadLetters => &self.config.dlq_topic,
            Channel::Pulse => &self.config.pulse_topic,
        }
    }

    fn consumer(&self, name: &str) -> Result<BaseConsumer, LogError> {
        self.config
            .client()
            .set("group.id", format!("{}.{name}.{}", self.config.group, uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            // Only committed transactions: a failed append leaves nothing to consume.
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            // A fetch returns as soon as a record arrives; the wait only bounds how
            // often an idle channel asks (each ask costs the broker CPU).
            .set("fetch.wait.max.ms", "500")
            .set("fetch.message.max.bytes", PLUGIN_RECORD_MAX)
            .create()
            .map_err(backend)
    }

    /// Follows every partition of a channel (the changes, the pulse) from its end as of
    /// now, so this instance sees every instance's later records. Partitions are
    /// assigned with explicit offsets (no group, no lazy "latest" reset), so a record
    /// published right after this returns is never skipped.
    fn follow_from_now(&self, channel: Channel, apply: Apply) -> Result<(), LogError> {
        let name = if channel == Channel::Pulse { "pulse" } else { "changes" };
        let consumer = self.consumer(name)?;
        let timeout = Duration::from_secs(10);
        let topic = self.topic(channel);
        let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(backend)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(LogError::Backend(format!("the {name} topic {topic} has no partitions").into()));
        }
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let (_, high) = consumer.fetch_watermarks(topic, p, timeout).map_err(backend)?;
            tpl.add_partition_offset(topic, p, Offset::Offset(high)).map_err(backend)?;
        }
        consumer.assign(&tpl).map_err(backend)?;
        spawn_follower(consumer, name, apply)
    }

    /// Reads a compacted topic from its start into `apply`: until caught up (assigned,
    /// then quiet for a moment, within [`CATCH_UP`]), then on a thread of its own.
    fn follow_kept(&self, channel: Channel, mut apply: Apply) -> Result<(), LogError> {
        let name = match channel {
            Channel::Plugins => "plugins",
            _ => "control",
        };
        let consumer = self.consumer(name)?;
        consumer.subscribe(&[self.topic(channel)]).map_err(backend)?;
        let deadline = Instant::now() + CATCH_UP;
        let mut quiet = 0;
        while quiet < 5 {
            if Instant::now() > deadline {
                return Err(LogError::Unavailable(format!("the {name} topic did not catch up in {CATCH_UP:?}").into()));
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    apply(m.payload().unwrap_or_default());
                    quiet = 0;
                }
                _ if consumer.assignment().map(|a| a.count()).unwrap_or(0) > 0 => quiet += 1,
                _ => {}
            }
        }
        spawn_follower(consumer, name, apply)
    }
}

fn spawn_follower(consumer: BaseConsumer, name: &'static str, mut apply: Apply) -> Result<(), LogError> {
    std::thread::Builder::new()
        .name(format!("kafka-{name}"))
        .spawn(move || {
            loop {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => apply(m.payload().unwrap_or_default()),
                    Some(Err(e)) => tracing::warn!(error = %e, channel = name, "cluster channel consumer"),
                    None => {}
                }
            }
        })
        .map_err(|e| LogError::Unavailable(e.into()))?;
    Ok(())
}

/// Errors the same record always gets again: it can never be published, so retrying
/// would stall its partition forever. Anything else (a broker away, a timeout) may pass.
fn never_publishable(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(e.rdkafka_error_code(), Some(MessageSizeTooLarge | InvalidMessageSize | InvalidRecord | BadMessage))
}

/// The store holds the change; only its relay is lost. Said loudly and counted, and the
/// pipeline goes on (the other instances' clients see the row at their next resync).
fn unpublishable(e: &KafkaError, topic: &str, key: &str) {
    Failure::new(Stage::Publish, FailureKind::Unpublishable, format!("{topic}: {e}")).emit(key);
}

#[async_trait]
impl Cluster for KafkaCluster {
    fn send(&self, channel: Channel, key: &str, payload: &[u8]) {
        let topic = self.topic(channel);
        loop {
            match self.producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
                Ok(delivery) => {
                    self.pending.lock().unwrap_or_else(|p| p.into_inner()).push(delivery);
                    return;
                }
                // The producer's queue is full: wait for it to drain a little.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err((e, _)) if never_publishable(&e) => {
                    unpublishable(&e, topic, key);
                    return;
                }
                Err((e, _)) => {
                    let why = backend_while(format!("queueing a record for {topic}"), e);
                    *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    return;
                }
            }
        }
    }

    async fn flush(&self) -> Result<(), LogError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut failure = self.failed.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Every acknowledgement is awaited, so none is left behind for the next batch.
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, record))) if never_publishable(&e) => {
                    let key = record.key().map(String::from_utf8_lossy).unwrap_or_default();
                    unpublishable(&e, record.topic(), &key);
                }
                Ok(Err((e, _))) => failure = failure.or(Some(backend(e))),
                Err(_) => failure = failure.or(Some(LogError::Unavailable("the producer dropped a record".into()))),
            }
        }
        failure.map_or(Ok(()), Err)
    }

    async fn send_now(&self, channel: Channel, key: &str, payload: &[u8]) -> Result<(), LogError> {
        let topic = self.topic(channel);
        let record = FutureRecord::to(topic).key(key).payload(payload);
        match self.producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => Ok(()),
            // A change's relay may be lost (the store holds it); a switch or a deployment
            // that cannot go round must fail its request instead.
            Err((e, _)) if never_publishable(&e) && channel == Channel::Changes => {
                unpublishable(&e, topic, key);
                Ok(())
            }
            Err((e, _)) => Err(backend(e)),
        }
    }

    fn max_record_bytes(&self) -> usize {
        PLUGIN_RECORD_MAX.parse().unwrap_or(1 << 20)
    }

    fn follow(&self, channel: Channel, apply: Apply) -> Result<(), LogError> {
        match channel {
            Channel::Changes | Channel::Pulse => self.follow_from_now(channel, apply),
            Channel::Control | Channel::Plugins => self.follow_kept(channel, apply),
            Channel::DeadLetters => Err(LogError::Backend("the dead letters are not read back".into())),
        }
    }
}
