//! The audit trail: `audit_log` (one row per record, append-only) and `audit_patient` (the
//! patients a record touched, for `--patient`).

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, Row};

use crate::{AuditCohort, AuditQuery, AuditRecord, StoreError, TenantId};

/// Appends records; `seq` is assigned here.
pub(super) fn append(connection: &Connection, records: &[AuditRecord]) -> Result<(), StoreError> {
    let mut insert = connection.prepare_cached(
        "INSERT INTO audit_log (tenant_id, time, client_id, user_id, peer, request_id, action, target, outcome,
                                status, detail, cohort_group, cohort_time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    let mut patient = connection
        .prepare_cached("INSERT OR IGNORE INTO audit_patient (tenant_id, patient_id, seq) VALUES (?1, ?2, ?3)")?;
    for record in records {
        let cohort = record.cohort.as_ref();
        insert.execute(params![
            record.tenant.0,
            record.time,
            record.client,
            record.user,
            record.peer,
            record.request_id,
            record.action,
            record.target,
            record.outcome,
            record.status,
            record.detail,
            cohort.map(|cohort| cohort.group_id.as_str()),
            cohort.map(|cohort| cohort.transaction_time),
        ])?;
        let seq = connection.last_insert_rowid();
        for id in &record.patients {
            patient.execute(params![record.tenant.0, id, seq])?;
        }
    }
    Ok(())
}

const COLUMNS: &str = "a.seq, a.tenant_id, a.time, a.client_id, a.user_id, a.peer, a.request_id, a.action, a.target,
     a.outcome, a.status, a.detail, a.cohort_group, a.cohort_time";

/// Records of one tenant matching `query`, in append order.
pub(super) fn records(
    connection: &Connection,
    tenant: TenantId,
    query: &AuditQuery,
) -> Result<Vec<AuditRecord>, StoreError> {
    // One statement for every combination: an absent filter is NULL and matches everything.
    // A patient matches through the records' own patients, or through the membership history
    // of an export's Group at the export's transaction time (what `members_at` answers).
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_log a
         WHERE a.tenant_id = ?1 AND a.seq > ?2
           AND (?3 IS NULL OR a.time >= ?3)
           AND (?4 IS NULL OR a.client_id = ?4)
           AND (?5 IS NULL OR a.action = ?5)
           AND (?6 IS NULL
                OR EXISTS (SELECT 1 FROM audit_patient p WHERE p.tenant_id = ?1 AND p.patient_id = ?6 AND p.seq = a.seq)
                OR (a.cohort_group IS NOT NULL AND EXISTS (
                    SELECT 1 FROM group_membership m
                    JOIN resources g ON g.rid = m.group_rid
                    JOIN patient_keys k ON k.pkey = m.pkey
                    WHERE m.tenant_id = ?1 AND g.tenant_id = ?1 AND g.resource_type = 'Group'
                      AND g.id = a.cohort_group AND k.tenant_id = ?1 AND k.patient_id = ?6
                      AND m.added_at <= a.cohort_time AND (m.removed_at IS NULL OR m.removed_at > a.cohort_time))))
         ORDER BY a.seq LIMIT ?7"
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
    let rows = statement.query_map(
        params![tenant.0, query.after_seq.unwrap_or(0), query.since, query.client, query.action, query.patient, limit],
        record_from_row,
    )?;
    let mut found: Vec<AuditRecord> = rows.collect::<Result<_, _>>()?;
    let mut patients = connection
        .prepare_cached("SELECT patient_id FROM audit_patient WHERE tenant_id = ?1 AND seq = ?2 ORDER BY patient_id")?;
    for record in &mut found {
        record.patients =
            patients.query_map(params![tenant.0, record.seq], |row| row.get(0))?.collect::<Result<_, _>>()?;
    }
    Ok(found)
}

/// Deletes every record (of every tenant) older than `before`; returns how many.
pub(super) fn prune(connection: &Connection, before: Micros) -> Result<u64, StoreError> {
    connection
        .execute("DELETE FROM audit_patient WHERE seq IN (SELECT seq FROM audit_log WHERE time < ?1)", [before])?;
    let deleted = connection.execute("DELETE FROM audit_log WHERE time < ?1", [before])?;
    Ok(deleted as u64)
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    let cohort_group: Option<String> = row.get(12)?;
    let cohort_time: Option<Micros> = row.get(13)?;
    Ok(AuditRecord {
        seq: row.get(0)?,
        tenant: TenantId(row.get(1)?),
        time: row.get(2)?,
        client: row.get(3)?,
        user: row.get(4)?,
        peer: row.get(5)?,
        request_id: row.get(6)?,
        action: row.get(7)?,
        target: row.get(8)?,
        outcome: row.get(9)?,
        status: row.get(10)?,
        detail: row.get(11)?,
        patients: Vec::new(),
        cohort: cohort_group
            .zip(cohort_time)
            .map(|(group_id, transaction_time)| AuditCohort { group_id, transaction_time }),
    })
}
