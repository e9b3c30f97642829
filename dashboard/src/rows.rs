//! The loaded orders, compact: of each row only what the table shows, in fixed-size
//! chunks whose texts share one buffer (ids without the prefix the chunk's ids share),
//! found by id through an index of `u32`s. A million rows take about a fifth of the
//! memory that full `Order`s took.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use orchestrator_types::{Order, Priority, Status, Tier};

/// Rows per chunk. A chunk is allocated at its full size once, so growing the table
/// never copies all its rows (a doubling `Vec` briefly holds both copies).
const CHUNK: usize = 1024;

/// One row as the table keeps it: 48 bytes, plus its id and customer in the chunk's text.
struct Slim {
    total_cents: i64,
    fee_cents: i64,
    updated_us: i64,
    version: u64,
    /// Where the id, then the customer, start in the chunk's text.
    text_at: u32,
    /// The id's length in the text; the top bit says the chunk's prefix comes first.
    id_len: u16,
    customer_len: u16,
    decided_by: u16,
    currency: u16,
    tier: u8,
    priority: u8,
    status: u8,
}

/// Marks an id kept without its chunk's prefix.
const PREFIXED: u16 = 1 << 15;

struct Chunk {
    rows: Vec<Slim>,
    text: String,
    /// What ids here start with, kept once: the first id without its trailing digits
    /// (`<run>-normal-`, `shopify-`), which neighbouring orders share.
    prefix: Box<str>,
}

impl Chunk {
    fn new(first_id: &str) -> Chunk {
        let prefix = first_id.trim_end_matches(|c: char| c.is_ascii_digit());
        Chunk { rows: Vec::with_capacity(CHUNK), text: String::new(), prefix: prefix.into() }
    }
}

/// A small set of repeated strings (currencies, rule versions) kept once each.
#[derive(Default)]
struct Names {
    all: Vec<Box<str>>,
    codes: HashMap<Box<str>, u16>,
}

impl Names {
    /// Shown for a name past the `u16` codes: no table ever meets 65k rule versions.
    const OVERFLOW: &'static str = "…";

    fn code(&mut self, name: &str) -> u16 {
        if let Some(&c) = self.codes.get(name) {
            return c;
        }
        let Ok(c) = u16::try_from(self.all.len()) else { return u16::MAX };
        self.all.push(name.into());
        self.codes.insert(name.into(), c);
        c
    }

    fn name(&self, code: u16) -> &str {
        self.all.get(usize::from(code)).map_or(Self::OVERFLOW, |n| n)
    }
}

/// Rows in the order they were added.
#[derive(Default)]
pub struct Rows {
    chunks: Vec<Chunk>,
    len: usize,
    names: Names,
}

/// One row, read in place.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    slim: &'a Slim,
    chunk: &'a Chunk,
    names: &'a Names,
}

/// An order id as a row keeps it: its chunk's prefix (or nothing), then the rest.
#[derive(Clone, Copy)]
pub struct Id<'a> {
    head: &'a str,
    tail: &'a str,
}

impl Id<'_> {
    pub fn is(&self, id: &str) -> bool {
        id.len() == self.head.len() + self.tail.len() && id.starts_with(self.head) && id.ends_with(self.tail)
    }

    fn hash(&self) -> usize {
        hash([self.head, self.tail])
    }
}

impl std::fmt::Display for Id<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.head)?;
        f.write_str(self.tail)
    }
}

impl<'a> Row<'a> {
    fn id_len(&self) -> usize {
        usize::from(self.slim.id_len & !PREFIXED)
    }

    pub fn id(&self) -> Id<'a> {
        let at = self.slim.text_at as usize;
        let head = if self.slim.id_len & PREFIXED != 0 { &*self.chunk.prefix } else { "" };
        Id { head, tail: &self.chunk.text[at..at + self.id_len()] }
    }

    pub fn customer(&self) -> &'a str {
        let at = self.slim.text_at as usize + self.id_len();
        &self.chunk.text[at..at + usize::from(self.slim.customer_len)]
    }

    pub fn tier(&self) -> Tier {
        Tier::ALL[usize::from(self.slim.tier)]
    }

    pub fn priority(&self) -> Priority {
        Priority::ALL[usize::from(self.slim.priority)]
    }

    pub fn status(&self) -> Status {
        Status::ALL[usize::from(self.slim.status)]
    }

    pub fn total_cents(&self) -> i64 {
        self.slim.total_cents
    }

    pub fn fee_cents(&self) -> i64 {
        self.slim.fee_cents
    }

    pub fn currency(&self) -> &'a str {
        self.names.name(self.slim.currency)
    }

    pub fn version(&self) -> u64 {
        self.slim.version
    }

    pub fn updated_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.slim.updated_us).unwrap_or_default()
    }

    pub fn decided_by(&self) -> &'a str {
        self.names.name(self.slim.decided_by)
    }
}

