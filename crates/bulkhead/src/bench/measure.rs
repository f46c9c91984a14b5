//! Measurements: downloads, the server's and the import's peak RSS, the benchmark's own CPU
//! share, percentiles.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;

/// How an export's files are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "none",
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }
}

/// What one or more downloads brought in.
#[derive(Debug, Default, Clone)]
pub struct Download {
    pub resources: u64,
    pub bytes: u64,
    /// `429 Too Many Requests` answers waited out before the file came.
    pub throttled: u64,
}

impl Download {
    pub fn add(&mut self, other: &Download) {
        self.resources += other.resources;
        self.bytes += other.bytes;
        self.throttled += other.throttled;
    }
}

/// A download refused because the server does not offer the asked-for encoding (it answered
/// with another `Content-Encoding`): the row is skipped, not failed.
#[derive(Debug)]
pub struct EncodingNotOffered;

impl std::fmt::Display for EncodingNotOffered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server does not offer this Content-Encoding")
    }
}

impl std::error::Error for EncodingNotOffered {}

/// Downloads one file, counting bytes on the wire. Uncompressed files are checked line by line
/// against the manifest count; compressed files are counted by their manifest count
/// (decompressing them here would take CPU from the server being measured). A `429` (a bounded
/// pool of download streams) is waited out as its `Retry-After` says and counted.
pub async fn download(request: reqwest::RequestBuilder, encoding: Encoding, expected: u64) -> anyhow::Result<Download> {
    let request = match encoding {
        Encoding::Identity => request,
        other => request.header("accept-encoding", other.name()),
    };
    let (response, throttled) = send_patiently(request).await?;
    let content_encoding = response.headers().get("content-encoding").and_then(|value| value.to_str().ok());
    match encoding {
        Encoding::Identity => {
            anyhow::ensure!(content_encoding.is_none(), "asked for no encoding, got {content_encoding:?}")
        }
        Encoding::Gzip => anyhow::ensure!(content_encoding == Some("gzip"), "asked for gzip, got {content_encoding:?}"),
        Encoding::Zstd if content_encoding != Some("zstd") => {
            // Read to the end so the server sees a finished download, not a client gone away.
            response.bytes().await?;
            return Err(EncodingNotOffered.into());
        }
        Encoding::Zstd => {}
    }
    let mut body = response.bytes_stream();
    let (mut bytes, mut lines) = (0u64, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        if encoding == Encoding::Identity {
            // memchr's count is vectorised: a byte-at-a-time count took most of the client's CPU.
            lines += memchr::memchr_iter(b'\n', &chunk).count() as u64;
        }
    }
    if encoding == Encoding::Identity {
        anyhow::ensure!(lines == expected, "file had {lines} lines, the manifest said {expected}");
    }
    Ok(Download { resources: expected, bytes, throttled })
}

/// Sends `request`, waiting out `429 Too Many Requests` answers as their `Retry-After` says (a
/// server may bound its concurrent work that way); returns the final response, which must be a
/// success, and how many 429s came first.
pub async fn send_patiently(request: reqwest::RequestBuilder) -> anyhow::Result<(reqwest::Response, u64)> {
    let mut throttled = 0;
    loop {
        let attempt = request.try_clone().context("cloning a request")?;
        let response = attempt.send().await?;
        if response.status() != reqwest::StatusCode::TOO_MANY_REQUESTS || throttled >= 600 {
            return Ok((response.error_for_status()?, throttled));
        }
        throttled += 1;
        tokio::time::sleep(retry_after(&response)).await;
    }
}

/// `Retry-After` in seconds (capped at 5 s; 100 ms when absent or unreadable).
pub fn retry_after(response: &reqwest::Response) -> Duration {
    response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map_or(Duration::from_millis(100), |seconds| Duration::from_secs(seconds.min(5)))
}

