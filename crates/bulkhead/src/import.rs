//! `bulkhead import`: NDJSON (`.ndjson` or `.jsonl`, plain or `.gz`) and Bundle JSON files or
//! directories into a tenant, through the same validation and write path as the REST API.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bulkhead_http::ndjson_import::{line_too_long, ImportSummary, Importer, Location};
use bulkhead_store::Store;
use clap::Args;

use bulkhead_store::sqlite::SqliteOptions;

use crate::admin::{find_tenant, open_existing_store_with, OpenedStore};
use crate::cli::ConfigArgs;
use crate::config::Config;
use crate::output::count;

mod bundle_file;

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
    let loaded = load_files(&mut importer, &files, config.max_body_bytes, |bytes, processed| {
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

/// Feeds every file to the importer; `progress(bytes_read, resources_processed)`. One resource
/// (an NDJSON line, a Bundle's entry, a `.json` file that is no Bundle) may be at most
/// `max_resource` bytes, the server's limit for one request body: a longer one is refused, so
/// memory does not grow with the input.
pub fn load_files(
    importer: &mut Importer,
    files: &[PathBuf],
    max_resource: usize,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<()> {
    let mut done_bytes = 0u64;
    for path in files {
        let name = path.display().to_string();
        let count = std::rc::Rc::new(std::cell::Cell::new(0u64));
        let mut reader = open(path, &count)?;
        if is_ndjson(&name) {
            load_ndjson(importer, &name, reader, max_resource, |processed| {
                progress(done_bytes + count.get(), processed)
            })?;
        } else {
            let streamed = bundle_file::stream_bundle(importer, &name, &mut reader, max_resource, &mut |processed| {
                progress(done_bytes + count.get(), processed)
            })?;
            if streamed == bundle_file::Streamed::NotStreamable {
                // Read again from the start, whole: one resource (or a Bundle whose entries
                // come before its resourceType), within the limit for one resource.
                count.set(0);
                load_whole(importer, &name, open(path, &count)?, max_resource)?;
            }
        }
        done_bytes += count.get();
        progress(done_bytes, importer.processed());
    }
    Ok(())
}

/// The file's text (gunzipped for `.gz`), counting the bytes read from the file into `count`.
fn open(path: &Path, count: &std::rc::Rc<std::cell::Cell<u64>>) -> anyhow::Result<BufReader<Box<dyn Read>>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let raw = Counting { inner: file, count: count.clone() };
    let reader: Box<dyn Read> = if path.to_string_lossy().ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(raw))
    } else {
        Box::new(raw)
    };
    Ok(BufReader::with_capacity(256 * 1024, reader))
}

/// One resource per line; a line longer than `max_line` is refused (with `$upload-ndjson`'s
/// words) and skipped without being kept; `progress(resources_processed)` now and then.
fn load_ndjson(
    importer: &mut Importer,
    name: &str,
    mut reader: impl BufRead,
    max_line: usize,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<()> {
    // Lines are handed over as bytes: the importer checks them exactly as the server checks a
    // request body (text that is not UTF-8 is refused, never repaired).
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let read = read_line_within(&mut reader, &mut line, max_line).with_context(|| format!("reading {name}"))?;
        let location = Location { source: name.to_owned(), line: number + 1 };
        match read {
            LineRead::End => break,
            LineRead::Line => importer.add_line(location, &line)?,
            LineRead::TooLong => importer.refuse(location, line_too_long(number + 1, max_line)),
        }
        number += 1;
        if number.is_multiple_of(4096) {
            progress(importer.processed());
        }
    }
    Ok(())
}

/// What [`read_line_within`] read.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A line (with its `\n`, but for the last line of a file without one).
    Line,
    /// A line longer than the limit (its `\n` aside), read past and not kept.
    TooLong,
    /// The end of the input.
    End,
}

