//! Associated data of Patient and Group exports on PostgreSQL: the reference index kept on
//! write, and the per-export set of Provenance and referenced resources computed from it. The
//! rules are the SQLite store's (`sqlite/associated/`, decided by [`crate::selection`]); the
//! SQL works on many keys per statement (array parameters) instead of one seek per resource.
//!
//! - [`reference_index`]: the index, kept on write.
//! - Planning, here: the cohort's resources of each source type, a key window at a time, and
//!   what they reach: the Provenance targeting them ([`provenance`]) and the resources they
//!   reference, level by level ([`references`]).
//! - [`stored_set`]: the set stored in `export_associated`, read back one part at a time, and
//!   removed once expired.
//!
//! Planning runs in one transaction on one pooled connection, with its working sets in
//! temporary tables (`ON COMMIT DELETE ROWS`: nothing stays behind on the connection), so memory
//! stays bounded whatever the cohort's size. It never takes the clock: everything it reads is
//! versioned by time, so it blocks no writer.

mod provenance;
mod reference_index;
mod references;
mod stored_set;

use std::collections::HashMap;

use bulkhead_fhir::Micros;

use self::provenance::{resolve_provenance, FoundProvenance};
use self::references::{add_dense_references, add_references, record_nodes, resolve_level};
use self::stored_set::store_set;
use crate::cohort_keys::{CohortKeys, CohortStash, StashKey};
use crate::postgres::export::{filter_matches, select_window, type_span, Members, WINDOW};
use crate::postgres::{Db, PgStore};
use crate::range_scan;
use crate::selection::{selected, source_types, FoundNodes, Reach, VersionAt, Via};
use crate::{
    AssociatedRequest, MemberSelection, PartRange, ProvenanceSelection, ReferencedTypes, StoreError, TenantId,
};

pub(super) use self::provenance::provenance_targeting;
pub(super) use self::reference_index::{
    close_references, forget_target, note_referencing_types, resolve_new_targets, sync_references,
};
pub(super) use self::stored_set::{associated_ids, delete_expired_sets, AssociatedPartReader};

/// The working tables of one planning, emptied at commit. `assoc_node` holds referenced
/// resources found per level (`node` orders a level's scan), `assoc_provenance` the Provenance
/// found, `assoc_out` the set.
const WORK_TABLES: &str = "
CREATE TEMP TABLE IF NOT EXISTS assoc_node (
    node bigint GENERATED ALWAYS AS IDENTITY, target_type text NOT NULL, target_id text NOT NULL,
    level integer NOT NULL, full_history boolean NOT NULL, since bigint, forced boolean NOT NULL,
    PRIMARY KEY (target_type, target_id)) ON COMMIT DELETE ROWS;
CREATE INDEX IF NOT EXISTS assoc_node_by_level ON assoc_node (level, node);
CREATE TEMP TABLE IF NOT EXISTS assoc_provenance (
    rid bigint PRIMARY KEY, full_history boolean NOT NULL, since bigint, forced boolean NOT NULL)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS assoc_out (
    resource_type text NOT NULL, rid bigint NOT NULL, PRIMARY KEY (resource_type, rid)) ON COMMIT DELETE ROWS;
";

/// Rows of one level (or of the stored set) read into memory at a time.
const BATCH: i64 = 1_000;

/// Resources reached, with how: parallel arrays for one statement.
#[derive(Default)]
struct Reached {
    rids: Vec<i64>,
    full_history: Vec<bool>,
    since: Vec<Option<Micros>>,
    forced: Vec<bool>,
}

impl Reached {
    fn push(&mut self, rid: i64, via: Via) {
        self.rids.push(rid);
        self.full_history.push(via.reach.full_history);
        self.since.push(via.reach.existing_since);
        self.forced.push(via.forced);
    }

    /// What reaches the resource at `index`.
    fn via(&self, index: usize) -> Via {
        Via {
            reach: Reach { full_history: self.full_history[index], existing_since: self.since[index] },
            forced: self.forced[index],
        }
    }
}

impl PgStore {
    pub(super) fn plan_associated_set(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        request: &AssociatedRequest,
        part_size: u64,
    ) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
        self.with_transaction(|db| {
            db.batch(WORK_TABLES)?;
            compute(db, &self.member_keys, &self.cohorts, tenant, selection, request)?;
            store_set(db, tenant, request, part_size)
        })
    }
}

