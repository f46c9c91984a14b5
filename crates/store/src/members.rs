//! Member lists shared across a kick-off and across kick-offs.
//!
//! A Group export's members are read at every step of its plan (the view, the plan cache's keys
//! and members check, the associated set, the missing members) and again at every file download.
//! A [`Members`] list is shared by reference count, and its digest (the plan cache's key of the
//! members) is hashed once per list; a Group version's list is parsed once per store
//! ([`GroupMemo`]), so a repeated kick-off of an unchanged Group neither reads the Group's text
//! nor copies or hashes its member list.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use bulkhead_fhir::Micros;

use crate::{StoreError, StoredResource, TenantId};

/// `(patient id, since)` pairs, sorted by patient id, without duplicates (the members of a
/// [`crate::MemberSelection`]). Cloning shares the list; [`Members::digest`] is hashed once.
#[derive(Clone, Default)]
pub struct Members(Arc<Shared>);

#[derive(Default)]
struct Shared {
    list: Vec<(String, Option<Micros>)>,
    digest: OnceLock<[u8; 32]>,
}

impl Members {
    /// SHA-256 of the list, each member with its `since`: equal digests mean equal lists.
    /// Hashed on first use, then shared by every clone.
    pub fn digest(&self) -> [u8; 32] {
        *self.0.digest.get_or_init(|| digest_members(&self.0.list))
    }

    /// Whether `patient` is a member (a binary search: the list is sorted).
    pub fn contains(&self, patient: &str) -> bool {
        self.position(patient).is_some()
    }

    /// The index of `patient` in the list.
    pub fn position(&self, patient: &str) -> Option<usize> {
        self.0.list.binary_search_by(|(member, _)| member.as_str().cmp(patient)).ok()
    }

    /// The patient ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.list.iter().map(|(patient, _)| patient.as_str())
    }

    /// Whether the digest has been hashed (for tests).
    #[cfg(test)]
    pub(crate) fn hashed(&self) -> bool {
        self.0.digest.get().is_some()
    }

    /// Whether both are the same shared list (a pointer comparison).
    pub fn shares(&self, other: &Members) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl From<Vec<(String, Option<Micros>)>> for Members {
    /// The list as given: the caller keeps it sorted by patient id, without duplicates.
    fn from(list: Vec<(String, Option<Micros>)>) -> Members {
        Members(Arc::new(Shared { list, digest: OnceLock::new() }))
    }
}

impl FromIterator<(String, Option<Micros>)> for Members {
    fn from_iter<I: IntoIterator<Item = (String, Option<Micros>)>>(members: I) -> Members {
        Members::from(members.into_iter().collect::<Vec<_>>())
    }
}

impl std::ops::Deref for Members {
    type Target = [(String, Option<Micros>)];

    fn deref(&self) -> &Self::Target {
        &self.0.list
    }
}

impl<'a> IntoIterator for &'a Members {
    type Item = &'a (String, Option<Micros>);
    type IntoIter = std::slice::Iter<'a, (String, Option<Micros>)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.list.iter()
    }
}

impl PartialEq for Members {
    fn eq(&self, other: &Members) -> bool {
        self.shares(other) || self.0.list == other.0.list
    }
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.list.iter()).finish()
    }
}

/// SHA-256 of a member list, each member with its `since`: equal digests mean equal lists.
pub(crate) fn digest_members(members: &[(String, Option<Micros>)]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update((members.len() as u64).to_le_bytes());
    for (patient, since) in members {
        hasher.update((patient.len() as u64).to_le_bytes());
        hasher.update(patient.as_bytes());
        match since {
            Some(since) => {
                hasher.update([1u8]);
                hasher.update(since.to_le_bytes());
            }
            None => hasher.update([0u8]),
        }
    }
    hasher.finalize().into()
}

/// The Patient members one Group version lists (see [`crate::group_members`]), before the time
/// filter: [`GroupMembers::at`] applies it.
#[derive(Debug, Default)]
pub struct GroupMembers {
    /// Without a member `period.end`: the members at any time, deduplicated, each with no
    /// `since` (shared by every kick-off of the version).
    untimed: Option<Members>,
    /// With one: `(id, end)` sorted, as listed (duplicates kept: each has its own end).
    timed: Vec<(String, Option<Micros>)>,
}

