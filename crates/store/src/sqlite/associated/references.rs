//! The referenced resources of an associated set: the references of the cohort's resources
//! (and of the Provenance found) recorded as level-1 nodes in `temp.assoc_node`, merged in
//! memory first ([`FoundNodes`]), then resolved level by level up to the requested depth.

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension};

use super::{state_at, via_from_row, LEVEL_BATCH};
use crate::range_scan::{dense, SortedKeys};
use crate::selection::{exported, visible_to, FoundNodes, Via};
use crate::{AssociatedRequest, MemberSelection, StoreError, TenantId};

const UPSERT_NODE: &str = "INSERT INTO temp.assoc_node (target_type, target_id, level, full_history, since, forced)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6)
    ON CONFLICT (target_type, target_id) DO UPDATE SET
        full_history = max(full_history, excluded.full_history),
        since = CASE WHEN since IS NULL THEN excluded.since WHEN excluded.since IS NULL THEN since
                     ELSE min(since, excluded.since) END,
        forced = max(forced, excluded.forced)
    WHERE level = excluded.level";

/// Adds the references of the window's chosen resources (sorted by key) to `nodes`. A dense
/// window (a large cohort, or a type imported in one go) reads the index once over the key
/// range instead of seeking per resource.
pub(super) fn add_window_references(
    connection: &Connection,
    chosen: &[(i64, Via)],
    (start, end): (i64, i64),
    at: Micros,
    nodes: &mut FoundNodes<'_>,
) -> Result<(), StoreError> {
    let (Some(&(first, _)), Some(&(last, _))) = (chosen.first(), chosen.last()) else { return Ok(()) };
    if !dense(chosen.len(), (start, end)) {
        for &(rid, via) in chosen {
            add_references(connection, rid, at, via, nodes)?;
        }
        return Ok(());
    }
    let mut references = connection.prepare_cached(
        "SELECT rid, target_type, target_id FROM reference_index
         WHERE rid BETWEEN ?1 AND ?2 AND provenance_target = 0 AND from_ts <= ?3 AND (to_ts IS NULL OR to_ts > ?3)
         ORDER BY rid",
    )?;
    let mut rows = references.query(params![first, last, at])?;
    let mut found_in = SortedKeys::new(chosen, |&(rid, _)| rid);
    while let Some(row) = rows.next()? {
        let rid: i64 = row.get(0)?;
        let Some(index) = found_in.position(rid) else { continue };
        nodes.add(row.get_ref(1)?.as_str()?, row.get_ref(2)?.as_str()?, chosen[index].1);
    }
    Ok(())
}

/// Adds the references of `rid`'s version at `at` to `nodes`.
pub(super) fn add_references(
    connection: &Connection,
    rid: i64,
    at: Micros,
    via: Via,
    nodes: &mut FoundNodes<'_>,
) -> Result<(), StoreError> {
    let mut references = connection.prepare_cached(
        "SELECT target_type, target_id FROM reference_index
         WHERE rid = ?1 AND provenance_target = 0 AND from_ts <= ?2 AND (to_ts IS NULL OR to_ts > ?2)",
    )?;
    let mut rows = references.query(params![rid, at])?;
    while let Some(row) = rows.next()? {
        nodes.add(row.get_ref(0)?.as_str()?, row.get_ref(1)?.as_str()?, via);
    }
    Ok(())
}

/// Nodes held at most: [`record_nodes_if_full`] records them once they are this many.
const NODE_BATCH: usize = 50_000;

/// Records `nodes` in `temp.assoc_node` ([`UPSERT_NODE`] merges alike) once they hold
/// [`NODE_BATCH`]: called after each batch of additions, it bounds what they hold.
pub(super) fn record_nodes_if_full(nodes: &mut FoundNodes<'_>, connection: &Connection) -> Result<(), StoreError> {
    if nodes.len() >= NODE_BATCH {
        record_nodes(nodes, connection)?;
    }
    Ok(())
}

/// Records the nodes held as nodes of their level, merging with those recorded earlier; a node
/// recorded at a lower level stays as it is.
pub(super) fn record_nodes(nodes: &mut FoundNodes<'_>, connection: &Connection) -> Result<(), StoreError> {
    let mut upsert = connection.prepare_cached(UPSERT_NODE)?;
    let level = nodes.level();
    for (target_type, ids) in nodes.drain() {
        for (target_id, via) in ids {
            upsert.execute(params![
                target_type,
                target_id,
                level,
                via.reach.full_history,
                via.reach.existing_since,
                via.forced
            ])?;
        }
    }
    Ok(())
}

/// Resolves the nodes of one level: those live and visible at the transaction time join the
/// output when [`exported`]; below the depth limit, their own references become the next level.
pub(super) fn resolve_level(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    request: &AssociatedRequest,
    level: u32,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let mut batch_statement = connection.prepare(
        "SELECT target_type, target_id, full_history, since, forced FROM temp.assoc_node
         WHERE level = ?1 AND (target_type > ?2 OR (target_type = ?2 AND target_id > ?3))
         ORDER BY target_type, target_id LIMIT ?4",
    )?;
    let mut rid_of = connection
        .prepare_cached("SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3")?;
    let mut output =
        connection.prepare_cached("INSERT OR IGNORE INTO temp.assoc_out (resource_type, rid) VALUES (?1, ?2)")?;
    let mut next = FoundNodes::new(level + 1, &request.referenced);
    let mut after = (String::new(), String::new());
    loop {
        let batch: Vec<(String, String, Via)> = batch_statement
            .query_map(params![level, after.0, after.1, LEVEL_BATCH as i64], |row| {
                Ok((row.get(0)?, row.get(1)?, via_from_row(row, 2)?))
            })?
            .collect::<Result<_, _>>()?;
        let Some(last) = batch.last() else { break };
        after = (last.0.clone(), last.1.clone());
        for (target_type, target_id, via) in batch {
            let rid: Option<i64> =
                rid_of.query_row(params![tenant.0, target_type, target_id], |row| row.get(0)).optional()?;
            let Some(rid) = rid else { continue }; // referenced, never stored
            let Some(state) = state_at(connection, rid, at)? else { continue };
            if state.deleted || !visible_to(selection, state.owner.as_deref()) {
                continue;
            }
            let sent = exported(selection, via, state.last_updated);
            if sent {
                output.execute(params![target_type, rid])?;
            }
            if level < request.depth {
                add_references(connection, rid, at, Via { forced: sent, ..via }, &mut next)?;
            }
        }
        record_nodes_if_full(&mut next, connection)?;
    }
    // The next level's nodes are all recorded before it is resolved.
    record_nodes(&mut next, connection)
}
