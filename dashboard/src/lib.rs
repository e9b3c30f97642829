//! The operator dashboard: a Sycamore single-page app served by `orchestrator serve` at `/`.

#![deny(rust_2018_idioms)]

mod api;
mod chart;
mod cluster;
mod columns;
mod counts;
mod detail;
mod journey;
mod letters;
mod live;
mod nav;
mod ops;
mod orders;
mod plugins;
mod pulse;
mod rows;
mod runs;

use sycamore::prelude::*;
use wasm_bindgen::prelude::*;

/// Every piece of shared UI state. Signals are `Copy`, so the struct is too and is
/// passed by value into closures. Bulk row data lives outside the reactive graph
/// (see `orders::TABLE`); `rows_version` is bumped once per batch of changes to it.
#[derive(Clone, Copy)]
pub struct App {
    pub token: Signal<String>,
    pub conn: Signal<&'static str>,
    pub rows_version: Signal<u64>,
    pub scroll_top: Signal<f64>,
    pub f_status: Signal<String>,
    pub f_priority: Signal<String>,
    pub f_query: Signal<String>,
    pub f_shop: Signal<String>,
    pub cols: columns::Columns,
    /// The table row the arrow keys moved to.
    pub kb_row: Signal<Option<usize>>,
    /// The clock the table's relative times follow, ticking each second.
    pub now_ms: Signal<f64>,
    pub f_sort: Signal<String>,
    pub table_error: Signal<String>,
    pub detail: detail::Detail,
    pub runs: runs::RunsState,
    pub ops: ops::OpsState,
    pub plugins: plugins::PluginsState,
    pub letters: letters::LettersState,
    pub pulse: pulse::PulseState,
    /// The page the address names (`nav`).
    pub page: Signal<nav::Page>,
}

#[wasm_bindgen(start)]
pub fn start() {
    // A panic leaves the module unusable ("unreachable" on every later call): say why once.
    std::panic::set_hook(Box::new(|info| web_sys::console::error_1(&format!("dashboard panicked: {info}").into())));
    sycamore::render(|| {
        let app = App {
            token: create_signal(api::load_token()),
            conn: create_signal("connecting"),
            rows_version: create_signal(0),
            scroll_top: create_signal(0.0),
            f_status: create_signal(String::new()),
            f_priority: create_signal(String::new()),
            f_query: create_signal(String::new()),
            f_shop: create_signal(String::new()),
            cols: columns::Columns::new(),
            kb_row: create_signal(None),
            now_ms: create_signal(js_sys::Date::now()),
            f_sort: create_signal("-updated_at".to_string()),
            table_error: create_signal(String::new()),
            detail: detail::Detail::new(),
            runs: runs::RunsState::new(),
            ops: ops::OpsState::new(),
            plugins: plugins::PluginsState::new(),
            letters: letters::LettersState::new(),
            pulse: pulse::PulseState::new(),
            page: create_signal(nav::Page::of(nav::Section::Orders)),
        };
        tick_clock(app);
        orders::reload(app);
        live::connect(app);
        runs::refresh(app);
        plugins::refresh(app);
        letters::refresh(app);
        ops::poll_health(app);
        nav::start(app);
        view! { (root(app)) }
    });
}

/// Moves `now_ms` on each second, for the relative times.
fn tick_clock(app: App) {
    let tick = wasm_bindgen::closure::Closure::<dyn FnMut()>::new(move || app.now_ms.set(js_sys::Date::now()));
    if let Some(w) = web_sys::window() {
        use wasm_bindgen::JsCast;
        let _ = w.set_interval_with_callback_and_timeout_and_arguments_0(tick.as_ref().unchecked_ref(), 1000);
    }
    tick.forget();
}

/// Whether the mutating controls are off: no API token entered in this session.
pub fn no_token(app: App) -> impl Fn() -> bool + Copy + 'static {
    let token = app.token;
    move || token.with(|t| t.trim().is_empty())
}

/// The reason shown next to a control that needs the token, empty once it is entered.
pub fn need_token(app: App, what: &'static str) -> View {
    let off = no_token(app);
    let text = move || if off() { format!("enter the API token to {what}") } else { String::new() };
    view! { span(class="need-token", data-testid="need-token") { (text) } }
}

fn root(app: App) -> View {
    let token = app.token;
    let conn = app.conn;
    let conn_class = move || format!("conn conn-{}", conn.get());
    let conn_text = move || conn.get();
    let no_token = move || {
        if token.with(|t| t.is_empty()) {
            "No API token: saving edits, runs, queues, reset, plugins and replay are disabled until you enter it \
             (kept for this tab session only)."
        } else {
            ""
        }
    };
    view! {
        header(class="top") {
            h1 { "Atomic Order Orchestrator" }
            span(class=conn_class, data-testid="conn") { (conn_text) }
            label(class="token") {
                "API token "
                input(r#type="password", data-testid="token", placeholder="paste the operator token", bind:value=token,
                      on:input=move |_| api::save_token(&token.get_clone()))
            }
            span(class="hint", data-testid="token-hint") { (no_token) }
        }
        (nav::view(app))
        (pulse::strip(app))
        main {
            // Every page stays mounted (the table keeps its rows and scroll), shown by its address.
            div(class="layout", hidden=hidden_unless(app, nav::Section::Orders)) {
                section(class="orders") { (orders::view(app)) }
                aside(class="side") { (detail::view(app)) }
            }
            div(class="page", hidden=hidden_unless(app, nav::Section::Runs)) { (runs::view(app)) }
            div(class="page", hidden=hidden_unless(app, nav::Section::Plugins)) { (plugins::view(app)) }
            div(class="page", hidden=hidden_unless(app, nav::Section::DeadLetters)) { (letters::view(app)) }
            div(class="page", hidden=hidden_unless(app, nav::Section::Health)) {
                (ops::health_view(app))
                (cluster::view(app))
                (pulse::charts(app))
            }
        }
    }
}

/// Whether a page is hidden: every page but the one the address names.
fn hidden_unless(app: App, section: nav::Section) -> impl Fn() -> bool + 'static {
    move || app.page.with(|p| p.section != section)
}
