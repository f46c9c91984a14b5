//! The Provenance of an associated set: those whose target rows, valid at the transaction
//! time, name a cohort resource, found a window at a time and merged in
//! `temp.assoc_provenance`, then resolved into the set (their references becoming level-1
//! nodes). Also the Provenance targeting given resources at a time ([`provenance_targeting`]).

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension};

use super::references::{add_references, record_nodes_if_full};
use super::{state_at, via_from_row, LEVEL_BATCH};
use crate::range_scan::{dense, SortedKeys};
use crate::selection::{bring_provenance, exported, visible_to, FoundNodes, Via};
use crate::{MemberSelection, ProvenanceSelection, StoreError, TenantId};

/// The Provenance found through one window of cohort resources, merged in memory and recorded
/// once each ([`FoundProvenance::record`]): a Provenance usually targets many resources of a
/// window. Bounded by the window's resources and their targeting rows.
#[derive(Default)]
pub(super) struct FoundProvenance {
    found: std::collections::HashMap<i64, Via>,
}

impl FoundProvenance {
    /// Merges `via` into what reaches Provenance `rid`.
    fn add(&mut self, rid: i64, via: Via) {
        self.found.entry(rid).and_modify(|held| *held = held.merge(via)).or_insert(via);
    }

    /// Records the window's Provenance in `temp.assoc_provenance`, merging with earlier windows'.
    pub(super) fn record(self, connection: &Connection) -> Result<(), StoreError> {
        let mut upsert = connection.prepare_cached(
            "INSERT INTO temp.assoc_provenance (rid, full_history, since, forced) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (rid) DO UPDATE SET
                 full_history = max(full_history, excluded.full_history),
                 since = CASE WHEN since IS NULL THEN excluded.since WHEN excluded.since IS NULL THEN since
                              ELSE min(since, excluded.since) END,
                 forced = max(forced, excluded.forced)",
        )?;
        for (rid, via) in self.found {
            upsert.execute(params![rid, via.reach.full_history, via.reach.existing_since, via.forced])?;
        }
        Ok(())
    }
}

/// Provenance states remembered at most: past it, [`ProvenanceStates`] starts over.
const STATE_CACHE: usize = 100_000;

/// Each Provenance looked up so far during one planning: `Some(lastUpdated)` when its version
/// at the transaction time is live and visible. Kept across windows (a Provenance usually
/// targets resources of several windows and types), bounded by [`STATE_CACHE`].
#[derive(Default)]
pub(super) struct ProvenanceStates(std::collections::HashMap<i64, Option<Micros>>);

impl ProvenanceStates {
    fn live(
        &mut self,
        connection: &Connection,
        selection: &MemberSelection,
        rid: i64,
    ) -> Result<Option<Micros>, StoreError> {
        if let Some(live) = self.0.get(&rid) {
            return Ok(*live);
        }
        if self.0.len() >= STATE_CACHE {
            self.0.clear();
        }
        // A target row valid at the transaction time means that version was live then; the
        // owner decides visibility, the version's time which one is latest.
        let live = state_at(connection, rid, selection.transaction_time)?
            .filter(|state| !state.deleted && visible_to(selection, state.owner.as_deref()))
            .map(|state| state.last_updated);
        self.0.insert(rid, live);
        Ok(live)
    }
}

/// One window of chosen cohort resources of one type, sorted by key, with what reaches each.
pub(super) struct ProvenanceWindow<'a> {
    pub(super) resource_type: &'a str,
    pub(super) chosen: &'a [(i64, Via)],
    /// The window's key range.
    pub(super) span: (i64, i64),
}

