//! Associated data of Patient and Group exports on PostgreSQL: the reference index kept on
//! write, and the per-export set of Provenance and referenced resources computed from it. The
//! rules are the SQLite store's (`sqlite/associated.rs`, decided by [`crate::selection`]); the
//! SQL works on many keys per statement (array parameters) instead of one seek per resource.
//!
//! Planning runs in one transaction on one pooled connection, with its working sets in
//! temporary tables (`ON COMMIT DELETE ROWS`: nothing stays behind on the connection), so memory
//! stays bounded whatever the cohort's size. It never takes the clock: everything it reads is
//! versioned by time, so it blocks no writer.

use std::collections::HashMap;

use bulkhead_fhir::references::{outgoing_references, OutgoingReference};
use bulkhead_fhir::Micros;
use serde_json::Value;

use super::export::{filter_matches, select_window, type_span, Members, WINDOW};
use super::{Db, PgStore};
use crate::cohort_keys::{CohortStash, StashKey};
use crate::selection::{add_to_parts, exported, selected, visible_to, FoundNodes, Reach, Via};
use crate::{
    AssociatedRequest, MemberSelection, PartRange, PartReader, ProvenanceSelection, ReferencedTypes, StoreError,
    TenantId,
};

// ---- the reference index, kept on write ----

/// Notes that `resource_type` has references to follow in `tenant`.
pub(super) fn note_referencing_types(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_types: &[&str],
) -> Result<(), StoreError> {
    if resource_types.is_empty() {
        return Ok(());
    }
    db.execute(
        "INSERT INTO referencing_types (tenant_id, resource_type) SELECT DISTINCT $1::int8, t FROM unnest($2::text[]) AS t
         ON CONFLICT DO NOTHING",
        &[&tenant.0, &resource_types],
    )?;
    Ok(())
}

/// Reference rows as parallel arrays, for one multi-row insert.
#[derive(Default)]
struct ReferenceRows {
    rids: Vec<i64>,
    provenance: Vec<bool>,
    types: Vec<String>,
    ids: Vec<String>,
}

impl ReferenceRows {
    fn push(&mut self, rid: i64, reference: OutgoingReference) {
        self.rids.push(rid);
        self.provenance.push(reference.provenance_target);
        self.types.push(reference.target_type);
        self.ids.push(reference.target_id);
    }

    fn insert(&self, db: &mut Db<'_>, tenant: TenantId, timestamp: Micros) -> Result<(), StoreError> {
        if self.rids.is_empty() {
            return Ok(());
        }
        // A Provenance target's row carries the target's key when its row exists (see
        // `resolve_new_targets` for targets created later).
        db.execute(
            "INSERT INTO reference_index (tenant_id, rid, provenance_target, target_type, target_id, from_ts, target_rid)
             SELECT $1, n.rid, n.provenance_target, n.target_type, n.target_id, $2,
                    CASE WHEN n.provenance_target THEN (
                        SELECT r.rid FROM resources r
                        WHERE r.tenant_id = $1 AND r.resource_type = n.target_type AND r.id = n.target_id) END
             FROM unnest($3::int8[], $4::bool[], $5::text[], $6::text[]) AS n(rid, provenance_target, target_type, target_id)
             ON CONFLICT DO NOTHING",
            &[&tenant.0, &timestamp, &self.rids, &self.provenance, &self.types, &self.ids],
        )?;
        Ok(())
    }
}

/// Resource rows were just created for `(types[i], ids[i])` with keys `rids[i]`: the Provenance
/// target rows that already name them (written before them, or naming a pruned tombstone) get
/// their keys. Unresolved rows have a small index of their own (`provenance_unresolved`), so
/// this costs a create little.
pub(super) fn resolve_new_targets(
    db: &mut Db<'_>,
    tenant: TenantId,
    types: &[&str],
    ids: &[&str],
    rids: &[i64],
) -> Result<(), StoreError> {
    if rids.is_empty() {
        return Ok(());
    }
    db.execute(
        "UPDATE reference_index x SET target_rid = n.rid
         FROM unnest($2::text[], $3::text[], $4::int8[]) AS n(target_type, target_id, rid)
         WHERE x.tenant_id = $1 AND x.provenance_target AND x.target_rid IS NULL
           AND x.target_type = n.target_type AND x.target_id = n.target_id",
        &[&tenant.0, &types, &ids, &rids],
    )?;
    Ok(())
}

/// The resource row with key `rid` is being removed (history pruning of a tombstone): target
/// rows naming it lose the key until a resource of that type and id is created again.
pub(super) fn forget_target(db: &mut Db<'_>, tenant: TenantId, rid: i64) -> Result<(), StoreError> {
    db.execute(
        "UPDATE reference_index SET target_rid = NULL WHERE tenant_id = $1 AND target_rid = $2 AND provenance_target",
        &[&tenant.0, &rid],
    )?;
    Ok(())
}

/// Brings a resource's open reference rows in line with its new version (written at
/// `timestamp`): closes the rows of references it dropped, opens rows for new ones.
pub(super) fn sync_references(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    body: &Value,
    timestamp: Micros,
    is_new_row: bool,
) -> Result<(), StoreError> {
    let references = outgoing_references(resource_type, body);
    if references.iter().any(|reference| !reference.provenance_target) {
        note_referencing_types(db, tenant, &[resource_type])?;
    }
    let open: Vec<OutgoingReference> = if is_new_row {
        Vec::new()
    } else {
        db.query(
            "SELECT target_type, target_id, provenance_target FROM reference_index
             WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL",
            &[&tenant.0, &rid],
        )?
        .iter()
        .map(|row| {
            Ok(OutgoingReference {
                target_type: row.try_get(0)?,
                target_id: row.try_get(1)?,
                provenance_target: row.try_get(2)?,
            })
        })
        .collect::<Result<_, StoreError>>()?
    };
    let mut gone = ReferenceRows::default();
    for reference in open.iter().filter(|reference| !references.contains(reference)) {
        gone.push(rid, reference.clone());
    }
    close(db, tenant, rid, Some(&gone), timestamp)?;
    let mut new = ReferenceRows::default();
    for reference in references.into_iter().filter(|reference| !open.contains(reference)) {
        new.push(rid, reference);
    }
    new.insert(db, tenant, timestamp)
}

