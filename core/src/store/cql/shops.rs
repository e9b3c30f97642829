//! The orders of each shop on CQL, from the `shop_orders` table (schema 012): what a
//! shop's erasure (`shop/redact`) reads instead of scanning every order.

use futures::StreamExt;
use scylla::statement::prepared::PreparedStatement;

use super::{CONCURRENCY, CqlStore, backend};
use crate::domain::Order;
use crate::store::{Base, Page, StoreError};

/// Partitions per shop, by a hash of the order id.
const BUCKETS: i32 = 32;
/// Tries to delete a row that keeps changing under the erasure.
const PURGE_ATTEMPTS: u32 = 3;

pub(super) struct ShopStatements {
    put: PreparedStatement,
    page: PreparedStatement,
    drop: PreparedStatement,
}

impl ShopStatements {
    pub(super) async fn prepare(session: &scylla::client::session::Session, ks: &str) -> Result<Self, StoreError> {
        let prepare = |cql: String| async move {
            let mut p = session.prepare(cql).await.map_err(backend)?;
            p.set_consistency(scylla::statement::Consistency::Quorum);
            Ok::<_, StoreError>(p)
        };
        Ok(ShopStatements {
            put: prepare(format!("INSERT INTO {ks}.shop_orders (shop, bucket, id) VALUES (?, ?, ?)")).await?,
            page: prepare(format!("SELECT id FROM {ks}.shop_orders WHERE shop = ? AND bucket = ? AND id > ? LIMIT ?"))
                .await?,
            drop: prepare(format!("DELETE FROM {ks}.shop_orders WHERE shop = ? AND bucket = ? AND id = ?")).await?,
        })
    }
}

/// A stable hash (FNV-1a), so every instance and version puts an order in one bucket.
pub(super) fn stable_hash(id: &str) -> u32 {
    id.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

fn bucket_of(id: &str) -> i32 {
    (stable_hash(id) % BUCKETS as u32) as i32
}

impl CqlStore {
    /// Lists the row under its shop once it records one: on its first write, or on the
    /// write that gave an older row its shop.
    pub(super) async fn note_shop_order(&self, row: &Order, base: Option<&Base>) -> Result<(), StoreError> {
        let Some(shop) = row.shop.as_deref() else { return Ok(()) };
        if base.is_some_and(|b| b.has_shop) {
            return Ok(());
        }
        let entry = (shop, bucket_of(&row.id), &row.id);
        self.session.execute_unpaged(&self.shops.put, entry).await.map_err(backend)?;
        Ok(())
    }

    /// A page of the shop's order ids, bucket by bucket; the cursor names the bucket
    /// and the last id read in it.
    pub(super) async fn shop_page(
        &self,
        shop: &str,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<Page<String>, StoreError> {
        // Rows written before schema 012 join the index in the background at open; an
        // erasure that read it before then would miss them.
        if !self.shops_backfilled().await? {
            return Err(StoreError::Unavailable("the shops' order index is still being backfilled".into()));
        }
        let limit = limit.clamp(1, 10_000);
        let (mut bucket, mut after) = match cursor {
            Some(c) => match crate::store::decode_cursor(&c)? {
                (Some(b), id) if (0..i64::from(BUCKETS)).contains(&b) => (b as i32, id),
                _ => return Err(StoreError::Cursor("not a cursor of a shop's orders".into())),
            },
            None => (0, String::new()),
        };
        let mut items: Vec<String> = Vec::new();
        while bucket < BUCKETS {
            let wanted = (limit - items.len()) as i32;
            let rows = self
                .session
                .execute_unpaged(&self.shops.page, (shop, bucket, &after, wanted))
                .await
                .map_err(backend)?
                .into_rows_result()
                .map_err(backend)?;
            let ids: Vec<String> = rows
                .rows::<(String,)>()
                .map_err(backend)?
                .map(|r| r.map(|(id,)| id))
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            let full = ids.len() as i32 == wanted;
            items.extend(ids);
            if items.len() == limit {
                let last = items.last().cloned().unwrap_or_default();
                // A bucket just filled may hold more; one that came up short is done.
                let (b, id) = if full { (bucket, last) } else { (bucket + 1, String::new()) };
                let next = (b < BUCKETS).then(|| crate::store::encode_cursor(Some(i64::from(b)), &id));
                return Ok(Page { items, next_cursor: next });
            }
            bucket += 1;
            after.clear();
        }
        Ok(Page { items, next_cursor: None })
    }

    /// Deletes each row of `ids` that records `shop` (read at SERIAL, deleted only if
    /// still at that version, a few tries), with its history, listing entry and shop
    /// entry. The entry goes once its row is gone, and comes back if an event wrote the
    /// row again meanwhile, so a row of the shop never lacks its entry.
    pub(super) async fn delete_of_shop(&self, shop: &str, ids: &[String]) -> Result<u64, StoreError> {
        let key = |id: &str| (shop.to_string(), bucket_of(id), id.to_string());
        let of_shop = |row: &Option<Order>| row.as_ref().is_some_and(|r| r.shop.as_deref() == Some(shop));
        let one = |id: String| async move {
            for _ in 0..PURGE_ATTEMPTS {
                let gone = match self.get_with(&id, true).await? {
                    Some(row) if row.shop.as_deref() == Some(shop) => {
                        if !self.purge(&row).await? {
                            continue;
                        }
                        true
                    }
                    // A row of another shop: its entry here is stale (a shop never changes).
                    Some(_) | None => false,
                };
                self.session.execute_unpaged(&self.shops.drop, key(&id)).await.map_err(backend)?;
                if of_shop(&self.get_with(&id, true).await?) {
                    self.session.execute_unpaged(&self.shops.put, key(&id)).await.map_err(backend)?;
                }
                return Ok::<_, StoreError>(gone);
            }
            Err(StoreError::Unavailable(format!("order {id} kept changing while its shop was erased").into()))
        };
        let deletes: Vec<_> = ids.iter().map(|id| Box::pin(one(id.clone()))).collect();
        let done: Vec<_> = futures::stream::iter(deletes).buffer_unordered(CONCURRENCY).collect().await;
        let mut deleted = 0;
        for gone in done {
            deleted += u64::from(gone?);
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_keeps_its_bucket() {
        // Pinned: a changed hash would strand every entry written before it.
        assert_eq!(bucket_of("shopify-1"), 31);
        let spread: std::collections::HashSet<i32> = (0..1000).map(|i| bucket_of(&format!("o-{i}"))).collect();
        assert_eq!(spread.len(), BUCKETS as usize, "a thousand ids reach every bucket");
    }
}
