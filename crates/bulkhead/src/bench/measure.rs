//! Measurements: downloads, the server's peak RSS, percentiles.

use std::time::Duration;

use futures::StreamExt;

/// What one or more downloads brought in.
#[derive(Debug, Default, Clone)]
pub struct Download {
    pub resources: u64,
    pub bytes: u64,
}

impl Download {
    pub fn add(&mut self, other: &Download) {
        self.resources += other.resources;
        self.bytes += other.bytes;
    }
}

/// Downloads one file, counting bytes on the wire. Uncompressed files are checked line by line
/// against the manifest count; gzip files are counted by their manifest count (decompressing
/// them here would take CPU from the server being measured).
pub async fn download(request: reqwest::RequestBuilder, gzip: bool, expected: u64) -> anyhow::Result<Download> {
    let request = if gzip { request.header("accept-encoding", "gzip") } else { request };
    let response = request.send().await?.error_for_status()?;
    if gzip {
        anyhow::ensure!(
            response.headers().get("content-encoding").is_some_and(|value| value == "gzip"),
            "asked for gzip, got an uncompressed file"
        );
    }
    let mut body = response.bytes_stream();
    let (mut bytes, mut lines) = (0u64, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        if !gzip {
            lines += chunk.iter().filter(|byte| **byte == b'\n').count() as u64;
        }
    }
    if !gzip {
        anyhow::ensure!(lines == expected, "file had {lines} lines, the manifest said {expected}");
    }
    Ok(Download { resources: expected, bytes })
}

/// Resident memory of a process in bytes, from `/proc/PID/status` (`field` is `VmRSS` or `VmHWM`).
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs `work` while watching the server's resident memory; returns its result and the peak.
/// The kernel's high-water mark is reset first (`clear_refs` 5) where allowed, and RSS is also
/// sampled every 5 ms, so the figure covers this export only.
pub async fn peak_rss_during<T>(pid: u32, work: impl std::future::Future<Output = T>) -> (T, Option<u64>) {
    let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let sampled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let sampled = sampled.clone();
        tokio::spawn(async move {
            while let Some(rss) = proc_status_bytes(pid, "VmRSS") {
                sampled.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let output = work.await;
    sampler.abort();
    let sampled = sampled.load(std::sync::atomic::Ordering::Relaxed);
    let high_water = if reset { proc_status_bytes(pid, "VmHWM").unwrap_or(0) } else { 0 };
    let peak = high_water.max(sampled);
    (output, Some(peak).filter(|peak| *peak > 0))
}

/// The `q` quantile (nearest rank) of `values`.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_rank_percentiles() {
        let values = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(super::percentile(&values, 0.5), 3.0);
        assert_eq!(super::percentile(&values, 0.95), 5.0);
        assert_eq!(super::percentile(&[], 0.5), 0.0);
    }
}
