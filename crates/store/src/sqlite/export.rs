//! Export reads: a consistent view of the members' compartments as of a transaction time.
//!
//! A resource is selected for a type when one of its compartment rows valid at the transaction
//! time names a member, and its version at that time exists, is not deleted, is visible, and was
//! last updated after the member's `since` (the most permissive member wins) and before `until`.

use bulkhead_fhir::{resource_type_code, Micros};
use rusqlite::{params, Connection, OptionalExtension};

use crate::selection::add_to_parts;
pub(super) use crate::selection::{selected, Reach, VersionAt};
use crate::{MemberSelection, PartRange, SelectionScope, StoreError, StoredResource, TenantId, Visibility};

use super::resources::stored_from_row;
use crate::cohort_keys::CohortKeys;

/// Loads the members into this connection's temporary member table, each with its patient key
/// (NULL for an id no write has named yet), unless it already holds exactly these members: the
/// files of one export, downloaded one after another on pooled connections, then skip reloading
/// thousands of rows each. Keys created since the table was loaded (patient keys only grow) are
/// filled in on reuse, so a reused table is as fresh as a reloaded one.
pub(super) fn load_members(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
) -> Result<(), StoreError> {
    connection.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS export_member (patient_id TEXT PRIMARY KEY, since INTEGER, pkey INTEGER);
         CREATE INDEX IF NOT EXISTS temp.export_member_by_pkey ON export_member (pkey);
         CREATE TEMP TABLE IF NOT EXISTS export_member_digest (digest BLOB NOT NULL, max_pkey INTEGER NOT NULL);",
    )?;
    let digest = members_digest(tenant, selection);
    let max_pkey: i64 = connection
        .prepare_cached("SELECT COALESCE(MAX(pkey), 0) FROM patient_keys")?
        .query_row([], |row| row.get(0))?;
    let loaded: Option<(Vec<u8>, i64)> = connection
        .prepare_cached("SELECT digest, max_pkey FROM temp.export_member_digest")?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    if let Some((_, loaded_max)) = loaded.filter(|(loaded, _)| *loaded == digest) {
        if loaded_max < max_pkey {
            connection
                .prepare_cached(
                    "UPDATE temp.export_member SET pkey = (SELECT p.pkey FROM patient_keys p
                         WHERE p.tenant_id = ?1 AND p.patient_id = temp.export_member.patient_id)
                     WHERE pkey IS NULL",
                )?
                .execute([tenant.0])?;
            connection.prepare_cached("UPDATE temp.export_member_digest SET max_pkey = ?1")?.execute([max_pkey])?;
        }
        return Ok(());
    }
    connection.execute_batch("DELETE FROM temp.export_member; DELETE FROM temp.export_member_digest;")?;
    let mut insert = connection.prepare_cached(
        "INSERT OR IGNORE INTO temp.export_member (patient_id, since, pkey)
         VALUES (?1, ?2, (SELECT pkey FROM patient_keys WHERE tenant_id = ?3 AND patient_id = ?1))",
    )?;
    for (patient, since) in &selection.members {
        insert.execute(params![patient, since, tenant.0])?;
    }
    connection
        .prepare_cached("INSERT INTO temp.export_member_digest (digest, max_pkey) VALUES (?1, ?2)")?
        .execute(params![&digest[..], max_pkey])?;
    Ok(())
}

/// The tenant with the members' digest ([`crate::Members::digest`], hashed once per shared
/// list): equal digests mean equal tables.
fn members_digest(tenant: TenantId, selection: &MemberSelection) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(tenant.0.to_le_bytes());
    hasher.update(selection.members.digest());
    hasher.finalize().into()
}

/// One resource found through the members' compartment rows, with its version at the
/// transaction time as those rows describe it. Packed into 32 bytes (a key window may hold
/// ~100k of them, in every planner and download at once): the reach's `since` and the version's
/// flags are stored flat.
struct Candidate {
    rid: i64,
    last_updated: Micros,
    /// [`Reach::existing_since`] when `flags` has [`Candidate::HAS_SINCE`].
    existing_since: Micros,
    flags: u8,
}

