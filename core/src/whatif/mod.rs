//! What-if runs (`plugin replay`): a candidate rules version and the active one decide
//! the same recorded events, each with the row it met, and the report says where they
//! part, field by field, and what each cost. Nothing is written.

pub mod recorder;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::{Order, OrderEvent};
use crate::rules::{OrderRules, outcome_json};
use crate::store::Case;

/// Events decided per call, as the pipeline batches them.
const BATCH: usize = 100;
/// Most differences a report carries as samples.
const SAMPLES: usize = 50;
/// The most cases one run may ask for, and the default.
pub const MAX_CASES: usize = 100_000;
pub const DEFAULT_CASES: usize = 10_000;
/// How long one run may decide before it reports what it has.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A count or a cost for each side.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sides<T> {
    pub active: T,
    pub candidate: T,
}

/// What a what-if run found.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WhatIfReport {
    /// The active rules (`slot@version#sha256:…`) and the candidate's sha256.
    pub active: String,
    pub candidate: String,
    pub since: DateTime<Utc>,
    /// Recorded cases decided by both.
    pub cases: u64,
    /// From reading the cases to the report (compiling the candidate not included).
    pub took_ms: f64,
    /// The window held more cases than the limit let in: the newest were left out.
    pub limited: bool,
    /// The deadline stopped the run before every case in hand was decided.
    pub cut_short: bool,
    /// When the first and last case decided were recorded.
    pub first_recorded_at: Option<DateTime<Utc>>,
    pub last_recorded_at: Option<DateTime<Utc>>,
    pub agreed: u64,
    pub differed: u64,
    /// Cases each side failed on (trap, deadline, memory cap); counted in `differed`
    /// too when only one side failed.
    #[schema(value_type = Object)]
    pub errors: Sides<u64>,
    /// Decisions by kind (upsert, skip, reject, error) for each side.
    #[schema(value_type = Object)]
    pub decisions: Sides<BTreeMap<String, u64>>,
    /// Microseconds per event, batched as the pipeline calls the rules.
    #[schema(value_type = Object)]
    pub cost_us_per_event: Sides<f64>,
    /// Up to 50 differences, the earliest first.
    pub samples: Vec<WhatIfDiff>,
}

/// One case the two sides decided differently.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WhatIfDiff {
    pub event_id: String,
    pub order_id: String,
    pub recorded_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub active: Value,
    #[schema(value_type = Object)]
    pub candidate: Value,
    /// The fields that differ: `decision` when the kinds differ, else each changed
    /// field of an upsert, or `reason` for a skip or reject.
    pub fields: Vec<FieldDiff>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FieldDiff {
    pub field: String,
    #[schema(value_type = Object)]
    pub active: Value,
    #[schema(value_type = Object)]
    pub candidate: Value,
}

/// What a report says about the run besides the decisions.
pub struct Run {
    /// The live active version's id (its copy for the run is loaded apart).
    pub active_id: String,
    pub candidate_sha256: String,
    pub since: DateTime<Utc>,
    /// The store held more cases than were read.
    pub limited: bool,
    /// When reading the cases began: `took_ms` counts from here.
    pub started: Instant,
}

/// Decides `cases` with both versions and compares, until `deadline` passes.
pub fn compare(
    active: &dyn OrderRules,
    candidate: &dyn OrderRules,
    run: Run,
    cases: &[Case],
    deadline: Duration,
) -> WhatIfReport {
    let started = Instant::now();
    let mut report = WhatIfReport {
        active: run.active_id,
        candidate: run.candidate_sha256,
        since: run.since,
        cases: 0,
        took_ms: 0.0,
        limited: run.limited,
        cut_short: false,
        first_recorded_at: cases.first().map(|c| c.recorded_at),
        last_recorded_at: None,
        agreed: 0,
        differed: 0,
        errors: Sides::default(),
        decisions: Sides::default(),
        cost_us_per_event: Sides::default(),
        samples: Vec::new(),
    };
    let (mut active_time, mut candidate_time) = (Duration::ZERO, Duration::ZERO);
    for chunk in cases.chunks(BATCH) {
        if started.elapsed() >= deadline {
            report.cut_short = true;
            break;
        }
        let inputs: Vec<(&OrderEvent, Option<&Order>)> = chunk.iter().map(|c| (&c.event, c.current.as_ref())).collect();
        let t = Instant::now();
        let theirs = active.decide_batch(&inputs);
        active_time += t.elapsed();
        let t = Instant::now();
        let ours = candidate.decide_batch(&inputs);
        candidate_time += t.elapsed();
        for ((case, a), c) in chunk.iter().zip(&theirs).zip(&ours) {
            let (a, c) = (outcome_json(a), outcome_json(c));
            tally(&mut report, &a, &c);
            if a == c {
                report.agreed += 1;
                continue;
            }
            report.differed += 1;
            if report.samples.len() < SAMPLES {
                report.samples.push(WhatIfDiff {
                    event_id: case.event.event_id.clone(),
                    order_id: case.event.order_id.clone(),
                    recorded_at: case.recorded_at,
                    fields: field_diffs(&a, &c),
                    active: a,
                    candidate: c,
                });
            }
        }
        report.cases += chunk.len() as u64;
        report.last_recorded_at = chunk.last().map(|c| c.recorded_at);
    }
    let per_event = |d: Duration| d.as_secs_f64() * 1e6 / report.cases.max(1) as f64;
    report.cost_us_per_event = Sides { active: per_event(active_time), candidate: per_event(candidate_time) };
    report.took_ms = run.started.elapsed().as_secs_f64() * 1e3;
    report
}

