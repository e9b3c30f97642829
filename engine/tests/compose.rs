//! The docker-compose stack stays consistent: the compose file is valid (when a compose
//! client is installed), Prometheus' config passes promtool, and every metric the
//! Grafana dashboard queries is one the engine exports.

use std::path::Path;
use std::process::Command;

use orchestrator::telemetry;

fn compose_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../compose"))
}

#[test]
fn dashboard_queries_only_metrics_the_engine_exports() {
    let exported = telemetry::ALL;
    let text = std::fs::read_to_string(compose_dir().join("grafana/dashboards/orchestrator.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("orchestrator_"))
            {
                let base = word.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
                assert!(
                    exported.contains(&base),
                    "panel {:?} queries {word}, which the engine does not export",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "the dashboard queries the engine's metrics");
}

/// Runs promtool with `args`; where it is missing, a failure on CI and a note elsewhere.
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool").args(args).current_dir(compose_dir().join("prometheus")).output() {
        Ok(o) => Some(o),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("promtool not installed ({e}); not checked");
            None
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    }
}

#[test]
fn prometheus_config_passes_promtool() {
    if let Some(out) = promtool(&["check", "config", "prometheus.yml"]) {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Each alert fires on its symptom and stays quiet on a healthy engine.
#[test]
fn alert_rules_pass_their_promtool_tests() {
    if let Some(out) = promtool(&["test", "rules", "alerts.test.yml"]) {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The rules query only metrics the engine exports.
    let rules = std::fs::read_to_string(compose_dir().join("prometheus/alerts.yml")).unwrap();
    for word in
        rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("orchestrator_"))
    {
        assert!(telemetry::ALL.contains(&word), "alerts.yml queries {word}, which the engine does not export");
    }
}

#[test]
fn compose_file_is_valid_when_a_client_is_installed() {
    let file = compose_dir().join("docker-compose.yml");
    let attempts: [&[&str]; 2] = [&["docker", "compose"], &["docker-compose"]];
    for cmd in attempts {
        let Ok(out) = Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("-f")
            .arg(&file)
            .arg("config")
            .env("ORCHESTRATOR_API_TOKEN", "x")
            .output()
        else {
            continue;
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        // `docker` without its compose plugin reads `compose -f` as its own flags.
        if stderr.contains("unknown command")
            || stderr.contains("is not a docker command")
            || stderr.contains("unknown shorthand flag")
        {
            continue;
        }
        assert!(out.status.success(), "{} config: {stderr}", cmd.join(" "));
        let config = String::from_utf8_lossy(&out.stdout);
        for service in ["kafka:", "scylla:", "engine:", "prometheus:", "grafana:"] {
            assert!(config.contains(service), "{service} missing");
        }
        assert!(config.contains("scylladb/scylla:2025.4"));
        return;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "CI needs a compose client (docker-compose) to validate the file"
    );
    eprintln!("no docker compose client here: the compose file was not validated");
}

/// A metric named anywhere in the engine's source is one `telemetry` registers, so the
/// check above covers every metric there is.
#[test]
fn every_metric_name_is_registered_in_telemetry() {
    let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let mut stack = vec![src.to_path_buf()];
    let mut strays = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("telemetry.rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (at, _) in text.match_indices("\"orchestrator_") {
                    let name: String =
                        text[at + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    strays.push(format!("{}: {name}", path.display()));
                }
            }
        }
    }
    assert!(strays.is_empty(), "metric names outside telemetry.rs: {strays:?}");
    let mut names = telemetry::ALL.to_vec();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), telemetry::ALL.len(), "each metric listed once");
}
