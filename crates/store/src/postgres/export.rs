//! Export reads on PostgreSQL: the members' compartments as of a transaction time, a key window
//! at a time. The same selection rules as the SQLite store (`sqlite/export.rs`):
//!
//! A resource is selected for a type when one of its compartment rows valid at the transaction
//! time names a member, and its version at that time exists, is not deleted, is visible, and was
//! last updated after the member's `since` (the most permissive member wins) and before `until`.
//!
//! The members travel as two array parameters (`unnest`) of patient keys and `since`s, not a
//! temporary table: nothing is left on a pooled connection, and every statement is a plain,
//! tenant-scoped join.

use std::collections::HashMap;
use std::sync::OnceLock;

use bulkhead_fhir::Micros;

use super::member_keys::MemberKeys;
use super::resources::{stored_from_row, type_code, VERSION_COLUMNS};
use super::Db;
use crate::cohort_keys::CohortKeys;
use crate::selection::add_to_parts;
pub(super) use crate::selection::{selected, Reach, VersionAt};
use crate::{MemberSelection, PartRange, SelectionScope, StoreError, StoredResource, TenantId, Visibility};

/// The members of a selection as array parameters: patient keys and each one's `since`.
pub(super) struct Members {
    pkeys: Vec<i64>,
    since: Vec<Option<i64>>,
    /// Each member's reach by key, built by the first window read by key (or, for a large
    /// selection, when resolved, to count the distinct members).
    by_key: OnceLock<HashMap<i64, Reach>>,
    /// At least half the tenant's patients are members: every window is read by key (see
    /// [`member_candidates`]).
    most_of_tenant: bool,
}

impl Members {
    /// Looks the members' patient keys up once. A member without a key has never been named by
    /// any write, so it has no compartment rows; resolved at or after the transaction time
    /// (every write stamped before it has committed), it cannot gain rows valid then.
    pub(super) fn resolve(
        db: &mut Db<'_>,
        keys: &MemberKeys,
        tenant: TenantId,
        selection: &MemberSelection,
    ) -> Result<Members, StoreError> {
        let ids: Vec<&str> = selection.members.iter().map(|(id, _)| id.as_str()).collect();
        let resolved = keys.resolve(db, tenant, &ids)?;
        let mut members = Members {
            pkeys: Vec::with_capacity(ids.len()),
            since: Vec::with_capacity(ids.len()),
            by_key: OnceLock::new(),
            most_of_tenant: false,
        };
        for ((_, since), pkey) in selection.members.iter().zip(resolved) {
            if let Some(pkey) = pkey {
                members.pkeys.push(pkey);
                members.since.push(*since);
            }
        }
        if members.pkeys.len() >= MEMBERS_TO_COUNT_PATIENTS {
            let distinct = members.by_key().len() as i64;
            // Counts at most twice the members, so a small Group in a large tenant stays cheap.
            let patients: i64 = db
                .query_one(
                    "SELECT count(*) FROM (SELECT 1 FROM patient_keys WHERE tenant_id = $1 LIMIT $2) AS p",
                    &[&tenant.0, &(2 * distinct + 1)],
                )?
                .try_get(0)?;
            members.most_of_tenant = 2 * distinct >= patients;
        }
        Ok(members)
    }

    /// Distinct member keys in key order, each with its reach bits (see [`super::cohort`]).
    pub(super) fn reach_bits(&self) -> (Vec<i64>, Vec<i32>) {
        super::cohort::reach_bits(self.pkeys.iter().zip(&self.since))
    }

    /// The reach of each member's key (a patient listed twice: both reaches merged).
    fn by_key(&self) -> &HashMap<i64, Reach> {
        self.by_key.get_or_init(|| {
            let mut by_key: HashMap<i64, Reach> = HashMap::with_capacity(self.pkeys.len());
            for (pkey, since) in self.pkeys.iter().zip(&self.since) {
                let reach = Reach { full_history: since.is_none(), existing_since: *since };
                by_key.entry(*pkey).and_modify(|known| *known = known.merge(reach)).or_insert(reach);
            }
            by_key
        })
    }
}

