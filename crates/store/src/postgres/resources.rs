//! Versioned resources on PostgreSQL: writes (with the compartment index, search tokens and
//! Group membership history kept in step), reads, history and search. Every statement names
//! the tenant.

use std::collections::HashSet;

use bulkhead_fhir::{compartment::patient_compartments_of, resource_type_code, Micros};
use postgres::types::ToSql;
use postgres::Row;
use serde_json::Value;

use super::created_keys::CreatedKeys;
use super::Db;
use crate::plan_cache::raises_member_watermarks;
use crate::write::search_tokens;
use crate::{
    group_members, stamped_json, LastUpdatedBound, PreparedWrite, SearchPage, SearchQuery, StoreError, StoredResource,
    TenantId, Visibility, WriteMode, WriteOp, Written,
};

/// The current row of a resource, without its body.
struct Current {
    rid: i64,
    version: i64,
    deleted: bool,
    owner: Option<String>,
}

/// Writes at least this many at once go through [`super::bulk_insert::insert_new`] for the new
/// resources among them.
const BULK_FROM: usize = 8;

/// Applies `ops` in one transaction at `timestamp` (see [`crate::Store::write`]), with what
/// was prepared for them (`prepared[i]` for `ops[i]`, see [`crate::Store::write_prepared`]; an
/// empty list for none). A bulk load passes the keys of the resources it created so far
/// (`created`), which notes those this write creates in bulk.
#[allow(clippy::too_many_arguments)]
pub(super) fn write(
    db: &mut Db<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    ops: &[WriteOp],
    prepared: &[Option<PreparedWrite>],
    mode: WriteMode,
    timestamp: Micros,
    created: Option<&mut CreatedKeys>,
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let mut results: Vec<Option<Result<Written, StoreError>>> = (0..ops.len()).map(|_| None).collect();
    if ops.len() >= BULK_FROM {
        for (index, written) in super::bulk_insert::insert_new(db, tenant, owner, ops, prepared, timestamp, created)? {
            results[index] = Some(Ok(written));
        }
    }
    for (index, op) in ops.iter().enumerate() {
        if results[index].is_some() {
            continue;
        }
        // The single-write path needs a detached op's body itself (its op carries a placeholder):
        // parsed back here, for the few ops the bulk path left (existing resources, Groups).
        let attached;
        let op = match prepared.get(index).and_then(Option::as_ref) {
            Some(prepared) if prepared.detached => {
                attached = prepared.attach(op)?;
                &attached
            }
            _ => op,
        };
        let result = match mode {
            WriteMode::Transaction => Ok(apply(db, tenant, owner, op, timestamp)?),
            WriteMode::Batch => {
                // A savepoint per entry: a failed entry leaves no partial rows behind.
                db.batch("SAVEPOINT entry")?;
                match apply(db, tenant, owner, op, timestamp) {
                    Err(error) if error.is_store_failure() => return Err(error),
                    Err(error) => {
                        db.batch("ROLLBACK TO SAVEPOINT entry; RELEASE SAVEPOINT entry")?;
                        Err(error)
                    }
                    Ok(written) => {
                        db.batch("RELEASE SAVEPOINT entry")?;
                        Ok(written)
                    }
                }
            }
        };
        results[index] = Some(result);
    }
    note_associated_types_changed(db, tenant, &results, timestamp)?;
    Ok(results
        .into_iter()
        .map(|result| result.unwrap_or_else(|| Err(StoreError::Database("write skipped".into()))))
        .collect())
}

