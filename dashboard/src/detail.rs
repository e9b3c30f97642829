//! The order detail panel: its journey (`journey`), and an edit form saved with `PATCH` + `If-Match`
//! that never drops an edit silently: a 409, or a newer row arriving under unsaved
//! edits, opens a conflict dialog with three ways out.

use serde_json::Value;
use sycamore::prelude::*;

use orchestrator_types::Status;

use crate::App;
use crate::api::{self, Order};

/// The editable fields, in form order.
const FIELDS: [&str; 3] = ["status", "note", "shipping_fee_cents"];

fn field_of(o: &Order, f: &str) -> String {
    match f {
        "status" => o.status.as_str().to_string(),
        "note" => o.note.clone(),
        _ => o.shipping_fee_cents.to_string(),
    }
}

#[derive(Clone, Copy)]
pub struct Detail {
    pub selected: Signal<Option<String>>,
    /// The server row the form's edits are relative to (its version goes in If-Match).
    base: Signal<Option<Order>>,
    form: [Signal<String>; 3],
    journey: Signal<Option<Result<orchestrator_types::journey::Journey, String>>>,
    /// A journey load is under way; `true` in the second: another is due after it.
    journey_loading: Signal<(bool, bool)>,
    message: Signal<String>,
    /// The newer server row the form conflicts with, while the dialog is open.
    conflict: Signal<Option<Order>>,
    /// Per field in a merge: true keeps my value.
    keep_mine: [Signal<bool>; 3],
}

impl Detail {
    pub fn new() -> Self {
        Detail {
            selected: create_signal(None),
            base: create_signal(None),
            form: [create_signal(String::new()), create_signal(String::new()), create_signal(String::new())],
            journey: create_signal(None),
            journey_loading: create_signal((false, false)),
            message: create_signal(String::new()),
            conflict: create_signal(None),
            keep_mine: [create_signal(true), create_signal(true), create_signal(true)],
        }
    }

    fn set_base(&self, o: Order) {
        for (i, f) in FIELDS.iter().enumerate() {
            self.form[i].set(field_of(&o, f));
        }
        self.base.set(Some(o));
    }

    /// Fields whose form value differs from `base`.
    fn changed(&self) -> [bool; 3] {
        let base = self.base.get_clone_untracked();
        std::array::from_fn(|i| {
            base.as_ref().is_some_and(|b| field_of(b, FIELDS[i]) != self.form[i].get_clone_untracked())
        })
    }

    fn dirty(&self) -> bool {
        self.changed().iter().any(|c| *c)
    }
}

/// Whether the open order holds unsaved edits or a conflict to resolve; if so, the
/// message says what to do before leaving it.
pub fn holds_edits(app: App) -> bool {
    let d = app.detail;
    let busy = d.dirty() || d.conflict.with_untracked(Option::is_some);
    if busy {
        d.message.set("unsaved edits: save or undo them before closing".into());
    }
    busy
}

/// Closes the open order, unless it holds unsaved edits or a conflict to resolve. The
/// table takes the focus back, so a keyboard user goes on from there.
pub fn close(app: App) {
    if !holds_edits(app) {
        app.detail.selected.set(None);
        let table = web_sys::window()
            .and_then(|w| w.document())
            .and_then(|d| d.query_selector("[data-testid=orders-scroll]").ok().flatten())
            .and_then(|e| wasm_bindgen::JsCast::dyn_into::<web_sys::HtmlElement>(e).ok());
        if let Some(t) = table {
            let _ = t.focus();
        }
    }
}

pub fn select(app: App, id: String) {
    let d = app.detail;
    d.selected.set(Some(id));
    d.base.set(None);
    d.journey.set(None);
    d.conflict.set(None);
    d.message.set(String::new());
    refetch(app);
}

/// Loads the selected order (into the form, unless edits are pending) and its journey.
pub fn refetch(app: App) {
    let d = app.detail;
    let Some(id) = d.selected.get_clone_untracked() else { return };
    wasm_bindgen_futures::spawn_local(async move {
        match api::get(&format!("/orders/{}", api::enc(&id))).await {
            Ok(r) if r.ok() => {
                if let Ok(o) = r.json::<Order>() {
                    if d.base.with_untracked(|b| b.is_none()) {
                        d.set_base(o);
                    } else {
                        on_server_row(app, &o);
                    }
                }
            }
            Ok(r) => d.message.set(r.error_text()),
            Err(e) => d.message.set(e),
        }
        load_journey(app, id).await;
    });
}

