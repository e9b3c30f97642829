//! List answers: a page size in a stated range, and a page bounded by bytes as well as
//! by count, so that long rows cannot make one answer huge.

use std::future::Future;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::ApiError;
use crate::store::Page;

/// The page size asked for, or `default`; outside 1..=`max` it is a 400 naming the range.
pub fn page_limit(given: Option<u64>, default: usize, max: usize) -> Result<usize, ApiError> {
    match given {
        None => Ok(default),
        Some(n) if (1..=max as u64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::bad_request(
            "invalid limit",
            json!({ "limit": n, "allowed": format!("1..={max}"), "message": format!("limit must be 1..={max}") }),
        )),
    }
}

/// How often a page is asked for again when the list grew under it and it still does
/// not fit; past that it is answered as it is (still bounded by its count).
const REFITS: usize = 3;

/// Answers `fetch(limit)` as JSON of at most `budget` bytes (a single item larger than
/// the budget still comes, alone). A page that would be larger is asked for again with
/// as many items as fit, so its `next_cursor` is the store's own and the client simply
/// reads on.
pub async fn capped<T, E, F, Fut>(budget: usize, limit: usize, fetch: F) -> Result<Response, ApiError>
where
    T: Serialize,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<Page<T>, E>>,
    ApiError: From<E>,
{
    let mut page = fetch(limit).await?;
    // Measured item by item up to the budget, so a page far too large is never encoded whole.
    for _ in 0..REFITS {
        let fit = fitting(&page, budget)?;
        if fit == page.items.len() {
            break;
        }
        page = fetch(fit).await?;
    }
    let body = encode(&page)?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Room kept for the envelope's cursor: a shorter page carries a cursor of its own,
/// which may be longer than the one measured (a CQL paging state, say).
const CURSOR_ROOM: usize = 1024;

/// How many of the page's first items fit in `budget` with the page around them (at
/// least one).
fn fitting<T: Serialize>(page: &Page<T>, budget: usize) -> Result<usize, ApiError> {
    let mut used = encode(&Page::<T> { items: Vec::new(), next_cursor: None })?.len() + CURSOR_ROOM;
    for (n, item) in page.items.iter().enumerate() {
        used += encode(item)?.len() + 1;
        if used > budget {
            return Ok(n.max(1));
        }
    }
    Ok(page.items.len())
}

fn encode(value: &impl Serialize) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the answer",
            json!({ "message": e.to_string() }),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: usize, each: usize) -> Page<String> {
        Page { items: (0..n).map(|i| format!("{i:0each$}")).collect(), next_cursor: Some("c".into()) }
    }

    #[test]
    fn as_many_items_fit_as_the_budget_holds() {
        // Each item is `"0000000000"` (12 bytes) plus a comma; the envelope about 40
        // bytes and the room for its cursor.
        let budget = CURSOR_ROOM + 300;
        let p = page(100, 10);
        let n = fitting(&p, budget).unwrap();
        let long_cursor = Some("c".repeat(CURSOR_ROOM - 10));
        let fitted = Page { items: p.items[..n].to_vec(), next_cursor: long_cursor.clone() };
        assert!(encode(&fitted).unwrap().len() <= budget, "{n} items fit, whatever the cursor");
        let more = Page { items: p.items[..=n].to_vec(), next_cursor: None };
        assert!(encode(&more).unwrap().len() + CURSOR_ROOM > budget, "one more would not");
        assert_eq!(fitting(&page(1, 5000), budget).unwrap(), 1, "an item larger than the budget comes alone");
        assert_eq!(fitting(&page(3, 1), budget).unwrap(), 3, "a small page is whole");
    }

    #[tokio::test]
    async fn a_page_too_large_is_asked_for_again_smaller() {
        let asked = std::sync::Mutex::new(Vec::new());
        let fetch = |limit: usize| {
            asked.lock().unwrap().push(limit);
            async move { Ok::<_, ApiError>(page(limit, 10)) }
        };
        let answer = capped(CURSOR_ROOM + 300, 100, fetch).await.unwrap();
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX).await.unwrap();
        assert!(body.len() <= CURSOR_ROOM + 300, "{} bytes", body.len());
        let asked = asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 2, "asked once more: {asked:?}");
        assert!(asked[1] < 100 && asked[1] > 10, "with what fits: {asked:?}");
    }
}
