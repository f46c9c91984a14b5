//! The PostgreSQL side of the plan cache ([`crate::plan_cache`]): its watermark queries (kept by
//! the write path, `resources.rs`, and by pruning, `retention.rs`), and the sharing of a stored
//! associated set by id.
//!
//! A set's registration (`associated_sets`) and its rows are stored in one transaction, and the
//! sweep removes an expired registration and its rows in one statement
//! ([`super::associated::delete_expired_sets`]). A reuse extends the registration's expiry with
//! one `UPDATE`: the row lock orders it with the sweep's `DELETE`, which re-checks the expiry of
//! a row updated under it, so a reuse either keeps the whole set until its own export expires or
//! finds it gone (and the set is computed again).

use bulkhead_fhir::Micros;

use super::Db;
use crate::{MemberSelection, StoreError, TenantId};

/// The greatest `changed_at` of `selection`'s members; 0 when none has a compartment row. A
/// member without a patient key has no rows (a key made later comes with a later `changed_at`).
pub(super) fn members_latest_change(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
) -> Result<Micros, StoreError> {
    let ids: Vec<&str> = selection.members.iter().map(|(id, _)| id.as_str()).collect();
    Ok(db
        .query_one(
            "SELECT COALESCE(max(k.changed_at), 0) FROM unnest($2::text[]) AS m(patient_id)
             JOIN patient_keys k ON k.tenant_id = $1 AND k.patient_id = m.patient_id",
            &[&tenant.0, &ids],
        )?
        .try_get(0)?)
}

/// The greatest `changed_at` of any patient of `tenant` (0: none has a compartment row), kept
/// by triggers (migration 13): an upper bound of any members' [`members_latest_change`], read
/// in one row.
pub(super) fn tenant_latest_change(db: &mut Db<'_>, tenant: TenantId) -> Result<Micros, StoreError> {
    let row = db.query_opt("SELECT changed_at FROM tenant_patient_changes WHERE tenant_id = $1", &[&tenant.0])?;
    Ok(row.map(|row| row.try_get(0)).transpose()?.unwrap_or(0))
}

/// The types outside the compartment (and Provenance) of `tenant` written after `planned_at`.
pub(super) fn associated_types_changed_since(
    db: &mut Db<'_>,
    tenant: TenantId,
    planned_at: Micros,
) -> Result<Vec<String>, StoreError> {
    db.query(
        "SELECT resource_type FROM associated_type_changes WHERE tenant_id = $1 AND changed_at > $2",
        &[&tenant.0, &planned_at],
    )?
    .iter()
    .map(|row| Ok(row.try_get(0)?))
    .collect()
}

