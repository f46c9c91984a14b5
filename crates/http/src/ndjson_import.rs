//! Bulk loading of resources (NDJSON lines or Bundle entries) through the same write path as the
//! REST API: validation, versioning, compartment index. Used by `bulkhead import` and by the
//! `POST /r4/$upload-ndjson` endpoint.
//!
//! Resources keep their ids (a re-import of the same data changes nothing: unchanged content
//! makes no new version). `urn:uuid:<id>` references are rewritten to `Type/<id>` when a resource
//! with that id is part of the load; a line whose target comes later in the load waits until
//! the end, and a reference that never resolves is kept as it is.

use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use bulkhead_fhir::{JsonTape, JsonView, TapeBuffers};
use bulkhead_store::{BulkBatch, BulkSource, PreparedWrite, Store, StoreError, TenantId, WriteOp, Written};
use serde_json::Value;

use crate::known_ids::{FullUrlAliases, KnownIds};
use crate::validate::{describe_issues, parse_resource, validate_json, validate_resource, ValidationMode};

/// A batch is written when it holds this many resources…
const BATCH: usize = 10_000;
/// …or this many bytes of JSON text by default (a parsed resource takes several times its text
/// in memory, about 10× for Synthea-shaped data, and up to three batches are alive: one being
/// built, one queued, one being written), which bounds an import's memory whatever the file
/// sizes. Larger batches were no faster: 8 MiB took 330 MB for batches alone.
const BATCH_BYTES: usize = 2 * 1024 * 1024;
/// A bulk load commits once this many bytes of JSON text were written since its last commit, or
/// earlier, whenever the writer has no batch waiting (it never waits with a transaction open).
/// Every commit rewrites the indexes' hot pages: committing 2 MiB batches one by one wrote 760 MB
/// for the 260 MB of a 1,000-patient import. A transaction's batches are kept until it commits
/// (a rolled-back one is written again), so this bounds their memory with `BATCH_BYTES`.
const COMMIT_BYTES: usize = 16 * 1024 * 1024;
/// Deferred resources (waiting for a reference's target) kept in memory, as text, up to this
/// many bytes; past it they go to a temporary file.
const DEFERRED_BYTES: usize = 4 * 1024 * 1024;
/// Size assumed for a resource that did not come as text of a known length (a Bundle's entry
/// parsed with the whole Bundle).
const ENTRY_BYTES: usize = 2 * 1024;
/// Line errors kept for the summary; later ones are only counted.
const KEPT_ERRORS: usize = 1_000;

/// The refusal of a line longer than the limit for one resource (`max_body_bytes`), in the same
/// words for `$upload-ndjson` and `bulkhead import`.
pub fn line_too_long(line: u64, max_line: usize) -> String {
    format!("line {line} is longer than {max_line} bytes")
}

/// Where a resource came from, for error reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub source: String,
    pub line: u64,
}

/// One refused line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub location: Location,
    pub message: String,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub failed: u64,
    /// Resources stored (created, updated or unchanged) per type, for the audit trail.
    pub stored_by_type: std::collections::BTreeMap<String, u64>,
    /// The first failures (all are counted in `failed`).
    pub errors: Vec<LineError>,
}

impl ImportSummary {
    /// Counts one stored resource.
    fn count(&mut self, written: &Written) {
        match (written.created, written.changed) {
            (true, _) => self.created += 1,
            (false, true) => self.updated += 1,
            (false, false) => self.unchanged += 1,
        }
        match self.stored_by_type.get_mut(&written.resource_type) {
            Some(count) => *count += 1,
            None => drop(self.stored_by_type.insert(written.resource_type.clone(), 1)),
        }
    }

    pub fn processed(&self) -> u64 {
        self.created + self.updated + self.unchanged + self.failed
    }
}

/// A batch on its way to the writer thread (with its JSON text bytes): each op with what its
/// write derives from its body (the stored text up to the stamps, compartments, references,
/// search tokens) prepared here, beside the parsing, while the writer thread writes the previous
/// batch.
type Batch = (Vec<Location>, BulkBatch, usize);

/// The outcome of each op of a written batch, in order.
type Outcomes = Vec<Result<Written, StoreError>>;

/// What the writer thread reports, in order.
enum WriterReport {
    /// A batch written and committed, given back to be freed on the importing thread, with its
    /// results (counted at the `Committed` that follows).
    Written(Vec<Location>, BulkBatch, Outcomes),
    /// Every batch reported `Written` so far is committed.
    Committed,
    /// The store failed: batches not yet committed are not stored, and nothing more is written.
    Failed(StoreError),
}

/// The thread that writes batches while the importer prepares the next one (parsing, validating
/// and resolving references overlap with SQLite's work).
struct BatchWriter {
    batches: SyncSender<Batch>,
    reports: Receiver<WriterReport>,
    thread: JoinHandle<()>,
}

