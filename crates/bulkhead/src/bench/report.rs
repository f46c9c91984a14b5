//! Benchmark results: a table for people, JSON for machines.

use serde_json::{json, Value};

use super::concurrency::{ConcurrentResult, MixedResult};
use super::latency::{AsyncLatency, Latency, SinceResult};
use super::measure::{Encoding, PeakRss};
use super::summary::ImportCounts;
use super::system_export::SystemResult;
use super::targets::{targets, Target};
use super::upload::UploadResult;
use super::writes::WriteResult;

pub struct ExportResult {
    pub encoding: Encoding,
    pub files: usize,
    pub resources: u64,
    /// Bytes on the wire (compressed when gzip or zstd).
    pub bytes: u64,
    pub seconds: f64,
    /// `429` answers waited out.
    pub throttled: u64,
    pub peak_rss_bytes: PeakRss,
    /// The benchmark process's CPU seconds per wall second during this export.
    pub client_cpu_share: f64,
    /// CPU seconds (user + system) the server processes used during this export, when read.
    pub server_cpu_seconds: Option<f64>,
}

impl ExportResult {
    pub fn per_second(&self) -> f64 {
        self.resources as f64 / self.seconds.max(1e-9)
    }

    /// The servers' CPU seconds per wall second (1.0 = one core busy all the time).
    fn server_cpu_share(&self) -> Option<f64> {
        self.server_cpu_seconds.map(|cpu| cpu / self.seconds.max(1e-9))
    }

    /// CPU microseconds per exported resource: the servers' and the benchmark client's. On a
    /// machine whose cores are all busy, throughput is their sum's inverse, so these say where
    /// a change moved the cost even when the machine's load moves the wall clock.
    fn cpu_micros_per_resource(&self) -> (Option<f64>, f64) {
        let per_resource = |cpu: f64| cpu * 1e6 / (self.resources.max(1) as f64);
        (self.server_cpu_seconds.map(per_resource), per_resource(self.client_cpu_share * self.seconds))
    }

    fn mb_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

pub struct GroupResult {
    pub members: usize,
    pub manifest: Latency,
    pub asynchronous: AsyncLatency,
    pub exports: Vec<ExportResult>,
    /// The cost of referenced resources (self-contained export) on the NDJSON export.
    pub closure: Option<ClosureCost>,
    /// With an output store: one asynchronous export, materialised and downloaded, from the
    /// kick-off to the last byte.
    pub materialised: Option<ExportResult>,
}

/// Group export (NDJSON, end to end) with referenced resources (the default) and without them
/// (`includeAssociatedData=_noReferencedResources`), runs alternated; medians.
pub struct ClosureCost {
    pub runs: usize,
    pub with_resources: u64,
    pub with_seconds: f64,
    pub without_resources: u64,
    pub without_seconds: f64,
}

impl ClosureCost {
    /// Extra time of the export with referenced resources, in percent of the one without.
    pub fn extra_percent(&self) -> f64 {
        (self.with_seconds / self.without_seconds.max(1e-9) - 1.0) * 100.0
    }
}

/// `bulkhead import` of the whole data set, as a child process.
pub struct ImportResult {
    pub counts: ImportCounts,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl ImportResult {
    pub fn per_second(&self) -> f64 {
        self.counts.processed() as f64 / self.seconds.max(1e-9)
    }
}

pub struct DatasetResult {
    /// `synthetic` or `synthea ×K`.
    pub shape: String,
    /// Where the data lives: `SQLite (…)` or `PostgreSQL 15.4 (database …)`, and any output store.
    pub store: String,
    /// `bulkhead serve` processes sharing the store.
    pub instances: usize,
    pub patients: u64,
    pub resources: u64,
    pub import: ImportResult,
    pub data_dir: String,
    pub groups: Vec<GroupResult>,
    pub since: Option<SinceResult>,
    pub upload: Option<UploadResult>,
    pub concurrent: Option<ConcurrentResult>,
    pub mixed: Option<MixedResult>,
    pub writes: Option<WriteResult>,
    pub system: Option<SystemResult>,
}

pub struct BenchReport {
    machine: Value,
    command: String,
    pub datasets: Vec<DatasetResult>,
}

fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines().find(|line| line.starts_with("MemTotal"))?.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            Some(info.lines().find(|line| line.starts_with("model name"))?.split(':').nth(1)?.trim().to_owned())
        })
        .unwrap_or_default();
    json!({"cores": cores, "memory_gib": (memory_kib as f64 / 1048576.0 * 10.0).round() / 10.0, "cpu": cpu})
}

