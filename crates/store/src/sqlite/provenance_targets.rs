//! Provenance targets by key: each `Provenance.target` row of the reference index carries the
//! `rid` of the resource it names (`target_rid`), so planning finds a cohort resource's
//! Provenance from the key it already holds: one range scan per dense window, or one seek per
//! resource, instead of a lookup of the resource's id and a seek by `(type, id)` per resource.
//!
//! Invariant: a target row's `target_rid` is the key of the resource row of its
//! `(tenant, target_type, target_id)` when that row exists, NULL otherwise. Keys are stable (a
//! deleted resource keeps its row as a tombstone, and a re-created one gets that row back), so
//! the key is set once:
//! - on the Provenance's write, when the target's row exists ([`INSERT_REFERENCE`]);
//! - when the target's row is created later ([`resolve_new_target`]; unresolved rows have an
//!   index of their own, `provenance_unresolved`, small and hot, so each create checks it
//!   cheaply);
//! - and it is cleared when history pruning removes the target's tombstone row
//!   ([`forget_target`]): SQLite may hand a removed key out again.
//!
//! The mapping from `(type, id)` to key does not depend on time, and a target row keeps its
//! validity `[from_ts, to_ts)`, so exports as of earlier transaction times stay exact.

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::{StoreError, TenantId};

/// Inserts one reference row (`?1` rid, `?2` provenance_target, `?3` target_type, `?4`
/// target_id, `?5` from_ts, `?6` tenant), resolving a Provenance target's key.
pub(super) const INSERT_REFERENCE: &str =
    "INSERT INTO reference_index (rid, provenance_target, target_type, target_id, from_ts, tenant_id, target_rid)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6,
             CASE WHEN ?2 THEN (SELECT rid FROM resources WHERE tenant_id = ?6 AND resource_type = ?3 AND id = ?4) END)";

/// Inserts one Provenance target row whose key was looked up already (`?1` rid, `?2` target_type,
/// `?3` target_id, `?4` from_ts, `?5` tenant, `?6` target_rid or NULL).
const INSERT_RESOLVED_TARGET: &str =
    "INSERT INTO reference_index (rid, provenance_target, target_type, target_id, from_ts, tenant_id, target_rid)
     VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6)";

/// Memory that a bulk load's pending target rows may take before they are written (ids and
/// types, plus a fixed size per row): bounded whatever the size of a transaction.
const PENDING_BYTES: usize = if cfg!(test) { 256 } else { 8 << 20 };

/// A bulk load's Provenance target rows, written in batches: their keys are looked up in
/// `(type, id)` order, so that consecutive lookups of the `resources` unique index land on the
/// same or neighbouring leaf pages, where one lookup per row in write order (random ids) misses
/// the writer's page cache once the index outgrows it; then the rows are inserted in the order
/// they were added (their resources' keys).
///
/// Rows that are written later give the same key as rows written at once (the invariant of this
/// module): between the write of a Provenance and the flush, within one transaction, a resource
/// row may be created (found by the lookup, as [`resolve_new_target`] would have set it) but
/// none is removed (only history pruning removes rows, never inside a bulk load). Anything that
/// reads a resource's reference rows in the same transaction (an update or delete of that
/// Provenance) flushes first ([`PendingTargets::flush_if_pending`]), and a bulk load flushes
/// before it commits.
#[derive(Default)]
pub(super) struct PendingTargets {
    rows: Vec<PendingTarget>,
    /// Every row's target type and id, back to back.
    text: String,
    /// The resources whose rows are pending.
    rids: std::collections::HashSet<i64>,
}

struct PendingTarget {
    rid: i64,
    from_ts: Micros,
    /// `text[start..split]` is the target type, `text[split..end]` its id.
    start: usize,
    split: usize,
    end: usize,
}

impl PendingTargets {
    /// Adds the target row of the resource `rid` (written at `from_ts`) naming
    /// `target_type/target_id`. True when the pending rows have reached their memory bound and
    /// must be flushed.
    pub(super) fn push(&mut self, rid: i64, target_type: &str, target_id: &str, from_ts: Micros) -> bool {
        let start = self.text.len();
        self.text.push_str(target_type);
        let split = self.text.len();
        self.text.push_str(target_id);
        self.rows.push(PendingTarget { rid, from_ts, start, split, end: self.text.len() });
        self.rids.insert(rid);
        self.text.len() + self.rows.len() * std::mem::size_of::<PendingTarget>() >= PENDING_BYTES
    }

    fn key(&self, row: &PendingTarget) -> (&str, &str) {
        (&self.text[row.start..row.split], &self.text[row.split..row.end])
    }

