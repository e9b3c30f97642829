//! `webhook send --load`: distinct orders/create deliveries at an offered rate, over at
//! most 256 keep-alive connections (like Shopify's), with time-to-200 percentiles.
//! Bodies are patched from one template and requests are written and read as plain
//! HTTP/1.1, so the sender takes little of the cores it shares with the engine it
//! measures (with a general HTTP client it took about a third of them).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{answer_text, headers, payload};
use crate::config::WebhookSendArgs;
use crate::shopify::signature::sign;

/// Connections at most: past them, the offered rate slips, as it does for Shopify.
const CONNECTIONS: u64 = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From the request's first byte to the answer's last: past it, the delivery failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an answer read: its head, and its body.
const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 1 << 20;
/// Delivery `i` is the order `FIRST_ORDER + i`. Ids up to `LAST_ORDER` have as many
/// digits, so they are written over the template's in place.
const FIRST_ORDER: i64 = 1_000_000_000;
const LAST_ORDER: i64 = 9_999_999_999;

/// Where the deliveries go: a plain-HTTP address.
struct Target {
    /// `host:port`, to connect to and to send as `Host`.
    authority: String,
    /// The path and query.
    path: String,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("--url {url:?}: {e}"))?;
        anyhow::ensure!(
            url.scheme() == "http",
            "--load speaks plain HTTP to measure an engine nearby; --url {url} is {}",
            url.scheme()
        );
        let host = url.host_str().ok_or_else(|| anyhow::anyhow!("--url {url} names no host"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
        Ok(Self { authority: format!("{host}:{port}"), path: format!("{}{query}", url.path()) })
    }
}

/// The orders/create body with the order id's digits found once, so that each
/// delivery's body is a copy with other digits, not a new JSON document.
struct Template {
    body: Vec<u8>,
    id_at: Vec<usize>,
}

impl Template {
    fn new() -> anyhow::Result<Self> {
        let body = serde_json::to_vec(&payload("orders/create", FIRST_ORDER, None)?)?;
        let digits = FIRST_ORDER.to_string();
        let id_at: Vec<usize> =
            body.windows(digits.len()).enumerate().filter(|(_, w)| *w == digits.as_bytes()).map(|(at, _)| at).collect();
        anyhow::ensure!(!id_at.is_empty(), "the bundled orders/create payload lost its order id");
        Ok(Self { body, id_at })
    }

    /// The body for `order_id`, in `out`.
    fn body(&self, order_id: i64, out: &mut Vec<u8>) {
        debug_assert!((FIRST_ORDER..=LAST_ORDER).contains(&order_id));
        out.clear();
        out.extend_from_slice(&self.body);
        let digits = order_id.to_string();
        for &at in &self.id_at {
            out[at..at + digits.len()].copy_from_slice(digits.as_bytes());
        }
    }
}

/// What every connection shares: the plan, and the next delivery to send.
struct Plan {
    target: Target,
    secret: String,
    template: Template,
    /// Webhook ids are `{run}-{i}`: unique across runs against one engine.
    run: String,
    deliveries: u64,
    rate: u64,
    started: Instant,
    next: AtomicU64,
    bar: indicatif::ProgressBar,
}

/// One connection's tally, or all of them merged.
struct Tally {
    latencies: hdrhistogram::Histogram<u64>,
    accepted: u64,
    other: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self { latencies: hdrhistogram::Histogram::new(3)?, accepted: 0, other: BTreeMap::new() })
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.latencies.add(&other.latencies)?;
        self.accepted += other.accepted;
        for (answer, n) in other.other {
            *self.other.entry(answer).or_default() += n;
        }
        Ok(())
    }
}

pub async fn run(args: &WebhookSendArgs, deliveries: u64) -> anyhow::Result<()> {
    let most = (LAST_ORDER - FIRST_ORDER + 1) as u64;
    anyhow::ensure!(deliveries <= most, "--load takes at most {most} deliveries");
    let bar = indicatif::ProgressBar::new(deliveries).with_style(
        indicatif::ProgressStyle::with_template("{spinner} webhooks [{bar:40}] {pos}/{len} {per_sec}")
            .expect("template")
            .progress_chars("=> "),
    );
    let plan = Arc::new(Plan {
        target: Target::parse(&args.url)?,
        secret: args.secret.clone(),
        template: Template::new()?,
        run: uuid::Uuid::new_v4().simple().to_string(),
        deliveries,
        rate: args.rate.max(1),
        started: Instant::now(),
        next: AtomicU64::new(0),
        bar,
    });
    let connections: Vec<_> =
        (0..CONNECTIONS.min(deliveries)).map(|_| tokio::spawn(connection(plan.clone()))).collect();
    let mut total = Tally::new()?;
    for c in connections {
        total.merge(c.await??)?;
    }
    let elapsed = plan.started.elapsed().as_secs_f64();
    plan.bar.finish();
    let ms = |us: u64| us as f64 / 1e3;
    let report = json!({
        "deliveries": deliveries, "offered_per_s": args.rate, "accepted": total.accepted,
        "accepted_per_s": total.accepted as f64 / elapsed,
        "time_to_200_ms": {
            "p50": ms(total.latencies.value_at_quantile(0.5)),
            "p99": ms(total.latencies.value_at_quantile(0.99)),
            "max": ms(total.latencies.max()),
        },
        "other_answers": total.other,
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, text + "\n")?;
    }
    Ok(())
}

