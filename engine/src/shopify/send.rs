//! `orchestrator webhook send`: signs bundled Shopify payloads and delivers them the way
//! Shopify does, alone or as a concurrent burst with duplicate deliveries (`--chaos`).

use std::collections::BTreeMap;

use futures::StreamExt;
use serde_json::{Value, json};

use super::signature::sign;
use crate::config::WebhookSendArgs;

const CREATE: &str = include_str!("fixtures/orders_create.json");

/// A realistic payload for `topic`: the bundled orders/create fixture, changed the way
/// Shopify's payload for that topic differs.
pub fn payload(topic: &str, order_id: i64, note: Option<&str>) -> anyhow::Result<Value> {
    // Parsed once: the load mode builds thousands of payloads a second on the cores the
    // engine under test shares.
    static FIXTURE: std::sync::LazyLock<Value> =
        std::sync::LazyLock::new(|| serde_json::from_str(CREATE).expect("the bundled fixture is JSON"));
    let mut order = FIXTURE.clone();
    order["id"] = json!(order_id);
    order["admin_graphql_api_id"] = json!(format!("gid://shopify/Order/{order_id}"));
    let now = chrono::Utc::now().to_rfc3339();
    if topic != "orders/create" {
        order["updated_at"] = json!(now);
    }
    match topic {
        "orders/create" | "orders/updated" | "orders/edited" => {}
        "orders/paid" => order["financial_status"] = json!("paid"),
        "orders/fulfilled" => order["fulfillment_status"] = json!("fulfilled"),
        "orders/partially_fulfilled" => order["fulfillment_status"] = json!("partial"),
        "orders/cancelled" => {
            order["cancelled_at"] = json!(now);
            order["cancel_reason"] = json!("customer");
            order["financial_status"] = json!("voided");
        }
        "orders/delete" => return Ok(json!({ "id": order_id })),
        other => anyhow::bail!("no bundled payload for topic {other:?}"),
    }
    if let Some(n) = note {
        order["note"] = json!(n);
    }
    Ok(order)
}

async fn deliver(
    client: &reqwest::Client,
    args: &WebhookSendArgs,
    topic: &str,
    webhook_id: &str,
    body: &[u8],
) -> String {
    let sent = client
        .post(&args.url)
        .header("content-type", "application/json")
        .header("x-shopify-topic", topic)
        .header("x-shopify-hmac-sha256", sign(&args.secret, body))
        .header("x-shopify-shop-domain", "example.myshopify.com")
        .header("x-shopify-api-version", "2025-10")
        .header("x-shopify-webhook-id", webhook_id)
        .header("x-shopify-event-id", format!("ev-{webhook_id}"))
        .header("x-shopify-triggered-at", chrono::Utc::now().to_rfc3339())
        .body(body.to_vec())
        .send()
        .await;
    match sent {
        Ok(r) => {
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            match body["status"].as_str() {
                Some(s) if status.is_success() => s.to_string(),
                _ => format!("HTTP {} {}", status.as_u16(), body["error"].as_str().unwrap_or("")),
            }
        }
        Err(e) => format!("failed: {e}"),
    }
}

/// Load mode: `n` deliveries at `rate`/s, each a new order; time-to-200 per delivery.
async fn load(client: &reqwest::Client, args: &WebhookSendArgs, n: u64) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let run = uuid::Uuid::new_v4().simple().to_string();
    let bar = indicatif::ProgressBar::new(n).with_style(
        indicatif::ProgressStyle::with_template("{spinner} webhooks [{bar:40}] {pos}/{len} {per_sec}")
            .expect("template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    // Like Shopify, a bounded number of connections: past it, the offered rate slips.
    let inflight = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..n {
        let permit = inflight.clone().acquire_owned().await?;
        let due = Duration::from_secs_f64(i as f64 / args.rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let body = serde_json::to_vec(&payload("orders/create", 1_000_000_000 + i as i64, None)?)?;
        let (client, args, id, bar) = (client.clone(), args.clone(), format!("{run}-{i}"), bar.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let answer = deliver(&client, &args, "orders/create", &id, &body).await;
            drop(permit);
            bar.inc(1);
            (answer, sent.elapsed())
        }));
    }
    let mut latencies = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut accepted = 0u64;
    let mut other = BTreeMap::<String, u64>::new();
    for t in tasks {
        let (answer, took) = t.await?;
        latencies.record(took.as_micros() as u64)?;
        if answer == "accepted" {
            accepted += 1;
        } else {
            *other.entry(answer).or_default() += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish();
    let report = json!({
        "deliveries": n, "offered_per_s": args.rate, "accepted": accepted, "accepted_per_s": accepted as f64 / elapsed,
        "time_to_200_ms": {
            "p50": latencies.value_at_quantile(0.5) as f64 / 1e3,
            "p99": latencies.value_at_quantile(0.99) as f64 / 1e3,
            "max": latencies.max() as f64 / 1e3
        },
        "other_answers": other,
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, text + "\n")?;
    }
    Ok(())
}

pub async fn run(args: WebhookSendArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    if let Some(n) = args.load {
        return load(&client, &args, n).await;
    }
    let Some(n) = args.chaos else {
        let body = serde_json::to_vec(&payload(&args.topic, args.order_id, None)?)?;
        let webhook_id = uuid::Uuid::new_v4().to_string();
        let answer = deliver(&client, &args, &args.topic, &webhook_id, &body).await;
        println!("{} {} → {}", args.topic, webhook_id, answer);
        return Ok(());
    };
    // N deliveries: N/2 unique updates, each delivered twice, all at once.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let deliveries: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let unique = i / 2;
            let body = serde_json::to_vec(&payload(
                "orders/updated",
                args.order_id,
                Some(&format!("chaos {run} update {unique}")),
            )?)?;
            Ok((format!("{run}-{unique}"), body))
        })
        .collect::<anyhow::Result<_>>()?;
    let answers: Vec<String> =
        futures::stream::iter(deliveries.iter().map(|(id, body)| deliver(&client, &args, "orders/updated", id, body)))
            .buffer_unordered(n.max(1))
            .collect()
            .await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for a in answers {
        *counts.entry(a).or_default() += 1;
    }
    println!("{n} deliveries ({} unique, {} duplicates) for order {}:", n.div_ceil(2), n / 2, args.order_id);
    for (answer, count) in &counts {
        println!("  {count:>6}  {answer}");
    }
    Ok(())
}
