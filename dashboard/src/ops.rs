//! Engine health (backend, queue depth, logs), polled every 2 s while its page shows.

use serde_json::Value;
use sycamore::prelude::*;

use crate::App;
use crate::api;

#[derive(Clone, Copy)]
pub struct OpsState {
    health: Signal<Value>,
    /// Latest engine log lines (`GET /logs`), or why they are not shown.
    logs: Signal<Vec<Value>>,
    logs_error: Signal<String>,
}

impl OpsState {
    pub fn new() -> Self {
        OpsState {
            health: create_signal(Value::Null),
            logs: create_signal(Vec::new()),
            logs_error: create_signal(String::new()),
        }
    }
}

/// Health and logs every 2 s while the health page shows: they have no push channel.
pub fn poll_health(app: App) {
    crate::nav::every_while_shown(app, crate::nav::Section::Health, 2000, move || {
        wasm_bindgen_futures::spawn_local(async move {
            let v = match api::get("/health").await {
                Ok(r) => r.json::<Value>().unwrap_or(Value::Null),
                Err(e) => serde_json::json!({ "status": format!("unreachable: {e}") }),
            };
            app.ops.health.set(v);
            match api::get("/logs?limit=50").await {
                Ok(r) if r.ok() => match r.json::<Vec<Value>>() {
                    Ok(lines) => {
                        app.ops.logs_error.set(String::new());
                        app.ops.logs.set(lines);
                    }
                    Err(e) => app.ops.logs_error.set(format!("logs unavailable: {e}")),
                },
                Ok(r) if r.status == 404 => {
                    app.ops.logs_error.set("logs unavailable (this engine has no /logs)".into())
                }
                Ok(r) => app.ops.logs_error.set(format!("logs unavailable: {}", r.error_text())),
                Err(e) => app.ops.logs_error.set(format!("logs unavailable: {e}")),
            }
        });
    });
}

pub fn health_view(app: App) -> View {
    let h = app.ops.health;
    let get = move |f: fn(&Value) -> String| move || h.with(|h| if h.is_null() { "…".to_string() } else { f(h) });
    let status = get(|h| h["status"].as_str().unwrap_or("?").to_string());
    let backend = get(|h| h["backend"].as_str().unwrap_or("?").to_string());
    let lag_vip = get(|h| h["queue_depth"]["vip"].to_string());
    let lag_normal = get(|h| h["queue_depth"]["normal"].to_string());
    let text = get(|h| {
        format!(
            "{} · backend {} · queue VIP {} / NORMAL {} · applied {} · \
             skipped {} · rejected {} · CAS conflicts {}",
            h["status"].as_str().unwrap_or("?"),
            h["backend"].as_str().unwrap_or("?"),
            h["queue_depth"]["vip"],
            h["queue_depth"]["normal"],
            h["applied"],
            h["skipped"],
            h["rejected"],
            h["cas_conflicts"]
        )
    });
    let (logs, logs_error) = (app.ops.logs, app.ops.logs_error);
    let lines = move || {
        let rows: Vec<View> = logs
            .get_clone()
            .into_iter()
            .rev()
            .map(|l| {
                let level = l["level"].as_str().unwrap_or("").to_string();
                let class = format!("log lv-{}", level.to_lowercase());
                let text = format!(
                    "{} {} {} {}",
                    l["at"].as_str().unwrap_or("").replace('T', " ").chars().take(23).collect::<String>(),
                    level,
                    l["target"].as_str().unwrap_or(""),
                    l["message"].as_str().unwrap_or("")
                );
                view! { li(class=class, data-testid="log-line") { (text) } }
            })
            .collect();
        View::from(rows)
    };
    view! {
        section(class="panel health", data-testid="health") {
            h2 { "Engine" }
            div(data-testid="health-text") { (text) }
            table(class="health-table") {
                tr {
                    th { "status" }
                    td(data-testid="health-status") { (status) }
                    th { "backend" }
                    td(data-testid="health-backend") { (backend) }
                }
                tr {
                    th { "consumer lag VIP" }
                    td(data-testid="lag-vip") { (lag_vip) }
                    th { "consumer lag NORMAL" }
                    td(data-testid="lag-normal") { (lag_normal) }
                }
            }
            h3 { "Recent logs (newest first)" }
            div(class="muted", data-testid="logs-error") { (move || logs_error.get_clone()) }
            ul(class="logs", data-testid="logs") { (lines) }
        }
    }
}
