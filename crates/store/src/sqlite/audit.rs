//! The audit trail: `audit_log`, one row per record, append-only, clustered by tenant and
//! `seq`, with the patients a record touched inline (`patients`, a JSON array).
//!
//! A write's record is appended in the write's own transaction, so every B-tree a record
//! touches is one more page the write's commit puts in the WAL (and a checkpoint copies back):
//! a record touches one, the table itself. The table `audit_patient` (patient, seq) that
//! earlier layouts kept beside it was a second page per write, and on a random leaf (ordered by
//! patient); no query was driven by it (a `--patient` query reads the tenant's records in `seq`
//! order and tested each against it), so it is gone: the test reads the record's own
//! `patients` (see [`records`]), and databases that have the table drop it on open
//! ([`drop_patient_table`]).

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::{AuditCohort, AuditQuery, AuditRecord, StoreError, TenantId};

/// Appends records; `seq` is assigned here, ascending per tenant.
pub(super) fn append(connection: &Connection, records: &[AuditRecord]) -> Result<(), StoreError> {
    let mut next_seq =
        connection.prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM audit_log WHERE tenant_id = ?1")?;
    let mut insert = connection.prepare_cached(
        "INSERT INTO audit_log (tenant_id, seq, time, client_id, user_id, peer, request_id, action, target, outcome,
                                status, detail, cohort_group, cohort_time, patients)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?;
    for record in records {
        let cohort = record.cohort.as_ref();
        let seq: i64 = next_seq.query_row([record.tenant.0], |row| row.get(0))?;
        let mut patients: Vec<&str> = record.patients.iter().map(String::as_str).collect();
        patients.sort_unstable();
        patients.dedup();
        let listed = if patients.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&patients).map_err(|error| StoreError::Database(error.to_string()))?)
        };
        insert.execute(params![
            record.tenant.0,
            seq,
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
            listed,
        ])?;
    }
    Ok(())
}

/// The text a patient id has inside a `patients` array when it needs no JSON escape (then
/// every writer of the array, serde_json here and SQLite's `json_group_array` in [`migrate`],
/// spells it the same way): a cheap `instr` test that rules out most records before the exact
/// `json_each` one. `None` for an id with a quote, backslash or control character: only the
/// exact test then.
fn quoted_patient(id: &str) -> Option<String> {
    id.chars().all(|c| c >= ' ' && c != '"' && c != '\\').then(|| format!("\"{id}\""))
}

const COLUMNS: &str = "a.seq, a.tenant_id, a.time, a.client_id, a.user_id, a.peer, a.request_id, a.action, a.target,
     a.outcome, a.status, a.detail, a.cohort_group, a.cohort_time, a.patients";

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
                OR (a.patients IS NOT NULL AND (?8 IS NULL OR instr(a.patients, ?8) > 0)
                    AND EXISTS (SELECT 1 FROM json_each(a.patients) WHERE json_each.value = ?6))
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
        params![
            tenant.0,
            query.after_seq.unwrap_or(0),
            query.since,
            query.client,
            query.action,
            query.patient,
            limit,
            query.patient.as_deref().and_then(quoted_patient),
        ],
        record_from_row,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes records older than `before`, tenant by tenant: each tenant's records in `seq` order
/// up to its first one at or after `before` (an early record appended late, a long download's,
/// waits for a later prune: none is ever deleted early); returns how many. The scan stops at
/// that first record, so a prune reads little more than what it deletes.
pub(super) fn prune(connection: &Connection, before: Micros) -> Result<u64, StoreError> {
    let tenants: Vec<i64> =
        connection.prepare("SELECT id FROM tenants")?.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
    let mut boundary =
        connection.prepare("SELECT seq FROM audit_log WHERE tenant_id = ?1 AND time >= ?2 ORDER BY seq LIMIT 1")?;
    let mut delete = connection.prepare("DELETE FROM audit_log WHERE tenant_id = ?1 AND seq < ?2")?;
    let mut deleted = 0;
    for tenant in tenants {
        let end: i64 = boundary.query_row(params![tenant, before], |row| row.get(0)).optional()?.unwrap_or(i64::MAX);
        deleted += delete.execute(params![tenant, end])? as u64;
    }
    Ok(deleted)
}

