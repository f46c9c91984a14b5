//! New resources in bulk (imports, `$upload-ndjson`, large Bundles): every row of a batch of
//! new resources goes in with one `COPY ... FROM STDIN (FORMAT binary)` per table instead of
//! one statement per resource or one `INSERT ... SELECT unnest(...)` per table.
//!
//! What makes `COPY` possible where the single-write path uses `INSERT ... ON CONFLICT`:
//! - the resources' keys (`rid`) are taken from the table's identity sequence up front, in the
//!   order of the writes, so the index rows can be built before the resource rows go in;
//! - the resources are new (the `(tenant, type, id)` unique key refuses a `COPY` naming one that
//!   exists, under the clock's row lock, which every writer takes first, so no other writer can
//!   create them meanwhile) and their rows carry those new keys, so no index row can already
//!   exist; duplicates within one resource (an identifier listed twice) are removed here instead
//!   of by `ON CONFLICT DO NOTHING`.
//!
//! The rows are exactly those the single-write path writes (`put` in `resources.rs` and
//! `sync_references` in `associated/reference_index.rs`); the conformance test
//! `bulk_writes_index_exactly_as_single_writes` compares the two.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;

use bulkhead_fhir::references::OutgoingReference;
use bulkhead_fhir::{resource_type_code, Micros};
use postgres::error::SqlState;
use serde_json::Value;

use super::created_keys::CreatedKeys;
use super::resources::mark_patients_changed;
use super::Db;
use crate::plan_cache::raises_member_watermarks;
use crate::write::write_stamped_json;
use crate::{PreparedWrite, StoreError, TenantId, WriteOp, Written};

/// Bytes of encoded rows handed to the driver at a time: one call into its runtime per chunk
/// instead of one per row, and PostgreSQL works through a chunk while the next is encoded.
const CHUNK: usize = 256 * 1024;

/// How a `COPY` failed: the driver's error, or its error wrapped by the writer's `io::Write`.
enum CopyError {
    Postgres(postgres::Error),
    Io(std::io::Error),
}

impl CopyError {
    /// The database error behind this failure, if any.
    fn database(&self) -> Option<&postgres::error::DbError> {
        match self {
            CopyError::Postgres(error) => error.as_db_error(),
            CopyError::Io(error) => {
                error.get_ref().and_then(|inner| inner.downcast_ref::<postgres::Error>()).and_then(|e| e.as_db_error())
            }
        }
    }

    /// A row named a key that exists (`unique_violation`).
    fn is_unique_violation(&self) -> bool {
        self.database().is_some_and(|error| *error.code() == SqlState::UNIQUE_VIOLATION)
    }
}

impl From<postgres::Error> for CopyError {
    fn from(error: postgres::Error) -> Self {
        CopyError::Postgres(error)
    }
}

impl From<CopyError> for StoreError {
    fn from(error: CopyError) -> Self {
        match error {
            CopyError::Postgres(error) => error.into(),
            CopyError::Io(error) => match error.into_inner().map(|inner| inner.downcast::<postgres::Error>()) {
                Some(Ok(error)) => (*error).into(),
                Some(Err(other)) => StoreError::Unavailable(other.to_string()),
                None => StoreError::Unavailable("the COPY stream failed".into()),
            },
        }
    }
}

/// A binary `COPY ... FROM STDIN` in progress, its rows encoded here in PostgreSQL's binary
/// copy format (a header, then per row a field count and each field as a length and its bytes
/// in network order, `-1` for NULL, then a `-1` trailer).
struct CopyIn<'t> {
    writer: postgres::CopyInWriter<'t>,
    buffer: Vec<u8>,
}

