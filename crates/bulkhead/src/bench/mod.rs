//! `bulkhead bench`: the benchmark that holds Bulkhead to DESIGN.md §6 and issue 10's table.
//!
//! It generates (or reuses) a data set — synthetic (`bulkhead synth`) or Synthea-shaped (the
//! vendored sample scaled), imports it into a fresh data directory with `bulkhead import`
//! (throughput and the import's own peak RSS), starts `bulkhead serve` on it, creates Groups
//! through the FHIR API, and measures as a user would, over HTTP: synchronous, asynchronous and
//! `_since` manifest latency, end-to-end export throughput (manifest plus every file) as NDJSON,
//! gzip and zstd, `$upload-ndjson`, concurrent exports and a mixed load, with the server's peak
//! RSS read from the server process and the benchmark's own CPU share beside each figure.
//!
//! By default the data set lives in SQLite in the data directory. With `--database-url` it is
//! imported into a database of its own on that PostgreSQL server instead, with `--output-url`
//! asynchronous exports are materialised in S3, and with `--instances N` that many `serve`
//! processes share the store while the load client sends requests to each in turn.

mod client;
mod concurrency;
mod latency;
mod measure;
mod report;
mod summary;
mod synthea_shape;
mod system_export;
mod targets;
mod upload;
mod writes;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use client::Client;
use concurrency::MixedLoad;
use measure::{peak_rss_during, Encoding, EncodingNotOffered};
use report::{BenchReport, ClosureCost, DatasetResult, GroupResult, ImportResult};
use summary::ImportCounts;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    /// `bulkhead synth` data, `--patients` patients per data set.
    Synthetic,
    /// The Synthea sample (`--synthea-sample`) copied `--scale` times with fresh ids.
    Synthea,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Which data to measure on.
    #[arg(long, value_enum, default_value_t = Shape::Synthetic)]
    pub shape: Shape,
    /// Data set sizes in patients (synthetic shape), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub patients: Vec<u64>,
    /// Copies of the Synthea sample per data set (Synthea shape), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10")]
    pub scale: Vec<u64>,
    /// The Synthea sample: a directory of `Type.ndjson.gz` files.
    #[arg(long, default_value = "testdata/synthea-100")]
    pub synthea_sample: PathBuf,
    /// Group sizes to measure (each capped by the data set size), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub groups: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where generated data sets are cached and data directories are made.
    #[arg(long, default_value = "./bench-data")]
    pub work_dir: PathBuf,
    /// Manifest requests per Group for the latency percentiles (synchronous, asynchronous and
    /// `_since` alike).
    #[arg(long, default_value_t = 15)]
    pub manifest_runs: usize,
    /// How often an asynchronous export's status is polled, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub status_poll_ms: u64,
    /// Writes before the `_since` manifest of the largest Group (0 skips it).
    #[arg(long, default_value_t = 10)]
    pub since_writes: usize,
    /// Files downloaded at once, per export.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// NDJSON exports per Group with and without referenced resources, alternated, for the
    /// cost of self-contained exports (0 skips it).
    #[arg(long, default_value_t = 3)]
    pub closure_runs: usize,
    /// Resources sent with `POST /r4/$upload-ndjson` (into a tenant of their own; 0 skips it).
    #[arg(long, default_value_t = 200_000)]
    pub upload_resources: u64,
    /// Exports run at once for the concurrency row (0 skips it).
    #[arg(long, default_value_t = 20)]
    pub concurrent_exports: usize,
    /// Members of the Group the concurrent exports and the mixed load's exporters export.
    #[arg(long, default_value_t = 1000)]
    pub concurrent_members: usize,
    /// Mixed load: writers, exporters, readers, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "16,4,8")]
    pub mixed: Vec<usize>,
    /// How long the mixed load runs, in seconds (0 skips it).
    #[arg(long, default_value_t = 30.0)]
    pub mixed_seconds: f64,
    /// Single creates for the write benchmark (0 skips it).
    #[arg(long, default_value_t = 2000)]
    pub creates: usize,
    /// Transaction Bundles (of `--bundle-entries` resources) for the write benchmark.
    #[arg(long, default_value_t = 20)]
    pub bundles: usize,
    #[arg(long, default_value_t = 500)]
    pub bundle_entries: usize,
    /// Skip the system-level export row (`[base]/$export` beside a Group of every patient).
    #[arg(long)]
    pub skip_system_export: bool,
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
    /// Measure on PostgreSQL instead of SQLite: a server URL,
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DATABASE`, whose role may create databases. Each
    /// data set gets a database of its own there, `bulkhead_bench_<data set>`, dropped and
    /// created afresh for each import (kept with --reuse-import).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Materialise asynchronous exports in an output store, `s3://BUCKET/PREFIX` (the bucket
    /// must exist; endpoint, region and credentials from the `AWS_*` variables, as `bulkhead
    /// serve` reads them). Each Group then also gets an asynchronous export downloaded end to end.
    #[arg(long)]
    pub output_url: Option<String>,
    /// `bulkhead serve` processes on the same store and data directory; requests go to each in
    /// turn, and the server's peak RSS is reported per instance.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// Asynchronous exports per Group for the kick-off and completion latencies (default:
    /// --manifest-runs). With --output-url each one materialises the whole export.
    #[arg(long)]
    pub async_runs: Option<usize>,
    /// The servers' `RUST_LOG` (their logs go to this command's stderr); for where their memory
    /// goes during a run: `warn,bulkhead::memory=debug`.
    #[arg(long, default_value = "warn")]
    pub server_log: String,
}