// The packing is the point: a larger candidate multiplies every planner's and download's window.
const _: () = assert!(std::mem::size_of::<Candidate>() == 32);

impl Candidate {
    const FULL_HISTORY: u8 = 1;
    const HAS_SINCE: u8 = 2;
    const DELETED: u8 = 4;
    const VISIBLE: u8 = 8;
    /// The version at the transaction time may not be the current one (the row's version is
    /// newer than the transaction time, or the row was closed by a later version): its state and
    /// body are then looked up in the history table.
    const HISTORICAL: u8 = 16;

    fn new(rid: i64, reach: Reach, version: VersionAt, historical: bool) -> Candidate {
        let mut candidate = Candidate { rid, last_updated: version.last_updated, existing_since: 0, flags: 0 };
        candidate.set_reach(reach);
        candidate.set(Candidate::DELETED, version.deleted);
        candidate.set(Candidate::VISIBLE, version.visible);
        candidate.set(Candidate::HISTORICAL, historical);
        candidate
    }

    fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn reach(&self) -> Reach {
        Reach {
            full_history: self.has(Candidate::FULL_HISTORY),
            existing_since: self.has(Candidate::HAS_SINCE).then_some(self.existing_since),
        }
    }

    fn set_reach(&mut self, reach: Reach) {
        self.set(Candidate::FULL_HISTORY, reach.full_history);
        self.set(Candidate::HAS_SINCE, reach.existing_since.is_some());
        self.existing_since = reach.existing_since.unwrap_or(0);
    }

    fn version(&self) -> VersionAt {
        VersionAt {
            last_updated: self.last_updated,
            deleted: self.has(Candidate::DELETED),
            visible: self.has(Candidate::VISIBLE),
        }
    }

    fn historical(&self) -> bool {
        self.has(Candidate::HISTORICAL)
    }
}

/// Resources of `resource_type` in the members' compartments at the transaction time, with a
/// key within `[first_key, last_key]`, sorted and deduplicated.
///
/// The member table drives the join (CROSS JOIN fixes the order): each member is one seek into
/// the compartment index, so the cost follows the export's size, not the tenant's. The rows
/// carry each resource's last `lastUpdated`, tombstone flag and owner, so no resource row is read.
/// Members are visited in patient-key order (a scan of the member table's key index; the key
/// leads the compartment's primary key): consecutive seeks then land on the same or the next leaf page, where in
/// patient-id order each one read a page of its own (at 10,000 members, half of a download's
/// CPU went to these seeks and their page reads).
const CANDIDATES_SQL: &str =
    "SELECT c.rid, m.since IS NULL, m.since, c.last_updated, c.deleted, c.owner, c.to_ts IS NOT NULL
     FROM temp.export_member AS m INDEXED BY export_member_by_pkey
     CROSS JOIN compartment c ON c.pkey = m.pkey AND c.type_code = ?2
     WHERE c.rid BETWEEN ?3 AND ?4 AND c.from_ts <= ?5 AND (c.to_ts IS NULL OR c.to_ts > ?5)
       AND c.tenant_id = ?1";

///
/// None when the window holds more than `row_limit` rows (the rows read so far are dropped).
fn candidates(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    (first_key, last_key): (i64, i64),
    row_limit: Option<usize>,
) -> Result<Option<Vec<Candidate>>, StoreError> {
    if selection.scope == SelectionScope::Tenant {
        return tenant_candidates(connection, tenant, selection, resource_type, (first_key, last_key), row_limit);
    }
    let at = selection.transaction_time;
    let user = selection.visibility.user();
    let Some(code) = resource_type_code(resource_type) else { return Ok(Some(Vec::new())) };
    let mut statement = connection.prepare_cached(CANDIDATES_SQL)?;
    let mut rows = statement.query(params![tenant.0, code, first_key, last_key, at])?;
    let mut found: Vec<Candidate> = Vec::new();
    while let Some(row) = rows.next()? {
        if row_limit.is_some_and(|limit| found.len() == limit) {
            return Ok(None);
        }
        let last_updated: Micros = row.get(3)?;
        found.push(Candidate::new(
            row.get(0)?,
            Reach { full_history: row.get(1)?, existing_since: row.get(2)? },
            VersionAt {
                last_updated,
                deleted: row.get(4)?,
                visible: user.is_none() || row.get_ref(5)?.as_str_or_null()? == user,
            },
            // A closed row describes a version that has since been replaced.
            last_updated > at || row.get::<_, bool>(6)?,
        ));
    }
    found.sort_unstable_by_key(|candidate| candidate.rid);
    found.dedup_by(|later, earlier| {
        if later.rid != earlier.rid {
            return false;
        }
        // Rows of one resource describe the same version unless one was written after the
        // transaction time; then history decides.
        earlier.set_reach(earlier.reach().merge(later.reach()));
        let historical = earlier.historical() || later.historical();
        earlier.set(Candidate::HISTORICAL, historical);
        true
    });
    Ok(Some(found))
}