/// A resource chosen in a window: its key, its version at the transaction time, and the history
/// version holding that version's body (0: the current row then).
pub(super) struct Chosen {
    pub(super) rid: i64,
    /// Which members it was found through.
    pub(super) reach: Reach,
    pub(super) version: VersionAt,
    pub(super) history_version: i64,
}

/// Keys examined at once: bounds the candidate list's memory whatever the export's size.
/// (Tiny in unit tests, so the conformance suite crosses window edges.)
pub(super) const WINDOW: i64 = if cfg!(test) { 3 } else { 1 << 17 };

/// The smallest and largest key of the tenant's resources of a type (None: it has none).
pub(super) fn type_span(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_type: &str,
) -> Result<Option<(i64, i64)>, StoreError> {
    let row = db.query_one(
        "SELECT min(rid), max(rid) FROM resources WHERE tenant_id = $1 AND resource_type = $2",
        &[&tenant.0, &resource_type],
    )?;
    Ok(match (row.try_get::<_, Option<i64>>(0)?, row.try_get::<_, Option<i64>>(1)?) {
        (Some(first), Some(last)) => Some((first, last)),
        _ => None,
    })
}

/// The resources in the members' compartments at the transaction time with a key within one
/// window `[start, end]` whose version then passes `select`, in key order. The outcome depends
/// only on the transaction time (the index is versioned by time, history keeps every replaced
/// version), so windows read in separate transactions agree whatever was written between.
pub(super) fn select_window(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    members: &Members,
    resource_type: &str,
    window: (i64, i64),
    select: impl Fn(Reach, &VersionAt) -> bool,
) -> Result<Vec<Chosen>, StoreError> {
    let mut chosen = Vec::new();
    let mut scratch = Vec::new();
    select_window_each(db, tenant, selection, members, resource_type, window, select, &mut scratch, |found| {
        chosen.push(found)
    })?;
    Ok(chosen)
}

/// [`select_window`] handing each chosen resource to `visit`, with `scratch` (emptied first)
/// for the window's candidates: a caller reading many windows keeps one allocation for all.
#[allow(clippy::too_many_arguments)]
pub(super) fn select_window_each(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    members: &Members,
    resource_type: &str,
    (start, end): (i64, i64),
    select: impl Fn(Reach, &VersionAt) -> bool,
    scratch: &mut Vec<Candidate>,
    mut visit: impl FnMut(Chosen),
) -> Result<(), StoreError> {
    scratch.clear();
    match selection.scope {
        SelectionScope::Members => {
            let Ok(code) = type_code(resource_type) else { return Ok(()) };
            member_candidates(db, tenant, selection, members, code, (start, end), scratch)?
        }
        SelectionScope::Tenant => tenant_candidates(db, tenant, selection, resource_type, (start, end), scratch)?,
    };
    // `_typeFilter` needs the version's JSON: read only for filtered types.
    let filtered = selection.filters.filters(resource_type);
    for &(rid, reach, version, historical) in scratch.iter() {
        let (version, history_version) = if historical {
            let Some((history_version, version)) = version_in_history(db, tenant, selection, rid)? else {
                continue; // created after the transaction time
            };
            (version, history_version)
        } else {
            (version, 0)
        };
        if select(reach, &version)
            && (!filtered || filter_matches(db, tenant, selection, resource_type, rid, history_version)?)
        {
            visit(Chosen { rid, reach, version, history_version });
        }
    }
    Ok(())
}

/// The version of `rid` at the selection's transaction time from history, with its history
/// version: for a resource whose compartment row describes a later version. None: the resource
/// was created after the transaction time.
pub(super) fn version_in_history(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    rid: i64,
) -> Result<Option<(i64, VersionAt)>, StoreError> {
    let user = selection.visibility.user();
    let then = db.query_opt(
        "SELECT version, last_updated, deleted, owner FROM resource_history
         WHERE tenant_id = $1 AND rid = $2 AND last_updated <= $3 ORDER BY version DESC LIMIT 1",
        &[&tenant.0, &rid, &selection.transaction_time],
    )?;
    let Some(then) = then else { return Ok(None) };
    let owner: Option<&str> = then.try_get(3)?;
    let version = VersionAt {
        last_updated: then.try_get(1)?,
        deleted: then.try_get(2)?,
        visible: user.is_none() || owner == user,
    };
    Ok(Some((then.try_get(0)?, version)))
}

