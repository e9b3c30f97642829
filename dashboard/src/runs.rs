//! The runs panel: start, cancel, pause/resume per priority and reset; the current run's
//! phase and cards fed live by `run.phase`/`run.progress`; run history with verification.

use serde_json::{Value, json};
use sycamore::prelude::*;

use crate::App;
use crate::api;
use crate::chart::{self, Series};
use crate::nav::{Page, Section};

#[derive(Clone, Copy)]
pub struct RunsState {
    current: Signal<Value>,
    /// The run `/ui/runs/{id}` names; null shows the current one.
    viewing: Signal<Value>,
    history: Signal<Vec<Value>>,
    quantity: Signal<String>,
    /// Percent per tier, "DIAMOND,GOLD,SILVER,BRONZE"; empty means the engine's default.
    tier_mix: Signal<String>,
    message: Signal<String>,
    confirm_reset: Signal<bool>,
    /// Cancel options: discard the run's events still on the log; delete its PENDING orders.
    purge: Signal<bool>,
    delete_pending: Signal<bool>,
    /// Throughput samples of the current run from `run.progress`: (ms, VIP processed, NORMAL processed).
    samples: Signal<Vec<(f64, u64, u64)>>,
    samples_run: Signal<String>,
}

/// Samples kept per run for the chart: 250 ms apart, so the last few minutes.
const SAMPLES_MAX: usize = 720;

impl RunsState {
    pub fn new() -> Self {
        RunsState {
            current: create_signal(Value::Null),
            viewing: create_signal(Value::Null),
            history: create_signal(Vec::new()),
            quantity: create_signal("10000".into()),
            tier_mix: create_signal("5,15,30,50".into()),
            message: create_signal(String::new()),
            confirm_reset: create_signal(false),
            // Purge by default: without it the log keeps feeding the store after a
            // cancel, and a reset right after would be refilled.
            purge: create_signal(true),
            delete_pending: create_signal(false),
            samples: create_signal(Vec::new()),
            samples_run: create_signal(String::new()),
        }
    }
}

fn finished(phase: &str) -> bool {
    matches!(phase, "DONE" | "CANCELLED" | "FAILED")
}

/// A pushed run; a finished one also refreshes the history (it now has its verification).
pub fn on_run(app: App, run: Value) {
    if !run.is_object() {
        return;
    }
    let ended = finished(run["phase"].as_str().unwrap_or(""));
    sample(app.runs, &run);
    if app.runs.viewing.with_untracked(|v| v["id"] == run["id"]) {
        app.runs.viewing.set(run.clone());
    }
    app.runs.current.set(run);
    if ended {
        refresh(app);
    }
}

/// One point of the throughput chart; a new run id starts a new chart.
fn sample(r: RunsState, run: &Value) {
    let id = run["id"].as_str().unwrap_or("").to_string();
    if id.is_empty() {
        return;
    }
    let now = js_sys::Date::now();
    let vip = run["vip"]["processed"].as_u64().unwrap_or(0);
    let normal = run["normal"]["processed"].as_u64().unwrap_or(0);
    if r.samples_run.with_untracked(|s| *s != id) {
        r.samples_run.set(id);
        r.samples.set(vec![(now, vip, normal)]);
        return;
    }
    r.samples.update(|s| {
        // Several messages in one tick (a phase and a progress) make one point.
        if let Some(last) = s.last_mut()
            && now - last.0 < 50.0
        {
            *last = (last.0, vip.max(last.1), normal.max(last.2));
            return;
        }
        s.push((now, vip, normal));
        if s.len() > SAMPLES_MAX {
            s.remove(0);
        }
    });
}

/// Orders per second between consecutive samples: (ms since the first sample, VIP/s, NORMAL/s).
fn rates(samples: &[(f64, u64, u64)]) -> Vec<(f64, f64, f64)> {
    let Some(t0) = samples.first().map(|s| s.0) else { return Vec::new() };
    samples
        .windows(2)
        .map(|w| {
            let dt = ((w[1].0 - w[0].0) / 1000.0).max(0.001);
            (w[1].0 - t0, w[1].1.saturating_sub(w[0].1) as f64 / dt, w[1].2.saturating_sub(w[0].2) as f64 / dt)
        })
        .collect()
}

/// The chart as SVG text: one polyline per priority, scaled to the peak rate.
fn chart_svg(rates: &[(f64, f64, f64)]) -> String {
    let line = |class, color, pick: fn(&(f64, f64, f64)) -> f64| Series {
        class,
        color,
        points: rates.iter().map(|r| (r.0, pick(r))).collect(),
    };
    let series = [line("tp-vip", "var(--line-vip)", |r| r.1), line("tp-normal", "var(--line-normal)", |r| r.2)];
    chart::svg(&series, 400.0, 80.0, "peak {peak}/s")
}

