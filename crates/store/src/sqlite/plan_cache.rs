//! Export plans (and `deleted[]` lists) remembered across kick-offs, so repeating a manifest
//! whose members' data did not change costs a check of the members, not a pass over their
//! compartments.
//!
//! A result computed at transaction time T1 is the result at a later T2 when no compartment row
//! of any member changed in (T1, T2]: the selection reads nothing else (a row carries its
//! resource's `lastUpdated`, tombstone flag and owner; history is append-only; owners never
//! change). Every write that opens, closes or changes a patient's compartment row raises that
//! patient's `patient_keys.changed_at` to its timestamp in the same transaction, and timestamps
//! are handed out in commit order, so "no member's `changed_at` is above T1", read after T2 was
//! reserved, is exactly that condition. A member without a key yet has no rows; a key created
//! later comes with `changed_at` above T1. The cache key is everything else the result depends
//! on: tenant, members with their `since`, `_since`, `_until`, visibility, `_typeFilter`s, types,
//! part size. Only member-scoped selections are cached: a system-level selection reads every
//! resource of the tenant, which no patient watermark covers.
//!
//! An associated set (Provenance and referenced resources, [`super::associated`]) also reads
//! what lies outside the members' compartments: the Provenance targeting cohort resources, and
//! the referenced resources (Practitioner, Organization, …) with their own references. Every
//! write of a Provenance or of a type outside the compartment raises that type's
//! `associated_type_changes.changed_at` in the same transaction, so a set computed at T1 is the
//! set at T2 when, besides the members' rule, no such type it can reach changed in (T1, T2]
//! ([`associated_types_unchanged_since`]). Its rows are stored per export (`export_associated`,
//! under the export's set id): a reused set is copied from the set it was stored under, and
//! recomputed when that one has been swept.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection};

use crate::{
    AssociatedRequest, MemberSelection, PartRange, ProvenanceSelection, ReferencedTypes, StoreError, TenantId,
};

/// Results kept (the oldest goes first). A `_since` manifest needs one entry per type (its
/// `deleted[]` lists) besides its plan: room for several such manifests at once.
const ENTRIES: usize = 1024;
/// A `deleted[]` list longer than this is not kept; short lists are the "little changed" case.
pub(super) const MAX_CACHED_DELETED: usize = 1_000;
/// Ids held in all kept `deleted[]` lists together (the oldest entries go first beyond it), so
/// the cache stays within a few MB whatever the lists.
const MAX_DELETED_IDS: usize = 20_000;

pub(super) type Plan = Arc<Vec<(String, Vec<PartRange>)>>;
pub(super) type Deleted = Arc<Vec<(String, Micros)>>;

/// An associated set's plan, with the set id its rows are stored under.
pub(super) struct AssociatedSet {
    pub(super) set_id: String,
    pub(super) plan: Plan,
}

impl AssociatedSet {
    /// How many resources the set holds.
    pub(super) fn len(&self) -> u64 {
        self.plan.iter().flat_map(|(_, parts)| parts).map(|part| part.count).sum()
    }
}

#[derive(Clone)]
enum Cached {
    Plan(Plan),
    Deleted(Deleted),
    Associated(Arc<AssociatedSet>),
}

struct Entry {
    key: [u8; 32],
    /// The transaction time the result was computed at.
    planned_at: Micros,
    value: Cached,
}

/// What the cache did, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlanCacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Associated sets reused (copied from an earlier export's set) and computed.
    pub associated_hits: u64,
    pub associated_misses: u64,
}

#[derive(Default)]
pub(super) struct PlanCache {
    entries: Mutex<VecDeque<Entry>>,
    stats: Mutex<PlanCacheStats>,
}