/// A candidate: `(key, reach, version per the row read, whether history decides the version)`.
pub(super) type Candidate = (i64, Reach, VersionAt, bool);

/// Sorts candidates by key and merges those of one key (found in two compartments of the
/// window): their reaches merge, and history decides if it does for either.
fn in_key_order(candidates: &mut Vec<Candidate>) {
    if !candidates.is_sorted_by_key(|candidate| candidate.0) {
        candidates.sort_unstable_by_key(|candidate| candidate.0);
    }
    candidates.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 = kept.1.merge(later.1);
            kept.3 |= later.3;
        }
        same
    });
}

/// Resources in the members' compartments at the transaction time within a key window, each
/// once, in key order.
fn member_candidates(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    members: &Members,
    code: i16,
    (start, end): (i64, i64),
    candidates: &mut Vec<Candidate>,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let user = selection.visibility.user();
    // Many members for the window's keys (a large Group): the window's compartment rows of the
    // type drive, one index range scan in key order, kept when their patient is a member. Few:
    // the member list drives, each member one range scan of the compartment key; its rows come
    // out in key order per member, sorted together here (an ORDER BY made PostgreSQL sort,
    // spilling past `work_mem`, or merge-join over a full sort, at twice the cost). Members that
    // are most of the tenant read by key whatever the window: at most twice the members' rows,
    // in key order, where the member-driven join of a 10,000-member Group sorted each window
    // (spilling to disk) at about twice PostgreSQL's time per row (BENCHMARKS.md, session 11).
    let window_keys = end.saturating_sub(start).saturating_add(1);
    if members.most_of_tenant || window_keys <= KEYS_PER_MEMBER_READ_BY_KEY.saturating_mul(members.pkeys.len() as i64) {
        return candidates_by_key(db, tenant, selection, members, code, (start, end), candidates);
    }
    // Streamed: each row becomes a small candidate as it arrives, never a whole `Row` (a window
    // of a large Group is up to `WINDOW` rows; holding them cost more in allocation and page
    // faults than reading them).
    db.query_each(
        "SELECT c.rid, m.since IS NULL, m.since, c.last_updated, c.deleted, c.owner, c.to_ts IS NOT NULL
         FROM unnest($3::int8[], $4::int8[]) AS m(pkey, since)
         JOIN compartment c ON c.tenant_id = $1 AND c.pkey = m.pkey AND c.type_code = $2
         WHERE c.rid BETWEEN $5 AND $6 AND c.from_ts <= $7 AND (c.to_ts IS NULL OR c.to_ts > $7)",
        &[&tenant.0, &code, &members.pkeys, &members.since, &start, &end, &at],
        |row| {
            let last_updated: Micros = row.try_get(3)?;
            let owner: Option<&str> = row.try_get(5)?;
            let reach = Reach { full_history: row.try_get(1)?, existing_since: row.try_get(2)? };
            let version =
                VersionAt { last_updated, deleted: row.try_get(4)?, visible: user.is_none() || owner == user };
            // A row written after the transaction time, or closed by a later version, describes a
            // version other than the one at the transaction time: history decides.
            let historical = last_updated > at || row.try_get::<_, bool>(6)?;
            candidates.push((row.try_get(0)?, reach, version, historical));
            Ok(())
        },
    )?;
    in_key_order(candidates);
    Ok(())
}

/// Selections of at least this many members are compared with the tenant's patient count
/// (small in unit tests, so the conformance suite's larger selections read by key).
const MEMBERS_TO_COUNT_PATIENTS: usize = if cfg!(test) { 3 } else { 256 };

/// Windows of at most this many keys per member are read by key ([`candidates_by_key`]): a
/// member's range scan costs about as much as reading a few index entries in key order. (1 in
/// unit tests: with their 3-key windows, selections of one or two members take the other path,
/// so the conformance suite runs both.)
const KEYS_PER_MEMBER_READ_BY_KEY: i64 = if cfg!(test) { 1 } else { 4 };

