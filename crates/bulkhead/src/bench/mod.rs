//! `bulkhead bench`: the benchmark that holds Bulkhead to DESIGN.md §6.
//!
//! It generates (or reuses) synthetic data sets, imports each into a fresh data directory with
//! `bulkhead import`, starts `bulkhead serve` on it, creates Groups through the FHIR API, and
//! measures as a user would, over HTTP: manifest latency, end-to-end export throughput (manifest
//! plus every file) uncompressed and gzip, and the server's peak RSS during each export, read
//! from the server process.

mod measure;
mod report;
mod writes;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde_json::{json, Value};

use measure::{peak_rss_during, percentile, Download};
use report::{BenchReport, DatasetResult, ExportResult, GroupResult};

#[derive(Args)]
pub struct BenchArgs {
    /// Data set sizes in patients, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub patients: Vec<u64>,
    /// Group sizes to measure (each capped by the data set size), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub groups: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where generated data sets are cached and data directories are made.
    #[arg(long, default_value = "./bench-data")]
    pub work_dir: PathBuf,
    /// Manifest requests per Group for the latency percentiles.
    #[arg(long, default_value_t = 15)]
    pub manifest_runs: usize,
    /// Files downloaded at once.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// Single creates for the write benchmark (0 skips it).
    #[arg(long, default_value_t = 2000)]
    pub creates: usize,
    /// Transaction Bundles (of `--bundle-entries` resources) for the write benchmark.
    #[arg(long, default_value_t = 20)]
    pub bundles: usize,
    #[arg(long, default_value_t = 500)]
    pub bundle_entries: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Reuse a data directory a previous run imported (its import figures are repeated) instead of
    /// importing again; for iterating on export performance.
    #[arg(long)]
    pub reuse_import: bool,
    /// The `bulkhead` binary to measure (default: this one).
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => std::env::current_exe().context("locating the bulkhead binary")?,
    };
    std::fs::create_dir_all(&args.work_dir)?;
    let mut report = BenchReport::new();
    for &patients in &args.patients {
        report.datasets.push(bench_dataset(&binary, &args, patients)?);
    }
    report.print_table();
    let json_text = serde_json::to_string_pretty(&report.to_json())?;
    say!("{json_text}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json_text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Generates the data set once per (size, seed); later runs reuse it.
fn dataset(binary: &Path, args: &BenchArgs, patients: u64) -> anyhow::Result<PathBuf> {
    let dir = args.work_dir.join(format!("synth-{patients}-seed{}", args.seed));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    eprintln!("generating {patients} patients into {}", dir.display());
    let status = Command::new(binary)
        .args(["synth", "--patients", &patients.to_string(), "--seed", &args.seed.to_string(), "--out"])
        .arg(&dir)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "bulkhead synth failed");
    std::fs::write(dir.join(".complete"), "")?;
    Ok(dir)
}

