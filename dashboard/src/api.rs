//! Calls to the engine's HTTP API (same origin).

use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

// The engine's own row and page types (`types/`), so a renamed field or a new status
// fails this build instead of reading as empty.
pub use orchestrator_types::{Order, Page};

/// One refresh among overlapping refreshes of a view: only the newest applies its
/// answers, so a slow older answer never overwrites a newer one.
#[derive(Clone, Copy)]
pub struct Ticket {
    view: &'static std::thread::LocalKey<std::cell::Cell<u64>>,
    n: u64,
}

impl Ticket {
    pub fn take(view: &'static std::thread::LocalKey<std::cell::Cell<u64>>) -> Self {
        let n = view.get() + 1;
        view.set(n);
        Self { view, n }
    }

    /// Whether no refresh of the same view started after this one.
    pub fn newest(self) -> bool {
        self.view.get() == self.n
    }
}

pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.body).map_err(|e| format!("bad JSON from the engine: {e}"))
    }
    /// The engine's error message, for showing to the operator as is.
    pub fn error_text(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_default();
        let detail = v["detail"]["message"].as_str().or(v["detail"].as_str());
        let msg = [detail, v["error"].as_str()].into_iter().flatten().collect::<Vec<_>>().join(": ");
        if msg.is_empty() {
            format!("HTTP {}: {}", self.status, self.body)
        } else {
            format!("HTTP {}: {msg}", self.status)
        }
    }
}

const TOKEN_KEY: &str = "orchestrator.api_token";

/// Session storage: the token is entered once per tab session and never persisted to disk
/// across sessions (the rule), unlike localStorage.
fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.session_storage().ok()?
}

pub fn load_token() -> String {
    storage().and_then(|s| s.get_item(TOKEN_KEY).ok().flatten()).unwrap_or_default()
}

pub fn save_token(token: &str) {
    if let Some(s) = storage() {
        let _ = s.set_item(TOKEN_KEY, token);
    }
}

fn js_err(e: JsValue) -> String {
    e.as_string()
        .or_else(|| js_sys::JSON::stringify(&e).ok().and_then(|s| s.as_string()))
        .unwrap_or_else(|| "network error".into())
}

/// One JSON request. The token (when set) goes on every call: harmless on reads, needed on writes.
pub async fn call(method: &str, path: &str, body: Option<String>, if_match: Option<u64>) -> Result<Reply, String> {
    let body = body.map(|b| (JsValue::from_str(&b), "application/json"));
    call_raw(method, path, body, if_match).await
}

/// One request with any body (a plugin upload sends the file's bytes).
pub async fn call_raw(
    method: &str,
    path: &str,
    body: Option<(JsValue, &str)>,
    if_match: Option<u64>,
) -> Result<Reply, String> {
    let init = web_sys::RequestInit::new();
    init.set_method(method);
    let headers = web_sys::Headers::new().map_err(js_err)?;
    if let Some((b, content_type)) = &body {
        headers.set("content-type", content_type).map_err(js_err)?;
        init.set_body(b);
    }
    if let Some(v) = if_match {
        headers.set("if-match", &v.to_string()).map_err(js_err)?;
    }
    let token = load_token();
    if !token.is_empty() {
        headers.set("authorization", &format!("Bearer {token}")).map_err(js_err)?;
    }
    init.set_headers(&headers);
    let req = web_sys::Request::new_with_str_and_init(path, &init).map_err(js_err)?;
    let window = web_sys::window().ok_or("no window")?;
    let resp: web_sys::Response =
        JsFuture::from(window.fetch_with_request(&req)).await.map_err(js_err)?.dyn_into().map_err(js_err)?;
    let text = JsFuture::from(resp.text().map_err(js_err)?).await.map_err(js_err)?.as_string().unwrap_or_default();
    Ok(Reply { status: resp.status(), body: text })
}

pub async fn get(path: &str) -> Result<Reply, String> {
    call("GET", path, None, None).await
}

pub fn enc(s: &str) -> String {
    js_sys::encode_uri_component(s).as_string().unwrap_or_default()
}

pub fn money(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    if orchestrator_types::minor_digits(currency) == 0 {
        return format!("{sign}{} {currency}", cents.abs());
    }
    format!("{sign}{}.{:02} {currency}", cents.abs() / 100, cents.abs() % 100)
}

/// GETs `path` into `into` as JSON; a failure becomes `{"error": …}` there.
pub fn load_into(path: &'static str, into: sycamore::prelude::Signal<serde_json::Value>) {
    wasm_bindgen_futures::spawn_local(async move {
        match get(path).await {
            Ok(r) if r.ok() => into.set(r.json::<serde_json::Value>().unwrap_or(serde_json::Value::Null)),
            Ok(r) => into.set(serde_json::json!({ "error": r.error_text() })),
            Err(e) => into.set(serde_json::json!({ "error": e })),
        }
    });
}
