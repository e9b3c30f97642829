//! `orchestrator generate`: starts a run on a running engine and follows it with a progress bar.

use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::model::{Phase, Run};
use crate::config::GenerateArgs;

pub async fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let base = args.url.trim_end_matches('/');
    let mut body = json!({ "quantity": args.quantity });
    if let Some(m) = &args.tier_mix {
        body["tier_mix"] = json!({ "DIAMOND": m[0], "GOLD": m[1], "SILVER": m[2], "BRONZE": m[3] });
    }
    let response = client
        .post(format!("{base}/runs"))
        .bearer_auth(&args.api_token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach the engine at {base} (is `orchestrator serve` running?)"))?;
    if !response.status().is_success() {
        let status = response.status();
        anyhow::bail!("the engine refused the run ({status}): {}", response.text().await.unwrap_or_default());
    }
    let run: Run = response.json().await?;
    eprintln!("run {} started: {} orders", run.id, run.quantity);
    if args.detach {
        println!("{}", run.id);
        return Ok(());
    }
    let id = run.id.clone();
    let run = follow(run.quantity, || async {
        Ok(client.get(format!("{base}/runs/{id}")).send().await?.error_for_status()?.json().await?)
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&run)?);
    match (run.phase, run.verification.as_ref()) {
        (Phase::Done, Some(v)) if v.passed => {
            eprintln!("run {} done in {} ms; verification passed", run.id, run.total_ms.unwrap_or(0));
            Ok(())
        }
        (Phase::Done, Some(v)) => {
            anyhow::bail!("run {} done, but verification failed: {}", run.id, v.failures.join("; "))
        }
        (phase, _) => anyhow::bail!("run {} ended {phase:?}: {}", run.id, run.error.unwrap_or_default()),
    }
}

/// Polls a run every 250 ms behind a progress bar (generated orders, then processed
/// ones) until it ends, and returns it as it ended.
pub async fn follow<F, Fut>(quantity: u64, mut poll: F) -> anyhow::Result<Run>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Run>>,
{
    let bar = ProgressBar::new(quantity);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<18} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")?
            .progress_chars("=> "),
    );
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let run = poll().await?;
        bar.set_message(format!("{:?}", run.phase));
        let done = run.vip.processed + run.normal.processed;
        bar.set_position(if run.phase == Phase::Generating { run.generated } else { done });
        if run.phase.is_final() {
            bar.finish_and_clear();
            return Ok(run);
        }
    }
}