/// Raises `associated_type_changes` for every type an associated set can reach (Provenance and
/// the types outside the Patient compartment) that this write changed: the plan cache's watermark
/// (see `crate::plan_cache`).
fn note_associated_types_changed(
    db: &mut Db<'_>,
    tenant: TenantId,
    results: &[Option<Result<Written, StoreError>>],
    timestamp: Micros,
) -> Result<(), StoreError> {
    let mut types: Vec<&str> = results
        .iter()
        .filter_map(|result| match result {
            Some(Ok(written)) if written.changed => Some(written.resource_type.as_str()),
            _ => None,
        })
        .filter(|resource_type| {
            *resource_type == "Provenance" || bulkhead_fhir::references::is_referenced_type(resource_type)
        })
        .collect();
    types.sort_unstable();
    types.dedup();
    if types.is_empty() {
        return Ok(());
    }
    db.execute(
        "INSERT INTO associated_type_changes (tenant_id, resource_type, changed_at)
         SELECT $1, t, $3 FROM unnest($2::text[]) AS t
         ON CONFLICT (tenant_id, resource_type)
         DO UPDATE SET changed_at = GREATEST(associated_type_changes.changed_at, excluded.changed_at)",
        &[&tenant.0, &types, &timestamp],
    )?;
    Ok(())
}

/// Raises the `changed_at` of the patients `pkeys` to `timestamp`: a compartment row of theirs
/// was opened, closed or changed (the plan cache's watermark, see `crate::plan_cache`).
pub(super) fn mark_patients_changed(
    db: &mut Db<'_>,
    tenant: TenantId,
    pkeys: &[i64],
    timestamp: Micros,
) -> Result<(), StoreError> {
    if pkeys.is_empty() {
        return Ok(());
    }
    db.execute(
        "UPDATE patient_keys SET changed_at = GREATEST(changed_at, $3) WHERE tenant_id = $1 AND pkey = ANY($2)",
        &[&tenant.0, &pkeys, &timestamp],
    )?;
    Ok(())
}

fn current(db: &mut Db<'_>, tenant: TenantId, resource_type: &str, id: &str) -> Result<Option<Current>, StoreError> {
    // FOR UPDATE: a concurrent writer of the same resource waits (they are serialised by the
    // clock already; this keeps the row's version exact should that ever change).
    let row = db.query_opt(
        "SELECT rid, version, deleted, owner FROM resources WHERE tenant_id = $1 AND resource_type = $2 AND id = $3
         FOR UPDATE",
        &[&tenant.0, &resource_type, &id],
    )?;
    row.map(|row| {
        Ok(Current { rid: row.try_get(0)?, version: row.try_get(1)?, deleted: row.try_get(2)?, owner: row.try_get(3)? })
    })
    .transpose()
}

/// Applies one write inside the open transaction at `timestamp`.
fn apply(
    db: &mut Db<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    op: &WriteOp,
    timestamp: Micros,
) -> Result<Written, StoreError> {
    let resource_type = op.resource_type();
    match op {
        WriteOp::Create { id, body, .. } => {
            if current(db, tenant, resource_type, id)?.is_some() {
                return Err(StoreError::Conflict(format!("{resource_type}/{id} already exists")));
            }
            put(db, tenant, owner, resource_type, id, body, None, timestamp)
        }
        WriteOp::Update { id, body, if_match, .. } => {
            let existing = current(db, tenant, resource_type, id)?;
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
                if let Some(unchanged) = unchanged_version(db, tenant, existing, resource_type, id, body)? {
                    return Ok(unchanged);
                }
            }
            put(db, tenant, owner, resource_type, id, body, existing, timestamp)
        }
        WriteOp::Delete { id, .. } => delete(db, tenant, owner, resource_type, id, timestamp),
    }
}

/// When the new content equals the current version (ignoring `meta.versionId` and
/// `meta.lastUpdated`), the write is a no-op and the current version is returned.
fn unchanged_version(
    db: &mut Db<'_>,
    tenant: TenantId,
    existing: &Current,
    resource_type: &str,
    id: &str,
    body: &Value,
) -> Result<Option<Written>, StoreError> {
    let row = db.query_one(
        "SELECT body, last_updated FROM resources WHERE tenant_id = $1 AND rid = $2",
        &[&tenant.0, &existing.rid],
    )?;
    let (stored_text, last_updated): (String, Micros) = (row.try_get(0)?, row.try_get(1)?);
    crate::write::unchanged_write(stored_text, last_updated, existing.version, resource_type, id, body)
}

