//! The engine's pulse (`stats` on `/ws`, once a second): a strip of sparklines of the
//! last minute on every page, and the health page's charts of the last 10 minutes,
//! seeded on connect from `stats.history`. Nothing here polls.

use serde::Deserialize;
use serde_json::Value;
use sycamore::prelude::*;

use crate::App;
use crate::chart::{self, Series};

/// Samples kept: the engine's 10 minutes.
const KEPT: usize = 600;
/// Samples a sparkline shows: the last minute.
const STRIP: usize = 60;

#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct Pair {
    vip: f64,
    normal: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Sample {
    at_ms: f64,
    applied_per_s: Pair,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    lag: Pair,
    conflicts_per_s: f64,
    dead_letters_per_s: f64,
    webhooks_per_s: std::collections::BTreeMap<String, f64>,
    /// Instances the figures add up (0: this one alone).
    #[serde(skip)]
    instances: usize,
    /// The group's figures, where instances share a log.
    #[serde(default)]
    cluster: Option<Group>,
}

/// What `cluster` carries: the group's rates (latencies: its worst instance's).
#[derive(Debug, Clone, Deserialize)]
struct Group {
    applied_per_s: Pair,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    conflicts_per_s: f64,
    dead_letters_per_s: f64,
    webhooks_per_s: std::collections::BTreeMap<String, f64>,
    instances: Vec<Value>,
}

impl Sample {
    /// The figures the charts draw: the group's where there is one (lag is the group's
    /// either way), this instance's otherwise.
    fn whole(mut self) -> Self {
        if let Some(g) = self.cluster.take() {
            self.applied_per_s = g.applied_per_s;
            (self.latency_p50_ms, self.latency_p99_ms) = (g.latency_p50_ms, g.latency_p99_ms);
            (self.conflicts_per_s, self.dead_letters_per_s) = (g.conflicts_per_s, g.dead_letters_per_s);
            self.webhooks_per_s = g.webhooks_per_s;
            self.instances = g.instances.len();
        }
        self
    }

    fn webhooks(&self, outcome: &str) -> f64 {
        self.webhooks_per_s.get(outcome).copied().unwrap_or(0.0)
    }
}

#[derive(Clone, Copy)]
pub struct PulseState {
    samples: Signal<Vec<Sample>>,
}

impl PulseState {
    pub fn new() -> Self {
        PulseState { samples: create_signal(Vec::new()) }
    }
}

/// A `stats` message: one more second.
pub fn on_sample(app: App, msg: &Value) {
    let Ok(sample) = serde_json::from_value::<Sample>(msg["sample"].clone()) else { return };
    let sample = sample.whole();
    app.pulse.samples.update(|s| {
        // A sample the history brought already (it came in between) is not drawn twice.
        if s.last().is_none_or(|l| l.at_ms < sample.at_ms) {
            s.push(sample);
        }
        if s.len() > KEPT {
            s.remove(0);
        }
    });
}

/// A `stats.history` message (on connect): the engine's last 10 minutes, replacing ours.
pub fn on_history(app: App, msg: &Value) {
    let Ok(samples) = serde_json::from_value::<Vec<Sample>>(msg["samples"].clone()) else { return };
    let samples = samples.into_iter().map(Sample::whole).collect();
    app.pulse.samples.set(samples);
}

/// One chart: its lines, each a value per sample (None leaves a sample out).
struct Metric {
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    lines: Vec<Line>,
}

struct Line {
    name: &'static str,
    color: &'static str,
    value: Pick,
}

/// A line's value in a sample; None leaves the sample out.
type Pick = fn(&Sample) -> Option<f64>;

/// Orange VIP, blue NORMAL, as in the run charts (the theme's line colours).
const VIP: &str = "var(--line-vip)";
const NORMAL: &str = "var(--line-normal)";

fn metrics() -> Vec<Metric> {
    let m = |key, title, unit, lines: Vec<(_, _, Pick)>| Metric {
        key,
        title,
        unit,
        lines: lines.into_iter().map(|(name, color, value)| Line { name, color, value }).collect(),
    };
    vec![
        m(
            "applied",
            "applied",
            "/s",
            vec![("vip", VIP, |s| Some(s.applied_per_s.vip)), ("normal", NORMAL, |s| Some(s.applied_per_s.normal))],
        ),
        m(
            "latency",
            "apply latency",
            " ms",
            vec![("p50", NORMAL, |s| s.latency_p50_ms), ("p99", VIP, |s| s.latency_p99_ms)],
        ),
        m("lag", "lag", "", vec![("vip", VIP, |s| Some(s.lag.vip)), ("normal", NORMAL, |s| Some(s.lag.normal))]),
        m("conflicts", "CAS conflicts", "/s", vec![("all", "var(--line-conflicts)", |s| Some(s.conflicts_per_s))]),
        m("dead-letters", "dead letters", "/s", vec![("all", "var(--line-bad)", |s| Some(s.dead_letters_per_s))]),
        m(
            "webhooks",
            "webhooks",
            "/s",
            vec![
                ("received", "var(--line-ok)", |s| Some(s.webhooks("received"))),
                ("duplicate", NORMAL, |s| Some(s.webhooks("duplicate"))),
                ("rejected", "var(--line-bad)", |s| Some(s.webhooks("rejected"))),
                ("other", "var(--line-other)", |s| {
                    Some(s.webhooks("ignored") + s.webhooks("uninstalled") + s.webhooks("shop_inactive"))
                }),
            ],
        ),
    ]
}