/// Keeps the stored set `set_id` until at least `expires`, for another export that shares it;
/// false when it has been swept (nothing changes then).
pub(super) fn share(db: &mut Db<'_>, tenant: TenantId, set_id: &str, expires: Micros) -> Result<bool, StoreError> {
    let extended = db.execute(
        "UPDATE associated_sets SET expires = GREATEST(expires, $3) WHERE tenant_id = $1 AND set_id = $2",
        &[&tenant.0, &set_id, &expires],
    )?;
    Ok(extended == 1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::super::testing::{fresh_database, test_options};
    use super::super::PgStore;
    use crate::{MemberSelection, Store, TenantId, Visibility, WriteMode, WriteOp};

    fn observation(id: &str, patient: &str, value: i64) -> WriteOp {
        let body = json!({"resourceType": "Observation", "id": id, "status": "final", "valueInteger": value,
                          "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")}});
        WriteOp::Update { resource_type: "Observation".into(), id: id.into(), body, if_match: None }
    }

    /// The tenant's bound and its patients' greatest `changed_at`, asserted equal.
    fn check(store: &PgStore, tenant: TenantId) -> i64 {
        let (bound, greatest) = store
            .with_read(|db| {
                let greatest: i64 = db
                    .query_one(
                        "SELECT COALESCE(max(changed_at), 0) FROM patient_keys WHERE tenant_id = $1",
                        &[&tenant.0],
                    )?
                    .try_get(0)?;
                Ok((super::tenant_latest_change(db, tenant)?, greatest))
            })
            .unwrap();
        assert_eq!(bound, greatest);
        bound
    }

    /// The tenant's bound, kept by migration 13's triggers, is its patients' greatest
    /// `changed_at` after every kind of write (single writes, a bulk write, a delete, pruning),
    /// per tenant; stepped back and re-applied, the migration seeds it from the patients.
    #[test]
    fn the_tenant_watermark_is_the_greatest_patient_watermark() {
        let Some(database) = fresh_database() else { return };
        let store = PgStore::open(&database.url, test_options()).unwrap();
        let (one, two) = (store.create_tenant("one").unwrap().id, store.create_tenant("two").unwrap().id);
        let write = |tenant: TenantId, ops: &[WriteOp]| {
            for result in store.write(tenant, None, ops, WriteMode::Transaction).unwrap() {
                result.unwrap();
            }
        };
        assert_eq!(check(&store, one), 0, "no patient yet");
        write(one, &[observation("o1", "a", 1)]);
        let after_a = check(&store, one);
        assert!(after_a > 0);
        write(one, &[observation("o2", "b", 2)]);
        write(two, &[observation("o3", "a", 3)]);
        let after_b = check(&store, one);
        assert!(after_b > after_a, "a new patient raises it");
        assert!(check(&store, two) > after_b, "per tenant");
        write(one, &[observation("o1", "a", 4)]);
        let again = check(&store, one);
        assert!(again > after_b, "a raise of an existing patient raises it");
        // Enough new resources at once for the bulk path (COPY, then one raise of every patient).
        let bulk: Vec<WriteOp> = (0..12).map(|n| observation(&format!("bulk{n}"), &format!("p{n}"), n)).collect();
        write(one, &bulk);
        let bulked = check(&store, one);
        assert!(bulked > again, "a bulk write raises it");
        write(one, &[WriteOp::Delete { resource_type: "Observation".into(), id: "o2".into() }]);
        let deleted = check(&store, one);
        assert!(deleted > bulked);
        let now = bulkhead_fhir::now_micros();
        store.prune_history(now + 1, now + 1, 100).unwrap();
        assert!(check(&store, one) >= deleted, "pruning closed rows raises it (or keeps it)");
        let before = (check(&store, one), check(&store, two));

        // The schema before migration 13, then opened again: seeded, and kept from then on.
        store
            .with_transaction(|db| {
                db.batch(
                    "DROP TRIGGER patient_keys_raise_tenant_on_insert ON patient_keys;
                     DROP TRIGGER patient_keys_raise_tenant_on_update ON patient_keys;
                     DROP FUNCTION raise_tenant_patient_changes();
                     DROP TABLE tenant_patient_changes;
                     DELETE FROM schema_migrations WHERE version >= 13;",
                )
            })
            .unwrap();
        drop(store);
        let store = PgStore::open(&database.url, test_options()).unwrap();
        assert_eq!((check(&store, one), check(&store, two)), before, "seeded from the patients");
        store.write(two, None, &[observation("o4", "c", 5)], WriteMode::Transaction).unwrap();
        assert!(check(&store, two) > before.1, "raised after the migration");
        // Re-applied over itself: nothing changes.
        store.with_transaction(|db| db.batch("DELETE FROM schema_migrations WHERE version >= 13")).unwrap();
        let raised = check(&store, two);
        drop(store);
        let store = PgStore::open(&database.url, test_options()).unwrap();
        assert_eq!((check(&store, one), check(&store, two)), (before.0, raised));
    }

    /// A repeated plan of a Group's members, while no patient of the tenant changed, is checked
    /// against the tenant's bound alone: it reads no member's watermark (here `patient_keys` is
    /// locked by another session, so reading it would wait out the statement timeout). A change
    /// to a member is still seen.
    #[test]
    fn a_repeat_plan_reads_no_member_watermark_while_no_patient_changed() {
        let Some(database) = fresh_database() else { return };
        let options = super::super::PgOptions { statement_timeout: Duration::from_secs(5), ..test_options() };
        let store = PgStore::open(&database.url, options).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        store.write(tenant, None, &[observation("o1", "a", 1), observation("o2", "b", 2)], WriteMode::Batch).unwrap();
        let selection_at = |at| MemberSelection {
            members: vec![("a".into(), None), ("b".into(), None)].into(),
            since: None,
            until: None,
            transaction_time: at,
            visibility: Visibility::Tenant,
            scope: Default::default(),
            filters: Default::default(),
        };
        let types = ["Observation".to_owned()];
        let plan = |at| store.plan_parts(tenant, &selection_at(at), &types, 100);
        let first = plan(store.reserve_transaction_time().unwrap()).unwrap();
        assert_eq!(first[0].1[0].count, 2);
        let repeat_at = store.reserve_transaction_time().unwrap();

        let mut locker = postgres::Client::connect(&database.url, postgres::NoTls).unwrap();
        let mut lock = locker.transaction().unwrap();
        lock.batch_execute("LOCK TABLE patient_keys IN ACCESS EXCLUSIVE MODE").unwrap();
        let hits = store.plan_cache_stats().unwrap().hits;
        let repeat = plan(repeat_at);
        lock.rollback().unwrap();
        assert_eq!(repeat.unwrap(), first, "answered without waiting for patient_keys");
        assert_eq!(store.plan_cache_stats().unwrap().hits, hits + 1);

        store.write(tenant, None, &[observation("o3", "a", 3)], WriteMode::Transaction).unwrap();
        let changed = plan(store.reserve_transaction_time().unwrap()).unwrap();
        assert_eq!(changed[0].1[0].count, 3, "a member's new resource is seen");
    }
}
