//! The Provenance of an associated set: those whose target rows, valid at the transaction
//! time, name a cohort resource, found a window at a time and merged in `assoc_provenance`,
//! then resolved into the set (their references becoming level-1 nodes). Also the Provenance
//! targeting given resources at a time ([`provenance_targeting`]).

use std::collections::HashMap;

use bulkhead_fhir::Micros;

use super::references::add_references;
use super::{dense, output, states_at, via_from_row, Reached, BATCH};
use crate::postgres::Db;
use crate::range_scan::SortedKeys;
use crate::selection::{bring_provenance, exported, visible_to, Via};
use crate::{AssociatedRequest, MemberSelection, ProvenanceSelection, StoreError, TenantId};

/// Provenance found and states looked up at most before [`FoundProvenance`] records or
/// forgets them.
const PROVENANCE_HELD: usize = if cfg!(test) { 4 } else { 100_000 };

/// The Provenance found through the cohort's resources, merged in memory (a Provenance usually
/// targets many resources of a window and of several types) and recorded in
/// `assoc_provenance` when many are held, and at the end; with each Provenance's state at the
/// transaction time as looked up, kept across windows. Both bounded by [`PROVENANCE_HELD`].
#[derive(Default)]
pub(super) struct FoundProvenance {
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
    pub(super) fn find(
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
            let mut found_in = SortedKeys::new(&reached.rids, |&rid| rid);
            db.query_each(
                "SELECT target_rid, rid FROM reference_index
                 WHERE tenant_id = $1 AND provenance_target AND target_rid IS NOT NULL AND target_rid BETWEEN $2 AND $3
                   AND from_ts <= $4 AND (to_ts IS NULL OR to_ts > $4)
                 ORDER BY target_rid",
                &[&tenant.0, &first, &last, &at],
                |row| {
                    if let Some(index) = found_in.position(row.try_get(0)?) {
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
        let (live, found) = (&self.live, &mut self.found);
        let live = |provenance| Ok(live.get(&provenance).copied().flatten());
        bring_provenance(&targeting, mode, live, |index, provenance| {
            let via = reached.via(index);
            found.entry(provenance).and_modify(|held| *held = held.merge(via)).or_insert(via);
        })?;
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
    pub(super) fn record(&mut self, db: &mut Db<'_>) -> Result<(), StoreError> {
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

/// Moves the found Provenance into the set, and records their references as level-1 nodes.
pub(super) fn resolve_provenance(
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

/// The Provenance whose `target`, at `at`, names one of `targets`, sorted and each once. A
/// target row carries its target's key whenever the target's row exists, so the rows naming a
/// `(type, id)` are those with its key (`provenance_by_target_rid`) and those without a key
/// (`provenance_unresolved`): two indexed lookups, and no index on the target's text.
pub(in crate::postgres) fn provenance_targeting(
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
