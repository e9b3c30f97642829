//! The embedded log on SQLite: one table per priority, a writer thread that group-commits
//! appends and offset commits, and a single consumer reading by position.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, oneshot};

use super::{Delivery, LogConsumer, LogError, OrderLog, Record};
use crate::domain::{PerPriority, Priority};
use crate::sqlite::{micros, open};

fn table(p: Priority) -> &'static str {
    match p {
        Priority::Vip => "records_vip",
        Priority::Normal => "records_normal",
    }
}

/// Positions every party can see without touching the database.
#[derive(Default)]
struct Marks {
    /// Highest offset appended durably, per priority.
    appended: PerPriority<AtomicU64>,
    /// Highest offset committed durably, per priority.
    committed: PerPriority<AtomicU64>,
    /// Highest offset a reset dropped, per priority: consumers skip to it.
    cleared: PerPriority<AtomicU64>,
    arrived: Notify,
    /// Why the last group commit failed; cleared by the next one that succeeds.
    failure: Mutex<Option<String>>,
}

enum Cmd {
    Append {
        records: Vec<Record>,
        ack: oneshot::Sender<Result<PerPriority<u64>, LogError>>,
    },
    Commit {
        priority: Priority,
        offset: u64,
    },
    /// Answered once everything queued before it is committed.
    Flush {
        ack: oneshot::Sender<Result<(), LogError>>,
    },
}

pub struct EmbeddedLog {
    path: PathBuf,
    cmds: mpsc::Sender<Cmd>,
    marks: Arc<Marks>,
    consumer_taken: Mutex<bool>,
}

fn backend(e: rusqlite::Error) -> LogError {
    if crate::sqlite::is_transient(&e) { LogError::Unavailable(e.into()) } else { LogError::Backend(e.into()) }
}

impl EmbeddedLog {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let conn = open(path).map_err(backend)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS records_vip (
                 pos INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, payload BLOB NOT NULL,
                 appended_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS records_normal (
                 pos INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, payload BLOB NOT NULL,
                 appended_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS offsets (partition TEXT PRIMARY KEY, committed INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS routes (
                 key TEXT PRIMARY KEY, priority TEXT NOT NULL, last_pos INTEGER NOT NULL) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS routes_by_last_pos ON routes (priority, last_pos);",
        )
        .map_err(backend)?;
        let marks = Arc::new(Marks::default());
        for p in Priority::ALL {
            // AUTOINCREMENT keeps offsets growing even after committed records are truncated.
            let appended: i64 = conn
                .query_row("SELECT seq FROM sqlite_sequence WHERE name = ?1", [table(p)], |r| r.get(0))
                .optional()
                .map_err(backend)?
                .unwrap_or(0);
            let committed: i64 = conn
                .query_row("SELECT committed FROM offsets WHERE partition = ?1", [p.label()], |r| r.get(0))
                .optional()
                .map_err(backend)?
                .unwrap_or(0);
            marks.appended[p].store(appended as u64, Ordering::SeqCst);
            marks.committed[p].store(committed as u64, Ordering::SeqCst);
        }
        let (cmds, rx) = mpsc::channel();
        let writer_marks = marks.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_marks))
            .map_err(|e| LogError::Unavailable(e.into()))?;
        Ok(Self { path: path.to_path_buf(), cmds, marks, consumer_taken: Mutex::new(false) })
    }
}

/// Most records one group commit takes, so one transaction never grows unbounded.
const GROUP_MAX: usize = 50_000;
/// How often committed records are deleted.
const TRUNCATE_EVERY: Duration = Duration::from_secs(2);
/// Most records one truncation deletes, so appends never stall long behind it.
const TRUNCATE_MAX: u64 = 50_000;