impl GroupMembers {
    /// The members a Group's text lists, with the end of each one's `period` (None: no end, or
    /// one that does not parse), sorted; inactive members and non-Patient entities are left out.
    pub(crate) fn from_listed(listed: Vec<(String, Option<Micros>)>) -> GroupMembers {
        if listed.iter().any(|(_, end)| end.is_some()) {
            return GroupMembers { untimed: None, timed: listed };
        }
        let mut members = listed;
        members.dedup();
        GroupMembers { untimed: Some(Members::from(members)), timed: Vec::new() }
    }

    /// The members at `at` (those whose `period.end` is not at or before it), sorted,
    /// deduplicated, each with no `since`. A Group without member ends answers every time with
    /// the same shared list.
    pub fn at(&self, at: Micros) -> Members {
        if let Some(members) = &self.untimed {
            return members.clone();
        }
        let mut members: Vec<(String, Option<Micros>)> = self
            .timed
            .iter()
            .filter(|(_, end)| end.is_none_or(|end| end > at))
            .map(|(id, _)| (id.clone(), None))
            .collect();
        members.dedup();
        Members::from(members)
    }

    /// How many entries are held (for the memo's budget).
    fn held(&self) -> usize {
        self.untimed.as_ref().map_or(self.timed.len(), |members| members.len())
    }
}

/// A Group as of a time, for an export ([`crate::Store::group_at`]).
#[derive(Debug, Clone)]
pub struct GroupAt {
    /// Its version then: possibly a tombstone (`deleted`); `body` is always None (a large
    /// Group's text is not read for this).
    pub version: StoredResource,
    /// The Patient members that version lists (none for a tombstone).
    pub members: Arc<GroupMembers>,
}

/// Group versions whose member lists are remembered (the most recently used), and the members
/// they may hold together (a few MB of ids; the newest list is kept whatever its size).
const GROUPS: usize = 8;
const REMEMBERED_MEMBERS: usize = 200_000;

/// A version's identity in the memo: `(tenant, Group id, version, lastUpdated)`. A stored
/// version never changes (history is append-only; pruning removes versions, never rewrites
/// them), and `lastUpdated` is a timestamp the store hands out once (unique and ordered, see the
/// `clock` table), so a tenant or Group deleted and created again cannot produce a colliding key.
type VersionKey = (TenantId, String, i64, Micros);

/// One store's memo of Group versions' member lists (each store keeps its own: versions are only
/// unique within a store).
#[derive(Default)]
pub(crate) struct GroupMemo {
    entries: Mutex<VecDeque<(VersionKey, Arc<GroupMembers>)>>,
}

impl GroupMemo {
    /// The Group as of its `version` (a version without body, found by the store): its members
    /// from the memo, else parsed from `body()` (the version's text, read only then) and
    /// remembered.
    pub(crate) fn group_at(
        &self,
        tenant: TenantId,
        version: StoredResource,
        body: impl FnOnce() -> Result<Option<String>, StoreError>,
    ) -> Result<GroupAt, StoreError> {
        if version.deleted {
            return Ok(GroupAt { version, members: Arc::default() });
        }
        let key: VersionKey = (tenant, version.id.clone(), version.version, version.last_updated);
        let entries = || self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let found = {
            let mut entries = entries();
            let found = entries.iter().position(|(held, _)| *held == key);
            // The most recently used goes last, so the oldest goes first.
            found.and_then(|index| entries.remove(index)).inspect(|entry| entries.push_back(entry.clone()))
        };
        if let Some((_, members)) = found {
            return Ok(GroupAt { version, members });
        }
        let text = body()?.unwrap_or_default();
        let listed = crate::write::member_list(if text.is_empty() { "{}" } else { &text })
            .map_err(|error| StoreError::Invalid(format!("Group.member: {error}")))?;
        let members = Arc::new(GroupMembers::from_listed(listed));
        let mut entries = entries();
        entries.retain(|(held, _)| *held != key);
        entries.push_back((key, members.clone()));
        while entries.len() > 1
            && (entries.len() > GROUPS
                || entries.iter().map(|(_, list)| list.held()).sum::<usize>() > REMEMBERED_MEMBERS)
        {
            entries.pop_front();
        }
        Ok(GroupAt { version, members })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: &str, version: i64, last_updated: Micros) -> StoredResource {
        StoredResource {
            resource_type: "Group".into(),
            id: id.into(),
            version,
            last_updated,
            deleted: false,
            owner: None,
            body: None,
        }
    }