/// [`member_candidates`] driven by the window's keys: its open compartment rows of the type and
/// those closed after the transaction time (each through its partial index on the key), in key
/// order, kept when their patient is a member.
fn candidates_by_key(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    members: &Members,
    code: i16,
    (start, end): (i64, i64),
    candidates: &mut Vec<Candidate>,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let user = selection.visibility.user();
    let by_key = members.by_key();
    db.query_each(
        "SELECT rid, pkey, last_updated, deleted, owner, false FROM compartment
         WHERE tenant_id = $1 AND rid BETWEEN $2 AND $3 AND to_ts IS NULL AND type_code = $4 AND from_ts <= $5
         UNION ALL
         SELECT rid, pkey, last_updated, deleted, owner, true FROM compartment
         WHERE tenant_id = $1 AND rid BETWEEN $2 AND $3 AND to_ts IS NOT NULL AND to_ts > $5 AND type_code = $4
           AND from_ts <= $5",
        &[&tenant.0, &start, &end, &code, &at],
        |row| {
            let Some(reach) = by_key.get(&row.try_get::<_, i64>(1)?) else { return Ok(()) };
            let last_updated: Micros = row.try_get(2)?;
            let owner: Option<&str> = row.try_get(4)?;
            let version =
                VersionAt { last_updated, deleted: row.try_get(3)?, visible: user.is_none() || owner == user };
            let historical = last_updated > at || row.try_get::<_, bool>(5)?;
            candidates.push((row.try_get(0)?, *reach, version, historical));
            Ok(())
        },
    )?;
    // The two halves are each in key order only by their plan.
    in_key_order(candidates);
    Ok(())
}

/// Every resource of the type in the tenant within a key window, in key order (a system-level
/// export), from the resource rows; the export's `_since` applies to each.
fn tenant_candidates(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    (start, end): (i64, i64),
    candidates: &mut Vec<Candidate>,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let user = selection.visibility.user();
    db.query_each(
        "SELECT rid, last_updated, deleted, owner FROM resources
         WHERE tenant_id = $1 AND resource_type = $2 AND rid BETWEEN $3 AND $4 ORDER BY rid",
        &[&tenant.0, &resource_type, &start, &end],
        |row| {
            let last_updated: Micros = row.try_get(1)?;
            let owner: Option<&str> = row.try_get(3)?;
            let reach = Reach { full_history: false, existing_since: selection.since };
            let version =
                VersionAt { last_updated, deleted: row.try_get(2)?, visible: user.is_none() || owner == user };
            // Written since the transaction time: history holds the version then, if any.
            candidates.push((row.try_get(0)?, reach, version, last_updated > at));
            Ok(())
        },
    )?;
    Ok(())
}

/// Whether the version of `rid` held by the current row (`history_version` 0) or by that
/// history version matches the selection's `_typeFilter` for its type. Versions never change,
/// so the plan's counts and the download's lines agree.
pub(super) fn filter_matches(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    rid: i64,
    history_version: i64,
) -> Result<bool, StoreError> {
    let row = if history_version == 0 {
        db.query_opt("SELECT body FROM resources WHERE tenant_id = $1 AND rid = $2", &[&tenant.0, &rid])?
    } else {
        db.query_opt(
            "SELECT body FROM resource_history WHERE tenant_id = $1 AND rid = $2 AND version = $3",
            &[&tenant.0, &rid, &history_version],
        )?
    };
    let body: Option<&str> = match &row {
        Some(row) => row.try_get(0)?,
        None => None,
    };
    Ok(body.is_some_and(|body| selection.filters.matches_json(resource_type, body.as_bytes())))
}

