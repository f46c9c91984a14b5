//! History retention: the prune horizon and the batched removal of history before it.
//!
//! Every batch is its own short immediate transaction over at most `batch` rows of one table
//! (found by a rowid cursor, so each row is looked at once per prune): writers wait for one
//! batch at most, never for the whole prune.

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::SqliteStore;
use crate::{PruneReport, StoreError};

pub(super) fn history_horizon(connection: &Connection) -> Result<Option<Micros>, StoreError> {
    Ok(connection.query_row("SELECT horizon FROM retention WHERE id = 0", [], |row| row.get(0)).optional()?)
}

/// The horizon a prune may apply: `cutoff`, or the creation time of the oldest export that can
/// still be downloaded or is still being planned, whichever is earlier (an export's record and
/// job are created before its transaction time is reserved, so this never cuts into a snapshot
/// an export still reads). Recorded before anything is removed; the recorded one never moves
/// back.
fn record_horizon(transaction: &Transaction<'_>, cutoff: Micros, now: Micros) -> Result<Micros, StoreError> {
    let oldest_export: Option<Micros> = transaction.query_row(
        "SELECT MIN(created) FROM (
             SELECT created FROM export_records WHERE expires > ?1
             UNION ALL SELECT created FROM export_jobs WHERE state = 'planning' AND expires > ?1)",
        [now],
        |row| row.get(0),
    )?;
    let horizon = oldest_export.map_or(cutoff, |oldest| oldest.min(cutoff));
    transaction.execute(
        "INSERT INTO retention (id, horizon) VALUES (0, ?1)
         ON CONFLICT (id) DO UPDATE SET horizon = MAX(horizon, excluded.horizon)",
        [horizon],
    )?;
    Ok(horizon)
}