/// Closes every open reference row of a deleted resource.
pub(super) fn close_references(
    db: &mut Db<'_>,
    tenant: TenantId,
    rid: i64,
    timestamp: Micros,
) -> Result<(), StoreError> {
    close(db, tenant, rid, None, timestamp)
}

/// Closes the open rows of `references` (every open row when `None`) at `timestamp`. A row
/// opened at that very timestamp (an earlier write of the same transaction) is removed instead:
/// it was never valid at any time.
fn close(
    db: &mut Db<'_>,
    tenant: TenantId,
    rid: i64,
    references: Option<&ReferenceRows>,
    timestamp: Micros,
) -> Result<(), StoreError> {
    match references {
        Some(references) if references.rids.is_empty() => Ok(()),
        Some(references) => {
            let which = "(provenance_target, target_type, target_id) IN (
                             SELECT * FROM unnest($4::bool[], $5::text[], $6::text[]))";
            let params: [&(dyn postgres::types::ToSql + Sync); 6] =
                [&tenant.0, &rid, &timestamp, &references.provenance, &references.types, &references.ids];
            db.execute(
                &format!(
                    "DELETE FROM reference_index WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL AND from_ts = $3
                     AND {which}"
                ),
                &params,
            )?;
            db.execute(
                &format!(
                    "UPDATE reference_index SET to_ts = $3 WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL AND {which}"
                ),
                &params,
            )?;
            Ok(())
        }
        None => {
            db.execute(
                "DELETE FROM reference_index WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL AND from_ts = $3",
                &[&tenant.0, &rid, &timestamp],
            )?;
            db.execute(
                "UPDATE reference_index SET to_ts = $3 WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL",
                &[&tenant.0, &rid, &timestamp],
            )?;
            Ok(())
        }
    }
}

// ---- planning ----

/// The working tables of one planning, emptied at commit. `assoc_node` holds referenced
/// resources found per level (`node` orders a level's scan), `assoc_provenance` the Provenance
/// found, `assoc_out` the set.
const WORK_TABLES: &str = "
CREATE TEMP TABLE IF NOT EXISTS assoc_node (
    node bigint GENERATED ALWAYS AS IDENTITY, target_type text NOT NULL, target_id text NOT NULL,
    level integer NOT NULL, full_history boolean NOT NULL, since bigint, forced boolean NOT NULL,
    PRIMARY KEY (target_type, target_id)) ON COMMIT DELETE ROWS;
CREATE INDEX IF NOT EXISTS assoc_node_by_level ON assoc_node (level, node);
CREATE TEMP TABLE IF NOT EXISTS assoc_provenance (
    rid bigint PRIMARY KEY, full_history boolean NOT NULL, since bigint, forced boolean NOT NULL)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS assoc_out (
    resource_type text NOT NULL, rid bigint NOT NULL, PRIMARY KEY (resource_type, rid)) ON COMMIT DELETE ROWS;
";

/// Rows of one level (or of the stored set) read into memory at a time.
const BATCH: i64 = 1_000;

/// Resources reached, with how: parallel arrays for one statement.
#[derive(Default)]
struct Reached {
    rids: Vec<i64>,
    full_history: Vec<bool>,
    since: Vec<Option<Micros>>,
    forced: Vec<bool>,
}

impl Reached {
    fn push(&mut self, rid: i64, via: Via) {
        self.rids.push(rid);
        self.full_history.push(via.reach.full_history);
        self.since.push(via.reach.existing_since);
        self.forced.push(via.forced);
    }
}

impl PgStore {
    pub(super) fn plan_associated_set(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        request: &AssociatedRequest,
        part_size: u64,
    ) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
        self.with_transaction(|db| {
            db.batch(WORK_TABLES)?;
            compute(db, &self.member_keys, &self.cohorts, tenant, selection, request)?;
            store_set(db, tenant, request, part_size)
        })
    }
}

/// Stores the set computed in `assoc_out` under `request.set_id` and plans its parts.
fn store_set(
    db: &mut Db<'_>,
    tenant: TenantId,
    request: &AssociatedRequest,
    part_size: u64,
) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
    db.execute(
        "INSERT INTO associated_sets (tenant_id, set_id, expires) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id, set_id) DO UPDATE SET expires = GREATEST(associated_sets.expires, excluded.expires)",
        &[&tenant.0, &request.set_id, &request.expires],
    )?;
    db.execute(
        "INSERT INTO export_associated (tenant_id, set_id, resource_type, rid)
         SELECT $1, $2, resource_type, rid FROM assoc_out ON CONFLICT DO NOTHING",
        &[&tenant.0, &request.set_id],
    )?;
    let mut types: Vec<String> = db
        .query("SELECT DISTINCT resource_type FROM assoc_out", &[])?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    types.sort_unstable();
    let mut planned = Vec::with_capacity(types.len());
    for resource_type in types {
        let mut parts = Vec::new();
        let mut after = i64::MIN;
        loop {
            let rids: Vec<i64> = db
                .query(
                    "SELECT rid FROM assoc_out WHERE resource_type = $1 AND rid > $2 ORDER BY rid LIMIT $3",
                    &[&resource_type, &after, &BATCH],
                )?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            let Some(&last) = rids.last() else { break };
            after = last;
            for rid in rids {
                add_to_parts(&mut parts, rid, part_size);
            }
        }
        planned.push((resource_type, parts));
    }
    Ok(planned)
}

