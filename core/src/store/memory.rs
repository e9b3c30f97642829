//! A minimal in-memory backend for unit tests: the ports over plain collections
//! behind one mutex. Users cannot select it; it shows what a third backend implements.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    ActionLog, ActionRecord, Audit, Case, CaseRetention, Cases, Claim, Compliance, ComplianceRecord, DeadLetter,
    DeadLetters, ErasureMatch, HistoryEntry, LetterTally, ListQuery, OrderCounts, Orders, Outcome, Page, ParkedEvent,
    Parking, Redact, ReplayClaim, RunKeys, RunRecord, Runs, ShopRecord, Sort, StoreError, StoreStats, WebhookDelivery,
    WebhookLedger, Write, WriteResult, page_by_place,
};
use crate::domain::{Order, Status};

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// Passes over the dead letters that redaction made, for tests that count them.
    letter_passes: AtomicUsize,
}

#[derive(Default)]
struct State {
    orders: BTreeMap<String, Order>,
    /// Oldest first; doubles as the idempotency ledger, like the real backends' history.
    history: Vec<HistoryEntry>,
    /// Event id → the order it was recorded for.
    recorded: HashMap<String, String>,
    letters: Vec<DeadLetter>,
    claims: HashMap<String, Held>,
    deliveries: Vec<WebhookDelivery>,
    shops: HashMap<String, ShopRecord>,
    runs: HashMap<String, RunRecord>,
    /// Oldest first.
    actions: Vec<ActionRecord>,
    /// Keyed like the CQL table: by order, then log position and event id.
    parked: BTreeMap<(String, i64, u64, String), ParkedEvent>,
    compliance: HashMap<String, ComplianceRecord>,
    /// Oldest first; an event id recorded again is kept as first recorded.
    cases: Vec<Case>,
}

/// A webhook claim: until when it counts, when its attempt took it, and whether its
/// event is durable.
#[derive(Clone, Copy)]
struct Held {
    expires: Instant,
    claimed_at: Instant,
    confirmed: bool,
}

impl MemoryStore {
    /// Passes over the dead letters that redaction made so far.
    pub fn letter_passes(&self) -> usize {
        self.letter_passes.load(Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Deletes rows with their history and their events' ledger entries.
    fn forget_orders(&mut self, doomed: &HashSet<String>) {
        self.orders.retain(|id, _| !doomed.contains(id));
        let gone: Vec<String> =
            self.history.iter().filter(|h| doomed.contains(&h.order_id)).map(|h| h.event_id.clone()).collect();
        self.history.retain(|h| !doomed.contains(&h.order_id));
        for event_id in gone {
            self.recorded.remove(&event_id);
        }
    }

    fn entry(&mut self, order_id: &str, version: u64, event_id: &str, source: &str, outcome: Outcome) -> usize {
        self.recorded.insert(event_id.to_string(), order_id.to_string());
        self.history.push(HistoryEntry {
            order_id: order_id.to_string(),
            version,
            event_id: event_id.to_string(),
            source: source.to_string(),
            outcome,
            reason: None,
            decided_by: String::new(),
            recorded_at: Utc::now(),
            trace: None,
        });
        self.history.len() - 1
    }

    fn apply(&mut self, write: &Write) -> WriteResult {
        match self.recorded.get(write.event_id()) {
            Some(order) if order == write.order_id() => return WriteResult::Duplicate,
            Some(order) => return WriteResult::IdTaken(order.clone()),
            None => {}
        }
        match write {
            Write::Apply { event_id, source, base, row, .. } => {
                let current = self.orders.get(&row.id);
                match (base.map(|b| b.version), current) {
                    (None, Some(now)) => return WriteResult::Conflict(Some(Box::new(now.clone()))),
                    (Some(_), None) => return WriteResult::Conflict(None),
                    (Some(v), Some(now)) if now.version != v => {
                        return WriteResult::Conflict(Some(Box::new(now.clone())));
                    }
                    _ => {}
                }
                self.orders.insert(row.id.clone(), row.clone());
                let i = self.entry(&row.id, row.version, event_id, source, Outcome::Applied);
                self.history[i].decided_by = row.decided_by.clone();
            }
            Write::Record { event_id, source, order_id, outcome, reason, decided_by, dead_letter, .. } => {
                let version = self.orders.get(order_id).map_or(0, |o| o.version);
                let i = self.entry(order_id, version, event_id, source, *outcome);
                self.history[i].reason = Some(reason.clone());
                self.history[i].decided_by = decided_by.clone();
                if let Some(letter) = dead_letter
                    && !self.letters.iter().any(|l| l.id == letter.id)
                {
                    self.letters.push(letter.clone());
                }
            }
        }
        let last = self.history.len() - 1;
        self.history[last].trace = Some(write.trace().clone()).filter(|t| !t.is_empty());
        WriteResult::Done
    }
}

#[async_trait]
impl Orders for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, id: &str) -> Result<Option<Order>, StoreError> {
        Ok(self.state().orders.get(id).cloned())
    }