/// Counts each side's decision by kind, and its failures.
fn tally(report: &mut WhatIfReport, active: &Value, candidate: &Value) {
    for (side, errors, decisions) in [
        (active, &mut report.errors.active, &mut report.decisions.active),
        (candidate, &mut report.errors.candidate, &mut report.decisions.candidate),
    ] {
        let kind = side["decision"].as_str().unwrap_or("error");
        *decisions.entry(kind.to_string()).or_default() += 1;
        if kind == "error" {
            *errors += 1;
        }
    }
}

/// Where two decisions (as report JSON) part.
pub fn field_diffs(active: &Value, candidate: &Value) -> Vec<FieldDiff> {
    let diff =
        |field: &str, a: &Value, c: &Value| FieldDiff { field: field.into(), active: a.clone(), candidate: c.clone() };
    if active["decision"] != candidate["decision"] {
        return vec![diff("decision", &active["decision"], &candidate["decision"])];
    }
    match (&active["value"], &candidate["value"]) {
        (Value::Object(a), Value::Object(c)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(c.keys()).collect();
            keys.into_iter()
                .filter(|k| a.get(*k) != c.get(*k))
                .map(|k| diff(k, a.get(k).unwrap_or(&Value::Null), c.get(k).unwrap_or(&Value::Null)))
                .collect()
        }
        (a, c) if a != c => vec![diff("reason", a, c)],
        _ => Vec::new(),
    }
}

/// How far back a run looks: a duration back from now (`90s`, `30m`, `1h`, `2d`) or an
/// RFC 3339 time.
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad_since(text))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad_since(text)),
    };
    let back = n.checked_mul(secs).and_then(chrono::Duration::try_seconds).ok_or_else(|| bad_since(text))?;
    now.checked_sub_signed(back).ok_or_else(|| bad_since(text))
}

fn bad_since(text: &str) -> String {
    format!("since {text:?} is neither a duration back from now (90s, 30m, 1h, 2d) nor an RFC 3339 time")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn since_reads_durations_and_times() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_since("30m", now).unwrap(), now - chrono::Duration::minutes(30));
        assert_eq!(parse_since("2d", now).unwrap(), now - chrono::Duration::days(2));
        assert_eq!(parse_since("2026-12-01T00:00:00Z", now).unwrap().to_rfc3339(), "2026-12-01T00:00:00+00:00");
        for bad in ["", "h", "10y", "-5m", "99999999999999999999h"] {
            assert!(parse_since(bad, now).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn field_diffs_name_what_changed() {
        let up = |fee: i64| json!({"decision": "upsert", "value": {"status": "PENDING", "shipping_fee_cents": fee}});
        let d = field_diffs(&up(0), &up(499));
        assert_eq!(d, [FieldDiff { field: "shipping_fee_cents".into(), active: json!(0), candidate: json!(499) }]);
        let reject = json!({"decision": "reject", "value": "no"});
        assert_eq!(field_diffs(&up(0), &reject)[0].field, "decision");
        let other = json!({"decision": "reject", "value": "never"});
        assert_eq!(field_diffs(&reject, &other)[0].field, "reason");
        assert!(field_diffs(&reject, &reject).is_empty());
    }
}
