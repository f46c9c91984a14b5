//! Converting a database of an earlier schema on open.
//!
//! Version 1 (`schema_v1.sql`) keyed the compartment index, the search index and Group
//! membership by TEXT patient ids, resource type names and Group ids. Version 2 (`schema.sql`)
//! keys them by integers: patient keys (`patient_keys`), type codes and the Group's `rid`.
//! [`migrate_v1_to_v2`] rewrites the three tables in one write transaction, so a crash or a
//! second process opening the same file sees either the old schema or the new one, never a mix;
//! a database already at version 2 (or new) is left alone.

use bulkhead_fhir::RESOURCE_TYPES;
use rusqlite::{Connection, TransactionBehavior};

use crate::StoreError;

/// True while the compartment index still has version 1's TEXT `patient_id` column.
fn is_v1(connection: &Connection) -> Result<bool, StoreError> {
    Ok(connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('compartment') WHERE name = 'patient_id')",
        [],
        |row| row.get(0),
    )?)
}

/// Rows of a table, for checking that a copy lost nothing.
fn count(connection: &Connection, table: &str) -> Result<i64, StoreError> {
    Ok(connection.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| row.get(0))?)
}

/// Converts a version-1 database to version 2 (`schema` is the version-2 DDL), in one immediate
/// transaction; does nothing on any other database. Fails, changing nothing, when a row cannot
/// be carried over exactly (a type name outside R4, a membership row of a Group that has no
/// resource row).
pub(super) fn migrate_v1_to_v2(connection: &mut Connection, schema: &str) -> Result<(), StoreError> {
    if !is_v1(connection)? {
        return Ok(());
    }
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Another process may have migrated while this one waited for the lock.
    if !is_v1(&transaction)? {
        return Ok(());
    }
    tracing::info!("migrating the database to schema version 2 (integer keys in the compartment and search indexes)");
    transaction.execute_batch(
        "CREATE TEMP TABLE migrate_type_codes (name TEXT PRIMARY KEY, code INTEGER NOT NULL);
         ALTER TABLE compartment RENAME TO compartment_v1;
         ALTER TABLE search_token RENAME TO search_token_v1;
         ALTER TABLE group_membership RENAME TO group_membership_v1;
         DROP INDEX IF EXISTS compartment_open_by_rid;
         DROP INDEX IF EXISTS compartment_closed_by_time;
         DROP INDEX IF EXISTS compartment_closed_by_rid;
         DROP INDEX IF EXISTS search_token_by_rid;
         DROP INDEX IF EXISTS group_membership_by_group;",
    )?;
    {
        let mut insert = transaction.prepare("INSERT INTO temp.migrate_type_codes (name, code) VALUES (?1, ?2)")?;
        for (code, name) in RESOURCE_TYPES.iter().enumerate() {
            insert.execute(rusqlite::params![name, code as i64])?;
        }
    }
    transaction.execute_batch(schema)?;
    transaction.execute_batch(
        // A patient's `changed_at` is the last time any of its rows changed (conservative: the
        // plan cache only needs it to be no earlier than that).
        "INSERT INTO patient_keys (tenant_id, patient_id, changed_at)
         SELECT tenant_id, patient_id, MAX(MAX(from_ts), MAX(COALESCE(to_ts, 0)), MAX(last_updated))
         FROM compartment_v1 GROUP BY tenant_id, patient_id ORDER BY tenant_id, patient_id;
         INSERT OR IGNORE INTO patient_keys (tenant_id, patient_id)
         SELECT DISTINCT tenant_id, patient_id FROM group_membership_v1 ORDER BY tenant_id, patient_id;

         INSERT INTO compartment (pkey, type_code, rid, from_ts, to_ts, tenant_id, last_updated, deleted, owner)
         SELECT p.pkey, t.code, c.rid, c.from_ts, c.to_ts, c.tenant_id, c.last_updated, c.deleted, c.owner
         FROM compartment_v1 c
         JOIN patient_keys p ON p.tenant_id = c.tenant_id AND p.patient_id = c.patient_id
         JOIN temp.migrate_type_codes t ON t.name = c.resource_type
         ORDER BY p.pkey, t.code, c.rid, c.from_ts;

         INSERT INTO search_token (tenant_id, type_code, param, value, system, rid)
         SELECT s.tenant_id, t.code, s.param, s.value, s.system, s.rid
         FROM search_token_v1 s JOIN temp.migrate_type_codes t ON t.name = s.resource_type
         ORDER BY s.tenant_id, t.code, s.param, s.value, s.system, s.rid;

         INSERT INTO group_membership (group_rid, pkey, added_at, removed_at, tenant_id)
         SELECT r.rid, p.pkey, g.added_at, g.removed_at, g.tenant_id
         FROM group_membership_v1 g
         JOIN resources r ON r.tenant_id = g.tenant_id AND r.resource_type = 'Group' AND r.id = g.group_id
         JOIN patient_keys p ON p.tenant_id = g.tenant_id AND p.patient_id = g.patient_id
         ORDER BY r.rid, p.pkey, g.added_at;",
    )?;
    for (old, new) in [
        ("compartment_v1", "compartment"),
        ("search_token_v1", "search_token"),
        ("group_membership_v1", "group_membership"),
    ] {
        let (before, after) = (count(&transaction, old)?, count(&transaction, new)?);
        if before != after {
            // Dropping the transaction rolls everything back: the database stays at version 1.
            return Err(StoreError::Database(format!(
                "schema migration: {old} has {before} rows but only {after} could be carried over to {new} \
                 (a resource type outside R4, or a Group membership without its Group); the database is unchanged"
            )));
        }
    }
    transaction.execute_batch(
        "DROP TABLE compartment_v1;
         DROP TABLE search_token_v1;
         DROP TABLE group_membership_v1;
         DROP TABLE temp.migrate_type_codes;",
    )?;
    transaction.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use crate::sqlite::SqliteStore;
    use crate::{
        IdentifierQuery, MemberSelection, ReferenceQuery, SearchQuery, Store, TenantId, Visibility, WriteMode, WriteOp,
    };

    /// A version-1 database as the version-1 writer left it. Tenant 1: Patients a and b;
    /// Observation o1 (subject a, identifier sys|x1); o2 written at 12 about a, re-pointed to b at
    /// 20 (a's row closed); o3 about a, deleted at 21 (its row stays open, marked deleted);
    /// Group g with members a and b from 14, b removed at 30. Tenant 2: its own Patient a with o9.
    const V1_ROWS: &str = r#"
        INSERT INTO tenants (id, name, created) VALUES (1, 't', 1), (2, 'u', 1);
        UPDATE clock SET last = 30;
        INSERT INTO resources (rid, tenant_id, resource_type, id, version, last_updated, deleted, owner, body) VALUES
          (1, 1, 'Patient', 'a', 1, 10, 0, NULL, '{"resourceType":"Patient","id":"a"}'),
          (2, 1, 'Patient', 'b', 1, 11, 0, NULL, '{"resourceType":"Patient","id":"b"}'),
          (3, 1, 'Observation', 'o1', 1, 15, 0, NULL, '{"resourceType":"Observation","id":"o1","identifier":[{"system":"sys","value":"x1"}],"subject":{"reference":"Patient/a"}}'),
          (4, 1, 'Observation', 'o2', 2, 20, 0, NULL, '{"resourceType":"Observation","id":"o2","subject":{"reference":"Patient/b"}}'),
          (5, 1, 'Observation', 'o3', 2, 21, 1, NULL, NULL),
          (6, 1, 'Group', 'g', 2, 30, 0, NULL, '{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/a"}}]}'),
          (7, 2, 'Patient', 'a', 1, 16, 0, NULL, '{"resourceType":"Patient","id":"a"}'),
          (8, 2, 'Observation', 'o9', 1, 17, 0, NULL, '{"resourceType":"Observation","id":"o9","subject":{"reference":"Patient/a"}}');
        INSERT INTO resource_history (rid, version, last_updated, deleted, owner, body) VALUES
          (4, 1, 12, 0, NULL, '{"resourceType":"Observation","id":"o2","subject":{"reference":"Patient/a"}}'),
          (5, 1, 13, 0, NULL, '{"resourceType":"Observation","id":"o3","subject":{"reference":"Patient/a"}}'),
          (6, 1, 14, 0, NULL, '{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/a"}},{"entity":{"reference":"Patient/b"}}]}');
        INSERT INTO compartment (tenant_id, patient_id, resource_type, rid, from_ts, to_ts, last_updated, deleted, owner) VALUES
          (1, 'a', 'Patient', 1, 10, NULL, 10, 0, NULL),
          (1, 'b', 'Patient', 2, 11, NULL, 11, 0, NULL),
          (1, 'a', 'Observation', 3, 15, NULL, 15, 0, NULL),
          (1, 'a', 'Observation', 4, 12, 20, 12, 0, NULL),
          (1, 'b', 'Observation', 4, 20, NULL, 20, 0, NULL),
          (1, 'a', 'Observation', 5, 13, NULL, 21, 1, NULL),
          (2, 'a', 'Patient', 7, 16, NULL, 16, 0, NULL),
          (2, 'a', 'Observation', 8, 17, NULL, 17, 0, NULL);
        INSERT INTO search_token (tenant_id, resource_type, param, value, system, rid) VALUES
          (1, 'Observation', 'identifier', 'x1', 'sys', 3),
          (1, 'Observation', 'subject', 'a', 'Patient', 3),
          (1, 'Observation', 'subject', 'b', 'Patient', 4),
          (2, 'Observation', 'subject', 'a', 'Patient', 8);
        INSERT INTO group_membership (tenant_id, group_id, patient_id, added_at, removed_at) VALUES
          (1, 'g', 'a', 14, NULL),
          (1, 'g', 'b', 14, 30);
    "#;

    fn v1_database(path: &std::path::Path, extra: &str) {
        let connection = Connection::open(path).unwrap();
        connection.execute_batch(include_str!("schema_v1.sql")).unwrap();
        connection.execute_batch(V1_ROWS).unwrap();
        connection.execute_batch(extra).unwrap();
    }

    fn column_exists(path: &std::path::Path, table: &str, column: &str) -> bool {
        let connection = Connection::open(path).unwrap();
        connection
            .query_row("SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)", [table, column], |row| {
                row.get(0)
            })
            .unwrap()
    }

    fn selection(members: &[(&str, Option<i64>)], since: Option<i64>, at: i64) -> MemberSelection {
        MemberSelection {
            members: members.iter().map(|(id, since)| (id.to_string(), *since)).collect(),
            since,
            until: None,
            transaction_time: at,
            visibility: Visibility::Tenant,
            scope: Default::default(),
            filters: Default::default(),
        }
    }

    /// Exported Observation ids (plan, then every part read), checking each part's count.
    fn exported(store: &SqliteStore, tenant: TenantId, selection: &MemberSelection) -> Vec<String> {
        let mut ids = Vec::new();
        for (resource_type, parts) in store.plan_parts(tenant, selection, &["Observation".to_owned()], 100).unwrap() {
            for part in parts {
                let mut reader = store.part_reader(tenant, selection, &resource_type, part);
                let (mut text, mut count) = (Vec::new(), 0);
                loop {
                    match reader.next_window(&mut text, 1 << 20).unwrap() {
                        0 => break,
                        read => count += read,
                    }
                }
                assert_eq!(count, part.count, "a part streams its planned count");
                for line in text.split(|byte| *byte == b'\n').filter(|line| !line.is_empty()) {
                    let value: serde_json::Value = serde_json::from_slice(line).unwrap();
                    ids.push(value["id"].as_str().unwrap().to_owned());
                }
            }
        }
        ids
    }

    fn search(store: &SqliteStore, tenant: TenantId, query: SearchQuery) -> Vec<String> {
        let query = SearchQuery { resource_type: "Observation".into(), count: 100, ..query };
        store.search(tenant, &Visibility::Tenant, &query).unwrap().resources.into_iter().map(|r| r.id).collect()
    }

    fn about(patient: &str) -> SearchQuery {
        SearchQuery {
            references: vec![ReferenceQuery { param: "patient", target_type: None, id: patient.into() }],
            ..SearchQuery::default()
        }
    }

    /// Everything the version-1 rows said, asked through the store.
    fn assert_v1_content(store: &SqliteStore) {
        let (t, u) = (TenantId(1), TenantId(2));
        assert_eq!(search(store, t, about("a")), vec!["o1"]);
        assert_eq!(search(store, t, about("b")), vec!["o2"]);
        let by_identifier = SearchQuery {
            identifiers: vec![IdentifierQuery { system: Some("sys".into()), value: "x1".into() }],
            ..SearchQuery::default()
        };
        assert_eq!(search(store, t, by_identifier), vec!["o1"]);
        assert_eq!(search(store, u, about("a")), vec!["o9"], "tenant 2's tokens stay its own");
        assert_eq!(store.members_at(t, "g", 25).unwrap(), vec!["a", "b"]);
        assert_eq!(store.members_at(t, "g", 35).unwrap(), vec!["a"]);
        assert!(store.members_at(u, "g", 25).unwrap().is_empty());
        // Now: o3 is deleted, o2 belongs to b.
        assert_eq!(exported(store, t, &selection(&[("a", None), ("b", None)], None, 31)), vec!["o1", "o2"]);
        assert_eq!(exported(store, t, &selection(&[("a", None)], None, 31)), vec!["o1"]);
        // At 19 the closed row and the history still place o2 and o3 in a's compartment.
        assert_eq!(exported(store, t, &selection(&[("a", None)], None, 19)), vec!["o1", "o2", "o3"]);
        assert_eq!(exported(store, u, &selection(&[("a", None)], None, 31)), vec!["o9"]);
        // Since 18, for continuing member a: o2 left the cohort at 20, o3 was deleted at 21.
        let deleted = store.deleted_in_compartments(t, &selection(&[("a", Some(18))], Some(18), 31), "Observation");
        assert_eq!(deleted.unwrap(), vec![("o2".to_owned(), 20), ("o3".to_owned(), 21)]);
    }

    /// A version-1 database is converted on open, keeps every answer it gave, takes writes that
    /// follow the new keys, and opening it again changes nothing.
    #[test]
    fn a_version_1_database_is_migrated_on_open_and_keeps_its_content() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v1.db");
        v1_database(&path, "");
        assert!(column_exists(&path, "compartment", "patient_id"));

        let store = SqliteStore::open(&path).unwrap();
        assert!(!column_exists(&path, "compartment", "patient_id"), "converted");
        assert!(column_exists(&path, "compartment", "pkey"));
        assert!(!column_exists(&path, "compartment_v1", "rid"), "the old table is gone");
        assert_v1_content(&store);

        // A write after the migration: o1 re-pointed from a to b.
        let body =
            serde_json::json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/b"}});
        let op = WriteOp::Update { resource_type: "Observation".into(), id: "o1".into(), body, if_match: None };
        store.write(TenantId(1), None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
        let now = store.reserve_transaction_time().unwrap();
        assert!(exported(&store, TenantId(1), &selection(&[("a", None)], None, now)).is_empty());
        assert_eq!(exported(&store, TenantId(1), &selection(&[("b", None)], None, now)), vec!["o1", "o2"]);
        assert_eq!(search(&store, TenantId(1), about("b")), vec!["o1", "o2"]);
        drop(store);

        // Idempotent: a second open finds version 2 and leaves it as it is.
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(exported(&store, TenantId(1), &selection(&[("b", None)], None, now)), vec!["o1", "o2"]);
        assert_eq!(exported(&store, TenantId(1), &selection(&[("a", None)], None, 19)), vec!["o1", "o2", "o3"]);
    }

    /// A row the new keys cannot express fails the migration as a whole: the database is still
    /// at version 1, with every row, so nothing is silently dropped.
    #[test]
    fn a_migration_that_cannot_carry_every_row_changes_nothing() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v1.db");
        v1_database(
            &path,
            "INSERT INTO search_token (tenant_id, resource_type, param, value, system, rid)
             VALUES (1, 'NotAType', 'identifier', 'v', '', 3);",
        );
        let error = SqliteStore::open(&path).err().expect("the migration must fail");
        assert!(error.to_string().contains("search_token"), "{error}");
        assert!(column_exists(&path, "compartment", "patient_id"), "still version 1");
        let connection = Connection::open(&path).unwrap();
        let tokens: i64 = connection.query_row("SELECT COUNT(*) FROM search_token", [], |row| row.get(0)).unwrap();
        assert_eq!(tokens, 5);
        assert!(!column_exists(&path, "patient_keys", "pkey"), "no version-2 table left behind");
    }
}
