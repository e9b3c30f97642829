//! The dead-letters page: letters grouped by stage and kind of failure with counts,
//! each letter's payload, a replay of one, and a filtered bulk replay or purge
//! (`POST /dead-letters/replay`, `/purge`) behind a confirmation that names what it takes.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sycamore::prelude::*;

use crate::App;
use crate::api;

/// Letters loaded for the page (the API's largest page), oldest first.
const LOADED: usize = 1000;

#[derive(Clone, Copy)]
pub struct LettersState {
    items: Signal<Vec<Value>>,
    /// Whether the engine holds more letters than were loaded.
    more: Signal<bool>,
    stage: Signal<String>,
    error_type: Signal<String>,
    prefix: Signal<String>,
    limit: Signal<String>,
    /// Which letters a purge takes: `replayed`, `open` (not replayed) or `all`.
    purge_which: Signal<String>,
    /// The bulk request waiting for its confirmation, exactly as it will be sent.
    confirm: Signal<Option<Pending>>,
    /// Where the last bulk request stopped (its action and body, and the answer's
    /// cursor): the same request again goes on from there.
    stopped: Signal<Option<(Bulk, Value, String)>>,
    message: Signal<String>,
}

/// A bulk request and the question that asks for it.
#[derive(Clone, PartialEq)]
struct Pending {
    action: Bulk,
    body: Value,
    question: String,
}

/// A bulk action on the letters the filter matches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Replay,
    Purge,
}

impl LettersState {
    pub fn new() -> Self {
        LettersState {
            items: create_signal(Vec::new()),
            more: create_signal(false),
            stage: create_signal(String::new()),
            error_type: create_signal(String::new()),
            prefix: create_signal(String::new()),
            limit: create_signal("100".into()),
            purge_which: create_signal("replayed".into()),
            confirm: create_signal(None),
            stopped: create_signal(None),
            message: create_signal(String::new()),
        }
    }
}

