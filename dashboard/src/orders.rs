//! The orders table: compact rows (`rows`), a fixed pool of row elements positioned
//! inside a tall spacer, and pages fetched by cursor as the user scrolls.

use std::borrow::Cow;
use std::cell::RefCell;

use sycamore::prelude::*;
use wasm_bindgen::JsCast;

use orchestrator_types::{Priority, Sort, Status};

use crate::App;
use crate::api::{self, Order, Page};
use crate::columns::{self, COLUMNS};
use crate::rows::{IdIndex, Row, Rows};

pub const ROW_H: f64 = 28.0;
/// Row elements in the DOM, whatever the number of orders: enough for a 4K screen. The
/// window uses as many as it can show (`slots_in_use`); the rest stay hidden and empty.
pub const POOL: usize = 80;
const PAGE: usize = 1000;
/// The first page: a screen or two, so the first rows wait for little to be fetched,
/// parsed and measured; the next page follows at once.
const FIRST_PAGE: usize = 100;

/// Where a loaded row lives: pushed live at the top, or fetched by paging.
#[derive(Clone, Copy)]
enum Pos {
    Head(usize),
    Body(usize),
}

/// A place as the id index keeps it: never 0, the top bit set for the head.
const HEAD_BIT: u32 = 1 << 31;

impl Pos {
    fn code(self) -> u32 {
        match self {
            Pos::Head(n) => HEAD_BIT | (n as u32 + 1),
            Pos::Body(n) => n as u32 + 1,
        }
    }

    fn of(code: u32) -> Pos {
        let n = (code & !HEAD_BIT) as usize - 1;
        if code & HEAD_BIT != 0 { Pos::Head(n) } else { Pos::Body(n) }
    }
}

#[derive(Default)]
pub struct Table {
    /// New orders pushed live above the loaded pages, newest last (shown first), so an
    /// insertion at the top is a push, not a shift of a million rows.
    head: Rows,
    /// Rows fetched by paging, in the query's order.
    rows: Rows,
    index: IdIndex,
    next_cursor: Option<String>,
    done: bool,
    loading: bool,
    /// Bumped by every reload, so a page answering for an older query is dropped.
    generation: u64,
}

impl Table {
    pub fn len(&self) -> usize {
        self.head.len() + self.rows.len()
    }

    /// Where the row at a display index lives (the head is shown newest first).
    fn pos(&self, i: usize) -> Pos {
        let h = self.head.len();
        if i < h { Pos::Head(h - 1 - i) } else { Pos::Body(i - h) }
    }

    /// The row at a display index.
    pub fn get(&self, i: usize) -> Option<Row<'_>> {
        self.at(self.pos(i))
    }

    /// What a display index shows, as far as a row's cells are concerned.
    fn shown(&self, i: usize) -> Option<Shown> {
        let pos = self.pos(i);
        let row = self.at(pos)?;
        Some(Shown { generation: self.generation, place: pos.code(), version: row.version() })
    }

    fn at(&self, p: Pos) -> Option<Row<'_>> {
        row_at(&self.head, &self.rows, p)
    }

    fn find(&self, id: &str) -> Option<Pos> {
        let id_of = |code| self.at(Pos::of(code)).map(|r| r.id());
        self.index.find(id, id_of).map(Pos::of)
    }

    pub fn by_id(&self, id: &str) -> Option<Row<'_>> {
        self.find(id).and_then(|p| self.at(p))
    }

    /// Adds a row that the table does not hold yet.
    fn add(&mut self, o: &Order, on_top: bool) {
        let pos = if on_top { Pos::Head(self.head.push(o)) } else { Pos::Body(self.rows.push(o)) };
        // The index is borrowed apart from the rows it reads ids from.
        let Table { head, rows, index, .. } = self;
        index.insert(&o.id, pos.code(), |code| row_at(head, rows, Pos::of(code)).map(|r| r.id()));
    }
}