    fn group(members: &[(&str, Option<&str>)]) -> String {
        let member: Vec<serde_json::Value> = members
            .iter()
            .map(|(id, end)| match end {
                Some(end) => {
                    serde_json::json!({"entity": {"reference": format!("Patient/{id}")}, "period": {"end": end}})
                }
                None => serde_json::json!({"entity": {"reference": format!("Patient/{id}")}}),
            })
            .collect();
        serde_json::json!({"resourceType": "Group", "member": member}).to_string()
    }

    /// A version's text is read once; later kick-offs share its list. Another version, Group or
    /// tenant is read afresh.
    #[test]
    fn a_version_is_parsed_once_and_its_list_shared() {
        let memo = GroupMemo::default();
        let reads = std::cell::Cell::new(0);
        let body = |text: String| {
            reads.set(reads.get() + 1);
            Ok(Some(text))
        };
        let first =
            memo.group_at(TenantId(1), version("g", 1, 10), || body(group(&[("b", None), ("a", None)]))).unwrap();
        let again = memo.group_at(TenantId(1), version("g", 1, 10), || body(group(&[("x", None)]))).unwrap();
        assert_eq!(reads.get(), 1);
        assert!(first.members.at(20).shares(&again.members.at(30)), "one shared list at every time");
        assert_eq!(first.members.at(20).ids().collect::<Vec<_>>(), ["a", "b"]);
        let digest = first.members.at(20).digest();
        assert_eq!(digest, digest_members(&again.members.at(40)));
        for (tenant, id, number, at) in [(1, "g", 2, 11), (1, "h", 1, 10), (2, "g", 1, 10), (1, "g", 1, 12)] {
            let other =
                memo.group_at(TenantId(tenant), version(id, number, at), || body(group(&[("c", None)]))).unwrap();
            assert_eq!(other.members.at(20).ids().collect::<Vec<_>>(), ["c"]);
        }
        assert_eq!(reads.get(), 5);
    }

    /// Member ends apply at the time asked; a member listed twice counts once.
    #[test]
    fn member_ends_apply_at_each_time() {
        let memo = GroupMemo::default();
        let text = group(&[("a", Some("2020-01-01")), ("b", None), ("b", None), ("c", Some("2030-01-01"))]);
        let group = memo.group_at(TenantId(1), version("g", 1, 10), || Ok(Some(text))).unwrap();
        let at = |time: &str| {
            let micros = bulkhead_fhir::parse_range(time).unwrap().start;
            group.members.at(micros).ids().map(str::to_owned).collect::<Vec<_>>()
        };
        assert_eq!(at("2019-06-01T00:00:00Z"), ["a", "b", "c"]);
        assert_eq!(at("2025-06-01T00:00:00Z"), ["b", "c"]);
        assert_eq!(at("2031-06-01T00:00:00Z"), ["b"]);
        let deduplicated = GroupMembers::from_listed(vec![("a".into(), None), ("a".into(), None)]);
        assert_eq!(deduplicated.at(0).len(), 1);
    }

    /// A tombstone has no members, and its text is not read.
    #[test]
    fn a_tombstone_has_no_members() {
        let memo = GroupMemo::default();
        let deleted = StoredResource { deleted: true, ..version("g", 2, 20) };
        let group = memo.group_at(TenantId(1), deleted, || panic!("a tombstone has no text")).unwrap();
        assert!(group.members.at(30).is_empty());
    }

    /// The memo keeps the most recently used versions within its budget.
    #[test]
    fn the_memo_keeps_the_most_recently_used() {
        let memo = GroupMemo::default();
        let reads = std::cell::Cell::new(0);
        let read = |number: i64| {
            let body = || {
                reads.set(reads.get() + 1);
                Ok(Some(group(&[("a", None)])))
            };
            memo.group_at(TenantId(1), version("g", number, number), body).unwrap();
        };
        read(0);
        for number in 1..(GROUPS as i64 + 4) {
            read(number);
            read(0);
        }
        assert_eq!(memo.entries.lock().unwrap().len(), GROUPS);
        assert_eq!(reads.get(), GROUPS + 4, "version 0, used all along, was never read again");
        read(1);
        assert_eq!(reads.get(), GROUPS + 5, "version 1 went first");
    }
}
