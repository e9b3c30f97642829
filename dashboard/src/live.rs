//! The `/ws` feed: pushed rows arrive in batches, are queued and applied once per
//! animation frame; the socket reconnects with backoff and resyncs the visible window
//! afterwards.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};

use serde::Deserialize;
use serde_json::Value;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::App;
use crate::api::{self, Order};
use crate::orders;

thread_local! {
    static PENDING: RefCell<Vec<Order>> = const { RefCell::new(Vec::new()) };
    static FRAME_SCHEDULED: Cell<bool> = const { Cell::new(false) };
    static ATTEMPTS: Cell<u32> = const { Cell::new(0) };
    static CONNECTED_BEFORE: Cell<bool> = const { Cell::new(false) };
    static SOCKET: RefCell<Option<web_sys::WebSocket>> = const { RefCell::new(None) };
    /// Offer the API token on the next socket: after one closed without opening, as
    /// an engine off loopback closes a socket that brings none.
    static OFFER_TOKEN: Cell<bool> = const { Cell::new(false) };
    /// Set when the queue overflowed: the next frame re-fetches instead of applying.
    static OVERFLOWED: Cell<bool> = const { Cell::new(false) };
}

/// Rows queued for the next frame at most. Browsers stop animation frames in hidden
/// tabs; past this the queue is dropped and the visible rows are re-fetched on return.
const PENDING_MAX: usize = 20_000;

fn set_timeout(ms: i32, f: impl FnOnce() + 'static) {
    let cb = Closure::once_into_js(f);
    if let Some(w) = web_sys::window() {
        let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(cb.unchecked_ref(), ms);
    }
}

pub fn connect(app: App) {
    let Some(window) = web_sys::window() else { return };
    let loc = window.location();
    let scheme = if loc.protocol().unwrap_or_default() == "https:" { "wss" } else { "ws" };
    // Changes in batches: a message costs the browser's main thread far more than its
    // rows do, and at 1k updates a second one per row took a quarter of it.
    let url = format!("{scheme}://{}/ws?batch=true", loc.host().unwrap_or_default());
    // Headers cannot go on a WebSocket, so the token (needed off loopback) rides as a
    // subprotocol beside the one the engine selects. It is offered only after a socket
    // without it was refused: on loopback the feed is open and none is needed.
    let token = crate::api::load_token();
    let opened = if token.is_empty() || !OFFER_TOKEN.get() {
        web_sys::WebSocket::new(&url)
    } else {
        // Hex: a subprotocol takes only token characters, and a token may hold others.
        let hex: String = token.bytes().map(|b| format!("{b:02x}")).collect();
        let protocols = js_sys::Array::of2(&"orchestrator".into(), &format!("bearer.{hex}").into());
        web_sys::WebSocket::new_with_str_sequence(&url, &protocols).or_else(|_| web_sys::WebSocket::new(&url))
    };
    let ws = match opened {
        Ok(ws) => ws,
        Err(_) => return retry(app),
    };
    let on_message = Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |e: web_sys::MessageEvent| {
        if let Some(text) = e.data().as_string() {
            on_text(app, &text);
        }
    });
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    on_message.forget();
    let was_open = std::rc::Rc::new(Cell::new(false));
    let on_open = Closure::<dyn FnMut(web_sys::Event)>::new({
        let was_open = was_open.clone();
        move |_e: web_sys::Event| was_open.set(true)
    });
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    on_open.forget();
    let on_close = Closure::<dyn FnMut(web_sys::Event)>::new(move |_e: web_sys::Event| {
        SOCKET.with_borrow_mut(|s| *s = None);
        if !was_open.get() {
            OFFER_TOKEN.set(!OFFER_TOKEN.get());
        }
        retry(app);
    });
    // An error is always followed by close; reconnecting on close alone avoids doing it twice.
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    on_close.forget();
    SOCKET.with_borrow_mut(|s| *s = Some(ws));
}

fn retry(app: App) {
    app.conn.set("reconnecting");
    let n = ATTEMPTS.get();
    ATTEMPTS.set(n + 1);
    // 250 ms doubling to 10 s, so a restarting engine is not hammered.
    let delay = (250u32.saturating_mul(1 << n.min(6))).min(10_000) as i32;
    set_timeout(delay, move || connect(app));
}

/// A message's `type`, read without building the rest of it.
#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Synced {
    orders: Vec<Order>,
}

fn on_text(app: App, text: &str) {
    let Ok(Kind { kind }) = serde_json::from_str::<Kind<'_>>(text) else { return };
    if kind == "orders.synced" {
        if let Ok(Synced { orders }) = serde_json::from_str::<Synced>(text) {
            queue(app, orders);
        }
        return;
    }
    let Ok(msg) = serde_json::from_str::<Value>(text) else { return };
    match &*kind {
        "hello" => {
            app.conn.set("live");
            ATTEMPTS.set(0);
            if CONNECTED_BEFORE.replace(true) {
                resync(app);
            }
        }
        "resync" => resync(app),
        "run.phase" | "run.progress" => crate::runs::on_run(app, msg["run"].clone()),
        "stats" => crate::pulse::on_sample(app, &msg),
        "stats.history" => crate::pulse::on_history(app, &msg),
        _ => {}
    }
}

/// Queues rows for the next frame; past [`PENDING_MAX`] the queue is dropped and the
/// next frame re-fetches the rows in view instead.
fn queue(app: App, orders: Vec<Order>) {
    PENDING.with_borrow_mut(|p| {
        if p.len() + orders.len() > PENDING_MAX {
            p.clear();
            OVERFLOWED.set(true);
        } else {
            p.extend(orders);
        }
    });
    schedule_frame(app);
}

fn schedule_frame(app: App) {
    if FRAME_SCHEDULED.replace(true) {
        return;
    }
    let cb = Closure::once_into_js(move || {
        FRAME_SCHEDULED.set(false);
        let batch = PENDING.with_borrow_mut(std::mem::take);
        flush(app, &batch);
        if OVERFLOWED.replace(false) {
            resync(app);
        }
    });
    if let Some(w) = web_sys::window() {
        let _ = w.request_animation_frame(cb.unchecked_ref());
    }
}

/// One batch: rows newer than shown replace them, then one signal bump repaints.
fn flush(app: App, batch: &[Order]) {
    let filter = orders::Filter::of(app);
    let (changed, inserted) = orders::apply(batch, Some(&filter));
    if changed {
        // Only rows the table holds: one it left out must not widen a column.
        let widths = orders::TABLE.with_borrow(|t| crate::columns::widths(batch.iter().filter_map(|o| t.by_id(&o.id))));
        app.cols.widen(widths);
        app.rows_version.update(|v| *v += 1);
        orders::keep_scroll_after_insert(app, inserted);
    }
    for o in batch {
        crate::detail::on_server_row(app, o);
    }
}

/// Re-fetch the rows in view (and the open order and the run) after missed messages.
pub fn resync(app: App) {
    let ids = orders::visible_ids(app);
    if ids.is_empty() {
        orders::reload(app);
    }
    for id in ids {
        wasm_bindgen_futures::spawn_local(async move {
            if let Ok(r) = api::get(&format!("/orders/{}", api::enc(&id))).await
                && r.ok()
                && let Ok(o) = r.json::<Order>()
            {
                queue(app, vec![o]);
            }
        });
    }
    crate::detail::refetch(app);
    crate::runs::refresh(app);
}
