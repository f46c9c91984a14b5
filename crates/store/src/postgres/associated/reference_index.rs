//! The reference index, kept on write: per resource version, its references to types outside
//! the Patient compartment and its `Provenance.target` entries, versioned by time (a row is
//! valid for `[from_ts, to_ts)`, and a delete closes the rows). A target row carries its
//! target's key (`target_rid`) whenever the target's row exists.

use bulkhead_fhir::references::{outgoing_references, OutgoingReference};
use bulkhead_fhir::Micros;
use serde_json::Value;

use crate::postgres::Db;
use crate::{StoreError, TenantId};

/// Notes that `resource_type` has references to follow in `tenant`.
pub(in crate::postgres) fn note_referencing_types(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_types: &[&str],
) -> Result<(), StoreError> {
    if resource_types.is_empty() {
        return Ok(());
    }
    db.execute(
        "INSERT INTO referencing_types (tenant_id, resource_type) SELECT DISTINCT $1::int8, t FROM unnest($2::text[]) AS t
         ON CONFLICT DO NOTHING",
        &[&tenant.0, &resource_types],
    )?;
    Ok(())
}

/// Reference rows as parallel arrays, for one multi-row insert.
#[derive(Default)]
struct ReferenceRows {
    rids: Vec<i64>,
    provenance: Vec<bool>,
    types: Vec<String>,
    ids: Vec<String>,
}

impl ReferenceRows {
    fn push(&mut self, rid: i64, reference: OutgoingReference) {
        self.rids.push(rid);
        self.provenance.push(reference.provenance_target);
        self.types.push(reference.target_type);
        self.ids.push(reference.target_id);
    }

    fn insert(&self, db: &mut Db<'_>, tenant: TenantId, timestamp: Micros) -> Result<(), StoreError> {
        if self.rids.is_empty() {
            return Ok(());
        }
        // A Provenance target's row carries the target's key when its row exists (see
        // `resolve_new_targets` for targets created later).
        db.execute(
            "INSERT INTO reference_index (tenant_id, rid, provenance_target, target_type, target_id, from_ts, target_rid)
             SELECT $1, n.rid, n.provenance_target, n.target_type, n.target_id, $2,
                    CASE WHEN n.provenance_target THEN (
                        SELECT r.rid FROM resources r
                        WHERE r.tenant_id = $1 AND r.resource_type = n.target_type AND r.id = n.target_id) END
             FROM unnest($3::int8[], $4::bool[], $5::text[], $6::text[]) AS n(rid, provenance_target, target_type, target_id)
             ON CONFLICT DO NOTHING",
            &[&tenant.0, &timestamp, &self.rids, &self.provenance, &self.types, &self.ids],
        )?;
        Ok(())
    }
}

/// Resource rows were just created for `(types[i], ids[i])` with keys `rids[i]`: the Provenance
/// target rows that already name them (written before them, or naming a pruned tombstone) get
/// their keys. Unresolved rows have a small index of their own (`provenance_unresolved`), so
/// this costs a create little.
///
/// The plan is fixed by the statement's shape: each created key probes that index once (a
/// lateral subquery kept apart by `OFFSET 0`), and the rows found are updated by their `ctid`
/// (a TID scan each). Joined plainly, the statement took 160 ms a batch of 2,000 late in a
/// 10,000-patient import (8 s of the ~56 s PostgreSQL spent in statements, session 14); the
/// profile showed the list rescanned again and again (tuplestore reads, whole-row values), as a
/// plan that walks the unresolved rows and estimates the list at ten rows would.
pub(in crate::postgres) fn resolve_new_targets(
    db: &mut Db<'_>,
    tenant: TenantId,
    types: &[&str],
    ids: &[&str],
    rids: &[i64],
) -> Result<(), StoreError> {
    if rids.is_empty() {
        return Ok(());
    }
    db.execute(
        "UPDATE reference_index x SET target_rid = found.rid
         FROM (SELECT n.rid, y.ctid AS row_ctid
               FROM unnest($2::text[], $3::text[], $4::int8[]) AS n(target_type, target_id, rid),
               LATERAL (SELECT ctid FROM reference_index y
                        WHERE y.tenant_id = $1 AND y.provenance_target AND y.target_rid IS NULL
                          AND y.target_type = n.target_type AND y.target_id = n.target_id
                        OFFSET 0) AS y
               OFFSET 0) AS found
         WHERE x.ctid = found.row_ctid AND x.tenant_id = $1",
        &[&tenant.0, &types, &ids, &rids],
    )?;
    Ok(())
}

