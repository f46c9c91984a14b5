//! The SQLite side of the plan cache ([`crate::plan_cache`]): its watermark queries, and the
//! lifecycle of stored associated sets, which the cache shares between exports by set id.
//!
//! A set's rows live in `export_associated` under its set id; its expiry lives once, in
//! `associated_sets`. A set is registered before any of its rows is stored, a reuse extends the
//! registration's expiry (one row, whatever the set's size), and the sweep removes an expired
//! registration and its rows in one write transaction: so a registration that exists has all its
//! rows, and a reuse that finds it keeps them until its own export expires.

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension};

use crate::{StoreError, TenantId};

const ASSOCIATED_SETS: &str = "
CREATE TABLE associated_sets (
    tenant_id INTEGER NOT NULL,
    set_id TEXT NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, set_id)
) WITHOUT ROWID;
";

/// The greatest `changed_at` of each tenant's patients, kept by triggers on `patient_keys` (so
/// every path that raises a patient's watermark raises it, in the same transaction): while it is
/// not above a plan's time, no patient of the tenant, member or not, changed since, and a repeated
/// manifest skips the per-member check. One row per tenant, one hot page per write.
const TENANT_PATIENT_CHANGES: &str = "
CREATE TABLE tenant_patient_changes (
    tenant_id INTEGER PRIMARY KEY,
    changed_at INTEGER NOT NULL
);
CREATE TRIGGER patient_keys_raise_tenant_on_insert AFTER INSERT ON patient_keys
BEGIN
    INSERT INTO tenant_patient_changes (tenant_id, changed_at) VALUES (NEW.tenant_id, NEW.changed_at)
    ON CONFLICT (tenant_id) DO UPDATE SET changed_at = max(changed_at, excluded.changed_at);
END;
CREATE TRIGGER patient_keys_raise_tenant_on_update AFTER UPDATE OF changed_at ON patient_keys
WHEN NEW.changed_at > OLD.changed_at
BEGIN
    INSERT INTO tenant_patient_changes (tenant_id, changed_at) VALUES (NEW.tenant_id, NEW.changed_at)
    ON CONFLICT (tenant_id) DO UPDATE SET changed_at = max(changed_at, excluded.changed_at);
END;
";

/// Creates `tenant_patient_changes` and its triggers when the database has none, seeded with
/// each tenant's greatest patient `changed_at`, in one transaction (a second process opening the
/// file waits, then finds it done).
pub(super) fn migrate_tenant_changes(connection: &mut Connection) -> Result<(), StoreError> {
    let exists = |connection: &Connection| -> Result<bool, StoreError> {
        Ok(connection.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tenant_patient_changes')",
            [],
            |row| row.get(0),
        )?)
    };
    if exists(connection)? {
        return Ok(());
    }
    let transaction = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !exists(&transaction)? {
        transaction.execute_batch(TENANT_PATIENT_CHANGES)?;
        transaction.execute_batch(
            "INSERT INTO tenant_patient_changes (tenant_id, changed_at)
             SELECT tenant_id, max(changed_at) FROM patient_keys GROUP BY tenant_id",
        )?;
    }
    transaction.commit()?;
    Ok(())
}

/// The greatest `changed_at` of any patient of `tenant` (0: none has a compartment row): an
/// upper bound of any members' [`members_latest_change`], read in one row.
pub(super) fn tenant_latest_change(connection: &Connection, tenant: TenantId) -> Result<Micros, StoreError> {
    let latest: Option<Micros> = connection
        .prepare_cached("SELECT changed_at FROM tenant_patient_changes WHERE tenant_id = ?1")?
        .query_row([tenant.0], |row| row.get(0))
        .optional()?;
    Ok(latest.unwrap_or(0))
}

/// Creates `associated_sets` when the database has none, registering the sets stored before it
/// (each under the latest expiry of its rows), all in one transaction. The per-row expiry of
/// `export_associated` is no longer read, so its index goes.
pub(super) fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let exists: bool = connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'associated_sets')",
        [],
        |row| row.get(0),
    )?;
    let transaction = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !exists {
        transaction.execute_batch(ASSOCIATED_SETS)?;
        transaction.execute_batch(
            "INSERT INTO associated_sets (tenant_id, set_id, expires)
             SELECT tenant_id, set_id, max(expires) FROM export_associated GROUP BY tenant_id, set_id",
        )?;
    }
    transaction.execute_batch("DROP INDEX IF EXISTS export_associated_by_expiry")?;
    transaction.commit()?;
    Ok(())
}

/// Registers the set `set_id` (before any of its rows is stored), expiring at `expires` (or
/// later, when it is registered already).
pub(super) fn register(
    transaction: &Connection,
    tenant: TenantId,
    set_id: &str,
    expires: Micros,
) -> Result<(), StoreError> {
    transaction
        .prepare_cached(
            "INSERT INTO associated_sets (tenant_id, set_id, expires) VALUES (?1, ?2, ?3)
             ON CONFLICT (tenant_id, set_id) DO UPDATE SET expires = max(expires, excluded.expires)",
        )?
        .execute(params![tenant.0, set_id, expires])?;
    Ok(())
}

/// Keeps the stored set `set_id` until at least `expires`, for another export that shares it;
/// false when it has been swept (nothing changes then).
pub(super) fn share(
    transaction: &Connection,
    tenant: TenantId,
    set_id: &str,
    expires: Micros,
) -> Result<bool, StoreError> {
    let extended = transaction
        .prepare_cached("UPDATE associated_sets SET expires = max(expires, ?3) WHERE tenant_id = ?1 AND set_id = ?2")?
        .execute(params![tenant.0, set_id, expires])?;
    Ok(extended == 1)
}

/// Removes the sets expired by `now`, registrations and rows together (each set's rows by their
/// key prefix).
pub(super) fn delete_expired(transaction: &Connection, now: Micros) -> Result<u64, StoreError> {
    let expired: Vec<(i64, String)> = transaction
        .prepare_cached("SELECT tenant_id, set_id FROM associated_sets WHERE expires <= ?1")?
        .query_map([now], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut rows = transaction.prepare_cached("DELETE FROM export_associated WHERE tenant_id = ?1 AND set_id = ?2")?;
    let mut registration =
        transaction.prepare_cached("DELETE FROM associated_sets WHERE tenant_id = ?1 AND set_id = ?2")?;
    for (tenant, set_id) in &expired {
        rows.execute(params![tenant, set_id])?;
        registration.execute(params![tenant, set_id])?;
    }
    Ok(expired.len() as u64)
}

/// The greatest `changed_at` of the members loaded on this connection
/// ([`super::export::load_members`]); 0 when none has a compartment row.
pub(super) fn members_latest_change(connection: &Connection) -> Result<Micros, StoreError> {
    let latest: Micros = connection
        .prepare_cached(
            "SELECT COALESCE(MAX(p.changed_at), 0) FROM temp.export_member m CROSS JOIN patient_keys p
             ON p.pkey = m.pkey",
        )?
        .query_row([], |row| row.get(0))?;
    Ok(latest)
}

/// The types outside the compartment (and Provenance) of `tenant` written after `planned_at`.
pub(super) fn associated_types_changed_since(
    connection: &Connection,
    tenant: TenantId,
    planned_at: Micros,
) -> Result<Vec<String>, StoreError> {
    let changed = connection
        .prepare_cached("SELECT resource_type FROM associated_type_changes WHERE tenant_id = ?1 AND changed_at > ?2")?
        .query_map(params![tenant.0, planned_at], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(changed)
}
