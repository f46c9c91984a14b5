//! This instance's memory of patient keys: `(tenant, patient id) → pkey`.
//!
//! An export resolves its members' keys for the plan and again for every file it serves (each
//! file is its own request, possibly on another instance); at 10,000 members that is 10,000
//! index lookups per file. A patient's key is made on first mention and never changes nor is
//! deleted (`patient_keys` in the schema), so a key once read stays right for as long as the
//! database lives, and every instance may remember it without any invalidation. Only keys that
//! exist are remembered: a member without a key is looked up again next time.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Db;
use crate::{StoreError, TenantId};

/// Keys remembered at most; past it the memory starts afresh (about 100 bytes a key, so a few
/// MiB at most, whatever the tenants' sizes).
const CAPACITY: usize = 1 << 16;

#[derive(Default)]
pub(super) struct MemberKeys {
    keys: Mutex<HashMap<(i64, String), i64>>,
}

impl MemberKeys {
    /// The keys of `ids` (in `ids`' order, `None` for a patient without a key), reading only the
    /// ones not remembered.
    pub(super) fn resolve(
        &self,
        db: &mut Db<'_>,
        tenant: TenantId,
        ids: &[&str],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let mut keys: Vec<Option<i64>> = Vec::with_capacity(ids.len());
        let mut unknown: Vec<&str> = Vec::new();
        {
            let remembered = self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut probe = (tenant.0, String::new());
            for id in ids {
                probe.1.clear();
                probe.1.push_str(id);
                let key = remembered.get(&probe).copied();
                if key.is_none() {
                    unknown.push(id);
                }
                keys.push(key);
            }
        }
        if unknown.is_empty() {
            return Ok(keys);
        }
        let rows = db.query(
            "SELECT k.patient_id, k.pkey FROM unnest($2::text[]) AS m(patient_id)
             JOIN patient_keys k ON k.tenant_id = $1 AND k.patient_id = m.patient_id",
            &[&tenant.0, &unknown],
        )?;
        let mut found: HashMap<&str, i64> = HashMap::with_capacity(rows.len());
        for row in &rows {
            found.insert(row.try_get(0)?, row.try_get(1)?);
        }
        for (id, key) in ids.iter().zip(keys.iter_mut()) {
            if key.is_none() {
                *key = found.get(id).copied();
            }
        }
        let mut remembered = self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if remembered.len() + found.len() > CAPACITY {
            remembered.clear();
        }
        for (id, key) in found {
            remembered.insert((tenant.0, id.to_owned()), key);
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{Store, WriteMode, WriteOp};

    /// Keys come back in the asked order, as the database holds them; a patient without a key is
    /// not remembered as keyless: once a write names it, the next resolve finds its key.
    #[test]
    fn keys_are_remembered_once_they_exist() {
        let Some(store) = super::super::testing::fresh_store() else { return };
        let tenant = store.create_tenant("t").unwrap().id;
        let patient = |id: &str| WriteOp::Update {
            resource_type: "Patient".into(),
            id: id.into(),
            body: json!({"resourceType": "Patient", "id": id}),
            if_match: None,
        };
        store.write(tenant, None, &[patient("a")], WriteMode::Transaction).unwrap();
        let in_database = |id: &str| -> Option<i64> {
            store
                .with_read(|db| {
                    let row = db.query_opt(
                        "SELECT pkey FROM patient_keys WHERE tenant_id = $1 AND patient_id = $2",
                        &[&tenant.0, &id],
                    )?;
                    Ok(row.map(|row| row.get(0)))
                })
                .unwrap()
        };
        let resolve = |ids: &[&str]| store.with_read(|db| store.member_keys.resolve(db, tenant, ids)).unwrap();
        let a = in_database("a");
        assert!(a.is_some());
        assert_eq!(resolve(&["b", "a"]), vec![None, a]);
        assert_eq!(resolve(&["a"]), vec![a], "remembered");
        store.write(tenant, None, &[patient("b")], WriteMode::Transaction).unwrap();
        let b = in_database("b");
        assert!(b.is_some() && b != a);
        assert_eq!(resolve(&["a", "b", "a"]), vec![a, b, a]);
        // Another tenant's patient of the same id has a key of its own.
        let other = store.create_tenant("u").unwrap().id;
        store.write(other, None, &[patient("a")], WriteMode::Transaction).unwrap();
        let theirs = store.with_read(|db| store.member_keys.resolve(db, other, &["a"])).unwrap();
        assert!(theirs[0].is_some() && theirs[0] != a);
    }
}