/// Loads the open order's journey; live updates that come while one loads ask for one
/// more load after it, not one each (a journey can be large).
async fn load_journey(app: App, id: String) {
    let d = app.detail;
    if d.journey_loading.get_untracked().0 {
        return d.journey_loading.set((true, true));
    }
    d.journey_loading.set((true, false));
    loop {
        let wanted = || d.selected.with_untracked(|s| s.as_deref() == Some(id.as_str()));
        if let Some(answer) = crate::journey::load(&id, wanted).await {
            d.journey.set(Some(answer));
        }
        let (_, again) = d.journey_loading.get_untracked();
        if !again {
            break;
        }
        d.journey_loading.set((true, false));
    }
    d.journey_loading.set((false, false));
}

/// A row from the server (pushed or fetched). Newer than the form's base: taken as is
/// when the form is clean, otherwise it opens (or refreshes) the conflict dialog.
pub fn on_server_row(app: App, o: &Order) {
    let d = app.detail;
    if d.selected.with_untracked(|s| s.as_deref() != Some(o.id.as_str())) {
        return;
    }
    let newer = d.base.with_untracked(|b| b.as_ref().is_some_and(|b| o.version > b.version));
    if !newer || d.conflict.with_untracked(|c| c.as_ref().is_some_and(|c| c.version >= o.version)) {
        return;
    }
    if d.dirty() {
        open_conflict(d, o.clone());
    } else {
        d.set_base(o.clone());
    }
    wasm_bindgen_futures::spawn_local(load_journey(app, o.id.clone()));
}

fn open_conflict(d: Detail, server: Order) {
    let changed = d.changed();
    for (keep, changed) in d.keep_mine.iter().zip(changed) {
        keep.set(changed);
    }
    d.conflict.set(Some(server));
}

fn save(app: App) {
    let d = app.detail;
    let Some(base) = d.base.get_clone_untracked() else { return };
    let changed = d.changed();
    let mut body = serde_json::Map::new();
    for (i, f) in FIELDS.iter().enumerate() {
        if !changed[i] {
            continue;
        }
        let v = d.form[i].get_clone_untracked();
        if *f == "shipping_fee_cents" {
            match v.trim().parse::<i64>() {
                Ok(n) => body.insert(f.to_string(), n.into()),
                Err(_) => return d.message.set("shipping fee must be a whole number of cents".into()),
            };
        } else {
            body.insert(f.to_string(), v.into());
        }
    }
    if body.is_empty() {
        return d.message.set("nothing to save".into());
    }
    if crate::no_token(app)() {
        return d.message.set("enter the API token to save edits".into());
    }
    d.message.set("saving…".into());
    let body = Value::Object(body).to_string();
    wasm_bindgen_futures::spawn_local(async move {
        let path = format!("/orders/{}", api::enc(&base.id));
        match api::call("PATCH", &path, Some(body), Some(base.version)).await {
            Ok(r) if r.ok() => {
                if let Ok(o) = r.json::<Order>() {
                    d.message.set(format!("saved as version {}", o.version));
                    crate::orders::apply(std::slice::from_ref(&o), None);
                    app.rows_version.update(|v| *v += 1);
                    d.set_base(o);
                }
                load_journey(app, base.id.clone()).await;
            }
            Ok(r) if r.status == 409 => {
                let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
                match serde_json::from_value::<Order>(v["current"].clone()) {
                    Ok(current) => {
                        d.message.set("the order changed on the server; choose how to resolve".into());
                        open_conflict(d, current);
                    }
                    Err(_) => d.message.set(r.error_text()),
                }
            }
            Ok(r) => d.message.set(r.error_text()),
            Err(e) => d.message.set(e),
        }
    });
}

#[derive(Clone, Copy)]
enum Resolve {
    TakeServer,
    ReapplyMine,
    Merge,
}