/// A row as its cells see it: which row (its place in this table, which a reload
/// reuses) at which version. A row's fields change only with its version, so the cells
/// compare this and stay still when a batch of updates changed other rows.
#[derive(Clone, Copy, PartialEq)]
struct Shown {
    generation: u64,
    place: u32,
    version: u64,
}

fn row_at<'a>(head: &'a Rows, rows: &'a Rows, p: Pos) -> Option<Row<'a>> {
    match p {
        Pos::Head(n) => head.get(n),
        Pos::Body(n) => rows.get(n),
    }
}

/// What the table currently shows, for deciding whether a pushed new order belongs in it.
pub struct Filter {
    status: String,
    priority: String,
    query: String,
    shop: String,
    newest_first: bool,
}

impl Filter {
    pub fn of(app: App) -> Filter {
        Filter {
            status: app.f_status.get_clone_untracked().trim().to_string(),
            priority: app.f_priority.get_clone_untracked().trim().to_string(),
            query: app.f_query.get_clone_untracked().trim().to_string(),
            shop: shop_of(app.f_shop.get_clone_untracked()),
            newest_first: app.f_sort.with_untracked(|s| s == Sort::UpdatedDesc.as_str()),
        }
    }

    /// The engine's rules: exact status, priority and shop, prefix of the id or the customer
    /// (or a Shopify order id).
    fn admits(&self, o: &Order) -> bool {
        self.newest_first
            && (self.status.is_empty() || o.status.as_str() == self.status)
            && (self.priority.is_empty() || o.priority.as_str() == self.priority)
            && (self.shop.is_empty() || o.shop.as_deref() == Some(self.shop.as_str()))
            && (self.query.is_empty() || o.id.starts_with(&self.query) || o.customer.starts_with(&self.query) || {
                // A Shopify order id finds `shopify-<id>`, as the engine's search does.
                self.query.bytes().all(|b| b.is_ascii_digit())
                    && o.id.strip_prefix("shopify-").is_some_and(|id| id.starts_with(&self.query))
            })
    }
}

thread_local! {
    pub static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

fn bump(app: App) {
    app.rows_version.update(|v| *v += 1);
}

/// The engine keeps shops as lower-case domains; an operator may type one in any case.
fn shop_of(typed: String) -> String {
    typed.trim().to_ascii_lowercase()
}

fn query_url(app: App, cursor: Option<&str>) -> String {
    let limit = if cursor.is_none() { FIRST_PAGE } else { PAGE };
    let mut url = format!("/orders?limit={limit}&sort={}", api::enc(&app.f_sort.get_clone()));
    let filters = [
        ("status", app.f_status.get_clone()),
        ("priority", app.f_priority.get_clone()),
        ("q", app.f_query.get_clone()),
        ("shop", shop_of(app.f_shop.get_clone())),
    ];
    for (k, v) in filters {
        if !v.trim().is_empty() {
            url.push_str(&format!("&{k}={}", api::enc(v.trim())));
        }
    }
    if let Some(c) = cursor {
        url.push_str(&format!("&cursor={}", api::enc(c)));
    }
    url
}

/// Start over from the first page (filters, sort or search changed, or a reset).
pub fn reload(app: App) {
    TABLE.with_borrow_mut(|t| {
        let generation = t.generation + 1;
        *t = Table { generation, ..Table::default() };
    });
    app.scroll_top.set(0.0);
    app.kb_row.set(None);
    app.cols.refit();
    if let Some(el) = scroller() {
        el.set_scroll_top(0);
    }
    bump(app);
    load_more(app);
}

/// The table's scrolling element.
fn scroller() -> Option<web_sys::Element> {
    web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.query_selector("[data-testid=orders-scroll]").ok().flatten())
}

/// Back on the orders page: a hidden element forgets its scroll offset, the table does not.
pub fn restore_scroll(app: App) {
    if let Some(el) = scroller() {
        el.set_scroll_top(app.scroll_top.get_untracked() as i32);
    }
}

