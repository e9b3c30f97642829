//! The order domain: orders, the events that change them, and the rows' history.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

// The row and its names are wire types the dashboard shares.
pub use orchestrator_types::{ChangedAt, Order, OrderFields, Priority, Status, Tier, minor_digits};

/// One `T` per priority, indexed by [`Priority`] (no casts to array positions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerPriority<T>([T; 2]);

impl<T> PerPriority<T> {
    /// Built from each priority, in scheduling order (VIP first).
    pub fn from_fn(mut f: impl FnMut(Priority) -> T) -> Self {
        Self(Priority::ALL.map(&mut f))
    }

    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> PerPriority<U> {
        PerPriority::from_fn(|p| f(&self[p]))
    }

    /// Each priority's value, VIP first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }
}

impl<T: Copy + std::ops::Add<Output = T>> PerPriority<T> {
    /// Both priorities together.
    pub fn sum(&self) -> T {
        self.0[0] + self.0[1]
    }
}

impl<T> std::ops::Index<Priority> for PerPriority<T> {
    type Output = T;
    fn index(&self, p: Priority) -> &T {
        &self.0[p as usize]
    }
}

impl<T> std::ops::IndexMut<Priority> for PerPriority<T> {
    fn index_mut(&mut self, p: Priority) -> &mut T {
        &mut self.0[p as usize]
    }
}

/// What kind of change an event describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Created,
    Updated,
    Cancelled,
}

/// Financial status as Shopify reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinancialStatus {
    Pending,
    Authorized,
    PartiallyPaid,
    Paid,
    PartiallyRefunded,
    Refunded,
    Voided,
}

/// Fulfillment status as Shopify reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FulfillmentStatus {
    Fulfilled,
    Partial,
    Restocked,
}

/// The changed fields an event carries. Absent fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shopify_order_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// An explicit status. Financial and fulfillment status, when present, are mapped by the rules instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub financial_status: Option<FinancialStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fulfillment_status: Option<FulfillmentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_cents: Option<i64>,
    /// An explicit shipping fee; otherwise the rules derive it from the total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping_fee_cents: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// An incoming change to one order, as producers append it to the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderEvent {
    /// Unique per event; applying the same event id twice changes nothing.
    pub event_id: String,
    pub order_id: String,
    pub kind: EventKind,
    /// Who produced the event: shopify, generator, api, ...
    pub source: String,
    pub occurred_at: DateTime<Utc>,
    #[serde(default)]
    pub payload: OrderChange,
    /// The event's place: when the engine first accepted it. The engine sets it (from
    /// the log) and keeps it when a dead letter is replayed; the API refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<DateTime<Utc>>,
    /// The shop the event came from, as a domain (the Shopify bridge sets it from
    /// `X-Shopify-Shop-Domain`). The order keeps its first event's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shop: Option<String>,
}

/// The format of the records this engine writes and reads on the log (implicit: records
/// carry `format` only from the first change that is not additive).
pub const LOG_FORMAT: u64 = 1;

/// Says which fields a log record had that this engine does not know, once a second at
/// most: a newer engine's additions during a rolling upgrade, or an outside producer's
/// typo.
fn unknown_fields_dropped(fields: &[String]) {
    static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(-1);
    let second = Utc::now().timestamp();
    if LAST.swap(second, std::sync::atomic::Ordering::Relaxed) != second {
        tracing::warn!(?fields, "a log record had fields this engine does not know; applied without them");
    }
}

/// The field names of `OrderEvent` and `OrderChange`, read from their JSON schema once,
/// so a new field is known the moment it is declared.
struct KnownFields {
    event: std::collections::HashSet<String>,
    change: std::collections::HashSet<String>,
}

fn known_fields() -> &'static KnownFields {
    static KNOWN: std::sync::OnceLock<KnownFields> = std::sync::OnceLock::new();
    KNOWN.get_or_init(|| {
        let schema = serde_json::to_value(schemars::schema_for!(OrderEvent)).unwrap_or_default();
        let names =
            |props: &serde_json::Value| props.as_object().map(|p| p.keys().cloned().collect()).unwrap_or_default();
        KnownFields {
            event: names(&schema["properties"]),
            change: names(&schema["$defs"]["OrderChange"]["properties"]),
        }
    })
}