fn resolve(app: App, how: Resolve) {
    let d = app.detail;
    let Some(server) = d.conflict.get_clone_untracked() else { return };
    let changed = d.changed();
    let mine: [String; 3] = std::array::from_fn(|i| d.form[i].get_clone_untracked());
    d.conflict.set(None);
    d.set_base(server);
    let keep: [bool; 3] = match how {
        Resolve::TakeServer => [false; 3],
        // Only what I changed goes on top; fields I left alone follow the server.
        Resolve::ReapplyMine => changed,
        Resolve::Merge => std::array::from_fn(|i| d.keep_mine[i].get_untracked()),
    };
    for i in 0..3 {
        if keep[i] {
            d.form[i].set(mine[i].clone());
        }
    }
    if d.dirty() {
        save(app);
    } else {
        d.message.set("took the server's values".into());
    }
}

fn conflict_view(app: App) -> View {
    let d = app.detail;
    let rows: Vec<View> = (0..3)
        .map(|i| {
            let name = FIELDS[i];
            let mine = move || d.form[i].get_clone();
            let server = move || d.conflict.with(|c| c.as_ref().map(|c| field_of(c, FIELDS[i])).unwrap_or_default());
            let keep = d.keep_mine[i];
            view! {
                tr(data-testid=format!("conflict-{name}")) {
                    td { (name) }
                    td(data-testid="mine") { (mine) }
                    td(data-testid="server") { (server) }
                    td {
                        label {
                            input(r#type="checkbox", data-testid=format!("keep-mine-{name}"), bind:checked=keep)
                            " keep mine"
                        }
                    }
                }
            }
        })
        .collect();
    let no_token = crate::no_token(app);
    let server_version = move || d.conflict.with(|c| c.as_ref().map(|c| c.version.to_string()).unwrap_or_default());
    view! {
        div(class="dialog", data-testid="conflict-dialog", role="dialog", aria-label="conflicting edits") {
            h3 { "Conflict: the order is now at version " (server_version) }
            table {
                tr { th { "field" } th { "yours" } th { "server" } th { "merge" } }
                (rows)
            }
            div(class="buttons") {
                button(data-testid="take-server", on:click=move |_| resolve(app, Resolve::TakeServer)) { "Take server" }
                button(
                    data-testid="reapply-mine",
                    disabled=no_token,
                    on:click=move |_| resolve(app, Resolve::ReapplyMine)
                ) { "Re-apply mine on top" }
                button(data-testid="merge", disabled=no_token, on:click=move |_| resolve(app, Resolve::Merge)) {
                    "Merge field by field"
                }
                (crate::need_token(app, "save your side of the conflict"))
            }
        }
    }
}

pub fn view(app: App) -> View {
    let d = app.detail;
    let body = move || {
        let Some(id) = d.selected.get_clone() else {
            return view! { p(class="muted") { "Click an order to see its journey and edit it." } };
        };
        let version = move || d.base.with(|b| b.as_ref().map(|b| b.version.to_string()).unwrap_or_default());
        let [status, note, fee] = d.form;
        let options = crate::orders::options(Status::ALL.map(|s| (s.as_str(), s.as_str())));
        let message = move || d.message.get_clone();
        let dialog = move || if d.conflict.with(|c| c.is_some()) { conflict_view(app) } else { View::default() };
        view! {
            div(class="detail-head") {
                h2 {
                    "Order " span(data-testid="detail-id") { (id) }
                    " v" span(data-testid="detail-version") { (version) }
                }
                button(data-testid="detail-close", aria-label="Close the order", on:click=move |_| close(app)) {
                    "✕"
                }
            }
            form(
                class="edit",
                data-testid="edit-form",
                on:submit=move |e: web_sys::SubmitEvent| { e.prevent_default(); save(app) }
            ) {
                label { "status " select(data-testid="edit-status", bind:value=status) { (options) } }
                label { "note " input(data-testid="edit-note", bind:value=note) }
                label { "shipping fee (cents) " input(data-testid="edit-fee", bind:value=fee) }
                button(r#type="submit", data-testid="save", disabled=crate::no_token(app)) { "Save" }
                (crate::need_token(app, "save edits"))
                span(class="msg", data-testid="edit-message") { (message) }
            }
            (dialog)
            h3 { "Journey" }
            (crate::journey::view(d.journey))
        }
    };
    view! { section(class="panel detail", data-testid="detail") { (body) } }
}
