//! The orders table's columns: each shown or hidden, sized to its widest value or as the
//! operator dragged it, laid out through one CSS variable (`--cols`) that the header and
//! every pooled row read.

use std::cell::RefCell;
use std::collections::HashMap;

use sycamore::prelude::*;
use wasm_bindgen::{JsCast, JsValue};

use crate::rows::Row;

/// How a column takes its width.
#[derive(Clone, Copy, PartialEq)]
pub enum Width {
    /// As wide as its widest value: never cut (the key columns).
    Fit,
    /// At least this many px, sharing what the fitted columns leave.
    Share(f64),
}

pub struct Column {
    pub key: &'static str,
    pub label: &'static str,
    pub width: Width,
}

pub const COLUMNS: [Column; 10] = [
    Column { key: "id", label: "id", width: Width::Fit },
    Column { key: "customer", label: "customer", width: Width::Share(100.0) },
    Column { key: "tier", label: "tier", width: Width::Fit },
    Column { key: "priority", label: "priority", width: Width::Fit },
    Column { key: "status", label: "status", width: Width::Fit },
    Column { key: "total", label: "total", width: Width::Fit },
    Column { key: "fee", label: "shipping", width: Width::Fit },
    Column { key: "version", label: "v", width: Width::Fit },
    Column { key: "updated", label: "updated", width: Width::Fit },
    Column { key: "decided", label: "decided by", width: Width::Share(100.0) },
];
const N: usize = COLUMNS.len();

/// The table's font (style.css: body and `.badge`), for measuring values.
const FONT: &str = "13px system-ui, sans-serif";
const BADGE_FONT: &str = "11px system-ui, sans-serif";
const HEADER_FONT: &str = "600 13px system-ui, sans-serif";
/// A cell's horizontal padding (`.c`), a badge's (`.badge`), and slack for rounding.
const CELL_PAD: f64 = 12.0 + 2.0;
const BADGE_PAD: f64 = 12.0;
/// The width of the borders and a vertical scrollbar beside the rows.
const SCROLLBAR: f64 = 20.0;
/// The narrowest a dragged column gets.
const MIN_DRAG: f64 = 32.0;
/// The widest a drag makes a column.
const MAX_DRAG: f64 = 2000.0;

#[derive(Clone, Copy)]
pub struct Columns {
    /// One bit per column in [`COLUMNS`]: hidden.
    pub hidden: Signal<u16>,
    /// Widths measured for the fitted columns (px); they only grow until a reload.
    fitted: Signal<[f64; N]>,
    /// Widths the operator dragged (px), which win over measured ones.
    dragged: Signal<[Option<f64>; N]>,
}

impl Columns {
    pub fn new() -> Self {
        Columns { hidden: create_signal(0), fitted: create_signal([0.0; N]), dragged: create_signal([None; N]) }
    }

    pub fn shown(&self, i: usize) -> bool {
        self.hidden.with(|h| h & (1 << i) == 0)
    }

    /// A cell's style: hidden columns are taken out of the grid, and a fitted column
    /// dragged narrower than its values cuts them (style.css cuts the shared ones).
    pub fn cell_style(self, i: usize) -> impl Fn() -> &'static str + Copy {
        let style = create_selector(move || {
            let dragged = COLUMNS[i].width == Width::Fit && self.dragged.with(|d| d[i].is_some());
            match (self.shown(i), dragged) {
                (false, _) => "display:none",
                (true, true) => "overflow:hidden;text-overflow:ellipsis",
                (true, false) => "",
            }
        });
        move || style.get()
    }

    /// The table's style: `--cols`, the `grid-template-columns` of the shown columns,
    /// and `--min-w`, the width they need, past which the table (not the page) scrolls
    /// sideways.
    pub fn style(&self) -> String {
        let (fitted, dragged) = (self.fitted.get(), self.dragged.get());
        let mut need = 0.0;
        let parts: Vec<String> = (0..N)
            .filter(|&i| self.shown(i))
            .map(|i| match (dragged[i], COLUMNS[i].width) {
                (Some(w), _) => {
                    need += w;
                    format!("{w:.0}px")
                }
                (None, Width::Fit) => {
                    let w = fitted[i].max(header_width(i));
                    need += w;
                    format!("{w:.0}px")
                }
                (None, Width::Share(min)) => {
                    need += min;
                    format!("minmax({min:.0}px, 1fr)")
                }
            })
            .collect();
        // Room for the borders and the vertical scrollbar.
        format!("--cols: {}; --min-w: {:.0}px", parts.join(" "), need + SCROLLBAR)
    }

    /// Widens the fitted columns to at least `widths` (from [`widths`]).
    pub fn widen(self, widths: [f64; N]) {
        let before = self.fitted.get_untracked();
        let mut widest = before;
        for (w, new) in widest.iter_mut().zip(widths) {
            *w = w.max(new);
        }
        if widest != before {
            self.fitted.set(widest);
        }
    }

    /// Forgets the measured widths (a new query shows other rows).
    pub fn refit(self) {
        self.fitted.set([0.0; N]);
    }

    /// A column's width as its grip reports it (a shared column's least, until dragged).
    pub fn width(self, i: usize) -> f64 {
        match (self.dragged.with(|d| d[i]), COLUMNS[i].width) {
            (Some(w), _) => w,
            (None, Width::Fit) => self.fitted.with(|f| f[i]).max(header_width(i)),
            (None, Width::Share(min)) => min,
        }
    }

    pub fn drag_to(self, i: usize, px: f64) {
        self.dragged.update(|d| d[i] = Some(px.clamp(MIN_DRAG, MAX_DRAG)));
    }
}

