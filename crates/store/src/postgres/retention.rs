//! History retention on PostgreSQL: the prune horizon and the batched removal of history before
//! it (the same rules as `sqlite/retention.rs`).
//!
//! Every batch is its own short write transaction over at most `batch` keys, walked by a keyset
//! cursor on `(tenant_id, rid)`: writers wait for one batch at most, and each row is looked at
//! once per prune. Every statement stays within one tenant's rows (`tenant_id` matched on both
//! sides of each subquery).

use bulkhead_fhir::Micros;

use super::{Db, PgStore};
use crate::{PruneReport, StoreError};

pub(super) fn history_horizon(db: &mut Db<'_>) -> Result<Option<Micros>, StoreError> {
    Ok(db.query_opt("SELECT horizon FROM retention WHERE id = 0", &[])?.map(|row| row.try_get(0)).transpose()?)
}

/// The horizon a prune may apply: `cutoff`, or the creation time of the oldest export that can
/// still be downloaded or is still being planned, whichever is earlier. Recorded before anything
/// is removed; the recorded one never moves back.
fn record_horizon(db: &mut Db<'_>, cutoff: Micros, now: Micros) -> Result<Micros, StoreError> {
    let oldest_export: Option<Micros> = db
        .query_one(
            "SELECT min(created) FROM (
                 SELECT created FROM export_records WHERE expires > $1
                 UNION ALL SELECT created FROM export_jobs WHERE state = 'planning' AND expires > $1) AS live",
            &[&now],
        )?
        .try_get(0)?;
    let horizon = oldest_export.map_or(cutoff, |oldest| oldest.min(cutoff));
    db.execute(
        "INSERT INTO retention (id, horizon) VALUES (0, $1)
         ON CONFLICT (id) DO UPDATE SET horizon = GREATEST(retention.horizon, excluded.horizon)",
        &[&horizon],
    )?;
    Ok(horizon)
}

