//! Export plans, `deleted[]` lists and associated sets remembered across kick-offs, so
//! repeating a manifest whose members' data did not change costs a check of the members, not a
//! pass over their compartments. Shared by both stores: the cache, its key and the reuse rule
//! live here; each store supplies the watermark queries and the sharing of a stored set
//! ([`PlanCache::plan`], [`PlanCache::deleted`], [`PlanCache::associated`] take them as closures).
//!
//! A result computed at transaction time T1 is the result at a later T2 when no compartment row
//! of any member changed in (T1, T2]: the selection reads nothing else (a row carries its
//! resource's `lastUpdated`, tombstone flag and owner; history is append-only; owners never
//! change). Every write that opens, closes or changes a patient's compartment row raises that
//! patient's `patient_keys.changed_at` to its timestamp in the same transaction, and timestamps
//! are handed out in commit order (SQLite: one writer; PostgreSQL: every write transaction holds
//! the clock row's lock until it commits, see `PgStore::with_write`), so "no member's
//! `changed_at` is above T1", read in a snapshot taken after T2 was reserved, is exactly that
//! condition. A member without a key yet has no rows; a key created later comes with
//! `changed_at` above T1. The cache key is everything else the result depends on: tenant,
//! members with their `since`, `_since`, `_until`, visibility, `_typeFilter`s, types, part size.
//! Only member-scoped selections are cached: a system-level selection reads every resource of
//! the tenant, which no patient watermark covers.
//!
//! Group rows are the exception ([`raises_member_watermarks`]): a Group is in the compartment
//! of each of its members, but no export reads members' Groups (only the exported Group itself,
//! by version), so a Group's rows raise no watermark: writing a cohort does not invalidate the
//! cached plans of every Group sharing its members. A result over Group rows is therefore never
//! cached ([`cacheable`]); a key a Group row makes starts at `changed_at` 0 (its member has no
//! row a cached result reads yet).
//!
//! An associated set (Provenance and referenced resources) also reads what lies outside the
//! members' compartments: the Provenance targeting cohort resources, and the referenced
//! resources (Practitioner, Organization, …) with their own references. Every write of a
//! Provenance or of a type outside the compartment raises that type's
//! `associated_type_changes.changed_at` in the same transaction, so a set computed at T1 is the
//! set at T2 when, besides the members' rule, no such type it can reach changed in (T1, T2]
//! ([`reaches_any`]). A set's rows are stored once (`export_associated` under its set id, its
//! expiry in `associated_sets`): a kick-off that reuses it shares those rows by id and extends the
//! set's expiry to its own (in one short write transaction, serialised with the expiry sweep,
//! which removes a set's registration and its rows together), and recomputes when the set has
//! already been swept. The cache never holds rows, only plans and set ids.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bulkhead_fhir::Micros;

use crate::{
    AssociatedRequest, MemberSelection, PartRange, ProvenanceSelection, ReferencedTypes, StoreError, TenantId,
};

/// Results kept (the oldest goes first). A `_since` manifest needs one entry per type (its
/// `deleted[]` lists) besides its plan: room for several such manifests at once.
const ENTRIES: usize = 1024;
/// A `deleted[]` list longer than this is not kept; short lists are the "little changed" case.
pub(crate) const MAX_CACHED_DELETED: usize = 1_000;
/// Ids held in all kept `deleted[]` lists together (the oldest entries go first beyond it), so
/// the cache stays within a few MB whatever the lists.
const MAX_DELETED_IDS: usize = 20_000;

pub(crate) type Plan = Arc<Vec<(String, Vec<PartRange>)>>;
pub(crate) type Deleted = Arc<Vec<(String, Micros)>>;

/// An associated set's plan, with the set id its rows are stored under.
pub(crate) struct AssociatedSet {
    pub(crate) set_id: String,
    pub(crate) plan: Plan,
}

#[derive(Clone)]
enum Cached {
    Plan(Plan),
    Deleted(Deleted),
    Associated(Arc<AssociatedSet>),
    /// The members whose Patient did not exist (live, visible) at the transaction time.
    Missing(Arc<Vec<String>>),
}

struct Entry {
    key: [u8; 32],
    /// The transaction time the result was computed at (or last checked unchanged through).
    planned_at: Micros,
    value: Cached,
}