/// The first retry of commits that failed to write comes after this, then twice as long
/// each time, up to `TRUNCATE_EVERY`.
const RETRY_FIRST: Duration = Duration::from_millis(50);

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Cmd>, marks: Arc<Marks>) {
    let mut last_truncate = Instant::now();
    let mut truncated = PerPriority::<u64>::default();
    // Commits not yet durable: a failed group commit keeps them for the next attempt,
    // which comes by itself (with backoff) even if nothing else is queued.
    let mut pending = PerPriority::<Option<u64>>::default();
    let mut retry = RETRY_FIRST;
    loop {
        // Commits waiting, or a failure not yet cleared: try again soon, by itself.
        let failing = marks.failure.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        let retrying = failing || pending.iter().any(Option::is_some);
        let wait = if retrying { retry } else { TRUNCATE_EVERY };
        let first = match rx.recv_timeout(wait) {
            Ok(cmd) => Some(cmd),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if pending.iter().any(Option::is_some) {
                    group_commit(&mut conn, Vec::new(), &marks, &mut pending);
                }
                return;
            }
        };
        let mut batch: Vec<Cmd> = first.into_iter().collect();
        let mut count = batch.iter().map(cmd_len).sum::<usize>();
        while count < GROUP_MAX {
            match rx.try_recv() {
                Ok(cmd) => {
                    count += cmd_len(&cmd);
                    batch.push(cmd);
                }
                Err(_) => break,
            }
        }
        if !batch.is_empty() || retrying {
            let ok = group_commit(&mut conn, batch, &marks, &mut pending);
            retry = if ok { RETRY_FIRST } else { (retry * 2).min(TRUNCATE_EVERY) };
        }
        if last_truncate.elapsed() >= TRUNCATE_EVERY {
            last_truncate = Instant::now();
            for p in Priority::ALL {
                let upto = marks.committed[p].load(Ordering::SeqCst).min(truncated[p] + TRUNCATE_MAX);
                if upto > truncated[p] {
                    // A route lapses with its key's last record: nothing of the order is
                    // queued there any more, so its next record may go by its own priority.
                    let records = format!("DELETE FROM {} WHERE pos <= ?1", table(p));
                    let routes = "DELETE FROM routes WHERE priority = ?1 AND last_pos <= ?2";
                    let deleted = conn
                        .execute(&records, [upto as i64])
                        .and_then(|_| conn.execute(routes, params![p.label(), upto as i64]));
                    match deleted {
                        Ok(_) => truncated[p] = upto,
                        Err(e) => tracing::warn!(error = %e, "log truncation failed"),
                    }
                }
            }
        }
    }
}

fn cmd_len(cmd: &Cmd) -> usize {
    match cmd {
        Cmd::Append { records, .. } => records.len(),
        Cmd::Commit { .. } | Cmd::Flush { .. } => 1,
    }
}

