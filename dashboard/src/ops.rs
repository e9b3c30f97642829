//! Plugins (slots with active and shadow versions: upload, promote, roll back, shadow
//! report) and engine health (backend, queue depth, logs).

use serde_json::Value;
use sycamore::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use crate::App;
use crate::api;

#[derive(Clone, Copy)]
pub struct OpsState {
    slots: Signal<Vec<Value>>,
    reports: Signal<Vec<(String, Value)>>,
    upload_slot: Signal<String>,
    upload_shadow: Signal<bool>,
    message: Signal<String>,
    health: Signal<Value>,
    /// Latest engine log lines (`GET /logs`), or why they are not shown.
    logs: Signal<Vec<Value>>,
    logs_error: Signal<String>,
}

impl OpsState {
    pub fn new() -> Self {
        OpsState {
            slots: create_signal(Vec::new()),
            reports: create_signal(Vec::new()),
            upload_slot: create_signal("order-rules".into()),
            upload_shadow: create_signal(true),
            message: create_signal(String::new()),
            health: create_signal(Value::Null),
            logs: create_signal(Vec::new()),
            logs_error: create_signal(String::new()),
        }
    }
}

/// Health every 2 s: it has no push channel, and it is one small request.
pub fn poll_health(app: App) {
    let tick = move || {
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
    };
    tick();
    let cb = wasm_bindgen::closure::Closure::<dyn FnMut()>::new(tick);
    if let Some(w) = web_sys::window() {
        let _ = w.set_interval_with_callback_and_timeout_and_arguments_0(cb.as_ref().unchecked_ref(), 2000);
    }
    cb.forget();
}

pub fn refresh(app: App) {
    let o = app.ops;
    wasm_bindgen_futures::spawn_local(async move {
        if let Ok(r) = api::get("/plugins").await
            && r.ok()
            && let Ok(slots) = r.json::<Vec<Value>>()
        {
            let mut reports = Vec::new();
            for s in &slots {
                let name = s["slot"].as_str().unwrap_or("").to_string();
                if s["shadow"].is_object()
                    && let Ok(r) = api::get(&format!("/plugins/{}/shadow-report", api::enc(&name))).await
                    && r.ok()
                    && let Ok(v) = r.json::<Value>()
                {
                    reports.push((name, v));
                }
            }
            o.slots.set(slots);
            o.reports.set(reports);
        }
    });
    crate::letters::refresh(app);
}

fn act(
    app: App,
    method: &'static str,
    path: String,
    body: Option<(wasm_bindgen::JsValue, &'static str)>,
    done: String,
) {
    let o = app.ops;
    o.message.set(format!("{done}…"));
    wasm_bindgen_futures::spawn_local(async move {
        match api::call_raw(method, &path, body, None).await {
            Ok(r) if r.ok() => o.message.set(done),
            Ok(r) => o.message.set(r.error_text()),
            Err(e) => o.message.set(e),
        }
        refresh(app);
    });
}

/// Reads the chosen file and PUTs its bytes to the slot; the engine validates it.
fn upload(app: App) {
    let o = app.ops;
    let input = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.query_selector("[data-testid=plugin-file]").ok().flatten())
        .and_then(|e| e.dyn_into::<web_sys::HtmlInputElement>().ok());
    let Some(file) = input.and_then(|i| i.files()).and_then(|f| f.get(0)) else {
        return o.message.set("choose a .wasm file first".into());
    };
    let slot = o.upload_slot.get_clone_untracked();
    let shadow = o.upload_shadow.get_untracked();
    wasm_bindgen_futures::spawn_local(async move {
        match JsFuture::from(file.array_buffer()).await {
            Ok(buf) => {
                let bytes = js_sys::Uint8Array::new(&buf);
                let path = format!("/plugins/{}?shadow={shadow}", api::enc(&slot));
                let what = if shadow { "uploaded as shadow" } else { "uploaded and activated" };
                act(app, "PUT", path, Some((bytes.into(), "application/wasm")), format!("{} {what}", file.name()));
            }
            Err(_) => o.message.set("could not read the file".into()),
        }
    });
}

