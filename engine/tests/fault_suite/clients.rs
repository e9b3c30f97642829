//! The workload: several clients at once, each with its own seeded stream. API producers
//! create, update, re-tier and cancel orders (some events early, some repeated); a
//! Shopify client delivers signed webhooks (some twice, some late); an operator edits
//! with If-Match; a runs client starts and cancels generated runs; on Kafka, kcat writes
//! records straight to the order topics. Each order belongs to one client, which waits
//! for each answer before it sends that order's next event: that is "the order they
//! were produced in" that the checker holds the engines to.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::common::{TOKEN, distributed};
use crate::journal::{Ack, Change, Edit, Journal, Origin, Sent};
use crate::rng::Rng;

/// How long one request is retried before its outcome counts as unknown: longer than a
/// Cassandra restart.
const GIVE_UP: Duration = Duration::from_secs(150);
const API_PRODUCERS: usize = 3;
const ORDERS_PER_PRODUCER: usize = 80;
const SHOPIFY_ORDERS: usize = 40;
const KCAT_ORDERS: usize = 30;
const TIERS: [&str; 4] = ["DIAMOND", "GOLD", "SILVER", "BRONZE"];
const STATUSES: [&str; 4] = ["CONFIRMED", "PROCESSING", "SHIPPED", "DELIVERED"];

/// The engines' addresses, as the nemesis keeps them (instances leave and join in a
/// scale run); a request goes to any of them.
pub type Bases = Arc<std::sync::RwLock<Vec<String>>>;

#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    bases: Bases,
}

impl Http {
    fn new(bases: Bases) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        Http { client, bases }
    }

    fn url(&self, rng: &mut Rng, path: &str) -> String {
        let bases = self.bases.read().unwrap_or_else(|p| p.into_inner());
        format!("{}{path}", rng.pick(&bases))
    }
}

pub fn spawn_all(
    rng: &mut Rng,
    bases: Bases,
    kafka_prefix: Option<String>,
    journal: &Arc<Journal>,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let http = Http::new(bases);
    let mut tasks = Vec::new();
    for k in 0..API_PRODUCERS {
        tasks.push(tokio::spawn(api_producer(k, rng.fork(), http.clone(), journal.clone(), stop.clone())));
    }
    tasks.push(tokio::spawn(shopify(rng.fork(), http.clone(), journal.clone(), stop.clone())));
    tasks.push(tokio::spawn(operator(rng.fork(), http.clone(), journal.clone(), stop.clone())));
    tasks.push(tokio::spawn(runs(rng.fork(), http.clone(), journal.clone(), stop.clone())));
    if let Some(prefix) = kafka_prefix.filter(|_| distributed()) {
        tasks.push(tokio::spawn(kcat(rng.fork(), prefix, journal.clone(), stop.clone())));
    }
    tasks
}

/// One order as its producer sees it.
struct Open {
    id: String,
    tier: &'static str,
    next: u32,
}

impl Open {
    fn event_id(&mut self) -> String {
        self.next += 1;
        format!("{}-e{}", self.id, self.next)
    }
}

fn event(order_id: &str, event_id: &str, kind: &str, payload: Value) -> Value {
    json!({"event_id": event_id, "order_id": order_id, "kind": kind, "source": "fault-suite",
           "occurred_at": chrono::Utc::now().to_rfc3339(), "payload": payload})
}

fn create(o: &mut Open, rng: &mut Rng) -> (Value, Sent) {
    // Totals away from 150.00..200.00, where the hot-swapped rules decide differently.
    let total = if rng.percent(50) { rng.between(500, 15_000) } else { rng.between(20_000, 90_000) } as i64;
    let customer = format!("{}@example.com", o.id);
    let id = o.event_id();
    let e = event(&o.id, &id, "created", json!({"customer": customer, "tier": o.tier, "total_cents": total}));
    (e, Sent { event_id: id, change: Change::Create { customer, tier: o.tier.into(), total }, ack: Ack::Unknown })
}

fn update(o: &mut Open, note: Option<String>, tier: Option<&'static str>, status: Option<&str>) -> (Value, Sent) {
    let id = o.event_id();
    let mut payload = json!({});
    if let Some(n) = &note {
        payload["note"] = json!(n);
    }
    if let Some(t) = tier {
        payload["tier"] = json!(t);
        o.tier = t;
    }
    if let Some(s) = status {
        payload["status"] = json!(s);
    }
    let change = Change::Update { note, tier: tier.map(String::from), status: status.map(String::from) };
    (event(&o.id, &id, "updated", payload), Sent { event_id: id, change, ack: Ack::Unknown })
}