    /// Writes the pending rows of `rid`, if any, so that a statement reading them finds them.
    pub(super) fn flush_if_pending(
        &mut self,
        transaction: &Transaction<'_>,
        tenant: TenantId,
        rid: i64,
    ) -> Result<bool, StoreError> {
        if !self.rids.contains(&rid) {
            return Ok(false);
        }
        self.flush(transaction, tenant)
    }

    /// Looks up every pending row's key (in `(type, id)` order, each distinct target once),
    /// inserts the rows and empties the buffer. Returns whether a row without a key was written
    /// (its target does not exist yet).
    pub(super) fn flush(&mut self, transaction: &Transaction<'_>, tenant: TenantId) -> Result<bool, StoreError> {
        if self.rows.is_empty() {
            return Ok(false);
        }
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_unstable_by(|&a, &b| self.key(&self.rows[a]).cmp(&self.key(&self.rows[b])));
        let mut keys: Vec<Option<i64>> = vec![None; self.rows.len()];
        let mut lookup = transaction
            .prepare_cached("SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3")?;
        let mut previous: Option<(usize, Option<i64>)> = None;
        for index in order {
            let (target_type, target_id) = self.key(&self.rows[index]);
            let key = match previous {
                Some((seen, key)) if self.key(&self.rows[seen]) == (target_type, target_id) => key,
                _ => lookup.query_row(params![tenant.0, target_type, target_id], |row| row.get(0)).optional()?,
            };
            keys[index] = key;
            previous = Some((index, key));
        }
        let mut insert = transaction.prepare_cached(INSERT_RESOLVED_TARGET)?;
        for (row, key) in self.rows.iter().zip(&keys) {
            let (target_type, target_id) = self.key(row);
            insert.execute(params![row.rid, target_type, target_id, row.from_ts, tenant.0, key])?;
        }
        self.rows.clear();
        self.text.clear();
        self.rids.clear();
        Ok(keys.iter().any(Option::is_none))
    }
}

/// `provenance_by_target_rid` covers planning's reads (the table's key columns, `rid` and
/// `from_ts`, ride along in a WITHOUT ROWID table's index entries, and `to_ts` is in it), and
/// leads with the type so that a window's range scan reads no other type's keys.
const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS provenance_by_target_rid ON reference_index (tenant_id, target_type, target_rid, to_ts)
    WHERE provenance_target = 1 AND target_rid IS NOT NULL;
CREATE INDEX IF NOT EXISTS provenance_unresolved ON reference_index (tenant_id, target_type, target_id)
    WHERE provenance_target = 1 AND target_rid IS NULL;
";

/// Whether the reference index has its `target_rid` column.
fn has_target_keys(connection: &Connection) -> Result<bool, StoreError> {
    Ok(connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('reference_index') WHERE name = 'target_rid')",
        [],
        |row| row.get(0),
    )?)
}

/// Gives a reference index from before target keys its `target_rid` column, resolved for every
/// row, and its indexes, in one immediate transaction: a crash or a second process sees the
/// index either without the column or complete. Returns whether it migrated.
pub(super) fn migrate(connection: &mut Connection) -> Result<bool, StoreError> {
    if has_target_keys(connection)? {
        return Ok(false);
    }
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Another process may have migrated while this one waited for the lock.
    if has_target_keys(&transaction)? {
        return Ok(false);
    }
    tracing::info!("adding target keys to the reference index's Provenance rows");
    transaction.execute_batch("ALTER TABLE reference_index ADD COLUMN target_rid INTEGER;")?;
    resolve_all(&transaction)?;
    transaction.commit()?;
    Ok(true)
}

/// Resolves the key of every Provenance target row (after a backfill or when the column is new),
/// then creates the indexes (built once, from the resolved rows).
pub(super) fn resolve_all(transaction: &Transaction<'_>) -> Result<(), StoreError> {
    transaction.execute_batch(
        "UPDATE reference_index SET target_rid = (
             SELECT r.rid FROM resources r
             WHERE r.tenant_id = reference_index.tenant_id AND r.resource_type = reference_index.target_type
               AND r.id = reference_index.target_id)
         WHERE provenance_target = 1;",
    )?;
    transaction.execute_batch(INDEXES)?;
    Ok(())
}

/// A resource row was just created for `resource_type/id` with key `rid`: the Provenance rows
/// that already target it (written before it, or targeting a pruned tombstone) get its key.
pub(super) fn resolve_new_target(
    transaction: &Transaction<'_>,
    tenant: TenantId,
    resource_type: &str,
    id: &str,
    rid: i64,
) -> Result<(), StoreError> {
    transaction
        .prepare_cached(
            "UPDATE reference_index INDEXED BY provenance_unresolved SET target_rid = ?4
             WHERE tenant_id = ?1 AND target_type = ?2 AND target_id = ?3 AND provenance_target = 1
               AND target_rid IS NULL",
        )?
        .execute(params![tenant.0, resource_type, id, rid])?;
    Ok(())
}

