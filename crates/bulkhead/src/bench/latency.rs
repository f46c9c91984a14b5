//! Manifest latencies: synchronous, asynchronous (kick-off and completion) and `_since`.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::Client;
use super::measure::percentile;

/// p50 and p95 in milliseconds, and the first request's time: the store remembers plans of
/// an unchanged cohort, so the first manifest of a request shows the uncached cost and the
/// percentiles mostly the repeated one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub first_ms: f64,
}

impl Latency {
    fn of(samples: &[f64]) -> Latency {
        Latency {
            p50_ms: percentile(samples, 0.50),
            p95_ms: percentile(samples, 0.95),
            first_ms: samples.first().copied().unwrap_or_default(),
        }
    }
}

pub async fn synchronous(client: &Client, group_id: &str, runs: usize) -> anyhow::Result<Latency> {
    let mut samples = Vec::new();
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        client.manifest(group_id).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Latency::of(&samples))
}

/// `Prefer: respond-async`: the 202's latency and the time until the status answers 200.
pub struct AsyncLatency {
    pub kick_off: Latency,
    pub complete: Latency,
}

pub async fn asynchronous(
    client: &Client,
    group_id: &str,
    runs: usize,
    poll: Duration,
) -> anyhow::Result<AsyncLatency> {
    let (mut kick_offs, mut completions) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let export = client.export_async(group_id, poll).await?;
        kick_offs.push(export.kick_off_ms);
        completions.push(export.complete_ms);
    }
    Ok(AsyncLatency { kick_off: Latency::of(&kick_offs), complete: Latency::of(&completions) })
}

/// The `_since` manifest when little changed: `writes` new Observations for the Group's first
/// members after a manifest's `transactionTime`, then `runs` manifests with `_since` set to it.
pub struct SinceResult {
    pub members: usize,
    pub writes: usize,
    pub latency: Latency,
    /// Resources the `_since` manifest lists (every write, and nothing else, when the data set
    /// is otherwise quiet).
    pub resources: u64,
}

pub async fn since(
    client: &Client,
    group_id: &str,
    members: &[String],
    writes: usize,
    runs: usize,
) -> anyhow::Result<SinceResult> {
    let before = client.manifest(group_id).await?;
    let since = before["transactionTime"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(!since.is_empty(), "the manifest has no transactionTime");
    // The next write must be later than `since` even at the clock's resolution.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let url = format!("{}/r4/Observation", client.base());
    for index in 0..writes {
        let patient = format!("Patient/{}", members[index % members.len()]);
        client.post(&url, super::writes::observation(&patient, index).to_string()).await?;
    }
    let mut samples = Vec::new();
    let mut resources = 0;
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let manifest = client.manifest_since(group_id, &since).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        resources = output_count(&manifest);
    }
    Ok(SinceResult { members: members.len(), writes, latency: Latency::of(&samples), resources })
}

/// The resources a manifest's `output` files hold, by their counts.
pub fn output_count(manifest: &Value) -> u64 {
    manifest["output"].as_array().into_iter().flatten().filter_map(|item| item["count"].as_u64()).sum()
}