/// The enum's place in its `ALL`, which `Row` reads back.
fn place<T: PartialEq, const N: usize>(all: [T; N], value: T) -> u8 {
    all.iter().position(|v| *v == value).unwrap_or(0) as u8
}

/// At most 32 KiB, cut at a character: a length then fits in 15 bits. The engine bounds
/// ids and customers far below that; the cut keeps a malformed row from breaking others.
fn bounded(s: &str) -> &str {
    &s[..s.floor_char_boundary(usize::from(!PREFIXED))]
}

impl Rows {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, n: usize) -> Option<Row<'_>> {
        let chunk = self.chunks.get(n / CHUNK)?;
        let slim = chunk.rows.get(n % CHUNK)?;
        Some(Row { slim, chunk, names: &self.names })
    }

    /// Adds a row at the end; its place.
    pub fn push(&mut self, o: &Order) -> usize {
        if self.chunks.last().is_none_or(|c| c.rows.len() == CHUNK) {
            // A full chunk's text takes no more room than it holds.
            if let Some(full) = self.chunks.last_mut() {
                full.text.shrink_to_fit();
            }
            self.chunks.push(Chunk::new(&o.id));
        }
        let slim = self.slim(o);
        let chunk = self.chunks.last_mut().expect("a chunk with room was just ensured");
        let slim = append_text(chunk, slim, o);
        chunk.rows.push(slim);
        self.len += 1;
        self.len - 1
    }

    /// Puts `o` in place of row `n`; the texts are written again only if they changed.
    pub fn replace(&mut self, n: usize, o: &Order) {
        let slim = self.slim(o);
        let Some(chunk) = self.chunks.get_mut(n / CHUNK) else { return };
        let Some(old) = chunk.rows.get(n % CHUNK) else { return };
        // The id is the same (rows are found by it); the customer rarely changes.
        let at = old.text_at as usize + usize::from(old.id_len & !PREFIXED);
        let slim = if chunk.text[at..at + usize::from(old.customer_len)] == *bounded(&o.customer) {
            Slim { text_at: old.text_at, id_len: old.id_len, customer_len: old.customer_len, ..slim }
        } else {
            append_text(chunk, slim, o)
        };
        chunk.rows[n % CHUNK] = slim;
    }

    /// A row's fields, but not its texts (see `append_text`).
    fn slim(&mut self, o: &Order) -> Slim {
        Slim {
            total_cents: o.total_cents,
            fee_cents: o.shipping_fee_cents,
            updated_us: o.updated_at.timestamp_micros(),
            version: o.version,
            text_at: 0,
            id_len: 0,
            customer_len: 0,
            decided_by: self.names.code(&o.decided_by),
            currency: self.names.code(&o.currency),
            tier: place(Tier::ALL, o.tier),
            priority: place(Priority::ALL, o.priority),
            status: place(Status::ALL, o.status),
        }
    }
}

fn append_text(chunk: &mut Chunk, slim: Slim, o: &Order) -> Slim {
    let (id, customer) = (bounded(&o.id), bounded(&o.customer));
    let (id, prefixed) = match id.strip_prefix(&*chunk.prefix) {
        Some(rest) if !chunk.prefix.is_empty() => (rest, PREFIXED),
        _ => (id, 0),
    };
    let text_at = chunk.text.len() as u32;
    chunk.text.push_str(id);
    chunk.text.push_str(customer);
    Slim { text_at, id_len: id.len() as u16 | prefixed, customer_len: customer.len() as u16, ..slim }
}

/// Ids to row codes (`u32`, never 0), by open addressing: a slot holds a code, and a
/// probe compares the id of the row it names. About 8 bytes per row, where a map of
/// `String`s took over 60.
#[derive(Default)]
pub struct IdIndex {
    slots: Vec<u32>,
    len: usize,
}