/// Loads resources into one tenant in batches, written on a second thread.
pub struct Importer {
    store: Arc<dyn Store>,
    writer: Option<BatchWriter>,
    tenant: TenantId,
    owner: Option<String>,
    max_group_members: usize,
    validation: ValidationMode,
    /// `id` → type of every resource seen in this load (for `urn:uuid:` references).
    known: KnownIds,
    /// `urn:uuid:` fullUrl → `Type/id` for Bundle entries whose fullUrl's uuid is not their id
    /// (only `urn:uuid:` references are looked up: other fullUrls are not kept).
    aliases: FullUrlAliases,
    pending: Vec<(Location, WriteOp, Option<PreparedWrite>)>,
    /// JSON text bytes of the pending batch.
    pending_bytes: usize,
    /// The text size of the resource being added (set by `add_line`).
    size_hint: usize,
    batch_bytes: usize,
    /// Bytes of JSON text a bulk transaction may grow to (see `COMMIT_BYTES`).
    commit_bytes: usize,
    /// Outcomes of batches written but not yet committed: counted in the summary at the commit.
    uncommitted: Vec<(Vec<Location>, Outcomes)>,
    /// Resources waiting for a reference's target, spilled to a temporary file (in real exports
    /// most lines of some types wait, and a load's memory must not grow with it).
    deferred: Deferred,
    summary: ImportSummary,
    /// The buffers each line's tape is parsed into, reused.
    tape: TapeBuffers,
}

impl Importer {
    pub fn new(store: Arc<dyn Store>, tenant: TenantId, owner: Option<String>, max_group_members: usize) -> Importer {
        Importer {
            store,
            writer: None,
            tenant,
            owner,
            max_group_members,
            validation: ValidationMode::Strict,
            known: KnownIds::default(),
            aliases: FullUrlAliases::default(),
            pending: Vec::with_capacity(BATCH),
            pending_bytes: 0,
            size_hint: ENTRY_BYTES,
            batch_bytes: BATCH_BYTES,
            commit_bytes: COMMIT_BYTES,
            uncommitted: Vec::new(),
            deferred: Deferred::default(),
            summary: ImportSummary::default(),
            tape: TapeBuffers::default(),
        }
    }

    /// Writes smaller batches (a server importing beside its exports keeps its memory small),
    /// and commits at most four of them at a time (its other writers wait less for the lock).
    pub fn with_batch_bytes(mut self, batch_bytes: usize) -> Importer {
        self.batch_bytes = batch_bytes.max(1);
        self.commit_bytes = self.commit_bytes.min(self.batch_bytes.saturating_mul(4));
        self
    }

    /// Commits at most this many bytes of JSON text at a time (a server keeps the write lock
    /// shorter for other writers).
    pub fn with_commit_bytes(mut self, commit_bytes: usize) -> Importer {
        self.commit_bytes = commit_bytes.max(1);
        self
    }

    /// Sets how strictly resources are checked against R4 (default `Strict`).
    pub fn with_validation(mut self, validation: ValidationMode) -> Importer {
        self.validation = validation;
        self
    }

    /// How many resources were processed so far.
    pub fn processed(&self) -> u64 {
        self.summary.processed()
    }

    /// Counts a refused resource with its message (kept for the summary up to `KEPT_ERRORS`);
    /// callers that read the input themselves refuse what never reaches the importer (a line
    /// longer than the limit for one resource: [`line_too_long`]).
    pub fn refuse(&mut self, location: Location, message: impl Into<String>) {
        self.summary.failed += 1;
        if self.summary.errors.len() < KEPT_ERRORS {
            self.summary.errors.push(LineError { location, message: message.into() });
        }
    }