    async fn get_many(&self, ids: Vec<String>) -> Result<HashMap<String, Order>, StoreError> {
        let state = self.state();
        Ok(ids.into_iter().filter_map(|id| state.orders.get(&id).map(|o| (id, o.clone()))).collect())
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<(Write, WriteResult)>, StoreError> {
        let mut state = self.state();
        Ok(writes
            .into_iter()
            .map(|w| {
                let result = state.apply(&w);
                (w, result)
            })
            .collect())
    }

    async fn recorded_for(&self, event_ids: Vec<String>) -> Result<Option<HashMap<String, String>>, StoreError> {
        let state = self.state();
        Ok(Some(event_ids.into_iter().filter_map(|id| state.recorded.get(&id).map(|o| (id, o.clone()))).collect()))
    }

    async fn history(
        &self,
        order_id: &str,
        limit: usize,
        cursor: Option<String>,
    ) -> Result<Page<HistoryEntry>, StoreError> {
        let mine: Vec<HistoryEntry> = self.state().history.iter().filter(|h| h.order_id == order_id).cloned().collect();
        page_by_place(&mine, limit, cursor)
    }

    async fn list(&self, q: ListQuery) -> Result<Page<Order>, StoreError> {
        let state = self.state();
        let mut rows: Vec<Order> = state
            .orders
            .values()
            .filter(|o| q.status.is_none_or(|s| o.status == s) && q.priority.is_none_or(|p| o.priority == p))
            .filter(|o| q.shop.is_none() || o.shop == q.shop)
            .filter(|o| q.found(o))
            .cloned()
            .collect();
        match q.sort {
            Sort::IdAsc => {}
            Sort::IdDesc => rows.reverse(),
            Sort::UpdatedAsc => rows.sort_by(|a, b| (a.updated_at, &a.id).cmp(&(b.updated_at, &b.id))),
            Sort::UpdatedDesc => rows.sort_by(|a, b| (b.updated_at, &b.id).cmp(&(a.updated_at, &a.id))),
        }
        page_by_place(&rows, q.limit, q.cursor)
    }

    async fn counts(&self) -> Result<OrderCounts, StoreError> {
        let state = self.state();
        let groups = state.orders.values().map(|o| (o.status.as_str().into(), o.priority.as_str().into(), 1));
        Ok(OrderCounts::of(groups.collect::<Vec<_>>(), true))
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let state = self.state();
        let count = |n: usize| n as u64;
        Ok(StoreStats {
            orders: count(state.orders.len()),
            history: count(state.history.len()),
            dead_letters: count(state.letters.len()),
            parked: count(state.parked.len()),
        })
    }
}

fn parked_key(e: &ParkedEvent) -> (String, i64, u64, String) {
    (e.order_id.clone(), e.appended_at_us, e.offset, e.event_id.clone())
}

#[async_trait]
impl Parking for MemoryStore {
    async fn park(&self, events: Vec<ParkedEvent>) -> Result<(), StoreError> {
        let mut state = self.state();
        for e in events {
            state.parked.entry(parked_key(&e)).or_insert(e);
        }
        Ok(())
    }

