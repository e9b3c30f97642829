//! The packed batch path: a batch of rule inputs and its decisions as one byte buffer
//! each, behind the optional `packed` export of the `order-rules-packed` world.
//!
//! Crossing the component boundary with typed records costs a guest `realloc` call per
//! string, and per-field lifting and lowering on the host; one buffer each way costs
//! one call and one copy (the guest still makes its own `String`s from it). The typed
//! `decide-batch` stays the contract every plugin implements, and the engine uses this
//! path only when a component exports it. Plugins built with this SDK do, without any
//! code of their own: [`crate::export_order_rules!`] wires it to the same rules.
//!
//! The layout, little-endian throughout:
//! - a buffer starts with [`LAYOUT`], the layout's version; a reader refuses any other,
//!   so a plugin built with an older SDK fails cleanly (and the engine decides its
//!   batches the typed way) rather than misreading;
//! - a batch is a `u32` count, then that many items;
//! - a string is a `u32` byte length, then UTF-8;
//! - an option is a `u8` (0 none, 1 some), then the value when some;
//! - an enum is a `u8`, its case's position in the WIT;
//! - a record is its fields in WIT order;
//! - a decision is a `u8` (0 upsert, 1 skip, 2 reject), then the fields or the reason.

use crate::{
    Decision, EventKind, FinancialStatus, FulfillmentStatus, Order, OrderChange, OrderEvent, OrderFields, RuleInput,
    Status, Tier,
};

/// The version of this layout, the first byte of every buffer. Any change to the
/// layout takes a new one.
pub const LAYOUT: u8 = 1;

/// Why a buffer could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedError {
    /// Where in the buffer reading stopped.
    pub at: usize,
    pub reason: &'static str,
}

impl std::fmt::Display for PackedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed packed buffer at byte {}: {}", self.at, self.reason)
    }
}

impl std::error::Error for PackedError {}

/// Reads values in the packed layout from a buffer.
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Whether strings are checked to be UTF-8 (always, but for the host's buffers).
    check_utf8: bool,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0, check_utf8: true }
    }

    /// A reader for a buffer the engine wrote, which takes its strings as they are.
    ///
    /// # Safety
    /// Every string in `bytes` must be UTF-8. The engine writes them from Rust strings;
    /// checking them again cost about a tenth of a batched decision.
    unsafe fn from_host(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0, check_utf8: false }
    }

    fn fail<T>(&self, reason: &'static str) -> Result<T, PackedError> {
        Err(PackedError { at: self.at, reason })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PackedError> {
        match self.bytes.get(self.at..).and_then(|rest| rest.get(..n)) {
            Some(slice) => {
                self.at += n;
                Ok(slice)
            }
            None => self.fail("the buffer ends early"),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PackedError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A buffer's start: checks the layout's version and reads the batch's item count,
    /// bounded by what the rest of the buffer can hold (each item takes at least
    /// `min_item` bytes), so a bad count cannot allocate much.
    pub fn header(&mut self, min_item: usize) -> Result<usize, PackedError> {
        if self.take(1)?[0] != LAYOUT {
            return self.fail("another version of the packed layout");
        }
        let n = u32::from_le_bytes(self.array()?) as usize;
        if n > (self.bytes.len() - self.at) / min_item.max(1) {
            return self.fail("the count is larger than the buffer");
        }
        Ok(n)
    }

    /// Fails unless every byte was read.
    pub fn finish(self) -> Result<(), PackedError> {
        if self.at == self.bytes.len() { Ok(()) } else { self.fail("bytes left after the last item") }
    }
}

/// A value in the packed layout.
pub trait Packed: Sized {
    fn put(&self, out: &mut Vec<u8>);
    fn get(r: &mut Reader<'_>) -> Result<Self, PackedError>;
}

/// Starts a buffer: the layout's version and the batch's item count.
pub fn put_header(n: usize, out: &mut Vec<u8>) {
    out.push(LAYOUT);
    put_count(n, out);
}

/// Writes a batch's item count.
pub fn put_count(n: usize, out: &mut Vec<u8>) {
    (n as u32).put(out);
}

/// Writes a string (borrowed, for writers that do not hold a `String`).
pub fn put_str(s: &str, out: &mut Vec<u8>) {
    put_count(s.len(), out);
    out.extend_from_slice(s.as_bytes());
}

/// Writes an optional string.
pub fn put_opt_str(s: Option<&str>, out: &mut Vec<u8>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(s, out);
        }
    }
}

macro_rules! packed_int {
    ($($t:ty),*) => {$(
        impl Packed for $t {
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(r: &mut Reader<'_>) -> Result<Self, PackedError> {
                Ok(<$t>::from_le_bytes(r.array()?))
            }
        }
    )*};
}
packed_int!(u32, u64, i64);

impl Packed for String {
    fn put(&self, out: &mut Vec<u8>) {
        put_str(self, out);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, PackedError> {
        let len = u32::get(r)? as usize;
        let bytes = r.take(len)?;
        if !r.check_utf8 {
            // SAFETY: the reader was made by `from_host`, whose caller vouches for it.
            return Ok(unsafe { String::from_utf8_unchecked(bytes.to_vec()) });
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => r.fail("a string is not UTF-8"),
        }
    }
}

impl<T: Packed> Packed for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.put(out);
            }
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, PackedError> {
        match r.take(1)?[0] {
            0 => Ok(None),
            1 => T::get(r).map(Some),
            _ => r.fail("an option tag is neither 0 nor 1"),
        }
    }
}