    /// Adds one NDJSON line (blank lines are skipped). The line is checked and parsed exactly
    /// as a REST body is, so every way in refuses the same input with the same message.
    pub fn add_line(&mut self, location: Location, line: &[u8]) -> Result<(), StoreError> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let mut tape = std::mem::take(&mut self.tape);
        let added = self.add_line_from_tape(location, line, &mut tape);
        self.tape = tape;
        let location = match added {
            Ok(added) => return added,
            Err(location) => location,
        };
        match parse_resource(line) {
            Ok(resource) => {
                self.size_hint = line.len();
                let added = self.add_resource(location, resource, None);
                self.size_hint = ENTRY_BYTES;
                added
            }
            Err(error) => {
                self.refuse(location, describe_issues(&error.issues));
                Ok(())
            }
        }
    }

    /// [`Importer::add_line`] without a `Value`: the line is parsed into a tape, validated, and
    /// its stored text and index rows prepared from the tape, by the same code and with the same
    /// messages as a `Value`. `None` leaves the line to the `Value` path: text the tape does not
    /// take (see [`JsonTape`]), a line with `urn:uuid:` references (rewritten in a `Value`), a
    /// missing or malformed type or id (refused there with REST's words), or a `meta` with stamps
    /// (no template). `Err` gives the location back for that path.
    fn add_line_from_tape(
        &mut self,
        location: Location,
        line: &[u8],
        buffers: &mut TapeBuffers,
    ) -> Result<Result<(), StoreError>, Location> {
        let Ok(text) = std::str::from_utf8(line) else { return Err(location) };
        if memchr::memmem::find(line, b"urn:uuid:").is_some() {
            return Err(location);
        }
        let Some(tape) = JsonTape::parse(text, buffers) else { return Err(location) };
        let resource = tape.root();
        let resource_type = resource.get("resourceType").and_then(JsonView::as_str).and_then(static_type);
        let id = resource.get("id").and_then(JsonView::as_str).filter(|id| bulkhead_fhir::is_valid_id(id));
        let (Some(resource_type), Some(id)) = (resource_type, id) else { return Err(location) };
        if resource.get("meta").and_then(|meta| meta.get("versionId").or_else(|| meta.get("lastUpdated"))).is_some() {
            return Err(location);
        }
        if let Err(error) = self.known.insert(id, resource_type) {
            return Ok(Err(spill_error(error)));
        }
        if let Err(error) = validate_json(resource, resource_type, Some(id), self.max_group_members, self.validation) {
            self.refuse(location, describe_issues(&error.issues));
            return Ok(Ok(()));
        }
        let Some(prepared) = PreparedWrite::detached(resource_type, id, resource, line.len()) else {
            return Err(location);
        };
        // The body is the template's text (see `PreparedWrite::detached`).
        let (resource_type, id) = (resource_type.to_owned(), id.to_owned());
        let op = WriteOp::Update { resource_type, id, body: Value::Null, if_match: None };
        self.size_hint = line.len();
        let queued = self.push(location, op, Some(prepared));
        self.size_hint = ENTRY_BYTES;
        Ok(queued)
    }

    /// Adds a whole Bundle (file import): each entry's resource, with its `fullUrl` resolved.
    pub fn add_bundle(&mut self, source: &str, mut bundle: Value) -> Result<(), StoreError> {
        let entries = match bundle.get_mut("entry").map(Value::take) {
            Some(Value::Array(entries)) => entries,
            _ => Vec::new(),
        };
        for (index, entry) in entries.into_iter().enumerate() {
            self.add_bundle_entry(source, index, entry, ENTRY_BYTES)?;
        }
        Ok(())
    }

    /// Adds element `index` of a Bundle's `entry` (a file import reads a Bundle entry by entry:
    /// see `bulkhead import`), `text_bytes` long: its resource, with its `fullUrl` resolved.
    pub fn add_bundle_entry(
        &mut self,
        source: &str,
        index: usize,
        mut entry: Value,
        text_bytes: usize,
    ) -> Result<(), StoreError> {
        let location = Location { source: format!("{source} entry[{index}]"), line: index as u64 + 1 };
        let full_url = entry.get("fullUrl").and_then(Value::as_str).map(str::to_owned);
        match entry.get_mut("resource").map(Value::take) {
            Some(resource) => {
                // Batches are bounded by their text: a large entry counts as large.
                self.size_hint = text_bytes;
                let added = self.add_resource(location, resource, full_url);
                self.size_hint = ENTRY_BYTES;
                added
            }
            None => {
                self.refuse(location, "Bundle entry has no resource");
                Ok(())
            }
        }
    }

    /// Adds one resource; `full_url` is its Bundle `fullUrl`, if any.
    pub fn add_resource(
        &mut self,
        location: Location,
        mut resource: Value,
        full_url: Option<String>,
    ) -> Result<(), StoreError> {
        let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str).and_then(static_type) else {
            // Refused with the message REST gives for the same body.
            let refusal = validate_resource(&resource, "", None, self.max_group_members, self.validation)
                .err()
                .map(|error| describe_issues(&error.issues))
                .unwrap_or_else(|| "resourceType is not an R4 resource type".to_owned());
            self.refuse(location, refusal);
            return Ok(());
        };
        let id = match resource.get("id") {
            Some(Value::String(id)) if bulkhead_fhir::is_valid_id(id) => id.to_owned(),
            // A malformed id is refused with the message REST gives, never replaced (a re-import
            // would then duplicate the resource).
            Some(_) => {
                let refusal =
                    validate_resource(&resource, resource_type, None, self.max_group_members, self.validation)
                        .err()
                        .map(|error| describe_issues(&error.issues))
                        .unwrap_or_else(|| "the resource id is not valid".to_owned());
                self.refuse(location, refusal);
                return Ok(());
            }
            None => {
                // No id: the fullUrl's uuid keeps references to it working, else a fresh one.
                let id = full_url
                    .as_deref()
                    .and_then(|url| url.strip_prefix("urn:uuid:"))
                    .filter(|uuid| bulkhead_fhir::is_valid_id(uuid))
                    .map(str::to_owned)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                resource["id"] = Value::String(id.clone());
                id
            }
        };
        let alias = full_url.as_deref().and_then(|url| url.strip_prefix("urn:uuid:")).filter(|uuid| *uuid != id);
        if let Some(uuid) = alias {
            self.aliases.insert(uuid, resource_type, &id).map_err(spill_error)?;
        }
        self.known.insert(&id, resource_type).map_err(spill_error)?;
        if self.resolve_references(&mut resource)? {
            self.queue(location, resource)
        } else {
            self.deferred.push(location, resource)
        }
    }

    fn queue(&mut self, location: Location, resource: Value) -> Result<(), StoreError> {
        let resource_type = resource["resourceType"].as_str().unwrap_or_default().to_owned();
        let id = resource["id"].as_str().unwrap_or_default().to_owned();
        if let Err(error) =
            validate_resource(&resource, &resource_type, Some(&id), self.max_group_members, self.validation)
        {
            self.refuse(location, describe_issues(&error.issues));
            return Ok(());
        }
        // Prepared from the `Value` as a line is from its tape, and then dropped: a parsed
        // resource takes several times its text, and a batch is kept until its transaction
        // commits (deferred Synthea lines, written at the end, took 7–8× their text this way).
        if let Some(prepared) = PreparedWrite::detached(&resource_type, &id, &resource, self.size_hint) {
            drop(resource);
            let op = WriteOp::Update { resource_type, id, body: Value::Null, if_match: None };
            return self.push(location, op, Some(prepared));
        }
        // A `meta` with stamps has no template: such a body is written from its `Value`.
        let prepared = Some(PreparedWrite::new(&resource_type, &id, &resource));
        self.push(location, WriteOp::Update { resource_type, id, body: resource, if_match: None }, prepared)
    }

    /// Adds a checked write to the pending batch, written when the batch is full.
    fn push(&mut self, location: Location, op: WriteOp, prepared: Option<PreparedWrite>) -> Result<(), StoreError> {
        self.pending.push((location, op, prepared));
        self.pending_bytes += self.size_hint;
        if self.pending.len() >= BATCH || self.pending_bytes >= self.batch_bytes {
            return self.flush();
        }
        // Batches the writer committed are freed now rather than at the next flush: a whole
        // transaction's batches would otherwise stay alive beside the next one's.
        self.record_reports()
    }

    /// Takes in the writer's reports that are already waiting.
    fn record_reports(&mut self) -> Result<(), StoreError> {
        while let Some(report) = self.writer.as_ref().and_then(|writer| writer.reports.try_recv().ok()) {
            self.record(report)?;
        }
        Ok(())
    }

    /// Rewrites `urn:uuid:` references it can; false when one still waits for its target.
    fn resolve_references(&self, value: &mut Value) -> Result<bool, StoreError> {
        match value {
            Value::Object(object) => {
                let mut resolved = true;
                for (key, child) in object.iter_mut() {
                    if key == "reference" {
                        if let Value::String(reference) = child {
                            if let Some(uuid) = reference.strip_prefix("urn:uuid:") {
                                let target = match self.aliases.get(uuid).map_err(spill_error)? {
                                    Some(alias) => Some(alias),
                                    None => self.known.get(uuid).map_err(spill_error)?.map(|t| format!("{t}/{uuid}")),
                                };
                                match target {
                                    Some(target) => *reference = target,
                                    None => resolved = false,
                                }
                            }
                        }
                    } else {
                        resolved &= self.resolve_references(child)?;
                    }
                }
                Ok(resolved)
            }
            Value::Array(items) => {
                let mut resolved = true;
                for item in items {
                    resolved &= self.resolve_references(item)?;
                }
                Ok(resolved)
            }
            _ => Ok(true),
        }
    }

    /// Hands the pending batch to the writer thread (waiting while the previous one is still
    /// being written) and records the outcomes of batches committed meanwhile.
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.pending_bytes);
        // The next batch is about as long as this one: no growing from empty, a batch at a time.
        let capacity = self.pending.len();
        let pending = std::mem::replace(&mut self.pending, Vec::with_capacity(capacity));
        let mut locations = Vec::with_capacity(capacity);
        let mut batch = BulkBatch { ops: Vec::with_capacity(capacity), prepared: Vec::with_capacity(capacity) };
        for (location, op, prepared) in pending {
            locations.push(location);
            batch.ops.push(op);
            batch.prepared.push(prepared);
        }
        let writer = match &mut self.writer {
            Some(writer) => writer,
            None => {
                self.writer.insert(start_writer(self.store.clone(), self.tenant, self.owner.clone(), self.commit_bytes))
            }
        };
        if writer.batches.send((locations, batch, bytes)).is_err() {
            // The writer stopped at a store failure: its report is waiting to be read.
            self.record_reports()?;
            return Err(StoreError::Database("the import writer stopped".into()));
        }
        self.record_reports()
    }

    /// Takes in one report of the writer: outcomes wait for their commit; per-entry failures are
    /// recorded, the store's failure aborts.
    fn record(&mut self, report: WriterReport) -> Result<(), StoreError> {
        match report {
            WriterReport::Written(locations, batch, results) => {
                // Freed here, where it was built, not on the writer thread; only the outcomes
                // wait for the commit.
                drop(batch);
                self.uncommitted.push((locations, results));
            }
            WriterReport::Committed => {
                for (locations, results) in std::mem::take(&mut self.uncommitted) {
                    for (location, result) in locations.into_iter().zip(results) {
                        match result {
                            Ok(written) => self.summary.count(&written),
                            Err(error) => self.refuse(location, error.to_string()),
                        }
                    }
                }
            }
            WriterReport::Failed(error) => {
                self.uncommitted.clear();
                return Err(error);
            }
        }
        Ok(())
    }

    /// What is stored so far and the lines refused so far. After an error this is exactly what
    /// the import committed: batches are written in order, outcomes are counted only once their
    /// transaction committed, and the writer stops at the store's first failure.
    pub fn summary(&self) -> &ImportSummary {
        &self.summary
    }

    /// Writes everything still waiting (deferred lines last, with references that never
    /// resolved kept as they are) and returns the summary; after an error, see [`Importer::summary`].
    pub fn finish(&mut self) -> Result<ImportSummary, StoreError> {
        self.flush()?;
        let mut deferred = std::mem::take(&mut self.deferred).into_reader()?;
        while let Some((location, mut resource, size)) = deferred.next()? {
            self.resolve_references(&mut resource)?;
            self.size_hint = size;
            let queued = self.queue(location, resource);
            self.size_hint = ENTRY_BYTES;
            queued?;
        }
        self.flush()?;
        if let Some(writer) = self.writer.take() {
            let BatchWriter { batches, reports, thread } = writer;
            drop(batches);
            // The writer reports until it has written (and committed) everything, then ends.
            for report in reports.iter() {
                self.record(report)?;
            }
            thread.join().map_err(|_| StoreError::Database("the import writer panicked".into()))?;
            if !self.uncommitted.is_empty() {
                return Err(StoreError::Database("the import writer stopped".into()));
            }
        }
        Ok(std::mem::take(&mut self.summary))
    }
}

