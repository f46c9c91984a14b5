//! Versioned schema migrations: numbered SQL files compiled into the binary, applied in order,
//! each in its own transaction, recorded in `schema_migrations`.
//!
//! Several instances starting at once are safe: the runner holds a transaction-scoped advisory
//! lock while it reads the current version and applies what is missing. A database migrated by
//! a newer binary is refused (an older binary must not write to a schema it does not know).

use postgres::Client;

use crate::StoreError;

/// `(version, name, SQL)`, in version order. A released migration is never edited: a change is
/// a new file.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "initial", include_str!("migrations/0001_initial.sql")),
    (2, "retention", include_str!("migrations/0002_retention.sql")),
    (3, "smart_clients", include_str!("migrations/0003_smart_clients.sql")),
    (4, "associated_data_and_audit", include_str!("migrations/0004_associated_data_and_audit.sql")),
    (5, "job_leases", include_str!("migrations/0005_job_leases.sql")),
    (6, "plan_cache_watermarks", include_str!("migrations/0006_plan_cache_watermarks.sql")),
    (7, "byte_order", include_str!("migrations/0007_byte_order.sql")),
    (8, "provenance_target_keys", include_str!("migrations/0008_provenance_target_keys.sql")),
    (9, "shared_state", include_str!("migrations/0009_shared_state.sql")),
    (11, "import_costs", include_str!("migrations/0011_import_costs.sql")),
    (
        12,
        "handbacks_and_inline_audit_patients",
        include_str!("migrations/0012_handbacks_and_inline_audit_patients.sql"),
    ),
    (13, "tenant_patient_changes", include_str!("migrations/0013_tenant_patient_changes.sql")),
    (14, "audit_compression", include_str!("migrations/0014_audit_compression.sql")),
    (15, "no_body_statistics", include_str!("migrations/0015_no_body_statistics.sql")),
    (16, "key_text_byte_order", include_str!("migrations/0016_key_text_byte_order.sql")),
    (17, "resource_removals", include_str!("migrations/0017_resource_removals.sql")),
];

/// The advisory lock key of the migration runner ("bulkhead" in ASCII, as an int8).
const LOCK_KEY: i64 = 0x6275_6c6b_6865_6164;

/// The newest version this binary knows.
pub fn latest() -> u32 {
    MIGRATIONS.last().map_or(0, |(version, _, _)| *version)
}

/// The version the database is at (0 for an empty one).
pub fn current_version(client: &mut Client) -> Result<u32, StoreError> {
    let exists: bool = client.query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])?.try_get(0)?;
    if !exists {
        return Ok(0);
    }
    let version: Option<i32> = client.query_one("SELECT max(version) FROM schema_migrations", &[])?.try_get(0)?;
    Ok(version.unwrap_or(0).max(0) as u32)
}

