//! Records each decided event with the row it met, off the pipeline's path: the
//! pipeline hands cases over a bounded queue, a writer task writes them in batches, and
//! a pruner deletes what the retention no longer keeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::Utc;
use metrics::counter;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::domain::{Order, OrderEvent};
use crate::pipeline::Stats;
use crate::store::{Case, CaseRetention, Cases};
use crate::telemetry;

/// Batches waiting for the writer (a round's worth each, at most the pipeline's batch
/// size); beyond this, cases are dropped and counted, so the queue holds at most a few
/// tens of thousands of cases.
const QUEUE: usize = 32;
/// Rounds that queued while the last write ran join the next one until it holds this
/// many cases (the last round to join may take it past).
const WRITE_MAX: usize = 4096;
/// How often the pruner looks.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// How often a batch is tried in all when the store is out.
const ATTEMPTS: u32 = 4;

enum Message {
    Cases(Vec<Case>),
    /// Answered once every batch queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// The pipeline's end of the recorder. Cloning shares the one queue; the writer ends
/// once every clone is dropped and the queue is written.
#[derive(Clone)]
pub struct Recorder {
    queue: mpsc::Sender<Message>,
    stats: Arc<Stats>,
}

/// Why cases did not reach the store, as one event: its log line (once a second at
/// most) and its count.
enum Lost {
    /// The writer was behind: the queue was full.
    Dropped,
    /// The store refused the batch.
    Failed,
}

impl Lost {
    fn emit(self, cases: usize, why: &dyn std::fmt::Display, stats: &Stats) {
        stats.cases_lost.fetch_add(cases as u64, Ordering::Relaxed);
        static LAST: AtomicI64 = AtomicI64::new(-1);
        let outcome = match self {
            Lost::Dropped => "dropped",
            Lost::Failed => "failed",
        };
        counter!(telemetry::WHATIF_CASES, "outcome" => outcome).increment(cases as u64);
        let second = Utc::now().timestamp();
        if LAST.swap(second, Ordering::Relaxed) != second {
            tracing::warn!(cases, outcome, %why, "decided events were not recorded for what-if runs");
        }
    }
}

impl Recorder {
    /// Starts the writer and the pruner on the current runtime. The writer's handle
    /// finishes once every `Recorder` is dropped and what was queued is written; the
    /// pruner ends at `shutdown`.
    pub fn start(
        store: Arc<dyn Cases>,
        retention: CaseRetention,
        stats: Arc<Stats>,
        mut shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let (queue, mut messages) = mpsc::channel::<Message>(QUEUE);
        let (writer_store, writer_stats) = (store.clone(), stats.clone());
        let writer = tokio::spawn(async move {
            while let Some(message) = messages.recv().await {
                let mut batch = match message {
                    Message::Cases(batch) => batch,
                    Message::Flush(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                // Rounds queued meanwhile join this write: fewer, fuller store batches.
                let mut flush = None;
                while batch.len() < WRITE_MAX {
                    match messages.try_recv() {
                        Ok(Message::Cases(more)) => batch.extend(more),
                        Ok(Message::Flush(done)) => {
                            flush = Some(done);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                write(&*writer_store, batch, retention, &writer_stats).await;
                if let Some(done) = flush {
                    let _ = done.send(());
                }
            }
        });
        tokio::spawn(async move {
            loop {
                match store.prune_cases(retention).await {
                    Ok(0) => {}
                    Ok(gone) => tracing::debug!(gone, "pruned recorded cases"),
                    Err(e) => tracing::warn!(error = %e, "pruning recorded cases failed; trying again later"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(PRUNE_EVERY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
        (Self { queue, stats }, writer)
    }

    /// Hands the events a round decided to the writer; never waits.
    pub fn offer(&self, decided: &[(&OrderEvent, Option<&Order>)]) {
        if decided.is_empty() {
            return;
        }
        // Checked first, so a full queue costs no copies.
        if self.queue.capacity() == 0 {
            return Lost::Dropped.emit(decided.len(), &"the recorder is behind", &self.stats);
        }
        let now = Utc::now();
        let cases: Vec<Case> =
            decided.iter().map(|(e, o)| Case { event: (*e).clone(), current: o.cloned(), recorded_at: now }).collect();
        let n = cases.len();
        if let Err(e) = self.queue.try_send(Message::Cases(cases)) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "the recorder is behind",
                mpsc::error::TrySendError::Closed(_) => "the recorder stopped",
            };
            Lost::Dropped.emit(n, &why, &self.stats);
        }
    }

    /// Waits until every case offered before this call is written (or given up on).
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.queue.send(Message::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

/// Writes one batch; an outage is tried again a few times with backoff, then the batch
/// is counted as lost (cases are samples for what-if runs, not orders).
async fn write(store: &dyn Cases, batch: Vec<Case>, retention: CaseRetention, stats: &Stats) {
    let n = batch.len();
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        match store.record_cases(batch.clone(), retention.keep_for).await {
            Ok(()) => {
                counter!(telemetry::WHATIF_CASES, "outcome" => "recorded").increment(n as u64);
                return;
            }
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                tokio::time::sleep(backoff).await;
                backoff *= 4;
            }
            Err(e) => return Lost::Failed.emit(n, &e, stats),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use chrono::DateTime;
    use std::sync::Mutex;
    use tokio::sync::{Notify, Semaphore};

    /// Counts each write's cases; every write waits for a permit, so the test decides
    /// what queues while one is in flight.
    struct Gated {
        writes: Mutex<Vec<usize>>,
        entered: Notify,
        gate: Semaphore,
    }

    #[async_trait::async_trait]
    impl Cases for Gated {
        async fn record_cases(&self, cases: Vec<Case>, _: Duration) -> Result<(), StoreError> {
            self.writes.lock().unwrap().push(cases.len());
            self.entered.notify_one();
            self.gate.acquire().await.unwrap().forget();
            Ok(())
        }
        async fn cases_since(&self, _: DateTime<Utc>, _: usize) -> Result<Vec<Case>, StoreError> {
            Ok(Vec::new())
        }
        async fn prune_cases(&self, _: CaseRetention) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    fn event(i: usize) -> OrderEvent {
        OrderEvent {
            event_id: format!("e{i}"),
            order_id: format!("o{i}"),
            kind: crate::domain::EventKind::Created,
            source: "test".into(),
            occurred_at: Utc::now(),
            payload: Default::default(),
            accepted_at: None,
            shop: None,
        }
    }

    #[tokio::test]
    async fn rounds_queued_during_a_write_share_the_next_one() {
        let store = Arc::new(Gated { writes: Mutex::default(), entered: Notify::new(), gate: Semaphore::new(0) });
        let (_stop, shutdown) = watch::channel(false);
        let stats = Arc::new(Stats::default());
        let (recorder, writer) = Recorder::start(store.clone(), CaseRetention::default(), stats.clone(), shutdown);
        let events: Vec<OrderEvent> = (0..13).map(event).collect();
        let round = |r: std::ops::Range<usize>| -> Vec<(&OrderEvent, Option<&Order>)> {
            events[r].iter().map(|e| (e, None)).collect()
        };
        recorder.offer(&round(0..1));
        store.entered.notified().await;
        // Four rounds arrive while the first write is in flight.
        for r in 0..4 {
            recorder.offer(&round(1 + 3 * r..4 + 3 * r));
        }
        store.gate.add_permits(100);
        recorder.flush().await;
        assert_eq!(*store.writes.lock().unwrap(), [1, 12], "the queued rounds were written as one");
        assert_eq!(stats.cases_lost.load(Ordering::Relaxed), 0);
        drop(recorder);
        writer.await.unwrap();
    }
}