/// Fetch the next page unless one is in flight or the list is complete.
pub fn load_more(app: App) {
    let Some((generation, cursor)) = TABLE.with_borrow_mut(|t| {
        if t.loading || t.done {
            return None;
        }
        t.loading = true;
        Some((t.generation, t.next_cursor.clone()))
    }) else {
        return;
    };
    let url = query_url(app, cursor.as_deref());
    wasm_bindgen_futures::spawn_local(async move {
        let page = match api::get(&url).await {
            Ok(r) if r.ok() => r.json::<Page<Order>>(),
            Ok(r) => Err(r.error_text()),
            Err(e) => Err(e),
        };
        // The widths of the rows added, measured while the table is borrowed and applied
        // after (a signal set inside the borrow could reach code that borrows it again).
        let current = TABLE.with_borrow_mut(|t| {
            if t.generation != generation {
                return None;
            }
            t.loading = false;
            let from = t.rows.len();
            match &page {
                Ok(p) => {
                    for o in &p.items {
                        // A row that moved between pages (it was updated) is shown once.
                        if t.find(&o.id).is_none() {
                            t.add(o, false);
                        }
                    }
                    t.next_cursor = p.next_cursor.clone();
                    t.done = p.next_cursor.is_none() || p.items.is_empty();
                }
                Err(_) => t.done = true,
            }
            Some(columns::widths((from..t.rows.len()).filter_map(|n| t.rows.get(n))))
        });
        let Some(widths) = current else { return };
        match page {
            Ok(_) => {
                app.cols.widen(widths);
                app.table_error.set(String::new())
            }
            Err(e) => app.table_error.set(e),
        }
        bump(app);
        maybe_load_more(app);
    });
}

/// Load ahead while the viewport is within a few screens of the loaded end.
pub fn maybe_load_more(app: App) {
    let first = (app.scroll_top.get_untracked() / ROW_H) as usize;
    let len = TABLE.with_borrow(|t| t.len());
    if first + POOL * 3 >= len {
        load_more(app);
    }
}

/// Ids of the rows in the pool's window, for a resync.
pub fn visible_ids(app: App) -> Vec<String> {
    let first = (app.scroll_top.get_untracked() / ROW_H) as usize;
    TABLE.with_borrow(|t| (first..first + POOL).filter_map(|i| t.get(i).map(|o| o.id().to_string())).collect())
}

/// Applies pushed rows: newer versions of shown rows replace them; with a filter, rows
/// not loaded that it admits (newest first) go on top. Returns (changed, inserted on top).
pub fn apply(orders: &[Order], filter: Option<&Filter>) -> (bool, usize) {
    TABLE.with_borrow_mut(|t| {
        let mut changed = false;
        let mut inserted = 0;
        for o in orders {
            if let Some(p) = t.find(&o.id) {
                if t.at(p).is_some_and(|row| o.version > row.version()) {
                    match p {
                        Pos::Head(n) => t.head.replace(n, o),
                        Pos::Body(n) => t.rows.replace(n, o),
                    }
                    changed = true;
                }
            } else if filter.is_some_and(|f| f.admits(o)) {
                t.add(o, true);
                inserted += 1;
            }
        }
        (changed || inserted > 0, inserted)
    })
}

/// Keeps the rows in view where they are after `n` rows went on top: unless the user is
/// at the very top (then the new rows are what they see), scroll down by as many rows.
pub fn keep_scroll_after_insert(app: App, n: usize) {
    // The focused row keeps its order, which moved down.
    if n > 0 && app.kb_row.with_untracked(Option::is_some) {
        app.kb_row.update(|r| *r = r.map(|i| i + n));
    }
    let top = app.scroll_top.get_untracked();
    if n == 0 || top <= 0.0 {
        return;
    }
    let y = top + n as f64 * ROW_H;
    if let Some(el) = scroller() {
        el.set_scroll_top(y as i32);
    }
    app.scroll_top.set(y);
}

/// The row index a slot in use shows, of the `used` slots: slot k holds the visible
/// index ≡ k (mod used), so a row keeps its element while it stays in view.
fn slot_index(scroll_top: f64, slot: usize, used: usize) -> usize {
    let first = (scroll_top / ROW_H) as usize;
    first + (slot + used - first % used) % used
}

