//! The audit trail on PostgreSQL: `audit_log` (one row per record, append-only: a trigger
//! refuses every UPDATE) and `audit_patient` (the patients a record touched).

use bulkhead_fhir::Micros;
use postgres::Row;

use super::Db;
use crate::{AuditCohort, AuditQuery, AuditRecord, StoreError, TenantId};

/// The advisory lock appends hold until they commit ("audit" in ASCII): `seq` then ascends in
/// commit order, so a reader paging by `seq` never skips a record that committed after it read.
const APPEND_LOCK: i64 = 0x0061_7564_6974;

/// Appends records inside the open transaction; `seq` is assigned here. One statement (one
/// round trip) per record: the lock, the record and its patients. A write's record is appended
/// while the write holds the clock row, so every round trip here lengthens the section in which
/// writers are serialised.
pub(super) fn append(db: &mut Db<'_>, records: &[AuditRecord]) -> Result<(), StoreError> {
    // `lock` is read by the insert's source, so the lock is held before the identity default
    // hands out `seq`; `inserted` runs exactly once, whether or not the record has patients.
    const APPEND: &str = "WITH lock AS (SELECT pg_advisory_xact_lock($14::int8)),
             inserted AS (
                 INSERT INTO audit_log (tenant_id, time, client_id, user_id, peer, request_id, action, target,
                                        outcome, status, detail, cohort_group, cohort_time)
                 SELECT $1::int8, $2::int8, $3::text, $4::text, $5::text, $6::text, $7::text, $8::text, $9::text,
                        $10::int4, $11::text, $12::text, $13::int8
                 FROM lock
                 RETURNING seq)
         INSERT INTO audit_patient (tenant_id, patient_id, seq)
         SELECT $1::int8, p, inserted.seq FROM inserted, unnest($15::text[]) AS p
         ON CONFLICT DO NOTHING";
    for record in records {
        let cohort = record.cohort.as_ref();
        db.execute(
            APPEND,
            &[
                &record.tenant.0,
                &record.time,
                &record.client,
                &record.user,
                &record.peer,
                &record.request_id,
                &record.action,
                &record.target,
                &record.outcome,
                &i32::from(record.status),
                &record.detail,
                &cohort.map(|cohort| cohort.group_id.as_str()),
                &cohort.map(|cohort| cohort.transaction_time),
                &APPEND_LOCK,
                &record.patients,
            ],
        )?;
    }
    Ok(())
}

const COLUMNS: &str = "a.seq, a.tenant_id, a.time, a.client_id, a.user_id, a.peer, a.request_id, a.action, a.target,
     a.outcome, a.status, a.detail, a.cohort_group, a.cohort_time";

/// Records of one tenant matching `query`, in append order.
pub(super) fn records(db: &mut Db<'_>, tenant: TenantId, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
    // One statement for every combination: an absent filter is NULL and matches everything. A
    // patient matches through the records' own patients, or through the membership history of
    // an export's Group at the export's transaction time (what `members_at` answers).
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_log a
         WHERE a.tenant_id = $1 AND a.seq > $2
           AND ($3::int8 IS NULL OR a.time >= $3)
           AND ($4::text IS NULL OR a.client_id = $4)
           AND ($5::text IS NULL OR a.action = $5)
           AND ($6::text IS NULL
                OR EXISTS (SELECT 1 FROM audit_patient p WHERE p.tenant_id = $1 AND p.patient_id = $6 AND p.seq = a.seq)
                OR (a.cohort_group IS NOT NULL AND EXISTS (
                    SELECT 1 FROM group_membership m
                    JOIN resources g ON g.tenant_id = m.tenant_id AND g.rid = m.group_rid
                    JOIN patient_keys k ON k.tenant_id = m.tenant_id AND k.pkey = m.pkey
                    WHERE m.tenant_id = $1 AND g.resource_type = 'Group' AND g.id = a.cohort_group
                      AND k.patient_id = $6
                      AND m.added_at <= a.cohort_time AND (m.removed_at IS NULL OR m.removed_at > a.cohort_time))))
         ORDER BY a.seq LIMIT $7"
    );
    let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
    let rows = db.query(
        &sql,
        &[&tenant.0, &query.after_seq.unwrap_or(0), &query.since, &query.client, &query.action, &query.patient, &limit],
    )?;
    let mut found: Vec<AuditRecord> = rows.iter().map(record_from_row).collect::<Result<_, _>>()?;
    let seqs: Vec<i64> = found.iter().map(|record| record.seq).collect();
    if !seqs.is_empty() {
        for row in db.query(
            "SELECT seq, patient_id FROM audit_patient WHERE tenant_id = $1 AND seq = ANY($2) ORDER BY seq, patient_id",
            &[&tenant.0, &seqs],
        )? {
            let seq: i64 = row.try_get(0)?;
            if let Some(record) = found.iter_mut().find(|record| record.seq == seq) {
                record.patients.push(row.try_get(1)?);
            }
        }
    }
    Ok(found)
}

/// Deletes every record older than `before`, tenant by tenant (each statement stays in one
/// tenant's rows and uses its time index); returns how many.
pub(super) fn prune(db: &mut Db<'_>, before: Micros) -> Result<u64, StoreError> {
    let tenants: Vec<i64> =
        db.query("SELECT id FROM tenants", &[])?.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>()?;
    let mut deleted = 0;
    for tenant in tenants {
        db.execute(
            "DELETE FROM audit_patient WHERE tenant_id = $1
             AND seq IN (SELECT seq FROM audit_log WHERE tenant_id = $1 AND time < $2)",
            &[&tenant, &before],
        )?;
        deleted += db.execute("DELETE FROM audit_log WHERE tenant_id = $1 AND time < $2", &[&tenant, &before])?;
    }
    Ok(deleted)
}

fn record_from_row(row: &Row) -> Result<AuditRecord, StoreError> {
    let cohort_group: Option<String> = row.try_get(12)?;
    let cohort_time: Option<Micros> = row.try_get(13)?;
    let status: i32 = row.try_get(10)?;
    Ok(AuditRecord {
        seq: row.try_get(0)?,
        tenant: TenantId(row.try_get(1)?),
        time: row.try_get(2)?,
        client: row.try_get(3)?,
        user: row.try_get(4)?,
        peer: row.try_get(5)?,
        request_id: row.try_get(6)?,
        action: row.try_get(7)?,
        target: row.try_get(8)?,
        outcome: row.try_get(9)?,
        status: u16::try_from(status).unwrap_or(0),
        detail: row.try_get(11)?,
        patients: Vec::new(),
        cohort: cohort_group
            .zip(cohort_time)
            .map(|(group_id, transaction_time)| AuditCohort { group_id, transaction_time }),
    })
}