fn start_writer(store: Arc<dyn Store>, tenant: TenantId, owner: Option<String>, commit_bytes: usize) -> BatchWriter {
    // One batch waits while another is written: memory stays at a few batches.
    let (batches, incoming) = sync_channel::<Batch>(1);
    let (reports, reported) = channel::<WriterReport>();
    let thread = std::thread::spawn(move || {
        let mut source = WriterSource {
            incoming,
            reports,
            commit_bytes,
            uncommitted_bytes: 0,
            locations: None,
            written: Vec::new(),
            replay: Default::default(),
        };
        // Nothing is written after a failure, so what was committed before it is exactly what
        // the importer counted.
        if let Err(error) = store.write_bulk(tenant, owner.as_deref(), &mut source) {
            let _ = source.reports.send(WriterReport::Failed(error));
        }
    });
    BatchWriter { batches, reports: reported, thread }
}

/// The writer thread's side of [`Store::write_bulk`]: batches from the importer, reports back.
/// Written batches are kept until their commit (a rolled-back transaction's batches are written
/// again), then handed back with their outcomes.
struct WriterSource {
    incoming: Receiver<Batch>,
    reports: std::sync::mpsc::Sender<WriterReport>,
    commit_bytes: usize,
    /// JSON text bytes handed out since the last commit.
    uncommitted_bytes: usize,
    /// The locations of the batch being written.
    locations: Option<Vec<Location>>,
    /// Batches written since the last commit, with their outcomes.
    written: Vec<(Vec<Location>, BulkBatch, Outcomes)>,
    /// Batches of a rolled-back transaction, to hand out again before any new one.
    replay: std::collections::VecDeque<(Vec<Location>, BulkBatch)>,
}