/// The patient ids of a record's `patients` column.
fn patients_of(listed: Option<&str>) -> Vec<String> {
    listed.and_then(|text| serde_json::from_str(text).ok()).unwrap_or_default()
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    let cohort_group: Option<String> = row.get(12)?;
    let cohort_time: Option<Micros> = row.get(13)?;
    let listed: Option<String> = row.get(14)?;
    let mut patients = patients_of(listed.as_deref());
    patients.sort_unstable();
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
        patients,
        cohort: cohort_group
            .zip(cohort_time)
            .map(|(group_id, transaction_time)| AuditCohort { group_id, transaction_time }),
    })
}

/// True while `audit_log` has the earlier layout (a rowid table without `patients`).
fn is_rowid_layout(connection: &Connection) -> Result<bool, StoreError> {
    Ok(connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_log')
            AND NOT EXISTS (SELECT 1 FROM pragma_table_info('audit_log') WHERE name = 'patients')",
        [],
        |row| row.get(0),
    )?)
}

/// Converts an audit trail of the earliest layout (a rowid table indexed by tenant and by time,
/// its patients only in `audit_patient`, indexed by seq) to the current one, in one immediate transaction, keeping
/// every record with its `seq`; does nothing on any other database. `schema` is the current DDL.
pub(super) fn migrate(connection: &mut Connection, schema: &str) -> Result<(), StoreError> {
    if !is_rowid_layout(connection)? {
        return Ok(());
    }
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Another process may have converted it while this one waited for the lock.
    if !is_rowid_layout(&transaction)? {
        return Ok(());
    }
    tracing::info!("converting the audit trail to its compact layout (clustered by tenant, one B-tree per record)");
    transaction.execute_batch(
        "DROP TRIGGER IF EXISTS audit_log_append_only;
         DROP INDEX IF EXISTS audit_log_by_tenant;
         DROP INDEX IF EXISTS audit_log_by_time;
         ALTER TABLE audit_log RENAME TO audit_log_rowid;",
    )?;
    transaction.execute_batch(schema)?;
    transaction.execute_batch(
        "INSERT INTO audit_log (tenant_id, seq, time, client_id, user_id, peer, request_id, action, target, outcome,
                                status, detail, cohort_group, cohort_time, patients)
         SELECT a.tenant_id, a.seq, a.time, a.client_id, a.user_id, a.peer, a.request_id, a.action, a.target,
                a.outcome, a.status, a.detail, a.cohort_group, a.cohort_time,
                (SELECT json_group_array(patient_id) FROM
                    (SELECT p.patient_id FROM audit_patient p WHERE p.seq = a.seq ORDER BY p.patient_id)
                 HAVING COUNT(*) > 0)
         FROM audit_log_rowid a ORDER BY a.tenant_id, a.seq;",
    )?;
    let count = |table: &str| -> Result<i64, StoreError> {
        Ok(transaction.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| row.get(0))?)
    };
    let (before, after) = (count("audit_log_rowid")?, count("audit_log")?);
    if before != after {
        // Dropping the transaction rolls everything back.
        return Err(StoreError::Database(format!(
            "audit trail conversion: {before} records but {after} copied; the database is unchanged"
        )));
    }
    transaction.execute_batch(
        "DROP TABLE audit_log_rowid;
         DROP TABLE audit_patient;",
    )?;
    transaction.commit()?;
    Ok(())
}