    async fn parked(&self, order_ids: Vec<String>) -> Result<Vec<ParkedEvent>, StoreError> {
        let state = self.state();
        let wanted: HashSet<String> = order_ids.into_iter().collect();
        Ok(state.parked.values().filter(|e| wanted.contains(&e.order_id)).cloned().collect())
    }

    async fn parked_oldest(&self, limit: usize) -> Result<Vec<ParkedEvent>, StoreError> {
        let mut all: Vec<ParkedEvent> = self.state().parked.values().cloned().collect();
        all.sort_by_key(|e| (e.parked_at, e.appended_at_us, e.offset));
        all.truncate(limit);
        Ok(all)
    }

    async fn unpark(&self, events: &[ParkedEvent]) -> Result<(), StoreError> {
        let mut state = self.state();
        for e in events {
            state.parked.remove(&parked_key(e));
        }
        Ok(())
    }
}

#[async_trait]
impl DeadLetters for MemoryStore {
    async fn dead_letters(&self, limit: usize, cursor: Option<String>) -> Result<Page<DeadLetter>, StoreError> {
        page_by_place(&self.state().letters, limit, cursor)
    }

    async fn tally(&self) -> Result<LetterTally, StoreError> {
        let state = self.state();
        let oldest = state.letters.iter().map(|l| l.recorded_at).min();
        Ok(LetterTally { held: state.letters.len() as u64, oldest })
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        Ok(self.state().letters.iter().find(|l| l.id == id).cloned())
    }

    async fn purge_letters(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut state = self.state();
        let gone = state.letters.iter().filter(|l| ids.contains(&l.id)).map(|l| l.id.clone()).collect();
        state.letters.retain(|l| !ids.contains(&l.id));
        Ok(gone)
    }

    async fn claim_replay(&self, id: &str, undo: bool) -> Result<ReplayClaim, StoreError> {
        let mut state = self.state();
        let Some(letter) = state.letters.iter_mut().find(|l| l.id == id) else { return Ok(ReplayClaim::NotFound) };
        Ok(match (undo, letter.replayed_at) {
            (true, _) => {
                letter.replayed_at = None;
                ReplayClaim::Claimed(letter.clone())
            }
            (false, Some(_)) => ReplayClaim::AlreadyReplayed(letter.clone()),
            (false, None) => {
                letter.replayed_at = Some(Utc::now());
                ReplayClaim::Claimed(letter.clone())
            }
        })
    }
}

#[async_trait]
impl WebhookLedger for MemoryStore {
    async fn claim_delivery(&self, keys: &[String], ttl: Duration, lease: Duration) -> Result<Claim, StoreError> {
        let mut state = self.state();
        let now = Instant::now();
        let mut answer = Claim::Claimed;
        for key in keys {
            match state.claims.get(key) {
                Some(c) if c.expires > now && c.confirmed => return Ok(Claim::Done),
                Some(c) if c.expires > now && c.claimed_at + lease > now => answer = Claim::InFlight,
                _ => {}
            }
        }
        if answer == Claim::Claimed {
            for key in keys {
                state.claims.insert(key.clone(), Held { expires: now + ttl, claimed_at: now, confirmed: false });
            }
        }
        Ok(answer)
    }

    async fn confirm_delivery(&self, keys: &[String], ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = self.state();
        for key in keys {
            state.claims.insert(key.clone(), Held { expires: now + ttl, claimed_at: now, confirmed: true });
        }
        Ok(())
    }

    async fn release_delivery(&self, keys: &[String]) -> Result<(), StoreError> {
        let mut state = self.state();
        for key in keys {
            if state.claims.get(key).is_some_and(|c| !c.confirmed) {
                state.claims.remove(key);
            }
        }
        Ok(())
    }

    async fn record_delivery(&self, delivery: WebhookDelivery) -> Result<(), StoreError> {
        self.state().deliveries.push(delivery);
        Ok(())
    }

    async fn deliveries(&self, limit: usize, cursor: Option<String>) -> Result<Page<WebhookDelivery>, StoreError> {
        page_by_place(&self.state().deliveries, limit, cursor)
    }