/// Resident memory of a process in bytes, from `/proc/PID/status` (`field` is `VmRSS` or `VmHWM`).
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The peak resident memory of each server instance during one piece of work (`None` where it
/// could not be read).
#[derive(Debug, Clone, Default)]
pub struct PeakRss(pub Vec<Option<u64>>);

impl PeakRss {
    /// The largest instance's peak: what a per-instance memory target is held to.
    pub fn max(&self) -> Option<u64> {
        self.0.iter().flatten().copied().max()
    }

    /// Each instance's peak, for the JSON report.
    pub fn per_instance(&self) -> serde_json::Value {
        serde_json::json!(self.0)
    }

    /// `120M`, or `120M/118M` with several instances, for the table.
    pub fn text(&self) -> String {
        match self.0.as_slice() {
            [] => "?".to_owned(),
            peaks => peaks.iter().map(|peak| super::report::mib(*peak)).collect::<Vec<_>>().join("/"),
        }
    }
}

/// Runs `work` while watching each server process's resident memory; returns its result and
/// every process's peak. The kernel's high-water mark is reset first (`clear_refs` 5) where
/// allowed, and RSS is also sampled every 5 ms, so the figures cover this work only.
pub async fn peak_rss_during<T>(pids: &[u32], work: impl std::future::Future<Output = T>) -> (T, PeakRss) {
    let watched: Vec<(u32, bool, std::sync::Arc<std::sync::atomic::AtomicU64>)> = pids
        .iter()
        .map(|&pid| {
            let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
            (pid, reset, std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)))
        })
        .collect();
    let samplers: Vec<_> = watched
        .iter()
        .map(|(pid, _, sampled)| {
            let (pid, sampled) = (*pid, sampled.clone());
            tokio::spawn(async move {
                while let Some(rss) = proc_status_bytes(pid, "VmRSS") {
                    sampled.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    let output = work.await;
    samplers.iter().for_each(tokio::task::JoinHandle::abort);
    let peaks = watched
        .iter()
        .map(|(pid, reset, sampled)| {
            let sampled = sampled.load(std::sync::atomic::Ordering::Relaxed);
            let high_water = if *reset { proc_status_bytes(*pid, "VmHWM").unwrap_or(0) } else { 0 };
            Some(high_water.max(sampled)).filter(|peak| *peak > 0)
        })
        .collect();
    (output, PeakRss(peaks))
}

/// A finished child process: its exit, its output (captured in files, so a chatty child never
/// blocks on a full pipe) and its peak RSS as the kernel counted it (`wait4` rusage `ru_maxrss`).
pub struct Finished {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub peak_rss_bytes: u64,
    pub seconds: f64,
}

/// Runs `command` to the end and reaps it with `wait4`, which reports that one child's peak
/// RSS (unlike `RUSAGE_CHILDREN`, which is the largest of every child ever reaped).
pub fn run_measured(mut command: Command, scratch: &std::path::Path) -> anyhow::Result<Finished> {
    let (out_path, err_path) = (scratch.with_extension("stdout"), scratch.with_extension("stderr"));
    command.stdout(std::fs::File::create(&out_path)?).stderr(std::fs::File::create(&err_path)?);
    let started = Instant::now();
    let child = command.spawn().context("starting a child process")?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: plain FFI call with valid out-pointers; `rusage` is plain data, zeroed is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our child, not yet reaped (std's `Child` is dropped without waiting).
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        anyhow::ensure!(error.kind() == std::io::ErrorKind::Interrupted, "wait4 failed: {error}");
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(child);
    let success = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let read = |path: &std::path::Path| std::fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    Ok(Finished {
        success,
        stdout: read(&out_path)?,
        stderr: read(&err_path)?,
        // Linux reports ru_maxrss in KiB.
        peak_rss_bytes: usage.ru_maxrss.max(0) as u64 * 1024,
        seconds,
    })
}

/// The benchmark process's own CPU time against the wall clock, so a reader can see whether the
/// load client, not the server, was the limit (1.0 = one core busy all the time).
pub struct CpuClock {
    started: Instant,
    cpu_seconds: f64,
}

fn own_cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain data; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage value, RUSAGE_SELF is always a valid target.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

impl CpuClock {
    pub fn start() -> CpuClock {
        CpuClock { started: Instant::now(), cpu_seconds: own_cpu_seconds() }
    }

    /// (user + system CPU seconds of this process) / wall seconds since `start`.
    pub fn share(&self) -> f64 {
        (own_cpu_seconds() - self.cpu_seconds) / self.started.elapsed().as_secs_f64().max(1e-9)
    }
}

/// CPU seconds (user + system) process `pid` has used so far, from `/proc/PID/stat`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields after its last `)`.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // utime and stime, fields 14 and 15 of the line, in clock ticks.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / ticks_per_second.max(1) as f64)
}

/// The CPU seconds of every process in `pids` together (None when one could not be read).
pub fn cpu_seconds_of(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|&pid| process_cpu_seconds(pid)).sum()
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
    use super::{download, Encoding, EncodingNotOffered};
    #[test]
    fn nearest_rank_percentiles() {
        let values = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(super::percentile(&values, 0.5), 3.0);
        assert_eq!(super::percentile(&values, 0.95), 5.0);
        assert_eq!(super::percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn a_child_s_peak_rss_and_output_are_its_own() {
        let scratch = tempfile::tempdir().unwrap();
        let finished = super::run_measured(
            {
                let mut command = std::process::Command::new("sh");
                command.args(["-c", "echo out; echo err >&2; exit 3"]);
                command
            },
            &scratch.path().join("child"),
        )
        .unwrap();
        assert!(!finished.success, "exit 3 is a failure");
        assert_eq!((finished.stdout.as_str(), finished.stderr.as_str()), ("out\n", "err\n"));
        assert!(finished.peak_rss_bytes > 100_000, "a shell has some resident memory");
    }

    #[test]
    fn the_cpu_share_sees_busy_work() {
        let clock = super::CpuClock::start();
        let mut x = 0u64;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        // The machine may be shared, so only bounds: some CPU was used, at most every core's.
        let (share, cores) = (clock.share(), std::thread::available_parallelism().unwrap().get() as f64);
        assert!(share > 0.01 && share <= cores + 0.5, "a busy loop's CPU share: {share}");
    }

    #[test]
    fn a_process_s_cpu_seconds_grow_with_its_work() {
        let pid = std::process::id();
        let before = super::process_cpu_seconds(pid).expect("our own /proc/PID/stat");
        let mut x = 0u64;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
        while std::time::Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = super::cpu_seconds_of(&[pid]).unwrap();
        // Clock ticks are 10 ms; a shared machine may give the loop less than all of its 300 ms.
        assert!(after - before >= 0.02, "300 ms of busy work, {} s counted", after - before);
        assert_eq!(super::cpu_seconds_of(&[u32::MAX]), None, "no such process");
    }

    /// A stand-in file server: a 429 first, an encoding it does not offer, a short file.
    #[tokio::test]
    async fn downloads_wait_out_429s_check_lines_and_notice_an_encoding_not_offered() {
        use axum::http::{header, StatusCode};
        use axum::response::IntoResponse;
        use axum::routing::get;
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let app = axum::Router::new()
            .route(
                "/throttled",
                get(move || async move {
                    match calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
                        0 => (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "0")], "").into_response(),
                        _ => "a\nb\n".into_response(),
                    }
                }),
            )
            .route("/plain", get(|| async { "a\nb\n" }))
            .route("/zstd", get(|| async { ([(header::CONTENT_ENCODING, "zstd")], "0123456789") }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("{base}{path}"));

        let throttled = download(get("/throttled"), Encoding::Identity, 2).await.unwrap();
        assert_eq!((throttled.resources, throttled.bytes, throttled.throttled), (2, 4, 1));
        let short = download(get("/plain"), Encoding::Identity, 3).await.unwrap_err();
        assert!(short.to_string().contains("manifest said 3"), "{short}");
        let not_offered = download(get("/plain"), Encoding::Zstd, 2).await.unwrap_err();
        assert!(not_offered.downcast_ref::<EncodingNotOffered>().is_some(), "{not_offered}");
        let zstd = download(get("/zstd"), Encoding::Zstd, 2).await.unwrap();
        assert_eq!((zstd.resources, zstd.bytes), (2, 10), "compressed files count by the manifest");
        let wrong = download(get("/zstd"), Encoding::Gzip, 2).await.unwrap_err();
        assert!(wrong.downcast_ref::<EncodingNotOffered>().is_none(), "asked for gzip, got zstd: a failure");
    }
}
