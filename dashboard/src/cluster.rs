//! The health page's cluster view (`GET /cluster`, every 2 s while the page shows): the
//! instances in the group with the partitions each consumes, their pauses and the plugin
//! versions they decide with (which must agree), and the group's lag per partition.

use serde_json::Value;
use sycamore::prelude::*;

use crate::App;
use crate::api;

const EVERY_MS: i32 = 2_000;

/// Asks now, and every `EVERY_MS` while its page shows.
pub fn poll(app: App, view: Signal<Value>) {
    crate::nav::every_while_shown(app, crate::nav::Section::Health, EVERY_MS, move || api::load_into("/cluster", view));
}

fn list(v: &Value) -> String {
    let parts: Vec<String> = v.as_array().map(|a| a.iter().map(|p| p.to_string()).collect()).unwrap_or_default();
    if parts.is_empty() { "–".into() } else { parts.join(", ") }
}

fn cells(texts: Vec<String>) -> View {
    View::from(texts.into_iter().map(|t| view! { td { (t) } }).collect::<Vec<View>>())
}

fn heads(names: &[&'static str]) -> View {
    View::from(names.iter().map(|h| view! { th(scope="col") { (*h) } }).collect::<Vec<View>>())
}

fn instances_table(v: &Value) -> View {
    let this = v["this"].as_str().unwrap_or("").to_string();
    let rows: Vec<View> = v["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|i| {
            let name = i["instance"].as_str().unwrap_or("?").to_string();
            let shown = if name == this { format!("{name} (this one)") } else { name.clone() };
            let paused = |p: &str| if i["paused"][p] == true { "paused" } else { "running" };
            let applied = format!(
                "{:.0} / {:.0}",
                i["applied_per_s"]["vip"].as_f64().unwrap_or(0.0),
                i["applied_per_s"]["normal"].as_f64().unwrap_or(0.0)
            );
            let texts = vec![
                shown,
                format!("{} ms ago", i["seen_ms_ago"]),
                list(&i["partitions"]["vip"]),
                list(&i["partitions"]["normal"]),
                format!("{} / {}", paused("vip"), paused("normal")),
                i["deciding"]["order-rules"].as_str().unwrap_or("?").to_string(),
                i["deciding"]["conflict-resolver"].as_str().unwrap_or("?").to_string(),
                applied,
            ];
            let row = cells(texts);
            view! { tr(data-testid="cluster-instance", data-instance=name) { (row) } }
        })
        .collect();
    let names = [
        "instance",
        "last beacon",
        "VIP partitions",
        "NORMAL partitions",
        "VIP / NORMAL",
        "order rules",
        "resolver",
        "applied/s VIP / NORMAL",
    ];
    view! {
        table(class="groups", data-testid="cluster-instances") {
            caption { "Instances in the group" }
            thead { tr { (heads(&names)) } }
            tbody { (rows) }
        }
    }
}

fn partitions_table(v: &Value) -> View {
    let placement = &v["placement"];
    if !placement.is_object() {
        return view! { p(class="muted") { "One instance, one partition per priority: the embedded log." } };
    }
    // Who holds each partition, from the instances' own lists.
    let holder = |priority: &str, partition: i64| -> String {
        let holders: Vec<String> = v["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["partitions"][priority].as_array().is_some_and(|a| a.iter().any(|p| p == partition)))
            .filter_map(|i| i["instance"].as_str().map(String::from))
            .collect();
        if holders.is_empty() { "no one (rebalancing?)".into() } else { holders.join(", ") }
    };
    let mut rows = Vec::new();
    for priority in ["vip", "normal"] {
        for p in placement[priority].as_array().cloned().unwrap_or_default() {
            let n = p["partition"].as_i64().unwrap_or(-1);
            let texts = vec![priority.to_uppercase(), n.to_string(), p["lag"].to_string(), holder(priority, n)];
            let key = format!("{priority}-{n}");
            let row = cells(texts);
            rows.push(view! { tr(data-testid="cluster-partition", data-partition=key) { (row) } });
        }
    }
    view! {
        table(class="groups", data-testid="cluster-partitions") {
            caption { "Partitions: the group's lag, and who consumes each" }
            thead { tr { (heads(&["priority", "partition", "lag", "consumed by"])) } }
            tbody { (rows) }
        }
    }
}

pub fn view(app: App) -> View {
    let state = create_signal(Value::Null);
    poll(app, state);
    let body = move || {
        let v = state.get_clone();
        if v.is_null() {
            return view! { p(class="muted") { "…" } };
        }
        if let Some(e) = v["error"].as_str() {
            let e = format!("cluster view unavailable: {e}");
            return view! { p(class="error") { (e) } };
        }
        let n = v["instances"].as_array().map_or(0, Vec::len);
        let agree = v["plugins_agree"] == true;
        let summary = format!(
            "{n} instance{} · plugin versions {}",
            if n == 1 { "" } else { "s" },
            if agree { "agree" } else { "DISAGREE: an instance decides with another version" }
        );
        let class = if agree { "" } else { "error" };
        let (instances, partitions) = (instances_table(&v), partitions_table(&v));
        view! {
            p(class=class, data-testid="cluster-summary") { (summary) }
            (instances)
            (partitions)
        }
    };
    view! {
        section(class="panel", data-testid="cluster") {
            h2 { "Cluster" }
            (body)
        }
    }
}
