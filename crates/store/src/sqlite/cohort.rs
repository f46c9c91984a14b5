//! The members' compartment rows at the transaction time, read in one pass over the members (one
//! seek per member, all types at once) into a byte per key of each type: what planning an
//! export needs of every resource the cohort reaches.
//!
//! The windowed reads of [`super::export::select_window`] seek once per member in every key
//! window of every type; at 10,000 members the members' index leaves do not fit a reader's page
//! cache, so each window read them all again (session 8: 58 % of a first manifest's time). Here
//! each leaf is read once, and a key costs one byte instead of a 32-byte candidate, so a type's
//! whole key range is held at once within [`KEY_BUDGET`].
//!
//! Exact as the windowed reads are: a resource's rows valid at the transaction time describe
//! the same version unless one of them is historical (then history decides, as there); and what
//! the rows of one resource decide is an OR over its rows. Which members reach a resource
//! ([`Reach`]) is two bits, because the members' `since` takes at most one value besides none
//! (a Group export with `_since`: members then and members added since); other selections are
//! not covered and take the windowed reads.

use bulkhead_fhir::{resource_type_code, Micros};
use rusqlite::{params, Connection};

use super::export::{load_members, type_span, version_in_history};
use super::SqliteStore;
use crate::selection::{selected, Reach, VersionAt};
use crate::{MemberSelection, SelectionScope, StoreError, TenantId};

/// Keys (bytes) one reader's flags may cover, over all types: types past it take the windowed
/// reads.
const KEY_BUDGET: i64 = if cfg!(test) { 1 << 10 } else { 4 << 20 };

/// Reached through a member without `since` (full history).
const FULL: u8 = 1;
/// Reached through a member with the selection's `since`.
const EXISTING: u8 = 2;
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
pub(super) struct CohortResource {
    pub(super) rid: i64,
    pub(super) reach: Reach,
    /// Not deleted and visible.
    pub(super) live: bool,
    /// [`selected`] (before `_typeFilter`).
    pub(super) selected: bool,
    /// The history version holding that version's body; 0 when it was the current row then.
    pub(super) history_version: i64,
}

/// The flags of one type's keys `first..first + flags.len()`.
struct TypeKeys {
    first: i64,
    flags: Vec<u8>,
}

/// The cohort's resources of the covered types.
pub(super) struct CohortKeys {
    /// By type code.
    types: Vec<Option<TypeKeys>>,
    /// The `since` of the members that have one.
    since: Option<Micros>,
    /// The types asked for (covered, or without resources, or past the budget).
    asked: Vec<String>,
}

/// What cohort keys were read for: equal keys, equal flags (`_typeFilter` is applied after).
#[derive(PartialEq)]
pub(super) struct StashKey {
    tenant: TenantId,
    members: [u8; 32],
    transaction_time: Micros,
    since: Option<Micros>,
    until: Option<Micros>,
    visibility: crate::Visibility,
}