/// Every resource of `resource_type` in the tenant with a key within `[first_key, last_key]`, in
/// key order (a system-level export): read by type in key order from the resource rows, not
/// through the compartment index. The export's `_since` applies to each. None past `row_limit`.
fn tenant_candidates(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    (first_key, last_key): (i64, i64),
    row_limit: Option<usize>,
) -> Result<Option<Vec<Candidate>>, StoreError> {
    let at = selection.transaction_time;
    let user = selection.visibility.user();
    let mut statement = connection.prepare_cached(
        "SELECT rid, last_updated, deleted, owner FROM resources
         WHERE tenant_id = ?1 AND resource_type = ?2 AND rid BETWEEN ?3 AND ?4 ORDER BY rid",
    )?;
    let mut rows = statement.query(params![tenant.0, resource_type, first_key, last_key])?;
    let mut found = Vec::new();
    while let Some(row) = rows.next()? {
        if row_limit.is_some_and(|limit| found.len() == limit) {
            return Ok(None);
        }
        let last_updated: Micros = row.get(1)?;
        found.push(Candidate::new(
            row.get(0)?,
            Reach { full_history: false, existing_since: selection.since },
            VersionAt {
                last_updated,
                deleted: row.get(2)?,
                visible: user.is_none() || row.get_ref(3)?.as_str_or_null()? == user,
            },
            // Written since the transaction time: history holds the version then, if any.
            last_updated > at,
        ));
    }
    Ok(Some(found))
}

/// Keys examined at once at first: bounds the candidate list's memory whatever the export's
/// size. (Tiny in unit tests, so the conformance suite crosses window edges.)
pub(super) const WINDOW: i64 = if cfg!(test) { 3 } else { 1 << 17 };

/// How reading one key window went.
pub(super) enum WindowRead {
    /// Every selected resource was visited; the window held this many candidates.
    Read(usize),
    /// The window held more rows than its limit: nothing was visited.
    TooManyRows,
}

/// Successive key windows over a key range, each read in one pass over the members.
///
/// A window starts [`WINDOW`] keys wide. One that held fewer than half as many candidates makes
/// the next twice as wide; a wider one is read with a limit of [`WINDOW`] rows and, past it,
/// read again at half the width. So no window holds more rows than one [`WINDOW`] keys wide
/// would, while a type whose keys are spread among other types' takes a few passes over the
/// members instead of one per [`WINDOW`] keys (Synthea ×100: 27,800 CarePlans spread over 25
/// windows' keys, and 10,000 members' compartment pages read again for each).
pub(super) struct KeyWindows {
    /// The first key not read yet; None once the range is.
    start: Option<i64>,
    last: i64,
    width: i64,
}

impl KeyWindows {
    pub(super) fn new(first: i64, last: i64) -> KeyWindows {
        KeyWindows { start: (first <= last).then_some(first), last, width: WINDOW }
    }

    /// The window to read next and its row limit; None once the whole range is read.
    pub(super) fn current(&self) -> Option<((i64, i64), Option<usize>)> {
        let start = self.start?;
        let end = start.saturating_add(self.width - 1).min(self.last);
        Some(((start, end), (self.width > WINDOW).then_some(WINDOW as usize)))
    }

