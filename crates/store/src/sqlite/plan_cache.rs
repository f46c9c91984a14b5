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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection};

use crate::{MemberSelection, PartRange, StoreError, TenantId};

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

#[derive(Clone)]
enum Cached {
    Plan(Plan),
    Deleted(Deleted),
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
            Cached::Plan(_) => 0,
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
}
