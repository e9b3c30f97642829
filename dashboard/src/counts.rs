//! Orders by status and priority above the table (`GET /order-counts`), refreshed every
//! 5 s while the orders page is shown. A count is a button: it filters the table.

use serde_json::Value;
use sycamore::prelude::*;

use crate::App;
use crate::api;

const EVERY_MS: i32 = 5_000;

/// Asks now, and every `EVERY_MS` while its page shows.
pub fn poll(app: App, counts: Signal<Value>) {
    crate::nav::every_while_shown(app, crate::nav::Section::Orders, EVERY_MS, move || {
        api::load_into("/order-counts", counts)
    });
}

/// "1,234,567": counts are read at a glance.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn view(app: App, counts: Signal<Value>) -> View {
    let body = move || {
        let c = counts.get_clone();
        if c.is_null() {
            return view! { span(class="muted") { "counting…" } };
        }
        if let Some(e) = c["error"].as_str() {
            let e = format!("counts unavailable: {e}");
            return view! { span(class="error") { (e) } };
        }
        let exact = c["exact"].as_bool().unwrap_or(false);
        let mark = if exact { "" } else { "≈ " };
        let title = if exact {
            "counted at the time shown".to_string()
        } else {
            "approximate: kept in counters on the CQL store".to_string()
        };
        let total = format!("{mark}{} orders", grouped(c["total"].as_u64().unwrap_or(0)));
        let chip = |filter: Signal<String>, key: String, n: u64, kind: &'static str| {
            let label = format!("{key} {mark}{}", grouped(n));
            let testid = format!("count-{kind}-{key}");
            let value = key.clone();
            let pressed = move || if filter.with(|f| *f == key) { "true" } else { "false" };
            let pick = move |_| {
                filter.set(if filter.get_clone_untracked() == value { String::new() } else { value.clone() });
                crate::orders::reload(app);
            };
            view! { button(class="count-chip", data-testid=testid, aria-pressed=pressed, on:click=pick) { (label) } }
        };
        let group = |filter: Signal<String>, map: &Value, kind: &'static str| -> Vec<View> {
            map.as_object()
                .map(|m| m.iter().map(|(k, n)| chip(filter, k.clone(), n.as_u64().unwrap_or(0), kind)).collect())
                .unwrap_or_default()
        };
        let statuses = group(app.f_status, &c["by_status"], "status");
        let priorities = group(app.f_priority, &c["by_priority"], "priority");
        view! {
            span(class="count-total", data-testid="count-total", title=title) { (total) }
            span(class="count-group", role="group", aria-label="orders by status") { (statuses) }
            span(class="count-group", role="group", aria-label="orders by priority") { (priorities) }
        }
    };
    view! { div(class="counts", data-testid="counts") { (body) } }
}
