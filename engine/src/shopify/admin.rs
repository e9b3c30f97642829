//! A client of Shopify's Admin REST API, for what reconciliation reads: the orders of a
//! shop updated since a time, page by page (cursor pagination through the `Link`
//! header), within the API's rate limits.
//!
//! REST rather than GraphQL: its order resource is the very JSON the order webhooks
//! carry, so a fetched order becomes an event through the webhook path unchanged.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::Value;

use crate::secret::Secret;

/// The Admin API version the bridge speaks (also in the webhooks' `X-Shopify-Api-Version`).
pub const API_VERSION: &str = "2025-10";
/// Orders per page: the API's largest.
const PAGE_SIZE: usize = 250;
/// Each call gives up after this long; a connection attempt after the first.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries per page for a 5xx or a network failure, waiting 1, 2, 4, 8 s between them.
const ATTEMPTS: u32 = 5;
/// Tries per page that a 429 may cost, each after its `Retry-After`.
const THROTTLED_ATTEMPTS: u32 = 20;
/// The longest `Retry-After` obeyed; a longer one is cut to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Calls left in the shop's bucket below which the client slows down. REST's bucket
/// leaks 2 calls a second (standard plans), so one call every half second is sustainable.
const BUCKET_LOW: u32 = 4;
/// The largest page body read.
const MAX_PAGE_BYTES: usize = 32 << 20;

/// Why the Admin API gave no page.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A retry will not help: a refused token, a missing scope, an unknown shop.
    #[error("the Admin API refused the call ({status}): {body}")]
    Refused { status: u16, body: String },
    /// Still failing after every try (5xx, timeouts, too many 429s).
    #[error("the Admin API did not answer after {attempts} tries: {last}")]
    Unavailable { attempts: u32, last: String },
    #[error("the Admin API sent a page that is not an order list: {0}")]
    Malformed(String),
}

/// One shop's Admin API.
pub struct AdminApi {
    http: reqwest::Client,
    /// `https://{shop}/admin/api/{version}`, or a stand-in's URL.
    base: String,
    token: Secret,
}

/// A page of orders and the URL of the next one.
pub struct OrdersPage {
    pub orders: Vec<Value>,
    pub next: Option<String>,
}

impl AdminApi {
    /// `base_template` holds `{shop}` where the shop's domain goes; the result must be
    /// an https URL (http only to this machine, for stand-ins).
    pub fn new(base_template: &str, shop: &str, token: Secret) -> anyhow::Result<Self> {
        // The token goes to this host only: never along a redirect.
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let base = base_template.replace("{shop}", shop).trim_end_matches('/').to_string();
        check_base(&base)?;
        Ok(Self { http, base, token })
    }

    /// The first page of orders updated in `[since, until]`, any status.
    pub fn first_page(&self, since: DateTime<Utc>, until: Option<DateTime<Utc>>) -> String {
        let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let until = until.map(|t| format!("&updated_at_max={}", at(t))).unwrap_or_default();
        format!("{}/orders.json?status=any&updated_at_min={}{until}&limit={PAGE_SIZE}", self.base, at(since))
    }

    /// One page, with its 429s, 5xx and network failures retried (bounded). A page
    /// linked from another must be on the same API: the token goes nowhere else.
    pub async fn orders(&self, url: &str) -> Result<OrdersPage, AdminError> {
        if !url.starts_with(&format!("{}/", self.base)) {
            return Err(AdminError::Malformed(format!("a next page outside {}: {url}", self.base)));
        }
        let (mut failures, mut throttled) = (0u32, 0u32);
        loop {
            let mut token = reqwest::header::HeaderValue::from_str(self.token.expose())
                .map_err(|_| AdminError::Malformed("the access token is not a valid header value".into()))?;
            token.set_sensitive(true);
            let last = match self.http.get(url).header("X-Shopify-Access-Token", token).send().await {
                Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                    throttled += 1;
                    if throttled >= THROTTLED_ATTEMPTS {
                        return Err(AdminError::Unavailable { attempts: throttled, last: "429 every time".into() });
                    }
                    tokio::time::sleep(retry_after(r.headers())).await;
                    continue;
                }
                Ok(r) if r.status().is_success() => {
                    slow_down(r.headers()).await;
                    let links = r.headers().get_all(reqwest::header::LINK);
                    let next = links.iter().find_map(|v| next_link(v.to_str().ok()?));
                    match read_capped(r).await {
                        Ok(body) => return parse_page(&body).map(|orders| OrdersPage { orders, next }),
                        Err(Read::TooLarge) => {
                            return Err(AdminError::Malformed(format!("a page over {MAX_PAGE_BYTES} bytes")));
                        }
                        Err(Read::Failed(e)) => e.to_string(),
                    }
                }
                Ok(r) if r.status().is_server_error() => format!("{}", r.status()),
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body = r.text().await.unwrap_or_default().chars().take(300).collect();
                    return Err(AdminError::Refused { status, body });
                }
                Err(e) => e.to_string(),
            };
            failures += 1;
            if failures >= ATTEMPTS {
                return Err(AdminError::Unavailable { attempts: failures, last });
            }
            tokio::time::sleep(Duration::from_secs(1 << (failures - 1))).await;
        }
    }
}

