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
    /// The caller may see it (its owner matches a user-scoped selection).
    visible: bool,
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

    fn merge(self, other: Reach) -> Reach {
        let existing_since = match (self.existing_since, other.existing_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Reach { full_history: self.full_history || other.full_history, existing_since }
    }
}

/// Keys of `resource_type` in the members' compartments at the transaction time, within
/// `[first_key, last_key]`, sorted and deduplicated, each with how it was reached.
///
/// The member table drives the join (CROSS JOIN fixes the order): each member is one seek into
/// the compartment index, so the cost follows the export's size, not the tenant's.
fn candidates(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    (first_key, last_key): (i64, i64),
) -> Result<Vec<(i64, Reach)>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT c.rid, m.since IS NULL, m.since
         FROM temp.export_member m
         CROSS JOIN compartment c ON c.tenant_id = ?1 AND c.patient_id = m.patient_id AND c.resource_type = ?2
         WHERE c.rid BETWEEN ?3 AND ?4 AND c.from_ts <= ?5 AND (c.to_ts IS NULL OR c.to_ts > ?5)",
    )?;
    let mut rows = statement.query(params![tenant.0, resource_type, first_key, last_key, selection.transaction_time])?;
    let mut found: Vec<(i64, Reach)> = Vec::new();
    while let Some(row) = rows.next()? {
        found.push((row.get(0)?, Reach { full_history: row.get(1)?, existing_since: row.get(2)? }));
    }
    found.sort_unstable_by_key(|(rid, _)| *rid);
    found.dedup_by(|later, earlier| {
        if later.0 != earlier.0 {
            return false;
        }
        earlier.1 = earlier.1.merge(later.1);
        true
    });
    Ok(found)
}

/// Keys examined at once: bounds the candidate list's memory whatever the export's size.
/// (Tiny in unit tests, so the conformance suite crosses window edges.)
const WINDOW: i64 = if cfg!(test) { 3 } else { 1 << 18 };