/// One data set to measure: where its NDJSON files are and what it holds.
struct DataSpec {
    /// For the report: `synthetic` or `Synthea-shaped (sample x10)`.
    shape: String,
    /// Names its data directory under `--work-dir`.
    key: String,
    files: PathBuf,
    patients: u64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    // The load client keeps the memory it frees: with the default purge it page-faulted (and the
    // kernel zeroed) a fresh response buffer every few hundred KiB of a download, CPU taken from
    // the server it measures on the same cores. The servers it starts set their own profile.
    crate::set_memory_profile(crate::MemoryProfile::BulkLoad);
    anyhow::ensure!(args.instances >= 1, "--instances must be at least 1");
    if let Some(url) = &args.output_url {
        anyhow::ensure!(
            url.strip_prefix("s3://").is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/')),
            "--output-url must be s3://BUCKET or s3://BUCKET/PREFIX"
        );
    }
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => std::env::current_exe().context("locating the bulkhead binary")?,
    };
    std::fs::create_dir_all(&args.work_dir)?;
    let mut report = BenchReport::new();
    let specs = match args.shape {
        Shape::Synthetic => args
            .patients
            .iter()
            .map(|&patients| synthetic_dataset(&binary, &args, patients))
            .collect::<anyhow::Result<Vec<_>>>(),
        Shape::Synthea => {
            args.scale.iter().map(|&scale| synthea_dataset(&args, scale)).collect::<anyhow::Result<Vec<_>>>()
        }
    }?;
    for spec in &specs {
        report.datasets.push(bench_dataset(&binary, &args, spec)?);
    }
    report.print_table();
    let json_text = serde_json::to_string_pretty(&report.to_json())?;
    say!("{json_text}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json_text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Generates the synthetic data set once per (size, seed); later runs reuse it.
fn synthetic_dataset(binary: &Path, args: &BenchArgs, patients: u64) -> anyhow::Result<DataSpec> {
    let dir = args.work_dir.join(format!("synth-{patients}-seed{}", args.seed));
    if !dir.join(".complete").exists() {
        eprintln!("generating {patients} patients into {}", dir.display());
        let status = Command::new(binary)
            .args(["synth", "--patients", &patients.to_string(), "--seed", &args.seed.to_string(), "--out"])
            .arg(&dir)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "bulkhead synth failed");
        std::fs::write(dir.join(".complete"), "")?;
    }
    Ok(DataSpec { shape: "synthetic".into(), key: patients.to_string(), files: dir, patients })
}