/// The cache key of a result: what it depends on besides the transaction time.
pub(super) fn key(
    tenant: TenantId,
    selection: &MemberSelection,
    what: &str,
    types: &[String],
    part_size: u64,
) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    let optional = |value: Option<Micros>| {
        value.map_or([0u8; 9], |value| {
            let mut bytes = [1u8; 9];
            bytes[1..].copy_from_slice(&value.to_le_bytes());
            bytes
        })
    };
    field(what.as_bytes());
    field(tenant.0.to_le_bytes().as_slice());
    field((selection.members.len() as u64).to_le_bytes().as_slice());
    for (patient, since) in &selection.members {
        field(patient.as_bytes());
        field(optional(*since).as_slice());
    }
    field(optional(selection.since).as_slice());
    field(optional(selection.until).as_slice());
    match selection.visibility.user() {
        Some(user) => field(&[b"user:".as_slice(), user.as_bytes()].concat()),
        None => field(b"tenant".as_slice()),
    }
    // `_typeFilter`s select by the stored JSON of versions at the transaction time: a change to
    // those is a change to their compartment rows too, so only the filters themselves key.
    field(format!("{:?}", selection.filters).as_bytes());
    field((types.len() as u64).to_le_bytes().as_slice());
    for resource_type in types {
        field(resource_type.as_bytes());
    }
    field(part_size.to_le_bytes().as_slice());
    hasher.finalize().into()
}

/// The cache key of an associated set: [`key`] plus what the request asks for (not its set id or
/// expiry, which name where the result is stored).
pub(super) fn associated_key(
    tenant: TenantId,
    selection: &MemberSelection,
    request: &AssociatedRequest,
    part_size: u64,
) -> [u8; 32] {
    let what = format!(
        "associated {:?} {:?} {:?} {:?} {}",
        request.provenance, request.provenance_sources, request.referenced, request.reference_sources, request.depth
    );
    key(tenant, selection, &what, &[], part_size)
}

/// True when no resource of a type outside the compartment that `request` can reach, and (when
/// it asks for Provenance) no Provenance, of `tenant` was written after `planned_at`.
pub(super) fn associated_types_unchanged_since(
    connection: &Connection,
    tenant: TenantId,
    request: &AssociatedRequest,
    planned_at: Micros,
) -> Result<bool, StoreError> {
    let changed: Vec<String> = connection
        .prepare_cached("SELECT resource_type FROM associated_type_changes WHERE tenant_id = ?1 AND changed_at > ?2")?
        .query_map(params![tenant.0, planned_at], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let reaches = |resource_type: &str| {
        if resource_type == "Provenance" {
            return request.provenance != ProvenanceSelection::None;
        }
        request.depth > 0
            && match &request.referenced {
                ReferencedTypes::None => false,
                ReferencedTypes::All => true,
                ReferencedTypes::Only(types) => types.iter().any(|t| t == resource_type),
            }
    };
    Ok(!changed.iter().any(|resource_type| reaches(resource_type)))
}

/// True when no member loaded on this connection ([`super::export::load_members`]) has a
/// compartment row changed after `planned_at`.
pub(super) fn members_unchanged_since(connection: &Connection, planned_at: Micros) -> Result<bool, StoreError> {
    let changed: bool = connection
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM temp.export_member m CROSS JOIN patient_keys p ON p.pkey = m.pkey
                            WHERE p.changed_at > ?1)",
        )?
        .query_row(params![planned_at], |row| row.get(0))?;
    Ok(!changed)
}

