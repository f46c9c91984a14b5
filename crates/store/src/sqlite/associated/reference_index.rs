//! The reference index, kept on write: per resource version, its references to types outside
//! the Patient compartment and its `Provenance.target` entries ([`outgoing_references`]),
//! versioned by time like the compartment index: a row is valid for `[from_ts, to_ts)`, and a
//! delete closes the rows. So "what did this resource reference at the transaction time" and
//! "which Provenance targeted this resource then" are exact whatever was written since.

use bulkhead_fhir::references::{outgoing_references, OutgoingReference};
use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, Transaction};
use serde_json::Value;

use crate::sqlite::provenance_targets;
use crate::sqlite::write_memo::WriteMemo;
use crate::{StoreError, TenantId};

const REFERENCE_INDEX: &str = "
CREATE TABLE reference_index (
    rid INTEGER NOT NULL,
    provenance_target INTEGER NOT NULL,
    target_type TEXT NOT NULL,
    target_id TEXT NOT NULL,
    from_ts INTEGER NOT NULL,
    to_ts INTEGER,
    tenant_id INTEGER NOT NULL,
    target_rid INTEGER,
    PRIMARY KEY (rid, provenance_target, target_type, target_id, from_ts)
) WITHOUT ROWID;
";

/// Provenance target rows were once also indexed by `(tenant, target type, target id)`; the
/// target keys (`provenance_targets`) answer every lookup by target now, so a database that
/// still has that index loses it on open (one index fewer to write per target row).
const DROP_TARGET_ID_INDEX: &str = "DROP INDEX IF EXISTS provenance_by_target;";

/// The types of a tenant whose resources have ever referenced a resource outside the compartment
/// (only grows): planning follows no references from the other types' cohort resources.
const REFERENCING_TYPES: &str = "
CREATE TABLE IF NOT EXISTS referencing_types (
    tenant_id INTEGER NOT NULL,
    resource_type TEXT NOT NULL,
    PRIMARY KEY (tenant_id, resource_type)
) WITHOUT ROWID;
";

/// Per tenant and type (Provenance and the types outside the Patient compartment), the timestamp
/// of the last write of a resource of that type: the plan cache reuses an associated set only
/// while none of the types it can reach changed (see `plan_cache`). A type never written since
/// the table was made has no row (no write after any cached set's time).
const ASSOCIATED_TYPE_CHANGES: &str = "
CREATE TABLE IF NOT EXISTS associated_type_changes (
    tenant_id INTEGER NOT NULL,
    resource_type TEXT NOT NULL,
    changed_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, resource_type)
) WITHOUT ROWID;
";

/// Records that a resource of `resource_type` was written at `timestamp`, when an associated set
/// can reach that type (a Provenance, or a type outside the Patient compartment).
fn note_type_changed(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    resource_type: &str,
    timestamp: Micros,
) -> Result<(), StoreError> {
    if resource_type != "Provenance" && !bulkhead_fhir::references::is_referenced_type(resource_type) {
        return Ok(());
    }
    // Once per write and type: the write has one timestamp.
    if !memo.first_type_change(resource_type) {
        return Ok(());
    }
    transaction
        .prepare_cached(
            "INSERT INTO associated_type_changes (tenant_id, resource_type, changed_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (tenant_id, resource_type) DO UPDATE SET changed_at = MAX(changed_at, excluded.changed_at)",
        )?
        .execute(params![tenant.0, resource_type, timestamp])?;
    Ok(())
}

/// Notes that `resource_type` has references to follow in `tenant`.
fn note_referencing_type(connection: &Connection, tenant: i64, resource_type: &str) -> Result<(), StoreError> {
    connection
        .prepare_cached("INSERT OR IGNORE INTO referencing_types (tenant_id, resource_type) VALUES (?1, ?2)")?
        .execute(params![tenant, resource_type])?;
    Ok(())
}

