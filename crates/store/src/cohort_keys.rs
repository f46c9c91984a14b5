//! A cohort's keys: a byte per key of each type, marking every resource the members' compartment
//! rows reach at the transaction time with what planning an export needs of it. Each store reads
//! the rows its own way (`sqlite/cohort.rs`, `postgres/cohort.rs`) and marks them here, once per
//! row; planning then visits the marked keys in key order instead of joining the members again
//! in every key window (see the stores' `select_window`).
//!
//! Exact as the windowed reads are: a resource's rows valid at the transaction time describe
//! the same version unless one of them is historical (then history decides, as there); and what
//! the rows of one resource decide is an OR over its rows. Which members reach a resource
//! ([`Reach`]) is two bits, because the members' `since` takes at most one value besides none
//! (a Group export with `_since`: members then and members added since); other selections are
//! not covered and take the windowed reads.

use bulkhead_fhir::{resource_type_code, Micros};

use crate::selection::{selected, Reach, VersionAt};
use crate::{MemberSelection, SelectionScope, StoreError, TenantId};

/// Reached through a member without `since` (full history).
pub(crate) const FULL: u8 = 1;
/// Reached through a member with the selection's `since`.
pub(crate) const EXISTING: u8 = 2;
/// A row of the resource describes a version other than the one at the transaction time
/// (written since, or closed): history decides, and the version bits below mean nothing.
const HISTORICAL: u8 = 4;
/// The version at the transaction time is not deleted and visible to the caller.
const LIVE: u8 = 8;
/// [`selected`] with a full-history reach.
const SELECTED_FULL: u8 = 16;
/// [`selected`] with the existing members' reach.
const SELECTED_EXISTING: u8 = 32;

/// One resource the cohort reaches, with its version at the transaction time as the selection
/// rules need it.
pub(crate) struct CohortResource {
    pub(crate) rid: i64,
    pub(crate) reach: Reach,
    /// Not deleted and visible.
    pub(crate) live: bool,
    /// [`selected`] (before `_typeFilter`).
    pub(crate) selected: bool,
    /// The history version holding that version's body; 0 when it was the current row then.
    pub(crate) history_version: i64,
}

/// One compartment row of a member, valid at the transaction time, as a store read it.
pub(crate) struct CohortRow {
    pub(crate) type_code: i64,
    pub(crate) rid: i64,
    pub(crate) last_updated: Micros,
    /// The member's reach: [`FULL`] and/or [`EXISTING`].
    pub(crate) reach: u8,
    pub(crate) deleted: bool,
    /// Closed (at a time after the transaction time).
    pub(crate) closed: bool,
    /// Its owner is the selection's user.
    pub(crate) owned: bool,
}

/// The flags of one type's keys `first..first + flags.len()`.
struct TypeKeys {
    first: i64,
    flags: Vec<u8>,
}

/// The cohort's resources of the covered types.
pub(crate) struct CohortKeys {
    /// By type code.
    types: Vec<Option<TypeKeys>>,
    /// The `since` of the members that have one.
    since: Option<Micros>,
    /// The types asked for (covered, or without resources, or past the budget).
    asked: Vec<String>,
}

impl CohortKeys {
    /// No key yet, for `resource_types`; None when the selection is not covered (a system-level
    /// export, or members with several `since`).
    pub(crate) fn new(selection: &MemberSelection, resource_types: &[&str]) -> Option<CohortKeys> {
        if selection.scope != SelectionScope::Members {
            return None;
        }
        let since = members_since(selection).ok()?;
        Some(CohortKeys { types: Vec::new(), since, asked: resource_types.iter().map(|t| (*t).to_owned()).collect() })
    }

    /// Covers the keys `first..=last` of the type `code`.
    pub(crate) fn cover(&mut self, code: i64, (first, last): (i64, i64)) {
        let index = code as usize;
        if self.types.len() <= index {
            self.types.resize_with(index + 1, || None);
        }
        self.types[index] = Some(TypeKeys { first, flags: vec![0; (last - first + 1) as usize] });
    }

    /// Marks one row of a member (rows of types not covered, or outside the type's keys, which
    /// were not valid at the transaction time, are ignored).
    #[inline]
    pub(crate) fn mark(&mut self, selection: &MemberSelection, row: CohortRow) {
        let Some(Some(keys)) = usize::try_from(row.type_code).ok().and_then(|code| self.types.get_mut(code)) else {
            return;
        };
        let Some(flags) = usize::try_from(row.rid - keys.first).ok().and_then(|offset| keys.flags.get_mut(offset))
        else {
            return;
        };
        let mut flag = row.reach;
        // A closed row describes a version that has since been replaced.
        if row.last_updated > selection.transaction_time || row.closed {
            flag |= HISTORICAL;
        } else {
            let version = VersionAt {
                last_updated: row.last_updated,
                deleted: row.deleted,
                visible: selection.visibility.user().is_none() || row.owned,
            };
            if !version.deleted && version.visible {
                flag |= LIVE;
            }
            if selected(selection, Reach { full_history: true, existing_since: None }, &version) {
                flag |= SELECTED_FULL;
            }
            let existing = Reach { full_history: false, existing_since: self.since };
            if self.since.is_some() && selected(selection, existing, &version) {
                flag |= SELECTED_EXISTING;
            }
        }
        *flags |= flag;
    }