/// An enum as its case's position; the cases are listed in WIT order.
macro_rules! packed_enum {
    ($t:ident: $($case:ident),+) => {
        impl Packed for $t {
            fn put(&self, out: &mut Vec<u8>) {
                out.push(*self as u8);
            }
            fn get(r: &mut Reader<'_>) -> Result<Self, PackedError> {
                const CASES: &[$t] = &[$($t::$case),+];
                match CASES.get(usize::from(r.take(1)?[0])) {
                    Some(case) => Ok(*case),
                    None => r.fail(concat!("not a case of ", stringify!($t))),
                }
            }
        }
    };
}
packed_enum!(Tier: Bronze, Silver, Gold, Diamond);
packed_enum!(Status: Pending, Confirmed, Processing, Shipped, Delivered, Cancelled);
packed_enum!(EventKind: Created, Updated, Cancelled);
packed_enum!(
    FinancialStatus: Pending,
    Authorized,
    PartiallyPaid,
    Paid,
    PartiallyRefunded,
    Refunded,
    Voided
);
packed_enum!(FulfillmentStatus: Fulfilled, Partial, Restocked);

/// A record as its fields in WIT order.
macro_rules! packed_record {
    ($t:ident { $($field:ident),+ }) => {
        impl Packed for $t {
            fn put(&self, out: &mut Vec<u8>) {
                $(self.$field.put(out);)+
            }
            fn get(r: &mut Reader<'_>) -> Result<Self, PackedError> {
                Ok($t { $($field: Packed::get(r)?),+ })
            }
        }
    };
}
packed_record!(OrderFields {
    shopify_order_id,
    customer,
    tier,
    status,
    total_cents,
    shipping_fee_cents,
    currency,
    note
});
packed_record!(Order { id, fields, version, created_at_ms, updated_at_ms, source_updated_at_ms });
packed_record!(OrderChange {
    shopify_order_id,
    customer,
    tier,
    status,
    financial_status,
    fulfillment_status,
    total_cents,
    shipping_fee_cents,
    currency,
    note
});
packed_record!(OrderEvent { event_id, order_id, kind, source, occurred_at_ms, payload });
packed_record!(RuleInput { event, current });

impl Packed for Decision {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Decision::Upsert(fields) => {
                out.push(0);
                fields.put(out);
            }
            Decision::Skip(reason) => {
                out.push(1);
                reason.put(out);
            }
            Decision::Reject(reason) => {
                out.push(2);
                reason.put(out);
            }
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, PackedError> {
        match r.take(1)?[0] {
            0 => OrderFields::get(r).map(Decision::Upsert),
            1 => String::get(r).map(Decision::Skip),
            2 => String::get(r).map(Decision::Reject),
            _ => r.fail("not a decision case"),
        }
    }
}

/// The fewest bytes an input takes (an event of empty strings, no change, no row).
const MIN_INPUT: usize = 4 + 4 + 1 + 4 + 8 + 10 + 1;
/// The fewest bytes a decision takes (a skip with no reason).
const MIN_DECISION: usize = 1 + 4;

fn encode<T: Packed>(items: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + items.len() * 128);
    put_header(items.len(), &mut out);
    for item in items {
        item.put(&mut out);
    }
    out
}

