//! Versioned resources: writes (with the compartment index, search tokens and Group membership
//! history kept in step), reads, history and search.

use bulkhead_fhir::references::outgoing_references;
use bulkhead_fhir::{compartment::patient_compartments_of, resource_type_code, Micros};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row, ToSql, Transaction};
use serde_json::Value;

use super::write_memo::WriteMemo;
use crate::plan_cache::raises_member_watermarks;
use crate::write::search_tokens;
use crate::{
    group_members, stamped_json, LastUpdatedBound, PreparedWrite, SearchPage, SearchQuery, StoreError, StoredResource,
    TenantId, Visibility, WriteOp, Written,
};

/// The current row of a resource, without its body.
struct Current {
    rid: i64,
    version: i64,
    deleted: bool,
    owner: Option<String>,
}

fn current(
    transaction: &Transaction<'_>,
    tenant: TenantId,
    resource_type: &str,
    id: &str,
) -> Result<Option<Current>, StoreError> {
    let mut statement = transaction.prepare_cached(
        "SELECT rid, version, deleted, owner FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3",
    )?;
    let row = statement
        .query_row(params![tenant.0, resource_type, id], |row| {
            Ok(Current { rid: row.get(0)?, version: row.get(1)?, deleted: row.get(2)?, owner: row.get(3)? })
        })
        .optional()?;
    Ok(row)
}

/// What [`insert_new_rows`] did for one write of a batch.
pub(super) enum FirstPass {
    /// Nothing: [`apply`] writes it whole.
    NotTried,
    /// Inserted its resource's row (version 1, stored text `text`): [`apply`] indexes it.
    Inserted { rid: i64, text: String },
    /// Found that its resource has a row already.
    Exists,
}

/// The first pass over a batch in one transaction: inserts the rows of its new resources in
/// `(type, id)` order, before [`apply`] writes the batch in its own order. A bulk load's ids are
/// random (UUIDs): inserted in arrival order, each seeks the unique index `(tenant, type, id)`
/// somewhere else, and once that index outgrows the writer's cache most seeks read a page back;
/// in key order consecutive inserts walk neighbouring leaves. Rows keep ascending keys (`rid`s
/// are handed out in this order), and everything else a write touches (compartments, tokens,
/// references) is still written in arrival order, where a file's resources of one patient come
/// together.
///
/// Only for batches whose every write inserts first when it can (creates, and unconditional
/// prepared updates): none of them can tell that a row came first, and of several writes of one
/// resource the first in the batch gets the row (the sort is stable), the others find it, as
/// they would have. Otherwise every write is `NotTried`.
pub(super) fn insert_new_rows(
    transaction: &Transaction<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    ops: &[WriteOp],
    prepared: &[Option<PreparedWrite>],
    timestamp: Micros,
) -> Result<Vec<FirstPass>, StoreError> {
    // A write that inserts first, with what it was prepared from.
    let insertable = |index: usize| match (&ops[index], prepared.get(index)) {
        (WriteOp::Create { body, .. }, Some(Some(derived))) => Some((body, derived)),
        (WriteOp::Update { body, if_match: None, .. }, Some(Some(derived))) => Some((body, derived)),
        _ => None,
    };
    let mut passes: Vec<FirstPass> = ops.iter().map(|_| FirstPass::NotTried).collect();
    if ops.len() < 2 || !(0..ops.len()).all(|index| insertable(index).is_some()) {
        return Ok(passes);
    }
    let key = |index: usize| (ops[index].resource_type(), ops[index].id());
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by(|&a, &b| key(a).cmp(&key(b)));
    for index in order {
        let ((resource_type, id), Some((body, derived))) = (key(index), insertable(index)) else { continue };
        let text = stored_text(derived, body, id, 1, timestamp)?;
        passes[index] = match insert_row(transaction, tenant, owner, resource_type, id, &text, timestamp)? {
            Some(rid) => FirstPass::Inserted { rid, text },
            None => FirstPass::Exists,
        };
    }
    Ok(passes)
}