/// Longest accepted identifier (event or order id).
pub const MAX_ID_LEN: usize = 128;
/// Longest order note, in bytes: a row must always fit one changelog record (Kafka's
/// default limit is 1 MB), so no change of an order can become unpublishable.
pub const MAX_NOTE_BYTES: usize = 16 * 1024;
/// Longest customer (an email or a name), in bytes.
pub const MAX_CUSTOMER_BYTES: usize = 320;

/// Checks a note against [`MAX_NOTE_BYTES`].
pub fn check_note(note: &str) -> Result<(), String> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(format!("note must be at most {MAX_NOTE_BYTES} bytes, got {}", note.len()));
    }
    check_text("note", note, &['\n', '\r', '\t'])
}

/// Refuses control characters (NUL and the like) in free text, but for `allowed`:
/// they break terminals, logs and CSV exports downstream.
pub fn check_text(field: &str, text: &str, allowed: &[char]) -> Result<(), String> {
    match text.char_indices().find(|(_, c)| c.is_control() && !allowed.contains(c)) {
        Some((at, c)) => {
            Err(format!("{field} must not hold control characters; found U+{:04X} at byte {at}", c as u32))
        }
        None => Ok(()),
    }
}

/// Cuts a note from outside (Shopify) to [`MAX_NOTE_BYTES`], at a character boundary,
/// without the control characters [`check_note`] refuses.
pub fn truncate_note(mut note: String) -> String {
    if note.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
        note.retain(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t'));
    }
    if note.len() > MAX_NOTE_BYTES {
        let mut end = MAX_NOTE_BYTES;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    note
}

impl OrderEvent {
    /// Checks what serde cannot: identifiers and amounts.
    /// Whether the event says it came from Shopify: by its source, or by an event id in
    /// the space of Shopify's webhook ids. Only the signed webhook path may say so.
    pub fn claims_shopify(&self) -> bool {
        let shopify_shop = self.shop.as_deref().is_some_and(|s| s.to_ascii_lowercase().ends_with(".myshopify.com"));
        self.source.eq_ignore_ascii_case("shopify") || self.event_id.starts_with("shopify:") || shopify_shop
    }

    /// Reads an event off the log. Records only ever gain optional fields (ARCHITECTURE.md,
    /// versioning), so fields that a newer engine wrote and this one does not know are
    /// dropped, and a rolling upgrade goes on. Producers at the API are still held to the
    /// exact schema.
    pub fn from_log(bytes: &[u8]) -> Result<Self, String> {
        Self::from_log_as_written(bytes).map(Self::with_usable_shop)
    }

    /// An outside producer's `shop` (a field this engine once ignored) is lower-cased,
    /// and dropped with a warning when it is still no domain: it labels the order, and
    /// must not send the whole event to the dead letters.
    fn with_usable_shop(mut self) -> Self {
        if let Some(shop) = self.shop.take() {
            let shop = shop.trim().to_ascii_lowercase();
            match check_shop(&shop) {
                Ok(()) => self.shop = Some(shop),
                Err(e) => tracing::warn!(event = %self.event_id, "{e}; the event goes on without it"),
            }
        }
        self
    }

    fn from_log_as_written(bytes: &[u8]) -> Result<Self, String> {
        let strict = match serde_json::from_slice(bytes) {
            Ok(event) => return Ok(event),
            Err(e) => e,
        };
        let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(bytes) else { return Err(strict.to_string()) };
        // A change that is not additive says so with a format number this engine reads.
        if let Some(format) = value.get("format").and_then(|f| f.as_u64()).filter(|f| *f > LOG_FORMAT) {
            return Err(format!(
                "written in format {format}; this engine reads format {LOG_FORMAT}: upgrade it, then replay this"
            ));
        }
        let known = known_fields();
        let Some(event) = value.as_object_mut().filter(|_| !known.change.is_empty()) else {
            return Err(strict.to_string());
        };
        let mut dropped: Vec<String> = event.keys().filter(|k| !known.event.contains(*k)).cloned().collect();
        event.retain(|k, _| known.event.contains(k));
        if let Some(payload) = event.get_mut("payload").and_then(|p| p.as_object_mut()) {
            dropped.extend(payload.keys().filter(|k| !known.change.contains(*k)).map(|k| format!("payload.{k}")));
            payload.retain(|k, _| known.change.contains(k));
        }
        // Nothing unknown (a duplicate key, a bad value): the strict error says what is wrong.
        if dropped.is_empty() {
            return Err(strict.to_string());
        }
        let event: Self = serde_json::from_value(value).map_err(|_| strict.to_string())?;
        unknown_fields_dropped(&dropped);
        Ok(event)
    }

    pub fn validate(&self) -> Result<(), String> {
        check_id("event_id", &self.event_id)?;
        check_id("order_id", &self.order_id)?;
        if self.source.is_empty() || self.source.len() > 64 {
            return Err("source must be 1..=64 characters".into());
        }
        if let Some(shop) = &self.shop {
            check_shop(shop)?;
        }
        if let Some(note) = &self.payload.note {
            check_note(note)?;
        }
        if let Some(customer) = &self.payload.customer {
            check_text("customer", customer, &[])?;
        }
        if let Some(customer) = self.payload.customer.as_ref().filter(|c| c.len() > MAX_CUSTOMER_BYTES) {
            return Err(format!("customer must be at most {MAX_CUSTOMER_BYTES} bytes, got {}", customer.len()));
        }
        if let Some(currency) = &self.payload.currency
            && (currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()))
        {
            return Err(format!("currency must be a 3-letter ISO 4217 code, got {currency:?}"));
        }
        if self.kind == EventKind::Created {
            for (name, present) in [
                ("customer", self.payload.customer.is_some()),
                ("tier", self.payload.tier.is_some()),
                ("total_cents", self.payload.total_cents.is_some()),
            ] {
                if !present {
                    return Err(format!("a created event needs payload.{name}"));
                }
            }
        }
        Ok(())
    }

    /// The log partition: from the tier when the event names one.
    pub fn priority_hint(&self) -> Option<Priority> {
        self.payload.tier.map(Tier::priority)
    }
}