fn cancel(o: &mut Open) -> (Value, Sent) {
    let id = o.event_id();
    (event(&o.id, &id, "cancelled", json!({})), Sent { event_id: id, change: Change::Cancel, ack: Ack::Unknown })
}

/// Pauses between tries, doubling up to 2 s, until [`GIVE_UP`].
struct Backoff {
    deadline: Instant,
    pause: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { deadline: Instant::now() + GIVE_UP, pause: Duration::from_millis(100) }
    }

    /// Waits before the next try; false once the time is up.
    async fn wait(&mut self) -> bool {
        if Instant::now() > self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(2));
        true
    }
}

/// An answer an outage gives, worth another try.
fn outage(status: u16) -> bool {
    [503, 408, 429].contains(&status)
}

/// POSTs one request until it is acknowledged, retrying what an outage refuses (503,
/// timeouts, a dead engine) with backoff, the way Shopify and good producers do.
async fn post_until_acked(http: &Http, rng: &mut Rng, journal: &Journal, path: &str, body: &Value) -> Ack {
    let mut backoff = Backoff::new();
    loop {
        journal.count("api: POST /orders/events");
        match http.client.post(http.url(rng, path)).bearer_auth(TOKEN).json(body).send().await {
            Ok(r) if r.status() == 202 => return Ack::Acked,
            Ok(r) if outage(r.status().as_u16()) => {}
            Ok(r) => {
                let status = r.status();
                journal.problem(format!("POST {path} answered {status}: {}", r.text().await.unwrap_or_default()));
                return Ack::Unknown;
            }
            Err(_) => {}
        }
        if !backoff.wait().await {
            return Ack::Unknown;
        }
    }
}

/// Sends events of one order in one request and writes down what came of them.
async fn send(http: &Http, rng: &mut Rng, journal: &Journal, order_id: &str, events: Vec<(Value, Sent)>) -> Ack {
    let (bodies, mut sent): (Vec<Value>, Vec<Sent>) = events.into_iter().unzip();
    let body = Value::Array(bodies);
    let ack = post_until_acked(http, rng, journal, "/orders/events", &body).await;
    sent.iter_mut().for_each(|s| s.ack = ack);
    journal.sent(order_id, Origin::Api, sent);
    ack
}

async fn api_producer(k: usize, mut rng: Rng, http: Http, journal: Arc<Journal>, stop: Arc<AtomicBool>) {
    let mut open: Vec<Open> = Vec::new();
    let mut answered: Vec<Value> = Vec::new();
    let mut made = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(rng.millis(20, 150)).await;
        let roll = rng.between(0, 100);
        if made < ORDERS_PER_PRODUCER && (open.len() < 6 || roll < 12) {
            let mut o = Open { id: format!("fs-a{k}-{made}"), tier: TIERS[rng.between(0, 4) as usize], next: 0 };
            made += 1;
            let shape = rng.between(0, 100);
            if shape < 4 {
                // An orphan: an update whose create this client never sends. It is
                // parked, then dead-lettered at the park bound (or released by the
                // checker's create, if that comes first).
                let (e, s) = update(&mut o, Some("orphan".into()), None, None);
                send(&http, &mut rng, &journal, &o.id, vec![(e, s)]).await;
                journal.with(|r| r.orders.get_mut(&o.id).unwrap().orphan = true);
                continue;
            }
            if shape < 14 {
                // Early: an update sent before its create, in its own request. It names
                // no tier, so it fixes the order's route to NORMAL.
                let early = update(&mut o, Some("early".into()), None, None);
                send(&http, &mut rng, &journal, &o.id.clone(), vec![early]).await;
            }
            let mut events = vec![create(&mut o, &mut rng)];
            if (14..30).contains(&shape) {
                // A create and a tier change in one request (the upgrade case).
                let other = *rng.pick(&TIERS);
                events.push(update(&mut o, Some("upgraded".into()), Some(other), None));
            }
            let bodies: Vec<Value> = events.iter().map(|(e, _)| e.clone()).collect();
            if send(&http, &mut rng, &journal, &o.id.clone(), events).await == Ack::Acked {
                answered.push(Value::Array(bodies));
            }
            open.push(o);
        } else if roll < 20 && !answered.is_empty() {
            // A repeated delivery of a request that was already acknowledged.
            let again = rng.pick(&answered).clone();
            journal.count("api: repeated request");
            post_until_acked(&http, &mut rng, &journal, "/orders/events", &again).await;
        } else if !open.is_empty() {
            let i = rng.between(0, open.len() as u64) as usize;
            let o = &mut open[i];
            let kind = rng.between(0, 100);
            let mut events = vec![match kind {
                0..55 => update(o, Some(format!("note {}", o.next + 1)), None, None),
                55..75 => update(o, None, Some(*rng.pick(&TIERS)), None),
                75..95 => update(o, None, None, Some(*rng.pick(&STATUSES))),
                _ => cancel(o),
            }];
            if rng.percent(15) {
                events.push(update(o, Some(format!("note {}", o.next + 1)), Some(*rng.pick(&TIERS)), None));
            }
            let id = o.id.clone();
            let bodies: Vec<Value> = events.iter().map(|(e, _)| e.clone()).collect();
            if send(&http, &mut rng, &journal, &id, events).await == Ack::Acked {
                answered.push(Value::Array(bodies));
            }
        }
    }
}