impl BulkSource for WriterSource {
    fn next_batch(&mut self, wait: bool) -> Option<BulkBatch> {
        if let Some((locations, batch)) = self.replay.pop_front() {
            self.locations = Some(locations);
            return Some(batch);
        }
        let (locations, batch, bytes) = if wait {
            self.incoming.recv().ok()?
        } else if self.uncommitted_bytes < self.commit_bytes {
            // Only a batch that is already waiting: never wait with a transaction open.
            self.incoming.try_recv().ok()?
        } else {
            return None;
        };
        self.uncommitted_bytes += bytes;
        self.locations = Some(locations);
        Some(batch)
    }

    fn written(&mut self, batch: BulkBatch, mut results: Vec<Result<Written, StoreError>>) {
        // The stored text of each write, a copy of the batch's text, is not needed (the import
        // counts outcomes): dropped at once, on the thread that made it, not kept to the commit.
        for written in results.iter_mut().flatten() {
            written.body = None;
        }
        let locations = self.locations.take().unwrap_or_default();
        self.written.push((locations, batch, results));
    }

    fn committed(&mut self) {
        self.uncommitted_bytes = 0;
        for (locations, batch, results) in self.written.drain(..) {
            let _ = self.reports.send(WriterReport::Written(locations, batch, results));
        }
        let _ = self.reports.send(WriterReport::Committed);
    }

    fn rewind(&mut self) {
        self.uncommitted_bytes = 0;
        let rewound = self.written.drain(..).map(|(locations, batch, _)| (locations, batch));
        let replay: std::collections::VecDeque<_> = rewound.chain(self.replay.drain(..)).collect();
        self.replay = replay;
    }
}