fn bench_dataset(binary: &Path, args: &BenchArgs, patients: u64) -> anyhow::Result<DatasetResult> {
    let data = dataset(binary, args, patients)?;
    let data_dir = args.work_dir.join(format!("db-{patients}"));
    let marker = data_dir.join(".imported");
    let reused = args.reuse_import && marker.exists();
    if data_dir.exists() && !reused {
        std::fs::remove_dir_all(&data_dir)?;
    }
    let cli = |command: &[&str]| -> anyhow::Result<String> {
        let output = Command::new(binary).args(command).arg("--data-dir").arg(&data_dir).output()?;
        anyhow::ensure!(
            output.status.success(),
            "bulkhead {} failed: {}",
            command.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    if !reused {
        cli(&["tenant", "create", "bench"])?;
    }
    let credentials: Value = serde_json::from_str(&cli(&["client", "create", "--tenant", "bench", "--json"])?)?;
    let (client_id, client_secret) = (
        credentials["client_id"].as_str().unwrap_or_default().to_owned(),
        credentials["client_secret"].as_str().unwrap_or_default().to_owned(),
    );

    let (resources, import_seconds) = if reused {
        // The figures of the import that made this data directory.
        let text = std::fs::read_to_string(&marker)?;
        let mut fields = text.split_whitespace();
        let resources: u64 = fields.next().and_then(|n| n.parse().ok()).context("bad .imported marker")?;
        let seconds: f64 = fields.next().and_then(|n| n.parse().ok()).context("bad .imported marker")?;
        eprintln!("reusing the import in {} (made in {seconds:.1} s)", data_dir.display());
        (resources, seconds)
    } else {
        eprintln!("importing {}", data.display());
        let started = Instant::now();
        let output = Command::new(binary)
            .args(["import", "--tenant", "bench", "--data-dir"])
            .arg(&data_dir)
            .arg(&data)
            .output()?;
        let import_seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(output.status.success(), "bulkhead import failed: {}", String::from_utf8_lossy(&output.stderr));
        let resources = imported_count(&String::from_utf8_lossy(&output.stdout))?;
        std::fs::write(&marker, format!("{resources} {import_seconds}"))?;
        (resources, import_seconds)
    };

    let server = Server::start(binary, &data_dir)?;
    let runtime = crate::serve::runtime()?;
    let groups = runtime.block_on(async {
        let client = Client { http: reqwest::Client::new(), base: server.base.clone(), client_id, client_secret };
        let patient_ids = client.patient_ids(patients as usize).await?;
        let mut results = Vec::new();
        for &size in args.groups.iter().filter(|size| **size as u64 <= patients) {
            results.push(bench_group(&client, &server, args, &patient_ids[..size]).await?);
        }
        let writes = match args.creates + args.bundles {
            0 => None,
            _ => Some(
                writes::measure_writes(
                    &client,
                    args.creates,
                    args.concurrency * 4,
                    args.bundles,
                    args.bundle_entries.max(2),
                )
                .await?,
            ),
        };
        anyhow::Ok((results, writes))
    })?;
    drop(server);
    let (groups, writes) = groups;
    Ok(DatasetResult { patients, resources, import_seconds, data_dir: data.display().to_string(), groups, writes })
}

/// The `imported N resources` line of `bulkhead import`.
fn imported_count(stdout: &str) -> anyhow::Result<u64> {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("imported ")?.split_whitespace().next()?.parse().ok())
        .context("bulkhead import printed no summary")
}

async fn bench_group(
    client: &Client,
    server: &Server,
    args: &BenchArgs,
    members: &[String],
) -> anyhow::Result<GroupResult> {
    let group_id = format!("bench-{}", members.len());
    client.put_group(&group_id, members).await?;
    let mut latencies = Vec::new();
    for _ in 0..args.manifest_runs.max(1) {
        let started = Instant::now();
        client.manifest(&group_id).await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let mut exports = Vec::new();
    for gzip in [false, true] {
        let (result, peak_rss) = peak_rss_during(server.pid, client.export(&group_id, gzip, args.concurrency)).await;
        let mut result = result?;
        result.peak_rss_bytes = peak_rss;
        exports.push(result);
    }
    Ok(GroupResult {
        members: members.len(),
        manifest_p50_ms: percentile(&latencies, 0.50),
        manifest_p95_ms: percentile(&latencies, 0.95),
        exports,
    })
}

/// A `bulkhead serve` child process on a free loopback port, stopped on drop.
struct Server {
    child: Child,
    pid: u32,
    base: String,
}

impl Server {
    fn start(binary: &Path, data_dir: &Path) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(binary)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting bulkhead serve")?;
        let server = Server { pid: child.id(), child, base: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("the server did not start listening within 30 s")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    client_id: String,
    client_secret: String,
}

impl Client {
    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.http.get(url).header("client_id", &self.client_id).header("client_secret", &self.client_secret)
    }

    async fn patient_ids(&self, limit: usize) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::with_capacity(limit);
        let mut url = format!("{}/r4/Patient?_count=1000", self.base);
        while ids.len() < limit {
            let page: Value = self.get(&url).send().await?.error_for_status()?.json().await?;
            for entry in page["entry"].as_array().into_iter().flatten() {
                ids.extend(entry["resource"]["id"].as_str().map(str::to_owned));
            }
            match page["link"].as_array().into_iter().flatten().find(|link| link["relation"] == "next") {
                Some(next) => url = next["url"].as_str().unwrap_or_default().to_owned(),
                None => break,
            }
        }
        ids.truncate(limit);
        Ok(ids)
    }

    async fn post(&self, url: &str, body: String) -> anyhow::Result<()> {
        self.http
            .post(url)
            .header("client_id", &self.client_id)
            .header("client_secret", &self.client_secret)
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    async fn put_group(&self, id: &str, members: &[String]) -> anyhow::Result<()> {
        let member: Vec<Value> =
            members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect();
        let group = json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": member});
        self.http
            .put(format!("{}/r4/Group/{id}", self.base))
            .header("client_id", &self.client_id)
            .header("client_secret", &self.client_secret)
            .header("content-type", "application/fhir+json")
            .body(group.to_string())
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    async fn manifest(&self, group_id: &str) -> anyhow::Result<Value> {
        let url = format!("{}/bulk-data/r4/Group/{group_id}/$export", self.base);
        Ok(self.get(&url).send().await?.error_for_status()?.json().await?)
    }

    /// Manifest plus every output file, `concurrency` downloads at a time.
    async fn export(&self, group_id: &str, gzip: bool, concurrency: usize) -> anyhow::Result<ExportResult> {
        let started = Instant::now();
        let manifest = self.manifest(group_id).await?;
        let outputs: Vec<(String, u64)> = manifest["output"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| (item["url"].as_str().unwrap_or_default().to_owned(), item["count"].as_u64().unwrap_or(0)))
            .collect();
        let mut downloads =
            futures::stream::iter(outputs.iter().map(|(url, count)| measure::download(self.get(url), gzip, *count)))
                .buffer_unordered(concurrency.max(1));
        let mut totals = Download::default();
        while let Some(download) = downloads.next().await {
            totals.add(&download?);
        }
        let seconds = started.elapsed().as_secs_f64();
        Ok(ExportResult {
            gzip,
            files: outputs.len(),
            resources: totals.resources,
            bytes: totals.bytes,
            seconds,
            peak_rss_bytes: None,
        })
    }
}