    /// Records how the window [`KeyWindows::current`] gave was read.
    pub(super) fn record(&mut self, read: WindowRead) {
        let Some(((_, end), _)) = self.current() else { return };
        match read {
            WindowRead::Read(candidates) => {
                self.start = (end < self.last).then(|| end + 1);
                if (candidates as i64) < WINDOW / 2 {
                    self.width = self.width.saturating_mul(2);
                }
            }
            WindowRead::TooManyRows => self.width = (self.width / 2).max(WINDOW),
        }
    }
}

/// The smallest and largest key of the tenant's resources of `resource_type` (None: it has none).
pub(super) fn type_span(
    connection: &Connection,
    tenant: TenantId,
    resource_type: &str,
) -> Result<Option<(i64, i64)>, StoreError> {
    let span: (Option<i64>, Option<i64>) = connection
        // Two subqueries, not MIN and MAX in one: SQLite answers each of those with one index
        // seek only when it stands alone.
        .prepare_cached(
            "SELECT (SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 ORDER BY rid LIMIT 1),
                    (SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 ORDER BY rid DESC LIMIT 1)",
        )?
        .query_row(params![tenant.0, resource_type], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(match span {
        (Some(first), Some(last)) => Some((first, last)),
        _ => None,
    })
}

/// A resource whose version at the transaction time passed the selection.
pub(super) struct Chosen {
    pub(super) rid: i64,
    /// Which members it was found through.
    pub(super) reach: Reach,
    pub(super) version: VersionAt,
    /// The history version holding that version's body; 0 when it was the current row then.
    pub(super) history_version: i64,
}

/// The resources in the members' compartments at the transaction time (see [`candidates`]) with
/// a key within one window `[start, end]` whose version then passes `select`, handed to `visit`
/// in key order as each is resolved (not collected: only the window's compact candidates are
/// held at once).
///
/// The outcome depends only on the transaction time, not on the snapshot that reads it: the
/// compartment index is versioned by time and history keeps every replaced version, so windows
/// read in separate transactions agree whatever was written in between. The members must be
/// loaded on this connection ([`load_members`]). With a `row_limit`, a window holding more rows
/// visits nothing.
#[allow(clippy::too_many_arguments)]
pub(super) fn select_window(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    (start, end): (i64, i64),
    row_limit: Option<usize>,
    select: impl Fn(Reach, &VersionAt) -> bool,
    mut visit: impl FnMut(Chosen) -> Result<(), StoreError>,
) -> Result<WindowRead, StoreError> {
    // `_typeFilter` needs the version's JSON: read only for filtered types.
    let filtered = selection.filters.filters(resource_type);
    let Some(candidates) = candidates(connection, tenant, selection, resource_type, (start, end), row_limit)? else {
        return Ok(WindowRead::TooManyRows);
    };
    let count = candidates.len();
    // Resolve versions changed since the transaction time, then keep the selected ones;
    // historical ones remember which version holds their body.
    for candidate in candidates {
        let (version, history_version) = if candidate.historical() {
            match version_in_history(connection, selection, candidate.rid)? {
                Some((number, version)) => (version, number),
                None => continue, // created after the transaction time
            }
        } else {
            (candidate.version(), 0)
        };
        let reach = candidate.reach();
        if select(reach, &version)
            && (!filtered || filter_matches(connection, selection, resource_type, candidate.rid, history_version)?)
        {
            visit(Chosen { rid: candidate.rid, reach, version, history_version })?;
        }
    }
    Ok(WindowRead::Read(count))
}

/// The history version of `rid` current at the selection's transaction time, with its state as
/// the selection rules read it (visibility for the selection's user); None when the resource was
/// created after that time.
pub(super) fn version_in_history(
    connection: &Connection,
    selection: &MemberSelection,
    rid: i64,
) -> Result<Option<(i64, VersionAt)>, StoreError> {
    let user = selection.visibility.user();
    let found = connection
        .prepare_cached(
            "SELECT version, last_updated, deleted, owner FROM resource_history
             WHERE rid = ?1 AND last_updated <= ?2 ORDER BY version DESC LIMIT 1",
        )?
        .query_row(params![rid, selection.transaction_time], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                VersionAt {
                    last_updated: row.get(1)?,
                    deleted: row.get(2)?,
                    visible: user.is_none() || row.get_ref(3)?.as_str_or_null()? == user,
                },
            ))
        })
        .optional()?;
    Ok(found)
}

