//! Reconciliation: the deliveries that never came. Shopify does not guarantee webhook
//! delivery, so the orders a shop updated since a time are read from the Admin API and
//! each one that the store does not have at least as new goes through the webhook path
//! as the delivery it would have been: signed, deduplicated, audited, and ordered by
//! Shopify's `updated_at` like any delivery, so a reconciled order and a late webhook
//! never both apply or go backwards.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::admin::{AdminApi, AdminError};
use super::{DeliveryHeaders, ShopifyConfig, accept, signature};
use crate::engine::Engine;
use crate::store::WebhookDelivery;
use crate::telemetry;

/// The most failures a report names (all are counted).
const NAMED_FAILURES: usize = 20;
/// The most pages one reconciliation reads (2.5M orders): past it, a narrower window.
const MAX_PAGES: u64 = 10_000;
/// Orders of a page sent on at once (each order's own deliveries go one after another).
const CONCURRENCY: usize = 16;

/// What a reconciliation did.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ReconcileReport {
    pub shop: String,
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    /// Pages read from the Admin API.
    pub pages: u64,
    /// Orders read.
    pub fetched: u64,
    /// Orders the store was behind on: their events are on the log now.
    pub applied: u64,
    /// Orders the store had at least as new (or delivered already).
    pub up_to_date: u64,
    /// Orders that could not be taken (dead-lettered when Shopify's data was invalid).
    pub failed: u64,
    /// The first failures, by Shopify order id.
    pub failures: Vec<ReconcileFailure>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReconcileFailure {
    pub order: String,
    pub reason: String,
}

enum Outcome {
    Applied,
    UpToDate,
    Failed(String),
}

/// Reads every order of `shop` updated since `since` and sends on what the store lacks.
/// `on_page` sees the report after each page. An Admin API that keeps failing ends it
/// with the error (what was sent stays sent; a rerun finds it up to date).
pub async fn reconcile(
    engine: &Engine,
    config: &ShopifyConfig,
    api: &AdminApi,
    shop: &str,
    (since, until): (DateTime<Utc>, Option<DateTime<Utc>>),
    mut on_page: impl FnMut(&ReconcileReport),
) -> Result<ReconcileReport, AdminError> {
    // Its own deliveries are not the shop's traffic: the shop's rate limit stays for it.
    let config = ShopifyConfig { rate_limit: None, ..config.clone() };
    let mut report = ReconcileReport { shop: shop.to_string(), since, until, ..Default::default() };
    let mut url = Some(api.first_page(since, until));
    while let Some(page_url) = url {
        if report.pages >= MAX_PAGES {
            let why = format!("more than {MAX_PAGES} pages: reconcile a narrower window (until)");
            return Err(AdminError::Malformed(why));
        }
        let page = api.orders(&page_url).await?;
        report.pages += 1;
        // A cursor that repeats itself, or an empty page that links on, would never end.
        let stuck = page.next.as_deref() == Some(page_url.as_str()) || page.orders.is_empty();
        let config = &config;
        let outcomes: Vec<(Value, Outcome)> = futures::stream::iter(page.orders)
            .map(|order| async move {
                let outcome = reconcile_order(engine, config, shop, &order).await;
                (order, outcome)
            })
            .buffered(CONCURRENCY)
            .collect()
            .await;
        for (order, outcome) in outcomes {
            report.fetched += 1;
            let label = match outcome {
                Outcome::Applied => {
                    report.applied += 1;
                    "applied"
                }
                Outcome::UpToDate => {
                    report.up_to_date += 1;
                    "up_to_date"
                }
                Outcome::Failed(reason) => {
                    report.failed += 1;
                    if report.failures.len() < NAMED_FAILURES {
                        report.failures.push(ReconcileFailure { order: order["id"].to_string(), reason });
                    }
                    "failed"
                }
            };
            metrics::counter!(telemetry::SHOPIFY_RECONCILED, "outcome" => label).increment(1);
        }
        on_page(&report);
        url = if stuck { None } else { page.next };
    }
    Ok(report)
}

