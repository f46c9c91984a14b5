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