/// Reads one line into `line` as `read_until(b'\n')` does, but keeps at most `max_line` bytes
/// of it (as `$upload-ndjson` measures a line: without its `\n`): the rest of a longer line is
/// read past without being kept, so a file without newlines costs no more than one line.
fn read_line_within(reader: &mut impl BufRead, line: &mut Vec<u8>, max_line: usize) -> std::io::Result<LineRead> {
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            break;
        }
        read_any = true;
        let (taken, ended) = match memchr::memchr(b'\n', buffer) {
            Some(newline) => (newline + 1, true),
            None => (buffer.len(), false),
        };
        if !too_long {
            let text = &buffer[..taken - usize::from(ended)];
            if line.len() + text.len() > max_line {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(&buffer[..taken]);
            }
        }
        reader.consume(taken);
        if ended {
            break;
        }
    }
    Ok(match (read_any, too_long) {
        (false, _) => LineRead::End,
        (true, false) => LineRead::Line,
        (true, true) => LineRead::TooLong,
    })
}

/// A `.json` file that is not streamed as a Bundle: parsed whole, if it is at most `max_bytes`
/// (beyond, it is refused and not read further).
fn load_whole(importer: &mut Importer, name: &str, reader: impl Read, max_bytes: usize) -> anyhow::Result<()> {
    let mut text = Vec::new();
    let limit = u64::try_from(max_bytes).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(limit).read_to_end(&mut text).with_context(|| format!("reading {name}"))?;
    let location = |line: u64| Location { source: name.to_owned(), line };
    if text.len() > max_bytes {
        let refusal = format!(
            "the file is longer than {max_bytes} bytes, the limit for one resource (a Bundle is read entry by \
             entry only when its resourceType comes before its entry)"
        );
        importer.refuse(location(1), refusal);
        return Ok(());
    }
    match bulkhead_fhir::parse_exact(&text) {
        Ok(value) if value.get("resourceType").and_then(|t| t.as_str()) == Some("Bundle") => {
            importer.add_bundle(name, value)?
        }
        Ok(value) => importer.add_resource(location(1), value, None)?,
        // The importer words the refusal (not UTF-8, not JSON) as it does for any line.
        Err(error) => importer.add_line(location(error.line() as u64), &text)?,
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
    load_files(&mut importer, &files, config.max_body_bytes, |_, _| {})?;
    Ok(importer.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_store::sqlite::SqliteStore;
    use bulkhead_store::{TenantId, Visibility};

    /// A fresh SQLite store with one tenant, and an importer into it.
    pub(super) fn store_and_importer(directory: &Path) -> (Arc<SqliteStore>, TenantId, Importer) {
        let store = Arc::new(SqliteStore::open(&directory.join("t.db")).unwrap());
        let tenant = store.create_tenant("t").unwrap().id;
        let importer = Importer::new(store.clone(), tenant, None, 100);
        (store, tenant, importer)
    }

    pub(super) fn stored_body(store: &SqliteStore, tenant: TenantId, resource_type: &str, id: &str) -> Option<String> {
        store.read(tenant, &Visibility::Tenant, resource_type, id).unwrap().and_then(|stored| stored.body)
    }

    /// What a summary refused, as `(source, line, message)`.
    pub(super) fn refusals(summary: &ImportSummary) -> Vec<(String, u64, String)> {
        let errors = summary.errors.iter();
        errors.map(|error| (error.location.source.clone(), error.location.line, error.message.clone())).collect()
    }

    fn patient(id: &str, name_bytes: usize) -> String {
        format!(r#"{{"resourceType":"Patient","id":"{id}","name":[{{"text":"{}"}}]}}"#, "n".repeat(name_bytes))
    }

    /// A line longer than the limit for one resource is refused with `$upload-ndjson`'s words
    /// and skipped, also as the file's last line without a newline; the lines around it load.
    #[test]
    fn ndjson_lines_longer_than_the_limit_are_refused_and_the_rest_loads() {
        let directory = tempfile::tempdir().unwrap();
        let (store, tenant, mut importer) = store_and_importer(directory.path());
        let file = directory.path().join("p.ndjson");
        let text = [patient("p1", 10), patient("p2", 3_000), patient("p3", 10), patient("p4", 3_000)].join("\n");
        std::fs::write(&file, text).unwrap();
        load_files(&mut importer, std::slice::from_ref(&file), 1_024, |_, _| {}).unwrap();
        let summary = importer.finish().unwrap();
        let name = file.display().to_string();
        assert_eq!(
            refusals(&summary),
            [
                (name.clone(), 2, "line 2 is longer than 1024 bytes".to_owned()),
                (name, 4, "line 4 is longer than 1024 bytes".to_owned())
            ]
        );
        assert_eq!((summary.created, summary.failed), (2, 2));
        assert!(stored_body(&store, tenant, "Patient", "p3").is_some());
        assert!(stored_body(&store, tenant, "Patient", "p2").is_none());
    }

    /// A line far longer than the limit is read past without being kept: the buffer never holds
    /// more than the limit, and the next line is read whole.
    #[test]
    fn a_long_line_is_skipped_without_being_buffered() {
        let long = std::io::repeat(b'x').take(8 * 1024 * 1024);
        let mut reader = BufReader::with_capacity(4_096, long.chain(&b"\nnext\n"[..]));
        let mut line = Vec::new();
        assert_eq!(read_line_within(&mut reader, &mut line, 1_024).unwrap(), LineRead::TooLong);
        assert!(line.capacity() <= 2_048, "{} bytes kept", line.capacity());
        line.clear();
        assert_eq!(read_line_within(&mut reader, &mut line, 1_024).unwrap(), LineRead::Line);
        assert_eq!(line, b"next\n");
        line.clear();
        assert_eq!(read_line_within(&mut reader, &mut line, 1_024).unwrap(), LineRead::End);
        // Exactly the limit (its newline aside) is a line; one byte more is not.
        for (length, expected) in [(1_024, LineRead::Line), (1_025, LineRead::TooLong)] {
            let text = [vec![b'y'; length], b"\n".to_vec()].concat();
            line.clear();
            assert_eq!(read_line_within(&mut &text[..], &mut line, 1_024).unwrap(), expected, "{length}");
        }
    }

    /// A `.json` file that is one resource is read whole only within the limit for one
    /// resource: a larger one is refused, not parsed.
    #[test]
    fn a_json_resource_file_longer_than_the_limit_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let (store, tenant, mut importer) = store_and_importer(directory.path());
        let (small, large) = (directory.path().join("small.json"), directory.path().join("large.json"));
        std::fs::write(&small, patient("small", 10)).unwrap();
        std::fs::write(&large, patient("large", 3_000)).unwrap();
        load_files(&mut importer, &[small, large.clone()], 1_024, |_, _| {}).unwrap();
        let summary = importer.finish().unwrap();
        assert_eq!((summary.created, summary.failed), (1, 1));
        let (source, line, message) = refusals(&summary).remove(0);
        assert_eq!((source, line), (large.display().to_string(), 1));
        assert!(message.starts_with("the file is longer than 1024 bytes, the limit for one resource"), "{message}");
        assert!(stored_body(&store, tenant, "Patient", "small").is_some());
    }

    /// A Bundle is imported entry by entry: the entries before a malformed tail (a file cut
    /// short) are stored, and the tail is refused at its line with the words a request body gets.
    #[test]
    fn a_bundle_with_a_malformed_tail_keeps_the_entries_before_it() {
        let directory = tempfile::tempdir().unwrap();
        let (store, tenant, mut importer) = store_and_importer(directory.path());
        let file = directory.path().join("cut.json");
        let entries: Vec<String> =
            (0..3).map(|n| format!(r#"{{"resource":{}}}"#, patient(&format!("p{n}"), 10))).collect();
        let text = format!(
            "{{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[\n{},\n{{\"resource\":{{\"resourceType\":\"Pat",
            entries.join(",\n")
        );
        std::fs::write(&file, &text).unwrap();
        load_files(&mut importer, std::slice::from_ref(&file), 1_024, |_, _| {}).unwrap();
        let summary = importer.finish().unwrap();
        assert_eq!((summary.created, summary.failed), (3, 1));
        // The words and the place the whole file's parse gives.
        let whole = bulkhead_fhir::parse_exact(text.as_bytes()).unwrap_err();
        assert_eq!(whole.line(), 5);
        assert_eq!(refusals(&summary), [(file.display().to_string(), 5, format!("not valid JSON: {whole}"))]);
        assert!(stored_body(&store, tenant, "Patient", "p2").is_some());
    }
}