/// Fills `assoc_out` with the set's `(type, key)` pairs.
fn compute(
    db: &mut Db<'_>,
    keys: &crate::postgres::member_keys::MemberKeys,
    cohorts: &CohortStash,
    tenant: TenantId,
    selection: &MemberSelection,
    request: &AssociatedRequest,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let referencing = request.referenced != ReferencedTypes::None && request.depth > 0;
    let any_provenance = request.provenance != ProvenanceSelection::None
        && db
            .query_one(
                // One probe into each of the two partial indexes that together hold every
                // Provenance.target row (with and without its target's key): `provenance_target`
                // alone matches neither index, and read the tenant's whole reference index when
                // it has no Provenance at all.
                "SELECT EXISTS (SELECT 1 FROM reference_index
                                WHERE tenant_id = $1 AND provenance_target AND target_rid IS NOT NULL)
                     OR EXISTS (SELECT 1 FROM reference_index
                                WHERE tenant_id = $1 AND provenance_target AND target_rid IS NULL)",
                &[&tenant.0],
            )?
            .try_get::<_, bool>(0)?;
    let sources = source_types(request, referencing, any_provenance);
    // The cohort is found before `_typeFilter`: a filter narrows what is exported of its type,
    // not which Provenance and referenced resources come.
    let cohort = MemberSelection { filters: Default::default(), ..selection.clone() };
    let members = Members::resolve(db, keys, tenant, selection)?;
    // `(type, follow its references, find its Provenance)` of each source type read.
    let mut read: Vec<(&str, bool, bool)> = Vec::new();
    for resource_type in sources {
        // A type none of whose resources ever referenced anything to follow is not read at all
        // for references (e.g. Observations in Synthea data).
        let follow = referencing
            && request.reference_sources.contains(resource_type)
            && db
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM referencing_types WHERE tenant_id = $1 AND resource_type = $2)",
                    &[&tenant.0, &resource_type],
                )?
                .try_get::<_, bool>(0)?;
        let provenance = any_provenance && request.provenance_sources.contains(resource_type);
        if follow || provenance {
            read.push((resource_type.as_str(), follow, provenance));
        }
    }
    // The cohort's keys of the source types read in one pass over the members: those the count
    // pass just read, or read now (types they do not cover are read a key window at a time).
    let source_types: Vec<&str> = read.iter().map(|(resource_type, _, _)| *resource_type).collect();
    let cohort_keys = match cohorts.take(&StashKey::of(tenant, selection), &source_types) {
        Some(kept) => Some(kept),
        None if source_types.is_empty() => None,
        None => crate::postgres::cohort::read(db, tenant, &cohort, &members, &source_types)?,
    };
    let cohort = Cohort { selection: &cohort, members: &members, keys: cohort_keys.as_ref() };
    let mut found_provenance = FoundProvenance::default();
    let mut found_nodes = FoundNodes::new(1, &request.referenced);
    for (resource_type, follow, provenance) in read {
        let Some((first, last)) = type_span(db, tenant, resource_type)? else { continue };
        let mut start = first;
        while start <= last {
            let end = start.saturating_add(WINDOW - 1).min(last);
            let chosen = choose_window(db, tenant, selection, cohort, resource_type, (start, end))?;
            if follow && dense(&chosen) {
                add_dense_references(&mut found_nodes, db, tenant, &chosen, at)?;
            } else if follow {
                add_references(db, tenant, &chosen, at, 1, &request.referenced)?;
            }
            if provenance {
                found_provenance.find(db, tenant, selection, &chosen, request.provenance)?;
            }
            if end == last {
                break;
            }
            start = end + 1;
        }
    }
    found_provenance.record(db)?;
    record_nodes(&mut found_nodes, db)?;
    if any_provenance {
        resolve_provenance(db, tenant, selection, request, referencing)?;
    }
    if referencing {
        for level in 1..=request.depth {
            resolve_level(db, tenant, selection, request, level)?;
        }
    }
    Ok(())
}

/// How a window finds the cohort's resources: `selection` without `_typeFilter`, its members,
/// and the keys read in one pass over the members when they cover the window's type.
#[derive(Clone, Copy)]
struct Cohort<'a> {
    selection: &'a MemberSelection,
    members: &'a Members,
    keys: Option<&'a CohortKeys>,
}

