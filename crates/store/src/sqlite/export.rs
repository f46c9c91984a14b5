//! Export reads: a consistent view of the members' compartments as of a transaction time.
//!
//! A resource is selected for a type when one of its compartment rows valid at the transaction
//! time names a member, and its version at that time exists, is not deleted, is visible, and was
//! last updated after the member's `since` (the most permissive member wins) and before `until`.

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension};

use crate::{MemberSelection, PartRange, ResourceSink, StoreError, StoredResource, TenantId, Visibility};

use super::resources::stored_from_row;

/// Loads the members into this connection's temporary member table.
fn load_members(connection: &Connection, selection: &MemberSelection) -> Result<(), StoreError> {
    connection.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS export_member (patient_id TEXT PRIMARY KEY, since INTEGER);
         DELETE FROM temp.export_member;",
    )?;
    let mut insert = connection.prepare_cached("INSERT OR IGNORE INTO temp.export_member (patient_id, since) VALUES (?1, ?2)")?;
    for (patient, since) in &selection.members {
        insert.execute(params![patient, since])?;
    }
    Ok(())
}

/// The version of one resource (by key) as it was at the transaction time.
struct VersionAt {
    last_updated: Micros,
    deleted: bool,
    owner: Option<String>,
    /// True when that version is no longer current (its body is in the history table).
    historical: bool,
}

/// Which members a candidate resource was found through.
#[derive(Clone, Copy)]
struct Reach {
    /// Some member gets its full history (added to the Group since `_since`).
    full_history: bool,
    /// The smallest `since` among the other members, if any.
    existing_since: Option<Micros>,
}

impl Reach {
    /// The lower bound on `lastUpdated` that applies (`None`: none).
    fn since(self) -> Option<Micros> {
        if self.full_history { None } else { self.existing_since }
    }
}

/// Visits, in key order, every resource of `resource_type` in the members' compartments at the
/// transaction time with a key in `[first_key, last_key]`, passing its key, how it was reached,
/// and its version at the transaction time (resources that did not exist yet are skipped).
fn for_each_candidate(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    (first_key, last_key): (i64, i64),
    mut visit: impl FnMut(i64, Reach, &VersionAt) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let mut candidates = connection.prepare_cached(
        "SELECT c.rid, MAX(m.since IS NULL), MIN(m.since)
         FROM temp.export_member m
         JOIN compartment c ON c.tenant_id = ?1 AND c.patient_id = m.patient_id AND c.resource_type = ?2
         WHERE c.rid BETWEEN ?3 AND ?4 AND c.from_ts <= ?5 AND (c.to_ts IS NULL OR c.to_ts > ?5)
         GROUP BY c.rid ORDER BY c.rid",
    )?;
    let mut current =
        connection.prepare_cached("SELECT last_updated, deleted, owner FROM resources WHERE rid = ?1")?;
    let mut earlier = connection.prepare_cached(
        "SELECT last_updated, deleted, owner FROM resource_history
         WHERE rid = ?1 AND last_updated <= ?2 ORDER BY version DESC LIMIT 1",
    )?;
    let mut rows = candidates.query(params![tenant.0, resource_type, first_key, last_key, at])?;
    while let Some(row) = rows.next()? {
        let rid: i64 = row.get(0)?;
        let reach = Reach { full_history: row.get(1)?, existing_since: row.get(2)? };
        let read_version = |historical: bool| {
            move |row: &rusqlite::Row<'_>| {
                Ok(VersionAt { last_updated: row.get(0)?, deleted: row.get(1)?, owner: row.get(2)?, historical })
            }
        };
        let mut version = current.query_row([rid], read_version(false))?;
        if version.last_updated > at {
            match earlier.query_row(params![rid, at], read_version(true)).optional()? {
                Some(earlier_version) => version = earlier_version,
                None => continue,
            }
        }
        visit(rid, reach, &version)?;
    }
    Ok(())
}

fn selected(selection: &MemberSelection, reach: Reach, version: &VersionAt) -> bool {
    !version.deleted
        && reach.since().is_none_or(|since| version.last_updated > since)
        && selection.until.is_none_or(|until| version.last_updated < until)
        && visible(&selection.visibility, version)
}

fn visible(visibility: &Visibility, version: &VersionAt) -> bool {
    match visibility {
        Visibility::Tenant => true,
        Visibility::User(user) => version.owner.as_deref() == Some(user),
    }
}