/// Delivers one Shopify webhook until it is answered 200, as Shopify retries.
async fn deliver(http: &Http, rng: &mut Rng, journal: &Journal, topic: &str, webhook_id: &str, body: &[u8]) -> Ack {
    let mut backoff = Backoff::new();
    loop {
        journal.count("shopify: delivery");
        let sent = http
            .client
            .post(http.url(rng, "/webhooks/shopify"))
            .header("content-type", "application/json")
            .header("x-shopify-topic", topic)
            .header("x-shopify-hmac-sha256", orchestrator::shopify::signature::sign(crate::SECRET, body))
            .header("x-shopify-shop-domain", "fault-suite.myshopify.com")
            .header("x-shopify-api-version", "2025-10")
            .header("x-shopify-webhook-id", webhook_id)
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => {
                let answer: Value = r.json().await.unwrap_or_default();
                if answer["status"] == "accepted" || answer["status"] == "duplicate" {
                    return Ack::Acked;
                }
                journal.problem(format!("webhook {webhook_id} ({topic}) answered 200 {answer}"));
                return Ack::Unknown;
            }
            Ok(r) if outage(r.status().as_u16()) => {}
            Ok(r) => {
                let status = r.status();
                journal
                    .problem(format!("webhook {webhook_id} answered {status}: {}", r.text().await.unwrap_or_default()));
                return Ack::Unknown;
            }
            Err(_) => {}
        }
        if !backoff.wait().await {
            return Ack::Unknown;
        }
    }
}

/// One delivery as Shopify would send it again: same webhook id, same body.
#[derive(Clone)]
struct Delivery {
    webhook_id: String,
    topic: &'static str,
    status: &'static str,
    body: Vec<u8>,
}

/// A Shopify order: its clock (seconds; a later change may share a second, Shopify's
/// resolution), its place in the plan, and what was delivered.
struct ShopifyOrder {
    id: i64,
    at: i64,
    step: usize,
    delivered: Vec<Delivery>,
}

const SHOPIFY_PLAN: [(&str, &str); 4] = [
    ("orders/create", "PENDING"),
    ("orders/paid", "CONFIRMED"),
    ("orders/fulfilled", "SHIPPED"),
    ("orders/cancelled", "CANCELLED"),
];

fn shopify_body(topic: &str, id: i64, at: i64) -> Vec<u8> {
    let mut order = orchestrator::shopify::send::payload(topic, id, None).unwrap();
    let at = chrono::DateTime::from_timestamp(at, 0).unwrap();
    order["updated_at"] = json!(at.to_rfc3339());
    serde_json::to_vec(&order).unwrap()
}

