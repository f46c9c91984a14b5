//! The members' compartment rows at the transaction time, read in one statement over the members
//! (all types at once) into the cohort's keys ([`crate::cohort_keys`]). The PostgreSQL side of
//! `sqlite/cohort.rs`.
//!
//! The windowed reads of [`super::export::select_window`] join the members once per key window
//! of every type: at 10,000 members, each of the ~50 windows of a 1.5 M-resource tenant was a
//! join of 10,000 index range scans (session 9: 43 s for a first manifest). Here the members'
//! rows are read once, in one statement the planner may answer with one scan of the
//! compartment table, and a key costs one byte instead of a candidate, so a type's whole key
//! range is held at once within [`KEY_BUDGET`].

use std::collections::HashMap;

use bulkhead_fhir::Micros;

use super::export::{version_in_history, Members};
use super::resources::type_code;
use super::Db;
use crate::cohort_keys::{CohortKeys, CohortResource, CohortRow, EXISTING, FULL};
use crate::{MemberSelection, StoreError, TenantId};

/// Keys (bytes) the flags may cover, over all types: types past it take the windowed reads.
const KEY_BUDGET: i64 = if cfg!(test) { 1 << 10 } else { 16 << 20 };

/// The smallest and largest key of each of `types` in the tenant (absent: none), two index
/// probes per type, one round trip.
const SPANS_SQL: &str = "SELECT t.resource_type,
            (SELECT min(rid) FROM resources WHERE tenant_id = $1 AND resource_type = t.resource_type),
            (SELECT max(rid) FROM resources WHERE tenant_id = $1 AND resource_type = t.resource_type)
     FROM unnest($2::text[]) AS t(resource_type)";

/// The cohort's rows of the covered types: type code, key, the row's `lastUpdated`, and its
/// other facts as one integer (the member's reach bits, then [`ROW_DELETED`] and the bits after
/// it): four columns to decode instead of seven. Each distinct member once, with its reach.
const COHORT_SQL: &str = "SELECT c.type_code, c.rid, c.last_updated,
            m.reach | CASE WHEN c.deleted THEN 4 ELSE 0 END | CASE WHEN c.to_ts IS NOT NULL THEN 8 ELSE 0 END
                    | CASE WHEN c.owner = $5 THEN 16 ELSE 0 END
     FROM unnest($2::int8[], $3::int4[]) AS m(pkey, reach)
     JOIN compartment c ON c.tenant_id = $1 AND c.pkey = m.pkey
     WHERE c.type_code = ANY($6::int2[]) AND c.from_ts <= $4 AND (c.to_ts IS NULL OR c.to_ts > $4)";
/// Reach bits of the row's member: [`FULL`] and [`EXISTING`], as in the flags.
const ROW_REACH: i32 = 3;
const ROW_DELETED: i32 = 4;
/// The row was closed (at a time after the transaction time).
const ROW_CLOSED: i32 = 8;
/// The row's owner is the selection's user.
const ROW_OWNED: i32 = 16;

/// Reads the cohort's rows of `resource_types` (those that fit [`KEY_BUDGET`], in the order
/// given) in one statement. None when the selection is not covered (see [`CohortKeys::new`]).
pub(super) fn read(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    members: &Members,
    resource_types: &[&str],
) -> Result<Option<CohortKeys>, StoreError> {
    let Some(mut keys) = CohortKeys::new(selection, resource_types) else { return Ok(None) };
    let mut budget = KEY_BUDGET;
    let mut codes: Vec<i16> = Vec::new();
    for row in db.query(SPANS_SQL, &[&tenant.0, &resource_types])? {
        let resource_type: &str = row.try_get(0)?;
        let (Some(first), Some(last)) = (row.try_get::<_, Option<i64>>(1)?, row.try_get::<_, Option<i64>>(2)?) else {
            continue;
        };
        let Ok(code) = type_code(resource_type) else { continue };
        let span = last.saturating_sub(first).saturating_add(1);
        if span > budget || codes.contains(&code) {
            continue;
        }
        budget -= span;
        codes.push(code);
        keys.cover(i64::from(code), (first, last));
    }
    let (pkeys, reaches) = members.reach_bits();
    if codes.is_empty() || pkeys.is_empty() {
        return Ok(Some(keys));
    }
    let at = selection.transaction_time;
    let user = selection.visibility.user();
    db.query_each(COHORT_SQL, &[&tenant.0, &pkeys, &reaches, &at, &user, &codes], |row| {
        let facts: i32 = row.try_get(3)?;
        keys.mark(
            selection,
            CohortRow {
                type_code: i64::from(row.try_get::<_, i16>(0)?),
                rid: row.try_get(1)?,
                last_updated: row.try_get(2)?,
                reach: (facts & ROW_REACH) as u8,
                deleted: facts & ROW_DELETED != 0,
                closed: facts & ROW_CLOSED != 0,
                owned: facts & ROW_OWNED != 0,
            },
        );
        Ok(())
    })?;
    Ok(Some(keys))
}

/// [`CohortKeys::visit`], with the versions replaced since resolved in the tenant's history.
pub(super) fn visit(
    keys: &CohortKeys,
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    span: (i64, i64),
    mut visit: impl FnMut(&mut Db<'_>, CohortResource) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    keys.visit(
        db,
        selection,
        resource_type,
        span,
        |db, rid| version_in_history(db, tenant, selection, rid),
        |db, found| visit(db, found),
    )
}