/// A shop is a lower-case domain: 1 to 255 characters of a-z, 0-9, `.` and `-`.
pub fn check_shop(shop: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    if shop.is_empty() || shop.len() > 255 || !shop.chars().all(ok) {
        return Err(format!("shop must be a lower-case domain (a-z, 0-9, '.', '-', at most 255), got {shop:?}"));
    }
    Ok(())
}

pub fn check_id(name: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_ID_LEN {
        return Err(format!("{name} must be 1..={MAX_ID_LEN} characters"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(format!("{name} must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_from_a_newer_engine_is_read_without_the_fields_it_added() {
        let event = serde_json::json!({
            "event_id": "e1", "order_id": "o1", "kind": "updated", "source": "api",
            "occurred_at": "2026-12-01T10:00:00Z", "payload": {"note": "gift", "gift_wrap": true},
            "trace_id": "t-1",
        });
        let bytes = serde_json::to_vec(&event).unwrap();
        assert!(serde_json::from_slice::<OrderEvent>(&bytes).is_err(), "the API's schema stays exact");
        let read = OrderEvent::from_log(&bytes).unwrap();
        assert_eq!((read.event_id.as_str(), read.payload.note.as_deref()), ("e1", Some("gift")));

        // What is wrong besides the new fields is still an error, and says what.
        let bad = serde_json::json!({"event_id": "e1", "order_id": "o1", "kind": "teleported", "source": "api",
            "occurred_at": "2026-12-01T10:00:00Z", "trace_id": "t-1"});
        let err = OrderEvent::from_log(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(err.contains("teleported") || err.contains("trace_id"), "{err}");
        // A duplicate key is not forgiven: nothing unknown was dropped.
        let twice = concat!(
            r#"{"event_id":"e1","event_id":"e2","order_id":"o1","kind":"updated","source":"api","#,
            r#""occurred_at":"2026-12-01T10:00:00Z"}"#
        );
        assert!(OrderEvent::from_log(twice.as_bytes()).unwrap_err().contains("duplicate"));
        // A format this engine does not read is refused with what to do.
        let newer = serde_json::json!({"event_id": "e1", "order_id": "o1", "kind": "updated", "source": "api",
            "occurred_at": "2026-12-01T10:00:00Z", "format": 2});
        let err = OrderEvent::from_log(&serde_json::to_vec(&newer).unwrap()).unwrap_err();
        assert!(err.contains("format 2") && err.contains("upgrade"), "{err}");
    }
}