/// Bytes as MiB for the table ("?" when not measured).
pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("?".to_owned(), |bytes| format!("{:.0}M", bytes as f64 / 1048576.0))
}

impl BenchReport {
    pub fn new() -> BenchReport {
        let command = std::env::args().map(|arg| crate::config::redact_password(&arg)).collect::<Vec<_>>().join(" ");
        BenchReport { machine: machine(), command, datasets: Vec::new() }
    }

    pub fn print_table(&self) {
        say!("machine: {}", self.machine);
        say!("command: {}", self.command);
        for dataset in &self.datasets {
            print_dataset(dataset);
        }
        if let Some(ratio) = self.growth_ratio() {
            say!("\ncost growth: largest/smallest data set, same Group size: {ratio}");
        }
    }

    /// How export cost grows from the smallest data set to the largest: time per resource for
    /// the same Group size (1.0 = flat), and resources and time of the whole-cohort exports.
    fn growth_ratio(&self) -> Option<String> {
        let [small, .., large] = self.datasets.as_slice() else { return None };
        fn uncompressed(dataset: &DatasetResult, members: usize) -> Option<&ExportResult> {
            let group = dataset.groups.iter().find(|group| group.members == members)?;
            group.exports.iter().find(|export| export.encoding == Encoding::Identity)
        }
        let same_size = small.groups.iter().map(|g| g.members).filter(|m| uncompressed(large, *m).is_some()).max()?;
        let per_resource = |export: &ExportResult| export.seconds / export.resources.max(1) as f64;
        let (small_same, large_same) = (uncompressed(small, same_size)?, uncompressed(large, same_size)?);
        fn largest(dataset: &DatasetResult) -> Option<&ExportResult> {
            uncompressed(dataset, dataset.groups.iter().map(|g| g.members).max()?)
        }
        let (small_all, large_all) = (largest(small)?, largest(large)?);
        Some(format!(
            "same {same_size}-member Group: {:.2}x time per resource; whole-cohort exports: {:.1}x the resources in {:.1}x the time",
            per_resource(large_same) / per_resource(small_same),
            large_all.resources as f64 / small_all.resources.max(1) as f64,
            large_all.seconds / small_all.seconds.max(1e-9)
        ))
    }

    pub fn to_json(&self) -> Value {
        json!({
            "machine": self.machine,
            "command": self.command,
            "growth": self.growth_ratio(),
            "datasets": self.datasets.iter().map(dataset_json).collect::<Vec<_>>(),
        })
    }
}