/// Fills `assoc_out` with the set's `(type, key)` pairs.
fn compute(
    db: &mut Db<'_>,
    keys: &super::member_keys::MemberKeys,
    cohorts: &CohortStash,
    tenant: TenantId,
    selection: &MemberSelection,
    request: &AssociatedRequest,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let referencing = request.referenced != ReferencedTypes::None && request.depth > 0;
    let any_provenance = request.provenance != ProvenanceSelection::None
        && db
            .query_one(
                // One probe into each of the two partial indexes that together hold every
                // Provenance.target row (with and without its target's key): `provenance_target`
                // alone matches neither index, and read the tenant's whole reference index when
                // it has no Provenance at all.
                "SELECT EXISTS (SELECT 1 FROM reference_index
                                WHERE tenant_id = $1 AND provenance_target AND target_rid IS NOT NULL)
                     OR EXISTS (SELECT 1 FROM reference_index
                                WHERE tenant_id = $1 AND provenance_target AND target_rid IS NULL)",
                &[&tenant.0],
            )?
            .try_get::<_, bool>(0)?;
    let mut sources: Vec<&String> = Vec::new();
    if referencing {
        sources.extend(&request.reference_sources);
    }
    if any_provenance {
        for resource_type in &request.provenance_sources {
            if !sources.contains(&resource_type) {
                sources.push(resource_type);
            }
        }
    }
    // The cohort is found before `_typeFilter`: a filter narrows what is exported of its type,
    // not which Provenance and referenced resources come. Only a resource the export sends
    // (selected and, for a filtered type, matching) forces what it reaches.
    let cohort = MemberSelection { filters: Default::default(), ..selection.clone() };
    let members = Members::resolve(db, keys, tenant, selection)?;
    // `(type, follow its references, find its Provenance)` of each source type read.
    let mut read: Vec<(&str, bool, bool)> = Vec::new();
    for resource_type in sources {
        // A type none of whose resources ever referenced anything to follow is not read at all
        // for references (e.g. Observations in Synthea data).
        let follow = referencing
            && request.reference_sources.contains(resource_type)
            && db
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM referencing_types WHERE tenant_id = $1 AND resource_type = $2)",
                    &[&tenant.0, &resource_type],
                )?
                .try_get::<_, bool>(0)?;
        let provenance = any_provenance && request.provenance_sources.contains(resource_type);
        if follow || provenance {
            read.push((resource_type.as_str(), follow, provenance));
        }
    }
    // The cohort's keys of the source types read in one pass over the members: those the count
    // pass just read, or read now (types they do not cover are read a key window at a time).
    let source_types: Vec<&str> = read.iter().map(|(resource_type, _, _)| *resource_type).collect();
    let cohort_keys = match cohorts.take(&StashKey::of(tenant, selection), &source_types) {
        Some(kept) => Some(kept),
        None if source_types.is_empty() => None,
        None => super::cohort::read(db, tenant, &cohort, &members, &source_types)?,
    };
    let cohort_keys = cohort_keys.as_ref();
    let mut found_provenance = FoundProvenance::default();
    let mut found_nodes = FoundNodes::new(1, &request.referenced);
    for (resource_type, follow, provenance) in read {
        let Some((first, last)) = type_span(db, tenant, resource_type)? else { continue };
        let filtered = selection.filters.filters(resource_type);
        let sent = |db: &mut Db<'_>, rid: i64, history_version: i64| -> Result<bool, StoreError> {
            Ok(!filtered || filter_matches(db, tenant, selection, resource_type, rid, history_version)?)
        };
        let mut start = first;
        while start <= last {
            let end = start.saturating_add(WINDOW - 1).min(last);
            let mut chosen = Reached::default();
            match cohort_keys.filter(|keys| keys.covers(resource_type)) {
                Some(keys) => {
                    super::cohort::visit(keys, db, tenant, &cohort, resource_type, (start, end), |db, found| {
                        if found.live {
                            let forced = found.selected && sent(db, found.rid, found.history_version)?;
                            chosen.push(found.rid, Via { reach: found.reach, forced });
                        }
                        Ok(())
                    })?
                }
                None => {
                    let live = |_: Reach, version: &crate::selection::VersionAt| !version.deleted && version.visible;
                    for found in select_window(db, tenant, &cohort, &members, resource_type, (start, end), live)? {
                        let forced = selected(selection, found.reach, &found.version)
                            && sent(db, found.rid, found.history_version)?;
                        chosen.push(found.rid, Via { reach: found.reach, forced });
                    }
                }
            }
            if follow && dense(&chosen) {
                add_dense_references(&mut found_nodes, db, tenant, &chosen, at)?;
            } else if follow {
                add_references(db, tenant, &chosen, at, 1, &request.referenced)?;
            }
            if provenance {
                found_provenance.find(db, tenant, selection, &chosen, request.provenance)?;
            }
            if end == last {
                break;
            }
            start = end + 1;
        }
    }
    found_provenance.record(db)?;
    record_nodes(&mut found_nodes, db)?;
    if any_provenance {
        resolve_provenance(db, tenant, selection, request, referencing)?;
    }
    if referencing {
        for level in 1..=request.depth {
            resolve_level(db, tenant, selection, request, level)?;
        }
    }
    Ok(())
}

/// How a node found again merges into `assoc_node` (the merge [`Via::merge`] makes in memory): a
/// node recorded at a lower level stays as it is.
macro_rules! merge_node {
    () => {
        "ON CONFLICT (target_type, target_id) DO UPDATE SET
             full_history = assoc_node.full_history OR excluded.full_history,
             since = CASE WHEN assoc_node.since IS NULL THEN excluded.since WHEN excluded.since IS NULL
                          THEN assoc_node.since ELSE LEAST(assoc_node.since, excluded.since) END,
             forced = assoc_node.forced OR excluded.forced
         WHERE assoc_node.level = excluded.level"
    };
}