/// Creates the reference index when the database has none, backfilling it from every stored
/// version (history included, so exports as of earlier transaction times stay exact), all in
/// one transaction: a crash leaves the database as it was, and the next open starts over.
pub(in crate::sqlite) fn migrate(connection: &mut Connection) -> Result<u64, StoreError> {
    let exists: bool = connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reference_index')",
        [],
        |row| row.get(0),
    )?;
    connection.execute_batch(ASSOCIATED_TYPE_CHANGES)?;
    if exists {
        connection.execute_batch(REFERENCING_TYPES)?;
        provenance_targets::migrate(connection)?;
        connection.execute_batch(DROP_TARGET_ID_INDEX)?;
        return Ok(0);
    }
    let transaction = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    transaction.execute_batch(REFERENCE_INDEX)?;
    transaction.execute_batch(REFERENCING_TYPES)?;
    let backfilled = backfill(&transaction)?;
    provenance_targets::resolve_all(&transaction)?;
    transaction.commit()?;
    if backfilled > 0 {
        tracing::info!(resources = backfilled, "reference index backfilled from stored resources");
    }
    Ok(backfilled)
}

/// One stored version, oldest first, as the backfill replays it.
struct StoredVersion {
    last_updated: Micros,
    body: Option<String>,
}

fn backfill(transaction: &Transaction<'_>) -> Result<u64, StoreError> {
    let mut resources = transaction.prepare("SELECT rid, tenant_id, resource_type FROM resources ORDER BY rid")?;
    let mut history = transaction
        .prepare_cached("SELECT last_updated, deleted, body FROM resource_history WHERE rid = ?1 ORDER BY version")?;
    let mut current = transaction.prepare_cached("SELECT last_updated, deleted, body FROM resources WHERE rid = ?1")?;
    let mut insert = transaction.prepare_cached(
        "INSERT OR IGNORE INTO reference_index (rid, provenance_target, target_type, target_id, from_ts, to_ts, tenant_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut rows = resources.query([])?;
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let (rid, tenant, resource_type): (i64, i64, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
        let version = |row: &rusqlite::Row<'_>| {
            let deleted: bool = row.get(1)?;
            Ok(StoredVersion { last_updated: row.get(0)?, body: if deleted { None } else { row.get(2)? } })
        };
        let mut versions: Vec<StoredVersion> = history.query_map([rid], version)?.collect::<Result<_, _>>()?;
        versions.push(current.query_row([rid], version)?);
        // Replays the versions: a reference's row opens with the first version that has it and
        // closes with the first that does not.
        let mut open: Vec<(OutgoingReference, Micros)> = Vec::new();
        for version in &versions {
            let references = match &version.body {
                Some(body) => references_of(&resource_type, body)?,
                None => Vec::new(),
            };
            let mut still_open = Vec::new();
            for (reference, from) in open.drain(..) {
                if references.contains(&reference) {
                    still_open.push((reference, from));
                } else if from < version.last_updated {
                    insert.execute(params![
                        rid,
                        reference.provenance_target,
                        reference.target_type,
                        reference.target_id,
                        from,
                        version.last_updated,
                        tenant
                    ])?;
                }
            }
            if references.iter().any(|reference| !reference.provenance_target) {
                note_referencing_type(transaction, tenant, &resource_type)?;
            }
            for reference in references {
                if !still_open.iter().any(|(held, _)| *held == reference) {
                    still_open.push((reference, version.last_updated));
                }
            }
            open = still_open;
        }
        for (reference, from) in open {
            insert.execute(params![
                rid,
                reference.provenance_target,
                reference.target_type,
                reference.target_id,
                from,
                None::<i64>,
                tenant
            ])?;
        }
        count += 1;
    }
    Ok(count)
}

fn references_of(resource_type: &str, body: &str) -> Result<Vec<OutgoingReference>, StoreError> {
    let value: Value = serde_json::from_str(body)?;
    Ok(outgoing_references(resource_type, &value))
}

