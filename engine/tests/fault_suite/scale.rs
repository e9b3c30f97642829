//! The scale run's report: what each instance of the group did while instances left and
//! joined, read every two seconds from `GET /cluster` on the first engine (which stays).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::common::client;

/// How often the group is looked at.
const EVERY: Duration = Duration::from_secs(2);

/// One instance as the looks saw it.
#[derive(Default)]
pub struct Seen {
    /// Applied events per second (both priorities), one figure per look.
    rates: Vec<f64>,
    /// The partitions it held at its last look, per priority.
    partitions: (Vec<i64>, Vec<i64>),
    /// The lag of those partitions at its last look.
    lag: u64,
}

/// Every instance seen, by name; and the looks taken.
#[derive(Default)]
pub struct Report {
    instances: BTreeMap<String, Seen>,
    looks: usize,
    /// The most instances seen at once.
    most: usize,
}

/// Looks at the group until `stop`.
pub fn watch(base: String, stop: Arc<AtomicBool>) -> JoinHandle<Report> {
    tokio::spawn(async move {
        let mut report = Report::default();
        while !stop.load(Ordering::Relaxed) {
            let answer = client().get(format!("{base}/cluster")).timeout(Duration::from_secs(5)).send().await;
            if let Ok(view) = answer
                && let Ok(view) = view.json::<Value>().await
            {
                report.look(&view);
            }
            tokio::time::sleep(EVERY).await;
        }
        report
    })
}

impl Report {
    fn look(&mut self, view: &Value) {
        let lags: BTreeMap<(bool, i64), u64> = [(true, "vip"), (false, "normal")]
            .into_iter()
            .flat_map(|(vip, p)| {
                let list = view["placement"][p].as_array().cloned().unwrap_or_default();
                list.into_iter()
                    .map(move |s| ((vip, s["partition"].as_i64().unwrap_or(-1)), s["lag"].as_u64().unwrap_or(0)))
            })
            .collect();
        let instances = view["instances"].as_array().cloned().unwrap_or_default();
        self.looks += 1;
        self.most = self.most.max(instances.len());
        for i in instances {
            let seen = self.instances.entry(i["instance"].as_str().unwrap_or("?").to_string()).or_default();
            let rate = |p: &str| i["applied_per_s"][p].as_f64().unwrap_or(0.0);
            seen.rates.push(rate("vip") + rate("normal"));
            let held = |p: &str| -> Vec<i64> {
                i["partitions"][p].as_array().map(|a| a.iter().filter_map(Value::as_i64).collect()).unwrap_or_default()
            };
            seen.partitions = (held("vip"), held("normal"));
            let lag_of =
                |vip: bool, list: &[i64]| list.iter().map(|p| lags.get(&(vip, *p)).copied().unwrap_or(0)).sum::<u64>();
            seen.lag = lag_of(true, &seen.partitions.0) + lag_of(false, &seen.partitions.1);
        }
    }

    /// Instances seen (every one that was ever in the group while it was looked at).
    pub fn instances(&self) -> usize {
        self.instances.len()
    }

    pub fn print(&self) {
        eprintln!("scale: {} looks, {} instances seen, at most {} at once", self.looks, self.instances(), self.most);
        eprintln!(
            "scale: instance                              looks  applied/s mean  peak  partitions vip | normal  lag"
        );
        for (name, s) in &self.instances {
            let mean = s.rates.iter().sum::<f64>() / s.rates.len().max(1) as f64;
            let peak = s.rates.iter().copied().fold(0.0, f64::max);
            let (vip, normal) = (&s.partitions.0, &s.partitions.1);
            eprintln!(
                "scale: {name:<40} {:>5}  {mean:>14.1}  {peak:>4.0}  {vip:?} | {normal:?}  {}",
                s.rates.len(),
                s.lag
            );
        }
    }
}
