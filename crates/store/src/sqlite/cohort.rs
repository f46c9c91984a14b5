//! The members' compartment rows at the transaction time, read in one pass over the members (one
//! seek per member, all types at once) into the cohort's keys ([`crate::cohort_keys`]).
//!
//! The windowed reads of [`super::export::select_window`] seek once per member in every key
//! window of every type; at 10,000 members the members' index leaves do not fit a reader's page
//! cache, so each window read them all again (session 8: 58 % of a first manifest's time). Here
//! each leaf is read once, and a key costs one byte instead of a 32-byte candidate, so a type's
//! whole key range is held at once within [`KEY_BUDGET`].

use bulkhead_fhir::resource_type_code;
use rusqlite::{params, Connection};

use super::export::{load_members, type_span, version_in_history};
use super::SqliteStore;
use crate::cohort_keys::{CohortKeys, CohortResource, CohortRow, EXISTING, FULL};
use crate::{MemberSelection, StoreError, TenantId};

/// Keys (bytes) one reader's flags may cover, over all types: types past it take the windowed
/// reads.
const KEY_BUDGET: i64 = if cfg!(test) { 1 << 10 } else { 4 << 20 };

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

/// Reads the cohort's rows of `resource_types` (those that fit [`KEY_BUDGET`], in the order
/// given) on several read connections at once, each walking a slice of the members. None when
/// the selection is not covered (see [`CohortKeys::new`]).
pub(super) fn read(
    store: &SqliteStore,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_types: &[&str],
) -> Result<Option<CohortKeys>, StoreError> {
    let Some(mut empty) = CohortKeys::new(selection, resource_types) else { return Ok(None) };
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
    for &(code, span) in &spans {
        empty.cover(code, span);
    }
    if spans.is_empty() || pkeys.is_empty() {
        return Ok(Some(empty));
    }
    // Slices of about equal member counts, one per reader (no more than one per core).
    let readers = std::thread::available_parallelism().map_or(1, |cores| cores.get()).clamp(1, 4);
    let slice = pkeys.len().div_ceil(readers);
    let slices: Vec<(i64, i64)> =
        pkeys.chunks(slice).map(|keys| (keys[0], *keys.last().expect("chunks are not empty"))).collect();
    let read_slice = |(low, high): (i64, i64)| {
        let mut keys = CohortKeys::new(selection, resource_types).expect("covered, as above");
        for &(code, span) in &spans {
            keys.cover(code, span);
        }
        store.with_snapshot(|connection| {
            load_members(connection, tenant, selection)?;
            fill(&mut keys, connection, tenant, selection, (low, high))?;
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

/// Marks the rows of the members with keys in `[low, high]`.
fn fill(
    keys: &mut CohortKeys,
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    (low, high): (i64, i64),
) -> Result<(), StoreError> {
    let mut statement = connection.prepare_cached(COHORT_SQL)?;
    let mut rows =
        statement.query(params![tenant.0, low, high, selection.transaction_time, selection.visibility.user()])?;
    while let Some(row) = rows.next()? {
        let facts: i64 = row.get(3)?;
        keys.mark(
            selection,
            CohortRow {
                type_code: row.get(0)?,
                rid: row.get(1)?,
                last_updated: row.get(2)?,
                reach: if facts & ROW_FULL != 0 { FULL } else { EXISTING },
                deleted: facts & ROW_DELETED != 0,
                closed: facts & ROW_CLOSED != 0,
                owned: facts & ROW_OWNED != 0,
            },
        );
    }
    Ok(())
}

/// [`CohortKeys::visit`], with the versions replaced since resolved in `connection`'s history.
pub(super) fn visit(
    keys: &CohortKeys,
    connection: &Connection,
    selection: &MemberSelection,
    resource_type: &str,
    span: (i64, i64),
    mut visit: impl FnMut(CohortResource) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    keys.visit(
        &mut (),
        selection,
        resource_type,
        span,
        |_, rid| version_in_history(connection, selection, rid),
        |_, found| visit(found),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use bulkhead_fhir::Micros;

    use super::*;
    use crate::selection::{selected, Reach, VersionAt};
    use crate::{SelectionScope, Store, Visibility, WriteMode, WriteOp};

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
        let keys = read(store, tenant, selection, &[resource_type]).unwrap().unwrap();
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
                    None,
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
                visit(&keys, connection, selection, resource_type, (i64::MIN, i64::MAX), |found| {
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
        let read = |members| read(&store, TenantId(1), &selection(members), &["Observation"]).unwrap();
        assert!(read(vec![("a".into(), Some(1)), ("b".into(), None), ("c".into(), Some(1))]).is_some());
        assert!(read(vec![("a".into(), Some(1)), ("b".into(), Some(2))]).is_none());
    }
}