/// Brings a resource's open reference rows in line with its new version (written at
/// `timestamp`): closes the rows of references it dropped, opens rows for new ones.
#[allow(clippy::too_many_arguments)]
pub(in crate::sqlite) fn sync_references(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    references: &[OutgoingReference],
    timestamp: Micros,
    is_new_row: bool,
) -> Result<(), StoreError> {
    note_type_changed(transaction, memo, tenant, resource_type, timestamp)?;
    if references.iter().any(|reference| !reference.provenance_target) && memo.first_referencing_type(resource_type) {
        note_referencing_type(transaction, tenant.0, resource_type)?;
    }
    let open: Vec<OutgoingReference> = if is_new_row {
        Vec::new()
    } else {
        memo.flush_targets_of(transaction, tenant, rid)?;
        open_references(transaction, rid)?
    };
    for gone in open.iter().filter(|reference| !references.contains(reference)) {
        close(transaction, rid, Some(gone), timestamp)?;
    }
    let mut insert = transaction.prepare_cached(provenance_targets::INSERT_REFERENCE)?;
    for reference in references.iter().filter(|reference| !open.contains(reference)) {
        if reference.provenance_target {
            let target = (reference.target_type.as_str(), reference.target_id.as_str());
            if memo.defer_target(transaction, tenant, rid, target, timestamp)? {
                continue;
            }
            memo.provenance_target_added();
        }
        insert.execute(params![
            rid,
            reference.provenance_target,
            reference.target_type,
            reference.target_id,
            timestamp,
            tenant.0
        ])?;
    }
    Ok(())
}

/// Closes every open reference row of a deleted resource.
pub(in crate::sqlite) fn close_references(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    timestamp: Micros,
) -> Result<(), StoreError> {
    note_type_changed(transaction, memo, tenant, resource_type, timestamp)?;
    memo.flush_targets_of(transaction, tenant, rid)?;
    close(transaction, rid, None, timestamp)
}

fn open_references(connection: &Connection, rid: i64) -> Result<Vec<OutgoingReference>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT target_type, target_id, provenance_target FROM reference_index WHERE rid = ?1 AND to_ts IS NULL",
    )?;
    let open = statement
        .query_map([rid], |row| {
            Ok(OutgoingReference { target_type: row.get(0)?, target_id: row.get(1)?, provenance_target: row.get(2)? })
        })?
        .collect::<Result<_, _>>()?;
    Ok(open)
}

/// Closes the open row of `reference` (every open row when `None`) at `timestamp`. A row opened
/// at that very timestamp (an earlier write of the same transaction) is removed instead: it was
/// never valid at any time.
fn close(
    transaction: &Transaction<'_>,
    rid: i64,
    reference: Option<&OutgoingReference>,
    timestamp: Micros,
) -> Result<(), StoreError> {
    let (filter, values): (&str, Vec<Box<dyn rusqlite::ToSql>>) = match reference {
        Some(reference) => (
            " AND provenance_target = ?3 AND target_type = ?4 AND target_id = ?5",
            vec![
                Box::new(reference.provenance_target),
                Box::new(reference.target_type.clone()),
                Box::new(reference.target_id.clone()),
            ],
        ),
        None => ("", Vec::new()),
    };
    let mut all: Vec<&dyn rusqlite::ToSql> = vec![&rid, &timestamp];
    all.extend(values.iter().map(|value| value.as_ref()));
    transaction
        .prepare_cached(&format!(
            "DELETE FROM reference_index WHERE rid = ?1 AND to_ts IS NULL AND from_ts = ?2{filter}"
        ))?
        .execute(rusqlite::params_from_iter(all.iter()))?;
    transaction
        .prepare_cached(&format!("UPDATE reference_index SET to_ts = ?2 WHERE rid = ?1 AND to_ts IS NULL{filter}"))?
        .execute(rusqlite::params_from_iter(all.iter()))?;
    Ok(())
}