thread_local! {
    static REFRESHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub fn refresh(app: App) {
    let l = app.letters;
    let ticket = api::Ticket::take(&REFRESHES);
    wasm_bindgen_futures::spawn_local(async move {
        let reply = api::get(&format!("/dead-letters?limit={LOADED}")).await;
        if !ticket.newest() {
            return;
        }
        match reply {
            Ok(r) if r.ok() => {
                if let Ok(page) = r.json::<Value>() {
                    l.more.set(page["next_cursor"].is_string());
                    l.items.set(page["items"].as_array().cloned().unwrap_or_default());
                }
            }
            Ok(r) => l.message.set(r.error_text()),
            Err(e) => l.message.set(e),
        }
    });
}

fn text(v: &Value, field: &str) -> String {
    v[field].as_str().unwrap_or("").to_string()
}

/// One replay, or a bulk action: the answer goes in the page's message line, then the
/// list reloads.
fn send(app: App, path: String, body: Option<Value>, done: impl Fn(&Value) -> String + 'static) {
    let l = app.letters;
    l.message.set("sending…".into());
    wasm_bindgen_futures::spawn_local(async move {
        match api::call("POST", &path, body.map(|b| b.to_string()), None).await {
            Ok(r) if r.ok() => l.message.set(done(&r.json::<Value>().unwrap_or_default())),
            Ok(r) => l.message.set(r.error_text()),
            Err(e) => l.message.set(e),
        }
        refresh(app);
    });
}

/// What the filter says in words, for the confirmation.
fn described(l: LettersState, action: Bulk) -> String {
    let mut parts = Vec::new();
    for (what, value) in [("stage", l.stage), ("kind", l.error_type), ("orders starting", l.prefix)] {
        let v = value.get_clone_untracked();
        if !v.trim().is_empty() {
            parts.push(format!("{what} {}", v.trim()));
        }
    }
    let which = match (action, l.purge_which.get_clone_untracked().as_str()) {
        (Bulk::Replay, _) | (Bulk::Purge, "open") => "not replayed yet",
        (Bulk::Purge, "replayed") => "replayed already",
        _ => "replayed or not",
    };
    if parts.is_empty() { format!("every letter {which}") } else { format!("{}; {which}", parts.join(", ")) }
}

/// The request a bulk action sends for the form as it is now, with its question; it
/// goes on from where the same request stopped last.
fn pending(l: LettersState, action: Bulk) -> Pending {
    let limit: u64 = l.limit.get_clone_untracked().trim().parse().unwrap_or(0);
    let mut body = json!({ "limit": limit });
    for (field, value) in [("stage", l.stage), ("error_type", l.error_type), ("order_prefix", l.prefix)] {
        let v = value.get_clone_untracked();
        if !v.trim().is_empty() {
            body[field] = json!(v.trim());
        }
    }
    if action == Bulk::Purge {
        match l.purge_which.get_clone_untracked().as_str() {
            "replayed" => body["replayed"] = json!(true),
            "open" => body["replayed"] = json!(false),
            _ => {}
        }
    }
    let what = described(l, action);
    let question = match action {
        Bulk::Replay => format!("Replay up to {limit} letters: {what}?"),
        Bulk::Purge => format!("Delete for good up to {limit} letters: {what}?"),
    };
    let mut sent = body.clone();
    if let Some((a, b, cursor)) = l.stopped.get_clone_untracked()
        && a == action
        && b == body
    {
        sent["cursor"] = json!(cursor);
    }
    Pending { action, body: sent, question }
}

/// Sends the confirmed request, and keeps where it stopped.
fn bulk(app: App, p: Pending) {
    let l = app.letters;
    l.confirm.set(None);
    let mut plain = p.body.clone();
    if let Some(o) = plain.as_object_mut() {
        o.remove("cursor");
    }
    let stop = move |r: &Value| {
        let at = r["next_cursor"].as_str().map(|c| (p.action, plain.clone(), c.to_string()));
        let more = at.is_some();
        l.stopped.set(at);
        more
    };
    if p.action == Bulk::Purge {
        send(app, "/dead-letters/purge".into(), Some(p.body), move |r| {
            let n = r["purged"].as_array().map_or(0, Vec::len);
            let mut out = format!("purged {n} of {} looked at", r["scanned"].as_u64().unwrap_or(0));
            if stop(r) {
                out.push_str("; more letters are left to look at: purge again to go on");
            }
            out
        });
        return;
    }
    send(app, "/dead-letters/replay".into(), Some(p.body), move |r| {
        let count = |f: &str| r[f].as_array().map_or(0, Vec::len);
        let failed: Vec<String> = r["failed"]
            .as_array()
            .map(|f| f.iter().map(|x| format!("{} ({})", text(x, "id"), text(x, "error"))).collect())
            .unwrap_or_default();
        let mut out = format!("replayed {} of {} looked at", count("replayed"), r["scanned"].as_u64().unwrap_or(0));
        if !failed.is_empty() {
            out.push_str(&format!("; {} failed: {}", failed.len(), failed.join("; ")));
        }
        if stop(r) {
            out.push_str("; more letters are left to look at: replay again to go on");
        }
        out
    });
}

/// Letters by (stage, kind): how many, and how many not replayed yet.
fn groups(items: &[Value]) -> BTreeMap<(String, String), (usize, usize)> {
    let mut out: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    for d in items {
        let g = out.entry((text(d, "stage"), text(d, "error_type"))).or_default();
        g.0 += 1;
        g.1 += usize::from(d["replayed_at"].is_null());
    }
    out
}

fn groups_view(app: App) -> View {
    let l = app.letters;
    let rows = move || {
        let rows: Vec<View> = groups(&l.items.get_clone())
            .into_iter()
            .map(|((stage, kind), (all, open))| {
                let (s, k) = (stage.clone(), kind.clone());
                let pick = move |_| {
                    l.stage.set(s.clone());
                    l.error_type.set(k.clone());
                };
                let (stage_attr, kind_attr) = (stage.clone(), kind.clone());
                view! {
                    tr(data-testid="dead-letter-group", data-stage=stage_attr, data-error-type=kind_attr) {
                        td { (stage) } td { (kind) }
                        td(class="num", data-testid="group-count") { (all) }
                        td(class="num") { (open) }
                        td { button(data-testid="group-pick", on:click=pick) { "Filter" } }
                    }
                }
            })
            .collect();
        View::from(rows)
    };
    let scope = move || {
        let n = l.items.with(Vec::len);
        if l.more.get() { format!("the oldest {n} letters (more are held)") } else { format!("all {n} letters") }
    };
    view! {
        table(class="groups") {
            caption { "By stage and kind, over " (scope) }
            thead {
                tr {
                    th { "stage" } th { "kind" } th { "letters" } th { "not replayed" }
                    th { span(class="sr-only") { "filter" } }
                }
            }
            tbody { (rows) }
        }
    }
}

fn bulk_view(app: App) -> View {
    let l = app.letters;
    let no_token = crate::no_token(app);
    let (stage, kind, prefix, limit, which) = (l.stage, l.error_type, l.prefix, l.limit, l.purge_which);
    let ask = move |action: Bulk| move |_| l.confirm.set(Some(pending(l, action)));
    // While a question shows, the form is fixed: what was asked is what is sent.
    let asking = move || l.confirm.with(Option::is_some);
    let confirm = move || {
        let Some(p) = l.confirm.get_clone() else {
            return view! {
                button(data-testid="bulk-replay", disabled=no_token, on:click=ask(Bulk::Replay)) {
                    "Replay matching…"
                }
                label {
                    "purge "
                    select(data-testid="purge-which", bind:value=which) {
                        option(value="replayed") { "replayed" }
                        option(value="open") { "not replayed" }
                        option(value="all") { "all" }
                    }
                }
                button(data-testid="bulk-purge", disabled=no_token, on:click=ask(Bulk::Purge)) {
                    "Purge matching…"
                }
            };
        };
        let yes = if p.action == Bulk::Replay { "Yes, replay" } else { "Yes, delete them" };
        let question = p.question.clone();
        view! {
            span(class="warn", data-testid="bulk-question") { (question) " " }
            button(data-testid="bulk-confirm", on:click=move |_| bulk(app, p.clone())) { (yes) }
            button(data-testid="bulk-abort", on:click=move |_| l.confirm.set(None)) { "Keep them" }
        }
    };
    view! {
        div(class="controls bulk") {
            label { "stage " input(data-testid="bulk-stage", disabled=asking, bind:value=stage) }
            label { "kind " input(data-testid="bulk-error-type", disabled=asking, bind:value=kind) }
            label { "order id starts " input(data-testid="bulk-prefix", disabled=asking, bind:value=prefix) }
            label {
                "at most "
                input(
                    data-testid="bulk-limit", r#type="number", min="1", max="1000", disabled=asking, bind:value=limit
                )
            }
            (confirm)
        }
    }
}

fn list_view(app: App) -> View {
    let l = app.letters;
    let no_token = crate::no_token(app);
    let rows = move || {
        let rows: Vec<View> = l
            .items
            .get_clone()
            .into_iter()
            .rev()
            .map(|d| {
                let id = text(&d, "id");
                let replayed = !d["replayed_at"].is_null();
                let line = format!(
                    "{} · order {} · {} · {}: {}",
                    text(&d, "recorded_at").chars().take(19).collect::<String>(),
                    text(&d, "order_id"),
                    text(&d, "stage"),
                    text(&d, "error_type"),
                    text(&d, "reason")
                );
                // The payload as sent, indented when it is JSON.
                let raw = text(&d, "payload");
                let payload = serde_json::from_str::<Value>(&raw)
                    .ok()
                    .and_then(|v| serde_json::to_string_pretty(&v).ok())
                    .unwrap_or(raw);
                let path = format!("/dead-letters/{}/replay", api::enc(&id));
                let done = format!("{id} replayed");
                let disabled = move || no_token() || replayed;
                view! {
                    li(data-testid="dead-letter", data-id=id) {
                        (line) " "
                        button(
                            data-testid="dead-letter-replay",
                            disabled=disabled,
                            on:click=move |_| {
                                let done = done.clone();
                                send(app, path.clone(), None, move |_| done.clone())
                            }
                        ) {
                            (if replayed { "replayed" } else { "Replay" })
                        }
                        details(data-testid="dead-letter-payload") {
                            summary { "payload" }
                            pre { (payload) }
                        }
                    }
                }
            })
            .collect();
        View::from(rows)
    };
    view! { ul(class="dead-list") { (rows) } }
}

pub fn view(app: App) -> View {
    let message = move || app.letters.message.get_clone();
    view! {
        section(class="panel dead", data-testid="dead-letters") {
            h2 {
                "Dead letters "
                button(data-testid="dead-letters-refresh", on:click=move |_| refresh(app)) { "Refresh" }
            }
            (groups_view(app))
            (bulk_view(app))
            (crate::need_token(app, "replay or purge dead letters"))
            div(class="msg", data-testid="dead-letters-message", role="status") { (message) }
            h3 { "Newest first" }
            (list_view(app))
        }
    }
}
