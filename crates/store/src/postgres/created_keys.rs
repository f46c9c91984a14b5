//! The keys (`rid`) of the resources a bulk load created, so that a Provenance of a later batch
//! gets its targets' keys without one probe of `(tenant, type, id)` each (at 10,000 patients
//! those probes, an index descent and a heap fetch at random places per target, were a fifth of
//! the writing backend's time: nearly every resource is some Provenance's target, and the
//! Provenance come after their targets).
//!
//! Bounded whatever the load's size: only ids that are UUIDs in canonical lowercase form are
//! kept (packed into 16 bytes, so a key is exact, never a hash), with the type's code and the
//! key in 8 more, at most [`MAX_KEYS`] of them (~50 MB); past that, for any other id, and for a
//! UUID the load created under two types, targets are probed as before.
//!
//! A key kept here stays right while the resource's row exists: updates and deletes keep a
//! resource's `rid`, and only pruning removes a row (after which the `(type, id)` may be
//! created again under a new key). Pruning counts the rows it removes per tenant
//! (`resource_removals`, migration 17); [`CreatedKeys::check_removals`] reads that count in the
//! batch's transaction, which holds the clock as every prune transaction does, and forgets every
//! key when it moved.

use std::collections::HashMap;

use bulkhead_fhir::resource_type_code;

use super::Db;
use crate::{StoreError, TenantId};

/// At most this many keys: a hash table of 2^21 buckets at its 7/8 load, 24 bytes a bucket.
const MAX_KEYS: usize = 1_835_008;

/// A kept key's entry: the type's code in the top 16 bits, the resource's key below.
type Entry = u64;

/// The entry of a UUID the load created under two types: neither is served from here.
const AMBIGUOUS: Entry = u64::MAX;

const KEY_BITS: u32 = 48;

fn entry(code: i16, rid: i64) -> Option<Entry> {
    let code = u64::from(u16::try_from(code).ok()?);
    let rid = u64::try_from(rid).ok().filter(|rid| *rid < 1 << KEY_BITS)?;
    Some(code << KEY_BITS | rid)
}

/// The 16 bytes of `id` when it is a UUID written as 8-4-4-4-12 lowercase hex digits (the only
/// form accepted, so that two different ids never pack alike).
fn pack_uuid(id: &str) -> Option<[u8; 16]> {
    let bytes = id.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut packed = [0u8; 16];
    let mut digits = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if matches!(at, 8 | 13 | 18 | 23) {
            if byte != b'-' {
                return None;
            }
            continue;
        }
        let value = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            _ => return None,
        };
        packed[digits / 2] |= if digits % 2 == 0 { value << 4 } else { value };
        digits += 1;
    }
    Some(packed)
}

/// The keys of the resources a bulk load created, those of its open transaction kept apart
/// until it commits.
pub(super) struct CreatedKeys {
    /// By the id's 16 bytes.
    keys: HashMap<[u8; 16], Entry>,
    /// Created in the open transaction: kept by [`CreatedKeys::committed`], dropped by
    /// [`CreatedKeys::rolled_back`].
    pending: Vec<([u8; 16], Entry)>,
    /// The tenant's `resource_removals` count when `keys` were last known right.
    removals: Option<i64>,
    max_keys: usize,
}

impl CreatedKeys {
    pub(super) fn new() -> CreatedKeys {
        CreatedKeys::with_max_keys(MAX_KEYS)
    }

    fn with_max_keys(max_keys: usize) -> CreatedKeys {
        CreatedKeys { keys: HashMap::new(), pending: Vec::new(), removals: None, max_keys }
    }

    /// Notes a resource created in the open transaction.
    pub(super) fn created(&mut self, code: i16, id: &str, rid: i64) {
        if let (Some(id), Some(entry)) = (pack_uuid(id), entry(code, rid)) {
            self.pending.push((id, entry));
        }
    }

    /// The open transaction committed: its keys are kept, up to the bound.
    pub(super) fn committed(&mut self) {
        for (id, entry) in self.pending.drain(..) {
            if let Some(kept) = self.keys.get_mut(&id) {
                // Created under another type (a resource's `(type, id)` is created once).
                *kept = AMBIGUOUS;
            } else if self.keys.len() < self.max_keys {
                self.keys.insert(id, entry);
            }
        }
    }

    /// The open transaction was rolled back: the keys it took name no row.
    pub(super) fn rolled_back(&mut self) {
        self.pending.clear();
    }

    /// Forgets every committed key if `tenant` lost resource rows to pruning since the last
    /// check. Run in every transaction that creates or uses keys, after it took the clock (so
    /// the first one, before any key is kept, sets the count the keys are checked against).
    pub(super) fn check_removals(&mut self, db: &mut Db<'_>, tenant: TenantId) -> Result<(), StoreError> {
        let removals: i64 = db
            .query_one(
                "SELECT coalesce((SELECT removed FROM resource_removals WHERE tenant_id = $1), 0)",
                &[&tenant.0],
            )?
            .try_get(0)?;
        self.note_removals(removals);
        Ok(())
    }