/// Whether the version of `rid` held by the current row (`history_version` 0) or by that history
/// version matches the selection's `_typeFilter` for its type. Versions never change, so the
/// plan's counts and the download's lines agree.
pub(super) fn filter_matches(
    connection: &Connection,
    selection: &MemberSelection,
    resource_type: &str,
    rid: i64,
    history_version: i64,
) -> Result<bool, StoreError> {
    let mut statement = if history_version == 0 {
        connection.prepare_cached("SELECT body FROM resources WHERE rid = ?1 AND ?2 = 0")?
    } else {
        connection.prepare_cached("SELECT body FROM resource_history WHERE rid = ?1 AND version = ?2")?
    };
    let mut rows = statement.query(params![rid, history_version])?;
    let Some(row) = rows.next()? else { return Ok(false) };
    let Some(body) = row.get_ref(0)?.as_bytes_or_null()? else { return Ok(false) };
    Ok(selection.filters.matches_json(resource_type, body))
}

/// Visits, in key order, every resource in the members' compartments at the transaction time
/// whose version then passes `select`, with that version, a key window at a time.
fn for_each_selected(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    (first_key, last_key): (i64, i64),
    select: impl Fn(Reach, &VersionAt) -> bool,
    mut visit: impl FnMut(i64, &VersionAt) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let Some((type_first, type_last)) = type_span(connection, tenant, resource_type)? else { return Ok(()) };
    let mut windows = KeyWindows::new(first_key.max(type_first), last_key.min(type_last));
    while let Some((window, row_limit)) = windows.current() {
        let read = select_window(connection, tenant, selection, resource_type, window, row_limit, &select, |chosen| {
            visit(chosen.rid, &chosen.version)
        })?;
        windows.record(read);
    }
    Ok(())
}

/// Splits the selected resources of one type into consecutive key ranges of at most
/// `part_size` resources (none when the type has no selected resource). The members must be
/// loaded on this connection ([`load_members`]).
pub(super) fn plan_type(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    part_size: u64,
    cohort: Option<&CohortKeys>,
) -> Result<Vec<PartRange>, StoreError> {
    // One index seek rules out the many compartment types a tenant never stored.
    let present: bool = connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM resources WHERE tenant_id = ?1 AND resource_type = ?2)")?
        .query_row(params![tenant.0, resource_type], |row| row.get(0))?;
    let mut parts: Vec<PartRange> = Vec::new();
    if !present {
        return Ok(parts);
    }
    let part_size = part_size.max(1);
    // The cohort's keys read in one pass over the members, when they cover the type.
    if let Some(cohort) = cohort.filter(|cohort| cohort.covers(resource_type)) {
        let filtered = selection.filters.filters(resource_type);
        super::cohort::visit(cohort, connection, selection, resource_type, (i64::MIN, i64::MAX), |found| {
            if found.selected
                && (!filtered
                    || filter_matches(connection, selection, resource_type, found.rid, found.history_version)?)
            {
                add_to_parts(&mut parts, found.rid, part_size);
            }
            Ok(())
        })?;
        return Ok(parts);
    }
    let select = |reach, version: &VersionAt| selected(selection, reach, version);
    for_each_selected(connection, tenant, selection, resource_type, (i64::MIN, i64::MAX), select, |rid, _| {
        add_to_parts(&mut parts, rid, part_size);
        Ok(())
    })?;
    Ok(parts)
}