#[allow(clippy::too_many_arguments)]
fn put(
    db: &mut Db<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    resource_type: &str,
    id: &str,
    body: &Value,
    existing: Option<Current>,
    timestamp: Micros,
) -> Result<Written, StoreError> {
    let version = existing.as_ref().map_or(1, |existing| existing.version + 1);
    let text = stamped_json(body, id, version, timestamp)?;
    let created = existing.as_ref().is_none_or(|existing| existing.deleted);
    let rid: i64 = match &existing {
        Some(existing) => {
            archive_current(db, tenant, existing.rid)?;
            // The owner of an existing resource never changes.
            db.execute(
                "UPDATE resources SET version = $3, last_updated = $4, deleted = false, body = $5
                 WHERE tenant_id = $1 AND rid = $2",
                &[&tenant.0, &existing.rid, &version, &timestamp, &text],
            )?;
            existing.rid
        }
        None => db
            .query_one(
                "INSERT INTO resources (tenant_id, resource_type, id, version, last_updated, deleted, owner, body)
                 VALUES ($1, $2, $3, 1, $4, false, $5, $6) RETURNING rid",
                &[&tenant.0, &resource_type, &id, &timestamp, &owner, &text],
            )?
            .try_get(0)?,
    };
    let is_new_row = existing.is_none();
    let stored_owner = match &existing {
        Some(existing) => existing.owner.as_deref(),
        None => owner,
    };
    let patients = patient_compartments_of(resource_type, id, body);
    sync_compartments(db, tenant, resource_type, rid, patients, stored_owner, timestamp, is_new_row)?;
    sync_search_tokens(db, tenant, resource_type, rid, body, is_new_row)?;
    super::associated::sync_references(db, tenant, resource_type, rid, body, timestamp, is_new_row)?;
    if is_new_row {
        super::associated::resolve_new_targets(db, tenant, &[resource_type], &[id], &[rid])?;
    }
    if resource_type == "Group" {
        let members =
            group_members(&text, timestamp).map_err(|error| StoreError::Invalid(format!("Group.member: {error}")))?;
        sync_group_membership(db, tenant, rid, &members, timestamp)?;
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
    db: &mut Db<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    resource_type: &str,
    id: &str,
    timestamp: Micros,
) -> Result<Written, StoreError> {
    let existing = current(db, tenant, resource_type, id)?
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
    archive_current(db, tenant, existing.rid)?;
    written.version = existing.version + 1;
    db.execute(
        "UPDATE resources SET version = $3, last_updated = $4, deleted = true, body = NULL
         WHERE tenant_id = $1 AND rid = $2",
        &[&tenant.0, &existing.rid, &written.version, &timestamp],
    )?;
    // Compartment rows stay open, marked deleted: deletions are found through them.
    let patients: Vec<i64> = db
        .query(
            "UPDATE compartment SET last_updated = $3, deleted = true WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL
             RETURNING pkey",
            &[&tenant.0, &existing.rid, &timestamp],
        )?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    if raises_member_watermarks(resource_type) {
        mark_patients_changed(db, tenant, &patients, timestamp)?;
    }
    db.execute("DELETE FROM search_token WHERE tenant_id = $1 AND rid = $2", &[&tenant.0, &existing.rid])?;
    super::associated::close_references(db, tenant, existing.rid, timestamp)?;
    if resource_type == "Group" {
        sync_group_membership(db, tenant, existing.rid, &[], timestamp)?;
    }
    Ok(written)
}

fn archive_current(db: &mut Db<'_>, tenant: TenantId, rid: i64) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO resource_history (tenant_id, rid, version, last_updated, deleted, owner, body)
         SELECT tenant_id, rid, version, last_updated, deleted, owner, body FROM resources
         WHERE tenant_id = $1 AND rid = $2",
        &[&tenant.0, &rid],
    )?;
    Ok(())
}