/// Resources set aside until the end of a load, in arrival order, as one JSON line each
/// (`[source, line, resource]`): the first few in memory, the rest in an anonymous temporary
/// file, so a load whose every line waits (Synthea's per-type files reference types that come
/// later) keeps its memory whatever its size. They are kept as text, not as `Value`s, which take
/// several times their text: the memory held is the bytes counted.
#[derive(Default)]
struct Deferred {
    /// Lines kept in memory, at most `DEFERRED_BYTES` of them.
    memory: Vec<u8>,
    file: Option<std::io::BufWriter<std::fs::File>>,
    /// The line being written (reused).
    line: Vec<u8>,
    /// Resources spilled to the file (for tests).
    spilled: u64,
}

fn spill_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Database(format!("the import's temporary file: {error}"))
}

impl Deferred {
    fn push(&mut self, location: Location, resource: Value) -> Result<(), StoreError> {
        use std::io::Write;
        self.line.clear();
        serde_json::to_writer(&mut self.line, &(&location.source, location.line, &resource)).map_err(spill_error)?;
        drop(resource);
        self.line.push(b'\n');
        if self.file.is_none() && self.memory.len() + self.line.len() <= DEFERRED_BYTES {
            if self.memory.is_empty() {
                // Reserved once (only the pages written become resident): never grown past it.
                self.memory.reserve_exact(DEFERRED_BYTES);
            }
            self.memory.extend_from_slice(&self.line);
            return Ok(());
        }
        self.spilled += 1;
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(std::io::BufWriter::new(tempfile::tempfile().map_err(spill_error)?)),
        };
        file.write_all(&self.line).map_err(spill_error)
    }

    fn into_reader(self) -> Result<DeferredReader, StoreError> {
        use std::io::Seek;
        let file = match self.file {
            Some(file) => {
                let mut file = file.into_inner().map_err(|error| spill_error(error.error()))?;
                file.rewind().map_err(spill_error)?;
                Some(std::io::BufReader::new(file))
            }
            None => None,
        };
        Ok(DeferredReader { memory: std::io::Cursor::new(self.memory), file, line: self.line })
    }
}

struct DeferredReader {
    memory: std::io::Cursor<Vec<u8>>,
    file: Option<std::io::BufReader<std::fs::File>>,
    line: Vec<u8>,
}

impl DeferredReader {
    /// The next deferred resource, with its location and text size.
    fn next(&mut self) -> Result<Option<(Location, Value, usize)>, StoreError> {
        use std::io::BufRead;
        self.line.clear();
        if self.memory.read_until(b'\n', &mut self.line).map_err(spill_error)? == 0 {
            // The lines in memory are all read: freed before the file's are.
            if !self.memory.get_ref().is_empty() {
                self.memory = std::io::Cursor::new(Vec::new());
            }
            let Some(file) = &mut self.file else { return Ok(None) };
            if file.read_until(b'\n', &mut self.line).map_err(spill_error)? == 0 {
                return Ok(None);
            }
        }
        // Written by `push` from a parsed resource. Read back as a request body is (a plain
        // parse would respell an exponent, `1.50E2` as `1.50e+2`), so numbers keep their text.
        // (Not through `serde_json::from_value` either: it respells them too.)
        let parsed = bulkhead_fhir::parse_exact(&self.line).map_err(spill_error)?;
        let Value::Array(items) = parsed else { return Err(spill_error("a deferred line is not an array")) };
        let Ok([Value::String(source), line, resource]) = <[Value; 3]>::try_from(items) else {
            return Err(spill_error("a deferred line is not [source, line, resource]"));
        };
        let line = line.as_u64().ok_or_else(|| spill_error("a deferred line has no line number"))?;
        Ok(Some((Location { source, line }, resource, self.line.len())))
    }
}

