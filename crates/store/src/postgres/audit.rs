//! The audit trail on PostgreSQL: `audit_log`, one row per record, append-only (a trigger
//! refuses every UPDATE), with the patients a record touched inline (`patients`, a sorted
//! array). The table `audit_patient` that earlier schemas kept beside it was a second insert
//! (and two index entries) in every audited write's transaction, and no query was driven by it;
//! migration 12 moved its rows into `patients` and dropped it.

use bulkhead_fhir::Micros;
use postgres::Row;

use super::Db;
use crate::{AuditCohort, AuditQuery, AuditRecord, StoreError, TenantId};

/// The advisory lock appends hold until they commit ("audit" in ASCII): `seq` then ascends in
/// commit order, so a reader paging by `seq` never skips a record that committed after it read.
const APPEND_LOCK: i64 = 0x0061_7564_6974;

/// Appends records inside the open transaction; `seq` is assigned here. One statement (one
/// round trip, one insert) per record: the lock and the record with its patients. A write's
/// record is appended while the write holds the clock row, so every round trip here lengthens
/// the section in which writers are serialised.
pub(super) fn append(db: &mut Db<'_>, records: &[AuditRecord]) -> Result<(), StoreError> {
    // `lock` is read by the insert's source, so the lock is held before the identity default
    // hands out `seq`.
    const APPEND: &str = "WITH lock AS (SELECT pg_advisory_xact_lock($14::int8))
         INSERT INTO audit_log (tenant_id, time, client_id, user_id, peer, request_id, action, target,
                                outcome, status, detail, cohort_group, cohort_time, patients)
         SELECT $1::int8, $2::int8, $3::text, $4::text, $5::text, $6::text, $7::text, $8::text, $9::text,
                $10::int4, $11::text, $12::text, $13::int8, $15::text[]
         FROM lock";
    for record in records {
        let cohort = record.cohort.as_ref();
        // Sorted by bytes and distinct, as the table's key kept them; none is NULL.
        let mut patients: Vec<&str> = record.patients.iter().map(String::as_str).collect();
        patients.sort_unstable();
        patients.dedup();
        let patients = (!patients.is_empty()).then_some(patients);
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
                &patients,
            ],
        )?;
    }
    Ok(())
}

const COLUMNS: &str = "a.seq, a.tenant_id, a.time, a.client_id, a.user_id, a.peer, a.request_id, a.action, a.target,
     a.outcome, a.status, a.detail, a.cohort_group, a.cohort_time, a.patients";

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
                OR $6 = ANY (a.patients)
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
    rows.iter().map(record_from_row).collect()
}

/// Deletes every record older than `before`, tenant by tenant (each statement stays in one
/// tenant's rows and uses its time index); returns how many.
pub(super) fn prune(db: &mut Db<'_>, before: Micros) -> Result<u64, StoreError> {
    let tenants: Vec<i64> =
        db.query("SELECT id FROM tenants", &[])?.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>()?;
    let mut deleted = 0;
    for tenant in tenants {
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
        patients: row.try_get::<_, Option<Vec<String>>>(14)?.unwrap_or_default(),
        cohort: cohort_group
            .zip(cohort_time)
            .map(|(group_id, transaction_time)| AuditCohort { group_id, transaction_time }),
    })
}

#[cfg(test)]
mod tests {
    use crate::postgres::migrations::MIGRATIONS;
    use crate::postgres::testing::{fresh_database, has_lz4, test_options};
    use crate::postgres::PgStore;
    use crate::{AuditQuery, AuditRecord, Store, TenantId};