fn print_dataset(dataset: &DatasetResult) {
    let import = &dataset.import;
    say!(
        "\ndata set: {} {} patients, {} resources ({}) on {}, {} serve instance(s); import {:.1} s = {:.0} resources/s, import peak RSS {}",
        dataset.patients,
        dataset.shape,
        dataset.resources,
        dataset.data_dir,
        dataset.store,
        dataset.instances,
        import.seconds,
        import.per_second(),
        mib(import.peak_rss_bytes),
    );
    say!(
        "{:>8} {:>9} {:>9} {:>9} {:>8} {:>10} {:>11} {:>9} {:>8} {:>9} {:>10} {:>10}",
        "members",
        "p50 ms",
        "p95 ms",
        "first ms",
        "encoding",
        "resources",
        "res/s",
        "MB/s",
        "seconds",
        "peak RSS",
        "client CPU",
        "server CPU"
    );
    for group in &dataset.groups {
        for export in &group.exports {
            let server_cpu = export.server_cpu_share().map_or("?".to_owned(), |share| format!("{share:.2}"));
            say!(
                "{:>8} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>10} {:>11.0} {:>9.1} {:>8.2} {:>9} {:>10.2} {:>10}",
                group.members,
                group.manifest.p50_ms,
                group.manifest.p95_ms,
                group.manifest.first_ms,
                export.encoding.name(),
                export.resources,
                export.per_second(),
                export.mb_per_second(),
                export.seconds,
                export.peak_rss_bytes.text(),
                export.client_cpu_share,
                server_cpu,
            );
        }
    }
    for group in &dataset.groups {
        if let Some(closure) = &group.closure {
            say!(
                "referenced resources, {}-member Group (NDJSON, median of {}): with {} resources in {:.3} s, without {} in {:.3} s: {:+.1}% time",
                group.members,
                closure.runs,
                closure.with_resources,
                closure.with_seconds,
                closure.without_resources,
                closure.without_seconds,
                closure.extra_percent()
            );
        }
    }
    for group in &dataset.groups {
        if let Some(export) = &group.materialised {
            say!(
                "asynchronous export materialised in the output store, {}-member Group, kick-off to last byte: {} resources in {} files, {:.2} s = {:.0} res/s, {:.1} MB/s, server peak RSS {}, client CPU {:.2}",
                group.members,
                export.resources,
                export.files,
                export.seconds,
                export.per_second(),
                export.mb_per_second(),
                export.peak_rss_bytes.text(),
                export.client_cpu_share
            );
        }
    }
    say!("{:>8} {:>14} {:>14} {:>16}", "members", "async 202 p50", "async 202 p95", "status 200 p50");
    for group in &dataset.groups {
        let asynchronous = &group.asynchronous;
        say!(
            "{:>8} {:>11.1} ms {:>11.1} ms {:>13.1} ms",
            group.members,
            asynchronous.kick_off.p50_ms,
            asynchronous.kick_off.p95_ms,
            asynchronous.complete.p50_ms
        );
    }
    if let Some(since) = &dataset.since {
        say!(
            "_since manifest, {}-member Group after {} writes: p50 {:.1} ms, p95 {:.1} ms, first {:.1} ms, {} resources listed",
            since.members,
            since.writes,
            since.latency.p50_ms,
            since.latency.p95_ms,
            since.latency.first_ms,
            since.resources
        );
    }
    if let Some(system) = &dataset.system {
        say!(
            "system-level $export: {} resources in {} files, {:.1} s = {:.0} res/s, server peak RSS {}; \
             {:.2}x the mean of two {}-member Group exports around it ({:.0} and {:.0} res/s)",
            system.system.resources,
            system.system.files,
            system.system.seconds,
            system.system.per_second(),
            system.system.peak_rss_bytes.text(),
            system.ratio(),
            system.members,
            system.group_before.per_second(),
            system.group_after.per_second(),
        );
    }
    if let Some(upload) = &dataset.upload {
        say!(
            "$upload-ndjson: {} resources in {:.1} s = {:.0} res/s, server peak RSS {}, client CPU {:.2}",
            upload.counts.processed(),
            upload.seconds,
            upload.per_second(),
            upload.peak_rss_bytes.text(),
            upload.client_cpu_share
        );
    }
    if let Some(concurrent) = &dataset.concurrent {
        say!(
            "{} concurrent exports of a {}-member Group: {} resources in {:.1} s = {:.0} res/s, {} throttled (429), server peak RSS {}, client CPU {:.2}",
            concurrent.exports,
            concurrent.members,
            concurrent.resources,
            concurrent.seconds,
            concurrent.per_second(),
            concurrent.throttled,
            concurrent.peak_rss_bytes.text(),
            concurrent.client_cpu_share
        );
    }
    if let Some(mixed) = &dataset.mixed {
        say!(
            "mixed load {} writers / {} exporters / {} readers, {:.1} s: writes {:.0}/s ({} failed), exports {:.2}/s = {:.0} res/s ({} failed), reads {:.0}/s ({} failed); server peak RSS {}, client CPU {:.2}",
            mixed.load.writers,
            mixed.load.exporters,
            mixed.load.readers,
            mixed.seconds,
            mixed.rate(&mixed.writes),
            mixed.writes.failed(),
            mixed.rate(&mixed.exports),
            mixed.export_resources_per_second(),
            mixed.exports.failed(),
            mixed.rate(&mixed.reads),
            mixed.reads.failed(),
            mixed.peak_rss_bytes.text(),
            mixed.client_cpu_share
        );
    }
    if let Some(writes) = &dataset.writes {
        say!(
            "writes over HTTP: {} single creates at {:.0}/s; {} transaction Bundles of {} at {:.0} resources/s",
            writes.single_creates,
            writes.creates_per_second(),
            writes.bundles,
            writes.bundle_entries,
            writes.bundle_resources_per_second()
        );
    }
    say!("against the targets (DESIGN.md §6, issue 10):");
    for Target { what, target, measured, met } in targets(dataset) {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        };
        say!("  {what:<58} {measured:>16}  target {target:<14} {verdict}");
    }
}

