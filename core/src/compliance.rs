//! Erasure and export of a customer's personal data, for data subject requests (Shopify's
//! compliance webhooks). Personal here means the order's `customer` (an email address)
//! and its `note` (free text an operator or a shop may fill with anything); the business
//! facts (amounts, statuses, tiers, versions, times) stay.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{Order, OrderEvent};
use crate::engine::Engine;
use crate::failure::DeadLetter;
use crate::ordering::{self, Named};
use crate::store::{Base, ErasureMatch, HistoryEntry, StoreError, Trace, Write, WriteResult};

/// What erasure leaves where the customer was.
pub const REDACTED: &str = "[redacted]";

/// How often an erasure tries an order that keeps changing under it.
const ATTEMPTS: u32 = 10;
/// How many history entries an export holds per order.
const EXPORT_HISTORY: usize = 1000;
/// Orders a shop's erasure reads and deletes per store call.
const SHOP_PAGE: usize = 5_000;
/// Orders one pass over the dead letters and what-if cases erases the copies of: each
/// pass reads every letter (a scan on CQL), and the ids are held meanwhile (about 10 MB).
const SHOP_CHUNK: usize = 100_000;
/// How many dead letters an export reads through, oldest first.
const LETTERS_READ_MAX: usize = 100_000;

/// An event (a dead letter's or a parked event's payload) with its personal fields
/// erased. A payload that is not an event (a raw delivery that never became one) is
/// replaced whole, since it may hold anything.
pub fn redact_payload(payload: &str) -> String {
    match serde_json::from_str::<OrderEvent>(payload) {
        Ok(mut event) => {
            let change = &mut event.payload;
            if change.customer.is_some() {
                change.customer = Some(REDACTED.into());
            }
            if change.note.is_some() {
                change.note = Some(String::new());
            }
            serde_json::to_string(&event).unwrap_or_else(|_| redacted_marker())
        }
        Err(_) if payload.contains(REDACTED) && payload.len() < 64 => payload.to_string(),
        Err(_) => redacted_marker(),
    }
}

/// Whether a stored payload names one of `contact`: an email (ignoring case) standing
/// as a whole word in any of its strings (`bob@x.com` is not in `jimbob@x.com`), or a
/// phone with the same digits (7 or more) as a whole string. A payload that is not
/// JSON is searched as one string, for emails only.
pub fn holds_contact(payload: &str, contact: &[String]) -> bool {
    let emails: Vec<String> =
        contact.iter().filter(|c| c.contains('@')).map(|c| c.trim().to_ascii_lowercase()).collect();
    let phones: Vec<String> =
        contact.iter().filter(|c| !c.contains('@')).map(|c| digits(c)).filter(|d| d.len() >= 7).collect();
    if emails.is_empty() && phones.is_empty() {
        return false;
    }
    let names = |text: &str| {
        let lower = text.to_ascii_lowercase();
        emails.iter().any(|e| holds_word(&lower, e)) || {
            let d = digits(text);
            d.len() >= 7 && phones.contains(&d)
        }
    };
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(value) => any_string(&value, &names),
        Err(_) => emails.iter().any(|e| holds_word(&payload.to_ascii_lowercase(), e)),
    }
}

/// Whether a stored payload is an event of `shop` (an event keeps the shop it came
/// from; a raw delivery names none).
pub fn is_of_shop(payload: &str, shop: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Shop<'a> {
        #[serde(borrow)]
        shop: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Shop<'_>>(payload).is_ok_and(|p| p.shop.as_deref() == Some(shop))
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

fn any_string(value: &serde_json::Value, f: &dyn Fn(&str) -> bool) -> bool {
    match value {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(items) => items.iter().any(|v| any_string(v, f)),
        serde_json::Value::Object(map) => map.values().any(|v| any_string(v, f)),
        _ => false,
    }
}

/// `needle` in `haystack` with no address character glued to either side.
fn holds_word(haystack: &str, needle: &str) -> bool {
    let glued_before = |c: char| c.is_ascii_alphanumeric() || "._%+-".contains(c);
    haystack.match_indices(needle).any(|(at, _)| {
        let before = haystack[..at].chars().next_back();
        let mut after = haystack[at + needle.len()..].chars();
        let next = after.next();
        // A sentence's full stop may follow an address; a longer domain may not.
        let glued_after = match next {
            Some('.') => after.next().is_some_and(|c| c.is_ascii_alphanumeric()),
            Some(c) => c.is_ascii_alphanumeric() || c == '-',
            None => false,
        };
        !before.is_some_and(glued_before) && !glued_after
    })
}

fn redacted_marker() -> String {
    serde_json::json!({ "redacted": REDACTED }).to_string()
}

/// Whose data a request is about: the orders the shop names, and the contact details
/// that may also appear in payloads the store kept whole.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub order_ids: Vec<String>,
    pub needles: Vec<String>,
    /// The shop that asked: another shop's orders are left alone (rows written before
    /// rows recorded their shop have none, and are taken).
    pub shop: Option<String>,
}