/// Distinct member keys in key order, each with its reach bits ([`FULL`], [`EXISTING`]).
pub(super) fn reach_bits<'a>(members: impl Iterator<Item = (&'a i64, &'a Option<Micros>)>) -> (Vec<i64>, Vec<i32>) {
    let mut by_key: HashMap<i64, i32> = HashMap::new();
    for (pkey, since) in members {
        *by_key.entry(*pkey).or_default() |= if since.is_none() { FULL as i32 } else { EXISTING as i32 };
    }
    let mut sorted: Vec<(i64, i32)> = by_key.into_iter().collect();
    sorted.sort_unstable();
    sorted.into_iter().unzip()
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::selection::{selected, Reach, VersionAt};
    use crate::{SelectionScope, Store, Visibility, WriteMode, WriteOp};

    fn write(store: &dyn Store, tenant: TenantId, owner: Option<&str>, op: WriteOp) {
        store.write(tenant, owner, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    }

    fn put(store: &dyn Store, tenant: TenantId, owner: Option<&str>, body: Value) {
        let (resource_type, id) =
            (body["resourceType"].as_str().unwrap().to_owned(), body["id"].as_str().unwrap().to_owned());
        write(store, tenant, owner, WriteOp::Update { resource_type, id, body, if_match: None });
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
    /// history version)`.
    type Found = (i64, bool, Option<Micros>, bool, bool, i64);

    /// Through the windowed reads, then through the cohort's keys.
    fn found_both(
        store: &super::super::PgStore,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_type: &str,
    ) -> (Vec<Found>, Vec<Found>) {
        store
            .with_read(|db| {
                let members = Members::resolve(db, &store.member_keys, tenant, selection)?;
                let keys = read(db, tenant, selection, &members, &[resource_type])?.unwrap();
                assert!(keys.covers(resource_type));
                let Some(span) = super::super::export::type_span(db, tenant, resource_type)? else {
                    return Ok((Vec::new(), Vec::new()));
                };
                let any = |_: Reach, _: &VersionAt| true;
                let windowed =
                    super::super::export::select_window(db, tenant, selection, &members, resource_type, span, any)?
                        .into_iter()
                        .map(|chosen| {
                            let live = !chosen.version.deleted && chosen.version.visible;
                            let sent = selected(selection, chosen.reach, &chosen.version);
                            let reach = chosen.reach;
                            (chosen.rid, reach.full_history, reach.existing_since, live, sent, chosen.history_version)
                        })
                        .collect();
                let mut cohort = Vec::new();
                visit(&keys, db, tenant, selection, resource_type, (i64::MIN, i64::MAX), |_, found| {
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
        let Some(store) = super::super::testing::fresh_store() else { return };
        let tenant = store.create_tenant("t").unwrap().id;
        for patient in 0..6 {
            put(&*store, tenant, None, json!({"resourceType": "Patient", "id": format!("p{patient}")}));
        }
        for id in 0..30 {
            let owner = (id % 4 == 0).then_some("u");
            put(&*store, tenant, owner, observation(id, id % 5, (id % 3 == 0).then_some((id + 2) % 6), 0));
        }
        let mut times = vec![store.reserve_transaction_time().unwrap()];
        for round in 1..4 {
            for id in (round..30).step_by(4) {
                // Moves some to another subject, drops or adds a performer.
                put(&*store, tenant, None, observation(id, (id + round) % 6, (id % 2 == 0).then_some(round), round));
            }
            for id in (round * 3..30).step_by(7) {
                let op = WriteOp::Delete { resource_type: "Observation".into(), id: format!("o{id}") };
                write(&*store, tenant, None, op);
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
                            let (windowed, cohort) = found_both(&store, tenant, &selection, "Observation");
                            assert!(!windowed.is_empty());
                            assert_eq!(windowed, cohort, "{selection:?}");
                        }
                    }
                }
            }
        }
    }

    /// Members with several `since` are not covered (the reach would need more than two bits);
    /// a system-level export is not either.
    #[test]
    fn members_with_several_since_are_not_covered() {
        let Some(store) = super::super::testing::fresh_store() else { return };
        let tenant = store.create_tenant("t").unwrap().id;
        put(&*store, tenant, None, observation(1, 1, None, 0));
        let selection = |members: Vec<(String, Option<Micros>)>, scope| MemberSelection {
            members: members.into_iter().collect(),
            since: Some(1),
            until: None,
            transaction_time: store.reserve_transaction_time().unwrap(),
            visibility: Visibility::Tenant,
            scope,
            filters: Default::default(),
        };
        let read = |selection: MemberSelection| {
            store
                .with_read(|db| {
                    let members = Members::resolve(db, &store.member_keys, tenant, &selection)?;
                    Ok(read(db, tenant, &selection, &members, &["Observation"])?.is_some())
                })
                .unwrap()
        };
        let members = SelectionScope::Members;
        assert!(read(selection(vec![("p1".into(), Some(1)), ("b".into(), None), ("c".into(), Some(1))], members)));
        assert!(!read(selection(vec![("p1".into(), Some(1)), ("b".into(), Some(2))], members)));
        assert!(!read(selection(vec![("p1".into(), None)], SelectionScope::Tenant)));
    }
}
