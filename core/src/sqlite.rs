//! SQLite plumbing shared by the embedded log and store: connection setup and a
//! small pool of read connections.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rusqlite::Connection;

/// Opens a connection in WAL mode with full fsync on commit, so that a commit
/// that returned is durable: the log acknowledges appends only after it, and the
/// store must never be less durable than the log offsets committed after it.
/// `secure_delete` zeroes what a delete or update frees inside a page, so erased
/// personal data does not linger in the file (at no extra I/O in FAST mode).
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = OFF;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -65536;
         PRAGMA secure_delete = FAST;",
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Sets the smaller page cache of a connection that writes. While a database file is
/// under 1 GiB, SQLite ends nearly every write transaction by walking its whole page
/// cache: a B-tree rebalance parks a page at the lock page's number, past the end of
/// the file, and the commit then drops everything past the end with a full scan of the
/// cache's hash table. With 64 MiB of cache that scan was a fifth of a small commit's
/// time (BENCHMARKS.md, webhooks, session 33).
pub fn writer_cache(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("PRAGMA cache_size = -16384;")
}

/// Whether a SQLite error may pass by waiting (busy, locked, an I/O failure, a full
/// disk, no memory, a file it could not open), as opposed to a bad statement or row.
pub fn is_transient(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | OutOfMemory | CannotOpen)
    )
}

/// Read connections handed out round-robin. WAL lets them read while a writer commits.
pub struct ReadPool {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl ReadPool {
    pub fn open(path: &Path, size: usize) -> rusqlite::Result<Self> {
        let conns = (0..size.max(1))
            .map(|_| {
                let c = open(path)?;
                c.execute_batch("PRAGMA query_only = ON;")?;
                Ok(Mutex::new(c))
            })
            .collect::<rusqlite::Result<_>>()?;
        Ok(Self { conns, next: AtomicUsize::new(0) })
    }

    /// Runs `f` on a free connection, or hands it back if every one is busy.
    pub fn try_with<T, F: FnOnce(&Connection) -> T>(&self, f: F) -> Result<T, F> {
        match self.conns.iter().find_map(|c| c.try_lock().ok()) {
            Some(conn) => Ok(f(&conn)),
            None => Err(f),
        }
    }

    /// Runs `f` on a free connection, or waits for the next one in turn.
    pub fn with<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        self.try_with(f).unwrap_or_else(|f| {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
            let conn = self.conns[i].lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
    }
}

/// Microseconds since the Unix epoch, the unit every timestamp column uses.
pub fn micros(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_micros()
}

pub fn from_micros(us: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(us).unwrap_or_default()
}