/// Drops `audit_patient`, the patient index of the two-B-tree layout: every record lists its
/// patients inline (that layout wrote both from the same list, and [`migrate`] fills the
/// column from the table), so nothing is lost. Does nothing once it is gone.
pub(super) fn drop_patient_table(connection: &Connection) -> Result<(), StoreError> {
    let present: bool = connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_patient')",
        [],
        |row| row.get(0),
    )?;
    if present {
        tracing::info!("dropping the audit trail's patient index: records list their patients inline");
        connection.execute_batch("DROP TABLE IF EXISTS audit_patient")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use crate::sqlite::SqliteStore;
    use crate::{AuditQuery, AuditRecord, Store, TenantId};

    /// The earlier layout's DDL and three records as it stored them: tenant 1 has seq 1 (a read
    /// of Patient a) and 3 (a search touching a and b), tenant 2 has seq 2 (no patients).
    const ROWID_LAYOUT: &str = r#"
        DROP TRIGGER audit_log_append_only;
        DROP TABLE audit_log;
        DROP TABLE IF EXISTS audit_patient;
        CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY, tenant_id INTEGER NOT NULL, time INTEGER NOT NULL,
            client_id TEXT NOT NULL, user_id TEXT, peer TEXT, request_id TEXT NOT NULL,
            action TEXT NOT NULL, target TEXT NOT NULL, outcome TEXT NOT NULL, status INTEGER NOT NULL,
            detail TEXT NOT NULL, cohort_group TEXT, cohort_time INTEGER);
        CREATE INDEX audit_log_by_tenant ON audit_log (tenant_id, seq);
        CREATE INDEX audit_log_by_time ON audit_log (time);
        CREATE TABLE audit_patient (
            tenant_id INTEGER NOT NULL, patient_id TEXT NOT NULL, seq INTEGER NOT NULL,
            PRIMARY KEY (tenant_id, patient_id, seq)) WITHOUT ROWID;
        CREATE INDEX audit_patient_by_seq ON audit_patient (seq);
        CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
        INSERT INTO audit_log VALUES
          (1, 1, 100, 'c1', 'u1', '127.0.0.1:1', 'r1', 'read', 'Patient/a/_history/1', 'success', 200, '{}', NULL, NULL),
          (2, 2, 150, 'c9', NULL, NULL, 'r2', 'token.issue', 'c9', 'success', 200, '{"scope":"s"}', NULL, NULL),
          (3, 1, 200, 'c2', NULL, NULL, 'r3', 'search', 'Observation', 'success', 200, '{"returned":2}', 'g', 190);
        INSERT INTO audit_patient VALUES (1, 'a', 1), (1, 'b', 3), (1, 'a', 3);
    "#;

    fn summary(records: &[AuditRecord]) -> Vec<(i64, String, Vec<String>)> {
        records.iter().map(|record| (record.seq, record.action.clone(), record.patients.clone())).collect()
    }

    fn all(store: &SqliteStore, tenant: i64) -> Vec<AuditRecord> {
        store.audit_records(TenantId(tenant), &AuditQuery { limit: 100, ..AuditQuery::default() }).unwrap()
    }

    fn names(path: &std::path::Path, kind: &str) -> Vec<String> {
        let connection = Connection::open(path).unwrap();
        let mut statement = connection
            .prepare("SELECT name FROM sqlite_master WHERE type = ?1 AND tbl_name LIKE 'audit%' ORDER BY name")
            .unwrap();
        statement.query_map([kind], |row| row.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn an_audit_trail_of_the_rowid_layout_is_converted_on_open_keeping_every_record() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("audit.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store.create_tenant("t1").unwrap();
            store.create_tenant("t2").unwrap();
        }
        Connection::open(&path).unwrap().execute_batch(ROWID_LAYOUT).unwrap();
        assert!(names(&path, "index").contains(&"audit_log_by_time".to_owned()));

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(names(&path, "table"), ["audit_log"], "the rowid table and the patient index are gone");
        assert!(names(&path, "index").iter().all(|name| name.starts_with("sqlite_autoindex")), "no secondary index");
        let first = all(&store, 1);
        assert_eq!(
            summary(&first),
            [(1, "read".to_owned(), vec!["a".to_owned()]), (3, "search".to_owned(), vec!["a".into(), "b".into()])]
        );
        assert_eq!(
            first[1].cohort.as_ref().map(|cohort| (cohort.group_id.as_str(), cohort.transaction_time)),
            Some(("g", 190))
        );
        assert_eq!((first[0].user.as_deref(), first[0].peer.as_deref()), (Some("u1"), Some("127.0.0.1:1")));
        assert_eq!(summary(&all(&store, 2)), [(2, "token.issue".to_owned(), vec![])]);
        let of_b = AuditQuery { patient: Some("b".into()), limit: 100, ..AuditQuery::default() };
        assert_eq!(summary(&store.audit_records(TenantId(1), &of_b).unwrap())[0].0, 3, "found by patient");

        // New records follow the converted ones; the trail is still append-only.
        let next = AuditRecord { seq: 0, time: 300, patients: vec!["c".into()], ..first[0].clone() };
        store.append_audit(&[next]).unwrap();
        assert_eq!(all(&store, 1).iter().map(|record| record.seq).collect::<Vec<_>>(), [1, 3, 4]);
        let refused = Connection::open(&path).unwrap().execute("UPDATE audit_log SET outcome = 'success'", []);
        assert!(refused.unwrap_err().to_string().contains("append-only"));
        drop(store);
        // Reopening converts nothing twice.
        assert_eq!(all(&SqliteStore::open(&path).unwrap(), 1).len(), 3);
    }

    #[test]
    fn pruning_deletes_each_tenants_records_up_to_its_first_younger_one() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("audit.db")).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        let record = |time: i64, patient: &str| AuditRecord {
            seq: 0,
            time,
            tenant,
            client: "c".into(),
            user: None,
            peer: None,
            request_id: format!("r{time}"),
            action: "read".into(),
            target: format!("Patient/{patient}"),
            outcome: "success".into(),
            status: 200,
            detail: "{}".into(),
            patients: vec![patient.into()],
            cohort: None,
        };
        // 250 is a download's record, appended when it ended, after a younger one.
        store.append_audit(&[record(100, "a"), record(200, "b"), record(300, "c"), record(250, "d")]).unwrap();
        assert_eq!(store.prune_audit(260).unwrap(), 2);
        let left: Vec<i64> = all(&store, tenant.0).iter().map(|record| record.time).collect();
        assert_eq!(left, [300, 250], "never a younger record; the late one waits");
        let of = |patient: &str| {
            let query = AuditQuery { patient: Some(patient.into()), limit: 10, ..AuditQuery::default() };
            store.audit_records(tenant, &query).unwrap().len()
        };
        assert_eq!((of("a"), of("b"), of("c"), of("d")), (0, 0, 1, 1));
        assert_eq!(store.prune_audit(400).unwrap(), 2);
        assert!(all(&store, tenant.0).is_empty());
    }

    /// The layout before this one: `audit_log` as now, plus the patient index `audit_patient`
    /// that every record's patients were also written to.
    const PATIENT_INDEX_LAYOUT: &str = r#"
        CREATE TABLE audit_patient (
            tenant_id INTEGER NOT NULL, patient_id TEXT NOT NULL, seq INTEGER NOT NULL,
            PRIMARY KEY (tenant_id, patient_id, seq)) WITHOUT ROWID;
        INSERT INTO audit_log (tenant_id, seq, time, client_id, request_id, action, target, outcome, status, detail,
                               patients)
        VALUES (1, 1, 100, 'c', 'r1', 'read', 'Patient/a', 'success', 200, '{}', '["a"]'),
               (1, 2, 200, 'c', 'r2', 'search', 'Observation', 'success', 200, '{}', '["a","b"]');
        INSERT INTO audit_patient VALUES (1, 'a', 1), (1, 'a', 2), (1, 'b', 2);
    "#;

    #[test]
    fn the_patient_index_of_the_previous_layout_is_dropped_on_open_and_patients_still_find_their_records() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("audit.db");
        drop(SqliteStore::open(&path).unwrap().create_tenant("t1").unwrap());
        Connection::open(&path).unwrap().execute_batch(PATIENT_INDEX_LAYOUT).unwrap();
        assert_eq!(names(&path, "table"), ["audit_log", "audit_patient"]);

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(names(&path, "table"), ["audit_log"], "the patient index is gone");
        let of = |patient: &str| {
            let query = AuditQuery { patient: Some(patient.into()), limit: 10, ..AuditQuery::default() };
            store.audit_records(TenantId(1), &query).unwrap().iter().map(|record| record.seq).collect::<Vec<_>>()
        };
        assert_eq!((of("a"), of("b"), of("c")), (vec![1, 2], vec![2], vec![]));
        let next =
            AuditRecord { seq: 0, time: 300, patients: vec!["c".into(), "a".into()], ..all(&store, 1)[0].clone() };
        store.append_audit(&[next]).unwrap();
        assert_eq!((of("a"), of("c")), (vec![1, 2, 3], vec![3]));
    }
}
