//! Benchmark results: a table for people, JSON for machines.

use serde_json::{json, Value};

pub struct ExportResult {
    pub gzip: bool,
    pub files: usize,
    pub resources: u64,
    /// Bytes on the wire (compressed when gzip).
    pub bytes: u64,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl ExportResult {
    fn per_second(&self) -> f64 {
        self.resources as f64 / self.seconds.max(1e-9)
    }

    fn mb_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

pub struct GroupResult {
    pub members: usize,
    pub manifest_p50_ms: f64,
    pub manifest_p95_ms: f64,
    pub exports: Vec<ExportResult>,
}

pub struct DatasetResult {
    pub patients: u64,
    pub resources: u64,
    pub import_seconds: f64,
    pub data_dir: String,
    pub groups: Vec<GroupResult>,
    pub writes: Option<super::writes::WriteResult>,
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

impl BenchReport {
    pub fn new() -> BenchReport {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        BenchReport { machine: machine(), command, datasets: Vec::new() }
    }

    pub fn print_table(&self) {
        say!("machine: {}", self.machine);
        say!("command: {}", self.command);
        for dataset in &self.datasets {
            say!(
                "\ndata set: {} synthetic patients, {} resources ({}); import {:.1} s = {:.0} resources/s",
                dataset.patients,
                dataset.resources,
                dataset.data_dir,
                dataset.import_seconds,
                dataset.resources as f64 / dataset.import_seconds.max(1e-9)
            );
            say!(
                "{:>8} {:>9} {:>9} {:>5} {:>10} {:>11} {:>9} {:>8} {:>9}",
                "members",
                "p50 ms",
                "p95 ms",
                "gzip",
                "resources",
                "res/s",
                "MB/s",
                "seconds",
                "peak RSS"
            );
            for group in &dataset.groups {
                for export in &group.exports {
                    say!(
                        "{:>8} {:>9.1} {:>9.1} {:>5} {:>10} {:>11.0} {:>9.1} {:>8.2} {:>8}M",
                        group.members,
                        group.manifest_p50_ms,
                        group.manifest_p95_ms,
                        if export.gzip { "yes" } else { "no" },
                        export.resources,
                        export.per_second(),
                        export.mb_per_second(),
                        export.seconds,
                        export
                            .peak_rss_bytes
                            .map_or("?".to_owned(), |bytes| format!("{:.0}", bytes as f64 / 1048576.0))
                    );
                }
            }
        }
        for dataset in &self.datasets {
            if let Some(writes) = &dataset.writes {
                say!(
                    "\nwrites over HTTP ({} patients loaded): {} single creates at {:.0}/s; {} transaction Bundles of {} at {:.0} resources/s",
                    dataset.patients,
                    writes.single_creates,
                    writes.creates_per_second(),
                    writes.bundles,
                    writes.bundle_entries,
                    writes.bundle_resources_per_second()
                );
            }
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
            group.exports.iter().find(|export| !export.gzip)
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
            "datasets": self.datasets.iter().map(|d| json!({
                "patients": d.patients,
                "resources": d.resources,
                "data": d.data_dir,
                "import_seconds": d.import_seconds,
                "import_resources_per_second": d.resources as f64 / d.import_seconds.max(1e-9),
                "writes": d.writes.as_ref().map(|w| json!({
                    "single_creates": w.single_creates,
                    "single_creates_per_second": w.creates_per_second(),
                    "bundles": w.bundles,
                    "bundle_entries": w.bundle_entries,
                    "bundle_resources_per_second": w.bundle_resources_per_second(),
                })),
                "groups": d.groups.iter().map(|g| json!({
                    "members": g.members,
                    "manifest_p50_ms": g.manifest_p50_ms,
                    "manifest_p95_ms": g.manifest_p95_ms,
                    "exports": g.exports.iter().map(|e| json!({
                        "gzip": e.gzip,
                        "files": e.files,
                        "resources": e.resources,
                        "bytes": e.bytes,
                        "seconds": e.seconds,
                        "resources_per_second": e.per_second(),
                        "mb_per_second": e.mb_per_second(),
                        "server_peak_rss_bytes": e.peak_rss_bytes,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}