/// Visits, in key order, every selected resource within `[first_key, last_key]`, a window at a
/// time.
#[allow(clippy::too_many_arguments)]
fn for_each_selected(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    members: &Members,
    resource_type: &str,
    select: impl Fn(Reach, &VersionAt) -> bool,
    mut visit: impl FnMut(i64, &VersionAt),
) -> Result<(), StoreError> {
    let Some((mut start, end)) = type_span(db, tenant, resource_type)? else { return Ok(()) };
    while start <= end {
        let window_end = start.saturating_add(WINDOW - 1).min(end);
        for chosen in select_window(db, tenant, selection, members, resource_type, (start, window_end), &select)? {
            visit(chosen.rid, &chosen.version);
        }
        if window_end == end {
            break;
        }
        start = window_end + 1;
    }
    Ok(())
}

/// Splits the selected resources of one type into consecutive key ranges of at most
/// `part_size` resources.
pub(super) fn plan_type(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    members: &Members,
    resource_type: &str,
    part_size: u64,
    cohort: Option<&CohortKeys>,
) -> Result<Vec<PartRange>, StoreError> {
    let mut parts: Vec<PartRange> = Vec::new();
    // The cohort's keys read in one pass over the members, when they cover the type.
    if let Some(cohort) = cohort.filter(|cohort| cohort.covers(resource_type)) {
        let filtered = selection.filters.filters(resource_type);
        super::cohort::visit(cohort, db, tenant, selection, resource_type, (i64::MIN, i64::MAX), |db, found| {
            if found.selected
                && (!filtered
                    || filter_matches(db, tenant, selection, resource_type, found.rid, found.history_version)?)
            {
                add_to_parts(&mut parts, found.rid, part_size);
            }
            Ok(())
        })?;
        return Ok(parts);
    }
    let select = |reach, version: &VersionAt| selected(selection, reach, version);
    for_each_selected(db, tenant, selection, members, resource_type, select, |rid, _| {
        add_to_parts(&mut parts, rid, part_size)
    })?;
    Ok(parts)
}

/// `deleted[]` of one type, in key order (see `sqlite/export.rs` for the two kinds).
pub(super) fn deleted_in_compartments(
    db: &mut Db<'_>,
    keys: &MemberKeys,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
) -> Result<Vec<(String, Micros)>, StoreError> {
    let Some(since) = selection.since else { return Ok(Vec::new()) };
    // Tombstones have no JSON to filter: every deletion of the type is listed (a superset).
    let unfiltered;
    let selection = if selection.filters.is_empty() {
        selection
    } else {
        unfiltered = MemberSelection { filters: Default::default(), ..selection.clone() };
        &unfiltered
    };
    let members = Members::resolve(db, keys, tenant, selection)?;
    let mut deleted: Vec<(i64, Micros)> = Vec::new();
    let select = |reach: Reach, version: &VersionAt| {
        reach.existing_since.is_some_and(|since| version.deleted && version.last_updated > since && version.visible)
    };
    for_each_selected(db, tenant, selection, &members, resource_type, select, |rid, version| {
        deleted.push((rid, version.last_updated))
    })?;
    // A system-level export has no cohort to leave.
    if selection.scope == SelectionScope::Members {
        deleted.extend(left_the_cohort(db, tenant, selection, &members, resource_type, since)?);
    }
    deleted.sort_unstable_by_key(|(rid, _)| *rid);
    deleted.dedup_by_key(|(rid, _)| *rid);
    let mut listed = Vec::with_capacity(deleted.len());
    for (rid, at) in deleted {
        let row = db.query_one("SELECT id FROM resources WHERE tenant_id = $1 AND rid = $2", &[&tenant.0, &rid])?;
        listed.push((row.try_get(0)?, at));
    }
    Ok(listed)
}