impl Subject {
    fn owns(&self, row: &Order) -> bool {
        match (&self.shop, &row.shop) {
            (Some(asking), Some(of_row)) => asking == of_row,
            _ => true,
        }
    }
}

/// What one erasure changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Erasure {
    /// Rows that got a redacted version.
    pub orders_redacted: u64,
    /// Rows already redacted, or never stored.
    pub orders_untouched: u64,
    pub dead_letters: u64,
    pub parked: u64,
    /// What-if cases deleted.
    pub cases: u64,
    /// Rows deleted with their history (a shop's erasure).
    #[serde(default)]
    pub orders_deleted: u64,
}

/// Everything the engine holds about a subject.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Export {
    pub orders: Vec<Order>,
    /// Each order's history, oldest first (at most 1000 entries per order).
    pub history: Vec<HistoryEntry>,
    pub dead_letters: Vec<DeadLetter>,
}

enum Row {
    Redacted,
    Untouched,
}

impl Engine {
    /// Erases the subject's personal data from its rows, each as a new version with a
    /// `redaction` entry in its history. Safe to run again: what is erased stays erased.
    pub async fn erase_rows(&self, request_id: &str, subject: &Subject) -> Result<Erasure, StoreError> {
        let mut report = Erasure::default();
        for id in &subject.order_ids {
            match self.redact_row(request_id, id, subject).await? {
                Row::Redacted => report.orders_redacted += 1,
                Row::Untouched => report.orders_untouched += 1,
            }
        }
        Ok(report)
    }

    /// Erases the copies outside the rows: dead letters of the orders or holding the
    /// contact details, parked events, and what-if cases (deleted).
    pub async fn erase_copies(&self, subject: &Subject) -> Result<Erasure, StoreError> {
        let store = &self.stores.compliance;
        let (ids, needles) = (&subject.order_ids, &subject.needles);
        let which = ErasureMatch { order_ids: ids.iter().cloned().collect(), contact: needles.clone(), shop: None };
        Ok(Erasure {
            dead_letters: store.redact_dead_letters(which.clone(), redact_payload).await?,
            parked: store.redact_parked(ids, redact_payload).await?,
            cases: store.forget_cases(which).await?,
            ..Erasure::default()
        })
    }

    /// Redacts the dead letters and deletes the what-if cases whose event is of `shop`:
    /// those of its orders that never got a row, which no page of its orders names.
    /// One pass over each.
    pub async fn erase_shop_strays(&self, shop: &str) -> Result<Erasure, StoreError> {
        let which = ErasureMatch { shop: Some(shop.to_string()), ..ErasureMatch::default() };
        let store = &self.stores.compliance;
        Ok(Erasure {
            dead_letters: store.redact_dead_letters(which.clone(), redact_payload).await?,
            cases: store.forget_cases(which).await?,
            ..Erasure::default()
        })
    }

    /// Erases one chunk of a shop's orders (`shop/redact`, up to [`SHOP_CHUNK`]): the
    /// copies of their personal data first (dead letters and parked events redacted,
    /// what-if cases deleted), then the rows with their history. Returns what it did
    /// and where the next chunk starts (`None` once the shop has no orders left).
    pub async fn erase_shop_chunk(
        &self,
        shop: &str,
        mut cursor: Option<String>,
    ) -> Result<(Erasure, Option<String>), StoreError> {
        let store = &self.stores.compliance;
        // Every page of the chunk is read before any row goes: a letter whose payload
        // names no shop is found by its order's id, which a deleted row no longer gives.
        let mut ids = Vec::new();
        loop {
            let page = store.shop_orders(shop, SHOP_PAGE, cursor.take()).await?;
            ids.extend(page.items);
            cursor = page.next_cursor;
            if cursor.is_none() || ids.len() >= SHOP_CHUNK {
                break;
            }
        }
        if ids.is_empty() {
            return Ok((Erasure::default(), None));
        }
        let subject = Subject { order_ids: ids, needles: Vec::new(), shop: Some(shop.to_string()) };
        let mut erased = self.erase_copies(&subject).await?;
        // Page by page, so no one transaction holds the store's writer for long.
        for page in subject.order_ids.chunks(SHOP_PAGE) {
            erased.orders_deleted += store.delete_shop_orders(shop, page).await?;
        }
        Ok((erased, cursor))
    }