pub(super) fn plan_parts(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_types: &[String],
    part_size: u64,
) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
    load_members(connection, selection)?;
    let part_size = part_size.max(1);
    let mut plan = Vec::new();
    for resource_type in resource_types {
        let mut parts: Vec<PartRange> = Vec::new();
        for_each_candidate(connection, tenant, selection, resource_type, (i64::MIN, i64::MAX), |rid, reach, version| {
            if !selected(selection, reach, version) {
                return Ok(());
            }
            match parts.last_mut() {
                Some(part) if part.count < part_size => {
                    part.last_key = rid;
                    part.count += 1;
                }
                _ => parts.push(PartRange { first_key: rid, last_key: rid, count: 1 }),
            }
            Ok(())
        })?;
        if !parts.is_empty() {
            plan.push((resource_type.clone(), parts));
        }
    }
    Ok(plan)
}

pub(super) fn stream_part(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    range: &PartRange,
    sink: &mut ResourceSink<'_>,
) -> Result<u64, StoreError> {
    load_members(connection, selection)?;
    let at = selection.transaction_time;
    let mut current_body = connection.prepare_cached("SELECT body FROM resources WHERE rid = ?1")?;
    let mut earlier_body = connection.prepare_cached(
        "SELECT body FROM resource_history WHERE rid = ?1 AND last_updated <= ?2 ORDER BY version DESC LIMIT 1",
    )?;
    let mut written = 0;
    for_each_candidate(connection, tenant, selection, resource_type, (range.first_key, range.last_key), |rid, reach, version| {
        if !selected(selection, reach, version) {
            return Ok(());
        }
        // The body is read by key only for selected resources, and handed to the sink without
        // a copy or a parse.
        let write = |row: &rusqlite::Row<'_>| {
            let body = row.get_ref(0)?.as_bytes()?;
            Ok(sink(body))
        };
        let outcome = if version.historical {
            earlier_body.query_row(params![rid, at], write)?
        } else {
            current_body.query_row([rid], write)?
        };
        outcome.map_err(|error| StoreError::Database(format!("export sink: {error}")))?;
        written += 1;
        Ok(())
    })?;
    Ok(written)
}

pub(super) fn deleted_in_compartments(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
) -> Result<Vec<(String, Micros)>, StoreError> {
    if selection.since.is_none() {
        return Ok(Vec::new());
    }
    load_members(connection, selection)?;
    let mut id_of = connection.prepare_cached("SELECT id FROM resources WHERE rid = ?1")?;
    let mut deleted = Vec::new();
    for_each_candidate(connection, tenant, selection, resource_type, (i64::MIN, i64::MAX), |rid, reach, version| {
        // Members added since `_since` never received the resource, so only members that could
        // have had it hear of its deletion.
        let Some(since) = reach.existing_since else { return Ok(()) };
        if version.deleted && version.last_updated > since && visible(&selection.visibility, version) {
            deleted.push((id_of.query_row([rid], |row| row.get(0))?, version.last_updated));
        }
        Ok(())
    })?;
    Ok(deleted)
}

pub(super) fn version_at(
    connection: &Connection,
    tenant: TenantId,
    resource_type: &str,
    id: &str,
    at: Micros,
) -> Result<Option<StoredResource>, StoreError> {
    let sql = "SELECT resource_type, id, version, last_updated, deleted, owner, body FROM resources
               WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3";
    let Some(current) = connection.prepare_cached(sql)?.query_row(params![tenant.0, resource_type, id], stored_from_row).optional()? else {
        return Ok(None);
    };
    let version = if current.last_updated <= at {
        Some(current)
    } else {
        let sql = "SELECT r.resource_type, r.id, h.version, h.last_updated, h.deleted, h.owner, h.body
                   FROM resource_history h JOIN resources r ON r.rid = h.rid
                   WHERE r.tenant_id = ?1 AND r.resource_type = ?2 AND r.id = ?3 AND h.last_updated <= ?4
                   ORDER BY h.version DESC LIMIT 1";
        connection.prepare_cached(sql)?.query_row(params![tenant.0, resource_type, id, at], stored_from_row).optional()?
    };
    Ok(version.filter(|version| !version.deleted))
}

pub(super) fn members_at(
    connection: &Connection,
    tenant: TenantId,
    group_id: &str,
    at: Micros,
) -> Result<Vec<String>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT DISTINCT patient_id FROM group_membership
         WHERE tenant_id = ?1 AND group_id = ?2 AND added_at <= ?3 AND (removed_at IS NULL OR removed_at > ?3)
         ORDER BY patient_id",
    )?;
    let members = statement.query_map(params![tenant.0, group_id, at], |row| row.get(0))?.collect::<Result<_, _>>()?;
    Ok(members)
}
