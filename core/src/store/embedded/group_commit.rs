//! Group commit on the embedded store's one writer connection. Writes that arrive
//! while a transaction is under way wait for it, then go together in the next one, so
//! concurrent small writes (webhook claims, their confirmations, audit records) share
//! one fsync. Each write runs in a savepoint of its own: one that fails takes back only
//! its own changes. Every answer waits for the commit that made its write durable.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use metrics::counter;
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use crate::store::StoreError;
use crate::telemetry;

/// Most writes one transaction takes, so that a burst does not make one huge commit;
/// the writes left over go in the next.
const GROUP_MAX: usize = 512;

/// A write's statements, run in its savepoint; `true` if they all succeeded.
type Run = Box<dyn FnOnce(&Connection) -> bool + Send>;

struct Job {
    run: Run,
    committed: oneshot::Sender<Result<(), GroupFailed>>,
}

/// Why a write did not commit.
#[derive(Debug)]
pub enum WriteFailed {
    /// Its own statements failed; its changes were taken back, the group went on.
    Own(rusqlite::Error),
    /// The group's transaction failed, so nothing of the group was written.
    Group(GroupFailed),
}

/// The failure of a group's transaction, told to every write that was in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupFailed {
    #[error("the group commit failed: {0}")]
    Commit(#[source] Arc<rusqlite::Error>),
    /// A write of the group panicked, or the runtime stopped before this one ran.
    #[error("the store's writer stopped before this write was committed")]
    Stopped,
}

impl From<GroupFailed> for StoreError {
    fn from(e: GroupFailed) -> Self {
        match &e {
            GroupFailed::Commit(cause) if crate::sqlite::is_transient(cause) => StoreError::Unavailable(Box::new(e)),
            _ => StoreError::Backend(Box::new(e)),
        }
    }
}

pub struct GroupCommit {
    conn: Mutex<Connection>,
    queue: Mutex<VecDeque<Job>>,
    /// Whether a leader (a blocking task committing the queue) runs: a write queued
    /// meanwhile waits for it instead of starting another.
    leading: AtomicBool,
    commits: AtomicU64,
}

impl GroupCommit {
    pub fn new(conn: Connection) -> Arc<Self> {
        let (queue, leading, commits) = (Mutex::default(), AtomicBool::new(false), AtomicU64::new(0));
        Arc::new(Self { conn: Mutex::new(conn), queue, leading, commits })
    }

    /// The connection itself, for work outside a group (a statement in autocommit).
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Transactions committed so far (each one fsync).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Runs `f` in the next group's transaction and answers once that one committed.
    /// `f`'s own error comes back as it is (its changes taken back); a failed commit
    /// comes back to every write of the group.
    pub async fn write<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, WriteFailed> {
        let out: Arc<Mutex<Option<rusqlite::Result<T>>>> = Arc::default();
        let slot = out.clone();
        let run: Run = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            ok
        });
        let (committed, answer) = oneshot::channel();
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push_back(Job { run, committed });
        if !self.leading.swap(true, Ordering::AcqRel) {
            let group = self.clone();
            tokio::task::spawn_blocking(move || group.lead());
        }
        // Not answered: the runtime went down before the leader took this write.
        let committed = answer.await.unwrap_or(Err(GroupFailed::Stopped));
        let out = out.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (out, committed) {
            (Some(Err(e)), _) => Err(WriteFailed::Own(e)),
            (_, Err(failed)) => Err(WriteFailed::Group(failed)),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, Ok(())) => unreachable!("a committed group ran each of its writes"),
        }
    }

    /// Commits the queue until it stays empty, then steps down.
    fn lead(&self) {
        loop {
            self.commit_queued();
            self.leading.store(false, Ordering::Release);
            // A write queued after the last look, while this task still led, left it to
            // this task: take it, unless a new leader already has.
            let queued = !self.queue.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
            if !queued || self.leading.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }

    /// Commits the queued writes, a group at a time, until the queue is empty.
    fn commit_queued(&self) {
        let mut conn = self.lock();
        loop {
            let jobs: Vec<Job> = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                let n = queue.len().min(GROUP_MAX);
                queue.drain(..n).collect()
            };
            if jobs.is_empty() {
                return;
            }
            let (runs, answers): (Vec<Run>, Vec<_>) = jobs.into_iter().map(|j| (j.run, j.committed)).unzip();
            let writes = runs.len() as u64;
            // A write whose statements panic fails its group, not the leader: the writes
            // queued behind it still go.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_group(&mut conn, runs)));
            let result = match ran {
                Ok(committed) => committed.map_err(|e| GroupFailed::Commit(Arc::new(e))),
                Err(_) => Err(GroupFailed::Stopped),
            };
            if result.is_ok() {
                self.commits.fetch_add(1, Ordering::Relaxed);
                counter!(telemetry::STORE_COMMITS).increment(1);
                counter!(telemetry::STORE_WRITES).increment(writes);
            }
            for answer in answers {
                let _ = answer.send(result.clone());
            }
        }
    }
}

fn run_group(conn: &mut Connection, runs: Vec<Run>) -> rusqlite::Result<()> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for run in runs {
        let savepoint = tx.savepoint()?;
        if run(&savepoint) {
            savepoint.commit()?;
        }
        // Otherwise dropped, which rolls it back: only that write's changes go.
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_write_fails_its_group_and_later_writes_still_go() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (v INTEGER)").unwrap();
        let group = GroupCommit::new(conn);
        let panicked = group.write(|_| -> rusqlite::Result<()> { panic!("a bug in one write") }).await;
        assert!(matches!(panicked, Err(WriteFailed::Group(GroupFailed::Stopped))), "{panicked:?}");
        group.write(|c| c.execute("INSERT INTO t VALUES (1)", [])).await.unwrap();
        let rows: i64 = group.lock().query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 1);
    }
}
