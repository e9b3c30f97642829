//! The order log: durable appends partitioned by priority, consumed at least once
//! with commits after the store write. Backends: embedded SQLite and Kafka.

pub mod embedded;
pub mod kafka;
mod kafka_appender;

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{PerPriority, Priority};
use crate::error::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The backend could not take or give records now (unreachable, timed out, busy):
    /// the same call may succeed later, so callers retry with backoff.
    #[error("log unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The backend refused, and a retry will not change that (a record too large, a
    /// topic without partitions, a second consumer of the embedded log).
    #[error("log backend: {0}")]
    Backend(#[source] BoxError),
    #[error("log is shut down")]
    Closed,
}

impl LogError {
    /// Whether retrying the same call may succeed: an outage, not a refusal.
    pub fn is_transient(&self) -> bool {
        matches!(self, LogError::Unavailable(_))
    }
}

/// One record to append: keyed by order id so an order keeps its order.
#[derive(Debug, Clone)]
pub struct Record {
    /// Where the record goes unless its key has a route already (see [`OrderLog::append`]).
    pub priority: Priority,
    pub key: String,
    pub payload: Vec<u8>,
    /// This producer alone appends this key (a generated run's orders), so a new key's
    /// route is recorded without a claim (see [`RouteBook`]).
    pub sole_producer: bool,
    /// The record creates its key's order and follows no other event of it in its
    /// request: the key most likely has no route yet, so a claim is made without
    /// reading first (a redelivered create pays a claim and a read instead of a read).
    pub creates: bool,
}

impl Record {
    pub fn new(priority: Priority, key: impl Into<String>, payload: Vec<u8>) -> Self {
        Self { priority, key: key.into(), payload, sole_producer: false, creates: false }
    }
}

/// One record handed to the consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub priority: Priority,
    /// The partition within the priority's topic (always 0 for the embedded log).
    pub partition: i32,
    /// Position within the partition; commits refer to it.
    pub offset: u64,
    pub key: String,
    pub payload: Vec<u8>,
    /// When the append was acknowledged, in µs since the epoch (for latency).
    pub appended_at_us: i64,
}

/// Where a reset left one partition's log: records before `offset` are gone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogStart {
    pub priority: Priority,
    pub partition: i32,
    pub offset: i64,
}

/// Where routes are kept when the log itself cannot keep them atomically with its
/// appends (Kafka): a table shared by every instance.
#[async_trait]
pub trait RouteBook: Send + Sync + 'static {
    /// The routes known for `keys`.
    async fn routes(&self, keys: Vec<String>) -> Result<std::collections::HashMap<String, Priority>, LogError>;
    /// Claims routes for keys that had none: of two instances racing on one key's first
    /// records, the first claim wins (a conditional write) and both send the key's
    /// records where it says. Returns the route each key has now.
    async fn claim_routes(
        &self,
        routes: Vec<(String, Priority)>,
    ) -> Result<std::collections::HashMap<String, Priority>, LogError>;
    /// Records routes without a claim, for keys no other producer appends (cheaper).
    async fn set_routes(&self, routes: Vec<(String, Priority)>) -> Result<(), LogError>;
}

#[async_trait]
pub trait OrderLog: Send + Sync + 'static {
    /// A short name for health output: "embedded", "kafka".
    fn backend(&self) -> &'static str;
    /// Appends all records atomically; `Ok` means they are durable, and says how many
    /// went to each partition.
    ///
    /// Each key has a *route*: the priority of its first record still routed. A record
    /// goes where its key's route says, whatever its own `priority`, so that one order's
    /// records never sit in two partitions at once and are consumed in the order they
    /// were appended. A key without a route takes the record's priority as its route.
    /// A route lapses once nothing of its key is left to consume (embedded), or after
    /// a day from its key's first record (Kafka, where consumption is spread over the
    /// group: the route book's TTL).
    async fn append(&self, records: Vec<Record>) -> Result<PerPriority<u64>, LogError>;
    /// The consumer of this engine instance.
    async fn consumer(&self) -> Result<Box<dyn LogConsumer>, LogError>;
    /// Records appended but not yet committed, per priority.
    fn depth(&self, priority: Priority) -> u64;
    /// Waits until every commit made so far is durable (for a clean shutdown).
    async fn flush(&self) -> Result<(), LogError>;
    /// Drops every record appended so far, so that nothing of it is ever consumed (a
    /// reset), and says where each partition starts now (nothing, where the log is not
    /// shared). Records appended later are consumed as usual.
    async fn clear(&self) -> Result<Vec<LogStart>, LogError>;
    /// Another instance's reset left the log at `starts`: records before them that
    /// this instance fetched already are dropped, not handed out.
    fn cleared_elsewhere(&self, _starts: &[LogStart]) {}
    /// The instances consuming this log (by [`OrderLog::member_name`]), or `None` where
    /// no other instance can (the embedded log).
    async fn members(&self) -> Result<Option<Vec<String>>, LogError> {
        Ok(None)
    }
    /// This instance's name among the [`OrderLog::members`].
    fn member_name(&self) -> Option<String> {
        None
    }
    /// Why the log cannot serve now (its last write or check failed), if it cannot.
    fn problem(&self) -> Option<String> {
        None
    }
    /// Each partition's lag and whether this instance consumes it, where a group shares
    /// the log (`None` on the embedded log: one instance, one partition per priority).
    fn placement(&self) -> Option<Placement> {
        None
    }
}

/// The partitions of each priority: the group's lag on each, and which this instance holds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Placement {
    pub vip: Vec<PartitionState>,
    pub normal: Vec<PartitionState>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PartitionState {
    pub partition: i32,
    /// Records not yet committed by the group.
    pub lag: u64,
    /// This instance consumes it now.
    pub mine: bool,
}

#[async_trait]
pub trait LogConsumer: Send + Sync {
    /// Records of this priority not yet handed out by `poll`: the scheduler's view.
    fn waiting(&self, priority: Priority) -> u64;
    /// Up to `max` records of one priority, in partition order.
    async fn poll(&mut self, priority: Priority, max: usize) -> Result<Vec<Delivery>, LogError>;
    /// These deliveries (and everything before them in their partitions) are applied to the store.
    async fn commit(&mut self, done: &[Delivery]) -> Result<(), LogError>;
    /// Hand out again, on the next poll, whatever was polled but not committed.
    fn rewind(&mut self, priority: Priority);
    /// Returns when a record may have arrived, or after `timeout`.
    async fn wait(&mut self, timeout: Duration);
    /// Tells the consumer whether a priority is paused, so a paused priority's backlog
    /// does not hold the other one back.
    fn set_paused(&mut self, _priority: Priority, _paused: bool) {}
}
