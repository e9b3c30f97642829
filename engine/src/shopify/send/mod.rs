//! `orchestrator webhook send`: signs bundled Shopify payloads and delivers them the way
//! Shopify does, alone, as a concurrent burst with duplicate deliveries (`--chaos`), or
//! as an offered-rate load (`--load`, in `load`).

mod load;

use std::collections::BTreeMap;

use futures::StreamExt;
use serde_json::{Value, json};

use super::signature::sign;
use crate::config::WebhookSendArgs;

const CREATE: &str = include_str!("../fixtures/orders_create.json");

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

/// The headers Shopify sends beside a delivery's body.
fn headers(topic: &str, webhook_id: &str, hmac: String) -> [(&'static str, String); 8] {
    [
        ("content-type", "application/json".into()),
        ("x-shopify-topic", topic.into()),
        ("x-shopify-hmac-sha256", hmac),
        ("x-shopify-shop-domain", "example.myshopify.com".into()),
        ("x-shopify-api-version", "2025-10".into()),
        ("x-shopify-webhook-id", webhook_id.into()),
        ("x-shopify-event-id", format!("ev-{webhook_id}")),
        ("x-shopify-triggered-at", chrono::Utc::now().to_rfc3339()),
    ]
}

/// What the engine answered, as the reports count it: the answer's `status` for a 2xx,
/// else the HTTP status and the error.
fn answer_text(status: u16, body: &[u8]) -> String {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match body["status"].as_str() {
        Some(s) if (200..300).contains(&status) => s.to_string(),
        _ => format!("HTTP {status} {}", body["error"].as_str().unwrap_or("")),
    }
}

async fn deliver(
    client: &reqwest::Client,
    args: &WebhookSendArgs,
    topic: &str,
    webhook_id: &str,
    body: &[u8],
) -> String {
    let mut request = client.post(&args.url);
    for (name, value) in headers(topic, webhook_id, sign(&args.secret, body)) {
        request = request.header(name, value);
    }
    match request.body(body.to_vec()).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            answer_text(status, &r.bytes().await.unwrap_or_default())
        }
        Err(e) => format!("failed: {e}"),
    }
}

pub async fn run(args: WebhookSendArgs) -> anyhow::Result<()> {
    if let Some(n) = args.load {
        return load::run(&args, n).await;
    }
    let client = reqwest::Client::builder().build()?;
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