/// The cohort's live resources in one key window of `resource_type`, in key order, with what
/// reaches each. They are found through `cohort` (`selection` without `_typeFilter`), and only
/// those the export sends (selected and, for a filtered type, matching) force what they reach.
fn choose_window(
    db: &mut Db<'_>,
    tenant: TenantId,
    selection: &MemberSelection,
    cohort: Cohort<'_>,
    resource_type: &str,
    span: (i64, i64),
) -> Result<Reached, StoreError> {
    let filtered = selection.filters.filters(resource_type);
    let sent = |db: &mut Db<'_>, rid: i64, history_version: i64| -> Result<bool, StoreError> {
        Ok(!filtered || filter_matches(db, tenant, selection, resource_type, rid, history_version)?)
    };
    let mut chosen = Reached::default();
    match cohort.keys.filter(|keys| keys.covers(resource_type)) {
        Some(keys) => {
            crate::postgres::cohort::visit(keys, db, tenant, cohort.selection, resource_type, span, |db, found| {
                if found.live {
                    let forced = found.selected && sent(db, found.rid, found.history_version)?;
                    chosen.push(found.rid, Via { reach: found.reach, forced });
                }
                Ok(())
            })?
        }
        None => {
            let live = |_: Reach, version: &VersionAt| !version.deleted && version.visible;
            for found in select_window(db, tenant, cohort.selection, cohort.members, resource_type, span, live)? {
                let forced =
                    selected(selection, found.reach, &found.version) && sent(db, found.rid, found.history_version)?;
                chosen.push(found.rid, Via { reach: found.reach, forced });
            }
        }
    }
    Ok(chosen)
}

/// A resource's version at a time, as planning needs it.
struct StateAt {
    last_updated: Micros,
    deleted: bool,
    owner: Option<String>,
}

/// The versions of `rids` at `at` (keys that did not exist then are absent).
fn states_at(db: &mut Db<'_>, tenant: TenantId, rids: &[i64], at: Micros) -> Result<HashMap<i64, StateAt>, StoreError> {
    let rows = db.query(
        "SELECT r.rid,
                CASE WHEN r.last_updated <= $3 THEN r.last_updated ELSE h.last_updated END,
                CASE WHEN r.last_updated <= $3 THEN r.deleted ELSE h.deleted END,
                CASE WHEN r.last_updated <= $3 THEN r.owner ELSE h.owner END
         FROM unnest($2::int8[]) AS n(rid)
         JOIN resources r ON r.tenant_id = $1 AND r.rid = n.rid
         LEFT JOIN LATERAL (
             SELECT last_updated, deleted, owner FROM resource_history
             WHERE tenant_id = $1 AND rid = r.rid AND last_updated <= $3 ORDER BY version DESC LIMIT 1
         ) h ON r.last_updated > $3
         WHERE r.last_updated <= $3 OR h.last_updated IS NOT NULL",
        &[&tenant.0, &rids, &at],
    )?;
    let mut states = HashMap::with_capacity(rows.len());
    for row in &rows {
        states.insert(
            row.try_get::<_, i64>(0)?,
            StateAt { last_updated: row.try_get(1)?, deleted: row.try_get(2)?, owner: row.try_get(3)? },
        );
    }
    Ok(states)
}

/// Whether the `reached` resources are dense in the range from their first key to their last
/// ([`range_scan::dense`]).
fn dense(reached: &Reached) -> bool {
    let (Some(&first), Some(&last)) = (reached.rids.first(), reached.rids.last()) else { return false };
    range_scan::dense(reached.rids.len(), (first, last))
}

fn via_from_row(row: &postgres::Row, first: usize) -> Result<Via, StoreError> {
    Ok(Via {
        reach: Reach { full_history: row.try_get(first)?, existing_since: row.try_get(first + 1)? },
        forced: row.try_get(first + 2)?,
    })
}

/// Adds resources to the set.
fn output(db: &mut Db<'_>, resource_type: &str, rids: &[i64]) -> Result<(), StoreError> {
    if !rids.is_empty() {
        db.execute(
            "INSERT INTO assoc_out (resource_type, rid) SELECT $1, rid FROM unnest($2::int8[]) AS n(rid)
             ON CONFLICT DO NOTHING",
            &[&resource_type, &rids],
        )?;
    }
    Ok(())
}