async fn reconcile_order(engine: &Engine, config: &ShopifyConfig, shop: &str, order: &Value) -> Outcome {
    let Some(id) = order["id"].as_i64() else { return Outcome::Failed("the order has no integer id".into()) };
    let updated_at = match order["updated_at"].as_str().map(DateTime::parse_from_rfc3339) {
        Some(Ok(t)) => t.with_timezone(&Utc),
        _ => return Outcome::Failed("the order has no valid updated_at".into()),
    };
    let stored = match engine.order(&format!("shopify-{id}")).await {
        Ok(stored) => stored,
        Err(e) => return Outcome::Failed(format!("reading the stored order: {e}")),
    };
    if stored.as_ref().and_then(|o| o.source_updated_at).is_some_and(|t| t >= updated_at) {
        return Outcome::UpToDate;
    }
    let cancelled = !order["cancelled_at"].is_null();
    let topics: &[&str] = match (&stored, cancelled) {
        (None, false) => &["orders/create"],
        (None, true) => &["orders/create", "orders/cancelled"],
        (Some(_), false) => &["orders/updated"],
        (Some(_), true) => &["orders/cancelled"],
    };
    let body = serde_json::to_vec(order).expect("a JSON value serializes");
    let mut outcome = Outcome::UpToDate;
    for topic in topics {
        // One delivery id per order, topic and state: a rerun is a duplicate.
        let kind = topic.trim_start_matches("orders/");
        let webhook_id = format!("reconcile-{id}-{kind}-{}", updated_at.timestamp_micros());
        match deliver(engine, config, shop, topic, &webhook_id, &body).await {
            Ok("accepted") => outcome = Outcome::Applied,
            Ok("duplicate") => {}
            Ok("rejected") => return Outcome::Failed(format!("{topic}: rejected (GET /dead-letters says why)")),
            Ok(other) => return Outcome::Failed(format!("{topic}: {other} (GET /shopify/shops/{shop})")),
            Err(reason) => return Outcome::Failed(format!("{topic}: {reason}")),
        }
    }
    outcome
}

/// Delivers `body` as a signed webhook through the webhook path, and audits it.
async fn deliver(
    engine: &Engine,
    config: &ShopifyConfig,
    shop: &str,
    topic: &str,
    webhook_id: &str,
    body: &[u8],
) -> Result<&'static str, String> {
    let secrets =
        config.secrets_for(Some(shop)).ok_or_else(|| "no webhook secret is configured for this shop".to_string())?;
    let headers = DeliveryHeaders {
        hmac: Some(signature::sign(&secrets.current, body)),
        webhook_id: Some(webhook_id.to_string()),
        event_id: None,
        topic: Some(topic.to_string()),
        shop: Some(shop.to_string()),
    };
    let mut audit = WebhookDelivery {
        webhook_id: headers.webhook_id.clone(),
        event_id: None,
        topic: headers.topic.clone(),
        shop: headers.shop.clone(),
        outcome: "rejected".into(),
        reason: None,
        order_id: None,
        received_at: Utc::now(),
    };
    let accepted = accept(engine, config, &headers, body, &mut audit).await;
    if let Err(e) = &accepted {
        audit.reason = Some(e.to_string());
    }
    engine.stats().webhook(&audit.outcome);
    super::settle(engine, config, accepted.as_ref().ok(), Some(audit)).await;
    accepted.map(|accepted| accepted.answer.status).map_err(|e| e.to_string())
}

/// A shop's domain: `<name>.myshopify.com`, as Shopify names every shop (so the access
/// token can only go to Shopify's hosts). The error never repeats the text, which may
/// be a misplaced secret.
pub fn checked_shop(shop: &str) -> anyhow::Result<String> {
    let shop = shop.trim().to_ascii_lowercase();
    let name = shop.strip_suffix(".myshopify.com").unwrap_or_default();
    let fine = !name.is_empty()
        && name.len() <= 100
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-');
    anyhow::ensure!(fine, "not a shop domain: give <name>.myshopify.com");
    Ok(shop)
}