/// Scales the Synthea sample once per scale; later runs reuse it.
fn synthea_dataset(args: &BenchArgs, scale: u64) -> anyhow::Result<DataSpec> {
    let dir = args.work_dir.join(format!("synthea-x{scale}"));
    let counts = if dir.join(".complete").exists() {
        synthea_shape::scaled_counts(&args.synthea_sample, scale)?
    } else {
        eprintln!("scaling the Synthea sample {}x into {}", scale, dir.display());
        let counts = synthea_shape::scaled(&args.synthea_sample, scale, &dir)?;
        std::fs::write(dir.join(".complete"), "")?;
        counts
    };
    Ok(DataSpec {
        shape: format!("Synthea-shaped (sample x{scale})"),
        key: format!("synthea-x{scale}"),
        files: dir,
        patients: counts.patients,
    })
}

/// Creates a tenant and a client of it with the CLI; returns the client's credentials.
fn tenant_client(binary: &Path, storage: &Storage, tenant: &str, create: bool) -> anyhow::Result<(String, String)> {
    let cli = |command: &[&str]| -> anyhow::Result<String> {
        let output = storage.add_args(Command::new(binary).args(command)).output()?;
        anyhow::ensure!(
            output.status.success(),
            "bulkhead {} failed: {}",
            command.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    if create {
        cli(&["tenant", "create", tenant])?;
    }
    let credentials: Value = serde_json::from_str(&cli(&["client", "create", "--tenant", tenant, "--json"])?)?;
    let field = |name: &str| credentials[name].as_str().unwrap_or_default().to_owned();
    Ok((field("client_id"), field("client_secret")))
}

/// Imports the data set with `bulkhead import` (a child process, reaped with its peak RSS), or
/// repeats the figures of the import that made a reused data directory.
fn import(
    binary: &Path,
    args: &BenchArgs,
    spec: &DataSpec,
    storage: &Storage,
    reused: bool,
) -> anyhow::Result<ImportResult> {
    let marker = storage.data_dir.join(".imported");
    if reused {
        let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&marker)?).context("bad .imported")?;
        eprintln!("reusing the import in {}", storage.describe());
        let number = |name: &str| recorded[name].as_u64().unwrap_or(0);
        return Ok(ImportResult {
            counts: ImportCounts {
                created: number("created"),
                updated: number("updated"),
                unchanged: number("unchanged"),
                failed: number("failed"),
            },
            seconds: recorded["seconds"].as_f64().unwrap_or(0.0),
            peak_rss_bytes: recorded["peak_rss_bytes"].as_u64(),
        });
    }
    eprintln!("importing {}", spec.files.display());
    let mut command = Command::new(binary);
    storage.add_args(command.args(["import", "--tenant", "bench"])).arg(&spec.files);
    let finished = measure::run_measured(command, &args.work_dir.join(format!("import-{}", spec.key)))?;
    anyhow::ensure!(finished.success, "bulkhead import failed: {}", tail(&finished.stderr));
    let counts = ImportCounts::parse(&finished.stdout)?;
    anyhow::ensure!(counts.failed == 0, "bulkhead import refused {} lines: {}", counts.failed, tail(&finished.stderr));
    let peak_rss_bytes = Some(finished.peak_rss_bytes).filter(|bytes| *bytes > 0);
    let recorded = json!({
        "created": counts.created, "updated": counts.updated, "unchanged": counts.unchanged,
        "failed": counts.failed, "seconds": finished.seconds, "peak_rss_bytes": peak_rss_bytes,
    });
    std::fs::write(&marker, recorded.to_string())?;
    Ok(ImportResult { counts, seconds: finished.seconds, peak_rss_bytes })
}