/// Records the references (to allowed types) of the `reached` resources' versions at `at` as
/// nodes of `level`, merging each one's reach into nodes of that level already found; a node
/// found at a lower level stays as it is.
fn add_references(
    db: &mut Db<'_>,
    tenant: TenantId,
    reached: &Reached,
    at: Micros,
    level: u32,
    allowed: &ReferencedTypes,
) -> Result<(), StoreError> {
    let (all_types, only): (bool, Vec<String>) = match allowed {
        ReferencedTypes::None => return Ok(()),
        ReferencedTypes::All => (true, Vec::new()),
        ReferencedTypes::Only(types) => (false, types.clone()),
    };
    if reached.rids.is_empty() {
        return Ok(());
    }
    // Grouped first: one INSERT may not update the same node twice.
    db.execute(
        concat!(
            "INSERT INTO assoc_node (target_type, target_id, level, full_history, since, forced)
         SELECT r.target_type, r.target_id, $3, bool_or(n.full_history), min(n.since), bool_or(n.forced)
         FROM unnest($4::int8[], $5::bool[], $6::int8[], $7::bool[]) AS n(rid, full_history, since, forced)
         JOIN reference_index r ON r.tenant_id = $1 AND r.rid = n.rid AND NOT r.provenance_target
              AND r.from_ts <= $2 AND (r.to_ts IS NULL OR r.to_ts > $2)
         WHERE $8 OR r.target_type = ANY($9::text[])
         GROUP BY r.target_type, r.target_id ",
            merge_node!()
        ),
        &[
            &tenant.0,
            &at,
            &(level as i32),
            &reached.rids,
            &reached.full_history,
            &reached.since,
            &reached.forced,
            &all_types,
            &only,
        ],
    )?;
    Ok(())
}

/// Nodes held at most before [`add_dense_references`] records them.
const NODES_HELD: usize = if cfg!(test) { 4 } else { 50_000 };

/// Adds to `nodes` the references of the `reached` resources (dense in their key range, in key
/// order) at `at`: one range scan of the reference index over their keys, the rows of other
/// resources in the range skipped here. Records the nodes once they are [`NODES_HELD`].
fn add_dense_references(
    nodes: &mut FoundNodes<'_>,
    db: &mut Db<'_>,
    tenant: TenantId,
    reached: &Reached,
    at: Micros,
) -> Result<(), StoreError> {
    let (Some(&first), Some(&last)) = (reached.rids.first(), reached.rids.last()) else { return Ok(()) };
    let mut position = SortedKeys::new(&reached.rids);
    // No ORDER BY: the planner reads the range through a bitmap, mostly in key order, and a
    // sort of it spilled past `work_mem`; [`SortedKeys`] finds keys in any order.
    db.query_each(
        "SELECT rid, target_type, target_id FROM reference_index
         WHERE tenant_id = $1 AND rid BETWEEN $2 AND $3 AND NOT provenance_target
           AND from_ts <= $4 AND (to_ts IS NULL OR to_ts > $4)",
        &[&tenant.0, &first, &last, &at],
        |row| {
            let Some(index) = position.of(row.try_get(0)?) else { return Ok(()) };
            let via = Via {
                reach: Reach { full_history: reached.full_history[index], existing_since: reached.since[index] },
                forced: reached.forced[index],
            };
            nodes.add(row.try_get(1)?, row.try_get(2)?, via);
            Ok(())
        },
    )?;
    if nodes.len() >= NODES_HELD {
        record_nodes(nodes, db)?;
    }
    Ok(())
}

/// Records the nodes held in `assoc_node` as nodes of their level, merging with those recorded
/// earlier; a node recorded at a lower level stays as it is.
fn record_nodes(nodes: &mut FoundNodes<'_>, db: &mut Db<'_>) -> Result<(), StoreError> {
    if nodes.len() == 0 {
        return Ok(());
    }
    let level = nodes.level() as i32;
    let (mut types, mut ids, mut reached) = (Vec::new(), Vec::new(), Reached::default());
    for (target_type, found) in nodes.drain() {
        for (target_id, via) in found {
            types.push(target_type.clone());
            ids.push(target_id);
            reached.push(0, via);
        }
    }
    db.execute(
        concat!(
            "INSERT INTO assoc_node (target_type, target_id, level, full_history, since, forced)
         SELECT t, i, $1, f, s, o FROM unnest($2::text[], $3::text[], $4::bool[], $5::int8[], $6::bool[]) AS n(t, i, f, s, o) ",
            merge_node!()
        ),
        &[&level, &types, &ids, &reached.full_history, &reached.since, &reached.forced],
    )?;
    Ok(())
}

/// A resource's version at a time, as planning needs it.
struct StateAt {
    last_updated: Micros,
    deleted: bool,
    owner: Option<String>,
}

/// The versions of `rids` at `at` (keys that did not exist then are absent).
fn states_at(db: &mut Db<'_>, tenant: TenantId, rids: &[i64], at: Micros) -> Result<HashMap<i64, StateAt>, StoreError> {
    let rows = db.query(
        "SELECT r.rid,
                CASE WHEN r.last_updated <= $3 THEN r.last_updated ELSE h.last_updated END,
                CASE WHEN r.last_updated <= $3 THEN r.deleted ELSE h.deleted END,
                CASE WHEN r.last_updated <= $3 THEN r.owner ELSE h.owner END
         FROM unnest($2::int8[]) AS n(rid)
         JOIN resources r ON r.tenant_id = $1 AND r.rid = n.rid
         LEFT JOIN LATERAL (
             SELECT last_updated, deleted, owner FROM resource_history
             WHERE tenant_id = $1 AND rid = r.rid AND last_updated <= $3 ORDER BY version DESC LIMIT 1
         ) h ON r.last_updated > $3
         WHERE r.last_updated <= $3 OR h.last_updated IS NOT NULL",
        &[&tenant.0, &rids, &at],
    )?;
    let mut states = HashMap::with_capacity(rows.len());
    for row in &rows {
        states.insert(
            row.try_get::<_, i64>(0)?,
            StateAt { last_updated: row.try_get(1)?, deleted: row.try_get(2)?, owner: row.try_get(3)? },
        );
    }
    Ok(states)
}