fn version_text(v: &Value) -> String {
    if v.is_object() { format!("v{} ({})", v["version"], v["decided_by"].as_str().unwrap_or("")) } else { "–".into() }
}

pub fn plugins_view(app: App) -> View {
    let o = app.ops;
    let no_token = crate::no_token(app);
    let slots = move || {
        let rows: Vec<View> = o
            .slots
            .get_clone()
            .into_iter()
            .map(|s| {
                let name = s["slot"].as_str().unwrap_or("").to_string();
                let active = version_text(&s["active"]);
                let shadow = version_text(&s["shadow"]);
                let (n1, n2, n3) = (name.clone(), name.clone(), name.clone());
                let testid = format!("plugin-{name}");
                let path = move |n: &str, op: &str| format!("/plugins/{}/{op}", api::enc(n));
                view! {
                    tr(data-testid=testid) {
                        td { (name) }
                        td(data-testid="plugin-active") { (active) }
                        td(data-testid="plugin-shadow") { (shadow) }
                        td {
                            button(
                                data-testid="plugin-promote",
                                disabled=no_token,
                                on:click=move |_| act(
                                    app,
                                    "POST",
                                    path(&n1, "promote"),
                                    None,
                                    format!("{n1}: shadow promoted")
                                )
                            ) { "Promote" }
                            button(
                                data-testid="plugin-rollback",
                                disabled=no_token,
                                on:click=move |_| act(
                                    app,
                                    "POST",
                                    path(&n2, "rollback"),
                                    None,
                                    format!("{n2}: rolled back")
                                )
                            ) { "Roll back" }
                            button(
                                data-testid="plugin-discard",
                                disabled=no_token,
                                on:click=move |_| act(
                                    app,
                                    "DELETE",
                                    path(&n3, "shadow"),
                                    None,
                                    format!("{n3}: shadow discarded")
                                )
                            ) { "Discard shadow" }
                        }
                    }
                }
            })
            .collect();
        View::from(rows)
    };
    let reports = move || {
        let rows: Vec<View> = o
            .reports
            .get_clone()
            .into_iter()
            .map(|(slot, r)| {
                let text = format!(
                    "{slot} shadow v{}: {} compared, {} agree, {} differ, {} skipped (candidate behind)",
                    r["version"], r["compared"], r["agreed"], r["differed"], r["skipped"]
                );
                let samples: Vec<View> = r["samples"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .take(5)
                    .map(|d| {
                        let t = d.to_string();
                        view! { li(class="sample") { (t) } }
                    })
                    .collect();
                view! { div(data-testid="shadow-report") { (text) ul { (samples) } } }
            })
            .collect();
        View::from(rows)
    };
    let (slot, shadow) = (o.upload_slot, o.upload_shadow);
    let message = move || o.message.get_clone();
    view! {
        section(class="panel plugins", data-testid="plugins") {
            h2 { "Plugins" }
            table { tr { th { "slot" } th { "active" } th { "shadow" } th { "actions" } } (slots) }
            (reports)
            div(class="controls") {
                select(data-testid="plugin-slot", aria-label="plugin slot", bind:value=slot) {
                    option(value="order-rules") { "order-rules" }
                    option(value="conflict-resolver") { "conflict-resolver" }
                }
                label { "component " input(r#type="file", accept=".wasm", data-testid="plugin-file") }
                label { input(r#type="checkbox", data-testid="plugin-as-shadow", bind:checked=shadow) " as shadow" }
                button(data-testid="plugin-upload", disabled=no_token, on:click=move |_| upload(app)) { "Upload" }
                (crate::need_token(app, "upload, promote, roll back or discard plugins"))
            }
            div(class="msg", data-testid="plugin-message") { (message) }
        }
    }
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