pub(super) fn prune(store: &SqliteStore, cutoff: Micros, now: Micros, batch: usize) -> Result<PruneReport, StoreError> {
    let batch = batch.max(1) as i64;
    let horizon = store.with_write(|transaction, _| record_horizon(transaction, cutoff, now))?;
    let mut report = PruneReport { horizon, ..PruneReport::default() };
    // Earlier versions whose successor was written at or before the horizon: nobody reads the
    // state before the horizon any more.
    report.versions = by_cursor(store, "resource_history", "rowid", batch, |transaction, after, upto| {
        Ok(transaction
            .prepare_cached(
                "DELETE FROM resource_history WHERE rowid IN (
                     SELECT h.rowid FROM resource_history h
                     WHERE h.rowid > ?1 AND h.rowid <= ?2 AND h.last_updated < ?3 AND (
                         EXISTS (SELECT 1 FROM resources r WHERE r.rid = h.rid AND r.last_updated <= ?3)
                         OR EXISTS (SELECT 1 FROM resource_history n
                                    WHERE n.rid = h.rid AND n.version > h.version AND n.last_updated <= ?3)))",
            )?
            .execute(params![after, upto, horizon])? as u64)
    })?;
    // Tombstones from before the horizon: the resource is gone with its versions and index rows.
    report.tombstones = by_cursor(store, "resources", "rid", batch, |transaction, after, upto| {
        let gone: Vec<(i64, i64, String, String)> = transaction
            .prepare_cached(
                "SELECT rid, tenant_id, resource_type, id FROM resources
                 WHERE rid > ?1 AND rid <= ?2 AND deleted = 1 AND last_updated <= ?3",
            )?
            .query_map(params![after, upto, horizon], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?
            .collect::<Result<_, _>>()?;
        for (rid, tenant, resource_type, _id) in &gone {
            // The export plan cache keys validity on the patients' change watermark: removing
            // index rows is a change to their compartments.
            transaction
                .prepare_cached(
                    "UPDATE patient_keys SET changed_at = MAX(changed_at, (SELECT last FROM clock WHERE id = 0))
                     WHERE pkey IN (SELECT pkey FROM compartment WHERE rid = ?1)",
                )?
                .execute([rid])?;
            if resource_type == "Group" {
                transaction.prepare_cached("DELETE FROM group_membership WHERE group_rid = ?1")?.execute([rid])?;
            }
            super::provenance_targets::forget_target(transaction, crate::TenantId(*tenant), resource_type, *rid)?;
            for statement in [
                "DELETE FROM resource_history WHERE rid = ?1",
                "DELETE FROM compartment WHERE rid = ?1 AND to_ts IS NULL",
                "DELETE FROM compartment WHERE rid = ?1 AND to_ts IS NOT NULL",
                "DELETE FROM search_token WHERE rid = ?1",
                "DELETE FROM reference_index WHERE rid = ?1",
                "DELETE FROM resources WHERE rid = ?1",
            ] {
                transaction.prepare_cached(statement)?.execute([rid])?;
            }
        }
        Ok(gone.len() as u64)
    })?;
    // Closed compartment rows (rare: a version moved a resource out of a compartment).
    loop {
        let removed = store.with_write(|transaction, timestamp| {
            let patients: Vec<i64> = transaction
                .prepare_cached(
                    "DELETE FROM compartment WHERE (pkey, type_code, rid, from_ts) IN (
                         SELECT pkey, type_code, rid, from_ts FROM compartment
                         WHERE to_ts IS NOT NULL AND to_ts <= ?1 LIMIT ?2)
                     RETURNING pkey",
                )?
                .query_map(params![horizon, batch], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let mut changed = transaction
                .prepare_cached("UPDATE patient_keys SET changed_at = MAX(changed_at, ?2) WHERE pkey = ?1")?;
            for pkey in &patients {
                changed.execute(params![pkey, timestamp])?;
            }
            Ok(patients.len() as u64)
        })?;
        report.compartment_rows += removed;
        if removed < batch as u64 {
            break;
        }
    }
    // Closed reference-index rows: no export reads the references of versions before the horizon.
    loop {
        let removed = store.with_write(|transaction, _| {
            Ok(transaction
                .prepare_cached(
                    "DELETE FROM reference_index WHERE (rid, provenance_target, target_type, target_id, from_ts) IN (
                         SELECT rid, provenance_target, target_type, target_id, from_ts FROM reference_index
                         WHERE to_ts IS NOT NULL AND to_ts <= ?1 LIMIT ?2)",
                )?
                .execute(params![horizon, batch])? as u64)
        })?;
        if removed < batch as u64 {
            break;
        }
    }
    report.memberships = by_cursor(store, "group_membership", "rowid", batch, |transaction, after, upto| {
        Ok(transaction
            .prepare_cached(
                "DELETE FROM group_membership
                 WHERE rowid > ?1 AND rowid <= ?2 AND removed_at IS NOT NULL AND removed_at <= ?3",
            )?
            .execute(params![after, upto, horizon])? as u64)
    })?;
    Ok(report)
}

/// Walks `table` in key order, `batch` keys at a time, running `work` on each key range
/// `(after, upto]` in its own write transaction; returns the sum of what `work` returned.
fn by_cursor(
    store: &SqliteStore,
    table: &str,
    key: &str,
    batch: i64,
    work: impl Fn(&Transaction<'_>, i64, i64) -> Result<u64, StoreError>,
) -> Result<u64, StoreError> {
    let next_upto =
        format!("SELECT MAX({key}) FROM (SELECT {key} FROM {table} WHERE {key} > ?1 ORDER BY {key} LIMIT ?2)");
    let (mut after, mut total) = (i64::MIN, 0);
    loop {
        let step = store.with_write(|transaction, _| {
            let upto: Option<i64> =
                transaction.prepare_cached(&next_upto)?.query_row(params![after, batch], |row| row.get(0))?;
            match upto {
                Some(upto) => Ok(Some((upto, work(transaction, after, upto)?))),
                None => Ok(None),
            }
        })?;
        let Some((upto, removed)) = step else { return Ok(total) };
        total += removed;
        after = upto;
    }
}
