//! The referenced resources of an associated set: the references of the cohort's resources
//! (and of the Provenance found) recorded as level-1 nodes in `assoc_node`, then resolved level
//! by level up to the requested depth.

use std::collections::HashMap;

use bulkhead_fhir::Micros;

use super::{output, states_at, via_from_row, Reached, BATCH};
use crate::postgres::Db;
use crate::range_scan::SortedKeys;
use crate::selection::{exported, visible_to, FoundNodes, Via};
use crate::{AssociatedRequest, MemberSelection, ReferencedTypes, StoreError, TenantId};

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
pub(super) fn add_references(
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
pub(super) fn add_dense_references(
    nodes: &mut FoundNodes<'_>,
    db: &mut Db<'_>,
    tenant: TenantId,
    reached: &Reached,
    at: Micros,
) -> Result<(), StoreError> {
    let (Some(&first), Some(&last)) = (reached.rids.first(), reached.rids.last()) else { return Ok(()) };
    let mut found_in = SortedKeys::new(&reached.rids, |&rid| rid);
    // No ORDER BY: the planner reads the range through a bitmap, mostly in key order, and a
    // sort of it spilled past `work_mem`; [`SortedKeys`] finds keys in any order.
    db.query_each(
        "SELECT rid, target_type, target_id FROM reference_index
         WHERE tenant_id = $1 AND rid BETWEEN $2 AND $3 AND NOT provenance_target
           AND from_ts <= $4 AND (to_ts IS NULL OR to_ts > $4)",
        &[&tenant.0, &first, &last, &at],
        |row| {
            let Some(index) = found_in.position(row.try_get(0)?) else { return Ok(()) };
            nodes.add(row.try_get(1)?, row.try_get(2)?, reached.via(index));
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
pub(super) fn record_nodes(nodes: &mut FoundNodes<'_>, db: &mut Db<'_>) -> Result<(), StoreError> {
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

/// Resolves the nodes of one level: those live and visible at the transaction time join the
/// set when [`exported`]; below the depth limit, their own references become the next level.
pub(super) fn resolve_level(
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
