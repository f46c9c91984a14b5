//! System-level export throughput (`[base]/$export`): manifest plus every file, measured between
//! two exports of a Group holding every patient (the same resources but Groups and shared
//! resources), so the figure can be read as a ratio on a busy machine.

use super::client::Client;
use super::measure::{peak_rss_during, Encoding};
use super::report::ExportResult;

pub struct SystemResult {
    /// Members of the Group measured beside it (every patient of the data set).
    pub members: usize,
    pub system: ExportResult,
    pub group_before: ExportResult,
    pub group_after: ExportResult,
}

impl SystemResult {
    /// System-level resources/s over the mean of the two Group exports' resources/s.
    pub fn ratio(&self) -> f64 {
        let group = (self.group_before.per_second() + self.group_after.per_second()) / 2.0;
        self.system.per_second() / group.max(1e-9)
    }
}

pub async fn measure(
    client: &Client,
    server_pids: &[u32],
    group_id: &str,
    members: usize,
    concurrency: usize,
) -> anyhow::Result<SystemResult> {
    eprintln!("system-level export, between two exports of a {members}-member Group");
    let group_url = client.group_kick_off_url(group_id);
    let system_url = client.system_kick_off_url();
    let run = |url: String| async move {
        let (result, peak_rss) =
            peak_rss_during(server_pids, client.export_from(&url, Encoding::Identity, concurrency)).await;
        result.map(|mut result| {
            result.peak_rss_bytes = peak_rss;
            result
        })
    };
    let group_before = run(group_url.clone()).await?;
    let system = run(system_url).await?;
    let group_after = run(group_url).await?;
    Ok(SystemResult { members, system, group_before, group_after })
}
