//! Memory under concurrency: many exports of one Group at once, and a mixed load of writers,
//! exporters and readers for a fixed time. The server's peak RSS is the figure that matters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::client::Client;
use super::measure::{peak_rss_during, CpuClock, Encoding, PeakRss};

/// `exports` exports of the same Group at once, each downloading `concurrency` files at a time.
pub struct ConcurrentResult {
    pub exports: usize,
    pub members: usize,
    pub resources: u64,
    pub seconds: f64,
    pub throttled: u64,
    pub peak_rss_bytes: PeakRss,
    pub client_cpu_share: f64,
}

impl ConcurrentResult {
    pub fn per_second(&self) -> f64 {
        self.resources as f64 / self.seconds.max(1e-9)
    }
}

pub async fn concurrent_exports(
    client: &Client,
    server_pids: &[u32],
    group_id: &str,
    members: usize,
    exports: usize,
    concurrency: usize,
) -> anyhow::Result<ConcurrentResult> {
    let clock = CpuClock::start();
    let started = Instant::now();
    let work =
        futures::future::try_join_all((0..exports).map(|_| client.export(group_id, Encoding::Identity, concurrency)));
    let (results, peak_rss_bytes) = peak_rss_during(server_pids, work).await;
    let results = results?;
    Ok(ConcurrentResult {
        exports,
        members,
        resources: results.iter().map(|result| result.resources).sum(),
        seconds: started.elapsed().as_secs_f64(),
        throttled: results.iter().map(|result| result.throttled).sum(),
        peak_rss_bytes,
        client_cpu_share: clock.share(),
    })
}

/// How many of each kind of client the mixed load runs.
#[derive(Debug, Clone, Copy)]
pub struct MixedLoad {
    pub writers: usize,
    pub exporters: usize,
    pub readers: usize,
    pub duration: Duration,
}

/// Completed operations (and failures) of one class of client.
#[derive(Debug, Default)]
pub struct ClassCounts {
    pub done: AtomicU64,
    pub failed: AtomicU64,
}

impl ClassCounts {
    fn record(&self, outcome: anyhow::Result<()>) {
        match outcome {
            Ok(()) => self.done.fetch_add(1, Ordering::Relaxed),
            Err(error) => {
                tracing::warn!(%error, "mixed-load request failed");
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

pub struct MixedResult {
    pub load: MixedLoad,
    pub members: usize,
    /// Until the last client finished (an export in flight at the deadline runs to its end).
    pub seconds: f64,
    /// Single `POST /r4/Observation`s.
    pub writes: ClassCounts,
    /// Whole exports (manifest and every file).
    pub exports: ClassCounts,
    pub export_resources: AtomicU64,
    /// Reads and searches (`GET /r4/Patient/{id}`, `GET /r4/Observation?patient=`).
    pub reads: ClassCounts,
    pub peak_rss_bytes: PeakRss,
    pub client_cpu_share: f64,
}

impl MixedResult {
    pub fn rate(&self, counts: &ClassCounts) -> f64 {
        counts.done() as f64 / self.seconds.max(1e-9)
    }

    pub fn export_resources_per_second(&self) -> f64 {
        self.export_resources.load(Ordering::Relaxed) as f64 / self.seconds.max(1e-9)
    }
}

/// Runs every client in a loop until `load.duration` has passed.
pub async fn mixed_load(
    client: &Client,
    server_pids: &[u32],
    group_id: &str,
    members: &[String],
    load: MixedLoad,
    concurrency: usize,
) -> anyhow::Result<MixedResult> {
    anyhow::ensure!(!members.is_empty(), "the mixed load needs Group members");
    let mut result = MixedResult {
        load,
        members: members.len(),
        seconds: 0.0,
        writes: ClassCounts::default(),
        exports: ClassCounts::default(),
        export_resources: AtomicU64::new(0),
        reads: ClassCounts::default(),
        peak_rss_bytes: PeakRss::default(),
        client_cpu_share: 0.0,
    };
    let clock = CpuClock::start();
    let started = Instant::now();
    let deadline = started + load.duration;
    let result_ref = &result;
    let writers = (0..load.writers).map(|writer| async move {
        let url = format!("{}/r4/Observation", client.base());
        let mut index = writer;
        while Instant::now() < deadline {
            let patient = format!("Patient/{}", members[index % members.len()]);
            let body = super::writes::observation(&patient, index).to_string();
            result_ref.writes.record(client.post(&url, body).await);
            index += load.writers.max(1);
        }
    });
    let exporters = (0..load.exporters).map(|_| async move {
        while Instant::now() < deadline {
            let outcome = client.export(group_id, Encoding::Identity, concurrency).await.map(|export| {
                result_ref.export_resources.fetch_add(export.resources, Ordering::Relaxed);
            });
            result_ref.exports.record(outcome);
        }
    });
    let readers = (0..load.readers).map(|reader| async move {
        let mut index = reader.wrapping_mul(7919);
        while Instant::now() < deadline {
            let patient = &members[index % members.len()];
            let url = match index % 2 {
                0 => format!("{}/r4/Patient/{patient}", client.base()),
                _ => format!("{}/r4/Observation?patient={patient}&_count=50", client.base()),
            };
            result_ref.reads.record(read(client, &url).await);
            index += 1;
        }
    });
    let everyone = async {
        futures::join!(
            futures::future::join_all(writers),
            futures::future::join_all(exporters),
            futures::future::join_all(readers)
        )
    };
    let (_, peak_rss_bytes) = peak_rss_during(server_pids, everyone).await;
    result.seconds = started.elapsed().as_secs_f64();
    result.peak_rss_bytes = peak_rss_bytes;
    result.client_cpu_share = clock.share();
    Ok(result)
}

async fn read(client: &Client, url: &str) -> anyhow::Result<()> {
    client.get(url).send().await?.error_for_status()?.bytes().await?;
    Ok(())
}