/// `deleted[]` of one type, in key order: resources the client must drop.
///
/// Two kinds (Bulk Data IG §deleted; README "Group export"):
/// - deleted: the version at the transaction time is a tombstone written after `_since`, found
///   through a member that was a member at `_since` too (a continuing member);
/// - no longer part of this cohort's data: live at `_since` in a continuing member's compartment,
///   and at the transaction time not live in any member's compartment (e.g. a wrong-patient
///   correction re-pointed it to a non-member), see [`left_the_cohort`].
///
/// Data held only through members removed since `_since` is not listed: the manifest's
/// `removedMembers` covers it.
pub(super) fn deleted_in_compartments(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
) -> Result<Vec<(String, Micros)>, StoreError> {
    let Some(since) = selection.since else { return Ok(Vec::new()) };
    load_members(connection, tenant, selection)?;
    let mut id_of = connection.prepare_cached("SELECT id FROM resources WHERE rid = ?1")?;
    let mut deleted: Vec<(i64, Micros)> = Vec::new();
    // Members added since `_since` never received the resource, so only members that could have
    // had it hear of its deletion.
    let select = |reach: Reach, version: &VersionAt| {
        reach.existing_since.is_some_and(|since| version.deleted && version.last_updated > since && version.visible)
    };
    // Tombstones have no JSON to filter: every deletion of the type is listed (a superset).
    let unfiltered;
    let selection = if selection.filters.is_empty() {
        selection
    } else {
        unfiltered = MemberSelection { filters: Default::default(), ..selection.clone() };
        &unfiltered
    };
    let all = (i64::MIN, i64::MAX);
    for_each_selected(connection, tenant, selection, resource_type, all, select, |rid, version| {
        deleted.push((rid, version.last_updated));
        Ok(())
    })?;
    // A system-level export has no cohort to leave.
    if selection.scope == SelectionScope::Members {
        deleted.extend(left_the_cohort(connection, tenant, selection, resource_type, since)?);
    }
    // A resource both deleted and moved out is listed once.
    deleted.sort_unstable_by_key(|(rid, _)| *rid);
    deleted.dedup_by_key(|(rid, _)| *rid);
    deleted.into_iter().map(|(rid, at)| Ok((id_of.query_row([rid], |row| row.get(0))?, at))).collect()
}

/// Resources of the type that were live, visible and in a continuing member's compartment at
/// `since`, and at the transaction time are not live in any member's compartment, as
/// `(rid, lastUpdated of the version at the transaction time)`.
///
/// Such a resource left a continuing member's compartment in `(since, transaction time]` (its
/// row there was closed), or is deleted (the caller's deleted pass finds those whose rows stayed
/// open). Closed rows are rare and indexed by time, so this reads only the tenant's moves in the
/// window, whatever the cohort's size.
fn left_the_cohort(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    since: Micros,
) -> Result<Vec<(i64, Micros)>, StoreError> {
    let at = selection.transaction_time;
    let user = selection.visibility.user();
    let Some(code) = resource_type_code(resource_type) else { return Ok(Vec::new()) };
    let mut moved = connection.prepare_cached(
        // CROSS JOIN: the closed rows drive (through their partial index), not the members.
        "SELECT DISTINCT c.rid, c.owner FROM compartment c
         CROSS JOIN temp.export_member m ON m.pkey = c.pkey AND m.since IS NOT NULL
         WHERE c.tenant_id = ?1 AND c.type_code = ?2 AND c.to_ts IS NOT NULL AND c.to_ts > ?3 AND c.to_ts <= ?4
           AND c.from_ts <= ?3",
    )?;
    let candidates: Vec<(i64, Option<String>)> = moved
        .query_map(params![tenant.0, code, since, at], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    // Rows of the resource valid at the transaction time that name a member (open ones, or ones
    // closed after it).
    let mut in_cohort_at = connection.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM compartment c CROSS JOIN temp.export_member m ON m.pkey = c.pkey
                        WHERE c.rid = ?1 AND c.to_ts IS NULL AND c.from_ts <= ?2)
             OR EXISTS (SELECT 1 FROM compartment c CROSS JOIN temp.export_member m ON m.pkey = c.pkey
                        WHERE c.rid = ?1 AND c.to_ts IS NOT NULL AND c.to_ts > ?2 AND c.from_ts <= ?2)",
    )?;
    let mut left = Vec::new();
    for (rid, owner) in candidates {
        if user.is_some_and(|user| owner.as_deref() != Some(user)) {
            continue;
        }
        // The client holds it only if it was live at `since`.
        if state_at(connection, rid, since)?.is_none_or(|(_, deleted)| deleted) {
            continue;
        }
        let Some((last_updated, deleted)) = state_at(connection, rid, at)? else { continue };
        let still_in_cohort = !deleted && in_cohort_at.query_row(params![rid, at], |row| row.get::<_, bool>(0))?;
        if !still_in_cohort {
            left.push((rid, last_updated));
        }
    }
    Ok(left)
}

