//! A small HTTP client for the engine's API: the admin token, a timeout on every call,
//! and the engine's JSON errors turned into one clear line.

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::Target;

/// Connecting gives up after this long; a call (a deploy compiles) after the other.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Engine {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Engine {
    pub fn connect(target: &Target) -> anyhow::Result<Self> {
        let token = match &target.api_token {
            Some(t) => t.clone(),
            None => {
                let file = target.data_dir.join("api-token");
                let text = std::fs::read_to_string(&file).with_context(|| {
                    format!(
                        "no token: set ORCHESTRATOR_API_TOKEN (or --api-token), or point --data-dir at the \
                         data dir of a loopback engine, which keeps its token in api-token ({} is unreadable)",
                        file.display()
                    )
                })?;
                text.lines().next().unwrap_or_default().trim().to_string()
            }
        };
        let http = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT).build()?;
        Ok(Self { http, base: target.url.trim_end_matches('/').to_string(), token })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(self.url(path)), path).await
    }

    pub async fn post(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.post(self.url(path)), path).await
    }

    /// A POST with a JSON body, for work that may take longer than a usual call.
    pub async fn post_json(&self, path: &str, body: &Value, timeout: Duration) -> anyhow::Result<Value> {
        self.send(self.http.post(self.url(path)).json(body).timeout(timeout), path).await
    }

    /// Sends a component: `PUT` deploys it, `POST` asks a question of it (a what-if run).
    pub async fn send_component(&self, method: reqwest::Method, path: &str, body: Vec<u8>) -> anyhow::Result<Value> {
        let request = self.http.request(method, self.url(path)).header("content-type", "application/wasm").body(body);
        self.send(request, path).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.delete(self.url(path)), path).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder, path: &str) -> anyhow::Result<Value> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| {
            let why = if e.is_timeout() { "it did not answer in time" } else { "it cannot be reached" };
            anyhow::anyhow!("{path}: the engine at {} {why} (is `orchestrator serve` running?): {e}", self.base)
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let body: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if status.is_success() {
            return Ok(body);
        }
        anyhow::bail!("{path}: the engine answered {status}: {}", refusal(&body))
    }
}

/// The engine's `{"error", "detail"}` as one line.
fn refusal(body: &Value) -> String {
    let error = body["error"].as_str().unwrap_or("no reason given");
    match &body["detail"] {
        Value::Null => error.to_string(),
        Value::String(d) => format!("{error}: {d}"),
        detail => match detail["message"].as_str() {
            Some(m) => format!("{error}: {m}"),
            None => format!("{error}: {detail}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::refusal;
    use serde_json::json;

    #[test]
    fn the_engines_error_reads_as_one_line() {
        let body = json!({"error": "invalid plugin", "detail": {"message": "the module is 9 bytes"}});
        assert_eq!(refusal(&body), "invalid plugin: the module is 9 bytes");
        assert_eq!(refusal(&json!({"error": "gone", "detail": "v7"})), "gone: v7");
        assert_eq!(refusal(&json!("plain text")), "no reason given");
    }
}