/// How far each periodic run reaches back before the last one's start: orders updated
/// while a run read its pages are read again by the next.
const OVERLAP: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// The periodic mode: every interval, the orders updated since the last run's start
/// (less [`OVERLAP`]); a failed run is tried again at the next, from the same time.
pub fn spawn_periodic(engine: std::sync::Arc<Engine>, config: ShopifyConfig) {
    let Some(admin) = config.admin.clone() else { return };
    let Some((shop, every)) = admin.periodic.clone() else { return };
    tokio::spawn(async move {
        let api = match AdminApi::new(&admin.url, &shop, admin.token.clone()) {
            Ok(api) => api,
            Err(e) => return tracing::error!(error = %e, "periodic reconciliation cannot start"),
        };
        let mut since = Utc::now() - every - OVERLAP;
        loop {
            tokio::time::sleep(every).await;
            let started = Utc::now();
            match reconcile(&engine, &config, &api, &shop, (since, None), |_| {}).await {
                Ok(r) => {
                    tracing::info!(shop = %shop, fetched = r.fetched, applied = r.applied, up_to_date = r.up_to_date,
                        failed = r.failed, "reconciled with Shopify");
                    since = started - OVERLAP;
                }
                Err(e) => tracing::warn!(shop = %shop, error = %e, "reconciliation failed; the next starts as early"),
            }
        }
    });
}

/// `orchestrator shopify reconcile`: asks the engine to reconcile, and prints its report.
pub async fn run_cli(args: crate::config::ReconcileArgs) -> anyhow::Result<()> {
    let now = Utc::now();
    let since = parse_since(&args.since, now)?;
    let until = args.until.as_deref().map(|u| parse_since(u, now)).transpose()?;
    let engine = crate::devkit::client::Engine::connect(&args.target)?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("reconciling {} since {since} (the engine reads the Admin API)", args.shop));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let body = serde_json::json!({ "shop": args.shop, "since": since, "until": until });
    // A large shop takes long: an hour, then a narrower window (--until).
    let report = engine.post_json("/shopify/reconcile", &body, std::time::Duration::from_secs(3600)).await;
    spinner.finish_and_clear();
    let report = report?;
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    if args.target.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        anyhow::ensure!(n("failed") == 0, "{} orders could not be reconciled", n("failed"));
        return Ok(());
    }
    println!(
        "{}: fetched {} orders in {} pages; applied {}, already up to date {}, failed {}",
        args.shop,
        n("fetched"),
        n("pages"),
        n("applied"),
        n("up_to_date"),
        n("failed")
    );
    for f in report["failures"].as_array().into_iter().flatten() {
        println!("  order {}: {}", f["order"], f["reason"].as_str().unwrap_or_default());
    }
    anyhow::ensure!(n("failed") == 0, "{} orders could not be reconciled", n("failed"));
    Ok(())
}

/// An RFC 3339 time, or a span back from `now`: `90m`, `24h`, `7d`.
fn parse_since(text: &str, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let (number, unit) = text.split_at(text.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len());
    let n: i64 = number.parse().map_err(|_| anyhow::anyhow!("--since {text:?}: give a time or a span (24h)"))?;
    let span = match unit {
        "m" => chrono::TimeDelta::try_minutes(n),
        "h" => chrono::TimeDelta::try_hours(n),
        "d" => chrono::TimeDelta::try_days(n),
        _ => None,
    };
    span.filter(|s| *s > chrono::TimeDelta::zero())
        .map(|s| now - s)
        .ok_or_else(|| anyhow::anyhow!("--since {text:?}: a span is a positive number of m, h or d"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_time_or_a_span_back() {
        let now = DateTime::parse_from_rfc3339("2026-12-03T12:00:00Z").unwrap().with_timezone(&Utc);
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(parse_since("2026-12-01T00:00:00Z", now).unwrap(), at("2026-12-01T00:00:00Z"));
        assert_eq!(parse_since("90m", now).unwrap(), at("2026-12-03T10:30:00Z"));
        assert_eq!(parse_since("7d", now).unwrap(), at("2026-11-26T12:00:00Z"));
        for bad in ["", "yesterday", "-3h", "0d", "5w"] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_shop_must_be_a_domain() {
        assert_eq!(checked_shop(" Example.myshopify.com ").unwrap(), "example.myshopify.com");
        for bad in
            ["", "a/b.myshopify.com", "x.com", "-x.myshopify.com", "my shop", ".myshopify.com", "169.254.169.254"]
        {
            assert!(checked_shop(bad).is_err(), "{bad}");
        }
        // A secret put in the shop's column is not repeated in the error.
        assert!(!checked_shop("shpss_0123456789").unwrap_err().to_string().contains("shpss"));
    }
}