/// Applies one write inside an open transaction at `timestamp` (`first`: what
/// [`insert_new_rows`] did for it).
#[allow(clippy::too_many_arguments)]
pub(super) fn apply(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    owner: Option<&str>,
    op: &WriteOp,
    prepared: Option<&PreparedWrite>,
    first: FirstPass,
    timestamp: Micros,
) -> Result<Written, StoreError> {
    let resource_type = op.resource_type().to_owned();
    if let FirstPass::Inserted { rid, text } = first {
        let derived = prepared.ok_or_else(|| StoreError::Database("a first pass wrote an unprepared row".into()))?;
        let version = Version { number: 1, existing_owner: None };
        return index_version(
            transaction,
            memo,
            tenant,
            owner,
            &resource_type,
            (op.id(), derived),
            rid,
            text,
            version,
            timestamp,
        );
    }
    let exists = matches!(first, FirstPass::Exists);
    match op {
        // A new id is inserted straight away: the insert's own uniqueness check finds an
        // existing row, so a bulk load of new resources looks nothing up first.
        WriteOp::Create { id, body, .. } => {
            let written = if exists {
                None
            } else {
                put(transaction, memo, tenant, owner, &resource_type, id, (body, prepared), None, timestamp)?
            };
            written.ok_or_else(|| StoreError::Conflict(format!("{resource_type}/{id} already exists")))
        }
        WriteOp::Update { id, body, if_match, .. } => {
            // A bulk load (which prepares its writes) mostly brings new ids; other updates mostly
            // find their resource, and look it up first.
            if if_match.is_none() && prepared.is_some() && !exists {
                let created =
                    put(transaction, memo, tenant, owner, &resource_type, id, (body, prepared), None, timestamp)?;
                if let Some(created) = created {
                    return Ok(created);
                }
            }
            let existing = current(transaction, tenant, &resource_type, id)?;
            if let Some(existing) = &existing {
                if owner.is_some() && existing.owner.as_deref() != owner {
                    // Another user's resource: not visible, so not updatable (and not revealed).
                    return Err(StoreError::NotFound(format!("{resource_type}/{id}")));
                }
            }
            if let Some(expected) = *if_match {
                let actual = existing.as_ref().map(|existing| existing.version);
                if actual != Some(expected) {
                    return Err(StoreError::VersionConflict(format!(
                        "{resource_type}/{id} is at version {}, not {expected}",
                        actual.map_or("none".to_owned(), |v| v.to_string())
                    )));
                }
            }
            if let Some(existing) = existing.as_ref().filter(|existing| !existing.deleted) {
                // A detached write's body is read back from its template only here, when there
                // is a current version to compare it with.
                let detached = prepared.and_then(PreparedWrite::detached_body).transpose()?;
                let body = detached.as_ref().unwrap_or(body);
                if let Some(unchanged) = unchanged_version(transaction, existing, &resource_type, id, body)? {
                    return Ok(unchanged);
                }
            }
            let written =
                put(transaction, memo, tenant, owner, &resource_type, id, (body, prepared), existing, timestamp)?;
            // Only a new row can be refused, and only when a row exists; `current` found none.
            written.ok_or_else(|| StoreError::Database(format!("{resource_type}/{id} is neither found nor insertable")))
        }
        WriteOp::Delete { id, .. } => delete(transaction, memo, tenant, owner, &resource_type, id, timestamp),
    }
}

/// When the new content equals the current version (ignoring `meta.versionId` and
/// `meta.lastUpdated`), the write is a no-op and the current version is returned.
fn unchanged_version(
    transaction: &Transaction<'_>,
    existing: &Current,
    resource_type: &str,
    id: &str,
    body: &Value,
) -> Result<Option<Written>, StoreError> {
    let (stored_text, last_updated): (String, Micros) = transaction
        .prepare_cached("SELECT body, last_updated FROM resources WHERE rid = ?1")?
        .query_row([existing.rid], |row| Ok((row.get(0)?, row.get(1)?)))?;
    crate::write::unchanged_write(stored_text, last_updated, existing.version, resource_type, id, body)
}