/// Provenance found and states looked up at most before [`FoundProvenance`] records or
/// forgets them.
const PROVENANCE_HELD: usize = if cfg!(test) { 4 } else { 100_000 };

/// Whether the `reached` resources are dense in their key range (more than one key in
/// `DENSE`): one range scan of the index then reads fewer entries than one probe per resource.
/// (Lower in unit tests, so the conformance suite's tiny windows take both paths.)
fn dense(reached: &Reached) -> bool {
    const DENSE: i64 = if cfg!(test) { 2 } else { 4 };
    let (Some(first), Some(last)) = (reached.rids.first(), reached.rids.last()) else { return false };
    (reached.rids.len() as i64).saturating_mul(DENSE) > last - first
}

/// The Provenance found through the cohort's resources, merged in memory (a Provenance usually
/// targets many resources of a window and of several types) and recorded in
/// `assoc_provenance` when many are held, and at the end; with each Provenance's state at the
/// transaction time as looked up, kept across windows. Both bounded by [`PROVENANCE_HELD`].
#[derive(Default)]
struct FoundProvenance {
    found: HashMap<i64, Via>,
    /// `Some(lastUpdated)` when the Provenance's version at the transaction time is live and
    /// visible.
    live: HashMap<i64, Option<Micros>>,
}

impl FoundProvenance {
    /// Finds the Provenance that targeted each of the `reached` resources (in key order) at the
    /// transaction time (only the latest per resource for [`ProvenanceSelection::Latest`]),
    /// merging each resource's reach into those found. Target rows carry their target's key, so
    /// the resources' keys find them directly (`provenance_by_target_rid`): dense keys in one
    /// range scan of it, others by one probe each.
    fn find(
        &mut self,
        db: &mut Db<'_>,
        tenant: TenantId,
        selection: &MemberSelection,
        reached: &Reached,
        mode: ProvenanceSelection,
    ) -> Result<(), StoreError> {
        let (Some(&first), Some(&last)) = (reached.rids.first(), reached.rids.last()) else { return Ok(()) };
        let at = selection.transaction_time;
        // `(index in reached, Provenance key)` of every row valid at the transaction time, by target.
        let mut targeting: Vec<(usize, i64)> = Vec::new();
        if dense(reached) {
            let mut position = SortedKeys::new(&reached.rids);
            db.query_each(
                "SELECT target_rid, rid FROM reference_index
                 WHERE tenant_id = $1 AND provenance_target AND target_rid IS NOT NULL AND target_rid BETWEEN $2 AND $3
                   AND from_ts <= $4 AND (to_ts IS NULL OR to_ts > $4)
                 ORDER BY target_rid",
                &[&tenant.0, &first, &last, &at],
                |row| {
                    if let Some(index) = position.of(row.try_get(0)?) {
                        targeting.push((index, row.try_get(1)?));
                    }
                    Ok(())
                },
            )?;
        } else {
            db.query_each(
                "SELECT n.ord, p.rid FROM unnest($2::int8[]) WITH ORDINALITY AS n(rid, ord)
                 JOIN reference_index p ON p.tenant_id = $1 AND p.provenance_target AND p.target_rid = n.rid
                      AND p.from_ts <= $3 AND (p.to_ts IS NULL OR p.to_ts > $3)
                 ORDER BY n.ord",
                &[&tenant.0, &reached.rids, &at],
                |row| {
                    targeting.push((row.try_get::<_, i64>(0)? as usize - 1, row.try_get(1)?));
                    Ok(())
                },
            )?;
        }
        if targeting.is_empty() {
            return Ok(());
        }
        self.look_up(db, tenant, selection, targeting.iter().map(|(_, rid)| *rid))?;
        let mut candidates: Vec<(Micros, i64)> = Vec::new();
        for rows in targeting.chunk_by(|a, b| a.0 == b.0) {
            candidates.clear();
            for &(_, provenance) in rows {
                if let Some(Some(last_updated)) = self.live.get(&provenance) {
                    candidates.push((*last_updated, provenance));
                }
            }
            if mode == ProvenanceSelection::Latest {
                candidates.sort_unstable();
                candidates.drain(..candidates.len().saturating_sub(1));
            }
            let index = rows[0].0;
            let via = Via {
                reach: Reach { full_history: reached.full_history[index], existing_since: reached.since[index] },
                forced: reached.forced[index],
            };
            for &(_, provenance) in &candidates {
                self.found.entry(provenance).and_modify(|held| *held = held.merge(via)).or_insert(via);
            }
        }
        if self.found.len() >= PROVENANCE_HELD {
            self.record(db)?;
        }
        Ok(())
    }