/// https, or http to this machine (a stand-in in tests); never a token in clear text
/// across a network.
pub fn check_base(base: &str) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(base).map_err(|e| anyhow::anyhow!("the Admin API URL {base:?}: {e}"))?;
    let local = url
        .host_str()
        .is_some_and(|h| h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()));
    match url.scheme() {
        "https" => Ok(()),
        "http" if local => Ok(()),
        other => anyhow::bail!("the Admin API URL {base:?} must be https (not {other})"),
    }
}

enum Read {
    TooLarge,
    Failed(reqwest::Error),
}

/// A page's body, refused past [`MAX_PAGE_BYTES`].
async fn read_capped(mut r: reqwest::Response) -> Result<Vec<u8>, Read> {
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(Read::Failed)? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_PAGE_BYTES {
            return Err(Read::TooLarge);
        }
    }
    Ok(body)
}

fn parse_page(body: &[u8]) -> Result<Vec<Value>, AdminError> {
    let page: Value = serde_json::from_slice(body).map_err(|e| AdminError::Malformed(e.to_string()))?;
    match page.get("orders") {
        Some(Value::Array(orders)) => Ok(orders.clone()),
        _ => Err(AdminError::Malformed("no \"orders\" array".into())),
    }
}

/// `Retry-After` in seconds (Shopify sends a decimal, "2.0"), 2 s without one.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    let given = headers.get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok());
    // Bounded before it becomes a Duration, which a huge number would overflow.
    let seconds = given.filter(|s| s.is_finite() && *s >= 0.0).map(|s| s.min(MAX_RETRY_AFTER.as_secs_f64()));
    seconds.map_or(Duration::from_secs(2), Duration::from_secs_f64)
}

/// Waits when `X-Shopify-Shop-Api-Call-Limit` ("38/40") says the bucket is nearly full:
/// half a second per call short of [`BUCKET_LOW`] left.
async fn slow_down(headers: &reqwest::header::HeaderMap) {
    let used_of = headers.get("x-shopify-shop-api-call-limit").and_then(|v| {
        let (used, limit) = v.to_str().ok()?.split_once('/')?;
        Some((used.trim().parse::<u32>().ok()?, limit.trim().parse::<u32>().ok()?))
    });
    if let Some((used, limit)) = used_of {
        let left = limit.saturating_sub(used);
        if left < BUCKET_LOW {
            tokio::time::sleep(Duration::from_millis(500 * u64::from(BUCKET_LOW - left))).await;
        }
    }
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let next = params.split(';').any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
        next.then(|| url.trim().trim_start_matches('<').trim_end_matches('>').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_comes_from_the_link_header() {
        let both = "<https://s.myshopify.com/admin/api/2025-10/orders.json?limit=250&page_info=abc>; rel=\"previous\", \
                    <https://s.myshopify.com/admin/api/2025-10/orders.json?limit=250&page_info=def>; rel=\"next\"";
        let next = "https://s.myshopify.com/admin/api/2025-10/orders.json?limit=250&page_info=def";
        assert_eq!(next_link(both).unwrap(), next);
        assert_eq!(next_link("<https://x/orders.json?page_info=abc>; rel=\"previous\""), None);
    }

    #[test]
    fn retry_after_is_read_as_seconds_and_bounded() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), Duration::from_secs(2));
        h.insert(reqwest::header::RETRY_AFTER, "0.5".parse().unwrap());
        assert_eq!(retry_after(&h), Duration::from_millis(500));
        h.insert(reqwest::header::RETRY_AFTER, "3600".parse().unwrap());
        assert_eq!(retry_after(&h), MAX_RETRY_AFTER);
        h.insert(reqwest::header::RETRY_AFTER, "1e300".parse().unwrap());
        assert_eq!(retry_after(&h), MAX_RETRY_AFTER, "no overflow");
    }

    #[test]
    fn the_token_goes_over_https_or_to_this_machine_only() {
        assert!(check_base("https://a.myshopify.com/admin/api/2025-10").is_ok());
        assert!(check_base("http://127.0.0.1:9/a.myshopify.com/admin/api/2025-10").is_ok());
        assert!(check_base("http://a.myshopify.com/admin/api/2025-10").is_err());
        assert!(check_base("a.myshopify.com/admin").is_err());
    }
}