    /// Adds what another read of the same types found (every flag is an OR over rows).
    pub(crate) fn absorb(&mut self, other: CohortKeys) {
        for (held, found) in self.types.iter_mut().zip(other.types) {
            if let (Some(held), Some(found)) = (held.as_mut(), found) {
                for (held, found) in held.flags.iter_mut().zip(found.flags) {
                    *held |= found;
                }
            }
        }
    }

    /// Whether `resource_type`'s keys were read.
    pub(crate) fn covers(&self, resource_type: &str) -> bool {
        self.keys(resource_type).is_some()
    }

    fn keys(&self, resource_type: &str) -> Option<&TypeKeys> {
        let code = resource_type_code(resource_type)?;
        self.types.get(usize::try_from(code).ok()?)?.as_ref()
    }

    /// Visits, in key order, every resource of `resource_type` (a covered type) with a key in
    /// `[start, end]` that the cohort reached at the transaction time and that existed then,
    /// resolving the versions replaced since with `history` (the history version holding the
    /// version at the transaction time, and that version; None: created after it), as the
    /// windowed reads do. `context` is lent to both callbacks in turn.
    pub(crate) fn visit<C>(
        &self,
        context: &mut C,
        selection: &MemberSelection,
        resource_type: &str,
        (start, end): (i64, i64),
        mut history: impl FnMut(&mut C, i64) -> Result<Option<(i64, VersionAt)>, StoreError>,
        mut visit: impl FnMut(&mut C, CohortResource) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let Some(keys) = self.keys(resource_type) else { return Ok(()) };
        let last = keys.first + keys.flags.len() as i64 - 1;
        let (start, end) = (start.max(keys.first), end.min(last));
        if start > end {
            return Ok(());
        }
        let window = &keys.flags[(start - keys.first) as usize..=(end - keys.first) as usize];
        for (offset, &flag) in window.iter().enumerate() {
            if flag == 0 {
                continue;
            }
            let rid = start + offset as i64;
            let reach = Reach {
                full_history: flag & FULL != 0,
                existing_since: if flag & EXISTING != 0 { self.since } else { None },
            };
            let resource = if flag & HISTORICAL == 0 {
                let selected = if reach.full_history { flag & SELECTED_FULL } else { flag & SELECTED_EXISTING };
                CohortResource { rid, reach, live: flag & LIVE != 0, selected: selected != 0, history_version: 0 }
            } else {
                let Some((history_version, version)) = history(context, rid)? else {
                    continue; // created after the transaction time
                };
                CohortResource {
                    rid,
                    reach,
                    live: !version.deleted && version.visible,
                    selected: selected(selection, reach, &version),
                    history_version,
                }
            };
            visit(context, resource)?;
        }
        Ok(())
    }
}

/// The single `since` of the members that have one; `Err` when they have several.
fn members_since(selection: &MemberSelection) -> Result<Option<Micros>, ()> {
    let mut since = None;
    for (_, member_since) in &selection.members {
        match (since, member_since) {
            (_, None) => {}
            (None, Some(value)) => since = Some(*value),
            (Some(held), Some(value)) if held == *value => {}
            (Some(_), Some(_)) => return Err(()),
        }
    }
    Ok(since)
}

/// What cohort keys were read for: equal keys, equal flags (`_typeFilter` is applied after).
#[derive(PartialEq)]
pub(crate) struct StashKey {
    tenant: TenantId,
    members: [u8; 32],
    transaction_time: Micros,
    since: Option<Micros>,
    until: Option<Micros>,
    visibility: crate::Visibility,
}

impl StashKey {
    pub(crate) fn of(tenant: TenantId, selection: &MemberSelection) -> StashKey {
        StashKey {
            tenant,
            members: selection.members.digest(),
            transaction_time: selection.transaction_time,
            since: selection.since,
            until: selection.until,
            visibility: selection.visibility.clone(),
        }
    }
}

/// The cohort keys an export's count pass read, kept for its associated-data pass, which
/// follows at once and needs the same keys: one read of the members' rows instead of two. One
/// export's keys at a time (at most a store's key budget in bytes), handed out once.
#[derive(Default)]
pub(crate) struct CohortStash(std::sync::Mutex<Option<(StashKey, CohortKeys)>>);

impl CohortStash {
    pub(crate) fn put(&self, key: StashKey, keys: CohortKeys) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((key, keys));
    }

    /// The keys kept for `key` when they were read for every one of `resource_types`.
    pub(crate) fn take(&self, key: &StashKey, resource_types: &[&str]) -> Option<CohortKeys> {
        let mut held = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let fits = held.as_ref().is_some_and(|(held_key, keys)| {
            held_key == key && resource_types.iter().all(|asked| keys.asked.iter().any(|held| held == asked))
        });
        if !fits {
            return None;
        }
        held.take().map(|(_, keys)| keys)
    }
}
