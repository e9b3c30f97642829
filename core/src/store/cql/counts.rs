//! Orders by status and priority on CQL, kept in counters (schema 013): what the
//! dashboard shows above the table, without counting 100M rows. Each applied write
//! moves its row's count (a new row adds one), and a deleted row takes its count back.
//! Counters are approximate: an increment is not idempotent, so a write retried after
//! an unknown outcome counts twice, and a lost update is not made up. A reset zeroes
//! them. Rows written before the counters existed are counted once per keyspace, by the
//! one instance that claims it (a claim no crash can repeat, so a backfill cut short
//! leaves the figures short rather than doubled).

use scylla::statement::prepared::PreparedStatement;

use super::{CqlStore, backend};
use crate::domain::Order;
use crate::store::{Base, OrderCounts, StoreError};

/// The data migration that counts the rows written before the counters existed, and
/// its claim.
const BACKFILL: &str = "013_order_counts_backfill";
const CLAIM: &str = "013_order_counts_backfill_claimed";

/// Partitions the counters spread over (by a hash of the order id), so that updates are
/// not all on one partition; a read sums them.
const BUCKETS: i32 = 16;

pub(super) struct CountStatements {
    bump: PreparedStatement,
    read: PreparedStatement,
}

impl CountStatements {
    pub(super) async fn prepare(session: &scylla::client::session::Session, ks: &str) -> Result<Self, StoreError> {
        let prepare = |cql: String| async move {
            let mut p = session.prepare(cql).await.map_err(backend)?;
            p.set_consistency(scylla::statement::Consistency::Quorum);
            Ok::<_, StoreError>(p)
        };
        Ok(CountStatements {
            bump: prepare(format!(
                "UPDATE {ks}.order_counts SET n = n + ? WHERE bucket = ? AND status = ? AND priority = ?"
            ))
            .await?,
            read: prepare(format!("SELECT status, priority, n FROM {ks}.order_counts WHERE bucket = ?")).await?,
        })
    }
}

impl CqlStore {
    /// Moves the row's count to its status and priority from the base's (a new row only
    /// adds). A failure is logged and left: the figures are approximate.
    pub(super) async fn recount(&self, row: &Order, base: Option<&Base>) {
        let now = (row.status, row.priority);
        let was = base.map(|b| (b.status, b.priority));
        if was == Some(now) {
            return;
        }
        self.bump(&row.id, now.0.as_str(), now.1.as_str(), 1).await;
        if let Some((status, priority)) = was {
            self.bump(&row.id, status.as_str(), priority.as_str(), -1).await;
        }
    }

    /// Takes a deleted row's count back.
    pub(super) async fn uncount(&self, row: &Order) {
        self.bump(&row.id, row.status.as_str(), row.priority.as_str(), -1).await;
    }

    async fn bump(&self, id: &str, status: &str, priority: &str, by: i64) {
        let bucket = (super::shops::stable_hash(id) % BUCKETS as u32) as i32;
        let bump = (scylla::value::Counter(by), bucket, status, priority);
        let bumped = self.session.execute_unpaged(&self.counts.bump, bump).await;
        if let Err(e) = bumped {
            tracing::warn!(error = %e, order_id = id, "an order count was not updated; the counts drift by one");
        }
    }

    /// Counts the rows written before schema 013, once per keyspace: at once when there
    /// are none (a new keyspace), else in the background, by the instance that claims it
    /// (rows written during it may count twice).
    pub(super) async fn backfill_counts_once(&self) -> Result<(), StoreError> {
        if self.migrated(BACKFILL).await? {
            return Ok(());
        }
        let claim =
            format!("INSERT INTO {}.data_migrations (name, done_at) VALUES (?, ?) IF NOT EXISTS", self.keyspace);
        let now = crate::sqlite::micros(chrono::Utc::now());
        if self.lwt(self.session.query_unpaged(claim, (CLAIM, now))).await? != Some(true) {
            // Another instance (or an earlier start) has it: never twice.
            return Ok(());
        }
        let any = format!("SELECT id FROM {}.orders LIMIT 1", self.keyspace);
        let rows = self.session.query_unpaged(any, ()).await.map_err(backend)?;
        if rows.into_rows_result().map_err(backend)?.rows_num() == 0 {
            return self.mark_migrated(BACKFILL).await;
        }
        let store = self.clone();
        tokio::spawn(async move {
            match store.backfill_counts().await {
                Ok(counted) => tracing::info!(counted, "the order counts are complete"),
                Err(e) => {
                    tracing::error!(error = %e, "counting the stored orders failed; it runs again at the next start")
                }
            }
        });
        Ok(())
    }

    async fn backfill_counts(&self) -> Result<u64, StoreError> {
        let cql = format!("SELECT DISTINCT {} FROM {}.orders", super::STATICS, self.keyspace);
        let rows = self.scan::<super::StaticRow>(cql).await?;
        let mut chunks = std::pin::pin!(futures::StreamExt::chunks(rows, 256));
        let mut counted = 0u64;
        while let Some(chunk) = futures::StreamExt::next(&mut chunks).await {
            let mut orders = Vec::new();
            for row in chunk {
                orders.extend(super::order_from(row.map_err(backend)?)?);
            }
            let bumps: Vec<_> = orders.iter().map(|o| Box::pin(self.recount(o, None))).collect();
            let bumps = futures::StreamExt::buffer_unordered(futures::stream::iter(bumps), super::CONCURRENCY);
            futures::StreamExt::collect::<Vec<()>>(bumps).await;
            counted += orders.len() as u64;
        }
        self.mark_migrated(BACKFILL).await?;
        Ok(counted)
    }

    /// The counters, summed over their buckets.
    pub(super) async fn counted(&self) -> Result<OrderCounts, StoreError> {
        let mut groups = Vec::new();
        for bucket in 0..BUCKETS {
            let rows = self.session.execute_unpaged(&self.counts.read, (bucket,)).await.map_err(backend)?;
            let rows = rows.into_rows_result().map_err(backend)?;
            for row in rows.rows::<(String, String, Option<scylla::value::Counter>)>().map_err(backend)? {
                let (status, priority, n) = row.map_err(backend)?;
                groups.push((status, priority, n.map_or(0, |n| n.0)));
            }
        }
        // Summed per status and priority first, so a negative bucket offsets the others.
        let mut sums = std::collections::BTreeMap::<(String, String), i64>::new();
        for (status, priority, n) in groups {
            *sums.entry((status, priority)).or_default() += n;
        }
        Ok(OrderCounts::of(sums.into_iter().map(|((s, p), n)| (s, p, n)), false))
    }
}
