//! What the clients were told: every event they sent and whether it was acknowledged,
//! every edit, run and fault. The checker judges the engines against this record only.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// Where an order's events came from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Origin {
    Api,
    Kcat,
    Shopify,
}

/// What one event asks for, as the model replays it.
#[derive(Debug, Clone, Serialize)]
pub enum Change {
    Create {
        customer: String,
        tier: String,
        total: i64,
    },
    Update {
        note: Option<String>,
        tier: Option<String>,
        status: Option<String>,
    },
    Cancel,
    /// A Shopify delivery: the status its topic maps to.
    Shopify {
        topic: String,
        status: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Ack {
    /// 202 (or Shopify's 200, or kcat's exit 0): the event must take effect exactly once.
    Acked,
    /// No answer in the end (timeouts, the engine gone): it may take effect, at most once.
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    pub event_id: String,
    pub change: Change,
    pub ack: Ack,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrderLog {
    pub origin: Origin,
    /// In the order sent; each was answered before the next was sent.
    pub events: Vec<Sent>,
    /// The client never sends this order's create (the checker does, at the end).
    pub orphan: bool,
}

/// An operator's If-Match edit of the shipping fee.
#[derive(Debug, Clone, Serialize)]
pub struct Edit {
    pub order_id: String,
    pub fee: i64,
    /// The version the engine answered; None when the answer never came.
    pub version: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Record {
    pub orders: BTreeMap<String, OrderLog>,
    pub edits: Vec<Edit>,
    pub runs: Vec<String>,
    /// Seconds since the start, and what the nemesis did.
    pub faults: Vec<(f64, String)>,
    /// Answers that are wrong on their own (a valid request refused, say).
    pub problems: Vec<String>,
    /// Requests by kind, retries and repeated deliveries included.
    pub requests: BTreeMap<String, u64>,
}

pub struct Journal {
    started: Instant,
    record: Mutex<Record>,
}

impl Journal {
    pub fn new() -> Self {
        Journal { started: Instant::now(), record: Mutex::default() }
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Record) -> R) -> R {
        f(&mut self.record.lock().unwrap())
    }

    pub fn sent(&self, order_id: &str, origin: Origin, events: Vec<Sent>) {
        self.with(|r| {
            let log =
                r.orders.entry(order_id.to_string()).or_insert(OrderLog { origin, events: vec![], orphan: false });
            log.events.extend(events);
        })
    }

    pub fn count(&self, what: &str) {
        self.with(|r| *r.requests.entry(what.to_string()).or_default() += 1)
    }

    pub fn problem(&self, what: String) {
        eprintln!("fault suite: {what}");
        self.with(|r| r.problems.push(what))
    }

    pub fn fault(&self, what: String) {
        let at = self.started.elapsed().as_secs_f64();
        eprintln!("fault suite: {at:7.1} s  {what}");
        self.with(|r| r.faults.push((at, what)))
    }

    /// API orders whose create was acknowledged: the ones an operator can edit.
    pub fn created_api_orders(&self) -> Vec<String> {
        self.with(|r| {
            r.orders
                .iter()
                .filter(|(_, log)| log.origin == Origin::Api)
                .filter(|(_, log)| {
                    log.events.iter().any(|s| matches!(s.change, Change::Create { .. }) && s.ack == Ack::Acked)
                })
                .map(|(id, _)| id.clone())
                .collect()
        })
    }

    /// Keeps the record beside the build, for a look after a failed run.
    pub fn save(&self, seed: u64) {
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fault-suite-{seed}.json"));
        let json = self.with(|r| serde_json::to_vec_pretty(r).unwrap());
        match std::fs::write(&path, json) {
            Ok(()) => eprintln!("fault suite: the clients' record is in {}", path.display()),
            Err(e) => eprintln!("fault suite: could not keep the record in {}: {e}", path.display()),
        }
    }
}