/// Applies every missing migration; returns the versions applied.
pub fn apply(client: &mut Client) -> Result<Vec<u32>, StoreError> {
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        let mut transaction = client.transaction()?;
        transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])?;
        transaction.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )?;
        let current: Option<i32> =
            transaction.query_one("SELECT max(version) FROM schema_migrations", &[])?.try_get(0)?;
        let current = current.unwrap_or(0).max(0) as u32;
        if current > latest() {
            return Err(StoreError::Invalid(format!(
                "the database schema is at version {current}, newer than this binary's {}: upgrade bulkhead",
                latest()
            )));
        }
        if current >= *version {
            continue;
        }
        transaction.batch_execute(sql)?;
        transaction.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&(*version as i32), &name.to_string()],
        )?;
        transaction.commit()?;
        tracing::info!(version, name, "applied database migration");
        applied.push(*version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testing::{fresh_database, fresh_database_with, test_options};
    use super::super::PgStore;
    use super::MIGRATIONS;
    use crate::{Store, StoreError, TenantId, WriteMode, WriteOp};

    /// Migration 15: `ANALYZE` keeps statistics on every column of `resources` but the body;
    /// stepped back and run again, it changes nothing.
    #[test]
    fn migration_15_analyses_every_column_but_bodies() {
        let Some(database) = fresh_database() else { return };
        let store = PgStore::open(&database.url, test_options()).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        let ops: Vec<WriteOp> = (0..10)
            .map(|n| {
                let body = json!({"resourceType": "Patient", "id": format!("p{n}")});
                WriteOp::Update { resource_type: "Patient".into(), id: format!("p{n}"), body, if_match: None }
            })
            .collect();
        store.write(tenant, None, &ops, WriteMode::Transaction).unwrap();
        store.refresh_statistics().unwrap();
        let analysed = |store: &PgStore| -> Vec<String> {
            store
                .with_read(|db| {
                    let rows = db.query(
                        "SELECT attname::text FROM pg_stats WHERE tablename = 'resources' ORDER BY attname",
                        &[],
                    )?;
                    rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
                })
                .unwrap()
        };
        let columns = ["deleted", "id", "last_updated", "owner", "resource_type", "rid", "tenant_id", "version"];
        assert_eq!(analysed(&store), columns);
        let targets = |store: &PgStore| -> Vec<i32> {
            store
                .with_read(|db| {
                    let rows = db.query(
                        "SELECT CAST(attstattarget AS integer) FROM pg_attribute
                         WHERE attrelid IN ('resources'::regclass, 'resource_history'::regclass) AND attname = 'body'",
                        &[],
                    )?;
                    rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
                })
                .unwrap()
        };
        assert_eq!(targets(&store), [0, 0]);

        // Stepped back, bodies are analysed; migrated again, their statistics target is 0 again.
        let version = MIGRATIONS.iter().find(|(_, name, _)| *name == "no_body_statistics").unwrap().0;
        store
            .with_transaction(|db| {
                db.batch(&format!(
                    "ALTER TABLE resources ALTER COLUMN body SET STATISTICS -1;
                     ALTER TABLE resource_history ALTER COLUMN body SET STATISTICS -1;
                     DELETE FROM schema_migrations WHERE version >= {version};"
                ))
            })
            .unwrap();
        store.refresh_statistics().unwrap();
        assert!(analysed(&store).contains(&"body".to_owned()));
        drop(store);
        let store = PgStore::open(&database.url, test_options()).unwrap();
        assert_eq!(targets(&store), [0, 0]);
        store
            .with_transaction(|db| db.batch(&format!("DELETE FROM schema_migrations WHERE version >= {version}")))
            .unwrap();
        drop(store);
        let store = PgStore::open(&database.url, test_options()).unwrap();
        assert_eq!(targets(&store), [0, 0]);
    }

    /// The key text columns migration 16 gives byte order, with each one's collation.
    fn key_collations(store: &PgStore) -> Vec<String> {
        store
            .with_read(|db| {
                let rows = db.query(
                    "SELECT concat_ws(' ', a.attrelid::regclass, a.attname, c.collname)
                     FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation
                     WHERE (a.attrelid, a.attname) IN (('resources'::regclass, 'resource_type'),
                         ('search_token'::regclass, 'param'), ('search_token'::regclass, 'value'),
                         ('search_token'::regclass, 'system'), ('reference_index'::regclass, 'target_type'),
                         ('reference_index'::regclass, 'target_id'))
                     ORDER BY 1",
                    &[],
                )?;
                rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
            })
            .unwrap()
    }

    /// Every search token and reference row of the tenant, as text, keys replaced by what they name.
    fn index_rows(store: &PgStore, tenant: TenantId) -> Vec<String> {
        store
            .with_read(|db| {
                let rows = db.query(
                    "SELECT concat_ws('|', s.type_code, s.param, s.value, s.system, r.resource_type, r.id)
                     FROM search_token s JOIN resources r ON r.tenant_id = s.tenant_id AND r.rid = s.rid
                     WHERE s.tenant_id = $1
                     UNION ALL
                     SELECT concat_ws('|', r.resource_type, r.id, x.provenance_target, x.target_type, x.target_id,
                                      t.resource_type, t.id)
                     FROM reference_index x JOIN resources r ON r.tenant_id = x.tenant_id AND r.rid = x.rid
                     LEFT JOIN resources t ON t.tenant_id = x.tenant_id AND t.rid = x.target_rid
                     WHERE x.tenant_id = $1",
                    &[&tenant.0],
                )?;
                // Sorted here, by bytes: SQL would sort by the database's collation.
                let mut rows =
                    rows.iter().map(|row| Ok(row.try_get(0)?)).collect::<Result<Vec<String>, StoreError>>()?;
                rows.sort();
                Ok(rows)
            })
            .unwrap()
    }

    /// Migration 16, on a database whose default collation is a language's (ICU en-US): the key
    /// text columns compare by bytes afterwards; the rows written before it are kept, found as
    /// before (a Provenance by its target, a resource by its type and id), and written after it
    /// exactly as before; run again, it changes nothing.
    #[test]
    fn migration_16_gives_key_text_byte_order_and_keeps_every_row() {
        let Some(database) =
            fresh_database_with("TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
        else {
            return;
        };
        let store = PgStore::open(&database.url, test_options()).unwrap();
        let version = MIGRATIONS.iter().find(|(_, name, _)| *name == "key_text_byte_order").unwrap().0;
        let step_back = format!(
            "ALTER TABLE resources ALTER COLUMN resource_type TYPE text COLLATE \"default\";
             ALTER TABLE search_token ALTER COLUMN param TYPE text COLLATE \"default\",
                 ALTER COLUMN value TYPE text COLLATE \"default\", ALTER COLUMN system TYPE text COLLATE \"default\";
             ALTER TABLE reference_index ALTER COLUMN target_type TYPE text COLLATE \"default\",
                 ALTER COLUMN target_id TYPE text COLLATE \"default\";
             DELETE FROM schema_migrations WHERE version >= {version};"
        );
        store.with_transaction(|db| db.batch(&step_back)).unwrap();
        assert!(key_collations(&store).iter().all(|column| column.ends_with(" default")));
        // Enough resources for the bulk path, ids whose order differs by bytes and in en-US.
        let ops = |tenant_name: &str| -> Vec<WriteOp> {
            let mut bodies = vec![json!({"resourceType": "Provenance", "id": "p", "recorded": "2020-01-01T00:00:00Z",
                "target": [{"reference": "Observation/b"}, {"reference": "Observation/B"}],
                "agent": [{"who": {"reference": "Practitioner/Dr"}}]})];
            for id in ["a", "B", "b", "_c"] {
                bodies.push(json!({"resourceType": "Patient", "id": id,
                    "identifier": [{"system": "urn:MRN", "value": format!("{tenant_name}-{id}")}]}));
                bodies.push(json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "c"},
                    "subject": {"reference": format!("Patient/{id}")}, "performer": [{"reference": "Practitioner/Dr"}]}));
            }
            bodies
                .into_iter()
                .map(|body| WriteOp::Update {
                    resource_type: body["resourceType"].as_str().unwrap().into(),
                    id: body["id"].as_str().unwrap().into(),
                    body,
                    if_match: None,
                })
                .collect()
        };
        let write = |store: &PgStore, tenant: TenantId, name: &str| {
            let written = store.write(tenant, None, &ops(name), WriteMode::Transaction).unwrap();
            assert!(written.iter().all(Result::is_ok));
        };
        let before = store.create_tenant("before").unwrap().id;
        write(&store, before, "t");
        let kept = index_rows(&store, before);
        assert!(kept.len() > 10, "{kept:?}");
        drop(store);

        let store = PgStore::open(&database.url, test_options()).unwrap();
        assert!(key_collations(&store).iter().all(|column| column.ends_with(" C")), "{:?}", key_collations(&store));
        assert_eq!(index_rows(&store, before), kept);
        let at = store.reserve_transaction_time().unwrap();
        let targets = vec![("Observation".to_owned(), "B".to_owned())];
        assert_eq!(store.provenance_targeting(before, &targets, at).unwrap(), ["p"]);
        let read = store.read(before, &crate::Visibility::Tenant, "Observation", "_c").unwrap().unwrap();
        assert_eq!(read.version, 1);
        // Written after it: the same rows.
        let after = store.create_tenant("after").unwrap().id;
        write(&store, after, "t");
        assert_eq!(index_rows(&store, after), kept);

        // Run again on the migrated schema: nothing changes.
        store
            .with_transaction(|db| db.batch(&format!("DELETE FROM schema_migrations WHERE version >= {version}")))
            .unwrap();
        drop(store);
        let store = PgStore::open(&database.url, test_options()).unwrap();
        assert!(key_collations(&store).iter().all(|column| column.ends_with(" C")));
        assert_eq!(store.provenance_targeting(before, &targets, at).unwrap(), ["p"]);
    }
}