    async fn prune_deliveries(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = self.state();
        let now = Instant::now();
        let (deliveries, claims) = (state.deliveries.len(), state.claims.len());
        state.deliveries.retain(|d| d.received_at >= before);
        state.claims.retain(|_, c| c.expires > now);
        Ok((deliveries - state.deliveries.len() + claims - state.claims.len()) as u64)
    }

    async fn shop(&self, domain: &str) -> Result<Option<ShopRecord>, StoreError> {
        Ok(self.state().shops.get(domain).cloned())
    }

    async fn set_shop(&self, shop: &ShopRecord) -> Result<(), StoreError> {
        self.state().shops.insert(shop.domain.clone(), shop.clone());
        Ok(())
    }
}

#[async_trait]
impl Runs for MemoryStore {
    async fn audit(&self, run: &RunKeys) -> Result<Audit, StoreError> {
        let state = self.state();
        let mut audit = Audit::default();
        let (from, to) = run.range();
        let within = |id: &str| *from <= *id && *id < *to && id.chars().count() == run.id_chars();
        for o in state.orders.range(from.clone()..to.clone()).filter(|(id, _)| within(id)) {
            audit.orders += 1;
            audit.not_first_version += u64::from(o.1.version != 1);
        }
        for h in state.history.iter().filter(|h| within(&h.order_id)) {
            if h.outcome == Outcome::Applied {
                audit.applied += 1;
                audit.first_applied = Some(audit.first_applied.map_or(h.recorded_at, |t| t.min(h.recorded_at)));
                audit.last_applied = Some(audit.last_applied.map_or(h.recorded_at, |t| t.max(h.recorded_at)));
            } else {
                audit.other += 1;
            }
        }
        Ok(audit)
    }

    async fn delete_orders(&self, run: &RunKeys, status: Status) -> Result<u64, StoreError> {
        let mut state = self.state();
        let (from, to) = run.range();
        let doomed: HashSet<String> = state
            .orders
            .range(from..to)
            .map(|(_, o)| o)
            .filter(|o| o.id.chars().count() == run.id_chars() && o.status == status)
            .map(|o| o.id.clone())
            .collect();
        state.forget_orders(&doomed);
        Ok(doomed.len() as u64)
    }

    async fn reset(&self) -> Result<(), StoreError> {
        let mut state = self.state();
        // Like the real backends: deduplication keys, the webhook audit and the operator
        // audit outlive a reset.
        let (claims, deliveries) = (std::mem::take(&mut state.claims), std::mem::take(&mut state.deliveries));
        let actions = std::mem::take(&mut state.actions);
        *state = State { claims, deliveries, actions, ..State::default() };
        Ok(())
    }

    async fn save_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.state().runs.insert(run.id.clone(), run.clone());
        Ok(())
    }

    async fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        Ok(self.state().runs.get(id).cloned())
    }

    async fn runs(&self, limit: usize, cursor: Option<String>) -> Result<Page<RunRecord>, StoreError> {
        let mut all: Vec<RunRecord> = self.state().runs.values().cloned().collect();
        all.sort_by(|a, b| (b.started_at, &b.id).cmp(&(a.started_at, &a.id)));
        page_by_place(&all, limit, cursor)
    }
}

#[async_trait]
impl ActionLog for MemoryStore {
    async fn record_action(&self, action: ActionRecord) -> Result<(), StoreError> {
        self.state().actions.push(action);
        Ok(())
    }

    async fn actions(&self, limit: usize, cursor: Option<String>) -> Result<Page<ActionRecord>, StoreError> {
        let newest_first: Vec<ActionRecord> = self.state().actions.iter().rev().cloned().collect();
        page_by_place(&newest_first, limit, cursor)
    }
}

#[async_trait]
impl Compliance for MemoryStore {
    async fn redact_dead_letters(&self, which: ErasureMatch, redact: Redact) -> Result<u64, StoreError> {
        self.letter_passes.fetch_add(1, Ordering::Relaxed);
        let mut changed = 0;
        for letter in self.state().letters.iter_mut() {
            if which.takes(letter.order_id.as_deref(), &letter.payload) {
                let redacted = redact(&letter.payload);
                changed += u64::from(redacted != letter.payload);
                letter.payload = redacted;
            }
        }
        Ok(changed)
    }