/// The widest value of `rows` per fitted column (0 for the others).
pub fn widths<'a>(rows: impl Iterator<Item = Row<'a>>) -> [f64; N] {
    let mut widest = [0.0_f64; N];
    for o in rows {
        for (i, w) in widest.iter_mut().enumerate() {
            if COLUMNS[i].width == Width::Fit {
                *w = w.max(value_width(i, &o));
            }
        }
    }
    widest
}

/// A column's text for a row, as its cell shows it; `now_ms` for relative times.
pub fn text(i: usize, o: &Row<'_>, now_ms: f64) -> String {
    match COLUMNS[i].key {
        "id" => o.id().to_string(),
        "customer" => o.customer().into(),
        "tier" => o.tier().as_str().into(),
        "priority" => o.priority().as_str().into(),
        "status" => o.status().as_str().into(),
        "total" => money(o.total_cents(), o.currency()),
        "fee" => money(o.fee_cents(), o.currency()),
        "version" => o.version().to_string(),
        "updated" => ago(o.updated_at().timestamp_millis() as f64, now_ms),
        _ => o.decided_by().into(),
    }
}

/// "3 s ago", "12 min ago", "5 h ago", "2 d ago".
pub fn ago(at_ms: f64, now_ms: f64) -> String {
    let s = ((now_ms - at_ms) / 1000.0).max(0.0) as u64;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// The widest an `ago` text gets in a unit ("59 min ago"), so that the column does not
/// grow and shrink as time passes.
const AGO_WIDEST: &str = "59 min ago";

thread_local! {
    static FORMATS: RefCell<HashMap<String, Option<js_sys::Function>>> = RefCell::new(HashMap::new());
    /// The canvas that measures, and the font it is set to: setting one parses it, and
    /// live updates measure thousands of values a second.
    static CANVAS: RefCell<Option<(web_sys::CanvasRenderingContext2d, String)>> = const { RefCell::new(None) };
    static MEASURED: RefCell<HashMap<(&'static str, &'static str), f64>> = RefCell::new(HashMap::new());
}

/// An amount in its currency's format for the browser's locale ("$1,234.56",
/// "1.234,56 €"); an unknown currency code falls back to "1234.56 XYZ".
pub fn money(cents: i64, currency: &str) -> String {
    let format = FORMATS.with_borrow_mut(|f| match f.get(currency) {
        Some(known) => known.clone(),
        None => f.entry(currency.to_string()).or_insert_with(|| currency_format(currency).ok()).clone(),
    });
    // Kept in minor units: hundredths, or whole units for currencies without them.
    let amount = cents as f64 / 10f64.powi(orchestrator_types::minor_digits(currency) as i32);
    format
        .and_then(|f| f.call1(&JsValue::NULL, &JsValue::from_f64(amount)).ok())
        .and_then(|s| s.as_string())
        .unwrap_or_else(|| crate::api::money(cents, currency))
}

/// `new Intl.NumberFormat(undefined, {style: "currency", currency}).format`, through
/// `Reflect`, which hands back the RangeError of a code Intl cannot read instead of
/// throwing it through the module.
fn currency_format(currency: &str) -> Result<js_sys::Function, JsValue> {
    let options = js_sys::Object::new();
    js_sys::Reflect::set(&options, &"style".into(), &"currency".into())?;
    js_sys::Reflect::set(&options, &"currency".into(), &currency.into())?;
    let intl = js_sys::Reflect::get(&js_sys::global(), &"Intl".into())?;
    let ctor: js_sys::Function = js_sys::Reflect::get(&intl, &"NumberFormat".into())?.dyn_into()?;
    let nf = js_sys::Reflect::construct(&ctor, &js_sys::Array::of2(&JsValue::UNDEFINED, &options))?;
    js_sys::Reflect::get(&nf, &"format".into())?.dyn_into()
}

fn measure(text: &str, font: &str) -> f64 {
    CANVAS.with_borrow_mut(|c| {
        if c.is_none() {
            *c = web_sys::window()
                .and_then(|w| w.document())
                .and_then(|d| d.create_element("canvas").ok())
                .and_then(|e| e.dyn_into::<web_sys::HtmlCanvasElement>().ok())
                .and_then(|canvas| canvas.get_context("2d").ok().flatten())
                .and_then(|ctx| ctx.dyn_into::<web_sys::CanvasRenderingContext2d>().ok())
                .map(|ctx| (ctx, String::new()));
        }
        match c {
            Some((ctx, set)) => {
                if set != font {
                    ctx.set_font(font);
                    *set = font.to_string();
                }
                ctx.measure_text(text).map(|m| m.width()).unwrap_or(text.len() as f64 * 8.0)
            }
            // No canvas: a generous guess per character.
            None => text.len() as f64 * 8.0,
        }
    })
}

fn value_width(i: usize, o: &Row<'_>) -> f64 {
    match COLUMNS[i].key {
        // A few values each: measured once.
        "status" => measured_once(o.status().as_str(), BADGE_FONT) + BADGE_PAD + CELL_PAD,
        "updated" => measured_once(AGO_WIDEST, FONT) + CELL_PAD,
        "tier" => measured_once(o.tier().as_str(), FONT) + CELL_PAD,
        "priority" => measured_once(o.priority().as_str(), FONT) + CELL_PAD,
        _ => measure(&text(i, o, 0.0), FONT) + CELL_PAD,
    }
}

fn header_width(i: usize) -> f64 {
    // Bold (`.thead`), with room for the drag grip.
    measured_once(COLUMNS[i].label, HEADER_FONT) + CELL_PAD + 8.0
}

/// The width of a text of a small fixed set (enum values, labels), kept after the first
/// measurement.
fn measured_once(text: &'static str, font: &'static str) -> f64 {
    if let Some(w) = MEASURED.with_borrow(|m| m.get(&(text, font)).copied()) {
        return w;
    }
    let w = measure(text, font);
    MEASURED.with_borrow_mut(|m| m.insert((text, font), w));
    w
}

/// The header: a cell per column with a grip to drag its width, and a menu of the
/// columns to show.
pub fn header(cols: Columns) -> View {
    let cells: Vec<View> = (0..N)
        .map(|i| {
            let start = create_signal(None::<(f64, f64)>);
            let down = move |e: web_sys::PointerEvent| {
                let Some(grip) = e.target().and_then(|t| t.dyn_into::<web_sys::Element>().ok()) else { return };
                let cell_width = grip.parent_element().map(|p| p.get_bounding_client_rect().width()).unwrap_or(0.0);
                let _ = grip.set_pointer_capture(e.pointer_id());
                start.set(Some((e.client_x() as f64, cell_width)));
                e.prevent_default();
            };
            let moved = move |e: web_sys::PointerEvent| {
                // No button held: the drag ended where no `pointerup` reached the grip.
                if e.buttons() == 0 {
                    return start.set(None);
                }
                if let Some((x0, w0)) = start.get() {
                    cols.drag_to(i, w0 + e.client_x() as f64 - x0);
                }
            };
            let up = move |_: web_sys::PointerEvent| start.set(None);
            let lost = move |_: web_sys::PointerEvent| start.set(None);
            // The keyboard's way: arrows narrow or widen by 10 px (50 with Shift).
            let key = move |e: web_sys::KeyboardEvent| {
                let step = if e.shift_key() { 50.0 } else { 10.0 };
                let by = match e.key().as_str() {
                    "ArrowLeft" => -step,
                    "ArrowRight" => step,
                    _ => return,
                };
                let Some(grip) = e.target().and_then(|t| t.dyn_into::<web_sys::Element>().ok()) else { return };
                let width = grip.parent_element().map(|p| p.get_bounding_client_rect().width()).unwrap_or(0.0);
                cols.drag_to(i, width + by);
                e.prevent_default();
            };
            let c = &COLUMNS[i];
            view! {
                span(class=format!("c c-{}", c.key), style=cols.cell_style(i), data-testid=format!("col-{}", c.key)) {
                    (c.label)
                    span(
                        class="grip",
                        data-testid=format!("col-grip-{}", c.key),
                        title="drag, or focus and use the arrow keys, to resize",
                        role="separator",
                        aria-orientation="vertical",
                        aria-label=format!("resize the {} column (left and right arrows)", c.label),
                        tabindex="0",
                        aria-valuemin=format!("{MIN_DRAG:.0}"),
                        aria-valuemax=format!("{MAX_DRAG:.0}"),
                        aria-valuenow=move || format!("{:.0}", cols.width(i)),
                        on:keydown=key,
                        on:pointerdown=down,
                        on:pointermove=moved,
                        on:pointerup=up,
                        on:pointercancel=lost,
                        on:lostpointercapture=lost
                    )
                }
            }
        })
        .collect();
    View::from(cells)
}

/// A menu of checkboxes, one per column.
pub fn picker(cols: Columns) -> View {
    let boxes: Vec<View> = (0..N)
        .map(|i| {
            let toggled = move |e: web_sys::Event| {
                let on = e
                    .target()
                    .and_then(|t| t.dyn_into::<web_sys::HtmlInputElement>().ok())
                    .is_some_and(|b| b.checked());
                cols.hidden.update(|h| if on { *h &= !(1 << i) } else { *h |= 1 << i });
            };
            let c = &COLUMNS[i];
            view! {
                label {
                    input(
                        r#type="checkbox",
                        data-testid=format!("col-toggle-{}", c.key),
                        checked=cols.shown(i),
                        on:change=toggled
                    )
                    " " (c.label)
                }
            }
        })
        .collect();
    view! {
        details(class="col-picker", data-testid="col-picker") {
            summary { "columns" }
            div(class="col-list") { (boxes) }
        }
    }
}