impl IdIndex {
    /// The code of the row whose id is `id`; `id_of` reads a code's id.
    pub fn find<'a>(&self, id: &str, id_of: impl Fn(u32) -> Option<Id<'a>>) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = hash([id, ""]) & mask;
        loop {
            match self.slots[i] {
                0 => return None,
                code if id_of(code).is_some_and(|held| held.is(id)) => return Some(code),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Adds an id that is not in the index yet.
    pub fn insert<'a>(&mut self, id: &str, code: u32, id_of: impl Fn(u32) -> Option<Id<'a>>) {
        debug_assert_ne!(code, 0, "0 marks an empty slot");
        // At most 5/8 full, so probes stay short.
        if (self.len + 1) * 8 > self.slots.len() * 5 {
            let grown = vec![0; (self.slots.len() * 2).max(1024)];
            let old = std::mem::replace(&mut self.slots, grown);
            for c in old.into_iter().filter(|&c| c != 0) {
                place_code(&mut self.slots, id_of(c).map_or(0, |held| held.hash()), c);
            }
        }
        place_code(&mut self.slots, hash([id, ""]), code);
        self.len += 1;
    }
}

fn place_code(slots: &mut [u32], hash: usize, code: u32) {
    let mask = slots.len() - 1;
    let mut i = hash & mask;
    while slots[i] != 0 {
        i = (i + 1) & mask;
    }
    slots[i] = code;
}

/// FNV-1a over the parts in turn (as over their concatenation), then a multiply that
/// spreads it into the high bits the mask keeps too.
fn hash(parts: [&str; 2]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, customer: &str, version: u64) -> Order {
        serde_json::from_value(serde_json::json!({
            "id": id, "customer": customer, "tier": "GOLD", "priority": "NORMAL",
            "status": "CONFIRMED", "total_cents": 1234, "shipping_fee_cents": 5,
            "currency": "EUR", "version": version, "created_at": "2026-01-01T00:00:00.000001Z",
            "updated_at": "2026-01-02T03:04:05.000006Z", "decided_by": "order-rules@v2",
        }))
        .unwrap()
    }

    #[test]
    fn a_row_reads_back_what_it_was_given_and_a_replacement_keeps_its_neighbours() {
        let mut rows = Rows::default();
        for n in 0..3 * CHUNK {
            assert_eq!(rows.push(&order(&format!("o-{n}"), &format!("c{n}@x"), 1)), n);
        }
        let r = rows.get(CHUNK + 7).unwrap();
        assert_eq!((r.id().to_string(), r.customer()), ("o-1031".to_string(), "c1031@x"));
        assert!(r.id().is("o-1031") && !r.id().is("o-103") && !r.id().is("o-10311"));
        assert_eq!((r.currency(), r.decided_by()), ("EUR", "order-rules@v2"));
        assert_eq!((r.tier(), r.priority(), r.status()), (Tier::Gold, Priority::Normal, Status::Confirmed));
        assert_eq!((r.total_cents(), r.fee_cents(), r.version()), (1234, 5, 1));
        assert_eq!(r.updated_at().to_rfc3339(), "2026-01-02T03:04:05.000006+00:00");
        rows.replace(CHUNK + 7, &order("o-1031", "a much longer customer name", 2));
        let r = rows.get(CHUNK + 7).unwrap();
        assert_eq!(
            (r.id().to_string(), r.customer(), r.version()),
            ("o-1031".into(), "a much longer customer name", 2)
        );
        let next = rows.get(CHUNK + 8).unwrap();
        assert_eq!((next.id().to_string(), next.customer()), ("o-1032".into(), "c1032@x"));
        assert!(rows.get(3 * CHUNK).is_none());
        // An id without the chunk's prefix is kept whole, and read back the same.
        let n = rows.push(&order("shopify-42", "s@x", 1));
        assert_eq!(rows.get(n).unwrap().id().to_string(), "shopify-42");
        assert_eq!(rows.get(n - 1).unwrap().id().to_string(), format!("o-{}", 3 * CHUNK - 1));
    }

    #[test]
    fn the_index_finds_every_id_across_its_growth_and_nothing_else() {
        // Ids with and without the chunks' prefixes, as a table holds them.
        let mut rows = Rows::default();
        let mut index = IdIndex::default();
        let ids: Vec<String> =
            (0..5000).map(|n| if n % 7 == 0 { format!("x{n}-a") } else { format!("run-1-normal-{n}") }).collect();
        for id in &ids {
            assert_eq!(index.find(id, |code| rows.get(code as usize - 1).map(|r| r.id())), None);
            let code = rows.push(&order(id, "c", 1)) as u32 + 1;
            index.insert(id, code, |code| rows.get(code as usize - 1).map(|r| r.id()));
        }
        let id_of = |code: u32| rows.get(code as usize - 1).map(|r| r.id());
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(index.find(id, id_of), Some(n as u32 + 1), "{id}");
        }
        assert_eq!(index.find("run-1-normal-5000", id_of), None);
        assert_eq!(index.find("run-1-normal-", id_of), None);
    }
}