fn dataset_json(d: &DatasetResult) -> Value {
    json!({
        "shape": d.shape,
        "store": d.store,
        "instances": d.instances,
        "patients": d.patients,
        "resources": d.resources,
        "data": d.data_dir,
        "import_seconds": d.import.seconds,
        "import_resources_per_second": d.import.per_second(),
        "import_peak_rss_bytes": d.import.peak_rss_bytes,
        "import_counts": counts_json(&d.import.counts),
        "writes": d.writes.as_ref().map(|w| json!({
            "single_creates": w.single_creates,
            "single_creates_per_second": w.creates_per_second(),
            "bundles": w.bundles,
            "bundle_entries": w.bundle_entries,
            "bundle_resources_per_second": w.bundle_resources_per_second(),
        })),
        "groups": d.groups.iter().map(|g| json!({
            "members": g.members,
            "manifest_p50_ms": g.manifest.p50_ms,
            "manifest_p95_ms": g.manifest.p95_ms,
            "manifest_first_ms": g.manifest.first_ms,
            "async_kick_off_p50_ms": g.asynchronous.kick_off.p50_ms,
            "async_kick_off_p95_ms": g.asynchronous.kick_off.p95_ms,
            "async_complete_p50_ms": g.asynchronous.complete.p50_ms,
            "async_complete_p95_ms": g.asynchronous.complete.p95_ms,
            "exports": g.exports.iter().map(|e| json!({
                "gzip": e.encoding == Encoding::Gzip,
                "encoding": e.encoding.name(),
                "files": e.files,
                "resources": e.resources,
                "bytes": e.bytes,
                "seconds": e.seconds,
                "resources_per_second": e.per_second(),
                "mb_per_second": e.mb_per_second(),
                "throttled": e.throttled,
                "server_peak_rss_bytes": e.peak_rss_bytes.max(),
                "server_peak_rss_bytes_per_instance": e.peak_rss_bytes.per_instance(),
                "client_cpu_share": e.client_cpu_share,
                "server_cpu_seconds": e.server_cpu_seconds,
                "server_cpu_share": e.server_cpu_share(),
                "server_cpu_us_per_resource": e.cpu_micros_per_resource().0,
                "client_cpu_us_per_resource": e.cpu_micros_per_resource().1,
            })).collect::<Vec<_>>(),
            "materialised_export": g.materialised.as_ref().map(|e| json!({
                "files": e.files,
                "resources": e.resources,
                "bytes": e.bytes,
                "seconds": e.seconds,
                "resources_per_second": e.per_second(),
                "server_peak_rss_bytes": e.peak_rss_bytes.max(),
                "server_peak_rss_bytes_per_instance": e.peak_rss_bytes.per_instance(),
                "client_cpu_share": e.client_cpu_share,
            })),
            "referenced_resources": g.closure.as_ref().map(|c| json!({
                "runs": c.runs,
                "with_resources": c.with_resources,
                "with_seconds": c.with_seconds,
                "without_resources": c.without_resources,
                "without_seconds": c.without_seconds,
                "extra_percent": c.extra_percent(),
            })),
        })).collect::<Vec<_>>(),
        "since": d.since.as_ref().map(|s| json!({
            "members": s.members,
            "writes": s.writes,
            "manifest_p50_ms": s.latency.p50_ms,
            "manifest_p95_ms": s.latency.p95_ms,
            "manifest_first_ms": s.latency.first_ms,
            "resources": s.resources,
        })),
        "system_export": d.system.as_ref().map(|s| json!({
            "resources": s.system.resources,
            "files": s.system.files,
            "seconds": s.system.seconds,
            "resources_per_second": s.system.per_second(),
            "server_peak_rss_bytes": s.system.peak_rss_bytes.max(),
            "server_peak_rss_bytes_per_instance": s.system.peak_rss_bytes.per_instance(),
            "group_members": s.members,
            "group_before_resources_per_second": s.group_before.per_second(),
            "group_after_resources_per_second": s.group_after.per_second(),
            "ratio_to_group": s.ratio(),
        })),
        "upload": d.upload.as_ref().map(|u| json!({
            "sent": u.sent,
            "counts": counts_json(&u.counts),
            "seconds": u.seconds,
            "resources_per_second": u.per_second(),
            "server_peak_rss_bytes": u.peak_rss_bytes.max(),
            "server_peak_rss_bytes_per_instance": u.peak_rss_bytes.per_instance(),
            "client_cpu_share": u.client_cpu_share,
        })),
        "concurrent_exports": d.concurrent.as_ref().map(|c| json!({
            "exports": c.exports,
            "members": c.members,
            "resources": c.resources,
            "seconds": c.seconds,
            "resources_per_second": c.per_second(),
            "throttled": c.throttled,
            "server_peak_rss_bytes": c.peak_rss_bytes.max(),
            "server_peak_rss_bytes_per_instance": c.peak_rss_bytes.per_instance(),
            "client_cpu_share": c.client_cpu_share,
        })),
        "mixed_load": d.mixed.as_ref().map(|m| json!({
            "writers": m.load.writers,
            "exporters": m.load.exporters,
            "readers": m.load.readers,
            "members": m.members,
            "seconds": m.seconds,
            "writes": m.writes.done(),
            "writes_failed": m.writes.failed(),
            "writes_per_second": m.rate(&m.writes),
            "exports": m.exports.done(),
            "exports_failed": m.exports.failed(),
            "exports_per_second": m.rate(&m.exports),
            "export_resources_per_second": m.export_resources_per_second(),
            "reads": m.reads.done(),
            "reads_failed": m.reads.failed(),
            "reads_per_second": m.rate(&m.reads),
            "server_peak_rss_bytes": m.peak_rss_bytes.max(),
            "server_peak_rss_bytes_per_instance": m.peak_rss_bytes.per_instance(),
            "client_cpu_share": m.client_cpu_share,
        })),
        "targets": targets(d).iter().map(|t| json!({
            "what": t.what, "target": t.target, "measured": t.measured, "met": t.met,
        })).collect::<Vec<_>>(),
    })
}

fn counts_json(counts: &ImportCounts) -> Value {
    json!({"created": counts.created, "updated": counts.updated, "unchanged": counts.unchanged, "failed": counts.failed})
}
