//! The plugins page: each slot's active and shadow versions with their actions (upload,
//! promote, roll back, discard), every stored version with its calls, errors and call
//! latency on this instance, the slot's timeline (who did what, from the audit log), the
//! shadow run's differences field by field, and what-if runs of a chosen component over
//! the recorded events.

use serde_json::Value;
use sycamore::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use crate::App;
use crate::api;

/// How far apart a slot's change and its audit record may be and still be matched: the
/// audit records the request when its answer is ready (after the change); another
/// instance records a replicated change when it comes round (after the audit).
const AUDIT_MATCH_MS: i64 = 60_000;
const AUDIT_BEFORE_MS: i64 = 10_000;
/// Shadow differences shown per slot.
const SHADOW_ROWS: usize = 20;

#[derive(Clone, Copy)]
pub struct PluginsState {
    slots: Signal<Vec<Value>>,
    reports: Signal<Vec<(String, Value)>>,
    /// The newest audit records: who changed a slot.
    audit: Signal<Vec<Value>>,
    upload_slot: Signal<String>,
    upload_shadow: Signal<bool>,
    message: Signal<String>,
    /// How far back a what-if run reads: a duration (`1h`) or an RFC 3339 time.
    whatif_since: Signal<String>,
    whatif: Signal<Option<Value>>,
}

impl PluginsState {
    pub fn new() -> Self {
        PluginsState {
            slots: create_signal(Vec::new()),
            reports: create_signal(Vec::new()),
            audit: create_signal(Vec::new()),
            upload_slot: create_signal("order-rules".into()),
            upload_shadow: create_signal(true),
            message: create_signal(String::new()),
            whatif_since: create_signal("1h".into()),
            whatif: create_signal(None),
        }
    }
}

thread_local! {
    static REFRESHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub fn refresh(app: App) {
    let o = app.plugins;
    let ticket = api::Ticket::take(&REFRESHES);
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
            if !ticket.newest() {
                return;
            }
            o.slots.set(slots);
            o.reports.set(reports);
        }
        // The timeline names who acted only where the audit can be read (off loopback
        // that takes a token); without it, it still says what happened and when.
        if let Ok(r) = api::get("/audit?limit=1000").await
            && r.ok()
            && let Ok(page) = r.json::<Value>()
            && ticket.newest()
        {
            o.audit.set(page["items"].as_array().cloned().unwrap_or_default());
        }
    });
}