/// What the cache did, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlanCacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Associated sets reused (shared with an earlier export) and computed.
    pub associated_hits: u64,
    pub associated_misses: u64,
}

#[derive(Default)]
pub(crate) struct PlanCache {
    entries: Mutex<VecDeque<Entry>>,
    stats: Mutex<PlanCacheStats>,
    /// Recent members checks: `(tenant, digest of the members, transaction time, the members'
    /// latest change)`, so the plan, the associated set and the missing members of one kick-off
    /// read the watermarks once.
    checked: Mutex<VecDeque<MembersCheck>>,
    /// Recent tenant-wide bounds: `(tenant, transaction time, the tenant's latest patient
    /// change)`, read once per kick-off.
    tenant_checked: Mutex<VecDeque<(TenantId, Micros, Micros)>>,
    /// Group versions' member lists, parsed once each ([`crate::members::GroupMemo`]).
    pub(crate) groups: crate::members::GroupMemo,
}

/// Members checks remembered (one per kick-off planned at once is plenty).
const CHECKS: usize = 16;

/// A members check: `(tenant, members digest, transaction time, the members' latest change)`.
type MembersCheck = (TenantId, [u8; 32], Micros, Micros);

/// The cache key of a result: what it depends on besides the transaction time (the members by
/// their [`crate::Members::digest`]).
fn key_with(
    tenant: TenantId,
    members: &[u8; 32],
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
    field(members.as_slice());
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

/// False for the one compartment type whose rows raise no patient's `changed_at`: `Group`
/// (see the module documentation). Both stores' write paths ask this.
pub(crate) fn raises_member_watermarks(resource_type: &str) -> bool {
    resource_type != "Group"
}

/// True when a result over the compartment rows of `types` for `selection` may come from the
/// cache: a member-scoped selection of types whose rows raise the members' watermarks.
pub(crate) fn cacheable(selection: &MemberSelection, types: impl IntoIterator<Item: AsRef<str>>) -> bool {
    selection.scope == crate::SelectionScope::Members
        && types.into_iter().all(|resource_type| raises_member_watermarks(resource_type.as_ref()))
}

/// [`crate::Store::existing_at`] of Patients, through the cache: the ids of `ids` that exist at
/// `at`, in their order, from the ids that do not (remembered under the members' rule, with
/// `ids` as the members). `members_unchanged_since` is the store's members check, `compute` the
/// uncached call.
pub(crate) fn existing_patients(
    cache: &PlanCache,
    tenant: TenantId,
    visibility: &crate::Visibility,
    ids: &[String],
    at: Micros,
    members_unchanged_since: impl FnOnce(&MemberSelection, Micros) -> Result<bool, StoreError>,
    compute: impl FnOnce() -> Result<Vec<String>, StoreError>,
) -> Result<Vec<String>, StoreError> {
    let selection = MemberSelection {
        members: ids.iter().map(|id| (id.clone(), None)).collect(),
        since: None,
        until: None,
        transaction_time: at,
        visibility: visibility.clone(),
        scope: crate::SelectionScope::Members,
        filters: Default::default(),
    };
    let key = cache.key(tenant, &selection, "missing Patients", &[], 0);
    let missing = cache.missing(
        key,
        at,
        |planned_at| members_unchanged_since(&selection, planned_at),
        || {
            let existing: std::collections::HashSet<String> = compute()?.into_iter().collect();
            Ok(ids.iter().filter(|id| !existing.contains(*id)).cloned().collect())
        },
    )?;
    if missing.is_empty() {
        return Ok(ids.to_vec());
    }
    let missing: std::collections::HashSet<&String> = missing.iter().collect();
    Ok(ids.iter().filter(|id| !missing.contains(id)).cloned().collect())
}

/// [`crate::Store::missing_members`], through the cache: the members of `selection` whose
/// Patient did not exist (live, visible) at its transaction time, remembered under the members'
/// rule (every write of `Patient/p` raises `p`'s watermark). `members_unchanged_since` is the
/// store's members check, `existing` its uncached [`crate::Store::existing_at`] of Patients at
/// the transaction time. The member ids are copied out of the shared list only on a miss.
pub(crate) fn missing_members(
    cache: &PlanCache,
    tenant: TenantId,
    selection: &MemberSelection,
    members_unchanged_since: impl FnOnce(Micros) -> Result<bool, StoreError>,
    existing: impl FnOnce(&[String]) -> Result<Vec<String>, StoreError>,
) -> Result<Vec<String>, StoreError> {
    if selection.members.is_empty() {
        return Ok(Vec::new());
    }
    let key = cache.key(tenant, selection, "missing members", &[], 0);
    let missing = cache.missing(key, selection.transaction_time, members_unchanged_since, || {
        let ids: Vec<String> = selection.members.ids().map(str::to_owned).collect();
        let existing: std::collections::HashSet<String> = existing(&ids)?.into_iter().collect();
        Ok(ids.into_iter().filter(|id| !existing.contains(id)).collect())
    })?;
    Ok(missing.as_ref().clone())
}

/// True when a set for `request` can reach one of `changed` (types outside the compartment, or
/// Provenance, written since the set was computed): Provenance when it asks for Provenance, a
/// referenced type when it follows references to that type.
pub(crate) fn reaches_any(request: &AssociatedRequest, changed: &[String]) -> bool {
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
    changed.iter().any(|resource_type| reaches(resource_type))
}

impl PlanCache {
    /// The cache key of a result: what it depends on besides the transaction time: tenant,
    /// members with their `since`, `_since`, `_until`, visibility, `_typeFilter`s, `what`,
    /// types, part size.
    pub(crate) fn key(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        what: &str,
        types: &[String],
        part_size: u64,
    ) -> [u8; 32] {
        key_with(tenant, &selection.members.digest(), selection, what, types, part_size)
    }

    /// The cache key of an associated set: [`PlanCache::key`] plus what the request asks for
    /// (not its set id or expiry, which name where a computed result is stored).
    pub(crate) fn associated_key(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        request: &AssociatedRequest,
        part_size: u64,
    ) -> [u8; 32] {
        let what = format!(
            "associated {:?} {:?} {:?} {:?} {}",
            request.provenance,
            request.provenance_sources,
            request.referenced,
            request.reference_sources,
            request.depth
        );
        self.key(tenant, selection, &what, &[], part_size)
    }

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
            Cached::Missing(missing) => missing.len(),
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

    /// True when no member of `selection` has a compartment row changed after `planned_at`, as
    /// of the selection's transaction time T. `tenant_latest` is the store's upper bound of every
    /// patient's `changed_at` in the tenant (`Micros::MAX` when it keeps none), `latest_change`
    /// its query of the members' greatest `changed_at`; both run in a snapshot taken after T was
    /// reserved. When the tenant's bound is not above `planned_at`, no member changed and the
    /// members are not read (nor hashed). Each answer is remembered per T (the members' per
    /// (members, T)): every later check for T may use it (it covers every write up to T, and any
    /// it saw after T only makes the check stricter).
    pub(crate) fn members_unchanged_since(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        planned_at: Micros,
        tenant_latest: impl FnOnce() -> Result<Micros, StoreError>,
        latest_change: impl FnOnce() -> Result<Micros, StoreError>,
    ) -> Result<bool, StoreError> {
        let at = selection.transaction_time;
        let bounds = || self.tenant_checked.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let known = bounds().iter().find(|(held, checked_at, _)| *held == tenant && *checked_at == at).map(|c| c.2);
        let bound = match known {
            Some(bound) => bound,
            None => {
                let bound = tenant_latest()?;
                let mut bounds = bounds();
                bounds.push_back((tenant, at, bound));
                while bounds.len() > CHECKS {
                    bounds.pop_front();
                }
                bound
            }
        };
        if bound <= planned_at {
            return Ok(true);
        }
        let digest = selection.members.digest();
        let checked = || self.checked.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let known = checked()
            .iter()
            .find(|(held_tenant, held, checked_at, _)| *held_tenant == tenant && *held == digest && *checked_at == at)
            .map(|c| c.3);
        let latest = match known {
            Some(latest) => latest,
            None => {
                let latest = latest_change()?;
                let mut checked = checked();
                checked.push_back((tenant, digest, at, latest));
                while checked.len() > CHECKS {
                    checked.pop_front();
                }
                latest
            }
        };
        Ok(latest <= planned_at)
    }

    pub(crate) fn stats(&self) -> PlanCacheStats {
        *self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value under `key` if one computed at or before `at` is still exact (`still_valid` is
    /// asked with its transaction time), else `compute`'s, remembered as `entry` makes it (None:
    /// not remembered). `variant` picks the value out of an entry of its kind.
    fn reuse_or_compute<T>(
        &self,
        key: [u8; 32],
        at: Micros,
        still_valid: impl FnOnce(Micros) -> Result<bool, StoreError>,
        compute: impl FnOnce() -> Result<T, StoreError>,
        variant: fn(Cached) -> Option<Arc<T>>,
        entry: fn(&Arc<T>) -> Option<Cached>,
    ) -> Result<Arc<T>, StoreError> {
        if let Some((planned_at, value)) = self.get(&key, at) {
            if let Some(value) = variant(value) {
                if still_valid(planned_at)? {
                    self.count(true);
                    return Ok(value);
                }
            }
        }
        self.count(false);
        let value = Arc::new(compute()?);
        if let Some(remembered) = entry(&value) {
            self.put(key, at, remembered);
        }
        Ok(value)
    }

    /// The plan under `key` if one computed at or before `at` is still exact (`still_valid` is
    /// asked with its transaction time), else `compute`'s, remembered.
    pub(crate) fn plan(
        &self,
        key: [u8; 32],
        at: Micros,
        still_valid: impl FnOnce(Micros) -> Result<bool, StoreError>,
        compute: impl FnOnce() -> Result<Vec<(String, Vec<PartRange>)>, StoreError>,
    ) -> Result<Plan, StoreError> {
        let variant = |value| if let Cached::Plan(plan) = value { Some(plan) } else { None };
        self.reuse_or_compute(key, at, still_valid, compute, variant, |plan| Some(Cached::Plan(plan.clone())))
    }

    /// As [`PlanCache::plan`], for a `deleted[]` list (long lists are not remembered).
    pub(crate) fn deleted(
        &self,
        key: [u8; 32],
        at: Micros,
        still_valid: impl FnOnce(Micros) -> Result<bool, StoreError>,
        compute: impl FnOnce() -> Result<Vec<(String, Micros)>, StoreError>,
    ) -> Result<Deleted, StoreError> {
        let variant = |value| if let Cached::Deleted(deleted) = value { Some(deleted) } else { None };
        let entry = |deleted: &Deleted| (deleted.len() <= MAX_CACHED_DELETED).then(|| Cached::Deleted(deleted.clone()));
        self.reuse_or_compute(key, at, still_valid, compute, variant, entry)
    }

    /// As [`PlanCache::plan`], for the ids among a member list whose Patient did not exist at the
    /// transaction time (long lists are not remembered). A Patient is in its own compartment, so
    /// every write of `Patient/p` raises `p`'s watermark: the members' rule covers it.
    pub(crate) fn missing(
        &self,
        key: [u8; 32],
        at: Micros,
        still_valid: impl FnOnce(Micros) -> Result<bool, StoreError>,
        compute: impl FnOnce() -> Result<Vec<String>, StoreError>,
    ) -> Result<Arc<Vec<String>>, StoreError> {
        let variant = |value| if let Cached::Missing(missing) = value { Some(missing) } else { None };
        let entry = |missing: &Arc<Vec<String>>| {
            (missing.len() <= MAX_CACHED_DELETED).then(|| Cached::Missing(missing.clone()))
        };
        self.reuse_or_compute(key, at, still_valid, compute, variant, entry)
    }

    /// The associated set under `key`, as `(set id, plan)`: when one computed at or before `at`
    /// is still exact (`still_valid` is asked with its transaction time) and `share` could keep
    /// its stored rows for this export too (extending their expiry; false: they were swept),
    /// that one, under its own set id; else `compute`'s, which stores its rows under `new_set_id`
    /// itself.
    pub(crate) fn associated(
        &self,
        key: [u8; 32],
        at: Micros,
        new_set_id: &str,
        still_valid: impl FnOnce(Micros) -> Result<bool, StoreError>,
        share: impl FnOnce(&str) -> Result<bool, StoreError>,
        compute: impl FnOnce() -> Result<Vec<(String, Vec<PartRange>)>, StoreError>,
    ) -> Result<(String, Plan), StoreError> {
        if let Some((planned_at, Cached::Associated(set))) = self.get(&key, at) {
            if still_valid(planned_at)? && share(&set.set_id)? {
                self.count_associated(true);
                // Checked unchanged through `at`: the set is the set at `at` too.
                self.put(key, at, Cached::Associated(set.clone()));
                return Ok((set.set_id.clone(), set.plan.clone()));
            }
        }
        self.count_associated(false);
        let plan = Arc::new(compute()?);
        let computed = AssociatedSet { set_id: new_set_id.to_owned(), plan: plan.clone() };
        self.put(key, at, Cached::Associated(Arc::new(computed)));
        Ok((new_set_id.to_owned(), plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A selection of `members` at `at`, as a Group kick-off makes it.
    fn members_selection(members: crate::Members, at: Micros) -> MemberSelection {
        MemberSelection {
            members,
            since: None,
            until: None,
            transaction_time: at,
            visibility: crate::Visibility::Tenant,
            scope: crate::SelectionScope::Members,
            filters: Default::default(),
        }
    }

    fn request(provenance: ProvenanceSelection, referenced: ReferencedTypes, depth: u32) -> AssociatedRequest {
        AssociatedRequest {
            set_id: "s".into(),
            expires: 0,
            provenance,
            provenance_sources: Vec::new(),
            referenced,
            reference_sources: Vec::new(),
            depth,
        }
    }

    #[test]
    fn a_set_reaches_only_the_types_it_can_contain() {
        let changed = |types: &[&str]| types.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let all = request(ProvenanceSelection::Relevant, ReferencedTypes::All, 3);
        assert!(reaches_any(&all, &changed(&["Provenance"])));
        assert!(reaches_any(&all, &changed(&["Organization"])));
        assert!(!reaches_any(&all, &changed(&[])));
        let no_provenance = request(ProvenanceSelection::None, ReferencedTypes::All, 3);
        assert!(!reaches_any(&no_provenance, &changed(&["Provenance"])));
        assert!(reaches_any(&no_provenance, &changed(&["Provenance", "Practitioner"])));
        let only = request(ProvenanceSelection::None, ReferencedTypes::Only(vec!["Practitioner".into()]), 3);
        assert!(!reaches_any(&only, &changed(&["Organization"])));
        assert!(reaches_any(&only, &changed(&["Practitioner"])));
        let shallow = request(ProvenanceSelection::None, ReferencedTypes::All, 0);
        assert!(!reaches_any(&shallow, &changed(&["Organization"])));
    }

    /// One watermark query per (members, transaction time), answering for any earlier plan time;
    /// other members or another time query again.
    #[test]
    fn a_members_check_is_read_once_per_kick_off() {
        let cache = PlanCache::default();
        let selection =
            |members: &[&str], at| members_selection(members.iter().map(|id| (id.to_string(), None)).collect(), at);
        let queries = std::cell::Cell::new(0);
        let latest = |value| {
            queries.set(queries.get() + 1);
            Ok(value)
        };
        let check = |members: &[&str], at, planned_at, value| {
            let no_bound = || Ok(Micros::MAX);
            cache
                .members_unchanged_since(TenantId(1), &selection(members, at), planned_at, no_bound, || latest(value))
                .unwrap()
        };
        assert!(check(&["a", "b"], 100, 50, 40));
        assert!(!check(&["a", "b"], 100, 30, 99), "remembered: 40 > 30");
        assert!(check(&["a", "b"], 100, 40, 99));
        assert_eq!(queries.get(), 1);
        assert!(!check(&["a", "b"], 200, 50, 150), "another time reads again");
        assert!(check(&["a"], 200, 50, 10), "other members read again");
        assert_eq!(queries.get(), 3);
    }

    /// The tenant's bound short-cuts the members' check when it is not above the plan's time
    /// (read once per transaction time); above it, the members' own watermarks decide.
    #[test]
    fn a_tenant_bound_skips_the_members_check_only_when_nothing_changed() {
        let cache = PlanCache::default();
        let selection = |at| members_selection(vec![("a".to_owned(), None)].into(), at);
        let (bounds, members) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let check = |at, planned_at, bound, latest| {
            let tenant_latest = || {
                bounds.set(bounds.get() + 1);
                Ok(bound)
            };
            let latest_change = || {
                members.set(members.get() + 1);
                Ok(latest)
            };
            cache
                .members_unchanged_since(TenantId(1), &selection(at), planned_at, tenant_latest, latest_change)
                .unwrap()
        };
        assert!(check(100, 50, 50, 99), "nothing in the tenant changed after 50: the members are not read");
        assert_eq!((bounds.get(), members.get()), (1, 0));
        assert!(check(100, 60, 99, 99), "the bound read at 100 is remembered");
        assert_eq!((bounds.get(), members.get()), (1, 0));
        assert!(check(200, 50, 150, 40), "another patient changed: the members' own watermark decides");
        assert!(!check(300, 50, 150, 60), "a member changed after the plan");
        assert_eq!((bounds.get(), members.get()), (3, 2));
    }

    /// Keys share a members digest only between equal lists: one changed id or `since` in a large
    /// list, or another tenant, gives another key. A shared list is hashed once, however many
    /// keys its selection makes.
    #[test]
    fn keys_share_a_members_digest_only_between_equal_lists() {
        let cache = PlanCache::default();
        let selection = |members: crate::Members| members_selection(members, 1);
        let large: Vec<(String, Option<Micros>)> = (0..2_000).map(|i| (format!("p{i:05}"), None)).collect();
        let key = |members: &Vec<(String, Option<Micros>)>, tenant| {
            cache.key(TenantId(tenant), &selection(members.clone().into()), "parts", &[], 10)
        };
        let first = key(&large, 1);
        assert_eq!(key(&large, 1), first, "an equal list, another copy");
        let shared = selection(large.clone().into());
        assert_eq!(cache.key(TenantId(1), &shared, "parts", &[], 10), first);
        assert!(shared.members.clone().hashed(), "hashed once, for every clone");
        let digest = crate::members::digest_members(&large);
        assert_eq!(first, key_with(TenantId(1), &digest, &shared, "parts", &[], 10));
        let mut other_id = large.clone();
        other_id[1_000].0 = "q01000".to_owned();
        let mut other_since = large.clone();
        other_since[1_999].1 = Some(5);
        for changed in [&other_id, &other_since] {
            assert_ne!(key(changed, 1), first);
        }
        assert_ne!(key(&large, 2), first, "another tenant");
        let small: Vec<(String, Option<Micros>)> = large[..10].to_vec();
        let mut small_changed = small.clone();
        small_changed[3].0 = "x".to_owned();
        assert_ne!(key(&small, 1), key(&small_changed, 1));
    }

    /// A reused set keeps its own set id (its rows are shared, not copied); a swept one (share
    /// answers false) or a changed one is computed again under the new id.
    #[test]
    fn a_reused_set_is_shared_under_its_own_id() {
        let cache = PlanCache::default();
        let key = [7u8; 32];
        let part = PartRange { first_key: 1, last_key: 1, count: 1 };
        let compute = || Ok(vec![("Practitioner".to_owned(), vec![part])]);
        let (first, _) = cache.associated(key, 10, "a", |_| Ok(true), |_| Ok(true), compute).unwrap();
        assert_eq!(first, "a");
        let mut shared = Vec::new();
        let share = |id: &str| {
            shared.push(id.to_owned());
            Ok(true)
        };
        let (second, plan) = cache.associated(key, 20, "b", |at| Ok(at == 10), share, compute).unwrap();
        assert_eq!((second.as_str(), plan.len()), ("a", 1));
        assert_eq!(shared, ["a"]);
        let (third, _) = cache.associated(key, 30, "c", |at| Ok(at == 20), |_| Ok(false), compute).unwrap();
        assert_eq!(third, "c", "swept: computed again under the new id");
        let (fourth, _) = cache.associated(key, 40, "d", |_| Ok(false), |_| Ok(true), compute).unwrap();
        assert_eq!(fourth, "d", "changed: computed again");
        let (earlier, _) = cache.associated(key, 35, "e", |_| Ok(true), |_| Ok(true), compute).unwrap();
        assert_eq!(earlier, "e", "an entry from after the transaction time is never used");
        let stats = cache.stats();
        assert_eq!((stats.associated_hits, stats.associated_misses), (1, 4));
    }
}