/// The resource row with key `rid` is being removed (history pruning of a tombstone): target
/// rows naming it lose the key until a resource of that type and id is created again.
pub(in crate::postgres) fn forget_target(db: &mut Db<'_>, tenant: TenantId, rid: i64) -> Result<(), StoreError> {
    db.execute(
        "UPDATE reference_index SET target_rid = NULL WHERE tenant_id = $1 AND target_rid = $2 AND provenance_target",
        &[&tenant.0, &rid],
    )?;
    Ok(())
}

/// Brings a resource's open reference rows in line with its new version (written at
/// `timestamp`): closes the rows of references it dropped, opens rows for new ones.
pub(in crate::postgres) fn sync_references(
    db: &mut Db<'_>,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    body: &Value,
    timestamp: Micros,
    is_new_row: bool,
) -> Result<(), StoreError> {
    let references = outgoing_references(resource_type, body);
    if references.iter().any(|reference| !reference.provenance_target) {
        note_referencing_types(db, tenant, &[resource_type])?;
    }
    let open: Vec<OutgoingReference> = if is_new_row {
        Vec::new()
    } else {
        db.query(
            "SELECT target_type, target_id, provenance_target FROM reference_index
             WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL",
            &[&tenant.0, &rid],
        )?
        .iter()
        .map(|row| {
            Ok(OutgoingReference {
                target_type: row.try_get(0)?,
                target_id: row.try_get(1)?,
                provenance_target: row.try_get(2)?,
            })
        })
        .collect::<Result<_, StoreError>>()?
    };
    let mut gone = ReferenceRows::default();
    for reference in open.iter().filter(|reference| !references.contains(reference)) {
        gone.push(rid, reference.clone());
    }
    close(db, tenant, rid, Some(&gone), timestamp)?;
    let mut new = ReferenceRows::default();
    for reference in references.into_iter().filter(|reference| !open.contains(reference)) {
        new.push(rid, reference);
    }
    new.insert(db, tenant, timestamp)
}

/// Closes every open reference row of a deleted resource.
pub(in crate::postgres) fn close_references(
    db: &mut Db<'_>,
    tenant: TenantId,
    rid: i64,
    timestamp: Micros,
) -> Result<(), StoreError> {
    close(db, tenant, rid, None, timestamp)
}

