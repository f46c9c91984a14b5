//! `bulkhead import`: NDJSON (`.ndjson` or `.jsonl`, plain or `.gz`) and Bundle JSON files or
//! directories into a tenant, through the same validation and write path as the REST API.

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

use crate::admin::{find_tenant, open_existing_store_with, OpenedStore};
use crate::cli::ConfigArgs;
use crate::config::Config;
use crate::output::count;

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
    /// Files or directories (`*.ndjson`, `*.jsonl`, `*.json` Bundles or resources; each may be
    /// gzipped as `*.gz`).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    crate::set_memory_profile(crate::MemoryProfile::BulkLoad);
    let config = args.config.load_for_tool()?;
    let files = collect_files(&args.paths)?;
    let opened = open_existing_store_with(&config, SqliteOptions::bulk_load())?;
    let tenant = find_tenant(&*opened, &config, &args.tenant)?;
    let total_bytes: u64 = files.iter().filter_map(|file| file.metadata().ok()).map(|meta| meta.len()).sum();
    let bar = indicatif::ProgressBar::new(total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let store: Arc<dyn Store> = opened.shared();
    let mut importer = Importer::new(store.clone(), tenant.id, args.user.clone(), config.max_group_members)
        .with_validation(config.validation_for(&args.tenant));
    if let OpenedStore::Sqlite(_) = &opened {
        importer = importer.with_batch_bytes(SQLITE_BATCH_BYTES).with_commit_bytes(SQLITE_COMMIT_BYTES);
    }
    let loaded = load_files(&mut importer, &files, |bytes, processed| {
        bar.set_position(bytes);
        let rate = processed as f64 / started.elapsed().as_secs_f64().max(0.001);
        bar.set_message(format!("{processed} resources, {rate:.0}/s"));
    })
    .and_then(|_| Ok(importer.finish()?));
    bar.finish_and_clear();
    let stored = loaded.as_ref().map_or_else(|_| importer.summary().clone(), Clone::clone);
    let mut detail = serde_json::Map::new();
    detail.insert("stored".into(), serde_json::json!(stored.stored_by_type));
    detail.insert("failed".into(), stored.failed.into());
    detail.insert("user".into(), serde_json::json!(args.user));
    crate::audit::record_command_outcome(store.as_ref(), tenant.id, "import", "import", loaded.is_ok(), detail);
    let summary = match loaded {
        Ok(summary) => summary,
        Err(error) => {
            // Say what is stored before the error (a full disk), so a rerun is not a guess.
            report(importer.summary(), started.elapsed().as_secs_f64());
            return Err(error.context("the import stopped; the resources counted above are stored"));
        }
    };
    report(&summary, started.elapsed().as_secs_f64());
    if let OpenedStore::Postgres(postgres) = &opened {
        if summary.created + summary.updated > 0 {
            let analysed = Instant::now();
            postgres.refresh_statistics().context("refreshing PostgreSQL's planner statistics after the import")?;
            say!("refreshed PostgreSQL's planner statistics in {:.1} s", analysed.elapsed().as_secs_f64());
        }
    }
    anyhow::ensure!(summary.failed == 0, "{} not imported (see above)", count(summary.failed, "resource"));
    Ok(())
}

/// Prints every kept line error as `file:line: message`, then what is now stored: `imported`
/// counts only the resources that are in the database as sent (created, updated or already
/// there unchanged), out of all those read when some failed.
pub fn report(summary: &ImportSummary, seconds: f64) {
    for error in &summary.errors {
        eprintln!("{}:{}: {}", error.location.source, error.location.line, error.message);
    }
    if summary.failed > summary.errors.len() as u64 {
        eprintln!("… and {} more failed lines", summary.failed - summary.errors.len() as u64);
    }
    let rate = summary.processed() as f64 / seconds.max(0.001);
    let stored = summary.created + summary.updated + summary.unchanged;
    let imported = match summary.failed {
        0 => count(stored, "resource"),
        _ => format!("{stored} of {}", count(summary.processed(), "resource")),
    };
    say!(
        "imported {imported} in {seconds:.1} s ({rate:.0}/s): {} created, {} updated, {} unchanged, {} failed{}",
        summary.created,
        summary.updated,
        summary.unchanged,
        summary.failed,
        if summary.failed == 0 { "" } else { " (not stored)" }
    );
}