/// Writes a new version: over `existing`, or as a new resource row when `existing` is `None`.
/// `Ok(None)`: there was no `existing` but the resource has a row after all (nothing written).
#[allow(clippy::too_many_arguments)]
fn put(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    owner: Option<&str>,
    resource_type: &str,
    id: &str,
    (body, prepared): (&Value, Option<&PreparedWrite>),
    existing: Option<Current>,
    timestamp: Micros,
) -> Result<Option<Written>, StoreError> {
    let version = existing.as_ref().map_or(1, |existing| existing.version + 1);
    // What the caller prepared from this body, type and id, or computed here.
    let computed;
    let derived = match prepared {
        Some(prepared) => prepared,
        None => {
            computed = PreparedWrite {
                template: None,
                detached: false,
                patients: patient_compartments_of(resource_type, id, body),
                references: outgoing_references(resource_type, body),
                tokens: search_tokens(body),
            };
            &computed
        }
    };
    let text = stored_text(derived, body, id, version, timestamp)?;
    let rid = match &existing {
        Some(existing) => {
            archive_current(transaction, existing.rid)?;
            // The owner of an existing resource never changes: a tenant-level update of a
            // user's resource keeps it that user's.
            transaction
                .prepare_cached(
                    "UPDATE resources SET version = ?2, last_updated = ?3, deleted = 0, body = ?4 WHERE rid = ?1",
                )?
                .execute(params![existing.rid, version, timestamp, text])?;
            existing.rid
        }
        None => match insert_row(transaction, tenant, owner, resource_type, id, &text, timestamp)? {
            Some(rid) => rid,
            None => return Ok(None),
        },
    };
    let version = Version {
        number: version,
        existing_owner: existing.as_ref().map(|existing| (existing.owner.as_deref(), existing.deleted)),
    };
    index_version(transaction, memo, tenant, owner, resource_type, (id, derived), rid, text, version, timestamp)
        .map(Some)
}

/// The stored text of version `version` of a write.
fn stored_text(
    derived: &PreparedWrite,
    body: &Value,
    id: &str,
    version: i64,
    timestamp: Micros,
) -> Result<String, StoreError> {
    match &derived.template {
        Some(template) => Ok(template.stamp(version, timestamp)),
        None => Ok(stamped_json(body, id, version, timestamp)?),
    }
}

/// Inserts a new resource row (version 1); `None` when the resource has a row already.
fn insert_row(
    transaction: &Transaction<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    resource_type: &str,
    id: &str,
    text: &str,
    timestamp: Micros,
) -> Result<Option<i64>, StoreError> {
    let inserted = transaction
        .prepare_cached(
            "INSERT INTO resources (tenant_id, resource_type, id, version, last_updated, deleted, owner, body)
             VALUES (?1, ?2, ?3, 1, ?4, 0, ?5, ?6)
             ON CONFLICT (tenant_id, resource_type, id) DO NOTHING",
        )?
        .execute(params![tenant.0, resource_type, id, timestamp, owner, text])?;
    Ok((inserted > 0).then(|| transaction.last_insert_rowid()))
}

/// The version a write stored, for [`index_version`].
struct Version<'a> {
    number: i64,
    /// The owner of the resource's row and whether its current version was a deletion, when
    /// the row existed before this write (`None`: this write created the row).
    existing_owner: Option<(Option<&'a str>, bool)>,
}

/// Brings the indexes in step with a version just stored in row `rid` (the compartment index,
/// search tokens, references, Provenance targets waiting for it, Group membership).
#[allow(clippy::too_many_arguments)]
fn index_version(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    owner: Option<&str>,
    resource_type: &str,
    (id, derived): (&str, &PreparedWrite),
    rid: i64,
    text: String,
    version: Version<'_>,
    timestamp: Micros,
) -> Result<Written, StoreError> {
    let Version { number: version, existing_owner } = version;
    let is_new_row = existing_owner.is_none();
    let created = existing_owner.is_none_or(|(_, deleted)| deleted);
    let stored_owner = match existing_owner {
        Some((existing_owner, _)) => existing_owner,
        None => owner,
    };
    let compartments = Compartments { patients: &derived.patients, owner: stored_owner, is_new_row };
    sync_compartments(transaction, memo, tenant, resource_type, rid, compartments, timestamp)?;
    sync_search_tokens(transaction, tenant, resource_type, rid, &derived.tokens, is_new_row)?;
    let references = &derived.references;
    super::associated::sync_references(
        transaction,
        memo,
        tenant,
        resource_type,
        rid,
        references,
        timestamp,
        is_new_row,
    )?;
    // Most writes find no Provenance waiting for them; the memo knows when none can be.
    if is_new_row && memo.may_have_unresolved_targets(transaction, tenant)? {
        super::provenance_targets::resolve_new_target(transaction, tenant, resource_type, id, rid)?;
    }
    if resource_type == "Group" {
        let members =
            group_members(&text, timestamp).map_err(|error| StoreError::Invalid(format!("Group.member: {error}")))?;
        sync_group_membership(transaction, tenant, rid, &members, timestamp)?;
    }
    Ok(Written {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        version,
        last_updated: timestamp,
        created,
        deleted: false,
        changed: true,
        body: Some(text),
    })
}