/// The index code of a resource type (its position in the R4 list): a type outside R4 cannot be
/// indexed.
pub(super) fn type_code(resource_type: &str) -> Result<i16, StoreError> {
    resource_type_code(resource_type)
        .and_then(|code| i16::try_from(code).ok())
        .ok_or_else(|| StoreError::Invalid(format!("'{resource_type}' is not an R4 resource type")))
}

/// The tenant's keys of `patients` (in the order given), each created on first mention.
fn patient_keys(db: &mut Db<'_>, tenant: TenantId, patients: &[String]) -> Result<Vec<i64>, StoreError> {
    if patients.is_empty() {
        return Ok(Vec::new());
    }
    db.execute(
        "INSERT INTO patient_keys (tenant_id, patient_id) SELECT $1, p FROM unnest($2::text[]) AS p
         ON CONFLICT DO NOTHING",
        &[&tenant.0, &patients],
    )?;
    let keys: Vec<i64> = db
        .query(
            "SELECT k.pkey FROM unnest($2::text[]) WITH ORDINALITY AS n(patient_id, ord)
             JOIN patient_keys k ON k.tenant_id = $1 AND k.patient_id = n.patient_id ORDER BY n.ord",
            &[&tenant.0, &patients],
        )?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    if keys.len() != patients.len() {
        return Err(StoreError::Database("a patient key is missing after its insert".into()));
    }
    Ok(keys)
}

/// Closes compartment rows the new version left, opens rows for compartments it entered, and
/// copies the new version's `lastUpdated` onto every open row.
#[allow(clippy::too_many_arguments)]
fn sync_compartments(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    patients: Vec<String>,
    owner: Option<&str>,
    timestamp: Micros,
    is_new_row: bool,
) -> Result<(), StoreError> {
    // `(pkey, patient id)` of the open rows.
    let open: Vec<(i64, String)> = if is_new_row {
        Vec::new()
    } else {
        db.query(
            "SELECT c.pkey, k.patient_id FROM compartment c
             JOIN patient_keys k ON k.tenant_id = c.tenant_id AND k.pkey = c.pkey
             WHERE c.tenant_id = $1 AND c.rid = $2 AND c.to_ts IS NULL",
            &[&tenant.0, &rid],
        )?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, StoreError>>()?
    };
    if open.is_empty() && patients.is_empty() {
        return Ok(());
    }
    let code = type_code(resource_type)?;
    let gone: Vec<i64> =
        open.iter().filter(|(_, patient)| !patients.contains(patient)).map(|(pkey, _)| *pkey).collect();
    if !gone.is_empty() {
        db.execute(
            "UPDATE compartment SET to_ts = $5
             WHERE tenant_id = $1 AND pkey = ANY($2) AND type_code = $3 AND rid = $4 AND to_ts IS NULL",
            &[&tenant.0, &gone, &code, &rid, &timestamp],
        )?;
    }
    if open.iter().any(|(_, patient)| patients.contains(patient)) {
        db.execute(
            "UPDATE compartment SET last_updated = $3, deleted = false WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL",
            &[&tenant.0, &rid, &timestamp],
        )?;
    }
    let entered: Vec<String> =
        patients.into_iter().filter(|patient| !open.iter().any(|(_, open)| open == patient)).collect();
    // Every open row was closed or updated: its patient's compartment changed, as did those the
    // version entered.
    let mut changed: Vec<i64> = open.iter().map(|(pkey, _)| *pkey).collect();
    if !entered.is_empty() {
        let pkeys = patient_keys(db, tenant, &entered)?;
        db.execute(
            "INSERT INTO compartment (tenant_id, pkey, type_code, rid, from_ts, last_updated, deleted, owner)
             SELECT $1, pkey, $3, $4, $5, $5, false, $6 FROM unnest($2::int8[]) AS n(pkey)
             ON CONFLICT DO NOTHING",
            &[&tenant.0, &pkeys, &code, &rid, &timestamp, &owner],
        )?;
        changed.extend(pkeys);
    }
    if !raises_member_watermarks(resource_type) {
        return Ok(());
    }
    mark_patients_changed(db, tenant, &changed, timestamp)
}