    /// Looks up the states of the Provenance `rids` not known yet; when too many would be known,
    /// forgets the others first. Every one of `rids` is known on return.
    fn look_up(
        &mut self,
        db: &mut Db<'_>,
        tenant: TenantId,
        selection: &MemberSelection,
        rids: impl Iterator<Item = i64>,
    ) -> Result<(), StoreError> {
        let wanted: Vec<i64> = rids.collect();
        let mut unknown: Vec<i64> = wanted.iter().copied().filter(|rid| !self.live.contains_key(rid)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        if self.live.len() + unknown.len() > PROVENANCE_HELD {
            // Forgotten, then every one asked for looked up: all of them are known on return.
            self.live.clear();
            unknown = wanted;
        }
        unknown.sort_unstable();
        unknown.dedup();
        let states = states_at(db, tenant, &unknown, selection.transaction_time)?;
        for rid in unknown {
            // A target row valid at the transaction time means that version was live then; the
            // owner decides visibility, the version's time which one is latest.
            let live = states
                .get(&rid)
                .filter(|state| !state.deleted && visible_to(selection, state.owner.as_deref()))
                .map(|state| state.last_updated);
            self.live.insert(rid, live);
        }
        Ok(())
    }

    /// Records the Provenance held in `assoc_provenance`, merging each with what was recorded.
    fn record(&mut self, db: &mut Db<'_>) -> Result<(), StoreError> {
        if self.found.is_empty() {
            return Ok(());
        }
        let mut found = Reached::default();
        for (rid, via) in self.found.drain() {
            found.push(rid, via);
        }
        db.execute(
            "INSERT INTO assoc_provenance (rid, full_history, since, forced)
             SELECT * FROM unnest($1::int8[], $2::bool[], $3::int8[], $4::bool[])
             ON CONFLICT (rid) DO UPDATE SET
                 full_history = assoc_provenance.full_history OR excluded.full_history,
                 since = CASE WHEN assoc_provenance.since IS NULL THEN excluded.since WHEN excluded.since IS NULL
                              THEN assoc_provenance.since ELSE LEAST(assoc_provenance.since, excluded.since) END,
                 forced = assoc_provenance.forced OR excluded.forced",
            &[&found.rids, &found.full_history, &found.since, &found.forced],
        )?;
        Ok(())
    }
}

/// Positions in sorted keys for keys that mostly arrive in ascending order, as a range scan's
/// rows do: a walk forward instead of a binary search per row; a key below the last one found
/// is still found, by a binary search.
struct SortedKeys<'a> {
    keys: &'a [i64],
    next: usize,
}

impl<'a> SortedKeys<'a> {
    fn new(keys: &'a [i64]) -> Self {
        SortedKeys { keys, next: 0 }
    }

    /// The index of `key` in the keys.
    fn of(&mut self, key: i64) -> Option<usize> {
        if self.next > 0 && self.keys[self.next - 1] >= key {
            self.next = self.keys.partition_point(|held| *held < key);
        }
        while self.keys.get(self.next).is_some_and(|held| *held < key) {
            self.next += 1;
        }
        (self.keys.get(self.next) == Some(&key)).then_some(self.next)
    }
}

fn via_from_row(row: &postgres::Row, first: usize) -> Result<Via, StoreError> {
    Ok(Via {
        reach: Reach { full_history: row.try_get(first)?, existing_since: row.try_get(first + 1)? },
        forced: row.try_get(first + 2)?,
    })
}

/// Adds resources to the set.
fn output(db: &mut Db<'_>, resource_type: &str, rids: &[i64]) -> Result<(), StoreError> {
    if !rids.is_empty() {
        db.execute(
            "INSERT INTO assoc_out (resource_type, rid) SELECT $1, rid FROM unnest($2::int8[]) AS n(rid)
             ON CONFLICT DO NOTHING",
            &[&resource_type, &rids],
        )?;
    }
    Ok(())
}

/// Moves the found Provenance into the set, and records their references as level-1 nodes.
fn resolve_provenance(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    request: &AssociatedRequest,
    referencing: bool,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let mut after = i64::MIN;
    loop {
        let batch: Vec<(i64, Via)> = db
            .query(
                "SELECT rid, full_history, since, forced FROM assoc_provenance WHERE rid > $1 ORDER BY rid LIMIT $2",
                &[&after, &BATCH],
            )?
            .iter()
            .map(|row| Ok((row.try_get(0)?, via_from_row(row, 1)?)))
            .collect::<Result<_, StoreError>>()?;
        let Some(&(last, _)) = batch.last() else { return Ok(()) };
        after = last;
        let rids: Vec<i64> = batch.iter().map(|(rid, _)| *rid).collect();
        let states = states_at(db, tenant, &rids, at)?;
        let (mut sent, mut onward) = (Vec::new(), Reached::default());
        for (rid, via) in batch {
            let Some(state) = states.get(&rid) else { continue };
            let exported = exported(selection, via, state.last_updated);
            if exported {
                sent.push(rid);
            }
            onward.push(rid, Via { forced: exported, ..via });
        }
        output(db, "Provenance", &sent)?;
        if referencing {
            add_references(db, tenant, &onward, at, 1, &request.referenced)?;
        }
    }
}

/// Resolves the nodes of one level: those live and visible at the transaction time join the
/// set when [`exported`]; below the depth limit, their own references become the next level.
fn resolve_level(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    request: &AssociatedRequest,
    level: u32,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let mut after = i64::MIN;
    loop {
        // Each node with the key of the resource it names (referenced, never stored: none).
        let rows = db.query(
            "SELECT n.node, n.target_type, r.rid, n.full_history, n.since, n.forced
             FROM (SELECT * FROM assoc_node WHERE level = $2 AND node > $3 ORDER BY node LIMIT $4) AS n
             LEFT JOIN resources r ON r.tenant_id = $1 AND r.resource_type = n.target_type AND r.id = n.target_id
             ORDER BY n.node",
            &[&tenant.0, &(level as i32), &after, &BATCH],
        )?;
        let Some(last) = rows.last() else { return Ok(()) };
        after = last.try_get(0)?;
        let mut found: Vec<(String, i64, Via)> = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(rid) = row.try_get::<_, Option<i64>>(2)? {
                found.push((row.try_get(1)?, rid, via_from_row(row, 3)?));
            }
        }
        let rids: Vec<i64> = found.iter().map(|(_, rid, _)| *rid).collect();
        let states = states_at(db, tenant, &rids, at)?;
        let (mut sent, mut onward): (HashMap<String, Vec<i64>>, Reached) = Default::default();
        for (resource_type, rid, via) in found {
            let Some(state) = states.get(&rid) else { continue };
            if state.deleted || !visible_to(selection, state.owner.as_deref()) {
                continue;
            }
            let exported = exported(selection, via, state.last_updated);
            if exported {
                sent.entry(resource_type).or_default().push(rid);
            }
            onward.push(rid, Via { forced: exported, ..via });
        }
        for (resource_type, rids) in sent {
            output(db, &resource_type, &rids)?;
        }
        if level < request.depth {
            add_references(db, tenant, &onward, at, level + 1, &request.referenced)?;
        }
    }
}