fn delete(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    owner: Option<&str>,
    resource_type: &str,
    id: &str,
    timestamp: Micros,
) -> Result<Written, StoreError> {
    let existing = current(transaction, tenant, resource_type, id)?
        .filter(|existing| owner.is_none() || existing.owner.as_deref() == owner)
        .ok_or_else(|| StoreError::NotFound(format!("{resource_type}/{id}")))?;
    let mut written = Written {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        version: existing.version,
        last_updated: timestamp,
        created: false,
        deleted: true,
        changed: false,
        body: None,
    };
    if existing.deleted {
        return Ok(written);
    }
    written.changed = true;
    archive_current(transaction, existing.rid)?;
    written.version = existing.version + 1;
    transaction
        .prepare_cached(
            "UPDATE resources SET version = ?2, last_updated = ?3, deleted = 1, body = NULL WHERE rid = ?1",
        )?
        .execute(params![existing.rid, written.version, timestamp])?;
    // Compartment rows stay open, marked deleted: deletions are found through them for `deleted[]`.
    let patients: Vec<i64> = transaction
        .prepare_cached(
            "UPDATE compartment SET last_updated = ?2, deleted = 1 WHERE rid = ?1 AND to_ts IS NULL RETURNING pkey",
        )?
        .query_map(params![existing.rid, timestamp], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    if raises_member_watermarks(resource_type) {
        for pkey in patients {
            mark_patient_changed(transaction, pkey, timestamp)?;
        }
    }
    transaction.prepare_cached("DELETE FROM search_token WHERE rid = ?1")?.execute([existing.rid])?;
    super::associated::close_references(transaction, memo, tenant, resource_type, existing.rid, timestamp)?;
    if resource_type == "Group" {
        sync_group_membership(transaction, tenant, existing.rid, &[], timestamp)?;
    }
    Ok(written)
}

fn archive_current(transaction: &Transaction<'_>, rid: i64) -> Result<(), StoreError> {
    transaction
        .prepare_cached(
            "INSERT INTO resource_history (rid, version, last_updated, deleted, owner, body)
             SELECT rid, version, last_updated, deleted, owner, body FROM resources WHERE rid = ?1",
        )?
        .execute([rid])?;
    Ok(())
}

/// The index code of a resource type (its position in the R4 list): a type outside R4 cannot be
/// indexed.
pub(super) fn type_code(resource_type: &str) -> Result<i64, StoreError> {
    resource_type_code(resource_type)
        .ok_or_else(|| StoreError::Invalid(format!("'{resource_type}' is not an R4 resource type")))
}

/// The tenant's key of a patient id, created on first mention, with its `changed_at` raised to
/// `timestamp`: every write that touches a patient's compartment rows passes through here or
/// [`mark_patient_changed`].
fn touch_patient(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    patient: &str,
    timestamp: Micros,
) -> Result<i64, StoreError> {
    if let Some(pkey) = memo.touched_patient(patient) {
        return Ok(pkey);
    }
    let pkey = transaction
        .prepare_cached(
            "INSERT INTO patient_keys (tenant_id, patient_id, changed_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (tenant_id, patient_id) DO UPDATE SET changed_at = MAX(changed_at, excluded.changed_at)
             RETURNING pkey",
        )?
        .query_row(params![tenant.0, patient, timestamp], |row| row.get(0))?;
    memo.note_touched_patient(patient, pkey);
    Ok(pkey)
}

/// Raises a patient's `changed_at` to `timestamp` (a compartment row of theirs changed).
fn mark_patient_changed(transaction: &Transaction<'_>, pkey: i64, timestamp: Micros) -> Result<(), StoreError> {
    transaction
        .prepare_cached("UPDATE patient_keys SET changed_at = MAX(changed_at, ?2) WHERE pkey = ?1")?
        .execute(params![pkey, timestamp])?;
    Ok(())
}

/// The tenant's key of a patient id, created on first mention; no compartment row changes.
fn patient_key(transaction: &Transaction<'_>, tenant: TenantId, patient: &str) -> Result<i64, StoreError> {
    let found: Option<i64> = transaction
        .prepare_cached("SELECT pkey FROM patient_keys WHERE tenant_id = ?1 AND patient_id = ?2")?
        .query_row(params![tenant.0, patient], |row| row.get(0))
        .optional()?;
    if let Some(pkey) = found {
        return Ok(pkey);
    }
    transaction
        .prepare_cached("INSERT INTO patient_keys (tenant_id, patient_id) VALUES (?1, ?2)")?
        .execute(params![tenant.0, patient])?;
    Ok(transaction.last_insert_rowid())
}

/// The patient compartments of a new version, its owner, and whether its resource row is new.
struct Compartments<'a> {
    patients: &'a [String],
    owner: Option<&'a str>,
    is_new_row: bool,
}

