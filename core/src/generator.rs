//! Synthetic orders: realistic customers, totals and tiers for load runs and benchmarks.

use chrono::Utc;
use rand::Rng;

use crate::domain::{EventKind, FinancialStatus, OrderChange, OrderEvent, Tier};

/// Share of each tier, in percent: BRONZE, SILVER, GOLD, DIAMOND.
#[derive(Debug, Clone, Copy)]
pub struct TierMix(pub [u32; 4]);

impl Default for TierMix {
    /// 50% BRONZE, 30% SILVER, 15% GOLD, 5% DIAMOND.
    fn default() -> Self {
        Self([50, 30, 15, 5])
    }
}

impl TierMix {
    pub fn pick(&self, rng: &mut impl Rng) -> Tier {
        let total: u32 = self.0.iter().sum::<u32>().max(1);
        let mut roll = rng.random_range(0..total);
        for (share, tier) in self.0.iter().zip([Tier::Bronze, Tier::Silver, Tier::Gold, Tier::Diamond]) {
            if roll < *share {
                return tier;
            }
            roll -= share;
        }
        Tier::Bronze
    }
}

const FIRST: &[&str] =
    &["ada", "grace", "alan", "linus", "barbara", "ken", "margaret", "dennis", "edsger", "frances", "john", "radia"];
const LAST: &[&str] = &[
    "lovelace", "hopper", "turing", "torvalds", "liskov", "thompson", "hamilton", "ritchie", "dijkstra", "allen",
    "backus", "perlman",
];

/// A `created` event for order `{prefix}-{i}`.
pub fn created(prefix: &str, i: u64, source: &str, mix: &TierMix, rng: &mut impl Rng) -> OrderEvent {
    let tier = mix.pick(rng);
    let mut event = order(format!("{prefix}-{i}"), tier, rng);
    event.source = source.into();
    event
}

/// A realistic new order: a customer, a basket total, and (as in most shops) mostly paid.
pub fn order(order_id: String, tier: Tier, rng: &mut impl Rng) -> OrderEvent {
    let customer = format!(
        "{}.{}{}@example.com",
        FIRST[rng.random_range(0..FIRST.len())],
        LAST[rng.random_range(0..LAST.len())],
        rng.random_range(1..1000)
    );
    // Most baskets are small; a few are large. Minor units throughout.
    let total_cents = match rng.random_range(0..100) {
        0..60 => rng.random_range(500..10_000),
        60..95 => rng.random_range(10_000..50_000),
        _ => rng.random_range(50_000..500_000),
    };
    let financial_status = match rng.random_range(0..100) {
        0..85 => FinancialStatus::Paid,
        85..95 => FinancialStatus::Pending,
        _ => FinancialStatus::Authorized,
    };
    OrderEvent {
        event_id: format!("{order_id}-created"),
        order_id,
        kind: EventKind::Created,
        source: "generator".into(),
        occurred_at: Utc::now(),
        accepted_at: None,
        shop: None,
        payload: OrderChange {
            customer: Some(customer),
            tier: Some(tier),
            total_cents: Some(total_cents),
            currency: Some("USD".into()),
            financial_status: Some(financial_status),
            ..Default::default()
        },
    }
}