/// The last few lines of a child's stderr, for an error message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn bench_dataset(binary: &Path, args: &BenchArgs, spec: &DataSpec) -> anyhow::Result<DatasetResult> {
    let data_dir = match args.database_url {
        None => args.work_dir.join(format!("db-{}", spec.key)),
        Some(_) => args.work_dir.join(format!("pg-{}", spec.key)),
    };
    let reused = args.reuse_import && data_dir.join(".imported").exists();
    if data_dir.exists() && !reused {
        std::fs::remove_dir_all(&data_dir)?;
    }
    // On PostgreSQL no command makes the data directory before `serve`; the import's marker goes there.
    crate::private_files::create_private_dir(&data_dir)?;
    let storage = Storage::prepare(args, spec, data_dir, reused)?;
    let (client_id, client_secret) = tenant_client(binary, &storage, "bench", !reused)?;
    // Uploads go to a tenant of their own, new each run, so every line is a create.
    let upload_tenant =
        format!("upload-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs());
    let upload_credentials = match args.upload_resources {
        0 => None,
        _ => Some(tenant_client(binary, &storage, &upload_tenant, true)?),
    };
    let import = import(binary, args, spec, &storage, reused)?;
    let upload_files = crate::import::collect_files(std::slice::from_ref(&spec.files))?;

    let server = Servers::start(binary, &storage, args)?;
    let runtime = crate::serve::runtime()?;
    let http = reqwest::Client::new();
    let client = Client::new(http.clone(), server.bases(), client_id, client_secret);
    let mut result = DatasetResult {
        shape: spec.shape.clone(),
        store: storage.describe(),
        instances: args.instances,
        patients: spec.patients,
        resources: import.counts.processed() - import.counts.failed,
        import,
        data_dir: spec.files.display().to_string(),
        groups: Vec::new(),
        since: None,
        upload: None,
        concurrent: None,
        mixed: None,
        writes: None,
        system: None,
    };
    runtime.block_on(async {
        let patient_ids = client.patient_ids(spec.patients as usize).await?;
        let mut offers_zstd = true;
        for &size in args.groups.iter().filter(|size| **size <= patient_ids.len()) {
            result.groups.push(bench_group(&client, &server, args, &patient_ids[..size], &mut offers_zstd).await?);
        }
        if let (Some(largest), true) = (result.groups.iter().map(|group| group.members).max(), args.since_writes > 0) {
            let members = &patient_ids[..largest];
            let since =
                latency::since(&client, &group_id(largest), members, args.since_writes, args.manifest_runs).await?;
            result.since = Some(since);
        }
        if !args.skip_system_export && !patient_ids.is_empty() {
            let group = format!("bench-all-{}", patient_ids.len());
            client.put_group(&group, &patient_ids).await?;
            let system =
                system_export::measure(&client, &server.pids(), &group, patient_ids.len(), args.concurrency).await?;
            result.system = Some(system);
        }
        if let Some((client_id, client_secret)) = upload_credentials {
            eprintln!("uploading up to {} resources with $upload-ndjson", args.upload_resources);
            let uploader = Client::new(http.clone(), server.bases(), client_id, client_secret);
            let upload = upload::measure_upload(&uploader, &server.pids(), upload_files, args.upload_resources).await?;
            result.upload = Some(upload);
        }
        let members = &patient_ids[..args.concurrent_members.min(patient_ids.len())];
        under_load(&client, &server, args, members, &mut result).await?;
        if args.creates + args.bundles > 0 {
            let writes = writes::measure_writes(
                &client,
                args.creates,
                args.concurrency * 4,
                args.bundles,
                args.bundle_entries.max(2),
            )
            .await?;
            result.writes = Some(writes);
        }
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(result)
}

/// Memory under concurrency: `--concurrent-exports` exports of one Group at once, then the mixed
/// load, both on the Group of the first `--concurrent-members` patients.
async fn under_load(
    client: &Client,
    server: &Servers,
    args: &BenchArgs,
    members: &[String],
    result: &mut DatasetResult,
) -> anyhow::Result<()> {
    if members.is_empty() || (args.concurrent_exports == 0 && args.mixed_seconds <= 0.0) {
        return Ok(());
    }
    let group = group_id(members.len());
    client.put_group(&group, members).await?;
    if args.concurrent_exports > 0 {
        eprintln!("{} concurrent exports of {} members", args.concurrent_exports, members.len());
        let (exports, concurrency) = (args.concurrent_exports, args.concurrency);
        let concurrent =
            concurrency::concurrent_exports(client, &server.pids(), &group, members.len(), exports, concurrency)
                .await?;
        result.concurrent = Some(concurrent);
    }
    if args.mixed_seconds > 0.0 {
        let load = MixedLoad {
            writers: args.mixed.first().copied().unwrap_or(16),
            exporters: args.mixed.get(1).copied().unwrap_or(4),
            readers: args.mixed.get(2).copied().unwrap_or(8),
            duration: Duration::from_secs_f64(args.mixed_seconds),
        };
        eprintln!("mixed load {load:?}");
        let mixed = concurrency::mixed_load(client, &server.pids(), &group, members, load, args.concurrency).await?;
        result.mixed = Some(mixed);
    }
    Ok(())
}

fn group_id(members: usize) -> String {
    format!("bench-{members}")
}

async fn bench_group(
    client: &Client,
    server: &Servers,
    args: &BenchArgs,
    members: &[String],
    offers_zstd: &mut bool,
) -> anyhow::Result<GroupResult> {
    let group_id = group_id(members.len());
    eprintln!("Group of {} members", members.len());
    client.put_group(&group_id, members).await?;
    let manifest = latency::synchronous(client, &group_id, args.manifest_runs).await?;
    let poll = Duration::from_millis(args.status_poll_ms.max(1));
    let async_runs = args.async_runs.unwrap_or(args.manifest_runs);
    let asynchronous = latency::asynchronous(client, &group_id, async_runs, poll).await?;
    let mut exports = Vec::new();
    let encodings = [Encoding::Identity, Encoding::Gzip, Encoding::Zstd];
    for encoding in encodings {
        if encoding == Encoding::Zstd && !*offers_zstd {
            continue;
        }
        let cpu_before = measure::cpu_seconds_of(&server.pids());
        let (result, peak_rss) =
            peak_rss_during(&server.pids(), client.export(&group_id, encoding, args.concurrency)).await;
        let cpu_after = measure::cpu_seconds_of(&server.pids());
        match result {
            Ok(mut result) => {
                result.peak_rss_bytes = peak_rss;
                result.server_cpu_seconds = cpu_after.zip(cpu_before).map(|(after, before)| after - before);
                exports.push(result);
            }
            // A server without zstd answers identity: that row is skipped, not failed.
            Err(error) if error.downcast_ref::<EncodingNotOffered>().is_some() => {
                eprintln!("the server does not offer {}: its rows are skipped", encoding.name());
                *offers_zstd = false;
            }
            Err(error) => return Err(error),
        }
    }
    let closure = match args.closure_runs {
        0 => None,
        runs => Some(closure_cost(client, &group_id, args.concurrency, runs).await?),
    };
    let materialised = match args.output_url {
        None => None,
        Some(_) => {
            let (result, peak_rss) =
                peak_rss_during(&server.pids(), client.export_async_downloaded(&group_id, poll, args.concurrency))
                    .await;
            let mut result = result?;
            result.peak_rss_bytes = peak_rss;
            Some(result)
        }
    };
    Ok(GroupResult { members: members.len(), manifest, asynchronous, exports, closure, materialised })
}

/// The cost of referenced resources: `runs` NDJSON exports with them and `runs` without,
/// alternated so drift in the machine's load hits both alike; medians.
async fn closure_cost(client: &Client, group_id: &str, concurrency: usize, runs: usize) -> anyhow::Result<ClosureCost> {
    let without = [("includeAssociatedData", "_noReferencedResources")];
    let (mut with_runs, mut without_runs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        with_runs.push(client.export_with(group_id, Encoding::Identity, concurrency, &[]).await?);
        without_runs.push(client.export_with(group_id, Encoding::Identity, concurrency, &without).await?);
    }
    let median = |runs: &mut Vec<report::ExportResult>| {
        runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        let middle = &runs[runs.len() / 2];
        (middle.resources, middle.seconds)
    };
    let (with_resources, with_seconds) = median(&mut with_runs);
    let (without_resources, without_seconds) = median(&mut without_runs);
    Ok(ClosureCost { runs, with_resources, with_seconds, without_resources, without_seconds })
}

/// Where a data set is stored and served from, as the `bulkhead` commands are told.
struct Storage {
    /// Token keys (shared by every instance), the import's marker, and the SQLite database
    /// when there is no PostgreSQL.
    data_dir: PathBuf,
    /// The data set's own PostgreSQL database, and the server's version.
    postgres: Option<(String, String)>,
    output_url: Option<String>,
}

impl Storage {
    /// Creates the data set's PostgreSQL database afresh (or keeps it, when its import is
    /// reused).
    fn prepare(args: &BenchArgs, spec: &DataSpec, data_dir: PathBuf, reused: bool) -> anyhow::Result<Storage> {
        let postgres = match &args.database_url {
            None => None,
            Some(server_url) => {
                let name = database_name(&spec.key);
                let mut admin = postgres::Client::connect(server_url, postgres::NoTls).with_context(|| {
                    format!("connecting to --database-url {}", crate::config::redact_password(server_url))
                })?;
                let version: String = admin.query_one("SHOW server_version", &[])?.try_get(0)?;
                if !reused {
                    eprintln!("creating the PostgreSQL database {name}");
                    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
                    admin.batch_execute(&format!("CREATE DATABASE {name}"))?;
                }
                Some((with_database(server_url, &name), version))
            }
        };
        Ok(Storage { data_dir, postgres, output_url: args.output_url.clone() })
    }

    /// Adds `--data-dir` (and `--database-url`) to a `bulkhead` command.
    fn add_args<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command.arg("--data-dir").arg(&self.data_dir);
        if let Some((url, _)) = &self.postgres {
            command.args(["--database-url", url]);
        }
        command
    }

    /// For the report: `SQLite (DIR)` or `PostgreSQL 15.4 (database NAME)`, and the output store.
    fn describe(&self) -> String {
        let store = match &self.postgres {
            None => format!("SQLite ({})", self.data_dir.join("bulkhead.db").display()),
            Some((url, version)) => {
                let name = url.rsplit('/').next().unwrap_or_default().split('?').next().unwrap_or_default();
                format!("PostgreSQL {version} (database {name})")
            }
        };
        match &self.output_url {
            Some(output) => format!("{store}, output {output}"),
            None => store,
        }
    }
}

/// The PostgreSQL database of a data set (`bulkhead_bench_10000`, `bulkhead_bench_synthea_x10`).
fn database_name(key: &str) -> String {
    let key: String =
        key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    format!("bulkhead_bench_{key}")
}

/// `url` with its database (the path) replaced by `name`, keeping any `?parameters`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |index| index + 3);
    let path_start = base[authority_start..].find('/').map_or(base.len(), |index| authority_start + index);
    format!("{}/{name}{query}", &base[..path_start])
}