fn sync_search_tokens(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    body: &Value,
    is_new_row: bool,
) -> Result<(), StoreError> {
    if !is_new_row {
        db.execute("DELETE FROM search_token WHERE tenant_id = $1 AND rid = $2", &[&tenant.0, &rid])?;
    }
    let tokens = search_tokens(body);
    if tokens.is_empty() {
        return Ok(());
    }
    let code = type_code(resource_type)?;
    let params: Vec<&str> = tokens.iter().map(|token| token.0).collect();
    let systems: Vec<&str> = tokens.iter().map(|token| token.1.as_str()).collect();
    let values: Vec<&str> = tokens.iter().map(|token| token.2.as_str()).collect();
    db.execute(
        "INSERT INTO search_token (tenant_id, type_code, param, system, value, rid)
         SELECT $1, $2, n.param, n.system, n.value, $6
         FROM unnest($3::text[], $4::text[], $5::text[]) AS n(param, system, value)
         ON CONFLICT DO NOTHING",
        &[&tenant.0, &code, &params, &systems, &values, &rid],
    )?;
    Ok(())
}

/// Records which patients joined and left the active membership of the Group (by its key) at
/// `timestamp`.
fn sync_group_membership(
    db: &mut Db<'_>,
    tenant: TenantId,
    group_rid: i64,
    members: &[String],
    timestamp: Micros,
) -> Result<(), StoreError> {
    let open: Vec<(i64, String)> = db
        .query(
            "SELECT g.pkey, k.patient_id FROM group_membership g
             JOIN patient_keys k ON k.tenant_id = g.tenant_id AND k.pkey = g.pkey
             WHERE g.tenant_id = $1 AND g.group_rid = $2 AND g.removed_at IS NULL",
            &[&tenant.0, &group_rid],
        )?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, StoreError>>()?;
    let gone: Vec<i64> =
        open.iter().filter(|(_, patient)| members.binary_search(patient).is_err()).map(|(pkey, _)| *pkey).collect();
    if !gone.is_empty() {
        db.execute(
            "UPDATE group_membership SET removed_at = $4
             WHERE tenant_id = $1 AND group_rid = $2 AND pkey = ANY($3) AND removed_at IS NULL",
            &[&tenant.0, &group_rid, &gone, &timestamp],
        )?;
    }
    let open: HashSet<&String> = open.iter().map(|(_, patient)| patient).collect();
    let joined: Vec<String> = members.iter().filter(|patient| !open.contains(patient)).cloned().collect();
    if !joined.is_empty() {
        let pkeys = patient_keys(db, tenant, &joined)?;
        db.execute(
            "INSERT INTO group_membership (tenant_id, group_rid, pkey, added_at)
             SELECT $1, $2, pkey, $4 FROM unnest($3::int8[]) AS n(pkey)",
            &[&tenant.0, &group_rid, &pkeys, &timestamp],
        )?;
    }
    Ok(())
}

// ---- reads ----

pub(super) const VERSION_COLUMNS: &str = "resource_type, id, version, last_updated, deleted, owner, body";

pub(super) fn stored_from_row(row: &Row) -> Result<StoredResource, StoreError> {
    Ok(StoredResource {
        resource_type: row.try_get(0)?,
        id: row.try_get(1)?,
        version: row.try_get(2)?,
        last_updated: row.try_get(3)?,
        deleted: row.try_get(4)?,
        owner: row.try_get(5)?,
        body: row.try_get(6)?,
    })
}

fn visible(resource: &StoredResource, visibility: &Visibility) -> bool {
    match visibility {
        Visibility::Tenant => true,
        Visibility::User(user) => resource.owner.as_deref() == Some(user),
    }
}