fn chart_view(app: App) -> View {
    let samples = app.runs.samples;
    let node = create_node_ref();
    create_effect(move || {
        let svg = samples.with(|s| chart_svg(&rates(s)));
        if let Some(el) = node.try_get().and_then(|n| wasm_bindgen::JsCast::dyn_into::<web_sys::Element>(n).ok()) {
            el.set_inner_html(&svg);
        }
    });
    let count = move || samples.with(|s| s.len().saturating_sub(1).to_string());
    let current = app.runs.current;
    let caption = move || {
        samples.with(|s| match rates(s).last() {
            Some(&(_, v, n)) => format!("now VIP {v:.0}/s · NORMAL {n:.0}/s"),
            // A run faster than the progress messages: its windows' figures.
            None => current.with(|c| match (c["vip"]["orders_per_s"].as_f64(), c["normal"]["orders_per_s"].as_f64()) {
                (None, None) => "no progress yet".into(),
                (v, n) => {
                    let rate = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{r:.0}/s"));
                    format!("final VIP {} · NORMAL {}", rate(v), rate(n))
                }
            }),
        })
    };
    view! {
        div(class="throughput", data-testid="throughput", data-points=count) {
            div(class="legend") {
                span(class="lg-vip") { "VIP" }
                " "
                span(class="lg-normal") { "NORMAL" }
                " orders/s · "
                span(data-testid="throughput-text") { (caption) }
            }
            div(class="chart", r#ref=node) {}
        }
    }
}

/// Shows the run `/ui/runs/{id}` names, or the current one.
pub fn show(app: App, id: Option<String>) {
    let r = app.runs;
    let Some(id) = id else { return r.viewing.set(Value::Null) };
    wasm_bindgen_futures::spawn_local(async move {
        let reply = api::get(&format!("/runs/{}", api::enc(&id))).await;
        // The address moved on meanwhile: this answer is not what it names.
        if app.page.with_untracked(|p| p.section != Section::Runs || p.id.as_deref() != Some(&id)) {
            return;
        }
        match reply {
            Ok(reply) if reply.ok() => {
                if let Ok(run) = reply.json::<Value>() {
                    r.viewing.set(run);
                }
            }
            Ok(reply) => r.message.set(format!("run {id}: {}", reply.error_text())),
            Err(e) => r.message.set(e),
        }
    });
}

pub fn refresh(app: App) {
    let r = app.runs;
    wasm_bindgen_futures::spawn_local(async move {
        if let Ok(reply) = api::get("/runs/current").await
            && reply.ok()
            && let Ok(run) = reply.json::<Value>()
        {
            r.current.set(run);
        }
        if let Ok(reply) = api::get("/runs?limit=10").await
            && reply.ok()
            && let Ok(page) = reply.json::<Value>()
        {
            r.history.set(page["items"].as_array().cloned().unwrap_or_default());
        }
    });
}

/// A mutating call; its answer (or the engine's error) goes in the panel's message line.
fn act(app: App, path: String, body: Value, done: &'static str) {
    let r = app.runs;
    r.message.set(format!("{done}…"));
    wasm_bindgen_futures::spawn_local(async move {
        match api::call("POST", &path, Some(body.to_string()), None).await {
            Ok(reply) if reply.ok() => {
                r.message.set(done.into());
                if let Ok(v) = reply.json::<Value>()
                    && v["phase"].is_string()
                {
                    r.current.set(v);
                }
                if path == "/reset" {
                    crate::orders::reload(app);
                }
                refresh(app);
            }
            Ok(reply) => r.message.set(reply.error_text()),
            Err(e) => r.message.set(e),
        }
    });
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(n) if n.fract() == 0.0 => format!("{n}"),
        Some(n) => format!("{n:.1}"),
        None => "–".into(),
    }
}

fn card(label: &'static str, testid: &'static str, value: impl Fn() -> String + 'static) -> View {
    view! { div(class="card", data-testid=testid) { div(class="label") { (label) } div(class="value") { (value) } } }
}