/// Closes the open rows of `references` (every open row when `None`) at `timestamp`. A row
/// opened at that very timestamp (an earlier write of the same transaction) is removed instead:
/// it was never valid at any time.
fn close(
    db: &mut Db<'_>,
    tenant: TenantId,
    rid: i64,
    references: Option<&ReferenceRows>,
    timestamp: Micros,
) -> Result<(), StoreError> {
    match references {
        Some(references) if references.rids.is_empty() => Ok(()),
        Some(references) => {
            let which = "(provenance_target, target_type, target_id) IN (
                             SELECT * FROM unnest($4::bool[], $5::text[], $6::text[]))";
            let params: [&(dyn postgres::types::ToSql + Sync); 6] =
                [&tenant.0, &rid, &timestamp, &references.provenance, &references.types, &references.ids];
            db.execute(
                &format!(
                    "DELETE FROM reference_index WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL AND from_ts = $3
                     AND {which}"
                ),
                &params,
            )?;
            db.execute(
                &format!(
                    "UPDATE reference_index SET to_ts = $3 WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL AND {which}"
                ),
                &params,
            )?;
            Ok(())
        }
        None => {
            db.execute(
                "DELETE FROM reference_index WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL AND from_ts = $3",
                &[&tenant.0, &rid, &timestamp],
            )?;
            db.execute(
                "UPDATE reference_index SET to_ts = $3 WHERE tenant_id = $1 AND rid = $2 AND to_ts IS NULL",
                &[&tenant.0, &rid, &timestamp],
            )?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::{Store, TenantId, WriteMode, WriteOp};

    fn write(store: &dyn Store, tenant: TenantId, op: WriteOp) {
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    }

    fn put(store: &dyn Store, tenant: TenantId, body: Value) {
        let (resource_type, id) =
            (body["resourceType"].as_str().unwrap().to_owned(), body["id"].as_str().unwrap().to_owned());
        write(store, tenant, WriteOp::Update { resource_type, id, body, if_match: None });
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
    fn rows(store: &crate::postgres::PgStore) -> Vec<String> {
        store
            .with_transaction(|db| {
                let rows = db.query(
                    "SELECT tenant_id, rid, provenance_target, target_type, target_id, from_ts, to_ts, target_rid
                     FROM reference_index ORDER BY 1, 2, 3, 4, 5, 6",
                    &[],
                )?;
                rows.iter()
                    .map(|row| {
                        Ok(format!(
                            "{:?}",
                            (
                                row.try_get::<_, i64>(1)?,
                                row.try_get::<_, bool>(2)?,
                                row.try_get::<_, String>(3)?,
                                row.try_get::<_, String>(4)?,
                                row.try_get::<_, i64>(5)?,
                                row.try_get::<_, Option<i64>>(6)?,
                                row.try_get::<_, Option<i64>>(7)?
                            )
                        ))
                    })
                    .collect()
            })
            .unwrap()
    }

    /// Migration 8 gives a reference index written before it the keys the write path keeps
    /// (resolved, or NULL for a target that does not exist), the same associated data at every
    /// earlier time, and targets created afterwards resolve.
    #[test]
    fn migration_8_resolves_the_keys_of_existing_provenance_targets() {
        let Some(database) = crate::postgres::testing::fresh_database() else { return };
        let options = crate::postgres::testing::test_options;
        let store = crate::postgres::PgStore::open(&database.url, options()).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        put(&store, tenant, json!({"resourceType": "Patient", "id": "a"}));
        put(&store, tenant, provenance("p1", &["Observation/o1", "Patient/a"]));
        put(&store, tenant, provenance("p3", &["Observation/later"]));
        put(&store, tenant, observation("o1"));
        let first = store.reserve_transaction_time().unwrap();
        put(&store, tenant, provenance("p2", &["Observation/o1"]));
        write(&store, tenant, WriteOp::Delete { resource_type: "Observation".into(), id: "o1".into() });
        let second = store.reserve_transaction_time().unwrap();
        put(&store, tenant, observation("o1"));
        put(&store, tenant, provenance("p1", &["Observation/o2"]));
        put(&store, tenant, observation("o2"));
        let third = store.reserve_transaction_time().unwrap();
        let kept = rows(&store);
        assert!(kept.iter().any(|row| row.ends_with("None)")) && kept.iter().any(|row| row.ends_with("))")));
        let times = [first, second, third];
        let expected: Vec<u64> = times
            .iter()
            .enumerate()
            .map(|(n, at)| crate::testsuite::provenance_of_member_a_at(&store, tenant, *at, &format!("a{n}")))
            .collect();
        assert_eq!(expected, [1, 1, 2], "p1; p1 (o1 deleted); p1 through o2 and p2 through the re-created o1");
        // Back to version 7.
        store
            .with_transaction(|db| {
                db.batch(
                    "DROP INDEX provenance_by_target_rid; DROP INDEX provenance_unresolved;
                     ALTER TABLE reference_index DROP COLUMN target_rid;
                     DELETE FROM schema_migrations WHERE version >= 8;",
                )
            })
            .unwrap();
        drop(store);

        let store = crate::postgres::PgStore::open(&database.url, options()).unwrap();
        assert_eq!(rows(&store), kept, "the migration resolves exactly the keys the writes kept");
        let rebuilt: Vec<u64> = times
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
    }
}