// ---- reading ----

/// Keys of a stored set read per window at most.
const READ_BATCH: usize = 512;

/// Reads one part of a stored associated set: each window is one short read transaction.
pub(super) struct AssociatedPartReader<'a> {
    pub(super) store: &'a PgStore,
    pub(super) tenant: TenantId,
    pub(super) selection: &'a MemberSelection,
    pub(super) set_id: &'a str,
    pub(super) resource_type: &'a str,
    /// The next key to read; `None` once the part is complete.
    pub(super) next_key: Option<i64>,
    pub(super) last_key: i64,
    /// Bytes and lines read so far, to size the next batch to the caller's `max_bytes`.
    pub(super) read_bytes: u64,
    pub(super) read_lines: u64,
}

impl PartReader for AssociatedPartReader<'_> {
    fn next_window(&mut self, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError> {
        let Some(mut next_key) = self.next_key else { return Ok(0) };
        let at = self.selection.transaction_time;
        let start_len = out.len();
        let mut count = 0u64;
        let store = self.store;
        let next = store.with_read(|db| {
            while out.len() - start_len < max_bytes {
                let average = self.read_bytes.checked_div(self.read_lines).map_or(1024, |average| average.max(1));
                let wanted = ((max_bytes - (out.len() - start_len)) as u64).div_ceil(average) as usize;
                let limit = wanted.clamp(1, READ_BATCH) as i64;
                // Each key with the body of its version at the transaction time.
                let rows = db.query(
                    "SELECT a.rid, CASE WHEN r.last_updated <= $6 THEN r.body ELSE h.body END
                     FROM (SELECT rid FROM export_associated
                           WHERE tenant_id = $1 AND set_id = $2 AND resource_type = $3 AND rid BETWEEN $4 AND $5
                           ORDER BY rid LIMIT $7) AS a
                     JOIN resources r ON r.tenant_id = $1 AND r.rid = a.rid
                     LEFT JOIN LATERAL (
                         SELECT body FROM resource_history
                         WHERE tenant_id = $1 AND rid = a.rid AND last_updated <= $6 ORDER BY version DESC LIMIT 1
                     ) h ON r.last_updated > $6
                     ORDER BY a.rid",
                    &[&self.tenant.0, &self.set_id, &self.resource_type, &next_key, &self.last_key, &at, &limit],
                )?;
                for row in &rows {
                    let rid: i64 = row.try_get(0)?;
                    let Some(body) = row.try_get::<_, Option<&str>>(1)? else {
                        return Err(StoreError::Database(format!(
                            "export: no stored version of resource {rid} at {at}"
                        )));
                    };
                    out.extend_from_slice(body.as_bytes());
                    out.push(b'\n');
                    self.read_bytes += body.len() as u64 + 1;
                    self.read_lines += 1;
                    count += 1;
                    next_key = rid.saturating_add(1);
                }
                if (rows.len() as i64) < limit || next_key > self.last_key {
                    return Ok(None);
                }
            }
            Ok(Some(next_key))
        })?;
        self.next_key = next;
        Ok(count)
    }
}

pub(super) fn associated_ids(
    db: &mut Db<'_>,
    tenant: TenantId,
    set_id: &str,
    resource_type: &str,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    db.query(
        "SELECT r.id FROM unnest($4::text[]) WITH ORDINALITY AS n(id, ord)
         JOIN resources r ON r.tenant_id = $1 AND r.resource_type = $2 AND r.id = n.id
         JOIN export_associated a ON a.tenant_id = $1 AND a.set_id = $3 AND a.resource_type = $2 AND a.rid = r.rid
         ORDER BY n.ord",
        &[&tenant.0, &resource_type, &set_id, &ids],
    )?
    .iter()
    .map(|row| Ok(row.try_get(0)?))
    .collect()
}

/// The Provenance whose `target`, at `at`, names one of `targets`, sorted and each once. A
/// target row carries its target's key whenever the target's row exists, so the rows naming a
/// `(type, id)` are those with its key (`provenance_by_target_rid`) and those without a key
/// (`provenance_unresolved`): two indexed lookups, and no index on the target's text.
pub(super) fn provenance_targeting(
    db: &mut Db<'_>,
    tenant: TenantId,
    targets: &[(String, String)],
    at: Micros,
) -> Result<Vec<String>, StoreError> {
    let (types, ids): (Vec<&str>, Vec<&str>) = targets.iter().map(|(t, id)| (t.as_str(), id.as_str())).unzip();
    let found = db.query(
        "WITH targeting AS (
             SELECT x.rid, x.from_ts, x.to_ts FROM unnest($2::text[], $3::text[]) AS n(target_type, target_id)
             JOIN resources t ON t.tenant_id = $1 AND t.resource_type = n.target_type AND t.id = n.target_id
             JOIN reference_index x ON x.tenant_id = $1 AND x.target_rid = t.rid AND x.provenance_target
             UNION ALL
             SELECT x.rid, x.from_ts, x.to_ts FROM unnest($2::text[], $3::text[]) AS n(target_type, target_id)
             JOIN reference_index x ON x.tenant_id = $1 AND x.provenance_target AND x.target_rid IS NULL
                  AND x.target_type = n.target_type AND x.target_id = n.target_id)
         SELECT DISTINCT r.id FROM targeting x JOIN resources r ON r.tenant_id = $1 AND r.rid = x.rid
         WHERE x.from_ts <= $4 AND (x.to_ts IS NULL OR x.to_ts > $4)",
        &[&tenant.0, &types, &ids, &at],
    )?;
    // Sorted here, by bytes as SQLite sorts, whatever the database's collation.
    let mut found = found.iter().map(|row| row.try_get(0)).collect::<Result<Vec<String>, _>>()?;
    found.sort_unstable();
    Ok(found)
}