/// `(lastUpdated, deleted)` of a resource's version at `at`; `None` before it existed.
fn state_at(connection: &Connection, rid: i64, at: Micros) -> Result<Option<(Micros, bool)>, StoreError> {
    let current: Option<(Micros, bool)> = connection
        .prepare_cached("SELECT last_updated, deleted FROM resources WHERE rid = ?1")?
        .query_row([rid], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    match current {
        Some(current) if current.0 <= at => Ok(Some(current)),
        _ => Ok(connection
            .prepare_cached(
                "SELECT last_updated, deleted FROM resource_history WHERE rid = ?1 AND last_updated <= ?2
                 ORDER BY version DESC LIMIT 1",
            )?
            .query_row(params![rid, at], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?),
    }
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
    let Some(current) =
        connection.prepare_cached(sql)?.query_row(params![tenant.0, resource_type, id], stored_from_row).optional()?
    else {
        return Ok(None);
    };
    let version = if current.last_updated <= at {
        Some(current)
    } else {
        let sql = "SELECT r.resource_type, r.id, h.version, h.last_updated, h.deleted, h.owner, h.body
                   FROM resource_history h JOIN resources r ON r.rid = h.rid
                   WHERE r.tenant_id = ?1 AND r.resource_type = ?2 AND r.id = ?3 AND h.last_updated <= ?4
                   ORDER BY h.version DESC LIMIT 1";
        connection
            .prepare_cached(sql)?
            .query_row(params![tenant.0, resource_type, id, at], stored_from_row)
            .optional()?
    };
    Ok(version.filter(|version| !version.deleted))
}

/// The version of `resource_type/id` at `at` without its body, tombstones included, with the
/// resource's `rid` (None: no version by `at`). The body, the last column of both tables, is not
/// read: a large Group's overflow pages stay untouched.
pub(super) fn version_head_at(
    connection: &Connection,
    tenant: TenantId,
    resource_type: &str,
    id: &str,
    at: Micros,
) -> Result<Option<(i64, StoredResource)>, StoreError> {
    let head = |rid: i64, row: &rusqlite::Row<'_>, first: usize| -> rusqlite::Result<(i64, StoredResource)> {
        Ok((
            rid,
            StoredResource {
                resource_type: resource_type.to_owned(),
                id: id.to_owned(),
                version: row.get(first)?,
                last_updated: row.get(first + 1)?,
                deleted: row.get(first + 2)?,
                owner: row.get(first + 3)?,
                body: None,
            },
        ))
    };
    let current = connection
        .prepare_cached(
            "SELECT rid, version, last_updated, deleted, owner FROM resources
             WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3",
        )?
        .query_row(params![tenant.0, resource_type, id], |row| head(row.get(0)?, row, 1))
        .optional()?;
    let Some((rid, current)) = current else { return Ok(None) };
    if current.last_updated <= at {
        return Ok(Some((rid, current)));
    }
    Ok(connection
        .prepare_cached(
            "SELECT version, last_updated, deleted, owner FROM resource_history WHERE rid = ?1 AND last_updated <= ?2
             ORDER BY version DESC LIMIT 1",
        )?
        .query_row(params![rid, at], |row| head(rid, row, 0))
        .optional()?)
}

/// The body of version `version` of the resource `rid` (the current row's, or an earlier one's
/// from history); None for a tombstone or a version no longer kept.
pub(super) fn version_body(connection: &Connection, rid: i64, version: i64) -> Result<Option<String>, StoreError> {
    let current: Option<Option<String>> = connection
        .prepare_cached("SELECT body FROM resources WHERE rid = ?1 AND version = ?2")?
        .query_row(params![rid, version], |row| row.get(0))
        .optional()?;
    if let Some(body) = current {
        return Ok(body);
    }
    Ok(connection
        .prepare_cached("SELECT body FROM resource_history WHERE rid = ?1 AND version = ?2")?
        .query_row(params![rid, version], |row| row.get::<_, Option<String>>(0))
        .optional()?
        .flatten())
}

pub(super) fn members_at(
    connection: &Connection,
    tenant: TenantId,
    group_id: &str,
    at: Micros,
) -> Result<Vec<String>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT DISTINCT p.patient_id FROM group_membership g JOIN patient_keys p ON p.pkey = g.pkey
         WHERE g.group_rid = (SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = 'Group' AND id = ?2)
           AND g.tenant_id = ?1 AND g.added_at <= ?3 AND (g.removed_at IS NULL OR g.removed_at > ?3)
         ORDER BY p.patient_id",
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
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, Micros>(1)?,
                    row.get::<_, bool>(2)?,
                    row.get::<_, Option<String>>(3)?,
                ))
            })
            .optional()?;
        let Some((rid, last_updated, deleted, owner)) = row else { continue };
        let (deleted, owner) = if last_updated <= at {
            (deleted, owner)
        } else {
            match earlier
                .query_row(params![rid, at], |row| Ok((row.get::<_, bool>(0)?, row.get::<_, Option<String>>(1)?)))
                .optional()?
            {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows tile the range without gap or overlap; sparse ones double the next one's width,
    /// and a wide one that held too many rows is read again, narrower, from the same key, never
    /// narrower than [`WINDOW`].
    #[test]
    fn key_windows_widen_over_sparse_keys_and_narrow_past_their_row_limit() {
        let mut windows = KeyWindows::new(10, 40);
        assert_eq!(windows.current(), Some(((10, 12), None)));
        windows.record(WindowRead::Read(0));
        assert_eq!(windows.current(), Some(((13, 18), Some(3))));
        windows.record(WindowRead::Read(0));
        assert_eq!(windows.current(), Some(((19, 30), Some(3))));
        windows.record(WindowRead::TooManyRows);
        assert_eq!(windows.current(), Some(((19, 24), Some(3))));
        windows.record(WindowRead::TooManyRows);
        assert_eq!(windows.current(), Some(((19, 21), None)));
        windows.record(WindowRead::TooManyRows);
        assert_eq!(windows.current(), Some(((19, 21), None)), "never narrower than WINDOW");
        windows.record(WindowRead::Read(3));
        assert_eq!(windows.current(), Some(((22, 24), None)), "a full window keeps the width");
        windows.record(WindowRead::Read(0));
        windows.record(WindowRead::Read(0));
        assert_eq!(windows.current(), Some(((31, 40), Some(3))), "the last window ends at the range's end");
        windows.record(WindowRead::Read(1));
        assert_eq!(windows.current(), None);
        assert_eq!(KeyWindows::new(5, 4).current(), None);
    }

    /// The candidates' join walks the members in patient-key order and seeks each one's rows by
    /// the compartment's primary key (the plan the download cost model relies on).
    #[test]
    fn members_drive_the_compartment_seeks_in_key_order() {
        let directory = tempfile::tempdir().unwrap();
        let store = super::super::SqliteStore::open(&directory.path().join("test.db")).unwrap();
        let selection = MemberSelection {
            members: vec![("b".to_owned(), None), ("a".to_owned(), Some(5))].into_iter().collect(),
            since: None,
            until: None,
            transaction_time: 10,
            visibility: Visibility::Tenant,
            scope: SelectionScope::Members,
            filters: Default::default(),
        };
        let plan: Vec<String> = store
            .with_read(|connection| {
                load_members(connection, TenantId(1), &selection)?;
                let mut explain = connection.prepare(&format!("EXPLAIN QUERY PLAN {CANDIDATES_SQL}"))?;
                let details = explain
                    .query_map(params![1, 1, 0, 100, 10], |row| row.get::<_, String>(3))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(details)
            })
            .unwrap();
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert!(plan[0].contains("m USING") && plan[0].contains("export_member_by_pkey"), "{plan:?}");
        assert!(
            plan[1].starts_with("SEARCH c USING PRIMARY KEY (pkey=? AND type_code=? AND rid>? AND rid<?)"),
            "{plan:?}"
        );
    }
}