/// Sends the plan's next deliveries, each when it is due, over one connection (opened
/// again after a failure), until none is left.
async fn connection(plan: Arc<Plan>) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let (mut body, mut request, mut answer) = (Vec::new(), Vec::new(), Vec::new());
    let mut stream: Option<TcpStream> = None;
    loop {
        let i = plan.next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.deliveries {
            return Ok(tally);
        }
        let due = plan.started + Duration::from_secs_f64(i as f64 / plan.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        plan.template.body(FIRST_ORDER + i as i64, &mut body);
        write_request(&plan, &format!("{}-{i}", plan.run), &body, &mut request);
        let sent = Instant::now();
        let outcome = tokio::time::timeout(ANSWER_TIMEOUT, async {
            if stream.is_none() {
                stream = Some(connect(&plan.target.authority).await?);
            }
            let open = stream.as_mut().expect("connected just above");
            exchange(open, &request, &mut answer).await
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {ANSWER_TIMEOUT:?}")));
        tally.latencies.record(sent.elapsed().as_micros() as u64)?;
        match outcome {
            Ok(Answer { status, content, keep_alive }) => {
                if !keep_alive {
                    stream = None;
                }
                match answer_text(status, &answer[content]) {
                    accepted if accepted == "accepted" => tally.accepted += 1,
                    other => *tally.other.entry(other).or_default() += 1,
                }
            }
            Err(e) => {
                stream = None;
                *tally.other.entry(format!("failed: {e}")).or_default() += 1;
            }
        }
        plan.bar.inc(1);
    }
}

async fn connect(authority: &str) -> Result<TcpStream, String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| format!("no connection to {authority} within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    // A request goes in one write; waiting to fill a segment only delays it.
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(stream)
}

fn write_request(plan: &Plan, webhook_id: &str, body: &[u8], out: &mut Vec<u8>) {
    use std::io::Write;
    out.clear();
    let (path, host, length) = (&plan.target.path, &plan.target.authority, body.len());
    let _ = write!(out, "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {length}\r\n");
    for (name, value) in headers("orders/create", webhook_id, sign(&plan.secret, body)) {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// An answer read into the connection's buffer: its status and where its body is.
#[derive(Debug)]
struct Answer {
    status: u16,
    content: std::ops::Range<usize>,
    keep_alive: bool,
}

/// Writes one request and reads its answer into `buf`. Answers must carry a
/// Content-Length (the engine's all do); anything else is a failed delivery.
async fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> Result<Answer, String> {
    stream.write_all(request).await.map_err(|e| format!("sending: {e}"))?;
    buf.clear();
    let closed = || "the engine closed the connection before answering".to_string();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(format!("an answer's head past {MAX_HEAD} bytes"));
        }
        if stream.read_buf(buf).await.map_err(|e| format!("reading: {e}"))? == 0 {
            return Err(closed());
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "an answer's head is not text".to_string())?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 ").or_else(|| l.strip_prefix("HTTP/1.0 ")))
        .and_then(|l| l.get(..3)?.parse::<u16>().ok())
        .ok_or_else(|| "an answer without an HTTP/1.x status line".to_string())?;
    let (mut length, mut keep_alive) = (None, true);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep_alive = false;
        }
    }
    let length = length.ok_or_else(|| "an answer without Content-Length".to_string())?;
    if length > MAX_BODY {
        return Err(format!("an answer's body of {length} bytes, past {MAX_BODY}"));
    }
    while buf.len() < head_end + length {
        if stream.read_buf(buf).await.map_err(|e| format!("reading: {e}"))? == 0 {
            return Err(closed());
        }
    }
    Ok(Answer { status, content: head_end..head_end + length, keep_alive })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patched_body_is_the_payload_of_its_order() {
        let template = Template::new().unwrap();
        let mut body = Vec::new();
        for id in [FIRST_ORDER, FIRST_ORDER + 7, 1_234_567_890, LAST_ORDER] {
            template.body(id, &mut body);
            let want = serde_json::to_vec(&payload("orders/create", id, None).unwrap()).unwrap();
            assert_eq!(body, want, "order {id}");
        }
    }

    #[test]
    fn only_plain_http_targets_are_taken() {
        let t = Target::parse("http://localhost:18080/webhooks/shopify?x=1").unwrap();
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("localhost:18080", "/webhooks/shopify?x=1"));
        assert_eq!(Target::parse("http://127.0.0.1/w").unwrap().authority, "127.0.0.1:80");
        let e = Target::parse("https://shop.example/w").err().unwrap().to_string();
        assert!(e.contains("plain HTTP") && e.contains("https"), "{e}");
    }

    /// An answer that arrives in pieces is read whole; one that says `close`, or breaks
    /// off, is told apart.
    #[tokio::test]
    async fn answers_are_read_across_pieces() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = vec![0u8; 64];
            let pieces: [&[u8]; 4] =
                [b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 21\r\n\r\n{\"status\":", b"\"accepted\"}", b""];
            let _ = s.read(&mut got).await.unwrap();
            for p in pieces {
                s.write_all(p).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = s.read(&mut got).await.unwrap();
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .unwrap();
            let _ = s.read(&mut got).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{\"status\"").await.unwrap();
        });
        let mut stream = connect(&at.to_string()).await.unwrap();
        let mut buf = Vec::new();
        let first = exchange(&mut stream, b"one", &mut buf).await.unwrap();
        assert_eq!((first.status, first.keep_alive), (200, true));
        assert_eq!(answer_text(first.status, &buf[first.content]), "accepted");
        let second = exchange(&mut stream, b"two", &mut buf).await.unwrap();
        assert_eq!((second.status, second.keep_alive), (503, false));
        let cut = exchange(&mut stream, b"three", &mut buf).await.unwrap_err();
        assert!(cut.contains("closed the connection"), "{cut}");
        server.await.unwrap();
    }
}