async fn shopify(mut rng: Rng, http: Http, journal: Arc<Journal>, stop: Arc<AtomicBool>) {
    let base_id = 7_000_000_000_000 + rng.between(0, 1_000_000) as i64 * 1_000;
    let mut open: Vec<ShopifyOrder> = Vec::new();
    let mut webhooks = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(rng.millis(50, 250)).await;
        webhooks += 1;
        let webhook_id = format!("fs-{base_id}-{webhooks}");
        let roll = rng.between(0, 100);
        let (i, delivery) = if open.len() < SHOPIFY_ORDERS && (open.len() < 3 || roll < 15) {
            let o = ShopifyOrder { id: base_id + open.len() as i64, at: 1_790_000_000, step: 0, delivered: vec![] };
            let (topic, status) = SHOPIFY_PLAN[0];
            let body = shopify_body(topic, o.id, o.at);
            open.push(o);
            (open.len() - 1, Delivery { webhook_id, topic, status, body })
        } else if open.is_empty() {
            continue;
        } else {
            let i = rng.between(0, open.len() as u64) as usize;
            let o = &mut open[i];
            if roll < 30 && !o.delivered.is_empty() {
                // Shopify delivers the same webhook again: the same id, a duplicate.
                let again = rng.pick(&o.delivered).clone();
                journal.count("shopify: repeated delivery");
                deliver(&http, &mut rng, &journal, again.topic, &again.webhook_id, &again.body).await;
                continue;
            }
            if roll < 40 && o.delivered.len() > 1 {
                // A late delivery: an older state of the order under a new webhook id,
                // which the staleness rule (or the status lattice) must leave unapplied.
                let older = o.delivered[rng.between(0, o.delivered.len() as u64 - 1) as usize].clone();
                (i, Delivery { webhook_id, ..older })
            } else if o.step + 1 < SHOPIFY_PLAN.len() {
                o.step += 1;
                o.at += if rng.percent(30) { 0 } else { rng.between(1, 4) as i64 };
                let (topic, status) = SHOPIFY_PLAN[o.step];
                (i, Delivery { webhook_id, topic, status, body: shopify_body(topic, o.id, o.at) })
            } else {
                continue;
            }
        };
        let d = delivery;
        let ack = deliver(&http, &mut rng, &journal, d.topic, &d.webhook_id, &d.body).await;
        let sent = Sent {
            event_id: format!("shopify:{}", d.webhook_id),
            change: Change::Shopify { topic: d.topic.into(), status: d.status.into() },
            ack,
        };
        journal.sent(&format!("shopify-{}", open[i].id), Origin::Shopify, vec![sent]);
        if ack == Ack::Acked {
            open[i].delivered.push(d);
        }
    }
}

/// An operator editing shipping fees with If-Match, racing the producers' events.
async fn operator(mut rng: Rng, http: Http, journal: Arc<Journal>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(rng.millis(50, 300)).await;
        let orders = journal.created_api_orders();
        if orders.is_empty() {
            continue;
        }
        let id = rng.pick(&orders).clone();
        let Ok(r) = http.client.get(http.url(&mut rng, &format!("/orders/{id}"))).bearer_auth(TOKEN).send().await
        else {
            continue;
        };
        if r.status() != 200 {
            continue;
        }
        let row = r.json::<Value>().await.unwrap_or_default();
        let mut version = row["version"].as_u64().unwrap_or(1);
        // A fee the row does not hold, so that the edit is a change (an edit that changes
        // nothing answers the row as it is, with no new version).
        let mut fee = rng.between(100, 1_000) as i64;
        if row["shipping_fee_cents"] == fee {
            fee += 1;
        }
        for _ in 0..6 {
            journal.count("operator: PATCH");
            let sent = http
                .client
                .patch(http.url(&mut rng, &format!("/orders/{id}")))
                .bearer_auth(TOKEN)
                .header("if-match", format!("\"{version}\""))
                .json(&json!({"shipping_fee_cents": fee}))
                .send()
                .await;
            let r = match sent {
                Ok(r) => r,
                Err(_) => {
                    journal.with(|r| r.edits.push(Edit { order_id: id.clone(), fee, version: None }));
                    break;
                }
            };
            match r.status().as_u16() {
                200 => {
                    let row: Value = r.json().await.unwrap_or_default();
                    let answered = row["version"].as_u64();
                    if answered == Some(version) {
                        journal.problem(format!("PATCH /orders/{id} to fee {fee} changed nothing: {row}"));
                    }
                    journal.with(|r| r.edits.push(Edit { order_id: id.clone(), fee, version: answered }));
                    break;
                }
                409 => {
                    let body: Value = r.json().await.unwrap_or_default();
                    version = body["detail"]["current"]["version"]
                        .as_u64()
                        .or(body["current"]["version"].as_u64())
                        .unwrap_or(version + 1);
                }
                // An outage: the edit was refused as a whole.
                503 => break,
                status => {
                    journal.problem(format!(
                        "PATCH /orders/{id} answered {status}: {}",
                        r.text().await.unwrap_or_default()
                    ));
                    break;
                }
            }
        }
    }
}