impl StashKey {
    pub(super) fn of(tenant: TenantId, selection: &MemberSelection) -> StashKey {
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
/// follows at once and needs the same keys: one pass over the members instead of two. One
/// export's keys at a time (at most [`KEY_BUDGET`] bytes), handed out once.
#[derive(Default)]
pub(super) struct CohortStash(std::sync::Mutex<Option<(StashKey, CohortKeys)>>);

impl CohortStash {
    pub(super) fn put(&self, key: StashKey, keys: CohortKeys) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((key, keys));
    }

    /// The keys kept for `key` when they were read for every one of `resource_types`.
    pub(super) fn take(&self, key: &StashKey, resource_types: &[&str]) -> Option<CohortKeys> {
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

/// The cohort's rows of every type, one seek per member: type code, key, the row's
/// `lastUpdated`, and its other facts as [`ROW_FULL`] and the bits after it (four columns, not
/// seven: their reads are much of the scan's cost). The members are walked in patient-key order
/// (the compartment's leading key), so each index leaf is read once.
const COHORT_SQL: &str = "SELECT c.type_code, c.rid, c.last_updated,
            (m.since IS NULL) | (c.deleted << 1) | ((c.to_ts IS NOT NULL) << 2) | ((c.owner IS ?5) << 3)
     FROM temp.export_member AS m INDEXED BY export_member_by_pkey
     CROSS JOIN compartment c ON c.pkey = m.pkey
     WHERE m.pkey BETWEEN ?2 AND ?3 AND c.from_ts <= ?4 AND (c.to_ts IS NULL OR c.to_ts > ?4) AND c.tenant_id = ?1";
/// The row's member has no `since`.
const ROW_FULL: i64 = 1;
const ROW_DELETED: i64 = 2;
/// The row was closed (at a time after the transaction time).
const ROW_CLOSED: i64 = 4;
/// The row's owner is the selection's user.
const ROW_OWNED: i64 = 8;

impl CohortKeys {
    /// Reads the cohort's rows of `resource_types` (those that fit [`KEY_BUDGET`], in the order
    /// given) on several read connections at once, each walking a slice of the members. None
    /// when the selection is not covered (a system-level export, or members with several
    /// `since`).
    pub(super) fn read(
        store: &SqliteStore,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_types: &[&str],
    ) -> Result<Option<CohortKeys>, StoreError> {
        if selection.scope != SelectionScope::Members {
            return Ok(None);
        }
        let Ok(since) = members_since(selection) else { return Ok(None) };
        // The types' key ranges and the members' keys, from one snapshot; the rows read later
        // are those valid at the transaction time, the same in any later snapshot.
        let (spans, pkeys) = store.with_snapshot(|connection| {
            load_members(connection, tenant, selection)?;
            let mut spans: Vec<(i64, (i64, i64))> = Vec::new();
            let mut budget = KEY_BUDGET;
            for resource_type in resource_types {
                let Some(code) = resource_type_code(resource_type) else { continue };
                let Some((first, last)) = type_span(connection, tenant, resource_type)? else { continue };
                let keys = last.saturating_sub(first).saturating_add(1);
                if keys <= budget && !spans.iter().any(|(held, _)| *held == code) {
                    budget -= keys;
                    spans.push((code, (first, last)));
                }
            }
            let pkeys: Vec<i64> = connection
                .prepare_cached("SELECT pkey FROM temp.export_member WHERE pkey IS NOT NULL ORDER BY pkey")?
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            Ok((spans, pkeys))
        })?;
        let empty = || {
            let mut types: Vec<Option<TypeKeys>> = Vec::new();
            for &(code, (first, last)) in &spans {
                let index = code as usize;
                if types.len() <= index {
                    types.resize_with(index + 1, || None);
                }
                types[index] = Some(TypeKeys { first, flags: vec![0; (last - first + 1) as usize] });
            }
            CohortKeys { types, since, asked: resource_types.iter().map(|asked| (*asked).to_owned()).collect() }
        };
        if spans.is_empty() || pkeys.is_empty() {
            return Ok(Some(empty()));
        }
        // Slices of about equal member counts, one per reader (no more than one per core).
        let readers = std::thread::available_parallelism().map_or(1, |cores| cores.get()).clamp(1, 4);
        let slice = pkeys.len().div_ceil(readers);
        let slices: Vec<(i64, i64)> =
            pkeys.chunks(slice).map(|keys| (keys[0], *keys.last().expect("chunks are not empty"))).collect();
        let read_slice = |(low, high): (i64, i64)| {
            store.with_snapshot(|connection| {
                load_members(connection, tenant, selection)?;
                let mut keys = empty();
                keys.fill(connection, tenant, selection, (low, high))?;
                Ok(keys)
            })
        };
        let mut read = std::thread::scope(|scope| {
            let helpers: Vec<_> = slices[1..].iter().map(|&slice| scope.spawn(move || read_slice(slice))).collect();
            let mut read = vec![read_slice(slices[0])];
            for helper in helpers {
                read.push(helper.join().map_err(|_| StoreError::Database("cohort reading thread panicked".into()))?);
            }
            read.into_iter().collect::<Result<Vec<_>, StoreError>>()
        })?;
        let mut merged = read.swap_remove(0);
        for other in read {
            merged.absorb(other);
        }
        Ok(Some(merged))
    }

    /// Whether `resource_type`'s keys were read.
    pub(super) fn covers(&self, resource_type: &str) -> bool {
        self.keys(resource_type).is_some()
    }

    fn keys(&self, resource_type: &str) -> Option<&TypeKeys> {
        let code = resource_type_code(resource_type)?;
        self.types.get(usize::try_from(code).ok()?)?.as_ref()
    }

    /// Marks the rows of the members with keys in `[low, high]`.
    fn fill(
        &mut self,
        connection: &Connection,
        tenant: TenantId,
        selection: &MemberSelection,
        (low, high): (i64, i64),
    ) -> Result<(), StoreError> {
        let at = selection.transaction_time;
        let user = selection.visibility.user();
        let full_reach = Reach { full_history: true, existing_since: None };
        let existing_reach = Reach { full_history: false, existing_since: self.since };
        let mut statement = connection.prepare_cached(COHORT_SQL)?;
        let mut rows = statement.query(params![tenant.0, low, high, at, user])?;
        while let Some(row) = rows.next()? {
            let Some(Some(keys)) =
                usize::try_from(row.get::<_, i64>(0)?).ok().and_then(|code| self.types.get_mut(code))
            else {
                continue;
            };
            let rid: i64 = row.get(1)?;
            // Outside the type's range read at the start: not valid at the transaction time.
            let Some(flags) = usize::try_from(rid - keys.first).ok().and_then(|offset| keys.flags.get_mut(offset))
            else {
                continue;
            };
            let last_updated: Micros = row.get(2)?;
            let facts: i64 = row.get(3)?;
            let mut flag = if facts & ROW_FULL != 0 { FULL } else { EXISTING };
            // A closed row describes a version that has since been replaced.
            if last_updated > at || facts & ROW_CLOSED != 0 {
                flag |= HISTORICAL;
            } else {
                let version = VersionAt {
                    last_updated,
                    deleted: facts & ROW_DELETED != 0,
                    visible: user.is_none() || facts & ROW_OWNED != 0,
                };
                if !version.deleted && version.visible {
                    flag |= LIVE;
                }
                if selected(selection, full_reach, &version) {
                    flag |= SELECTED_FULL;
                }
                if self.since.is_some() && selected(selection, existing_reach, &version) {
                    flag |= SELECTED_EXISTING;
                }
            }
            *flags |= flag;
        }
        Ok(())
    }

    /// Adds what another slice of the members found (every flag is an OR over rows).
    fn absorb(&mut self, other: CohortKeys) {
        for (held, found) in self.types.iter_mut().zip(other.types) {
            if let (Some(held), Some(found)) = (held.as_mut(), found) {
                for (held, found) in held.flags.iter_mut().zip(found.flags) {
                    *held |= found;
                }
            }
        }
    }

    /// Visits, in key order, every resource of `resource_type` (a covered type) with a key in
    /// `[start, end]` that the cohort reached at the transaction time and that existed then,
    /// resolving in history the versions replaced since, as
    /// [`super::export::select_window`] does.
    pub(super) fn visit(
        &self,
        connection: &Connection,
        selection: &MemberSelection,
        resource_type: &str,
        (start, end): (i64, i64),
        mut visit: impl FnMut(CohortResource) -> Result<(), StoreError>,
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
                let Some((history_version, version)) = version_in_history(connection, selection, rid)? else {
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
            visit(resource)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::{Store, Visibility, WriteMode, WriteOp};

    fn write(store: &SqliteStore, owner: Option<&str>, op: WriteOp) {
        store.write(TenantId(1), owner, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    }

    fn put(store: &SqliteStore, owner: Option<&str>, body: Value) {
        let (resource_type, id) =
            (body["resourceType"].as_str().unwrap().to_owned(), body["id"].as_str().unwrap().to_owned());
        write(store, owner, WriteOp::Update { resource_type, id, body, if_match: None });
    }

    /// An Observation of `subject`, also performed by `performer` (a second compartment).
    fn observation(id: usize, subject: usize, performer: Option<usize>, value: usize) -> Value {
        let mut body = json!({"resourceType": "Observation", "id": format!("o{id}"), "status": "final",
            "code": {"text": "x"}, "subject": {"reference": format!("Patient/p{subject}")}, "valueInteger": value});
        if let Some(performer) = performer {
            body["performer"] = json!([{"reference": format!("Patient/p{performer}")}]);
        }
        body
    }

    /// What a selection finds of one type, as `(key, full history, since, live, selected,
    /// history version)`, through the windowed reads or through the cohort's keys.
    type Found = (i64, bool, Option<Micros>, bool, bool, i64);

    fn found_both(store: &SqliteStore, selection: &MemberSelection, resource_type: &str) -> (Vec<Found>, Vec<Found>) {
        let tenant = TenantId(1);
        let keys = CohortKeys::read(store, tenant, selection, &[resource_type]).unwrap().unwrap();
        assert!(keys.covers(resource_type));
        store
            .with_snapshot(|connection| {
                load_members(connection, tenant, selection)?;
                let mut windowed = Vec::new();
                let Some(span) = type_span(connection, tenant, resource_type)? else {
                    return Ok((Vec::new(), Vec::new()));
                };
                let any = |_: Reach, _: &VersionAt| true;
                super::super::export::select_window(
                    connection,
                    tenant,
                    selection,
                    resource_type,
                    span,
                    any,
                    |chosen| {
                        let live = !chosen.version.deleted && chosen.version.visible;
                        let sent = selected(selection, chosen.reach, &chosen.version);
                        let reach = chosen.reach;
                        windowed.push((
                            chosen.rid,
                            reach.full_history,
                            reach.existing_since,
                            live,
                            sent,
                            chosen.history_version,
                        ));
                        Ok(())
                    },
                )?;
                let mut cohort = Vec::new();
                keys.visit(connection, selection, resource_type, (i64::MIN, i64::MAX), |found| {
                    let reach = found.reach;
                    cohort.push((
                        found.rid,
                        reach.full_history,
                        reach.existing_since,
                        found.live,
                        found.selected,
                        found.history_version,
                    ));
                    Ok(())
                })?;
                Ok((windowed, cohort))
            })
            .unwrap()
    }

    /// The cohort's keys find what the windowed reads find, resource by resource, across
    /// updates, deletes, moves between compartments and writes after the transaction time, for
    /// members with and without `since`, `_until` and a user's visibility.
    #[test]
    fn the_cohort_keys_agree_with_the_windowed_reads() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("test.db")).unwrap();
        store.create_tenant("t").unwrap();
        for patient in 0..6 {
            put(&store, None, json!({"resourceType": "Patient", "id": format!("p{patient}")}));
        }
        for id in 0..30 {
            let owner = (id % 4 == 0).then_some("u");
            put(&store, owner, observation(id, id % 5, (id % 3 == 0).then_some((id + 2) % 6), 0));
        }
        let mut times = vec![store.reserve_transaction_time().unwrap()];
        for round in 1..4 {
            for id in (round..30).step_by(4) {
                // Moves some to another subject, drops or adds a performer.
                put(&store, None, observation(id, (id + round) % 6, (id % 2 == 0).then_some(round), round));
            }
            for id in (round * 3..30).step_by(7) {
                write(&store, None, WriteOp::Delete { resource_type: "Observation".into(), id: format!("o{id}") });
            }
            times.push(store.reserve_transaction_time().unwrap());
        }
        let member_sets: [&[usize]; 3] = [&[0, 1, 2, 3, 4, 5], &[1, 3], &[0, 2, 5]];
        for (index, &at) in times.iter().enumerate() {
            for members in member_sets {
                for since in [None, Some(times[0]), index.checked_sub(1).map(|earlier| times[earlier])] {
                    for until in [None, Some(times[1])] {
                        for visibility in [Visibility::Tenant, Visibility::User("u".into())] {
                            // Every other member continues from `since`; the rest were added since.
                            let listed = members
                                .iter()
                                .enumerate()
                                .map(|(n, member)| (format!("p{member}"), since.filter(|_| n % 2 == 0)))
                                .collect();
                            let selection = MemberSelection {
                                members: listed,
                                since,
                                until,
                                transaction_time: at,
                                visibility,
                                scope: SelectionScope::Members,
                                filters: Default::default(),
                            };
                            let (windowed, cohort) = found_both(&store, &selection, "Observation");
                            assert!(!windowed.is_empty());
                            assert_eq!(windowed, cohort, "{selection:?}");
                        }
                    }
                }
            }
        }
    }

    /// Members with several `since` are not covered (the reach would need more than two bits).
    #[test]
    fn members_with_several_since_are_not_covered() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("test.db")).unwrap();
        let selection = |members: Vec<(String, Option<Micros>)>| MemberSelection {
            members: members.into_iter().collect(),
            since: Some(1),
            until: None,
            transaction_time: 10,
            visibility: Visibility::Tenant,
            scope: SelectionScope::Members,
            filters: Default::default(),
        };
        let read = |members| CohortKeys::read(&store, TenantId(1), &selection(members), &["Observation"]).unwrap();
        assert!(read(vec![("a".into(), Some(1)), ("b".into(), None), ("c".into(), Some(1))]).is_some());
        assert!(read(vec![("a".into(), Some(1)), ("b".into(), Some(2))]).is_none());
    }
}