fn draw(metric: &Metric, samples: &[Sample], w: f64, h: f64, caption: &str) -> String {
    let series: Vec<Series> = metric
        .lines
        .iter()
        .map(|l| Series {
            class: l.name,
            color: l.color,
            points: samples.iter().filter_map(|s| (l.value)(s).map(|v| (s.at_ms, v))).collect(),
        })
        .collect();
    chart::svg(&series, w, h, caption)
}

/// The latest value of each line, as text ("vip 120/s · normal 80/s").
fn now_text(metric: &Metric, samples: &[Sample]) -> String {
    let Some(last) = samples.last() else { return "–".into() };
    let values: Vec<String> = metric
        .lines
        .iter()
        .map(|l| {
            let v = (l.value)(last).map_or("–".to_string(), |v| format!("{}{}", chart::short(v), metric.unit));
            if metric.lines.len() == 1 { v } else { format!("{} {v}", l.name) }
        })
        .collect();
    values.join(" · ")
}

/// An SVG drawn into `node` whenever the samples change, while `shown` says so.
fn drawn(app: App, node: NodeRef, shown: impl Fn() -> bool + 'static, svg: impl Fn(&[Sample]) -> String + 'static) {
    let samples = app.pulse.samples;
    create_effect(move || {
        if !shown() {
            return;
        }
        let text = samples.with(|s| svg(s));
        if let Some(el) = node.try_get().and_then(|n| wasm_bindgen::JsCast::dyn_into::<web_sys::Element>(n).ok()) {
            el.set_inner_html(&text);
        }
    });
}

/// The strip on every page: each figure now, and its last minute.
pub fn strip(app: App) -> View {
    let samples = app.pulse.samples;
    let items: Vec<View> = metrics()
        .into_iter()
        .map(|metric| {
            let node = create_node_ref();
            let (key, title) = (metric.key, metric.title);
            let metric = std::rc::Rc::new(metric);
            let m = metric.clone();
            drawn(app, node, || true, move |s| draw(&m, &s[s.len().saturating_sub(STRIP)..], 120.0, 24.0, ""));
            let now = move || samples.with(|s| now_text(&metric, s));
            let points = move || samples.with(|s| s.len().min(STRIP).to_string());
            let testid = format!("spark-{key}");
            view! {
                div(class="spark", data-testid=testid, data-points=points) {
                    span(class="spark-title") { (title) }
                    div(class="spark-line", r#ref=node) {}
                    span(class="spark-now", data-testid="spark-now") { (now) }
                }
            }
        })
        .collect();
    // Whose figures they are: the group's, once a sample says how many instances it adds.
    let whose = move || {
        samples.with(|s| match s.last().map(|l| l.instances).unwrap_or(0) {
            0 => String::new(),
            n => format!("cluster, {n} instance{}", if n == 1 { "" } else { "s" }),
        })
    };
    view! {
        section(class="strip", aria-label="live figures, last minute") {
            (items)
            span(class="spark-whose muted", data-testid="spark-whose") { (whose) }
        }
    }
}

/// The health page's charts: the last 10 minutes of each figure.
pub fn charts(app: App) -> View {
    let samples = app.pulse.samples;
    let items: Vec<View> = metrics()
        .into_iter()
        .map(|metric| {
            let node = create_node_ref();
            let (key, title) = (metric.key, metric.title);
            let legend: Vec<View> = metric
                .lines
                .iter()
                .map(|l| {
                    let swatch = format!("background:{}", l.color);
                    view! { span(class="swatch", style=swatch) {} (l.name) " " }
                })
                .collect();
            let metric = std::rc::Rc::new(metric);
            let m = metric.clone();
            let caption = format!("peak {{peak}}{}", m.unit);
            // Drawn only while the health page shows, and at once when it comes back.
            let shown = move || app.page.with(|p| p.section == crate::nav::Section::Health);
            drawn(app, node, shown, move |s| draw(&m, s, 600.0, 80.0, &caption));
            let now = move || samples.with(|s| now_text(&metric, s));
            let points = move || samples.with(|s| s.len().to_string());
            let testid = format!("chart-{key}");
            view! {
                figure(class="pulse-chart", data-testid=testid, data-points=points) {
                    figcaption { strong { (title) } " " (legend) "· now " span(data-testid="chart-now") { (now) } }
                    div(class="chart", r#ref=node) {}
                }
            }
        })
        .collect();
    view! {
        section(class="panel pulse", data-testid="pulse-charts") {
            h2 { "Last 10 minutes" }
            div(class="pulse-grid") { (items) }
        }
    }
}
