//! Records each decided event with the row it met, off the pipeline's path: the
//! pipeline hands cases over a bounded queue, and a task writes them in batches and
//! prunes what the retention no longer keeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::Utc;
use metrics::counter;
use tokio::sync::{mpsc, watch};

use crate::domain::{Order, OrderEvent};
use crate::store::{Case, CaseRetention, Cases};
use crate::telemetry;

/// Batches of cases waiting for the writer; beyond this, cases are dropped and counted.
const QUEUE: usize = 256;
/// How often the writer prunes.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// The pipeline's end of the recorder. Cloning shares the one queue.
#[derive(Clone)]
pub struct Recorder {
    queue: mpsc::Sender<Vec<Case>>,
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
    fn emit(self, cases: usize, why: &dyn std::fmt::Display) {
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
    /// Starts the writer on the current runtime; it ends at `shutdown`, once the queue
    /// is written.
    pub fn start(store: Arc<dyn Cases>, retention: CaseRetention, mut shutdown: watch::Receiver<bool>) -> Self {
        let (queue, mut batches) = mpsc::channel::<Vec<Case>>(QUEUE);
        tokio::spawn(async move {
            let mut prune = tokio::time::interval(PRUNE_EVERY);
            loop {
                tokio::select! {
                    batch = batches.recv() => match batch {
                        Some(batch) => write(&*store, batch, retention).await,
                        None => return,
                    },
                    _ = prune.tick() => match store.prune_cases(retention).await {
                        Ok(0) => {}
                        Ok(gone) => tracing::debug!(gone, "pruned recorded cases"),
                        Err(e) => tracing::warn!(error = %e, "pruning recorded cases failed; trying again later"),
                    },
                    _ = shutdown.changed() => {
                        batches.close();
                        while let Some(batch) = batches.recv().await {
                            write(&*store, batch, retention).await;
                        }
                        return;
                    }
                }
            }
        });
        Self { queue }
    }

    /// Hands a round's decided events to the writer; never waits.
    pub fn offer(&self, inputs: &[(&OrderEvent, Option<&Order>)]) {
        if inputs.is_empty() {
            return;
        }
        let now = Utc::now();
        let cases: Vec<Case> =
            inputs.iter().map(|(e, o)| Case { event: (*e).clone(), current: o.cloned(), recorded_at: now }).collect();
        if let Err(e) = self.queue.try_send(cases) {
            let (why, cases) = match e {
                mpsc::error::TrySendError::Full(c) => ("the recorder is behind", c),
                mpsc::error::TrySendError::Closed(c) => ("the recorder stopped", c),
            };
            Lost::Dropped.emit(cases.len(), &why);
        }
    }
}

/// Writes one batch; an outage is tried again a few times with backoff, then the batch
/// is counted as lost (cases are samples for what-if runs, not orders).
async fn write(store: &dyn Cases, batch: Vec<Case>, retention: CaseRetention) {
    let n = batch.len();
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=4 {
        match store.record_cases(batch.clone(), retention.keep_for).await {
            Ok(()) => {
                counter!(telemetry::WHATIF_CASES, "outcome" => "recorded").increment(n as u64);
                return;
            }
            Err(e) if e.is_transient() && attempt < 4 => {
                tokio::time::sleep(backoff).await;
                backoff *= 4;
            }
            Err(e) => return Lost::Failed.emit(n, &e),
        }
    }
}