fn decode<T: Packed>(bytes: &[u8], min_item: usize) -> Result<Vec<T>, PackedError> {
    decode_from(Reader::new(bytes), min_item)
}

fn decode_from<T: Packed>(mut r: Reader<'_>, min_item: usize) -> Result<Vec<T>, PackedError> {
    let n = r.header(min_item)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        items.push(T::get(&mut r)?);
    }
    r.finish()?;
    Ok(items)
}

pub fn encode_inputs(inputs: &[RuleInput]) -> Vec<u8> {
    encode(inputs)
}

pub fn decode_inputs(bytes: &[u8]) -> Result<Vec<RuleInput>, PackedError> {
    decode(bytes, MIN_INPUT)
}

pub fn encode_decisions(decisions: &[Decision]) -> Vec<u8> {
    encode(decisions)
}

pub fn decode_decisions(bytes: &[u8]) -> Result<Vec<Decision>, PackedError> {
    decode(bytes, MIN_DECISION)
}

/// The guest side of `decide-packed`: decodes the batch, decides it with `R`, and
/// encodes the decisions. A buffer the host did not write well is a bug there; the
/// panic fails the call, and the engine then decides the batch through the typed path.
///
/// # Safety
/// `inputs` comes from the engine (through the export), so its strings are UTF-8.
#[doc(hidden)]
pub unsafe fn serve<R: crate::OrderRules>(inputs: &[u8]) -> Vec<u8> {
    // SAFETY: passed on from the caller.
    match decode_from(unsafe { Reader::from_host(inputs) }, MIN_INPUT) {
        Ok(inputs) => encode_decisions(&R::decide_batch(inputs)),
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{created, empty_change, order, updated};

    fn inputs() -> Vec<RuleInput> {
        let mut change = empty_change();
        change.financial_status = Some(FinancialStatus::Voided);
        change.fulfillment_status = Some(FulfillmentStatus::Restocked);
        change.note = Some("gift wrap, ünïcode".into());
        change.shipping_fee_cents = Some(-1);
        let mut row = order(u64::MAX, Status::Delivered);
        row.fields.tier = Tier::Diamond;
        row.source_updated_at_ms = Some(-5);
        row.fields.shopify_order_id = Some(i64::MIN);
        vec![
            RuleInput { event: created("a@example.com", Tier::Gold, 12_345), current: None },
            RuleInput { event: updated(change), current: Some(row) },
        ]
    }

    #[test]
    fn inputs_and_decisions_round_trip() {
        let inputs = inputs();
        assert_eq!(decode_inputs(&encode_inputs(&inputs)).unwrap(), inputs);
        let decisions = vec![
            Decision::Upsert(inputs[1].current.clone().unwrap().fields),
            Decision::Skip(String::new()),
            Decision::Reject("negative total".into()),
        ];
        assert_eq!(decode_decisions(&encode_decisions(&decisions)).unwrap(), decisions);
        assert_eq!(decode_inputs(&encode_inputs(&[])).unwrap(), vec![]);
    }

    #[test]
    fn every_truncation_and_bad_tag_is_an_error() {
        let bytes = encode_inputs(&inputs());
        for end in 0..bytes.len() {
            assert!(decode_inputs(&bytes[..end]).is_err(), "a buffer cut at {end} was read");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(decode_inputs(&extra).unwrap_err().reason, "bytes left after the last item");
        // The first input's kind follows its two strings.
        let kind_at = 1 + 4 + 4 + "e-1".len() + 4 + "o-1".len();
        let mut bad = bytes.clone();
        bad[kind_at] = 3;
        assert_eq!(
            decode_inputs(&bad).unwrap_err(),
            PackedError { at: kind_at + 1, reason: "not a case of EventKind" }
        );
        let mut huge = vec![LAYOUT];
        huge.extend(u32::MAX.to_le_bytes());
        assert_eq!(decode_decisions(&huge).unwrap_err().reason, "the count is larger than the buffer");
        let mut newer = bytes.clone();
        newer[0] = LAYOUT + 1;
        assert_eq!(
            decode_inputs(&newer).unwrap_err(),
            PackedError { at: 1, reason: "another version of the packed layout" }
        );
        let mut not_utf8 = encode_decisions(&[Decision::Skip("ab".into())]);
        *not_utf8.last_mut().unwrap() = 0xff;
        assert_eq!(decode_decisions(&not_utf8).unwrap_err().reason, "a string is not UTF-8");
    }
}