/// The current row of a resource and its key.
fn current_row(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_type: &str,
    id: &str,
) -> Result<Option<(i64, StoredResource)>, StoreError> {
    let sql =
        format!("SELECT {VERSION_COLUMNS}, rid FROM resources WHERE tenant_id = $1 AND resource_type = $2 AND id = $3");
    db.query_opt(&sql, &[&tenant.0, &resource_type, &id])?
        .map(|row| Ok((row.try_get(7)?, stored_from_row(&row)?)))
        .transpose()
}

pub(super) fn read(
    db: &mut Db<'_>,
    tenant: TenantId,
    visibility: &Visibility,
    resource_type: &str,
    id: &str,
) -> Result<Option<StoredResource>, StoreError> {
    Ok(current_row(db, tenant, resource_type, id)?.map(|(_, resource)| resource).filter(|r| visible(r, visibility)))
}

/// One version: the current row when it is that version, else the history row (visibility is
/// the current owner's, which never changes).
pub(super) fn vread(
    db: &mut Db<'_>,
    tenant: TenantId,
    visibility: &Visibility,
    resource_type: &str,
    id: &str,
    version: i64,
) -> Result<Option<StoredResource>, StoreError> {
    let Some((rid, current)) = current_row(db, tenant, resource_type, id)? else { return Ok(None) };
    if !visible(&current, visibility) {
        return Ok(None);
    }
    if current.version == version {
        return Ok(Some(current));
    }
    let row = db.query_opt(
        "SELECT $3::text, $4::text, version, last_updated, deleted, owner, body FROM resource_history
         WHERE tenant_id = $1 AND rid = $2 AND version = $5",
        &[&tenant.0, &rid, &resource_type, &id, &version],
    )?;
    row.as_ref().map(stored_from_row).transpose()
}

pub(super) fn history(
    db: &mut Db<'_>,
    tenant: TenantId,
    visibility: &Visibility,
    resource_type: &str,
    id: &str,
) -> Result<Vec<StoredResource>, StoreError> {
    let Some((rid, current)) = current_row(db, tenant, resource_type, id)? else { return Ok(Vec::new()) };
    if !visible(&current, visibility) {
        return Ok(Vec::new());
    }
    let mut versions = vec![current];
    for row in db.query(
        "SELECT $3::text, $4::text, version, last_updated, deleted, owner, body FROM resource_history
         WHERE tenant_id = $1 AND rid = $2 ORDER BY version DESC",
        &[&tenant.0, &rid, &resource_type, &id],
    )? {
        versions.push(stored_from_row(&row)?);
    }
    Ok(versions)
}

pub(super) fn search(
    db: &mut Db<'_>,
    tenant: TenantId,
    visibility: &Visibility,
    query: &SearchQuery,
) -> Result<SearchPage, StoreError> {
    let (sql, values) = search_statement(tenant, visibility, query);
    let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|value| value.as_ref()).collect();
    let rows = db.query(&sql, &params)?;
    let mut resources = Vec::new();
    let mut last_key = None;
    let mut has_more = false;
    for row in &rows {
        if resources.len() == query.count as usize {
            has_more = true;
            break;
        }
        resources.push(stored_from_row(row)?);
        last_key = Some(row.try_get::<_, i64>(7)?);
    }
    Ok(SearchPage { resources, next_key: if has_more { last_key } else { None } })
}