/// Writes every queued append and commit (with the commits still pending from a failed
/// attempt) in one transaction, then acknowledges them. True when it was written.
fn group_commit(conn: &mut Connection, batch: Vec<Cmd>, marks: &Marks, pending: &mut PerPriority<Option<u64>>) -> bool {
    let now = micros(chrono::Utc::now());
    let mut last = PerPriority::<Option<u64>>::default();
    for cmd in &batch {
        if let Cmd::Commit { priority, offset } = cmd {
            let c = &mut pending[*priority];
            *c = Some(c.map_or(*offset, |c| c.max(*offset)));
        }
    }
    let commits = *pending;
    // Per append, how many of its records went to each partition (their routes decide).
    let mut routed: Vec<PerPriority<u64>> = Vec::new();
    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for cmd in &batch {
            match cmd {
                Cmd::Append { records, .. } => {
                    let mut counts = PerPriority::<u64>::default();
                    for r in records {
                        let priority = route(&tx, &r.key)?.unwrap_or(r.priority);
                        counts[priority] += 1;
                        let sql =
                            format!("INSERT INTO {} (key, payload, appended_at) VALUES (?1, ?2, ?3)", table(priority));
                        tx.prepare_cached(&sql)?.execute(params![r.key, r.payload, now])?;
                        let pos = tx.last_insert_rowid();
                        last[priority] = Some(pos as u64);
                        tx.prepare_cached(
                            "INSERT INTO routes (key, priority, last_pos) VALUES (?1, ?2, ?3)
                             ON CONFLICT(key) DO UPDATE SET last_pos = excluded.last_pos",
                        )?
                        .execute(params![r.key, priority.label(), pos])?;
                    }
                    routed.push(counts);
                }
                Cmd::Commit { .. } | Cmd::Flush { .. } => {}
            }
        }
        let writes = batch.iter().any(|c| matches!(c, Cmd::Append { .. })) || commits.iter().any(Option::is_some);
        if !writes {
            // Nothing to write (a probe after a failure, or a flush): write something real,
            // so a full disk still reads as failing.
            tx.prepare_cached(
                "INSERT INTO offsets (partition, committed) VALUES ('probe', ?1)
                 ON CONFLICT(partition) DO UPDATE SET committed = excluded.committed",
            )?
            .execute([now])?;
        }
        for p in Priority::ALL {
            if let Some(offset) = commits[p] {
                tx.prepare_cached(
                    "INSERT INTO offsets (partition, committed) VALUES (?1, ?2)
                     ON CONFLICT(partition) DO UPDATE SET committed = max(committed, excluded.committed)",
                )?
                .execute(params![p.label(), offset as i64])?;
            }
        }
        tx.commit()
    })();
    if result.is_ok() {
        for p in Priority::ALL {
            if let Some(o) = last[p] {
                marks.appended[p].fetch_max(o, Ordering::SeqCst);
            }
            if let Some(o) = commits[p] {
                marks.committed[p].fetch_max(o, Ordering::SeqCst);
            }
        }
        marks.arrived.notify_one();
        *pending = PerPriority::default();
    }
    let failure = result.as_ref().err().map(|e| format!("the embedded log cannot write: {e}"));
    if let Some(f) = &failure {
        tracing::warn!(error = %f, "group commit failed; appends refused, commits kept for a retry");
    }
    *marks.failure.lock().unwrap_or_else(|p| p.into_inner()) = failure;
    // Every waiting append gets the same answer; the source is shared as its text.
    let outcome = || {
        result.as_ref().map(|_| ()).map_err(|e| {
            let text = e.to_string().into();
            if crate::sqlite::is_transient(e) { LogError::Unavailable(text) } else { LogError::Backend(text) }
        })
    };
    let mut routed = routed.into_iter();
    for cmd in batch {
        match cmd {
            Cmd::Append { ack, .. } => {
                let _ = ack.send(outcome().map(|()| routed.next().unwrap_or_default()));
            }
            Cmd::Flush { ack } => {
                let _ = ack.send(outcome());
            }
            Cmd::Commit { .. } => {}
        }
    }
    result.is_ok()
}

/// The route of `key`, if it has one: where its records still queued are.
fn route(tx: &rusqlite::Transaction<'_>, key: &str) -> rusqlite::Result<Option<Priority>> {
    let label: Option<String> =
        tx.prepare_cached("SELECT priority FROM routes WHERE key = ?1")?.query_row([key], |r| r.get(0)).optional()?;
    Ok(label.as_deref().and_then(Priority::parse))
}

#[async_trait]
impl OrderLog for EmbeddedLog {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn append(&self, records: Vec<Record>) -> Result<PerPriority<u64>, LogError> {
        if records.is_empty() {
            return Ok(PerPriority::default());
        }
        let (ack, done) = oneshot::channel();
        self.cmds.send(Cmd::Append { records, ack }).map_err(|_| LogError::Closed)?;
        done.await.map_err(|_| LogError::Closed)?
    }

    async fn clear(&self) -> Result<Vec<super::LogStart>, LogError> {
        // Everything appended so far counts as consumed: committed durably (truncation
        // then deletes it), and skipped by the consumer from its next poll.
        self.flush().await?;
        for p in Priority::ALL {
            let end = self.marks.appended[p].load(Ordering::SeqCst);
            self.marks.cleared[p].fetch_max(end, Ordering::SeqCst);
            self.cmds.send(Cmd::Commit { priority: p, offset: end }).map_err(|_| LogError::Closed)?;
        }
        self.flush().await?;
        Ok(Vec::new())
    }