    fn note_removals(&mut self, removals: i64) {
        if self.removals.is_some_and(|seen| seen != removals) {
            self.keys.clear();
            self.keys.shrink_to_fit();
        }
        self.removals = Some(removals);
    }

    /// The key of `(resource_type, id)` if this load created it (and committed).
    pub(super) fn get(&self, resource_type: &str, id: &str) -> Option<i64> {
        let code = u64::try_from(resource_type_code(resource_type)?).ok()?;
        let entry = *self.keys.get(&pack_uuid(id)?)?;
        if entry == AMBIGUOUS || entry >> KEY_BITS != code {
            return None;
        }
        i64::try_from(entry & ((1 << KEY_BITS) - 1)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "d345e9aa-9530-4e70-9dd2-138dc04d05f2";
    const B: &str = "d345e9aa-9530-4e70-9dd2-138dc04d05f3";

    fn code(resource_type: &str) -> i16 {
        i16::try_from(resource_type_code(resource_type).unwrap()).unwrap()
    }

    /// Only canonical lowercase UUIDs pack, each to its own bytes.
    #[test]
    fn only_canonical_uuids_pack_and_never_alike() {
        assert_eq!(
            pack_uuid(A),
            Some([0xd3, 0x45, 0xe9, 0xaa, 0x95, 0x30, 0x4e, 0x70, 0x9d, 0xd2, 0x13, 0x8d, 0xc0, 0x4d, 0x05, 0xf2])
        );
        assert_ne!(pack_uuid(A), pack_uuid(B));
        for id in [
            "D345E9AA-9530-4E70-9DD2-138DC04D05F2",
            "d345e9aa95304e709dd2138dc04d05f2",
            "d345e9aa-9530-4e70-9dd2-138dc04d05f",
            "d345e9aa-9530-4e70-9dd2-138dc04d05f2x",
            "d345e9aa_9530-4e70-9dd2-138dc04d05f2",
            "g345e9aa-9530-4e70-9dd2-138dc04d05f2",
            "p1",
        ] {
            assert_eq!(pack_uuid(id), None, "{id}");
        }
    }

    /// A key is found only for the type and id it was created under, once its transaction
    /// committed; a rolled-back transaction's keys are never found.
    #[test]
    fn keys_are_kept_only_once_committed() {
        let mut keys = CreatedKeys::new();
        keys.created(code("Observation"), A, 7);
        assert_eq!(keys.get("Observation", A), None, "not before the commit");
        keys.committed();
        assert_eq!(keys.get("Observation", A), Some(7));
        assert_eq!(keys.get("Condition", A), None);
        assert_eq!(keys.get("Observation", B), None);
        keys.created(code("Observation"), B, 8);
        keys.rolled_back();
        keys.committed();
        assert_eq!(keys.get("Observation", B), None, "rolled back");
        keys.created(code("Patient"), "p1", 9);
        keys.committed();
        assert_eq!(keys.get("Patient", "p1"), None, "not a UUID: probed instead");
    }

    /// A UUID created under two types is served for neither (both are probed).
    #[test]
    fn a_uuid_created_under_two_types_is_probed() {
        let mut keys = CreatedKeys::new();
        keys.created(code("Observation"), A, 7);
        keys.committed();
        keys.created(code("Condition"), A, 8);
        keys.created(code("Observation"), B, (1 << KEY_BITS) + 1);
        keys.committed();
        assert_eq!((keys.get("Observation", A), keys.get("Condition", A)), (None, None));
        assert_eq!(keys.get("Observation", B), None, "a key past 48 bits is not kept");
    }

    /// No more keys than the bound are kept; the first ones stay.
    #[test]
    fn keys_stay_within_their_bound() {
        let mut keys = CreatedKeys::with_max_keys(2);
        for (n, id) in [A, B, "d345e9aa-9530-4e70-9dd2-138dc04d05f4"].into_iter().enumerate() {
            keys.created(code("Observation"), id, n as i64);
        }
        keys.committed();
        assert_eq!(keys.keys.len(), 2);
        assert_eq!((keys.get("Observation", A), keys.get("Observation", B)), (Some(0), Some(1)));
        assert_eq!(keys.get("Observation", "d345e9aa-9530-4e70-9dd2-138dc04d05f4"), None);
    }

    /// A change in the tenant's count of pruned rows forgets every key.
    #[test]
    fn pruned_rows_forget_every_key() {
        let mut keys = CreatedKeys::new();
        keys.note_removals(3);
        keys.created(code("Observation"), A, 7);
        keys.committed();
        keys.note_removals(3);
        assert_eq!(keys.get("Observation", A), Some(7));
        keys.note_removals(4);
        assert_eq!(keys.get("Observation", A), None);
    }
}