/// The first row index of the pool's window, a multiple of `used` at or below the first
/// visible row. The window is placed with `top` (layout units, exact to 1/64 px at any
/// height a browser allows), and rows inside it with small transforms.
fn window_base(scroll_top: f64, used: usize) -> usize {
    let first = (scroll_top / ROW_H) as usize;
    first - first % used
}

/// The slots the scroller can show. Fewer rows in the DOM's layout is less to lay out
/// and paint when a jump changes every row; the same slots stay unused, so none toggles.
fn slots_in_use() -> usize {
    // The scroller's height once it is laid out; until then (or while another page hides
    // it) the window's, which it never exceeds. It is at least 300 px (style.css).
    let laid_out = scroller().map(|el| f64::from(el.client_height())).filter(|&h| h > 0.0);
    let window = || web_sys::window().and_then(|w| w.inner_height().ok()).and_then(|h| h.as_f64());
    let height = laid_out.or_else(window).unwrap_or(0.0);
    ((height.max(300.0) / ROW_H).ceil() as usize + 1).min(POOL)
}

/// A signal of [`slots_in_use`] that follows the window's size, measured again once the
/// table is on the page.
fn follow_slots_in_use() -> ReadSignal<usize> {
    let used = create_signal(slots_in_use());
    let measure = wasm_bindgen::closure::Closure::<dyn FnMut()>::new(move || used.set(slots_in_use()));
    if let Some(w) = web_sys::window() {
        let _ = w.add_event_listener_with_callback("resize", measure.as_ref().unchecked_ref());
        let _ = w.request_animation_frame(measure.as_ref().unchecked_ref());
    }
    // The table lives as long as the page.
    measure.forget();
    *used
}

/// The element id of the row at a display index, for `aria-activedescendant`.
fn row_element_id(i: usize) -> String {
    format!("orders-row-{i}")
}

/// A view value that reaches the DOM only when it changes. A row's values are computed
/// again on every scroll event and every batch of updates, but few of them change.
fn settled<T: PartialEq + Clone + 'static>(f: impl FnMut() -> T + 'static) -> impl Fn() -> T + Copy {
    let value = create_selector(f);
    move || value.get_clone()
}