/// Closes compartment rows the new version left, opens rows for compartments it entered, and
/// copies the new version's `lastUpdated` (and owner) onto every open row, so export planning
/// reads a resource's state from the index alone.
fn sync_compartments(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    compartments: Compartments<'_>,
    timestamp: Micros,
) -> Result<(), StoreError> {
    let Compartments { patients, owner, is_new_row } = compartments;
    // `(pkey, patient id)` of the open rows.
    let open: Vec<(i64, String)> = if is_new_row {
        Vec::new()
    } else {
        let mut statement = transaction.prepare_cached(
            "SELECT c.pkey, p.patient_id FROM compartment c JOIN patient_keys p ON p.pkey = c.pkey
             WHERE c.rid = ?1 AND c.to_ts IS NULL",
        )?;
        let rows = statement.query_map([rid], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<_, _>>()?;
        rows
    };
    if open.is_empty() && patients.is_empty() {
        return Ok(());
    }
    let code = type_code(resource_type)?;
    let raises = raises_member_watermarks(resource_type);
    for (pkey, _) in open.iter().filter(|(_, patient)| !patients.contains(patient)) {
        transaction
            .prepare_cached(
                "UPDATE compartment SET to_ts = ?4
                 WHERE pkey = ?1 AND type_code = ?2 AND rid = ?3 AND to_ts IS NULL",
            )?
            .execute(params![pkey, code, rid, timestamp])?;
        if raises {
            mark_patient_changed(transaction, *pkey, timestamp)?;
        }
    }
    if open.iter().any(|(_, patient)| patients.contains(patient)) {
        transaction
            .prepare_cached("UPDATE compartment SET last_updated = ?2, deleted = 0 WHERE rid = ?1 AND to_ts IS NULL")?
            .execute(params![rid, timestamp])?;
    }
    let mut insert = transaction.prepare_cached(
        "INSERT INTO compartment (pkey, type_code, rid, from_ts, tenant_id, last_updated, deleted, owner)
         VALUES (?1, ?2, ?3, ?4, ?5, ?4, 0, ?6)",
    )?;
    for patient in patients {
        // Every patient of the new version has a row that changed (opened or updated).
        let pkey = if raises {
            touch_patient(transaction, memo, tenant, patient, timestamp)?
        } else {
            patient_key(transaction, tenant, patient)?
        };
        if !open.iter().any(|(_, open)| open == patient) {
            insert.execute(params![pkey, code, rid, timestamp, tenant.0, owner])?;
        }
    }
    Ok(())
}

fn sync_search_tokens(
    transaction: &Transaction<'_>,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    tokens: &[(&'static str, String, String)],
    is_new_row: bool,
) -> Result<(), StoreError> {
    if !is_new_row {
        transaction.prepare_cached("DELETE FROM search_token WHERE rid = ?1")?.execute([rid])?;
    }
    if tokens.is_empty() {
        return Ok(());
    }
    let code = type_code(resource_type)?;
    let mut insert = transaction.prepare_cached(
        "INSERT OR IGNORE INTO search_token (tenant_id, type_code, param, system, value, rid) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (param, system, value) in tokens {
        insert.execute(params![tenant.0, code, param, system, value, rid])?;
    }
    Ok(())
}

