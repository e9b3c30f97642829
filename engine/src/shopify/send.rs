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
    let mut order: Value = serde_json::from_str(CREATE).expect("the bundled fixture is JSON");
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

async fn deliver(client: &reqwest::Client, args: &WebhookSendArgs, topic: &str, webhook_id: &str, body: &[u8]) -> String {
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

pub async fn run(args: WebhookSendArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let Some(n) = args.chaos else {
        let body = serde_json::to_vec(&payload(&args.topic, args.order_id, None)?)?;
        let webhook_id = uuid::Uuid::new_v4().to_string();
        println!("{} {} → {}", args.topic, webhook_id, deliver(&client, &args, &args.topic, &webhook_id, &body).await);
        return Ok(());
    };
    // N deliveries: N/2 unique updates, each delivered twice, all at once.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let deliveries: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let unique = i / 2;
            let body = serde_json::to_vec(&payload("orders/updated", args.order_id, Some(&format!("chaos {run} update {unique}")))?)?;
            Ok((format!("{run}-{unique}"), body))
        })
        .collect::<anyhow::Result<_>>()?;
    let answers: Vec<String> = futures::stream::iter(deliveries.iter().map(|(id, body)| deliver(&client, &args, "orders/updated", id, body)))
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