    async fn redact_parked(&self, order_ids: &[String], redact: Redact) -> Result<u64, StoreError> {
        let mut changed = 0;
        for e in self.state().parked.values_mut().filter(|e| order_ids.contains(&e.order_id)) {
            let redacted = redact(&e.payload);
            changed += u64::from(redacted != e.payload);
            e.payload = redacted;
        }
        Ok(changed)
    }

    async fn forget_cases(&self, which: ErasureMatch) -> Result<u64, StoreError> {
        let mut state = self.state();
        let was = state.cases.len();
        state.cases.retain(|c| !which.takes_case(&c.event));
        Ok((was - state.cases.len()) as u64)
    }

    async fn shop_orders(&self, shop: &str, limit: usize, cursor: Option<String>) -> Result<Page<String>, StoreError> {
        // By id, past the last page's: the ids of rows deleted meanwhile are skipped.
        let after = cursor.unwrap_or_default();
        let limit = limit.clamp(1, 10_000);
        let state = self.state();
        let mine = state.orders.range::<String, _>((std::ops::Bound::Excluded(&after), std::ops::Bound::Unbounded));
        let items: Vec<String> =
            mine.filter(|(_, o)| o.shop.as_deref() == Some(shop)).map(|(id, _)| id.clone()).take(limit).collect();
        let next_cursor = (items.len() == limit).then(|| items.last().cloned()).flatten();
        Ok(Page { items, next_cursor })
    }

    async fn delete_shop_orders(&self, shop: &str, ids: &[String]) -> Result<u64, StoreError> {
        let mut state = self.state();
        let doomed: HashSet<String> = ids
            .iter()
            .filter(|id| state.orders.get(*id).is_some_and(|o| o.shop.as_deref() == Some(shop)))
            .cloned()
            .collect();
        state.forget_orders(&doomed);
        Ok(doomed.len() as u64)
    }

    async fn save_request(&self, request: &ComplianceRecord) -> Result<(), StoreError> {
        self.state().compliance.insert(request.id.clone(), request.clone());
        Ok(())
    }

    async fn request(&self, id: &str) -> Result<Option<ComplianceRecord>, StoreError> {
        Ok(self.state().compliance.get(id).cloned())
    }

    async fn requests(&self, limit: usize) -> Result<Vec<ComplianceRecord>, StoreError> {
        let mut all: Vec<ComplianceRecord> = self.state().compliance.values().cloned().collect();
        all.sort_by(|a, b| b.received_at.cmp(&a.received_at).then_with(|| b.id.cmp(&a.id)));
        all.truncate(limit);
        Ok(all)
    }
}

#[async_trait]
impl Cases for MemoryStore {
    async fn record_cases(&self, cases: Vec<Case>, _keep_for: Duration) -> Result<(), StoreError> {
        let mut state = self.state();
        for case in cases {
            if !state.cases.iter().any(|c| c.event.event_id == case.event.event_id) {
                state.cases.push(case);
            }
        }
        state.cases.sort_by_key(|c| c.recorded_at);
        Ok(())
    }

    async fn cases_since(&self, since: DateTime<Utc>, limit: usize) -> Result<Vec<Case>, StoreError> {
        let mut found: Vec<Case> = self.state().cases.iter().filter(|c| c.recorded_at >= since).cloned().collect();
        found.sort_by_key(|c| c.recorded_at);
        found.truncate(limit);
        Ok(found)
    }

    async fn prune_cases(&self, retention: CaseRetention) -> Result<u64, StoreError> {
        let before = Utc::now() - retention.keep_for;
        let mut state = self.state();
        let was = state.cases.len();
        state.cases.retain(|c| c.recorded_at >= before);
        let over = state.cases.len().saturating_sub(retention.max_cases as usize);
        state.cases.drain(..over);
        Ok((was - state.cases.len()) as u64)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_store_conforms() {
        super::super::conformance::check(&super::MemoryStore::default(), "mem").await;
    }
}