/// JSON text a SQLite import commits at a time (the importer's default is 16 MiB): every commit
/// writes each index leaf its random keys touched to the WAL (and a checkpoint copies it again),
/// so fewer, larger transactions write each leaf fewer times. A transaction's batches stay in
/// memory until it commits (about twice their text), and with `SqliteOptions::bulk_load`'s
/// 64 MiB cache this keeps an import near 360 MB (BENCHMARKS.md, session 14).
const SQLITE_COMMIT_BYTES: usize = 48 * 1024 * 1024;
/// JSON text of a SQLite import's batch (the importer's default is 2 MiB): the store inserts a
/// batch's new rows in key order, so a larger batch walks the unique index's leaves in longer
/// runs. 8 MiB took the import past 400 MB.
const SQLITE_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// What an import reads; anything else in a directory is skipped with a warning.
const IMPORTABLE: [&str; 6] = [".ndjson", ".jsonl", ".json", ".ndjson.gz", ".jsonl.gz", ".json.gz"];

/// Expands directories (sorted, recursively) into the files an import reads. A directory
/// without one importable file is an error, not an import of nothing.
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            let found = collect_directory(path)?;
            anyhow::ensure!(
                !found.is_empty(),
                "{} holds no file to import (expected {})",
                path.display(),
                IMPORTABLE.map(|suffix| format!("*{suffix}")).join(", ")
            );
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn collect_directory(directory: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(directory)
        .with_context(|| format!("cannot read {}", directory.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    entries.sort();
    let mut files = Vec::new();
    for entry in entries {
        // Hidden entries (`.DS_Store`, `.git`, a tool's marker files) are never data.
        if entry.file_name().is_some_and(|name| name.to_string_lossy().starts_with('.')) {
            continue;
        }
        if entry.is_dir() {
            files.extend(collect_directory(&entry)?);
        } else if is_importable(&entry) {
            files.push(entry);
        } else {
            crate::warn(&format!("skipping {}: not one of {}", entry.display(), IMPORTABLE.join(" ")));
        }
    }
    Ok(files)
}

fn is_importable(path: &Path) -> bool {
    let name = path.file_name().and_then(|name| name.to_str()).unwrap_or("");
    IMPORTABLE.iter().any(|suffix| name.ends_with(suffix))
}

/// NDJSON (one resource per line) rather than one JSON document.
fn is_ndjson(name: &str) -> bool {
    let name = name.trim_end_matches(".gz");
    name.ends_with(".ndjson") || name.ends_with(".jsonl")
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
        if is_ndjson(&name) {
            // Lines are handed over as bytes: the importer checks them exactly as the server
            // checks a request body (text that is not UTF-8 is refused, never repaired).
            let mut line = Vec::new();
            let mut number = 0u64;
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line).with_context(|| format!("reading {name}"))? == 0 {
                    break;
                }
                number += 1;
                importer.add_line(Location { source: name.clone(), line: number }, &line)?;
                if number.is_multiple_of(4096) {
                    progress(done_bytes + count.get(), importer.processed());
                }
            }
        } else {
            let mut text = Vec::new();
            reader.read_to_end(&mut text).with_context(|| format!("reading {name}"))?;
            match bulkhead_fhir::parse_exact(&text) {
                Ok(value) if value.get("resourceType").and_then(|t| t.as_str()) == Some("Bundle") => {
                    importer.add_bundle(&name, value)?
                }
                Ok(value) => importer.add_resource(Location { source: name.clone(), line: 1 }, value, None)?,
                // The importer words the refusal (not UTF-8, not JSON) as it does for any line.
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
    config: &Config,
    tenant_name: &str,
    paths: &[PathBuf],
) -> anyhow::Result<ImportSummary> {
    let tenant = find_tenant(store.as_ref(), config, tenant_name)?;
    let files = collect_files(paths)?;
    let mut importer = Importer::new(store, tenant.id, None, config.max_group_members)
        .with_validation(config.validation_for(tenant_name));
    load_files(&mut importer, &files, |_, _| {})?;
    Ok(importer.finish()?)
}