impl PlanCache {
    /// The newest entry under `key` computed no later than `at`, with its transaction time.
    fn get(&self, key: &[u8; 32], at: Micros) -> Option<(Micros, Cached)> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries
            .iter()
            .filter(|entry| &entry.key == key && entry.planned_at <= at)
            .max_by_key(|entry| entry.planned_at)
            .map(|entry| (entry.planned_at, entry.value.clone()))
    }

    fn put(&self, key: [u8; 32], planned_at: Micros, value: Cached) {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.retain(|entry| entry.key != key);
        entries.push_back(Entry { key, planned_at, value });
        let ids = |entry: &Entry| match &entry.value {
            Cached::Deleted(deleted) => deleted.len(),
            Cached::Plan(_) | Cached::Associated(_) => 0,
        };
        let mut held: usize = entries.iter().map(ids).sum();
        while entries.len() > ENTRIES || held > MAX_DELETED_IDS {
            let Some(oldest) = entries.pop_front() else { break };
            held -= ids(&oldest);
        }
    }

    fn count(&self, hit: bool) {
        let mut stats = self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if hit {
            stats.hits += 1;
        } else {
            stats.misses += 1;
        }
    }

    fn count_associated(&self, hit: bool) {
        let mut stats = self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if hit {
            stats.associated_hits += 1;
        } else {
            stats.associated_misses += 1;
        }
    }

    pub(super) fn stats(&self) -> PlanCacheStats {
        *self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The plan under `key` if one computed at or before `at` is still exact (`still_valid` is
    /// asked with its transaction time), else `compute`'s, remembered.
    pub(super) fn plan(
        &self,
        key: [u8; 32],
        at: Micros,
        still_valid: impl FnOnce(Micros) -> Result<bool, StoreError>,
        compute: impl FnOnce() -> Result<Vec<(String, Vec<PartRange>)>, StoreError>,
    ) -> Result<Plan, StoreError> {
        if let Some((planned_at, Cached::Plan(plan))) = self.get(&key, at) {
            if still_valid(planned_at)? {
                self.count(true);
                return Ok(plan);
            }
        }
        self.count(false);
        let plan = Arc::new(compute()?);
        self.put(key, at, Cached::Plan(plan.clone()));
        Ok(plan)
    }

    /// As [`PlanCache::plan`], for a `deleted[]` list (long lists are not remembered).
    pub(super) fn deleted(
        &self,
        key: [u8; 32],
        at: Micros,
        still_valid: impl FnOnce(Micros) -> Result<bool, StoreError>,
        compute: impl FnOnce() -> Result<Vec<(String, Micros)>, StoreError>,
    ) -> Result<Deleted, StoreError> {
        if let Some((planned_at, Cached::Deleted(deleted))) = self.get(&key, at) {
            if still_valid(planned_at)? {
                self.count(true);
                return Ok(deleted);
            }
        }
        self.count(false);
        let deleted = Arc::new(compute()?);
        if deleted.len() <= MAX_CACHED_DELETED {
            self.put(key, at, Cached::Deleted(deleted.clone()));
        }
        Ok(deleted)
    }

    /// The plan of the associated set under `key`, to be stored under `set_id`: when
    /// one computed at or before `at` is still exact (`still_valid` is asked with its transaction
    /// time) and `copy` could copy its stored rows under `set_id` (false: they were swept), that
    /// one; else `compute`'s (which stores the rows itself). Either way the entry then names
    /// `set_id`, the newest stored copy.
    pub(super) fn associated(
        &self,
        key: [u8; 32],
        at: Micros,
        set_id: &str,
        still_valid: impl FnOnce(Micros) -> Result<bool, StoreError>,
        copy: impl FnOnce(&AssociatedSet) -> Result<bool, StoreError>,
        compute: impl FnOnce() -> Result<Vec<(String, Vec<PartRange>)>, StoreError>,
    ) -> Result<Plan, StoreError> {
        if let Some((planned_at, Cached::Associated(set))) = self.get(&key, at) {
            if still_valid(planned_at)? && copy(&set)? {
                self.count_associated(true);
                // Checked unchanged through `at`: the set is the set at `at` too.
                let copied = AssociatedSet { set_id: set_id.to_owned(), plan: set.plan.clone() };
                self.put(key, at, Cached::Associated(Arc::new(copied)));
                return Ok(set.plan.clone());
            }
        }
        self.count_associated(false);
        let plan = Arc::new(compute()?);
        let computed = AssociatedSet { set_id: set_id.to_owned(), plan: plan.clone() };
        self.put(key, at, Cached::Associated(Arc::new(computed)));
        Ok(plan)
    }
}