    async fn flush(&self) -> Result<(), LogError> {
        let (ack, done) = oneshot::channel();
        self.cmds.send(Cmd::Flush { ack }).map_err(|_| LogError::Closed)?;
        done.await.map_err(|_| LogError::Closed)?
    }

    async fn consumer(&self) -> Result<Box<dyn LogConsumer>, LogError> {
        let mut taken = self.consumer_taken.lock().unwrap_or_else(|p| p.into_inner());
        if *taken {
            return Err(LogError::Backend("the embedded log has a single consumer, already taken".into()));
        }
        *taken = true;
        let conn = open(&self.path).map_err(backend)?;
        let committed = self.marks.committed.map(|c| c.load(Ordering::SeqCst));
        Ok(Box::new(EmbeddedConsumer {
            conn: Arc::new(Mutex::new(conn)),
            cmds: self.cmds.clone(),
            marks: self.marks.clone(),
            position: committed,
            committed,
        }))
    }

    fn depth(&self, p: Priority) -> u64 {
        let appended = self.marks.appended[p].load(Ordering::SeqCst);
        appended.saturating_sub(self.marks.committed[p].load(Ordering::SeqCst))
    }

    fn problem(&self) -> Option<String> {
        self.marks.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct EmbeddedConsumer {
    conn: Arc<Mutex<Connection>>,
    cmds: mpsc::Sender<Cmd>,
    marks: Arc<Marks>,
    /// Last offset handed out by poll.
    position: PerPriority<u64>,
    /// Last offset this consumer committed.
    committed: PerPriority<u64>,
}

impl EmbeddedConsumer {
    /// Moves past what a reset dropped.
    fn skip_cleared(&mut self, p: Priority) {
        let cleared = self.marks.cleared[p].load(Ordering::SeqCst);
        self.position[p] = self.position[p].max(cleared);
        self.committed[p] = self.committed[p].max(cleared);
    }
}

#[async_trait]
impl LogConsumer for EmbeddedConsumer {
    fn waiting(&self, p: Priority) -> u64 {
        let from = self.position[p].max(self.marks.cleared[p].load(Ordering::SeqCst));
        self.marks.appended[p].load(Ordering::SeqCst).saturating_sub(from)
    }

    async fn poll(&mut self, p: Priority, max: usize) -> Result<Vec<Delivery>, LogError> {
        self.skip_cleared(p);
        let conn = self.conn.clone();
        let after = self.position[p];
        let rows = tokio::task::spawn_blocking(move || -> rusqlite::Result<Vec<Delivery>> {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let sql =
                format!("SELECT pos, key, payload, appended_at FROM {} WHERE pos > ?1 ORDER BY pos LIMIT ?2", table(p));
            let mut stmt = conn.prepare_cached(&sql)?;
            stmt.query_map(params![after as i64, max as i64], |r| {
                Ok(Delivery {
                    priority: p,
                    partition: 0,
                    offset: r.get::<_, i64>(0)? as u64,
                    key: r.get(1)?,
                    payload: r.get(2)?,
                    appended_at_us: r.get(3)?,
                })
            })?
            .collect()
        })
        .await
        .map_err(|e| LogError::Backend(e.into()))?
        .map_err(backend)?;
        if let Some(last) = rows.last() {
            self.position[p] = last.offset;
        }
        Ok(rows)
    }

    async fn commit(&mut self, done: &[Delivery]) -> Result<(), LogError> {
        // Not awaited: a commit lost in a crash only means redelivery, which the
        // store's idempotent apply absorbs. It rides on the next group commit.
        for p in Priority::ALL {
            if let Some(offset) = done.iter().filter(|d| d.priority == p).map(|d| d.offset).max() {
                self.committed[p] = self.committed[p].max(offset);
                self.cmds.send(Cmd::Commit { priority: p, offset }).map_err(|_| LogError::Closed)?;
            }
        }
        Ok(())
    }

    fn rewind(&mut self, p: Priority) {
        self.position[p] = self.committed[p];
        self.skip_cleared(p);
    }

    async fn wait(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.marks.arrived.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(p: Priority, key: &str) -> Record {
        Record::new(p, key, key.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn partitions_keep_order_and_redeliver_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        {
            let log = EmbeddedLog::open(&path).unwrap();
            log.append(vec![
                rec(Priority::Normal, "n1"),
                rec(Priority::Vip, "v1"),
                rec(Priority::Normal, "n2"),
                rec(Priority::Normal, "n3"),
            ])
            .await
            .unwrap();
            assert_eq!((log.depth(Priority::Vip), log.depth(Priority::Normal)), (1, 3));
            let mut c = log.consumer().await.unwrap();
            assert!(log.consumer().await.is_err(), "a single consumer");
            assert_eq!(c.waiting(Priority::Vip), 1);
            let got = c.poll(Priority::Normal, 2).await.unwrap();
            assert_eq!(got.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["n1", "n2"]);
            assert_eq!(c.waiting(Priority::Normal), 1);
            c.commit(&got[..1]).await.unwrap();
            // Polled-but-uncommitted work comes back after a rewind...
            c.rewind(Priority::Normal);
            let again = c.poll(Priority::Normal, 10).await.unwrap();
            assert_eq!(again.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["n2", "n3"]);
            log.flush().await.unwrap();
            assert_eq!(log.depth(Priority::Normal), 2);
        }
        // ...and after a restart: at-least-once from the last commit.
        let log = EmbeddedLog::open(&path).unwrap();
        let mut c = log.consumer().await.unwrap();
        let got = c.poll(Priority::Normal, 10).await.unwrap();
        assert_eq!(got.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["n2", "n3"]);
        let vip = c.poll(Priority::Vip, 10).await.unwrap();
        assert_eq!(vip.len(), 1);
    }

    /// An order's records follow its first queued one, whatever priority they ask for,
    /// until nothing of it is left to consume; then the next one goes where it asks.
    #[tokio::test]
    async fn an_order_keeps_its_route_while_anything_of_it_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(&dir.path().join("log.sqlite")).unwrap();
        log.append(vec![rec(Priority::Vip, "a")]).await.unwrap();
        log.append(vec![rec(Priority::Normal, "a"), rec(Priority::Normal, "b")]).await.unwrap();
        assert_eq!((log.depth(Priority::Vip), log.depth(Priority::Normal)), (2, 1), "a's second record went VIP");
        let mut c = log.consumer().await.unwrap();
        let got = c.poll(Priority::Vip, 10).await.unwrap();
        assert_eq!(got.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["a", "a"]);
        c.commit(&got).await.unwrap();
        log.flush().await.unwrap();
        // The route lapses with the periodic truncation of its last record.
        tokio::time::sleep(TRUNCATE_EVERY * 2 + Duration::from_millis(500)).await;
        log.append(vec![rec(Priority::Normal, "a")]).await.unwrap();
        assert_eq!((log.depth(Priority::Vip), log.depth(Priority::Normal)), (0, 2), "a goes NORMAL now");
    }

    #[tokio::test]
    async fn offsets_keep_growing_after_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        let last = {
            let log = EmbeddedLog::open(&path).unwrap();
            log.append(vec![rec(Priority::Vip, "a"), rec(Priority::Vip, "b")]).await.unwrap();
            let mut c = log.consumer().await.unwrap();
            let got = c.poll(Priority::Vip, 10).await.unwrap();
            c.commit(&got).await.unwrap();
            log.flush().await.unwrap();
            // Wait for the periodic truncation to delete the committed records.
            tokio::time::sleep(TRUNCATE_EVERY + Duration::from_millis(500)).await;
            got[1].offset
        };
        let log = EmbeddedLog::open(&path).unwrap();
        log.append(vec![rec(Priority::Vip, "c")]).await.unwrap();
        let mut c = log.consumer().await.unwrap();
        let got = c.poll(Priority::Vip, 10).await.unwrap();
        assert_eq!(got.len(), 1, "the new record is seen, not hidden behind the old commit");
        assert!(got[0].offset > last);
    }
}