/// Every `bulkhead serve` instance of a run, stopped on drop.
struct Servers(Vec<Server>);

impl Servers {
    fn start(binary: &Path, storage: &Storage, args: &BenchArgs) -> anyhow::Result<Servers> {
        let servers = (0..args.instances)
            .map(|_| Server::start(binary, storage, &args.server_log))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Servers(servers))
    }

    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(|server| server.pid).collect()
    }

    fn bases(&self) -> Vec<String> {
        self.0.iter().map(|server| server.base.clone()).collect()
    }
}

/// A `bulkhead serve` child process on a free loopback port, stopped on drop.
struct Server {
    child: Child,
    pid: u32,
    base: String,
}

impl Server {
    fn start(binary: &Path, storage: &Storage, log_filter: &str) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = Command::new(binary);
        storage.add_args(command.args(["serve", "--listen", &format!("127.0.0.1:{port}")]));
        if let Some(output) = &storage.output_url {
            command.args(["--output-url", output]);
        }
        let child =
            command.env("RUST_LOG", log_filter).stdout(Stdio::null()).spawn().context("starting bulkhead serve")?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn each_data_set_gets_a_database_of_its_own_on_the_server() {
        assert_eq!(super::database_name("10000"), "bulkhead_bench_10000");
        assert_eq!(super::database_name("synthea-x10"), "bulkhead_bench_synthea_x10");
        let url = "postgres://u:p@127.0.0.1:5432/postgres?sslmode=disable";
        assert_eq!(super::with_database(url, "b"), "postgres://u:p@127.0.0.1:5432/b?sslmode=disable");
        assert_eq!(super::with_database("postgres://u@h:5", "b"), "postgres://u@h:5/b");
    }
}