impl<'t> CopyIn<'t> {
    /// Starts `copy` (a `COPY table (columns) FROM STDIN (FORMAT binary)`) in the open transaction.
    fn start(db: &'t mut Db<'_>, copy: &str) -> Result<CopyIn<'t>, CopyError> {
        let writer = db.transaction.copy_in(copy)?;
        let mut buffer = Vec::with_capacity(CHUNK + 64 * 1024);
        // Signature, flags (no OIDs), header extension length.
        buffer.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buffer.extend_from_slice(&0i32.to_be_bytes());
        buffer.extend_from_slice(&0i32.to_be_bytes());
        Ok(CopyIn { writer, buffer })
    }

    fn row(&mut self, fields: i16) {
        self.buffer.extend_from_slice(&fields.to_be_bytes());
    }

    fn int8(&mut self, value: i64) {
        self.buffer.extend_from_slice(&8i32.to_be_bytes());
        self.buffer.extend_from_slice(&value.to_be_bytes());
    }

    fn int2(&mut self, value: i16) {
        self.buffer.extend_from_slice(&2i32.to_be_bytes());
        self.buffer.extend_from_slice(&value.to_be_bytes());
    }

    fn bool(&mut self, value: bool) {
        self.buffer.extend_from_slice(&1i32.to_be_bytes());
        self.buffer.push(u8::from(value));
    }

    fn null(&mut self) {
        self.buffer.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn text(&mut self, value: &str) -> Result<(), StoreError> {
        let length = i32::try_from(value.len()).map_err(|_| StoreError::Invalid("a value is too large".into()))?;
        self.buffer.extend_from_slice(&length.to_be_bytes());
        self.buffer.extend_from_slice(value.as_bytes());
        Ok(())
    }

    fn opt_text(&mut self, value: Option<&str>) -> Result<(), StoreError> {
        match value {
            Some(value) => self.text(value)?,
            None => self.null(),
        }
        Ok(())
    }

    fn opt_int8(&mut self, value: Option<i64>) {
        match value {
            Some(value) => self.int8(value),
            None => self.null(),
        }
    }

    /// A text field whose bytes `write` appends to the buffer; returns where they are in it
    /// (valid until the row ends).
    fn text_with(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<std::ops::Range<usize>, StoreError> {
        let at = self.buffer.len();
        self.buffer.extend_from_slice(&0i32.to_be_bytes());
        write(&mut self.buffer)?;
        let length = i32::try_from(self.buffer.len() - at - 4)
            .map_err(|_| StoreError::Invalid("a resource is too large".into()))?;
        self.buffer[at..at + 4].copy_from_slice(&length.to_be_bytes());
        Ok(at + 4..self.buffer.len())
    }

    /// Ends a row: a full chunk goes to the server.
    fn end_row(&mut self) -> Result<(), CopyError> {
        if self.buffer.len() >= CHUNK {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), CopyError> {
        self.writer.write_all(&self.buffer).map_err(CopyError::Io)?;
        self.writer.flush().map_err(CopyError::Io)?;
        self.buffer.clear();
        Ok(())
    }

    /// Sends the trailer and waits for the server: the rows written.
    fn finish(mut self) -> Result<u64, CopyError> {
        self.buffer.extend_from_slice(&(-1i16).to_be_bytes());
        self.send()?;
        Ok(self.writer.finish()?)
    }
}

/// Either error of a step that encodes rows (`StoreError`) and streams them (`CopyError`).
enum Failure {
    Copy(CopyError),
    Store(StoreError),
}

impl From<CopyError> for Failure {
    fn from(error: CopyError) -> Self {
        Failure::Copy(error)
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure::Store(error)
    }
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Copy(error) => error.into(),
            Failure::Store(error) => error,
        }
    }
}

/// A new resource chosen for the bulk path: its index in the ops, type, id, body, what its rows
/// derive from the body, stored text and key.
struct New<'a> {
    index: usize,
    resource_type: &'a str,
    code: i16,
    id: &'a str,
    /// The op's body: a placeholder (`Value::Null`) when `prepared` is detached, whose template
    /// is then the body's text.
    body: &'a Value,
    /// Compartments, references, search tokens and (mostly) the stamp template: prepared by the
    /// caller (a bulk load, on its own thread), else computed here from `body`.
    prepared: Cow<'a, PreparedWrite>,
    text: String,
    rid: i64,
}

