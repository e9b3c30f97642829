//! An order's journey in the detail drawer: each event as a timeline (source, received,
//! appended, decided, each lost compare-and-set and its resolution, the outcome,
//! published) with the fields it changed as a before/after table.

use chrono::{DateTime, Utc};
use orchestrator_types::journey::{FieldChange, Journey, JourneyEvent, Step};
use serde_json::Value;
use sycamore::prelude::*;

use crate::api;

/// Fetches the journey of `id`; `keep` says whether the answer is still wanted (the
/// drawer may have moved on to another order).
pub async fn load(id: &str, keep: impl Fn() -> bool) -> Option<Result<Journey, String>> {
    let answer = match api::get(&format!("/orders/{}/journey", api::enc(id))).await {
        Ok(r) if r.ok() => r.json::<Journey>().map_err(|e| format!("unreadable journey: {e}")),
        Ok(r) => Err(r.error_text()),
        Err(e) => Err(e),
    };
    keep().then_some(answer)
}

pub fn view(journey: Signal<Option<Result<Journey, String>>>) -> View {
    let body = move || {
        let j = match journey.get_clone() {
            None => return view! { p(class="muted") { "loading the journey…" } },
            Some(Err(e)) => {
                let e = format!("the journey could not be loaded: {e}");
                return view! { p(class="error", data-testid="journey-error") { (e) } };
            }
            Some(Ok(j)) => j,
        };
        let note = if j.truncated { "Showing the order's first 1000 events." } else { "" };
        let events: Vec<View> = j.events.into_iter().map(event_view).collect();
        view! {
            ol(class="journey", data-testid="journey") { (events) }
            p(class="muted") { (note) }
        }
    };
    view! { div { (body) } }
}

fn event_view(e: JourneyEvent) -> View {
    let outcome = e.outcome.as_str();
    let head = format!("v{} · {} · {}", e.version, outcome, e.source);
    // Offsets count from the event's first known time: how long each step took.
    let start = e.steps.iter().find_map(|s| s.at);
    let steps: Vec<View> = e.steps.into_iter().map(|s| step_view(s, start)).collect();
    let changes = changes_view(e.changes);
    view! {
        li(class=format!("journey-event outcome-{outcome}"), data-testid="journey-event", data-outcome=outcome) {
            div(class="journey-head") {
                strong { (head) } " " code(class="event-id", title="event id") { (e.event_id) }
            }
            ol(class="steps") { (steps) }
            (changes)
        }
    }
}

fn step_view(s: Step, start: Option<DateTime<Utc>>) -> View {
    let kind = s.kind.as_str();
    let (clock, exact, offset) = match s.at {
        Some(at) => {
            let offset = start.map(|t0| (at - t0).num_milliseconds()).filter(|ms| *ms != 0);
            (clock(at), at.to_rfc3339(), offset.map(|ms| format!("{ms:+} ms")).unwrap_or_default())
        }
        None => (String::new(), String::new(), String::new()),
    };
    let label = kind.replace('_', " ");
    let datetime = exact.clone();
    view! {
        li(class=format!("step step-{kind}"), data-testid="journey-step", data-step=kind) {
            span(class="step-kind") { (label) }
            span(class="step-body") {
                time(class="step-at", datetime=datetime, title=exact) { (clock) }
                span(class="step-offset") { (offset) }
                span(class="step-detail") { (s.detail) }
            }
        }
    }
}

fn changes_view(changes: Vec<FieldChange>) -> View {
    if changes.is_empty() {
        return View::default();
    }
    let rows: Vec<View> = changes
        .into_iter()
        .map(|c| {
            let (before, after) = if c.withheld {
                ("—".to_string(), "changed (personal data, not kept)".to_string())
            } else {
                (
                    c.before.as_ref().map(shown).unwrap_or_else(|| "—".into()),
                    c.after.as_ref().map(shown).unwrap_or_default(),
                )
            };
            let field = c.field.clone();
            view! {
                tr(data-testid="journey-change", data-field=field) {
                    th(scope="row") { (c.field) } td { (before) } td { (after) }
                }
            }
        })
        .collect();
    view! {
        table(class="changes", data-testid="journey-changes") {
            caption { "Fields changed" }
            thead { tr { th(scope="col") { "field" } th(scope="col") { "before" } th(scope="col") { "after" } } }
            tbody { (rows) }
        }
    }
}

/// A value as people read it: strings without quotes, null as a dash.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

/// The local wall-clock time with milliseconds, as "10:00:01.123".
fn clock(at: DateTime<Utc>) -> String {
    let d = js_sys::Date::new(&(at.timestamp_millis() as f64).into());
    format!("{:02}:{:02}:{:02}.{:03}", d.get_hours(), d.get_minutes(), d.get_seconds(), d.get_milliseconds())
}