pub(super) fn prune(store: &PgStore, cutoff: Micros, now: Micros, batch: usize) -> Result<PruneReport, StoreError> {
    let batch = batch.max(1) as i64;
    let horizon = store.with_write(|db, _| record_horizon(db, cutoff, now))?;
    let mut report = PruneReport { horizon, ..PruneReport::default() };
    // Earlier versions whose successor was written at or before the horizon.
    report.versions = by_cursor(store, "resource_history", batch, |db, after, upto| {
        db.execute(
            "DELETE FROM resource_history h
             WHERE (h.tenant_id, h.rid) > ($1, $2) AND (h.tenant_id, h.rid) <= ($3, $4) AND h.last_updated < $5 AND (
                 EXISTS (SELECT 1 FROM resources r
                         WHERE r.tenant_id = h.tenant_id AND r.rid = h.rid AND r.last_updated <= $5)
                 OR EXISTS (SELECT 1 FROM resource_history n
                            WHERE n.tenant_id = h.tenant_id AND n.rid = h.rid AND n.version > h.version
                              AND n.last_updated <= $5))",
            &[&after.0, &after.1, &upto.0, &upto.1, &horizon],
        )
    })?;
    // Tombstones from before the horizon: the resource goes with its versions and index rows.
    report.tombstones = by_cursor(store, "resources", batch, |db, after, upto| {
        let gone = db.query(
            "SELECT tenant_id, rid, resource_type, id FROM resources
             WHERE (tenant_id, rid) > ($1, $2) AND (tenant_id, rid) <= ($3, $4) AND deleted AND last_updated <= $5",
            &[&after.0, &after.1, &upto.0, &upto.1, &horizon],
        )?;
        for row in &gone {
            let (tenant, rid): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            // The plan cache's watermark: removing index rows changes those patients' compartments
            // (this transaction holds the clock, whose `last` is its timestamp).
            db.execute(
                "UPDATE patient_keys SET changed_at = GREATEST(changed_at, (SELECT last FROM clock WHERE id = 0))
                 WHERE tenant_id = $1 AND pkey IN (SELECT pkey FROM compartment WHERE tenant_id = $1 AND rid = $2)",
                &[&tenant, &rid],
            )?;
            super::associated::forget_target(db, crate::TenantId(tenant), rid)?;
            for statement in [
                "DELETE FROM resource_history WHERE tenant_id = $1 AND rid = $2",
                "DELETE FROM compartment WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL",
                "DELETE FROM compartment WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NOT NULL",
                "DELETE FROM search_token WHERE tenant_id = $1 AND rid = $2",
                "DELETE FROM reference_index WHERE tenant_id = $1 AND rid = $2",
                "DELETE FROM resources WHERE tenant_id = $1 AND rid = $2",
            ] {
                db.execute(statement, &[&tenant, &rid])?;
            }
            if row.try_get::<_, &str>(2)? == "Group" {
                db.execute("DELETE FROM group_membership WHERE tenant_id = $1 AND group_rid = $2", &[&tenant, &rid])?;
            }
            // A bulk load that kept this row's key forgets it (`created_keys.rs`).
            db.execute(
                "INSERT INTO resource_removals (tenant_id, removed) VALUES ($1, 1)
                 ON CONFLICT (tenant_id) DO UPDATE SET removed = resource_removals.removed + 1",
                &[&tenant],
            )?;
        }
        Ok(gone.len() as u64)
    })?;
    // Closed compartment rows and ended memberships are rare: bounded deletes until none is left.
    // Their patients' compartments change (the plan cache's watermark, as above).
    report.compartment_rows = until_done(store, batch, |db| {
        let row = db.query_one(
            "WITH gone AS (
                 DELETE FROM compartment WHERE ctid IN (
                     SELECT ctid FROM compartment WHERE to_ts IS NOT NULL AND to_ts <= $1 LIMIT $2)
                 RETURNING tenant_id, pkey),
             marked AS (
                 UPDATE patient_keys k SET changed_at = GREATEST(k.changed_at, (SELECT last FROM clock WHERE id = 0))
                 FROM (SELECT DISTINCT tenant_id, pkey FROM gone) g
                 WHERE k.tenant_id = g.tenant_id AND k.pkey = g.pkey)
             SELECT count(*) FROM gone",
            &[&horizon, &batch],
        )?;
        Ok(row.try_get::<_, i64>(0)? as u64)
    })?;
    // Closed reference-index rows: no export reads the references of versions before the horizon.
    until_done(store, batch, |db| {
        db.execute(
            "DELETE FROM reference_index WHERE ctid IN (
                 SELECT ctid FROM reference_index WHERE to_ts IS NOT NULL AND to_ts <= $1 LIMIT $2)",
            &[&horizon, &batch],
        )
    })?;
    report.memberships = until_done(store, batch, |db| {
        db.execute(
            "DELETE FROM group_membership WHERE ctid IN (
                 SELECT ctid FROM group_membership WHERE removed_at IS NOT NULL AND removed_at <= $1 LIMIT $2)",
            &[&horizon, &batch],
        )
    })?;
    Ok(report)
}

/// Walks `table` in `(tenant_id, rid)` order, about `batch` rows at a time, running `work` on
/// each key range `(after, upto]` in its own write transaction; returns the sum of its counts.
fn by_cursor(
    store: &PgStore,
    table: &str,
    batch: i64,
    work: impl Fn(&mut Db<'_>, (i64, i64), (i64, i64)) -> Result<u64, StoreError> + Sync,
) -> Result<u64, StoreError> {
    let next_upto = format!(
        "SELECT tenant_id, rid FROM (SELECT tenant_id, rid FROM {table} WHERE (tenant_id, rid) > ($1, $2)
         ORDER BY tenant_id, rid LIMIT $3) AS page ORDER BY tenant_id DESC, rid DESC LIMIT 1"
    );
    let (mut after, mut total) = ((i64::MIN, i64::MIN), 0);
    loop {
        let step = store.with_write(|db, _| {
            let Some(row) = db.query_opt(&next_upto, &[&after.0, &after.1, &batch])? else { return Ok(None) };
            let upto: (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            Ok(Some((upto, work(db, after, upto)?)))
        })?;
        let Some((upto, removed)) = step else { return Ok(total) };
        total += removed;
        after = upto;
    }
}

/// Runs a bounded delete in its own write transaction until it removes fewer than `batch` rows.
fn until_done(
    store: &PgStore,
    batch: i64,
    work: impl Fn(&mut Db<'_>) -> Result<u64, StoreError> + Sync,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let removed = store.with_write(|db, _| work(db))?;
        total += removed;
        if removed < batch as u64 {
            return Ok(total);
        }
    }
}