/// Starts small generated runs and cancels about half of them.
async fn runs(mut rng: Rng, http: Http, journal: Arc<Journal>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(rng.millis(2_000, 8_000)).await;
        journal.count("runs: start");
        let Ok(r) = http
            .client
            .post(http.url(&mut rng, "/runs"))
            .bearer_auth(TOKEN)
            .json(&json!({"quantity": 200}))
            .send()
            .await
        else {
            continue;
        };
        match r.status().as_u16() {
            201 => {}
            // Another run is active, or the engine is degraded.
            409 | 503 => continue,
            status => {
                journal.problem(format!("POST /runs answered {status}: {}", r.text().await.unwrap_or_default()));
                continue;
            }
        }
        let run: Value = r.json().await.unwrap_or_default();
        let id = run["id"].as_str().unwrap_or_default().to_string();
        journal.with(|r| r.runs.push(id.clone()));
        if rng.percent(50) {
            tokio::time::sleep(rng.millis(500, 4_000)).await;
            journal.count("runs: cancel");
            let _ = http.client.post(http.url(&mut rng, &format!("/runs/{id}/cancel"))).bearer_auth(TOKEN).send().await;
        }
    }
}

/// An outside producer: kcat writes records straight to the order topics, keyed by the
/// order id, on the topic of the order's tier, as the README documents.
async fn kcat(mut rng: Rng, prefix: String, journal: Arc<Journal>, stop: Arc<AtomicBool>) {
    let brokers = crate::common::service("KAFKA_BROKERS").expect("the Kafka pass has KAFKA_BROKERS");
    let mut open: Vec<Open> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(rng.millis(200, 700)).await;
        let (o, events) = if open.len() < KCAT_ORDERS && (open.len() < 3 || rng.percent(30)) {
            let tier = *rng.pick(&TIERS);
            open.push(Open { id: format!("fs-k{}-{}", rng.between(0, 1_000_000), open.len()), tier, next: 0 });
            let o = open.last_mut().unwrap();
            let created = create(o, &mut rng);
            (o, vec![created])
        } else {
            let i = rng.between(0, open.len() as u64) as usize;
            let o = &mut open[i];
            let e = if rng.percent(70) {
                update(o, Some(format!("kcat note {}", o.next + 1)), None, None)
            } else {
                update(o, None, None, Some(*rng.pick(&STATUSES)))
            };
            (o, vec![e])
        };
        let topic = format!("{prefix}.{}", if o.tier == "DIAMOND" { "vip" } else { "normal" });
        let lines: String = events.iter().map(|(e, _)| format!("{}\t{e}\n", o.id)).collect();
        let deadline = Instant::now() + GIVE_UP;
        let ack = loop {
            journal.count("kcat: produce");
            let (b, t, l) = (brokers.clone(), topic.clone(), lines.clone());
            let ok = tokio::task::spawn_blocking(move || produce(&b, &t, &l)).await.unwrap();
            if ok {
                break Ack::Acked;
            }
            if Instant::now() > deadline {
                break Ack::Unknown;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let sent = events.into_iter().map(|(_, mut s)| {
            s.ack = ack;
            s
        });
        journal.sent(&o.id, Origin::Kcat, sent.collect());
    }
}

/// One kcat call: every line is `key<TAB>value`; acks from all in-sync replicas.
fn produce(brokers: &str, topic: &str, lines: &str) -> bool {
    use std::io::Write;
    let child = std::process::Command::new("kcat")
        .args(["-b", brokers, "-P", "-t", topic, "-K", "\t", "-X", "acks=all", "-X", "message.timeout.ms=10000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        panic!("kcat is not installed: the Kafka pass of the fault suite needs it");
    };
    let _ = child.stdin.take().unwrap().write_all(lines.as_bytes());
    child.wait_with_output().is_ok_and(|out| out.status.success())
}