/// Finds the Provenance that targeted the window's resources at the transaction time (only the
/// latest one per resource for [`ProvenanceSelection::Latest`]), merging each resource's `via`
/// into those found. Target rows carry their target's key (`target_rid`): a dense window reads
/// the rows targeting its key range in one scan of `provenance_by_target_rid` (the index leads
/// with the type, so other types' keys in the range are not read), a sparse one seeks per
/// resource.
pub(super) fn find_window_provenance(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    window: ProvenanceWindow<'_>,
    mode: ProvenanceSelection,
    states: &mut ProvenanceStates,
    found: &mut FoundProvenance,
) -> Result<(), StoreError> {
    let ProvenanceWindow { resource_type, chosen, span } = window;
    let (Some(&(first, _)), Some(&(last, _))) = (chosen.first(), chosen.last()) else { return Ok(()) };
    let at = selection.transaction_time;
    // `(index in chosen, Provenance key)` of the rows valid at the transaction time, by target.
    let mut targeting: Vec<(usize, i64)> = Vec::new();
    if dense(chosen.len(), span) {
        let mut statement = connection.prepare_cached(
            "SELECT target_rid, rid FROM reference_index INDEXED BY provenance_by_target_rid
             WHERE tenant_id = ?1 AND target_type = ?2 AND target_rid BETWEEN ?3 AND ?4 AND provenance_target = 1
               AND from_ts <= ?5 AND (to_ts IS NULL OR to_ts > ?5)
             ORDER BY target_rid",
        )?;
        let mut rows = statement.query(params![tenant.0, resource_type, first, last, at])?;
        let mut found_in = SortedKeys::new(chosen, |&(rid, _)| rid);
        while let Some(row) = rows.next()? {
            let target: i64 = row.get(0)?;
            if let Some(index) = found_in.position(target) {
                targeting.push((index, row.get(1)?));
            }
        }
    } else {
        let mut statement = connection.prepare_cached(
            "SELECT rid FROM reference_index INDEXED BY provenance_by_target_rid
             WHERE tenant_id = ?1 AND target_type = ?2 AND target_rid = ?3 AND provenance_target = 1
               AND from_ts <= ?4 AND (to_ts IS NULL OR to_ts > ?4)",
        )?;
        for (index, &(rid, _)) in chosen.iter().enumerate() {
            let mut rows = statement.query(params![tenant.0, resource_type, rid, at])?;
            while let Some(row) = rows.next()? {
                targeting.push((index, row.get(0)?));
            }
        }
    }
    let live = |provenance| states.live(connection, selection, provenance);
    bring_provenance(&targeting, mode, live, |index, provenance| found.add(provenance, chosen[index].1))
}

/// Moves the found Provenance into the output, and adds their references to the level-1 `nodes`.
pub(super) fn resolve_provenance(
    connection: &Connection,
    selection: &MemberSelection,
    referencing: bool,
    nodes: &mut FoundNodes<'_>,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let mut batch_statement = connection.prepare(
        "SELECT rid, full_history, since, forced FROM temp.assoc_provenance WHERE rid > ?1 ORDER BY rid LIMIT ?2",
    )?;
    let mut output = connection
        .prepare_cached("INSERT OR IGNORE INTO temp.assoc_out (resource_type, rid) VALUES ('Provenance', ?1)")?;
    let mut after = i64::MIN;
    loop {
        let batch: Vec<(i64, Via)> = batch_statement
            .query_map(params![after, LEVEL_BATCH as i64], |row| Ok((row.get(0)?, via_from_row(row, 1)?)))?
            .collect::<Result<_, _>>()?;
        let Some(&(last, _)) = batch.last() else { return Ok(()) };
        after = last;
        for (rid, via) in batch {
            let Some(state) = state_at(connection, rid, at)? else { continue };
            let sent = exported(selection, via, state.last_updated);
            if sent {
                output.execute([rid])?;
            }
            if referencing {
                add_references(connection, rid, at, Via { forced: sent, ..via }, nodes)?;
            }
        }
        record_nodes_if_full(nodes, connection)?;
    }
}

/// The Provenance whose target rows valid at `at` name one of `targets` (a deleted Provenance's
/// rows are closed), sorted and deduplicated. A target row carries the key of the resource it
/// names whenever that resource has a row, and no key otherwise (`provenance_targets`), so each
/// target is one seek into `provenance_by_target_rid` or, for a resource without a row, into
/// `provenance_unresolved`.
pub(in crate::sqlite) fn provenance_targeting(
    connection: &Connection,
    tenant: TenantId,
    targets: &[(String, String)],
    at: Micros,
) -> Result<Vec<String>, StoreError> {
    let mut key = connection
        .prepare_cached("SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3")?;
    let mut by_key = connection.prepare_cached(
        "SELECT r.id FROM reference_index x INDEXED BY provenance_by_target_rid JOIN resources r ON r.rid = x.rid
         WHERE x.tenant_id = ?1 AND x.target_type = ?2 AND x.target_rid = ?3 AND x.provenance_target = 1
           AND x.from_ts <= ?4 AND (x.to_ts IS NULL OR x.to_ts > ?4)",
    )?;
    let mut unresolved = connection.prepare_cached(
        "SELECT r.id FROM reference_index x INDEXED BY provenance_unresolved JOIN resources r ON r.rid = x.rid
         WHERE x.tenant_id = ?1 AND x.target_type = ?2 AND x.target_id = ?3 AND x.provenance_target = 1
           AND x.target_rid IS NULL AND x.from_ts <= ?4 AND (x.to_ts IS NULL OR x.to_ts > ?4)",
    )?;
    let mut ids = Vec::new();
    for (target_type, target_id) in targets {
        let target: Option<i64> =
            key.query_row(params![tenant.0, target_type, target_id], |row| row.get(0)).optional()?;
        let mut rows = match target {
            Some(target) => by_key.query(params![tenant.0, target_type, target, at])?,
            None => unresolved.query(params![tenant.0, target_type, target_id, at])?,
        };
        while let Some(row) = rows.next()? {
            ids.push(row.get::<_, String>(0)?);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