/// Visits, in key order, every candidate (see [`candidates`]) with its version at the
/// transaction time (resources that did not exist yet are skipped) and, when `with_body`, that
/// version's stored JSON (empty otherwise, and for tombstones).
///
/// Candidates are taken a key window at a time. Where they are dense, one sequential scan of
/// the window replaces a lookup per key; without bodies the scan reads the narrow
/// `resources_meta` index instead of the rows.
fn for_each_candidate(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    (first_key, last_key): (i64, i64),
    with_body: bool,
    mut visit: impl FnMut(i64, Reach, &VersionAt, &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let span: (Option<i64>, Option<i64>) = connection
        // Two subqueries, not MIN and MAX in one: SQLite answers each of those with one index
        // seek only when it stands alone.
        .prepare_cached(
            "SELECT (SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 ORDER BY rid LIMIT 1),
                    (SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 ORDER BY rid DESC LIMIT 1)",
        )?
        .query_row(params![tenant.0, resource_type], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let (Some(type_first), Some(type_last)) = span else { return Ok(()) };
    let (source, body) = if with_body { ("resources", "body") } else { ("resources INDEXED BY resources_meta", "NULL") };
    let columns = format!("rid, last_updated, deleted, owner, {body}");
    let mut point = connection.prepare_cached(&format!("SELECT {columns} FROM {source} WHERE rid = ?1"))?;
    let mut scan = connection.prepare_cached(&format!("SELECT {columns} FROM {source} WHERE rid BETWEEN ?1 AND ?2 ORDER BY rid"))?;
    let mut earlier = connection.prepare_cached(&format!(
        "SELECT rid, last_updated, deleted, owner, {body} FROM resource_history
         WHERE rid = ?1 AND last_updated <= ?2 ORDER BY version DESC LIMIT 1"
    ))?;
    let mut context = Delivery { at: selection.transaction_time, user: selection.visibility.user(), earlier: &mut earlier };
    let (mut start, end) = (first_key.max(type_first), last_key.min(type_last));
    while start <= end {
        let window_end = start.saturating_add(WINDOW - 1).min(end);
        let found = candidates(connection, tenant, selection, resource_type, (start, window_end))?;
        if let (Some(first), Some(last)) = (found.first(), found.last()) {
            if found.len() as i64 * 4 >= last.0 - first.0 + 1 {
                let mut rows = scan.query(params![first.0, last.0])?;
                let mut pending = found.iter().peekable();
                while let Some(row) = rows.next()? {
                    let rid: i64 = row.get(0)?;
                    while pending.next_if(|(key, _)| *key < rid).is_some() {}
                    if let Some((_, reach)) = pending.next_if(|(key, _)| *key == rid) {
                        context.deliver(row, rid, *reach, &mut visit)?;
                    }
                    if pending.peek().is_none() {
                        break;
                    }
                }
            } else {
                for (rid, reach) in &found {
                    let mut rows = point.query([rid])?;
                    if let Some(row) = rows.next()? {
                        context.deliver(row, *rid, *reach, &mut visit)?;
                    }
                }
            }
        }
        if window_end == end {
            break;
        }
        start = window_end + 1;
    }
    Ok(())
}

/// What turns a current row into the version at the transaction time.
struct Delivery<'a, 'c> {
    at: Micros,
    user: Option<&'a str>,
    earlier: &'a mut rusqlite::CachedStatement<'c>,
}

impl Delivery<'_, '_> {
    fn version_of(&self, row: &rusqlite::Row<'_>) -> Result<VersionAt, StoreError> {
        let owner = row.get_ref(3)?.as_str_or_null()?;
        Ok(VersionAt { last_updated: row.get(1)?, deleted: row.get(2)?, visible: self.user.is_none() || owner == self.user })
    }

    /// Visits the current row's resource as it was at the transaction time (from history when it
    /// changed since; not at all when it did not exist yet).
    fn deliver(
        &mut self,
        row: &rusqlite::Row<'_>,
        rid: i64,
        reach: Reach,
        visit: &mut impl FnMut(i64, Reach, &VersionAt, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let version = self.version_of(row)?;
        if version.last_updated <= self.at {
            return visit(rid, reach, &version, row.get_ref(4)?.as_bytes_or_null()?.unwrap_or_default());
        }
        let at = self.at;
        let mut rows = self.earlier.query(params![rid, at])?;
        match rows.next()? {
            Some(then) => {
                let version = VersionAt {
                    last_updated: then.get(1)?,
                    deleted: then.get(2)?,
                    visible: self.user.is_none() || then.get_ref(3)?.as_str_or_null()? == self.user,
                };
                visit(rid, reach, &version, then.get_ref(4)?.as_bytes_or_null()?.unwrap_or_default())
            }
            None => Ok(()),
        }
    }
}

fn selected(selection: &MemberSelection, reach: Reach, version: &VersionAt) -> bool {
    !version.deleted
        && reach.since().is_none_or(|since| version.last_updated > since)
        && selection.until.is_none_or(|until| version.last_updated < until)
        && version.visible
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
    let mut present = connection.prepare_cached("SELECT EXISTS (SELECT 1 FROM resources WHERE tenant_id = ?1 AND resource_type = ?2)")?;
    for resource_type in resource_types {
        // One index seek rules out the many compartment types a tenant never stored.
        if !present.query_row(params![tenant.0, resource_type], |row| row.get::<_, bool>(0))? {
            continue;
        }
        let mut parts: Vec<PartRange> = Vec::new();
        for_each_candidate(connection, tenant, selection, resource_type, (i64::MIN, i64::MAX), false, |rid, reach, version, _| {
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
    let mut written = 0;
    for_each_candidate(connection, tenant, selection, resource_type, (range.first_key, range.last_key), true, |_, reach, version, body| {
        if !selected(selection, reach, version) {
            return Ok(());
        }
        // Stored bytes go to the sink as they are: no copy, no parse.
        sink(body).map_err(|error| StoreError::Database(format!("export sink: {error}")))?;
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
    for_each_candidate(connection, tenant, selection, resource_type, (i64::MIN, i64::MAX), false, |rid, reach, version, _| {
        // Members added since `_since` never received the resource, so only members that could
        // have had it hear of its deletion.
        let Some(since) = reach.existing_since else { return Ok(()) };
        if version.deleted && version.last_updated > since && version.visible {
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

pub(super) fn existing_at(
    connection: &Connection,
    tenant: TenantId,
    visibility: &Visibility,
    resource_type: &str,
    ids: &[String],
    at: Micros,
) -> Result<Vec<String>, StoreError> {
    let mut current = connection.prepare_cached(
        "SELECT rid, last_updated, deleted, owner FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3",
    )?;
    let mut earlier = connection.prepare_cached(
        "SELECT deleted, owner FROM resource_history WHERE rid = ?1 AND last_updated <= ?2 ORDER BY version DESC LIMIT 1",
    )?;
    let user = visibility.user();
    let mut existing = Vec::new();
    for id in ids {
        let row = current
            .query_row(params![tenant.0, resource_type, id], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Micros>(1)?, row.get::<_, bool>(2)?, row.get::<_, Option<String>>(3)?))
            })
            .optional()?;
        let Some((rid, last_updated, deleted, owner)) = row else { continue };
        let (deleted, owner) = if last_updated <= at {
            (deleted, owner)
        } else {
            match earlier.query_row(params![rid, at], |row| Ok((row.get::<_, bool>(0)?, row.get::<_, Option<String>>(1)?))).optional()? {
                Some(then) => then,
                None => continue,
            }
        };
        if !deleted && (user.is_none() || owner.as_deref() == user) {
            existing.push(id.clone());
        }
    }
    Ok(existing)
}