    /// The store's compliance port: requests and the copies redaction reaches.
    pub fn compliance(&self) -> &dyn crate::store::Compliance {
        self.stores.compliance.as_ref()
    }

    /// One row's redaction, as an edit placed after every change the row holds, so no
    /// earlier-placed event applied later (a replay) brings the data back.
    async fn redact_row(&self, request_id: &str, id: &str, subject: &Subject) -> Result<Row, StoreError> {
        for attempt in 0..ATTEMPTS {
            let Some(current) = self.stores.orders.get(id).await? else { return Ok(Row::Untouched) };
            if !subject.owns(&current) {
                return Ok(Row::Untouched);
            }
            let mut fields = current.fields();
            fields.customer = REDACTED.into();
            fields.note.clear();
            if fields == current.fields() {
                return Ok(Row::Untouched);
            }
            let named = Named { customer: true, note: true, ..Default::default() };
            let mut row = ordering::edited(&current, fields, named, ordering::edit_place(&current));
            row.decided_by = "redaction".into();
            let write = Write::Apply {
                // One id per request and version: a resumed request is a duplicate.
                event_id: format!("redaction:{request_id}:{id}@{}", current.version),
                source: "redaction".into(),
                base: Some(Base::of(&current)),
                row: row.clone(),
                // Names the erased fields, never their values.
                trace: Trace { changes: crate::journey::changes(Some(&current), &row), ..Trace::default() },
            };
            match self.stores.orders.write(vec![write]).await?.pop().map(|(_, r)| r) {
                Some(WriteResult::Done) => {
                    if let Err(e) = self.changes.publish_now(row).await {
                        tracing::warn!(error = %e, order = id, "relaying a redacted row failed");
                    }
                    return Ok(Row::Redacted);
                }
                Some(WriteResult::Conflict(_) | WriteResult::Duplicate) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10 << attempt.min(6))).await;
                }
                Some(WriteResult::IdTaken(_)) | None => {
                    return Err(StoreError::Backend(format!("the store did not record the redaction of {id}").into()));
                }
            }
        }
        Err(StoreError::Backend(
            format!("order {id} kept changing; its redaction gave up after {ATTEMPTS} tries").into(),
        ))
    }

    /// Everything held about the subject: its rows with their history, and the dead
    /// letters of its orders or holding its contact details.
    pub async fn export(&self, subject: &Subject) -> Result<Export, StoreError> {
        let mut export = Export::default();
        for id in &subject.order_ids {
            match self.stores.orders.get(id).await? {
                Some(row) if !subject.owns(&row) => continue,
                Some(row) => export.orders.push(row),
                None => {}
            }
            export.history.extend(self.stores.orders.history(id, EXPORT_HISTORY, None).await?.items);
        }
        let (mut cursor, mut read) = (None, 0);
        loop {
            let page = self.stores.dead_letters.dead_letters(1000, cursor).await?;
            read += page.items.len();
            export.dead_letters.extend(page.items.into_iter().filter(|l| {
                let named = l.order_id.as_ref().is_some_and(|o| subject.order_ids.contains(o));
                named || holds_contact(&l.payload, &subject.needles)
            }));
            match page.next_cursor {
                Some(next) if read < LETTERS_READ_MAX => cursor = Some(next),
                _ => return Ok(export),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_keeps_its_facts_and_loses_its_personal_fields() {
        let event = serde_json::json!({
            "event_id": "e1", "order_id": "o1", "kind": "created", "source": "shopify",
            "occurred_at": "2026-01-01T00:00:00Z",
            "payload": { "customer": "ada@example.com", "note": "call 555-0100", "total_cents": 1200, "tier": "GOLD" }
        });
        let redacted: OrderEvent = serde_json::from_str(&redact_payload(&event.to_string())).unwrap();
        assert_eq!(redacted.payload.customer.as_deref(), Some(REDACTED));
        assert_eq!(redacted.payload.note.as_deref(), Some(""));
        assert_eq!(redacted.payload.total_cents, Some(1200));
        assert_eq!(redacted.order_id, "o1");
    }

    #[test]
    fn contact_details_are_found_whole_and_only_whole() {
        let ada = ["Ada@Example.com".to_string(), "+1 (555) 010-0100".to_string()];
        let found = |payload: &str| holds_contact(payload, &ada);
        assert!(found(r#"{"email": "ada@example.com"}"#), "any case");
        assert!(found(r#"{"note": "ring ada@example.com. thanks"}"#), "inside a sentence");
        assert!(found(r#"{"customer": {"phone": "15550100100"}}"#), "a phone by its digits");
        assert!(found("not json, ada@example.com"), "a raw payload");
        assert!(!found(r#"{"email": "jimbada@example.com"}"#), "another address that ends the same");
        assert!(!found(r#"{"email": "ada@example.com.au"}"#), "another domain");
        assert!(!found(r#"{"total": "5550100100155"}"#), "other digits");
        assert!(!holds_contact(r#"{"email": "ada@example.com"}"#, &["12".to_string()]), "too short to tell");
    }

    /// A shop of more orders than two pages: one pass over the dead letters erases the
    /// copies of them all (one per page made a million-order shop read them 200 times),
    /// and a letter tied to the shop only by its order's id is still found.
    #[tokio::test]
    async fn a_shops_erasure_reads_the_dead_letters_once_per_chunk_not_once_per_page() {
        use crate::store::{Orders, conformance::letter_template, conformance::row, memory::MemoryStore};
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(MemoryStore::default());
        let log = crate::log::embedded::EmbeddedLog::open(&dir.path().join("log.sqlite")).unwrap();
        let engine = Engine::new(
            std::sync::Arc::new(log),
            crate::store::Stores::of(store.clone()),
            crate::plugin::native::rulebook(),
            None,
            crate::engine::EngineConfig::default(),
        );
        let shop = "big.myshopify.com";
        let orders = 2 * SHOP_PAGE + 7;
        let apply = |i: usize| Write::Apply {
            event_id: format!("e{i}"),
            source: "test".into(),
            base: None,
            row: Order { shop: Some(shop.into()), ..row(&format!("o{i:06}"), 1, "") },
            trace: Trace::default(),
        };
        store.write((0..orders).map(apply).collect()).await.unwrap();
        // A rejected later event of the last order, whose payload names no shop.
        let last = format!("o{:06}", orders - 1);
        let letter = DeadLetter {
            order_id: Some(last.clone()),
            payload: format!(r#"{{"event_id":"late-event","order_id":"{last}","customer":"ada@example.com"}}"#),
            ..letter_template("late-event")
        };
        let record = Write::Record {
            event_id: letter.id.clone(),
            source: "test".into(),
            order_id: last.clone(),
            outcome: crate::store::Outcome::Rejected,
            reason: "test".into(),
            decided_by: "test".into(),
            dead_letter: Some(letter),
            trace: Trace::default(),
        };
        store.write(vec![record]).await.unwrap();

        let (mut deleted, mut letters, mut cursor) = (0, 0, None);
        loop {
            let (erased, next) = engine.erase_shop_chunk(shop, cursor).await.unwrap();
            (deleted, letters) = (deleted + erased.orders_deleted, letters + erased.dead_letters);
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(deleted, orders as u64, "every order of the shop is deleted");
        assert_eq!(letters, 1, "the letter found by its order's id is redacted");
        assert_eq!(store.letter_passes(), 1, "one pass over the dead letters for {orders} orders");
        let kept = crate::store::DeadLetters::dead_letter(store.as_ref(), "late-event").await.unwrap().unwrap();
        assert!(!kept.payload.contains("ada@example.com"), "{}", kept.payload);
    }

    #[test]
    fn a_payload_that_is_no_event_is_replaced_whole() {
        let raw = r#"{"id": 7, "email": "ada@example.com", "customer": {"phone": "+1 555 0100"}}"#;
        let redacted = redact_payload(raw);
        assert!(!redacted.contains("ada@example.com") && !redacted.contains("555"), "{redacted}");
        assert_eq!(redact_payload(&redacted), redacted, "redacting twice changes nothing");
    }
}
