//! Each measured figure against its target (DESIGN.md §6 and issue 10's table): met or missed,
//! with the figure, so the report says it rather than a reader working it out.

use super::measure::Encoding;
use super::report::{DatasetResult, ExportResult, GroupResult};

pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// `None` where the figure has no target (recorded for comparison only) or was not measured.
    pub met: Option<bool>,
}

const MB: f64 = 1e6;

fn at_most(what: String, limit: f64, unit: &str, value: f64, shown: String) -> Target {
    Target { what, target: format!("<= {limit} {unit}"), measured: shown, met: Some(value <= limit) }
}

fn at_least(what: String, limit: f64, unit: &str, value: f64) -> Target {
    Target {
        what,
        target: format!(">= {limit} {unit}"),
        measured: format!("{value:.0} {unit}"),
        met: Some(value >= limit),
    }
}

fn rss_at_most(what: String, limit_mb: f64, bytes: Option<u64>) -> Target {
    match bytes {
        Some(bytes) => at_most(what, limit_mb, "MB", bytes as f64 / MB, format!("{:.0} MB", bytes as f64 / MB)),
        None => Target { what, target: format!("<= {limit_mb} MB"), measured: "?".into(), met: None },
    }
}

fn export(group: &GroupResult, encoding: Encoding) -> Option<&ExportResult> {
    group.exports.iter().find(|export| export.encoding == encoding)
}

pub fn targets(dataset: &DatasetResult) -> Vec<Target> {
    let mut rows = Vec::new();
    let smallest = dataset.groups.iter().min_by_key(|group| group.members);
    let largest = dataset.groups.iter().max_by_key(|group| group.members);
    if let Some(group) = largest {
        let limit = if group.members >= 100_000 { 500.0 } else { 50.0 };
        let p50 = group.manifest.p50_ms;
        let what = format!("synchronous manifest p50, {}-member Group", group.members);
        rows.push(at_most(what, limit, "ms", p50, format!("{p50:.1} ms")));
    }
    if let (Some(small), Some(large)) = (smallest, largest) {
        if large.members > small.members {
            let ratio = large.manifest.p50_ms / small.manifest.p50_ms.max(1e-9);
            let what = format!("manifest growth p50({})/p50({})", large.members, small.members);
            rows.push(at_most(what, 4.0, "x", ratio, format!("{ratio:.1} x")));
        }
    }
    if let Some(worst) =
        dataset.groups.iter().max_by(|a, b| a.asynchronous.kick_off.p50_ms.total_cmp(&b.asynchronous.kick_off.p50_ms))
    {
        let p50 = worst.asynchronous.kick_off.p50_ms;
        let what = format!("async kick-off (202) p50, worst Group size ({} members)", worst.members);
        rows.push(at_most(what, 50.0, "ms", p50, format!("{p50:.1} ms")));
    }
    if let Some(group) = largest {
        rows.push(Target {
            what: format!("async: status 200 p50, {}-member Group", group.members),
            target: "-".into(),
            measured: format!("{:.1} ms", group.asynchronous.complete.p50_ms),
            met: None,
        });
    }
    if let Some(since) = &dataset.since {
        let what = format!("_since manifest p50, {} members, {} writes", since.members, since.writes);
        rows.push(at_most(what, 50.0, "ms", since.latency.p50_ms, format!("{:.1} ms", since.latency.p50_ms)));
    }
    rows.push(at_least("CLI import".into(), 100_000.0, "res/s", dataset.import.per_second()));
    rows.push(rss_at_most("CLI import peak RSS".into(), 400.0, dataset.import.peak_rss_bytes));
    if let Some(upload) = &dataset.upload {
        rows.push(at_least("POST /r4/$upload-ndjson".into(), 50_000.0, "res/s", upload.per_second()));
        rows.push(rss_at_most("server peak RSS during $upload-ndjson".into(), 150.0, upload.peak_rss_bytes.max()));
    }
    if let Some(group) = largest {
        let members = group.members;
        for (encoding, limit) in
            [(Encoding::Identity, Some(700_000.0)), (Encoding::Gzip, Some(500_000.0)), (Encoding::Zstd, None)]
        {
            let what = format!(
                "export {}, {members}-member Group",
                match encoding {
                    Encoding::Identity => "NDJSON",
                    other => other.name(),
                }
            );
            match (export(group, encoding), limit) {
                (Some(export), Some(limit)) => rows.push(at_least(what, limit, "res/s", export.per_second())),
                (Some(export), None) => rows.push(Target {
                    what,
                    target: "-".into(),
                    measured: format!("{:.0} res/s", export.per_second()),
                    met: None,
                }),
                (None, _) => rows.push(Target { what, target: "-".into(), measured: "not offered".into(), met: None }),
            }
        }
        if let Some(export) = export(group, Encoding::Identity) {
            let what = format!("server peak RSS, one {}-resource export", export.resources);
            rows.push(rss_at_most(what, 150.0, export.peak_rss_bytes.max()));
        }
    }
    if let Some(concurrent) = &dataset.concurrent {
        let what =
            format!("server peak RSS, {} concurrent exports of {} members", concurrent.exports, concurrent.members);
        rows.push(rss_at_most(what, 200.0, concurrent.peak_rss_bytes.max()));
    }
    if let Some(mixed) = &dataset.mixed {
        let load = mixed.load;
        let what = format!("server peak RSS, mixed load {}/{}/{}", load.writers, load.exporters, load.readers);
        rows.push(rss_at_most(what, 300.0, mixed.peak_rss_bytes.max()));
    }
    rows
}