/// Resources live, visible and in a continuing member's compartment at `since` that at the
/// transaction time are not live in any member's compartment, as `(rid, lastUpdated then)`.
fn left_the_cohort(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    members: &Members,
    resource_type: &str,
    since: Micros,
) -> Result<Vec<(i64, Micros)>, StoreError> {
    let at = selection.transaction_time;
    let user = selection.visibility.user();
    let Ok(code) = type_code(resource_type) else { return Ok(Vec::new()) };
    // The closed rows drive (through their partial index), not the members.
    let moved = db.query(
        "SELECT DISTINCT c.rid, c.owner FROM compartment c
         JOIN unnest($3::int8[], $4::int8[]) AS m(pkey, since) ON m.pkey = c.pkey AND m.since IS NOT NULL
         WHERE c.tenant_id = $1 AND c.type_code = $2 AND c.to_ts IS NOT NULL AND c.to_ts > $5 AND c.to_ts <= $6
           AND c.from_ts <= $5",
        &[&tenant.0, &code, &members.pkeys, &members.since, &since, &at],
    )?;
    let mut left = Vec::new();
    for row in &moved {
        let rid: i64 = row.try_get(0)?;
        let owner: Option<&str> = row.try_get(1)?;
        if user.is_some_and(|user| owner != Some(user)) {
            continue;
        }
        if state_at(db, tenant, rid, since)?.is_none_or(|(_, deleted)| deleted) {
            continue;
        }
        let Some((last_updated, deleted)) = state_at(db, tenant, rid, at)? else { continue };
        let still_in_cohort = !deleted
            && db
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM compartment WHERE tenant_id = $1 AND rid = $2
                                    AND pkey = ANY($3) AND from_ts <= $4 AND (to_ts IS NULL OR to_ts > $4))",
                    &[&tenant.0, &rid, &members.pkeys, &at],
                )?
                .try_get::<_, bool>(0)?;
        if !still_in_cohort {
            left.push((rid, last_updated));
        }
    }
    Ok(left)
}

/// `(lastUpdated, deleted)` of a resource's version at `at`; `None` before it existed.
fn state_at(db: &mut Db<'_>, tenant: TenantId, rid: i64, at: Micros) -> Result<Option<(Micros, bool)>, StoreError> {
    let current = db.query_opt(
        "SELECT last_updated, deleted FROM resources WHERE tenant_id = $1 AND rid = $2",
        &[&tenant.0, &rid],
    )?;
    if let Some(current) = current {
        let last_updated: Micros = current.try_get(0)?;
        if last_updated <= at {
            return Ok(Some((last_updated, current.try_get(1)?)));
        }
    }
    let earlier = db.query_opt(
        "SELECT last_updated, deleted FROM resource_history WHERE tenant_id = $1 AND rid = $2 AND last_updated <= $3
         ORDER BY version DESC LIMIT 1",
        &[&tenant.0, &rid, &at],
    )?;
    earlier.map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).transpose()
}

pub(super) fn version_at(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_type: &str,
    id: &str,
    at: Micros,
) -> Result<Option<StoredResource>, StoreError> {
    let sql =
        format!("SELECT {VERSION_COLUMNS}, rid FROM resources WHERE tenant_id = $1 AND resource_type = $2 AND id = $3");
    let Some(row) = db.query_opt(&sql, &[&tenant.0, &resource_type, &id])? else { return Ok(None) };
    let current = stored_from_row(&row)?;
    let version = if current.last_updated <= at {
        Some(current)
    } else {
        let rid: i64 = row.try_get(7)?;
        db.query_opt(
            "SELECT $3::text, $4::text, version, last_updated, deleted, owner, body FROM resource_history
             WHERE tenant_id = $1 AND rid = $2 AND last_updated <= $5 ORDER BY version DESC LIMIT 1",
            &[&tenant.0, &rid, &resource_type, &id, &at],
        )?
        .as_ref()
        .map(stored_from_row)
        .transpose()?
    };
    Ok(version.filter(|version| !version.deleted))
}