fn act(
    app: App,
    method: &'static str,
    path: String,
    body: Option<(wasm_bindgen::JsValue, &'static str)>,
    done: String,
) {
    let o = app.plugins;
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

/// The component chosen in the file input, or a message saying to choose one.
fn chosen_file(o: PluginsState) -> Option<web_sys::File> {
    let input = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.query_selector("[data-testid=plugin-file]").ok().flatten())
        .and_then(|e| e.dyn_into::<web_sys::HtmlInputElement>().ok());
    let file = input.and_then(|i| i.files()).and_then(|f| f.get(0));
    if file.is_none() {
        o.message.set("choose a .wasm file first".into());
    }
    file
}

async fn file_bytes(file: &web_sys::File) -> Result<js_sys::Uint8Array, String> {
    let buf = JsFuture::from(file.array_buffer()).await.map_err(|_| "could not read the file".to_string())?;
    Ok(js_sys::Uint8Array::new(&buf))
}

/// Reads the chosen file and PUTs its bytes to the slot; the engine validates it.
fn upload(app: App) {
    let o = app.plugins;
    let Some(file) = chosen_file(o) else { return };
    let slot = o.upload_slot.get_clone_untracked();
    let shadow = o.upload_shadow.get_untracked();
    wasm_bindgen_futures::spawn_local(async move {
        match file_bytes(&file).await {
            Ok(bytes) => {
                let path = format!("/plugins/{}?shadow={shadow}", api::enc(&slot));
                let what = if shadow { "uploaded as shadow" } else { "uploaded and activated" };
                act(app, "PUT", path, Some((bytes.into(), "application/wasm")), format!("{} {what}", file.name()));
            }
            Err(e) => o.message.set(e),
        }
    });
}

/// A what-if run: the chosen component and the active order rules decide the events
/// recorded since the window's start; nothing is written or deployed.
fn what_if(app: App) {
    let o = app.plugins;
    let Some(file) = chosen_file(o) else { return };
    let since = o.whatif_since.get_clone_untracked().trim().to_string();
    o.whatif.set(None);
    o.message.set(format!("what if {}: deciding the events recorded since {since}…", file.name()));
    wasm_bindgen_futures::spawn_local(async move {
        let bytes = match file_bytes(&file).await {
            Ok(b) => b,
            Err(e) => return o.message.set(e),
        };
        let path = format!("/plugins/order-rules/replay?since={}", api::enc(&since));
        match api::call_raw("POST", &path, Some((bytes.into(), "application/wasm")), None).await {
            Ok(r) if r.ok() => match r.json::<Value>() {
                Ok(report) => {
                    o.message.set(format!("what if {}: done", file.name()));
                    o.whatif.set(Some(report));
                }
                Err(e) => o.message.set(e),
            },
            Ok(r) => o.message.set(r.error_text()),
            Err(e) => o.message.set(e),
        }
    });
}

fn version_text(v: &Value) -> String {
    if v.is_object() { format!("v{} ({})", v["version"], v["decided_by"].as_str().unwrap_or("")) } else { "–".into() }
}

/// The audit route of a slot's change, as the audit names it.
fn audit_action(slot: &str, action: &str, version: &Value) -> Option<(String, String)> {
    let (method, target) = match action {
        "deploy" | "shadow" => ("PUT", format!("/plugins/{slot}")),
        "promote" | "rollback" => ("POST", format!("/plugins/{slot}/{action}")),
        "discard" => ("DELETE", format!("/plugins/{slot}/shadow")),
        "activate" => ("POST", format!("/plugins/{slot}/versions/{version}/activate")),
        _ => return None,
    };
    Some((method.to_string(), target))
}

fn millis(v: &Value) -> Option<i64> {
    let text = v.as_str()?;
    Some(js_sys::Date::parse(text) as i64).filter(|ms| *ms > 0)
}

/// Who made each change of a slot: the token of the successful audit record of the same
/// route nearest in time to it (within [`AUDIT_BEFORE_MS`] before and [`AUDIT_MATCH_MS`]
/// after), each record used once.
fn actors(slot: &str, history: &[Value], audit: &[Value]) -> Vec<String> {
    let mut used = vec![false; audit.len()];
    history
        .iter()
        .map(|h| {
            let action = h["action"].as_str().unwrap_or("");
            if action == "builtin" {
                return "the engine".into();
            }
            let (Some((method, target)), Some(at)) = (audit_action(slot, action, &h["version"]), millis(&h["at"]))
            else {
                return "–".into();
            };
            let gap = |a: &Value| millis(&a["at"]).map(|t| t - at);
            let found = audit
                .iter()
                .enumerate()
                .filter(|(i, a)| {
                    let route = a["action"].as_str().unwrap_or("");
                    !used[*i]
                        && a["outcome"] == "done"
                        && a["target"].as_str().is_some_and(|t| t.split('?').next() == Some(target.as_str()))
                        && route.starts_with(&method)
                        && gap(a).is_some_and(|g| (-AUDIT_BEFORE_MS..=AUDIT_MATCH_MS).contains(&g))
                })
                .min_by_key(|(_, a)| gap(a).map_or(i64::MAX, i64::abs));
            match found {
                Some((i, a)) => {
                    used[i] = true;
                    a["token"].as_str().unwrap_or("?").to_string()
                }
                None => "not in the audit".into(),
            }
        })
        .collect()
}

fn when(v: &Value) -> String {
    let t: String = v.as_str().unwrap_or("").replace('T', " ").chars().take(19).collect();
    if t.is_empty() { t } else { format!("{t} UTC") }
}

fn versions_view(slot: &str, s: &Value) -> View {
    let active = s["active"]["version"].as_u64();
    let shadow = s["shadow"]["version"].as_u64();
    let rows: Vec<View> = s["versions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .rev()
        .map(|v| {
            let n = v["version"].as_u64().unwrap_or(0);
            let state = match (Some(n) == active, Some(n) == shadow) {
                (true, _) => "active",
                (_, true) => "shadow",
                _ => "",
            };
            let c = &v["calls"];
            let (calls, errors) = (c["calls"].as_u64(), c["errors"].as_u64());
            let rate = match (calls, errors) {
                (Some(n), Some(e)) if n > 0 => format!("{:.1}%", e as f64 * 100.0 / n as f64),
                _ => "–".into(),
            };
            let us = |k: &str| c[k].as_u64().map(|u| format!("{:.2} ms", u as f64 / 1000.0)).unwrap_or("–".into());
            let count = |x: Option<u64>| x.map(|n| n.to_string()).unwrap_or("not loaded".into());
            let cells = [
                format!("v{n}"),
                state.to_string(),
                v["origin"].as_str().unwrap_or("").to_string(),
                when(&v["created_at"]),
                count(calls),
                count(errors),
                rate,
                us("p50_us"),
                us("p99_us"),
            ];
            let cells: Vec<View> = cells.into_iter().map(|t| view! { td { (t) } }).collect();
            view! { tr(data-testid="plugin-version", data-version=n.to_string()) { (cells) } }
        })
        .collect();
    let caption = format!("{slot}: versions (calls on this instance since loaded)");
    let heads: Vec<View> = ["version", "state", "origin", "stored", "calls", "errors", "error rate", "p50", "p99"]
        .into_iter()
        .map(|h| view! { th(scope="col") { (h) } })
        .collect();
    let slot = slot.to_string();
    view! {
        table(class="groups", data-testid="plugin-versions", data-slot=slot) {
            caption { (caption) }
            thead { tr { (heads) } }
            tbody { (rows) }
        }
    }
}

fn timeline_view(slot: &str, s: &Value, audit: &[Value]) -> View {
    let history = s["history"].as_array().cloned().unwrap_or_default();
    let by = actors(slot, &history, audit);
    let items: Vec<View> = history
        .iter()
        .zip(by)
        .rev()
        .map(|(h, by)| {
            let action = h["action"].as_str().unwrap_or("").to_string();
            let text = format!("{} · v{} · {action} · by {by}", when(&h["at"]), h["version"]);
            view! { li(data-testid="plugin-event", data-action=action) { (text) } }
        })
        .collect();
    let title = format!("{slot}: timeline (newest first)");
    let slot = slot.to_string();
    view! {
        h3 { (title) }
        ol(class="plugin-timeline", data-testid="plugin-timeline", data-slot=slot) { (items) }
    }
}

fn shadow_view(slot: &str, r: &Value) -> View {
    let text = format!(
        "{slot} shadow v{}: {} compared, {} agree, {} differ, {} skipped (candidate behind)",
        r["version"], r["compared"], r["agreed"], r["differed"], r["skipped"]
    );
    let caption = format!("{slot}: where the candidate decides differently (first {SHADOW_ROWS} events)");
    let table = diffs_table(caption, "shadow-diffs", "shadow-diff", &r["samples"]);
    view! {
        div(data-testid="shadow-report") { (text) }
        (table)
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table of differences (shadow or what-if samples): a row per differing field, the
/// event and order named on its first.
fn diffs_table(caption: String, testid: &'static str, row_testid: &'static str, samples: &Value) -> View {
    let mut rows = Vec::new();
    for d in samples.as_array().cloned().unwrap_or_default().into_iter().take(SHADOW_ROWS) {
        for (i, f) in d["fields"].as_array().cloned().unwrap_or_default().into_iter().enumerate() {
            let (event, order) =
                if i == 0 { (shown(&d["event_id"]), shown(&d["order_id"])) } else { Default::default() };
            let (field, active, candidate) = (shown(&f["field"]), shown(&f["active"]), shown(&f["candidate"]));
            rows.push(view! {
                tr(data-testid=row_testid) {
                    td { (event) } td { (order) } th(scope="row") { (field) } td { (active) } td { (candidate) }
                }
            });
        }
    }
    view! {
        table(class="groups", data-testid=testid) {
            caption { (caption) }
            thead {
                tr {
                    th(scope="col") { "event" } th(scope="col") { "order" } th(scope="col") { "field" }
                    th(scope="col") { "active" } th(scope="col") { "candidate" }
                }
            }
            tbody { (rows) }
        }
    }
}

/// A what-if report: what was decided, how the two sides' decisions split by kind, what
/// each cost per event, and the first differences.
fn whatif_view(r: &Value) -> View {
    let mut text = format!(
        "what-if over {} recorded events since {}: {} agree, {} differ; errors {} active, {} candidate; \
         {:.1} µs per event active, {:.1} candidate; {:.0} ms",
        r["cases"],
        when(&r["since"]),
        r["agreed"],
        r["differed"],
        r["errors"]["active"],
        r["errors"]["candidate"],
        r["cost_us_per_event"]["active"].as_f64().unwrap_or(0.0),
        r["cost_us_per_event"]["candidate"].as_f64().unwrap_or(0.0),
        r["took_ms"].as_f64().unwrap_or(0.0),
    );
    if r["limited"] == true {
        text.push_str(" (the window held more: the newest were left out)");
    }
    if r["cut_short"] == true {
        text.push_str(" (the deadline cut the run short)");
    }
    let (active, candidate) = (&r["decisions"]["active"], &r["decisions"]["candidate"]);
    let mut kinds: Vec<String> =
        [active, candidate].iter().filter_map(|side| side.as_object()).flat_map(|m| m.keys().cloned()).collect();
    kinds.sort();
    kinds.dedup();
    let count = |side: &Value, k: &str| side[k].as_u64().unwrap_or(0).to_string();
    let rows: Vec<View> = kinds
        .iter()
        .map(|k| {
            let (a, c, k) = (count(active, k), count(candidate, k), k.clone());
            view! { tr(data-testid="whatif-decision") { th(scope="row") { (k) } td { (a) } td { (c) } } }
        })
        .collect();
    let caption = format!("where the candidate decides differently (first {SHADOW_ROWS} events)");
    let diffs = diffs_table(caption, "whatif-diffs", "whatif-diff", &r["samples"]);
    view! {
        div(data-testid="whatif-report") { (text) }
        table(class="groups", data-testid="whatif-decisions") {
            caption { "decisions by kind" }
            thead { tr { th(scope="col") { "decision" } th(scope="col") { "active" } th(scope="col") { "candidate" } } }
            tbody { (rows) }
        }
        (diffs)
    }
}

pub fn view(app: App) -> View {
    let o = app.plugins;
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
                let promote = move |_| act(app, "POST", path(&n1, "promote"), None, format!("{n1}: shadow promoted"));
                let rollback = move |_| act(app, "POST", path(&n2, "rollback"), None, format!("{n2}: rolled back"));
                let discard = move |_| act(app, "DELETE", path(&n3, "shadow"), None, format!("{n3}: shadow discarded"));
                view! {
                    tr(data-testid=testid) {
                        td { (name) }
                        td(data-testid="plugin-active") { (active) }
                        td(data-testid="plugin-shadow") { (shadow) }
                        td {
                            button(data-testid="plugin-promote", disabled=no_token, on:click=promote) { "Promote" }
                            button(data-testid="plugin-rollback", disabled=no_token, on:click=rollback) { "Roll back" }
                            button(data-testid="plugin-discard", disabled=no_token, on:click=discard) {
                                "Discard shadow"
                            }
                        }
                    }
                }
            })
            .collect();
        View::from(rows)
    };
    let reports = move || {
        let rows: Vec<View> = o.reports.get_clone().into_iter().map(|(slot, r)| shadow_view(&slot, &r)).collect();
        View::from(rows)
    };
    let details = move || {
        let audit = o.audit.get_clone();
        let rows: Vec<View> = o
            .slots
            .get_clone()
            .into_iter()
            .map(|s| {
                let slot = s["slot"].as_str().unwrap_or("").to_string();
                let (versions, timeline) = (versions_view(&slot, &s), timeline_view(&slot, &s, &audit));
                view! { div(class="plugin-slot") { (versions) (timeline) } }
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
                label {
                    "what-if over the events since "
                    input(
                        data-testid="whatif-since",
                        size="12",
                        placeholder="1h, 30m or a time",
                        bind:value=o.whatif_since
                    )
                }
                button(data-testid="whatif-run", disabled=no_token, on:click=move |_| what_if(app)) { "What if" }
                (crate::need_token(app, "upload, promote, roll back, discard or try plugins"))
            }
            div(class="msg", data-testid="plugin-message") { (message) }
            (move || o.whatif.get_clone().map(|r| whatif_view(&r)).unwrap_or_default())
            button(data-testid="plugins-refresh", on:click=move |_| refresh(app)) { "Refresh" }
            (details)
        }
    }
}