/// Creates, with one `COPY` per table, every resource of `ops` that is new: a create or
/// unconditional update of a `(type, id)` the tenant does not have and that no other op of the
/// list names (Groups excepted: their membership history goes through the single-write path).
/// Such a write cannot fail on its own, so batch and transaction agree. Returns each one's
/// index in `ops` and result; any database error fails the whole write (its transaction is
/// rolled back, nothing of it stays).
///
/// `prepared[i]`, when present, is what `ops[i]`'s rows derive from its body
/// ([`crate::Store::write_prepared`]): its rows and text are taken from it, and a detached op's
/// placeholder body is never parsed back.
///
/// `created`, in a bulk load, holds the keys of the resources the load created in earlier
/// batches: Provenance targets among them are not probed, and the resources created here are
/// noted in it.
pub(super) fn insert_new<'a>(
    db: &mut Db<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    ops: &'a [WriteOp],
    prepared: &'a [Option<PreparedWrite>],
    timestamp: Micros,
    mut created: Option<&mut CreatedKeys>,
) -> Result<Vec<(usize, Written)>, StoreError> {
    let mut named: HashMap<(&str, &str), usize> = HashMap::with_capacity(ops.len());
    for op in ops {
        *named.entry((op.resource_type(), op.id())).or_default() += 1;
    }
    let mut chosen: Vec<New<'a>> = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        let body = match op {
            WriteOp::Create { body, .. } | WriteOp::Update { body, if_match: None, .. } => body,
            _ => continue,
        };
        let (resource_type, id) = (op.resource_type(), op.id());
        // A type outside R4 cannot be indexed: the single-write path fails that entry alone.
        let Some(code) = resource_type_code(resource_type).and_then(|code| i16::try_from(code).ok()) else { continue };
        if resource_type == "Group" || named[&(resource_type, id)] > 1 {
            continue;
        }
        let prepared = match prepared.get(index).and_then(Option::as_ref) {
            Some(prepared) => Cow::Borrowed(prepared),
            None => Cow::Owned(PreparedWrite::new(resource_type, id, body)),
        };
        chosen.push(New { index, resource_type, code, id, body, prepared, text: String::new(), rid: 0 });
    }
    if chosen.is_empty() {
        return Ok(Vec::new());
    }

    // Keys in the order of the writes, as the identity default would have given them: one block
    // of the sequence, taken with one call (not one `nextval` per resource). Every insert into
    // `resources` runs under the clock's row lock (`PgStore::with_write`), so no other writer
    // takes values between the `nextval` and the `setval`.
    let count = chosen.len() as i64;
    let last: i64 = db
        .query_one(
            "SELECT setval(s, nextval(s) + $1 - 1) FROM CAST(pg_get_serial_sequence('resources', 'rid') AS regclass) AS s",
            &[&count],
        )?
        .try_get(0)?;
    let first = last - count + 1;
    for (new, rid) in chosen.iter_mut().zip(first..) {
        new.rid = rid;
    }

    // Bulk writes are mostly of new resources (an import of new data), so the rows go in without
    // looking for existing ones first: when one exists, the unique key `(tenant, type, id)`
    // refuses the `COPY`, which is undone to the savepoint; then the existing ones are looked up
    // and left to the single-write path, and the others are copied again.
    // No JIT compilation in this transaction: the key lookups of a large batch are estimated
    // costly enough to be compiled (~100 ms a statement) though they are plain index probes.
    db.batch("SET LOCAL jit = off; SAVEPOINT bulk_new")?;
    match copy_resources(db, tenant, owner, &mut chosen, timestamp) {
        Ok(()) => db.batch("RELEASE SAVEPOINT bulk_new")?,
        Err(Failure::Copy(error)) if error.is_unique_violation() => {
            db.batch("ROLLBACK TO SAVEPOINT bulk_new; RELEASE SAVEPOINT bulk_new")?;
            let keys: Vec<(&str, &str)> = chosen.iter().map(|new| (new.resource_type, new.id)).collect();
            let stored = stored_keys(db, tenant, keys)?;
            chosen.retain(|new| !stored.contains_key(&(new.resource_type, new.id)));
            if chosen.is_empty() {
                return Ok(Vec::new());
            }
            // The block's first keys, still in the order of the writes: the undone rows hold none.
            for (new, rid) in chosen.iter_mut().zip(first..) {
                new.rid = rid;
            }
            copy_resources(db, tenant, owner, &mut chosen, timestamp)?;
        }
        Err(failure) => return Err(failure.into()),
    }

    copy_compartments(db, tenant, owner, &chosen, timestamp)?;
    copy_search_tokens(db, tenant, &chosen)?;
    if let Some(created) = created.as_deref_mut() {
        created.check_removals(db, tenant)?;
    }
    copy_references(db, tenant, &chosen, timestamp, created.as_deref())?;
    // Target rows without a key (a Provenance written before its target) are few and have an
    // index of their own: one probe says whether this batch's resources can resolve any. (In
    // index order with a limit, so the planner reads that index, whatever it estimates; under
    // `EXISTS` it may scan the table for a row that is not there.)
    let unresolved: bool = db
        .query_one(
            "SELECT (SELECT true FROM reference_index
                     WHERE tenant_id = $1 AND provenance_target AND target_rid IS NULL
                     ORDER BY target_type, target_id LIMIT 1) IS NOT NULL",
            &[&tenant.0],
        )?
        .try_get(0)?;
    if unresolved {
        let types: Vec<&str> = chosen.iter().map(|new| new.resource_type).collect();
        let ids: Vec<&str> = chosen.iter().map(|new| new.id).collect();
        let new_rids: Vec<i64> = chosen.iter().map(|new| new.rid).collect();
        super::associated::resolve_new_targets(db, tenant, &types, &ids, &new_rids)?;
    }
    if let Some(created) = created {
        for new in &chosen {
            created.created(new.code, new.id, new.rid);
        }
    }
    Ok(chosen
        .into_iter()
        .map(|new| {
            let written = Written {
                resource_type: new.resource_type.to_owned(),
                id: new.id.to_owned(),
                version: 1,
                last_updated: timestamp,
                created: true,
                deleted: false,
                changed: true,
                body: Some(new.text),
            };
            (new.index, written)
        })
        .collect())
}