pub fn view(app: App) -> View {
    let r = app.runs;
    let no_token = crate::no_token(app);
    let cur = create_memo(move || {
        let viewing = r.viewing.get_clone();
        if viewing.is_null() { r.current.get_clone() } else { viewing }
    });
    let field = move |f: fn(&Value) -> String| move || cur.with(|c| if c.is_null() { "–".to_string() } else { f(c) });
    let phase = field(|c| c["phase"].as_str().unwrap_or("").to_string());
    let progress = field(|c| format!("{}%", num(&c["progress_percent"])));
    let bar =
        move || cur.with(|c| format!("width:{}%", c["progress_percent"].as_f64().unwrap_or(0.0).clamp(0.0, 100.0)));
    let cards = vec![
        card("VIP", "card-vip", field(|c| format!("{} / {}", num(&c["vip"]["processed"]), num(&c["vip"]["count"])))),
        card(
            "NORMAL",
            "card-normal",
            field(|c| format!("{} / {}", num(&c["normal"]["processed"]), num(&c["normal"]["count"]))),
        ),
        card(
            "total",
            "card-total",
            field(|c| {
                num(&json!(
                    c["vip"]["processed"].as_u64().unwrap_or(0) + c["normal"]["processed"].as_u64().unwrap_or(0)
                ))
            }),
        ),
        card("target", "card-target", field(|c| num(&c["quantity"]))),
        card(
            "remaining",
            "card-remaining",
            field(|c| {
                let done = c["vip"]["processed"].as_u64().unwrap_or(0) + c["normal"]["processed"].as_u64().unwrap_or(0);
                num(&json!(c["quantity"].as_u64().unwrap_or(0).saturating_sub(done)))
            }),
        ),
        card(
            "ETA",
            "card-eta",
            field(|c| if c["eta_s"].is_null() { "–".into() } else { format!("{} s", num(&c["eta_s"])) }),
        ),
    ];
    let verification = field(|c| match c["verification"]["passed"].as_bool() {
        Some(true) => "verification passed".into(),
        Some(false) => format!("verification FAILED: {}", c["verification"]["failures"]),
        None => String::new(),
    });
    let start = move |_| {
        let q: i64 = r.quantity.get_clone_untracked().trim().parse().unwrap_or(0);
        let mut body = json!({ "quantity": q });
        let mix = r.tier_mix.get_clone_untracked();
        if !mix.trim().is_empty() {
            let parts: Vec<u32> = mix.split(',').filter_map(|p| p.trim().parse().ok()).collect();
            let [d, g, s, b] = parts[..] else {
                return r.message.set("tier mix: four whole percentages, DIAMOND,GOLD,SILVER,BRONZE".into());
            };
            body["tier_mix"] = json!({ "DIAMOND": d, "GOLD": g, "SILVER": s, "BRONZE": b });
        }
        act(app, "/runs".into(), body, "run started");
        // A new run is the current one: the page shows it.
        if r.viewing.with_untracked(|v| !v.is_null()) {
            crate::nav::go(app, Page::of(Section::Runs));
        }
    };
    let cancel = move |_| {
        // The run going on, whichever run the page shows.
        if let Some(id) = r.current.with_untracked(|c| c["id"].as_str().map(String::from)) {
            let body = json!({ "purge": r.purge.get_untracked(), "delete_pending": r.delete_pending.get_untracked() });
            act(app, format!("/runs/{}/cancel", api::enc(&id)), body, "cancel requested");
        }
    };
    let queue = move |p: &'static str, op: &'static str| {
        move |_| act(app, format!("/queues/{p}/{op}"), json!({}), "queue updated")
    };
    let reset_confirm = r.confirm_reset;
    let reset_area = move || {
        if reset_confirm.get() {
            view! {
                span(class="warn") { "Delete every order, run and dead letter? " }
                button(
                    data-testid="reset-confirm",
                    on:click=move |_| {
                        reset_confirm.set(false);
                        act(app, "/reset".into(), json!({"confirm": "reset"}), "reset done")
                    }
                ) { "Yes, reset" }
                button(data-testid="reset-abort", on:click=move |_| reset_confirm.set(false)) { "Keep everything" }
            }
        } else {
            view! {
                button(data-testid="reset", disabled=no_token, on:click=move |_| reset_confirm.set(true)) {
                    "Reset…"
                }
            }
        }
    };
    let history = move || {
        let rows: Vec<View> = r
            .history
            .get_clone()
            .into_iter()
            .map(|h| {
                let verdict = match h["verification"]["passed"].as_bool() {
                    Some(true) => "passed",
                    Some(false) => "failed",
                    None => "–",
                };
                let id = h["id"].as_str().unwrap_or("").to_string();
                let text = format!(
                    " · {} · {} orders · {} ms",
                    h["phase"].as_str().unwrap_or(""),
                    num(&h["quantity"]),
                    num(&h["total_ms"])
                );
                let class = format!("verdict v-{verdict}");
                let link = run_link(app, id);
                view! {
                    li(data-testid="run-history-row") {
                        (link) (text) " · " span(class=class, data-testid="run-verification") { (verdict) }
                    }
                }
            })
            .collect();
        View::from(rows)
    };
    let quantity = r.quantity;
    let tier_mix = r.tier_mix;
    let (purge, delete_pending) = (r.purge, r.delete_pending);
    let timeline = move || cur.with(timeline_view);
    // The throughput chart follows the run going on; another run's page says so.
    let other = move || r.viewing.with(|v| !v.is_null() && v["id"] != r.current.with(|c| c["id"].clone()));
    let chart = view! {
        div(hidden=other) { (chart_view(app)) }
        p(class="muted", data-testid="throughput-elsewhere", hidden=move || !other()) {
            "Live throughput: on the current run's page."
        }
    };
    let message = move || r.message.get_clone();
    view! {
        section(class="panel runs", data-testid="runs") {
            h2 { "Runs" }
            div(class="controls") {
                label { "orders " input(data-testid="run-quantity", r#type="number", min="1", bind:value=quantity) }
                label {
                    "tier mix % "
                    input(
                        data-testid="run-tier-mix",
                        title="tier mix in percent: DIAMOND,GOLD,SILVER,BRONZE",
                        bind:value=tier_mix
                    )
                }
                button(data-testid="run-start", disabled=no_token, on:click=start) { "Start run" }
                button(data-testid="run-cancel", disabled=no_token, on:click=cancel) { "Cancel" }
                label {
                    input(r#type="checkbox", data-testid="cancel-purge", bind:checked=purge)
                    " purge its queued events"
                }
                label {
                    input(r#type="checkbox", data-testid="cancel-delete-pending", bind:checked=delete_pending)
                    " delete its PENDING orders"
                }
                (crate::need_token(app, "start or cancel a run"))
            }
            div(class="controls") {
                button(data-testid="pause-vip", disabled=no_token, on:click=queue("vip", "pause")) { "Pause VIP" }
                button(data-testid="resume-vip", disabled=no_token, on:click=queue("vip", "resume")) { "Resume VIP" }
                button(data-testid="pause-normal", disabled=no_token, on:click=queue("normal", "pause")) {
                    "Pause NORMAL"
                }
                button(data-testid="resume-normal", disabled=no_token, on:click=queue("normal", "resume")) {
                    "Resume NORMAL"
                }
                (reset_area)
                (crate::need_token(app, "pause or resume queues and reset"))
            }
            div(class="msg", data-testid="run-message") { (message) }
            div(class="phase") {
                "phase " strong(data-testid="run-phase") { (phase) }
                " · " span(data-testid="run-progress") { (progress) }
            }
            div(class="bar") { div(class="fill", style=bar) }
            (timeline)
            div(class="cards") { (cards) }
            (chart)
            div(data-testid="run-verification-current") { (verification) }
            h3 { "History" }
            ol(class="run-history") { (history) }
        }
    }
}

/// A run's id, linking to its page.
fn run_link(app: App, id: String) -> View {
    let page = Page { section: Section::Runs, id: Some(id.clone()) };
    let href = page.path();
    let on_click = crate::nav::click(app, page);
    view! { a(href=href, data-testid="run-link", on:click=on_click) { (id) } }
}

/// Generation, VIP window and NORMAL window as one bar, widths by duration, with rates.
fn timeline_view(c: &Value) -> View {
    if c.is_null() {
        return View::default();
    }
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0);
    let parts = [
        ("generation", ms(&c["generation_ms"]), String::new()),
        ("VIP", ms(&c["vip"]["duration_ms"]), format!(" {}/s", num(&c["vip"]["orders_per_s"]))),
        ("NORMAL", ms(&c["normal"]["duration_ms"]), format!(" {}/s", num(&c["normal"]["orders_per_s"]))),
    ];
    let total: f64 = parts.iter().map(|p| p.1).sum::<f64>().max(1.0);
    let segments: Vec<View> = parts
        .into_iter()
        .map(|(name, d, rate)| {
            let style = format!("flex-grow:{:.3}", (d / total).max(0.02));
            let class = format!("seg seg-{}", name.to_lowercase());
            let text = format!("{name} {} ms{rate}", d as u64);
            let title = text.clone();
            view! { div(class=class, style=style, title=title) { (text) } }
        })
        .collect();
    view! { div(class="timeline", data-testid="run-timeline") { (segments) } }
}