fn row_view(app: App, slot: usize, base: ReadSignal<usize>, used: ReadSignal<usize>) -> View {
    let in_use = create_selector(move || slot < used.get());
    // An unused slot holds an index of its own past any row (its element id stays
    // unique), and shows nothing, whatever the scroll.
    let idx = create_selector(move || match in_use.get() {
        true => slot_index(app.scroll_top.get(), slot, used.get()),
        false => usize::MAX - slot,
    });
    // The one value here that every batch of updates recomputes; the cells follow it.
    let shown = create_selector(move || {
        if !in_use.get() {
            return None;
        }
        app.rows_version.track();
        let i = idx.get();
        TABLE.with_borrow(|t| t.shown(i))
    });
    // `shown` changes with the index (another row) or the row's version; the index
    // alone changes with it only between two empty slots, which show nothing either way.
    let row = move || {
        shown.track();
        idx.get_untracked()
    };
    let field = move |f: fn(Row<'_>) -> String| {
        settled(move || {
            let i = row();
            TABLE.with_borrow(|t| t.get(i).map(f).unwrap_or_default())
        })
    };
    // Offsets are relative to the window (see `window_base`), so they stay small. `top`,
    // not a transform: a transform is a paint property of its own for every row.
    let style = settled(move || match shown.get() {
        None => "display:none".to_string(),
        Some(_) => format!("top:{}px", (idx.get() - base.get()) as f64 * ROW_H),
    });
    let selected = app.detail.selected;
    let class = settled(move || {
        if !in_use.get() {
            return "row";
        }
        let i = row();
        let picked = TABLE.with_borrow(|t| {
            let id = t.get(i).map(|o| o.id());
            selected.with(|s| s.as_deref().is_some_and(|s| id.is_some_and(|id| id.is(s))))
        });
        let focused = app.kb_row.get() == Some(i);
        match (picked, focused) {
            (true, true) => "row selected focused",
            (true, false) => "row selected",
            (false, true) => "row focused",
            (false, false) => "row",
        }
    });
    let index_attr = move || idx.get().to_string();
    let id_attr = field(|o| o.id().to_string());
    let badge = field(|o| format!("badge st-{}", o.status().as_str().to_lowercase()));
    let exact = field(|o| o.updated_at().to_rfc3339());
    let now = app.now_ms;
    // A cell's text; the relative time follows the clock.
    let text = move |i: usize| {
        settled(move || {
            let n = row();
            let now = if COLUMNS[i].key == "updated" { now.get() } else { 0.0 };
            TABLE.with_borrow(|t| t.get(n).map(|o| columns::text(i, &o, now)).unwrap_or_default())
        })
    };
    let cols = app.cols;
    let cells: Vec<View> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let class = format!("c c-{}", c.key);
            let testid = format!("cell-{}", c.key);
            match c.key {
                "status" => view! {
                    span(class=class, style=cols.cell_style(i), role="gridcell") {
                        span(class=badge, data-testid=testid) { (text(i)) }
                    }
                },
                "updated" => view! {
                    span(class=class, style=cols.cell_style(i), role="gridcell", data-testid=testid, title=exact) {
                        (text(i))
                    }
                },
                _ => view! {
                    span(class=class, style=cols.cell_style(i), role="gridcell", data-testid=testid) { (text(i)) }
                },
            }
        })
        .collect();
    let on_click = move |_| {
        let id = TABLE.with_borrow(|t| t.get(idx.get_untracked()).map(|o| o.id().to_string()));
        if let Some(id) = id {
            crate::detail::select(app, id);
        }
    };
    view! {
        div(
            class=class,
            style=style,
            role="row",
            id=move || row_element_id(idx.get()),
            aria-rowindex=move || (idx.get() + 1).to_string(),
            data-testid="order-row",
            data-index=index_attr,
            data-order-id=id_attr,
            on:click=on_click
        ) {
            (cells)
        }
    }
}

pub fn view(app: App) -> View {
    let used = follow_slots_in_use();
    let base = create_selector(move || window_base(app.scroll_top.get(), used.get()));
    let rows: Vec<View> = (0..POOL).map(|slot| row_view(app, slot, base, used)).collect();
    let spacer = move || {
        app.rows_version.track();
        let (len, more) = TABLE.with_borrow(|t| (t.len(), !t.done));
        // One extra screen while more pages exist, so the user can scroll into them.
        let extra = if more { 20.0 * ROW_H } else { 0.0 };
        format!("height:{}px", len as f64 * ROW_H + extra)
    };
    let count = move || {
        app.rows_version.track();
        let (len, done) = TABLE.with_borrow(|t| (t.len(), t.done));
        format!("{len}{} orders loaded", if done { "" } else { "+" })
    };
    // -1 (unknown) while more pages exist.
    let row_count = move || {
        app.rows_version.track();
        TABLE.with_borrow(|t| if t.done { t.len() as i64 } else { -1 }).to_string()
    };
    let on_key = move |e: web_sys::KeyboardEvent| on_key(app, e);
    let on_scroll = move |ev: web_sys::Event| {
        // A scroll event repeats the position it was sent for (as the browser's own does
        // after one set by script), and every row's index follows the signal.
        if let Some(el) = ev.target().and_then(|t| t.dyn_into::<web_sys::Element>().ok())
            && app.scroll_top.get_untracked() != el.scroll_top() as f64
        {
            app.scroll_top.set(el.scroll_top() as f64);
        }
        maybe_load_more(app);
    };
    let (f_status, f_priority, f_query, f_sort) = (app.f_status, app.f_priority, app.f_query, app.f_sort);
    let f_shop = app.f_shop;
    let changed = move |_| reload(app);
    let error = app.table_error;
    let counts = create_signal(serde_json::Value::Null);
    crate::counts::poll(app, counts);
    view! {
        (crate::counts::view(app, counts))
        div(class="filters") {
            select(data-testid="filter-status", aria-label="status", bind:value=f_status, on:change=changed) {
                option(value="") { "any status" }
                (options(Status::ALL.map(|s| (s.as_str(), s.as_str()))))
            }
            select(data-testid="filter-priority", aria-label="priority", bind:value=f_priority, on:change=changed) {
                option(value="") { "any priority" }
                (options(Priority::ALL.map(|p| (p.as_str(), p.as_str()))))
            }
            select(data-testid="sort", aria-label="sort", bind:value=f_sort, on:change=changed) {
                (options(Sort::ALL.map(|o| (o.as_str(), o.label()))))
            }
            input(
                data-testid="search",
                aria-label="search",
                placeholder="id, customer or Shopify order id",
                bind:value=f_query,
                on:change=changed
            )
            input(
                data-testid="filter-shop",
                aria-label="shop",
                placeholder="shop domain",
                bind:value=f_shop,
                on:change=changed
            )
            (columns::picker(app.cols))
            span(class="count", data-testid="row-count") { (count) }
            span(class="error", data-testid="table-error") { (error.get_clone()) }
        }
        div(class="table", data-testid="orders-table", style=move || app.cols.style()) {
            div(class="thead") { (columns::header(app.cols)) }
            // A grid whose focus stays on the scroller; the row the arrows moved to is its
            // active descendant, so assistive tech follows it without focus moving.
            div(
                class="scroll",
                data-testid="orders-scroll",
                tabindex="0",
                role="grid",
                aria-label="orders: arrow keys move, Enter opens, Escape closes",
                aria-rowcount=row_count,
                aria-activedescendant=move || app.kb_row.get().map(|i| Cow::Owned(row_element_id(i))),
                on:scroll=on_scroll,
                on:keydown=on_key
            ) {
                div(class="spacer", role="presentation", style=spacer) {
                    div(
                        class="window",
                        role="presentation",
                        style=move || format!("top:{}px", base.get() as f64 * ROW_H)
                    ) { (rows) }
                }
            }
        }
    }
}