/// The resource rows of `chosen`, each body stamped (version 1 at `timestamp`) straight into
/// the `COPY` stream and kept as the write's result.
fn copy_resources(
    db: &mut Db<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    chosen: &mut [New<'_>],
    timestamp: Micros,
) -> Result<(), Failure> {
    let mut copy = CopyIn::start(
        db,
        "COPY resources (tenant_id, rid, resource_type, id, version, last_updated, deleted, owner, body)
         FROM STDIN (FORMAT binary)",
    )?;
    for new in chosen.iter_mut() {
        copy.row(9);
        copy.int8(tenant.0);
        copy.int8(new.rid);
        copy.text(new.resource_type)?;
        copy.text(new.id)?;
        copy.int8(1);
        copy.int8(timestamp);
        copy.bool(false);
        copy.opt_text(owner)?;
        match &new.prepared.template {
            // The template's text is the body's (detached or not) up to the stamps.
            Some(template) => {
                new.text = template.stamp(1, timestamp);
                copy.text(&new.text)?;
            }
            // A body whose `meta` has stamps already has no template (and is never detached).
            None => {
                let (body, id) = (new.body, new.id);
                let text = copy.text_with(|out| Ok(write_stamped_json(out, body, id, 1, timestamp)?))?;
                // serde_json writes valid UTF-8.
                new.text = String::from_utf8_lossy(&copy.buffer[text]).into_owned();
            }
        }
        copy.end_row()?;
    }
    copy.finish()?;
    Ok(())
}

/// The compartment rows of the new resources (one per patient compartment a resource is in,
/// open from `timestamp`), and the patients' change watermarks.
fn copy_compartments(
    db: &mut Db<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    chosen: &[New<'_>],
    timestamp: Micros,
) -> Result<(), StoreError> {
    // (patient, type code, rid, whether the row raises the patient's watermark: not a Group's);
    // `patient_compartments_of` lists each patient once.
    let mut rows: Vec<(&str, i16, i64, bool)> = Vec::new();
    for new in chosen {
        let raises = raises_member_watermarks(new.resource_type);
        for patient in &new.prepared.patients {
            rows.push((patient, new.code, new.rid, raises));
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let mut patients: Vec<&str> = rows.iter().map(|row| row.0).collect();
    patients.sort_unstable();
    patients.dedup();
    let pkeys = patient_keys(db, tenant, &patients)?;
    let mut copy = CopyIn::start(
        db,
        "COPY compartment (tenant_id, pkey, type_code, rid, from_ts, last_updated, deleted, owner)
         FROM STDIN (FORMAT binary)",
    )?;
    for (patient, code, rid, _) in &rows {
        let pkey = *pkeys
            .get(patient)
            .ok_or_else(|| StoreError::Database("a patient key is missing after its insert".into()))?;
        copy.row(8);
        copy.int8(tenant.0);
        copy.int8(pkey);
        copy.int2(*code);
        copy.int8(*rid);
        copy.int8(timestamp);
        copy.int8(timestamp);
        copy.bool(false);
        copy.opt_text(owner)?;
        copy.end_row()?;
    }
    copy.finish()?;
    let mut changed: Vec<i64> = rows.iter().filter(|row| row.3).filter_map(|row| pkeys.get(row.0).copied()).collect();
    changed.sort_unstable();
    changed.dedup();
    mark_patients_changed(db, tenant, &changed, timestamp)
}

/// The tenant's keys of `patients` (sorted, distinct), each created on first mention: one read
/// when all exist (the usual case past a load's first batches), else an insert of the missing.
fn patient_keys<'p>(
    db: &mut Db<'_>,
    tenant: TenantId,
    patients: &[&'p str],
) -> Result<HashMap<&'p str, i64>, StoreError> {
    let mut keys = read_patient_keys(db, tenant, patients)?;
    let missing: Vec<&str> = patients.iter().copied().filter(|patient| !keys.contains_key(patient)).collect();
    if !missing.is_empty() {
        db.execute(
            "INSERT INTO patient_keys (tenant_id, patient_id) SELECT $1, p FROM unnest($2::text[]) AS p
             ON CONFLICT DO NOTHING",
            &[&tenant.0, &missing],
        )?;
        keys.extend(read_patient_keys(db, tenant, &missing)?);
    }
    Ok(keys)
}

/// The keys of those of `patients` that have one: one index probe each (a scalar subquery, so
/// the planner never scans the tenant's whole table instead: as a join, planned for the list's
/// real length, it hashed the list against a scan of every patient key, 2.7 ms a batch at 10,000
/// patients against 1.1 ms probed, and growing with the tenant).
fn read_patient_keys<'p>(
    db: &mut Db<'_>,
    tenant: TenantId,
    patients: &[&'p str],
) -> Result<HashMap<&'p str, i64>, StoreError> {
    let rows = db.query(
        "SELECT n.ord, (SELECT k.pkey FROM patient_keys k WHERE k.tenant_id = $1 AND k.patient_id = n.patient_id)
         FROM unnest($2::text[]) WITH ORDINALITY AS n(patient_id, ord)",
        &[&tenant.0, &patients],
    )?;
    let mut keys = HashMap::with_capacity(rows.len());
    for row in &rows {
        let Some(pkey) = row.try_get::<_, Option<i64>>(1)? else { continue };
        let ord: i64 = row.try_get(0)?;
        let patient = usize::try_from(ord - 1)
            .ok()
            .and_then(|index| patients.get(index))
            .ok_or_else(|| StoreError::Database("a patient key row names no patient".into()))?;
        keys.insert(*patient, pkey);
    }
    Ok(keys)
}

/// The keys of those `(type, id)` pairs that have a resource row (deleted or not): one index
/// probe per pair, in key order (a scalar subquery, so the planner never turns it into a scan
/// of the whole table hashed against the list).
fn stored_keys<'k>(
    db: &mut Db<'_>,
    tenant: TenantId,
    mut keys: Vec<(&'k str, &'k str)>,
) -> Result<HashMap<(&'k str, &'k str), i64>, StoreError> {
    keys.sort_unstable();
    keys.dedup();
    let (types, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    let rows = db.query(
        "SELECT n.ord, (SELECT r.rid FROM resources r
                        WHERE r.tenant_id = $1 AND r.resource_type = n.resource_type AND r.id = n.id)
         FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS n(resource_type, id, ord)",
        &[&tenant.0, &types, &ids],
    )?;
    let mut stored = HashMap::with_capacity(rows.len());
    for row in &rows {
        let Some(rid) = row.try_get::<_, Option<i64>>(1)? else { continue };
        let ord: i64 = row.try_get(0)?;
        let key = usize::try_from(ord - 1)
            .ok()
            .and_then(|index| keys.get(index))
            .ok_or_else(|| StoreError::Database("a key row names no resource".into()))?;
        stored.insert(*key, rid);
    }
    Ok(stored)
}

/// The search tokens of the new resources, each distinct token of a resource once.
fn copy_search_tokens(db: &mut Db<'_>, tenant: TenantId, chosen: &[New<'_>]) -> Result<(), StoreError> {
    let mut rows: Vec<(i16, &'static str, &str, &str, i64)> = Vec::new();
    let mut tokens: Vec<(&'static str, &str, &str)> = Vec::new();
    for new in chosen {
        tokens.clear();
        tokens
            .extend(new.prepared.tokens.iter().map(|(param, system, value)| (*param, system.as_str(), value.as_str())));
        tokens.sort_unstable();
        tokens.dedup();
        rows.extend(tokens.iter().map(|&(param, system, value)| (new.code, param, system, value, new.rid)));
    }
    if rows.is_empty() {
        return Ok(());
    }
    let mut copy = CopyIn::start(
        db,
        "COPY search_token (tenant_id, type_code, param, system, value, rid) FROM STDIN (FORMAT binary)",
    )?;
    for (code, param, system, value, rid) in &rows {
        copy.row(6);
        copy.int8(tenant.0);
        copy.int2(*code);
        copy.text(param)?;
        copy.text(system)?;
        copy.text(value)?;
        copy.int8(*rid);
        copy.end_row()?;
    }
    copy.finish()?;
    Ok(())
}

/// The reference-index rows of the new resources (open from `timestamp`). A Provenance
/// target's row carries its target's key when the target's row exists: one of this batch, one
/// the load created before (`created`), or one already stored (deleted or not), as the
/// single-write path's insert looks it up.
fn copy_references(
    db: &mut Db<'_>,
    tenant: TenantId,
    chosen: &[New<'_>],
    timestamp: Micros,
    created: Option<&CreatedKeys>,
) -> Result<(), StoreError> {
    // (rid, reference); each resource's references sorted and distinct (`outgoing_references`).
    let mut rows: Vec<(i64, &OutgoingReference)> = Vec::new();
    let mut referencing: Vec<&str> = Vec::new();
    for new in chosen {
        let references = &new.prepared.references;
        if references.iter().any(|reference| !reference.provenance_target) && !referencing.contains(&new.resource_type)
        {
            referencing.push(new.resource_type);
        }
        rows.extend(references.iter().map(|reference| (new.rid, reference)));
    }
    super::associated::note_referencing_types(db, tenant, &referencing)?;
    if rows.is_empty() {
        return Ok(());
    }
    // Provenance targets' keys: those of this batch, those the load created before, then the
    // other stored ones, looked up at once.
    let mut targets: HashMap<(&str, &str), i64> = HashMap::new();
    if rows.iter().any(|(_, reference)| reference.provenance_target) {
        targets = chosen.iter().map(|new| ((new.resource_type, new.id), new.rid)).collect();
        let mut elsewhere: Vec<(&str, &str)> = Vec::new();
        for (_, reference) in rows.iter().filter(|(_, reference)| reference.provenance_target) {
            let key = (reference.target_type.as_str(), reference.target_id.as_str());
            if targets.contains_key(&key) {
                continue;
            }
            match created.and_then(|created| created.get(key.0, key.1)) {
                Some(rid) => {
                    targets.insert(key, rid);
                }
                None => elsewhere.push(key),
            }
        }
        if !elsewhere.is_empty() {
            let stored = stored_keys(db, tenant, elsewhere)?;
            targets.extend(stored);
        }
    }
    let mut copy = CopyIn::start(
        db,
        "COPY reference_index (tenant_id, rid, provenance_target, target_type, target_id, from_ts, target_rid)
         FROM STDIN (FORMAT binary)",
    )?;
    for (rid, reference) in &rows {
        let target_rid = match reference.provenance_target {
            true => targets.get(&(reference.target_type.as_str(), reference.target_id.as_str())).copied(),
            false => None,
        };
        copy.row(7);
        copy.int8(tenant.0);
        copy.int8(*rid);
        copy.bool(reference.provenance_target);
        copy.text(&reference.target_type)?;
        copy.text(&reference.target_id)?;
        copy.int8(timestamp);
        copy.opt_int8(target_rid);
        copy.end_row()?;
    }
    copy.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::PgStore;
    use crate::{PreparedWrite, Store, TenantId, Visibility, WriteMode, WriteOp};

    fn put(store: &PgStore, tenant: TenantId, body: Value) {
        let (resource_type, id) =
            (body["resourceType"].as_str().unwrap().to_owned(), body["id"].as_str().unwrap().to_owned());
        let op = WriteOp::Update { resource_type, id, body, if_match: None };
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    }

    /// A body large enough for PostgreSQL to compress.
    fn large(id: &str) -> Value {
        json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x".repeat(20_000)},
               "subject": {"reference": "Patient/a"}})
    }

    fn compression(store: &PgStore, tenant: TenantId, id: &str) -> String {
        store
            .with_read(|db| {
                let row = db.query_one(
                    "SELECT pg_column_compression(body) FROM resources WHERE tenant_id = $1 AND id = $2",
                    &[&tenant.0, &id],
                )?;
                Ok(row.try_get::<_, Option<String>>(0)?.unwrap_or_default())
            })
            .unwrap()
    }

    /// Migration 11 keeps every body and every Provenance found by target: bodies compressed
    /// before it (pglz) read back as written, new ones are compressed with LZ4 where the server
    /// has it, and the index on target text is gone.
    #[test]
    fn migration_11_keeps_bodies_and_provenance_by_target() {
        let Some(database) = super::super::testing::fresh_database() else { return };
        let options = super::super::testing::test_options;
        let store = PgStore::open(&database.url, options()).unwrap();
        // The schema before migration 11.
        store
            .with_transaction(|db| {
                db.batch(
                    "ALTER TABLE resources ALTER COLUMN body SET COMPRESSION pglz;
                     ALTER TABLE resource_history ALTER COLUMN body SET COMPRESSION pglz;
                     CREATE INDEX provenance_by_target ON reference_index (tenant_id, target_type, target_id)
                         WHERE provenance_target;
                     DELETE FROM schema_migrations WHERE version >= 11;",
                )
            })
            .unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        put(&store, tenant, json!({"resourceType": "Patient", "id": "a"}));
        put(&store, tenant, large("old"));
        let provenance = json!({"resourceType": "Provenance", "id": "p1", "recorded": "2020-01-01T00:00:00Z",
            "target": [{"reference": "Observation/old"}, {"reference": "Observation/later"}],
            "agent": [{"who": {"reference": "Practitioner/x"}}]});
        put(&store, tenant, provenance);
        assert_eq!(compression(&store, tenant, "old"), "pglz");
        let read = |store: &PgStore, id: &str| store.read(tenant, &Visibility::Tenant, "Observation", id).unwrap();
        let old = read(&store, "old").expect("stored");
        let at = store.reserve_transaction_time().unwrap();
        let targets = |ids: &[&str]| -> Vec<(String, String)> {
            ids.iter().map(|id| ("Observation".to_owned(), (*id).to_owned())).collect()
        };
        let found = |store: &PgStore, ids: &[&str]| store.provenance_targeting(tenant, &targets(ids), at).unwrap();
        assert_eq!(found(&store, &["old"]), ["p1"]);
        assert_eq!(found(&store, &["later"]), ["p1"]);
        drop(store);

        let store = PgStore::open(&database.url, options()).unwrap();
        let lz4 = crate::postgres::testing::has_lz4(&store);
        let index: bool = store
            .with_read(|db| {
                Ok(db.query_one("SELECT to_regclass('provenance_by_target') IS NOT NULL", &[])?.try_get(0)?)
            })
            .unwrap();
        assert!(!index, "the index on target text is dropped");
        assert_eq!(read(&store, "old"), Some(old), "a body compressed before the migration reads back as written");
        assert_eq!(compression(&store, tenant, "old"), "pglz", "stored bodies are not rewritten");
        assert_eq!(
            (found(&store, &["old"]), found(&store, &["later", "old"])),
            (vec!["p1".to_owned()], vec!["p1".to_owned()])
        );
        put(&store, tenant, large("new"));
        assert_eq!(compression(&store, tenant, "new"), if lz4 { "lz4" } else { "pglz" });
        let new = read(&store, "new").expect("stored").body.expect("a body");
        assert!(new.contains(&"x".repeat(20_000)) && new.contains(r#""id":"new""#));
    }

    /// Every row of `tenant` as text, keys replaced by what they name (type and id, patient id)
    /// and times by whether they are the resource's own: comparable across tenants and writes
    /// (keys' order is compared by `bulk_writes_index_exactly_as_single_writes`).
    fn rows(store: &PgStore, tenant: TenantId) -> Vec<String> {
        let queries = [
            "SELECT concat_ws('|', resource_type, id, version, deleted, owner,
                              regexp_replace(body, '\"lastUpdated\":\"[^\"]*\"', '\"lastUpdated\":\"T\"'))
             FROM resources WHERE tenant_id = $1 ORDER BY 1",
            "SELECT concat_ws('|', k.patient_id, c.type_code, r.resource_type, r.id, c.from_ts = r.last_updated,
                              c.to_ts IS NULL, c.last_updated = r.last_updated, c.deleted, c.owner)
             FROM compartment c JOIN patient_keys k ON k.tenant_id = c.tenant_id AND k.pkey = c.pkey
             JOIN resources r ON r.tenant_id = c.tenant_id AND r.rid = c.rid WHERE c.tenant_id = $1 ORDER BY 1",
            "SELECT concat_ws('|', s.type_code, s.param, s.system, s.value, r.resource_type, r.id)
             FROM search_token s JOIN resources r ON r.tenant_id = s.tenant_id AND r.rid = s.rid
             WHERE s.tenant_id = $1 ORDER BY 1",
            "SELECT concat_ws('|', r.resource_type, r.id, x.provenance_target, x.target_type, x.target_id,
                              x.from_ts = r.last_updated, x.to_ts IS NULL, t.resource_type, t.id)
             FROM reference_index x JOIN resources r ON r.tenant_id = x.tenant_id AND r.rid = x.rid
             LEFT JOIN resources t ON t.tenant_id = x.tenant_id AND t.rid = x.target_rid
             WHERE x.tenant_id = $1 ORDER BY 1",
            "SELECT concat_ws('|', patient_id, changed_at > 0) FROM patient_keys WHERE tenant_id = $1 ORDER BY 1",
            "SELECT concat_ws('|', resource_type) FROM referencing_types WHERE tenant_id = $1 ORDER BY 1",
            "SELECT concat_ws('|', resource_type) FROM associated_type_changes WHERE tenant_id = $1 ORDER BY 1",
            "SELECT concat_ws('|', g.id, k.patient_id, m.removed_at IS NULL) FROM group_membership m
             JOIN resources g ON g.tenant_id = m.tenant_id AND g.rid = m.group_rid
             JOIN patient_keys k ON k.tenant_id = m.tenant_id AND k.pkey = m.pkey WHERE m.tenant_id = $1 ORDER BY 1",
        ];
        store
            .with_read(|db| {
                let mut out = Vec::new();
                for query in queries {
                    out.push(format!("-- {}", query.split_whitespace().take(4).collect::<Vec<_>>().join(" ")));
                    for row in db.query(query, &[&tenant.0])? {
                        out.push(row.try_get(0)?);
                    }
                }
                Ok(out)
            })
            .unwrap()
    }

    /// A bulk write with its ops prepared ahead, as an import prepares them (most detached from
    /// a tape of their line, their op's body a placeholder; one prepared from its `Value`; one
    /// not prepared), stores and indexes exactly what the plain write of the same resources
    /// does, and what writing them one at a time does, including the ops the bulk path leaves
    /// to single writes (an existing resource, a Group, an id named twice), whose bodies come
    /// from their templates.
    #[test]
    fn prepared_bulk_writes_store_what_plain_bulk_writes_store() {
        let Some(database) = super::super::testing::fresh_database() else { return };
        let store = PgStore::open(&database.url, super::super::testing::test_options()).unwrap();
        let lines = [
            r#"{"resourceType":"Provenance","id":"early","recorded":"2020-01-01T00:00:00Z","target":[{"reference":"Observation/o1"},{"reference":"Observation/before"},{"reference":"Observation/nowhere"}],"agent":[{"who":{"reference":"Practitioner/dr"}}]}"#,
            r#"{"resourceType":"Patient","id":"p1","identifier":[{"system":"urn:mrn","value":"m1"},{"system":"urn:mrn","value":"m1"}]}"#,
            r#"{"resourceType":"Patient","id":"p2","meta":{"profile":["urn:p"]},"name":[{"text":"é \"q\" \\ \u0001"}]}"#,
            r#"{"resourceType":"Practitioner","id":"dr"}"#,
            r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"c"},"subject":{"reference":"Patient/p1"},"valueQuantity":{"value":1.50}}"#,
            r#"{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"c"},"subject":{"reference":"Patient/p1"},"performer":[{"reference":"Patient/p2"},{"reference":"Practitioner/dr"},{"reference":"Practitioner/dr"}],"identifier":[{"value":"lab-2"}]}"#,
            r#"{"resourceType":"Observation","id":"before","status":"amended","code":{"text":"c"},"subject":{"reference":"Patient/p2"}}"#,
            r#"{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/p1"}}]}"#,
            r#"{"resourceType":"Encounter","id":"e1","status":"finished","class":{"code":"AMB"},"subject":{"reference":"Patient/p2"},"participant":[{"individual":{"reference":"Practitioner/dr"}}]}"#,
            r#"{"resourceType":"Observation","id":"twice","status":"final","code":{"text":"1"},"subject":{"reference":"Patient/p1"}}"#,
            r#"{"resourceType":"Observation","id":"twice","status":"final","code":{"text":"2"},"subject":{"reference":"Patient/p2"}}"#,
            r#"{"resourceType":"Provenance","id":"late","recorded":"2020-01-01T00:00:00Z","target":[{"reference":"Observation/o2"},{"reference":"Patient/p2"}],"agent":[{"who":{"reference":"Practitioner/dr"}}]}"#,
        ];
        let before = r#"{"resourceType":"Observation","id":"before","status":"final","code":{"text":"c"},"subject":{"reference":"Patient/p1"}}"#;
        let tenant = |name: &str| store.create_tenant(name).unwrap().id;
        let (plain, prepared_tenant, single) = (tenant("plain"), tenant("prepared"), tenant("single"));
        let op = |text: &str, body: Value| {
            let value = bulkhead_fhir::parse_exact(text.as_bytes()).unwrap();
            let (resource_type, id) = (value["resourceType"].as_str().unwrap(), value["id"].as_str().unwrap());
            WriteOp::Update { resource_type: resource_type.into(), id: id.into(), body, if_match: None }
        };
        for tenant in [plain, prepared_tenant, single] {
            let op = op(before, bulkhead_fhir::parse_exact(before.as_bytes()).unwrap());
            store.write(tenant, Some("owner"), &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
        }
        let plain_ops: Vec<WriteOp> =
            lines.iter().map(|text| op(text, bulkhead_fhir::parse_exact(text.as_bytes()).unwrap())).collect();
        let mut ops = Vec::new();
        let mut prepared = Vec::new();
        for (index, text) in lines.iter().enumerate() {
            let value = bulkhead_fhir::parse_exact(text.as_bytes()).unwrap();
            let (resource_type, id) = (value["resourceType"].as_str().unwrap(), value["id"].as_str().unwrap());
            let mut buffers = bulkhead_fhir::TapeBuffers::default();
            let tape = bulkhead_fhir::JsonTape::parse(text, &mut buffers).unwrap();
            match index {
                // Prepared from its `Value`, which the op carries.
                3 => prepared.push(Some(PreparedWrite::new(resource_type, id, &value))),
                // Not prepared.
                8 => prepared.push(None),
                _ => {
                    prepared.push(Some(PreparedWrite::detached(resource_type, id, tape.root(), text.len()).unwrap()));
                    ops.push(op(text, Value::Null));
                    continue;
                }
            }
            ops.push(op(text, value));
        }
        for mode in [WriteMode::Transaction, WriteMode::Batch] {
            // One write per resource (the two writes of `twice` together, so that its first
            // version's rows open and close at the same time, as in one write of all).
            for ops in plain_ops.chunk_by(|a, b| a.id() == b.id()) {
                assert!(store.write(single, Some("owner"), ops, mode).unwrap().iter().all(Result::is_ok));
            }
            let expected = store.write(plain, Some("owner"), &plain_ops, mode).unwrap();
            let written = store.write_prepared(prepared_tenant, Some("owner"), &ops, &prepared, mode).unwrap();
            assert_eq!(written.len(), expected.len());
            for (index, (expected, written)) in expected.into_iter().zip(written).enumerate() {
                let (expected, written) = (expected.unwrap(), written.unwrap());
                let outcome = |w: &crate::Written| (w.version, w.created, w.changed, w.deleted);
                assert_eq!(outcome(&written), outcome(&expected), "{mode:?} {index}");
                let body = bulkhead_fhir::parse_exact(lines[index].as_bytes()).unwrap();
                let text = crate::stamped_json(&body, ops[index].id(), written.version, written.last_updated).unwrap();
                assert_eq!(written.body.as_deref(), Some(text.as_str()), "{mode:?} {index}");
            }
            let (expected, stored) = (rows(&store, plain), rows(&store, prepared_tenant));
            assert_eq!(stored, expected, "{mode:?}");
            assert_eq!(stored, rows(&store, single), "{mode:?}");
            assert!(stored.iter().any(|row| row.starts_with("Observation|before|2|")), "{mode:?}: {stored:?}");
        }
    }
}