/// Housekeeping across tenants: removes the sets that expired by `now` (a scan of the small
/// `associated_sets`; each set's rows go by their key prefix). One statement: a registration
/// leaves with its rows, and one whose expiry a sharing export extends meanwhile (its row lock
/// makes the `DELETE` re-check it) stays with all of them (see `plan_watermarks`).
pub(super) fn delete_expired_sets(db: &mut Db<'_>, now: Micros) -> Result<(), StoreError> {
    db.execute(
        "WITH expired AS (DELETE FROM associated_sets WHERE expires <= $1 RETURNING tenant_id, set_id)
         DELETE FROM export_associated a USING expired e WHERE a.tenant_id = e.tenant_id AND a.set_id = e.set_id",
        &[&now],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::{Store, TenantId, WriteMode, WriteOp};

    fn write(store: &dyn Store, tenant: TenantId, op: WriteOp) {
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    }

    fn put(store: &dyn Store, tenant: TenantId, body: Value) {
        let (resource_type, id) =
            (body["resourceType"].as_str().unwrap().to_owned(), body["id"].as_str().unwrap().to_owned());
        write(store, tenant, WriteOp::Update { resource_type, id, body, if_match: None });
    }

    fn provenance(id: &str, targets: &[&str]) -> Value {
        let target: Vec<Value> = targets.iter().map(|target| json!({"reference": target})).collect();
        json!({"resourceType": "Provenance", "id": id, "target": target, "recorded": "2020-01-01T00:00:00Z",
               "agent": [{"who": {"reference": "Practitioner/x"}}]})
    }

    fn observation(id: &str) -> Value {
        json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
               "subject": {"reference": "Patient/a"}})
    }

    /// Every reference row, with its target key.
    fn rows(store: &super::PgStore) -> Vec<String> {
        store
            .with_transaction(|db| {
                let rows = db.query(
                    "SELECT tenant_id, rid, provenance_target, target_type, target_id, from_ts, to_ts, target_rid
                     FROM reference_index ORDER BY 1, 2, 3, 4, 5, 6",
                    &[],
                )?;
                rows.iter()
                    .map(|row| {
                        Ok(format!(
                            "{:?}",
                            (
                                row.try_get::<_, i64>(1)?,
                                row.try_get::<_, bool>(2)?,
                                row.try_get::<_, String>(3)?,
                                row.try_get::<_, String>(4)?,
                                row.try_get::<_, i64>(5)?,
                                row.try_get::<_, Option<i64>>(6)?,
                                row.try_get::<_, Option<i64>>(7)?
                            )
                        ))
                    })
                    .collect()
            })
            .unwrap()
    }

    /// Migration 8 gives a reference index written before it the keys the write path keeps
    /// (resolved, or NULL for a target that does not exist), the same associated data at every
    /// earlier time, and targets created afterwards resolve.
    #[test]
    fn migration_8_resolves_the_keys_of_existing_provenance_targets() {
        let Some(database) = super::super::testing::fresh_database() else { return };
        let options = super::super::testing::test_options;
        let store = super::PgStore::open(&database.url, options()).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        put(&store, tenant, json!({"resourceType": "Patient", "id": "a"}));
        put(&store, tenant, provenance("p1", &["Observation/o1", "Patient/a"]));
        put(&store, tenant, provenance("p3", &["Observation/later"]));
        put(&store, tenant, observation("o1"));
        let first = store.reserve_transaction_time().unwrap();
        put(&store, tenant, provenance("p2", &["Observation/o1"]));
        write(&store, tenant, WriteOp::Delete { resource_type: "Observation".into(), id: "o1".into() });
        let second = store.reserve_transaction_time().unwrap();
        put(&store, tenant, observation("o1"));
        put(&store, tenant, provenance("p1", &["Observation/o2"]));
        put(&store, tenant, observation("o2"));
        let third = store.reserve_transaction_time().unwrap();
        let kept = rows(&store);
        assert!(kept.iter().any(|row| row.ends_with("None)")) && kept.iter().any(|row| row.ends_with("))")));
        let times = [first, second, third];
        let expected: Vec<u64> = times
            .iter()
            .enumerate()
            .map(|(n, at)| crate::testsuite::provenance_of_member_a_at(&store, tenant, *at, &format!("a{n}")))
            .collect();
        assert_eq!(expected, [1, 1, 2], "p1; p1 (o1 deleted); p1 through o2 and p2 through the re-created o1");
        // Back to version 7.
        store
            .with_transaction(|db| {
                db.batch(
                    "DROP INDEX provenance_by_target_rid; DROP INDEX provenance_unresolved;
                     ALTER TABLE reference_index DROP COLUMN target_rid;
                     DELETE FROM schema_migrations WHERE version >= 8;",
                )
            })
            .unwrap();
        drop(store);

        let store = super::PgStore::open(&database.url, options()).unwrap();
        assert_eq!(rows(&store), kept, "the migration resolves exactly the keys the writes kept");
        let rebuilt: Vec<u64> = times
            .iter()
            .enumerate()
            .map(|(n, at)| crate::testsuite::provenance_of_member_a_at(&store, tenant, *at, &format!("b{n}")))
            .collect();
        assert_eq!(rebuilt, expected);
        put(&store, tenant, observation("later"));
        let now = store.reserve_transaction_time().unwrap();
        assert_eq!(
            crate::testsuite::provenance_of_member_a_at(&store, tenant, now, "c"),
            3,
            "a target created after the migration resolves"
        );
    }
}