    fn record(tenant: TenantId, time: i64, patients: &[&str]) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time,
            tenant,
            client: "c".into(),
            user: None,
            peer: None,
            request_id: format!("r{time}"),
            action: "read".into(),
            target: "Patient/a".into(),
            outcome: "success".into(),
            status: 200,
            detail: "{}".into(),
            patients: patients.iter().map(|id| id.to_string()).collect(),
            cohort: None,
        }
    }

    fn of(store: &PgStore, tenant: TenantId, patient: &str) -> Vec<(i64, Vec<String>)> {
        let query = AuditQuery { patient: Some(patient.into()), limit: 10, ..AuditQuery::default() };
        store.audit_records(tenant, &query).unwrap().into_iter().map(|record| (record.seq, record.patients)).collect()
    }

    fn has_patient_table(store: &PgStore) -> bool {
        store
            .with_read(|db| Ok(db.query_one("SELECT to_regclass('audit_patient') IS NOT NULL", &[])?.try_get(0)?))
            .unwrap()
    }

    /// Migration 12 moves the patients of records written with `audit_patient` into the
    /// records (sorted, as that table's key kept them) and drops the table: `--patient` finds
    /// the same records; stepped back and run again, it changes nothing.
    #[test]
    fn migration_12_moves_audit_patients_inline_and_keeps_every_record() {
        let Some(database) = fresh_database() else { return };
        let store = PgStore::open(&database.url, test_options()).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        store
            .append_audit(&[record(tenant, 1, &["a"]), record(tenant, 2, &["b", "a", "b"]), record(tenant, 3, &[])])
            .unwrap();
        let version = MIGRATIONS.iter().find(|(_, name, _)| *name == "handbacks_and_inline_audit_patients").unwrap().0;
        // The layout before it: patients only in audit_patient.
        let step_back = format!("DELETE FROM schema_migrations WHERE version >= {version}");
        store
            .with_transaction(|db| {
                db.batch(&format!(
                    "CREATE TABLE audit_patient (
                         tenant_id bigint NOT NULL, patient_id text COLLATE \"C\" NOT NULL, seq bigint NOT NULL,
                         PRIMARY KEY (tenant_id, patient_id, seq));
                     CREATE INDEX audit_patient_by_seq ON audit_patient (tenant_id, seq);
                     INSERT INTO audit_patient SELECT tenant_id, unnest(patients), seq FROM audit_log;
                     ALTER TABLE audit_log DROP COLUMN patients;
                     ALTER TABLE export_jobs DROP COLUMN handbacks;
                     {step_back};"
                ))
            })
            .unwrap();
        drop(store);

        let store = PgStore::open(&database.url, test_options()).unwrap();
        assert!(!has_patient_table(&store), "audit_patient is dropped");
        let (a, b) = (vec!["a".to_owned()], vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(of(&store, tenant, "a"), [(1, a.clone()), (2, b.clone())]);
        assert_eq!(of(&store, tenant, "b"), [(2, b.clone())]);
        assert!(of(&store, tenant, "c").is_empty());
        let all = store.audit_records(tenant, &AuditQuery { limit: 10, ..AuditQuery::default() }).unwrap();
        assert_eq!(all.len(), 3, "every record is kept");
        assert!(all[2].patients.is_empty());

        // Run again on the migrated schema: nothing changes.
        store.with_transaction(|db| db.batch(&step_back)).unwrap();
        drop(store);
        let store = PgStore::open(&database.url, test_options()).unwrap();
        assert_eq!(of(&store, tenant, "b"), [(2, b.clone())]);
        store.append_audit(&[record(tenant, 4, &["b"])]).unwrap();
        assert_eq!(of(&store, tenant, "b"), [(2, b), (4, vec!["b".to_owned()])]);
    }

    /// Migration 14: a large record (a Bundle's, listing its entries) is stored with LZ4 where
    /// the server has it, one stored before the migration keeps pglz, and both read back as
    /// written; run again, the migration changes nothing.
    #[test]
    fn migration_14_compresses_large_audit_records_with_lz4() {
        let Some(database) = fresh_database() else { return };
        let store = PgStore::open(&database.url, test_options()).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        let large = |time: i64| {
            let entries: Vec<String> = (0..500)
                .map(|entry| {
                    format!(r#"{{"entry":{entry},"action":"create","target":"Observation/o{entry}/_history/1","outcome":"success","status":201}}"#)
                })
                .collect();
            let patients: Vec<String> = (0..200).map(|patient| format!("patient-{patient:04}")).collect();
            let patients: Vec<&str> = patients.iter().map(String::as_str).collect();
            AuditRecord {
                detail: format!(r#"{{"entries":[{}],"failed":0}}"#, entries.join(",")),
                ..record(tenant, time, &patients)
            }
        };
        let compression = |store: &PgStore, time: i64| -> (Option<String>, Option<String>) {
            store
                .with_read(|db| {
                    let row = db.query_one(
                        "SELECT pg_column_compression(detail), pg_column_compression(patients)
                         FROM audit_log WHERE tenant_id = $1 AND time = $2",
                        &[&tenant.0, &time],
                    )?;
                    Ok((row.try_get(0)?, row.try_get(1)?))
                })
                .unwrap()
        };
        let lz4 = has_lz4(&store);
        let version = MIGRATIONS.iter().find(|(_, name, _)| *name == "audit_compression").unwrap().0;
        let step_back = format!(
            "ALTER TABLE audit_log ALTER COLUMN detail SET COMPRESSION pglz;
             ALTER TABLE audit_log ALTER COLUMN patients SET COMPRESSION pglz;
             DELETE FROM schema_migrations WHERE version >= {version};"
        );
        store.with_transaction(|db| db.batch(&step_back)).unwrap();
        store.append_audit(&[large(1)]).unwrap();
        let pglz = (Some("pglz".to_owned()), Some("pglz".to_owned()));
        assert_eq!(compression(&store, 1), pglz);
        drop(store);

        let store = PgStore::open(&database.url, test_options()).unwrap();
        store.append_audit(&[large(2)]).unwrap();
        let method = Some(if lz4 { "lz4" } else { "pglz" }.to_owned());
        let expected = (method.clone(), method);
        assert_eq!(compression(&store, 2), expected);
        assert_eq!(compression(&store, 1), pglz, "stored records are not rewritten");
        let all = store.audit_records(tenant, &AuditQuery { limit: 10, ..AuditQuery::default() }).unwrap();
        for (read, time) in all.iter().zip([1, 2]) {
            let written = large(time);
            assert_eq!(
                (&read.detail, &read.patients),
                (&written.detail, &written.patients),
                "record {time} reads back"
            );
        }

        // Run again on the migrated schema: nothing changes.
        store
            .with_transaction(|db| db.batch(&format!("DELETE FROM schema_migrations WHERE version >= {version}")))
            .unwrap();
        drop(store);
        let store = PgStore::open(&database.url, test_options()).unwrap();
        store.append_audit(&[large(3)]).unwrap();
        assert_eq!(compression(&store, 3), expected);
    }
}