/// The statement of one search page and its parameters: one row past the page tells that more
/// follow.
///
/// With token conditions (`identifier`, `subject`, `patient`) the page is driven by the tokens'
/// keys, in key order, each probed in `resources` (a lateral subquery, which the planner cannot
/// reorder): a page costs the token's matches at most, whatever the type's size and whatever the
/// statistics say. As `rid IN (SELECT ..) ORDER BY rid LIMIT` the planner could walk the whole
/// type in key order and filter it by the token instead: 60 s per search on a freshly imported
/// tenant whose statistics autovacuum had not gathered yet.
fn search_statement(
    tenant: TenantId,
    visibility: &Visibility,
    query: &SearchQuery,
) -> (String, Vec<Box<dyn ToSql + Sync>>) {
    let mut values: Vec<Box<dyn ToSql + Sync>> =
        vec![Box::new(tenant.0), Box::new(query.resource_type.clone()), Box::new(query.after_key.unwrap_or(0))];
    // Appends a parameter and returns its placeholder.
    let bind = |values: &mut Vec<Box<dyn ToSql + Sync>>, value: Box<dyn ToSql + Sync>| {
        values.push(value);
        format!("${}", values.len())
    };
    // The row's conditions besides the tenant, on the columns of `r` (see below).
    let mut conditions = String::from("r.resource_type = $2 AND NOT r.deleted AND r.rid > $3");
    if let Some(user) = visibility.user() {
        conditions.push_str(&format!(" AND r.owner = {}", bind(&mut values, Box::new(user.to_owned()))));
    }
    if !query.ids.is_empty() {
        conditions.push_str(&format!(" AND r.id = ANY({})", bind(&mut values, Box::new(query.ids.clone()))));
    }
    for bound in &query.last_updated {
        let (operator, at) = match bound {
            LastUpdatedBound::AtLeast(at) => (">=", at),
            LastUpdatedBound::Before(at) => ("<", at),
        };
        conditions.push_str(&format!(" AND r.last_updated {operator} {}", bind(&mut values, Box::new(*at))));
    }
    let mut tokens = Vec::new();
    if !query.identifiers.is_empty() || !query.references.is_empty() {
        // A type outside R4 has no tokens (-1 matches none).
        let code = bind(&mut values, Box::new(type_code(&query.resource_type).unwrap_or(-1)));
        let select = format!("SELECT rid FROM search_token WHERE tenant_id = $1 AND type_code = {code} AND rid > $3");
        for identifier in &query.identifiers {
            let value = bind(&mut values, Box::new(identifier.value.clone()));
            let mut token = format!("{select} AND param = 'identifier' AND value = {value}");
            if let Some(system) = &identifier.system {
                token.push_str(&format!(" AND system = {}", bind(&mut values, Box::new(system.clone()))));
            }
            tokens.push(token);
        }
        for reference in &query.references {
            // `patient=`: the `patient` element, or a `subject` that is a Patient.
            let (params, target_type) = match reference.param {
                "patient" => ("param IN ('patient', 'subject')", Some("Patient".to_owned())),
                _ => ("param = 'subject'", reference.target_type.clone()),
            };
            let value = bind(&mut values, Box::new(reference.id.clone()));
            let mut token = format!("{select} AND {params} AND value = {value}");
            if let Some(target_type) = target_type {
                token.push_str(&format!(" AND system = {}", bind(&mut values, Box::new(target_type))));
            }
            tokens.push(token);
        }
    }
    let limit = bind(&mut values, Box::new(query.count as i64 + 1));
    let sql = if tokens.is_empty() {
        format!(
            "SELECT {VERSION_COLUMNS}, rid FROM resources AS r WHERE r.tenant_id = $1 AND {conditions}
             ORDER BY rid LIMIT {limit}"
        )
    } else {
        // The keys are distinct (one resource may hold a token twice) and sorted; each is looked
        // up by the primary key alone, in a subquery that `OFFSET 0` keeps as it is (neither
        // pulled up into a join the planner may turn around, nor given the other conditions, so
        // that no other index can serve it), and the page ends after `limit` keys that qualify.
        format!(
            "SELECT r.* FROM (SELECT DISTINCT rid FROM ({}) AS tokens ORDER BY rid) AS matched
             CROSS JOIN LATERAL (SELECT {VERSION_COLUMNS}, rid FROM resources
                                 WHERE tenant_id = $1 AND rid = matched.rid OFFSET 0) AS r
             WHERE {conditions} ORDER BY matched.rid LIMIT {limit}",
            tokens.join(" INTERSECT ")
        )
    };
    (sql, values)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::testing::{fresh_database, test_options};
    use super::super::PgStore;
    use crate::{ReferenceQuery, SearchQuery, Store, Visibility, WriteMode, WriteOp};

    fn observation(id: &str, patient: &str) -> WriteOp {
        let body = json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
                          "subject": {"reference": format!("Patient/{patient}")}});
        WriteOp::Update { resource_type: "Observation".into(), id: id.into(), body, if_match: None }
    }

    /// A `json` value as its text (`EXPLAIN (FORMAT JSON)` answers `json`).
    struct JsonText(String);

    impl<'a> postgres::types::FromSql<'a> for JsonText {
        fn from_sql(
            _: &postgres::types::Type,
            raw: &'a [u8],
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            Ok(JsonText(std::str::from_utf8(raw)?.to_owned()))
        }

        fn accepts(ty: &postgres::types::Type) -> bool {
            *ty == postgres::types::Type::JSON
        }
    }

    /// Rows each plan node on `resources` read (returned plus filtered out), over the plan tree.
    fn resources_rows_read(node: &Value) -> f64 {
        let own = if node["Relation Name"] == "resources" {
            node["Actual Rows"].as_f64().unwrap_or(0.0) + node["Rows Removed by Filter"].as_f64().unwrap_or(0.0)
        } else {
            0.0
        };
        own + node["Plans"].as_array().map_or(0.0, |plans| plans.iter().map(resources_rows_read).sum())
    }

    /// A reference search reads the rows of the referenced patient, not the rows of the type:
    /// with a patient of 3,000 Observations and one of a single Observation written last, the
    /// search for the latter, without statistics and with them, reads a handful of rows
    /// (walking the type in key order for `ORDER BY rid LIMIT` read all 3,001). A page of the
    /// larger patient reads the page and no more.
    #[test]
    fn a_reference_search_reads_the_patients_rows_not_the_types() {
        let Some(database) = fresh_database() else { return };
        let store = PgStore::open(&database.url, test_options()).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        let mut ops: Vec<WriteOp> = (0..3000).map(|n| observation(&format!("many{n}"), "many")).collect();
        ops.push(observation("lonely", "one"));
        for result in store.write(tenant, None, &ops, WriteMode::Transaction).unwrap() {
            result.unwrap();
        }
        let of = |patient: &str| SearchQuery {
            resource_type: "Observation".into(),
            references: vec![ReferenceQuery { param: "patient", target_type: None, id: patient.into() }],
            count: 10,
            ..SearchQuery::default()
        };
        let page = store.search(tenant, &Visibility::Tenant, &of("one")).unwrap();
        assert_eq!(page.resources.iter().map(|resource| resource.id.as_str()).collect::<Vec<_>>(), ["lonely"]);
        let page = store.search(tenant, &Visibility::Tenant, &of("many")).unwrap();
        assert_eq!(page.resources.len(), 10);
        assert!(page.next_key.is_some());
        let rows_read = |query: &SearchQuery| {
            let plan = store
                .with_read(|db| {
                    let (sql, values) = super::search_statement(tenant, &Visibility::Tenant, query);
                    let params: Vec<&(dyn postgres::types::ToSql + Sync)> =
                        values.iter().map(|value| value.as_ref()).collect();
                    let row = db.query_one(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}"), &params)?;
                    Ok(row.try_get::<_, JsonText>(0)?.0)
                })
                .unwrap();
            let plan: Value = serde_json::from_str(&plan).unwrap();
            (resources_rows_read(&plan[0]["Plan"]), plan)
        };
        for analyzed in [false, true] {
            if analyzed {
                store.with_transaction(|db| db.batch("ANALYZE")).unwrap();
            }
            for (patient, most) in [("one", 1.0), ("many", 11.0)] {
                let (read, plan) = rows_read(&of(patient));
                assert!(read <= most, "analyzed {analyzed}, {patient}: {read} rows of resources read: {plan}");
            }
        }
    }
}