/// The table's keys: arrows move the focused row (scrolled into view), Enter opens it,
/// Escape closes the open order.
fn on_key(app: App, e: web_sys::KeyboardEvent) {
    let len = TABLE.with_borrow(|t| t.len());
    // With no row focused yet, the keys start from the first row in view.
    let first = (app.scroll_top.get_untracked() / ROW_H) as usize;
    let moved = match e.key().as_str() {
        "ArrowDown" => app.kb_row.get_untracked().map_or(first, |i| i + 1).min(len.saturating_sub(1)),
        "ArrowUp" => app.kb_row.get_untracked().map_or(first, |i| i.saturating_sub(1)),
        "Enter" => {
            let id =
                app.kb_row.get_untracked().and_then(|i| TABLE.with_borrow(|t| t.get(i).map(|o| o.id().to_string())));
            // The open order again would reload its form over unsaved edits.
            if let Some(id) = id.filter(|id| app.detail.selected.with_untracked(|s| s.as_ref() != Some(id))) {
                crate::detail::select(app, id);
            }
            return;
        }
        "Escape" => return crate::detail::close(app),
        _ => return,
    };
    e.prevent_default();
    if len == 0 {
        return;
    }
    app.kb_row.set(Some(moved));
    let Some(el) = e.current_target().and_then(|t| t.dyn_into::<web_sys::Element>().ok()) else { return };
    let (top, height) = (el.scroll_top() as f64, el.client_height() as f64);
    let row_top = moved as f64 * ROW_H;
    let y = if row_top < top {
        row_top
    } else if row_top + ROW_H > top + height {
        row_top + ROW_H - height
    } else {
        return;
    };
    el.set_scroll_top(y as i32);
    app.scroll_top.set(y);
}

/// `<option>`s of a picker, as (value, text) pairs.
pub fn options<const N: usize>(pairs: [(&'static str, &'static str); N]) -> View {
    let options: Vec<View> = pairs.into_iter().map(|(value, text)| view! { option(value=value) { (text) } }).collect();
    View::from(options)
}