/// Records which patients joined and left the active membership of the Group (by its key) at
/// `timestamp`.
fn sync_group_membership(
    transaction: &Transaction<'_>,
    tenant: TenantId,
    group_rid: i64,
    members: &[String],
    timestamp: Micros,
) -> Result<(), StoreError> {
    let open: Vec<(i64, String)> = transaction
        .prepare_cached(
            "SELECT g.pkey, p.patient_id FROM group_membership g JOIN patient_keys p ON p.pkey = g.pkey
             WHERE g.group_rid = ?1 AND g.removed_at IS NULL",
        )?
        .query_map([group_rid], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut close = transaction.prepare_cached(
        "UPDATE group_membership SET removed_at = ?3 WHERE group_rid = ?1 AND pkey = ?2 AND removed_at IS NULL",
    )?;
    for (pkey, _) in open.iter().filter(|(_, patient)| members.binary_search(patient).is_err()) {
        close.execute(params![group_rid, pkey, timestamp])?;
    }
    let open: std::collections::HashSet<&String> = open.iter().map(|(_, patient)| patient).collect();
    let mut add = transaction.prepare_cached(
        "INSERT INTO group_membership (group_rid, pkey, added_at, tenant_id) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for joined in members.iter().filter(|patient| !open.contains(patient)) {
        let pkey = patient_key(transaction, tenant, joined)?;
        add.execute(params![group_rid, pkey, timestamp, tenant.0])?;
    }
    Ok(())
}

// ---- reads ----

const VERSION_COLUMNS: &str = "resource_type, id, version, last_updated, deleted, owner, body";

pub(super) fn stored_from_row(row: &Row<'_>) -> rusqlite::Result<StoredResource> {
    Ok(StoredResource {
        resource_type: row.get(0)?,
        id: row.get(1)?,
        version: row.get(2)?,
        last_updated: row.get(3)?,
        deleted: row.get(4)?,
        owner: row.get(5)?,
        body: row.get(6)?,
    })
}

fn visible(resource: &StoredResource, visibility: &Visibility) -> bool {
    match visibility {
        Visibility::Tenant => true,
        Visibility::User(user) => resource.owner.as_deref() == Some(user),
    }
}

pub(super) fn read(
    connection: &Connection,
    tenant: TenantId,
    visibility: &Visibility,
    resource_type: &str,
    id: &str,
) -> Result<Option<StoredResource>, StoreError> {
    let sql =
        format!("SELECT {VERSION_COLUMNS} FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3");
    let resource =
        connection.prepare_cached(&sql)?.query_row(params![tenant.0, resource_type, id], stored_from_row).optional()?;
    Ok(resource.filter(|resource| visible(resource, visibility)))
}

/// One version: the current row when it is that version, else the history row (visibility is
/// the current owner's, which never changes).
pub(super) fn vread(
    connection: &Connection,
    tenant: TenantId,
    visibility: &Visibility,
    resource_type: &str,
    id: &str,
    version: i64,
) -> Result<Option<StoredResource>, StoreError> {
    let Some(current) = read(connection, tenant, visibility, resource_type, id)? else {
        return Ok(None);
    };
    if current.version == version {
        return Ok(Some(current));
    }
    let sql = "SELECT r.resource_type, r.id, h.version, h.last_updated, h.deleted, h.owner, h.body
               FROM resource_history h JOIN resources r ON r.rid = h.rid
               WHERE r.tenant_id = ?1 AND r.resource_type = ?2 AND r.id = ?3 AND h.version = ?4";
    let found = connection
        .prepare_cached(sql)?
        .query_row(params![tenant.0, resource_type, id, version], stored_from_row)
        .optional()?;
    Ok(found)
}

pub(super) fn history(
    connection: &Connection,
    tenant: TenantId,
    visibility: &Visibility,
    resource_type: &str,
    id: &str,
) -> Result<Vec<StoredResource>, StoreError> {
    let Some(current) = read(connection, tenant, visibility, resource_type, id)? else {
        return Ok(Vec::new());
    };
    let sql = "SELECT r.resource_type, r.id, h.version, h.last_updated, h.deleted, h.owner, h.body
               FROM resource_history h JOIN resources r ON r.rid = h.rid
               WHERE r.tenant_id = ?1 AND r.resource_type = ?2 AND r.id = ?3 ORDER BY h.version DESC";
    let mut versions = vec![current];
    let mut statement = connection.prepare_cached(sql)?;
    for version in statement.query_map(params![tenant.0, resource_type, id], stored_from_row)? {
        versions.push(version?);
    }
    Ok(versions)
}

pub(super) fn search(
    connection: &Connection,
    tenant: TenantId,
    visibility: &Visibility,
    query: &SearchQuery,
) -> Result<SearchPage, StoreError> {
    let mut sql = format!(
        "SELECT {VERSION_COLUMNS}, rid FROM resources WHERE tenant_id = ? AND resource_type = ? AND deleted = 0 AND rid > ?"
    );
    let mut values: Vec<Box<dyn ToSql>> =
        vec![Box::new(tenant.0), Box::new(query.resource_type.clone()), Box::new(query.after_key.unwrap_or(0))];
    if let Some(user) = visibility.user() {
        sql.push_str(" AND owner = ?");
        values.push(Box::new(user.to_owned()));
    }
    if !query.ids.is_empty() {
        sql.push_str(&format!(" AND id IN ({})", vec!["?"; query.ids.len()].join(",")));
        values.extend(query.ids.iter().map(|id| Box::new(id.clone()) as Box<dyn ToSql>));
    }
    for bound in &query.last_updated {
        let (condition, at) = match bound {
            LastUpdatedBound::AtLeast(at) => (" AND last_updated >= ?", at),
            LastUpdatedBound::Before(at) => (" AND last_updated < ?", at),
        };
        sql.push_str(condition);
        values.push(Box::new(*at));
    }
    // A type outside R4 has no tokens (-1 matches none).
    let code = resource_type_code(&query.resource_type).unwrap_or(-1);
    let token_condition =
        " AND rid IN (SELECT rid FROM search_token WHERE tenant_id = ? AND type_code = ? AND param = ? AND value = ?";
    for identifier in &query.identifiers {
        sql.push_str(token_condition);
        values.extend([
            Box::new(tenant.0) as Box<dyn ToSql>,
            Box::new(code),
            Box::new("identifier"),
            Box::new(identifier.value.clone()),
        ]);
        if let Some(system) = &identifier.system {
            sql.push_str(" AND system = ?");
            values.push(Box::new(system.clone()));
        }
        sql.push(')');
    }
    for reference in &query.references {
        // `patient=` means "the patient this is about": the `patient` element, or a `subject`
        // that is a Patient.
        let (params, target_type) = match reference.param {
            "patient" => ("param IN ('patient', 'subject')", Some("Patient".to_owned())),
            _ => ("param = 'subject'", reference.target_type.clone()),
        };
        sql.push_str(&format!(
            " AND rid IN (SELECT rid FROM search_token WHERE tenant_id = ? AND type_code = ? AND {params} AND value = ?"
        ));
        values.extend([Box::new(tenant.0) as Box<dyn ToSql>, Box::new(code), Box::new(reference.id.clone())]);
        if let Some(target_type) = target_type {
            sql.push_str(" AND system = ?");
            values.push(Box::new(target_type));
        }
        sql.push(')');
    }
    sql.push_str(" ORDER BY rid LIMIT ?");
    values.push(Box::new(query.count as i64 + 1));
    let mut statement = connection.prepare_cached(&sql)?;
    let mut rows = statement.query(params_from_iter(values.iter().map(|value| value.as_ref())))?;
    let mut resources = Vec::new();
    let mut last_key = None;
    let mut has_more = false;
    while let Some(row) = rows.next()? {
        if resources.len() == query.count as usize {
            has_more = true;
            break;
        }
        resources.push(stored_from_row(row)?);
        last_key = Some(row.get::<_, i64>(7)?);
    }
    Ok(SearchPage { resources, next_key: if has_more { last_key } else { None } })
}
