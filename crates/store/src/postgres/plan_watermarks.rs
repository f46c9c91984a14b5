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