/// The `'static` name of an R4 resource type.
fn static_type(name: &str) -> Option<&'static str> {
    let index = bulkhead_fhir::resource_type_index(name)?;
    Some(bulkhead_fhir::RESOURCE_TYPES[index])
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_store::sqlite::SqliteStore;
    use bulkhead_store::{Visibility, WriteMode};

    /// Writes `body` into the tenant `written` as one REST write does and checks that the tenant
    /// `imported` holds the same stored text, the `lastUpdated` stamps aside.
    fn assert_stored_as_rest_stores(
        store: &SqliteStore,
        (imported, written): (TenantId, TenantId),
        body: &Value,
        line: &str,
    ) {
        let (resource_type, id) = (body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
        let op =
            WriteOp::Update { resource_type: resource_type.into(), id: id.into(), body: body.clone(), if_match: None };
        store.write(written, None, &[op], WriteMode::Transaction).unwrap();
        let read = |tenant| store.read(tenant, &Visibility::Tenant, resource_type, id).unwrap().unwrap().body.unwrap();
        let without_stamps = |text: String| {
            let (head, rest) = text.split_once(r#""lastUpdated":""#).unwrap();
            format!("{head}{}", &rest[rest.find('"').unwrap()..])
        };
        assert_eq!(without_stamps(read(imported)), without_stamps(read(written)), "{line}");
    }

    /// Lines read through the tape are stored byte for byte as a REST write of the same body
    /// stores them, and refused with the words REST's validation gives.
    #[test]
    fn tape_lines_store_and_refuse_as_rest_does() {
        let lines = [
            r#"{"resourceType":"Patient","id":"p1","name":[{"text":"a \u00e9 \/ \"q\""}],"birthDate":"2000-01-01"}"#,
            r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p1"},"valueQuantity":{"value":1.50}}"#,
            r#" { "resourceType" : "Observation", "id":"o2", "meta":{"profile":["x"]}, "status":"final", "code":{"text":"y"} } "#,
            r#"{"resourceType":"Group","id":"g1","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/p1"}}]}"#,
            r#"{"resourceType":"Patient","id":"bad1","gender":"banana","foo":1}"#,
            r#"{"resourceType":"Observation","id":"bad2","status":"final","code":{"text":"x"},"subject":{"reference":"Nope/1"}}"#,
            r#"{"resourceType":"Group","id":"bad3","type":"person","actual":true,"member":[{"entity":{"reference":"Practitioner/x"}}]}"#,
            r#"{"resourceType":"Observation","id":"bad4","valueString":"a","valueBoolean":true}"#,
        ];
        let directory = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&directory.path().join("t.db")).unwrap());
        let (imported, written) = (store.create_tenant("i").unwrap().id, store.create_tenant("w").unwrap().id);
        let mut importer = Importer::new(store.clone(), imported, None, 100);
        for (index, line) in lines.iter().enumerate() {
            importer.add_line(Location { source: "t.ndjson".into(), line: index as u64 + 1 }, line.as_bytes()).unwrap();
        }
        let summary = importer.finish().unwrap();
        let mut refused = Vec::new();
        for line in lines {
            let body = parse_resource(line.as_bytes()).unwrap();
            let (resource_type, id) = (body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
            if let Err(error) = validate_resource(&body, resource_type, Some(id), 100, ValidationMode::Strict) {
                refused.push(describe_issues(&error.issues));
                continue;
            }
            assert_stored_as_rest_stores(&store, (imported, written), &body, line);
        }
        assert_eq!(summary.created, 4);
        let messages: Vec<String> = summary.errors.into_iter().map(|error| error.message).collect();
        assert_eq!(messages, refused);
        assert!(refused.iter().all(|message| !message.is_empty()));
    }

    /// Lines waiting for their targets past the in-memory budget go through the temporary file
    /// and come back in order, with their locations and their numbers' exact digits, and their
    /// references resolved.
    #[test]
    fn deferred_lines_past_the_memory_budget_are_spilled_and_resolved() {
        let directory = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&directory.path().join("t.db")).unwrap());
        let tenant = store.create_tenant("t").unwrap().id;
        let mut importer = Importer::new(store.clone(), tenant, None, 100);
        let patient = "0d4c7b2e-51a4-4f3c-8f7e-5b2a9c1d3e4f";
        let padding = "x".repeat(2_000);
        let count = 2 * DEFERRED_BYTES / 2_000 + 10;
        for index in 0..count {
            let line = format!(
                r#"{{"resourceType":"Observation","id":"o{index}","status":"final","code":{{"text":"{padding}"}},"subject":{{"reference":"urn:uuid:{patient}"}},"valueQuantity":{{"value":1.50E2}}}}"#
            );
            importer
                .add_line(Location { source: "obs.ndjson".into(), line: index as u64 + 1 }, line.as_bytes())
                .unwrap();
        }
        assert!(importer.deferred.spilled > 0, "some lines went to the file");
        assert!(!importer.deferred.memory.is_empty(), "the first ones stayed in memory");
        assert!(importer.deferred.memory.capacity() <= DEFERRED_BYTES, "the memory kept is the bytes counted");
        // One refused line among the spilled ones keeps its location.
        importer
            .add_line(
                Location { source: "bad.ndjson".into(), line: 7 },
                format!(
                    r#"{{"resourceType":"Observation","id":"bad","subject":{{"reference":"urn:uuid:{patient}"}}}}"#
                )
                .as_bytes(),
            )
            .unwrap();
        let patient_line = format!(r#"{{"resourceType":"Patient","id":"{patient}"}}"#);
        importer.add_line(Location { source: "patients.ndjson".into(), line: 1 }, patient_line.as_bytes()).unwrap();
        let summary = importer.finish().unwrap();
        assert_eq!(summary.created, count as u64 + 1);
        assert_eq!(summary.failed, 1);
        assert_eq!(summary.errors[0].location, Location { source: "bad.ndjson".into(), line: 7 });
        for index in [0, count / 2, count - 1] {
            let stored = store.read(tenant, &Visibility::Tenant, "Observation", &format!("o{index}")).unwrap().unwrap();
            let body = stored.body.unwrap();
            assert!(body.contains(&format!(r#""reference":"Patient/{patient}""#)), "o{index}: {body}");
            assert!(body.contains(r#""value":1.50E2"#), "o{index}: {body}");
        }
    }

    /// Of Bundle fullUrls, only a `urn:uuid:` whose uuid is not its resource's id is kept (the
    /// only kind a reference is looked up by): an absolute fullUrl is not, and references
    /// resolve as they always did. An absolute one stays as written, `urn:uuid:<id>` finds its
    /// id, an alias its target.
    #[test]
    fn only_urn_uuid_full_urls_that_differ_from_the_id_are_kept() {
        let (alias, same) = ("0d4c7b2e-51a4-4f3c-8f7e-5b2a9c1d3e41", "0d4c7b2e-51a4-4f3c-8f7e-5b2a9c1d3e42");
        let observation = |id: &str, reference: &str| {
            serde_json::json!({"resource": {"resourceType": "Observation", "id": id, "status": "final",
                "code": {"text": "x"}, "subject": {"reference": reference}}})
        };
        let bundle = serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": "http://example.org/fhir/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1"}},
            {"fullUrl": format!("urn:uuid:{alias}"), "resource": {"resourceType": "Patient", "id": "p2"}},
            {"fullUrl": format!("urn:uuid:{same}"), "resource": {"resourceType": "Patient", "id": same}},
            observation("o1", "http://example.org/fhir/Patient/p1"),
            observation("o2", "urn:uuid:p1"),
            observation("o3", &format!("urn:uuid:{alias}")),
            observation("o4", &format!("urn:uuid:{same}")),
        ]});
        let directory = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&directory.path().join("t.db")).unwrap());
        let tenant = store.create_tenant("t").unwrap().id;
        let mut importer = Importer::new(store.clone(), tenant, None, 100);
        importer.add_bundle("b.json", bundle).unwrap();
        assert_eq!(importer.aliases.in_memory(), 1, "only the urn:uuid fullUrl of p2 is kept");
        let summary = importer.finish().unwrap();
        assert_eq!((summary.created, summary.failed), (7, 0), "{:?}", summary.errors);
        for (id, subject) in [
            ("o1", "http://example.org/fhir/Patient/p1".to_owned()),
            ("o2", "Patient/p1".to_owned()),
            ("o3", "Patient/p2".to_owned()),
            ("o4", format!("Patient/{same}")),
        ] {
            let body = store.read(tenant, &Visibility::Tenant, "Observation", id).unwrap().unwrap().body.unwrap();
            assert!(body.contains(&format!(r#""subject":{{"reference":"{subject}"}}"#)), "{id}: {body}");
        }
    }

    /// Lines whose `urn:uuid:` references are rewritten go through a `Value`, which is not kept:
    /// their batch holds the prepared text, as for any other line, and they are stored as REST
    /// stores the rewritten body; re-importing them finds them unchanged. A body whose `meta`
    /// has stamps (no template) is still written from its `Value`.
    #[test]
    fn rewritten_lines_are_batched_as_text_and_stored_as_rest_stores_them() {
        let patient = "0d4c7b2e-51a4-4f3c-8f7e-5b2a9c1d3e4f";
        let lines = [
            format!(
                r#"{{"resourceType":"Observation","id":"early","status":"final","code":{{"text":"é"}},"subject":{{"reference":"urn:uuid:{patient}"}},"valueQuantity":{{"value":1.50}}}}"#
            ),
            format!(r#"{{"resourceType":"Patient","id":"{patient}","birthDate":"2000-01-01"}}"#),
            format!(
                r#"{{"resourceType":"Observation","id":"late","status":"final","code":{{"text":"x"}},"subject":{{"reference":"urn:uuid:{patient}"}}}}"#
            ),
            format!(
                r#"{{"resourceType":"Observation","id":"stamped","meta":{{"versionId":"7"}},"status":"final","code":{{"text":"x"}},"subject":{{"reference":"urn:uuid:{patient}"}}}}"#
            ),
        ];
        let directory = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&directory.path().join("t.db")).unwrap());
        let (imported, written) = (store.create_tenant("i").unwrap().id, store.create_tenant("w").unwrap().id);
        let import = |lines: &[String]| {
            let mut importer = Importer::new(store.clone(), imported, None, 100);
            for (index, line) in lines.iter().enumerate() {
                let location = Location { source: "t.ndjson".into(), line: index as u64 + 1 };
                importer.add_line(location, line.as_bytes()).unwrap();
                if let Some((_, WriteOp::Update { id, body, .. }, prepared)) = importer.pending.last() {
                    let from_value = id == "stamped";
                    assert_eq!(body.is_null(), !from_value, "{id}: its batch holds its text, not its Value");
                    assert!(prepared.is_some());
                }
            }
            importer.finish().unwrap()
        };
        let summary = import(&lines);
        assert_eq!((summary.created, summary.failed), (4, 0), "{:?}", summary.errors);
        for line in &lines {
            let body = parse_resource(line.replace("urn:uuid:", "Patient/").as_bytes()).unwrap();
            assert_stored_as_rest_stores(&store, (imported, written), &body, line);
        }
        let again = import(&lines);
        assert_eq!((again.created, again.updated, again.unchanged), (0, 0, 4));
    }
}