/// The resource row with key `rid` is being removed (history pruning of a tombstone): rows that
/// target it lose its key until a resource of that type and id is created again.
pub(super) fn forget_target(
    transaction: &Transaction<'_>,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
) -> Result<(), StoreError> {
    transaction
        .prepare_cached(
            "UPDATE reference_index INDEXED BY provenance_by_target_rid SET target_rid = NULL
             WHERE tenant_id = ?1 AND target_type = ?2 AND target_rid = ?3 AND provenance_target = 1",
        )?
        .execute(params![tenant.0, resource_type, rid])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;
    use serde_json::{json, Value};

    use crate::sqlite::SqliteStore;
    use crate::{Store, TenantId, WriteMode, WriteOp};

    fn put(store: &SqliteStore, tenant: TenantId, body: Value) {
        let (resource_type, id) =
            (body["resourceType"].as_str().unwrap().to_owned(), body["id"].as_str().unwrap().to_owned());
        let op = WriteOp::Update { resource_type, id, body, if_match: None };
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    }

    fn provenance(id: &str, targets: &[&str]) -> Value {
        let target: Vec<Value> = targets.iter().map(|target| json!({"reference": target})).collect();
        json!({"resourceType": "Provenance", "id": id, "target": target, "recorded": "2020-01-01T00:00:00Z",
               "agent": [{"who": {"reference": "Practitioner/x"}}]})
    }

    fn observation(id: &str) -> Value {
        json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
               "subject": {"reference": "Patient/a"}})
    }

    /// Every reference row, with its target key.
    fn rows(path: &std::path::Path) -> Vec<String> {
        let connection = Connection::open(path).unwrap();
        let mut statement = connection
            .prepare(
                "SELECT rid, provenance_target, target_type, target_id, from_ts, to_ts, tenant_id, target_rid
                 FROM reference_index ORDER BY 1, 2, 3, 4, 5",
            )
            .unwrap();
        let rows = statement.query_map([], |row| {
            Ok(format!(
                "{:?}",
                (
                    row.get::<_, i64>(0)?,
                    row.get::<_, bool>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, Option<i64>>(5)?,
                    row.get::<_, i64>(6)?,
                    row.get::<_, Option<i64>>(7)?
                )
            ))
        });
        rows.unwrap().collect::<Result<_, _>>().unwrap()
    }

    /// A database whose reference index predates target keys gets them on open: exactly the keys
    /// the write path would have kept (resolved, or NULL for a target that does not exist), the
    /// same associated data at every earlier time, and targets created afterwards resolve.
    #[test]
    fn a_reference_index_without_target_keys_gets_them_on_open() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("old.db");
        let store = SqliteStore::open(&path).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        put(&store, tenant, json!({"resourceType": "Patient", "id": "a"}));
        put(&store, tenant, provenance("p1", &["Observation/o1", "Patient/a"]));
        put(&store, tenant, provenance("p3", &["Observation/later"]));
        put(&store, tenant, observation("o1"));
        let first = store.reserve_transaction_time().unwrap();
        put(&store, tenant, provenance("p2", &["Observation/o1"]));
        store
            .write(
                tenant,
                None,
                &[WriteOp::Delete { resource_type: "Observation".into(), id: "o1".into() }],
                WriteMode::Transaction,
            )
            .unwrap();
        let second = store.reserve_transaction_time().unwrap();
        put(&store, tenant, observation("o1"));
        put(&store, tenant, provenance("p1", &["Observation/o2"]));
        put(&store, tenant, observation("o2"));
        let third = store.reserve_transaction_time().unwrap();
        let kept = rows(&path);
        assert!(kept.iter().any(|row| row.ends_with("None)")) && kept.iter().any(|row| row.ends_with("))")));
        let expected: Vec<u64> = [first, second, third]
            .iter()
            .enumerate()
            .map(|(n, at)| crate::testsuite::provenance_of_member_a_at(&store, tenant, *at, &format!("a{n}")))
            .collect();
        assert_eq!(expected, [1, 1, 2], "p1; p1 (o1 deleted); p1 through o2 and p2 through the re-created o1");
        drop(store);

        // Back to the reference index as it was before target keys.
        let connection = Connection::open(&path).unwrap();
        connection
            .execute_batch(
                "DROP INDEX provenance_by_target_rid; DROP INDEX provenance_unresolved;
                 ALTER TABLE reference_index DROP COLUMN target_rid;",
            )
            .unwrap();
        assert!(!super::has_target_keys(&connection).unwrap());
        drop(connection);

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(rows(&path), kept, "the migration resolves exactly the keys the writes kept");
        let rebuilt: Vec<u64> = [first, second, third]
            .iter()
            .enumerate()
            .map(|(n, at)| crate::testsuite::provenance_of_member_a_at(&store, tenant, *at, &format!("b{n}")))
            .collect();
        assert_eq!(rebuilt, expected);
        put(&store, tenant, observation("later"));
        let now = store.reserve_transaction_time().unwrap();
        assert_eq!(
            crate::testsuite::provenance_of_member_a_at(&store, tenant, now, "c"),
            3,
            "a target created after the migration resolves"
        );
        let after_write = rows(&path);
        drop(store);
        // Opening again changes nothing.
        drop(SqliteStore::open(&path).unwrap());
        assert_eq!(rows(&path), after_write);
    }

    /// After bulk loads whose target rows were written in sorted batches (several per
    /// transaction: the bound is small in tests), every target row holds exactly the key of its
    /// target's resource row, or NULL when there is none.
    #[test]
    fn bulk_loaded_target_rows_hold_their_targets_keys() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("bulk.db");
        let store = SqliteStore::open(&path).unwrap();
        crate::testsuite::bulk_loads_find_provenance_targets_wherever_they_were_written(&store);
        let connection = Connection::open(&path).unwrap();
        let (targets, wrong, unresolved): (i64, i64, i64) = connection
            .query_row(
                "SELECT COUNT(*),
                        SUM(target_rid IS NOT (SELECT r.rid FROM resources r WHERE r.tenant_id = x.tenant_id
                              AND r.resource_type = x.target_type AND r.id = x.target_id)),
                        SUM(target_rid IS NULL)
                 FROM reference_index x WHERE provenance_target = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .unwrap();
        assert!(targets > 50, "{targets}");
        assert_eq!(wrong, 0, "every key is its target's");
        assert!(unresolved > 0, "Observation/never has no key");
    }

    fn index_exists(path: &std::path::Path, name: &str) -> bool {
        let connection = Connection::open(path).unwrap();
        connection
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?1)",
                [name],
                |row| row.get(0),
            )
            .unwrap()
    }

    /// A database from before the target keys answered every lookup by target still has the
    /// index of target rows by `(type, id)`: opening it drops that index, and lookups by target
    /// (of a resource that exists, of one that does not yet, and of one created afterwards) and
    /// the associated data of exports give the same answers as before.
    #[test]
    fn the_index_of_targets_by_id_is_dropped_on_open_and_lookups_keep_their_answers() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("old.db");
        let store = SqliteStore::open(&path).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        put(&store, tenant, json!({"resourceType": "Patient", "id": "a"}));
        put(&store, tenant, observation("o1"));
        put(&store, tenant, provenance("p1", &["Observation/o1", "Observation/missing"]));
        put(&store, tenant, provenance("p2", &["Observation/o1", "Patient/a"]));
        let at = store.reserve_transaction_time().unwrap();
        let targets = |ids: &[&str]| -> Vec<(String, String)> {
            ids.iter()
                .map(|target| {
                    let (resource_type, id) = target.split_once('/').unwrap();
                    (resource_type.to_owned(), id.to_owned())
                })
                .collect()
        };
        let asked = targets(&["Observation/o1", "Observation/missing", "Observation/none", "Patient/a"]);
        let found = store.provenance_targeting(tenant, &asked, at).unwrap();
        assert_eq!(found, ["p1", "p2"]);
        assert_eq!(store.provenance_targeting(tenant, &targets(&["Observation/missing"]), at).unwrap(), ["p1"]);
        let exported = crate::testsuite::provenance_of_member_a_at(&store, tenant, at, "before");
        drop(store);

        // The index as databases of earlier versions have it.
        let connection = Connection::open(&path).unwrap();
        connection
            .execute_batch(
                "CREATE INDEX provenance_by_target ON reference_index (tenant_id, target_type, target_id)
                     WHERE provenance_target = 1;",
            )
            .unwrap();
        drop(connection);
        assert!(index_exists(&path, "provenance_by_target"));
        let kept = rows(&path);

        let store = SqliteStore::open(&path).unwrap();
        assert!(!index_exists(&path, "provenance_by_target"), "dropped on open");
        assert_eq!(rows(&path), kept, "no row changes");
        assert_eq!(store.provenance_targeting(tenant, &asked, at).unwrap(), found);
        assert_eq!(crate::testsuite::provenance_of_member_a_at(&store, tenant, at, "after"), exported);
        // The missing target is created: its Provenance is found through the target's key.
        put(&store, tenant, observation("missing"));
        let now = store.reserve_transaction_time().unwrap();
        assert_eq!(store.provenance_targeting(tenant, &targets(&["Observation/missing"]), now).unwrap(), ["p1"]);
        assert_eq!(store.provenance_targeting(tenant, &targets(&["Observation/missing"]), at).unwrap(), ["p1"]);
        drop(store);
        drop(SqliteStore::open(&path).unwrap());
        assert!(!index_exists(&path, "provenance_by_target"), "and it stays dropped");
    }
}