/// The version of `resource_type/id` at `at` without its body, tombstones included, with the
/// resource's `rid` (None: no version by `at`): a large Group's text is not fetched.
pub(super) fn version_head_at(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_type: &str,
    id: &str,
    at: Micros,
) -> Result<Option<(i64, StoredResource)>, StoreError> {
    let head = |row: &postgres::Row, first: usize| -> Result<StoredResource, StoreError> {
        Ok(StoredResource {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version: row.try_get(first)?,
            last_updated: row.try_get(first + 1)?,
            deleted: row.try_get(first + 2)?,
            owner: row.try_get(first + 3)?,
            body: None,
        })
    };
    let Some(row) = db.query_opt(
        "SELECT rid, version, last_updated, deleted, owner FROM resources
         WHERE tenant_id = $1 AND resource_type = $2 AND id = $3",
        &[&tenant.0, &resource_type, &id],
    )?
    else {
        return Ok(None);
    };
    let rid: i64 = row.try_get(0)?;
    let current = head(&row, 1)?;
    if current.last_updated <= at {
        return Ok(Some((rid, current)));
    }
    let earlier = db.query_opt(
        "SELECT version, last_updated, deleted, owner FROM resource_history
         WHERE tenant_id = $1 AND rid = $2 AND last_updated <= $3 ORDER BY version DESC LIMIT 1",
        &[&tenant.0, &rid, &at],
    )?;
    earlier.map(|row| Ok((rid, head(&row, 0)?))).transpose()
}

/// The body of version `version` of the resource `rid` (the current row's, or an earlier one's
/// from history); None for a tombstone or a version no longer kept.
pub(super) fn version_body(
    db: &mut Db<'_>,
    tenant: TenantId,
    rid: i64,
    version: i64,
) -> Result<Option<String>, StoreError> {
    let current = db.query_opt(
        "SELECT body FROM resources WHERE tenant_id = $1 AND rid = $2 AND version = $3",
        &[&tenant.0, &rid, &version],
    )?;
    let row = match current {
        Some(row) => Some(row),
        None => db.query_opt(
            "SELECT body FROM resource_history WHERE tenant_id = $1 AND rid = $2 AND version = $3",
            &[&tenant.0, &rid, &version],
        )?,
    };
    Ok(row.map(|row| row.try_get::<_, Option<String>>(0)).transpose()?.flatten())
}

pub(super) fn members_at(
    db: &mut Db<'_>,
    tenant: TenantId,
    group_id: &str,
    at: Micros,
) -> Result<Vec<String>, StoreError> {
    db.query(
        "SELECT DISTINCT k.patient_id FROM group_membership g
         JOIN patient_keys k ON k.tenant_id = g.tenant_id AND k.pkey = g.pkey
         WHERE g.tenant_id = $1 AND g.added_at <= $3 AND (g.removed_at IS NULL OR g.removed_at > $3)
           AND g.group_rid = (SELECT rid FROM resources WHERE tenant_id = $1 AND resource_type = 'Group' AND id = $2)
         ORDER BY k.patient_id",
        &[&tenant.0, &group_id, &at],
    )?
    .iter()
    .map(|row| Ok(row.try_get(0)?))
    .collect()
}

pub(super) fn existing_at(
    db: &mut Db<'_>,
    tenant: TenantId,
    visibility: &Visibility,
    resource_type: &str,
    ids: &[String],
    at: Micros,
) -> Result<Vec<String>, StoreError> {
    // Each id's version at `at`: the current row when no newer, else the newest history row.
    let rows = db.query(
        "SELECT r.id,
                CASE WHEN r.last_updated <= $4 THEN r.deleted ELSE h.deleted END,
                CASE WHEN r.last_updated <= $4 THEN r.owner ELSE h.owner END,
                r.last_updated <= $4 OR h.version IS NOT NULL
         FROM unnest($3::text[]) WITH ORDINALITY AS n(id, ord)
         JOIN resources r ON r.tenant_id = $1 AND r.resource_type = $2 AND r.id = n.id
         LEFT JOIN LATERAL (
             SELECT version, deleted, owner FROM resource_history
             WHERE tenant_id = $1 AND rid = r.rid AND last_updated <= $4 ORDER BY version DESC LIMIT 1
         ) h ON r.last_updated > $4
         ORDER BY n.ord",
        &[&tenant.0, &resource_type, &ids, &at],
    )?;
    let user = visibility.user();
    let mut existing = Vec::new();
    for row in &rows {
        let existed: bool = row.try_get(3)?;
        let deleted: Option<bool> = row.try_get(1)?;
        let owner: Option<&str> = row.try_get(2)?;
        if existed && deleted == Some(false) && (user.is_none() || owner == user) {
            existing.push(row.try_get(0)?);
        }
    }
    Ok(existing)
}
