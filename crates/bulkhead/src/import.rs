//! `bulkhead import`: NDJSON (plain or `.gz`) and Bundle JSON files or directories into a
//! tenant, through the same validation and write path as the REST API.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bulkhead_http::ndjson_import::{ImportSummary, Importer, Location};
use bulkhead_store::Store;
use clap::Args;

use bulkhead_store::sqlite::SqliteOptions;

use crate::admin::{find_tenant, open_store_with};
use crate::cli::ConfigArgs;

#[derive(Args)]
pub struct ImportArgs {
    /// Tenant to import into.
    #[arg(long)]
    pub tenant: String,
    /// Owner of the imported resources (an x-oneup-user-id); default: the tenant itself.
    #[arg(long)]
    pub user: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Files or directories (`*.ndjson`, `*.ndjson.gz`, `*.json` Bundles or resources).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    crate::set_memory_profile(crate::MemoryProfile::BulkLoad);
    let config = args.config.load(None)?;
    let store = open_store_with(&config, SqliteOptions::bulk_load())?;
    let tenant = find_tenant(&store, &args.tenant)?;
    let files = collect_files(&args.paths)?;
    let total_bytes: u64 = files.iter().filter_map(|file| file.metadata().ok()).map(|meta| meta.len()).sum();
    let bar = indicatif::ProgressBar::new(total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut importer = Importer::new(Arc::new(store), tenant.id, args.user.clone(), config.max_group_members)
        .with_validation(config.validation);
    let summary = load_files(&mut importer, &files, |bytes, processed| {
        bar.set_position(bytes);
        let rate = processed as f64 / started.elapsed().as_secs_f64().max(0.001);
        bar.set_message(format!("{processed} resources, {rate:.0}/s"));
    })
    .and_then(|_| Ok(importer.finish()?))?;
    bar.finish_and_clear();
    report(&summary, started.elapsed().as_secs_f64());
    anyhow::ensure!(summary.failed == 0, "{} resources were not imported (see above)", summary.failed);
    Ok(())
}

/// Prints the summary and every kept line error as `file:line: message`.
pub fn report(summary: &ImportSummary, seconds: f64) {
    for error in &summary.errors {
        eprintln!("{}:{}: {}", error.location.source, error.location.line, error.message);
    }
    if summary.failed > summary.errors.len() as u64 {
        eprintln!("… and {} more failed lines", summary.failed - summary.errors.len() as u64);
    }
    let rate = summary.processed() as f64 / seconds.max(0.001);
    println!(
        "imported {} resources in {seconds:.1} s ({rate:.0}/s): {} created, {} updated, {} unchanged, {} failed",
        summary.processed(),
        summary.created,
        summary.updated,
        summary.unchanged,
        summary.failed
    );
}

/// Expands directories (sorted, recursively) into the files an import reads.
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> =
                std::fs::read_dir(path)?.filter_map(|entry| entry.ok().map(|entry| entry.path())).collect();
            entries.sort();
            let importable =
                entries.into_iter().filter(|entry| entry.is_dir() || is_importable(entry)).collect::<Vec<_>>();
            files.extend(collect_files(&importable)?);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn is_importable(path: &Path) -> bool {
    let name = path.file_name().and_then(|name| name.to_str()).unwrap_or("");
    [".ndjson", ".ndjson.gz", ".json", ".json.gz"].iter().any(|suffix| name.ends_with(suffix))
}

/// Counts the bytes read from a file, for progress.
struct Counting<R> {
    inner: R,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.count.set(self.count.get() + read as u64);
        Ok(read)
    }
}

/// Feeds every file to the importer; `progress(bytes_read, resources_processed)`.
pub fn load_files(
    importer: &mut Importer,
    files: &[PathBuf],
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<()> {
    let mut done_bytes = 0u64;
    for path in files {
        let name = path.display().to_string();
        let count = std::rc::Rc::new(std::cell::Cell::new(0u64));
        let file = File::open(path).with_context(|| format!("opening {name}"))?;
        let raw = Counting { inner: file, count: count.clone() };
        let reader: Box<dyn Read> =
            if name.ends_with(".gz") { Box::new(flate2::read::MultiGzDecoder::new(raw)) } else { Box::new(raw) };
        let mut reader = BufReader::with_capacity(256 * 1024, reader);
        if name.trim_end_matches(".gz").ends_with(".ndjson") {
            let mut line = String::new();
            let mut number = 0u64;
            loop {
                line.clear();
                let read = match reader.read_line(&mut line) {
                    Ok(read) => read,
                    Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                        // Not UTF-8: report the line and go on with the next.
                        number += 1;
                        importer.add_line(Location { source: name.clone(), line: number }, "\u{0}")?;
                        continue;
                    }
                    Err(error) => return Err(error).with_context(|| format!("reading {name}")),
                };
                if read == 0 {
                    break;
                }
                number += 1;
                importer.add_line(Location { source: name.clone(), line: number }, &line)?;
                if number.is_multiple_of(4096) {
                    progress(done_bytes + count.get(), importer.processed());
                }
            }
        } else {
            let mut text = String::new();
            reader.read_to_string(&mut text).with_context(|| format!("reading {name}"))?;
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(value) if value.get("resourceType").and_then(|t| t.as_str()) == Some("Bundle") => {
                    importer.add_bundle(&name, value)?
                }
                Ok(value) => importer.add_resource(Location { source: name.clone(), line: 1 }, value, None)?,
                Err(error) => importer.add_line(Location { source: name.clone(), line: error.line() as u64 }, &text)?,
            }
        }
        done_bytes += count.get();
        progress(done_bytes, importer.processed());
    }
    Ok(())
}

/// Imports `paths` into `tenant_name` of an open store (used by the demo).
pub fn import_into(
    store: Arc<dyn Store>,
    tenant_name: &str,
    paths: &[PathBuf],
    max_group_members: usize,
) -> anyhow::Result<ImportSummary> {
    let tenant = find_tenant(store.as_ref(), tenant_name)?;
    let files = collect_files(paths)?;
    let mut importer = Importer::new(store, tenant.id, None, max_group_members);
    load_files(&mut importer, &files, |_, _| {})?;
    Ok(importer.finish()?)
}
