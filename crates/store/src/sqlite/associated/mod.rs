//! Associated data of Patient and Group exports: the reference index kept on write, and the
//! per-export set of Provenance and referenced resources computed from it.
//!
//! - [`reference_index`]: the index, kept on write (built from the stored versions on first open).
//! - Planning, here: the cohort's resources of each source type, a key window at a time, and
//!   what they reach: the Provenance targeting them ([`provenance`]) and the resources they
//!   reference, level by level ([`references`]).
//! - [`stored_set`]: the set stored in `export_associated`, and read back one part at a time.
//!
//! Planning works in temporary tables on a connection of its own whose temporary storage is a
//! file (bounded memory whatever the cohort's size), and stores the result in
//! `export_associated` in batches of short write transactions (under a set registered first,
//! see `plan_watermarks`).

mod provenance;
mod reference_index;
mod references;
mod stored_set;

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension};

use self::provenance::{
    find_window_provenance, resolve_provenance, FoundProvenance, ProvenanceStates, ProvenanceWindow,
};
use self::references::{add_window_references, record_nodes, record_nodes_if_full, resolve_level};
use self::stored_set::store_set;
use crate::cohort_keys::{CohortKeys, StashKey};
use crate::selection::{source_types, FoundNodes, Via};
use crate::sqlite::export::{
    filter_matches, load_members, select_window, selected, type_span, Reach, VersionAt, WINDOW,
};
use crate::sqlite::SqliteStore;
use crate::{
    AssociatedRequest, MemberSelection, PartRange, ProvenanceSelection, ReferencedTypes, StoreError, TenantId,
};

pub(super) use self::provenance::provenance_targeting;
pub(super) use self::reference_index::{close_references, migrate, sync_references};
pub(super) use self::stored_set::{associated_ids, AssociatedPartReader};

/// Rows of one BFS level read into memory at a time.
const LEVEL_BATCH: usize = 1_000;

const WORK_TABLES: &str = "
CREATE TEMP TABLE IF NOT EXISTS assoc_node (
    target_type TEXT NOT NULL, target_id TEXT NOT NULL, level INTEGER NOT NULL,
    full_history INTEGER NOT NULL, since INTEGER, forced INTEGER NOT NULL,
    PRIMARY KEY (target_type, target_id));
CREATE TEMP TABLE IF NOT EXISTS assoc_provenance (
    rid INTEGER PRIMARY KEY, full_history INTEGER NOT NULL, since INTEGER, forced INTEGER NOT NULL);
CREATE TEMP TABLE IF NOT EXISTS assoc_out (
    resource_type TEXT NOT NULL, rid INTEGER NOT NULL, PRIMARY KEY (resource_type, rid)) WITHOUT ROWID;
DELETE FROM temp.assoc_node; DELETE FROM temp.assoc_provenance; DELETE FROM temp.assoc_out;
";

impl SqliteStore {
    pub(super) fn plan_associated_set(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        request: &AssociatedRequest,
        part_size: u64,
    ) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
        // A connection of its own: its temporary tables spill to a file, not to memory.
        let connection = crate::sqlite::open_connection(&self.path, self.options.reader_cache_mib)?;
        connection.execute_batch("PRAGMA temp_store = FILE;")?;
        connection.execute_batch(WORK_TABLES)?;
        connection.execute_batch("BEGIN DEFERRED")?;
        let computed = compute(self, &connection, tenant, selection, request);
        connection.execute_batch("COMMIT")?;
        computed?;
        store_set(self, &connection, tenant, request, part_size)
    }
}

/// Fills `temp.assoc_out` (on `connection`) with the set's `(type, key)` pairs.
fn compute(
    store: &SqliteStore,
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    request: &AssociatedRequest,
) -> Result<(), StoreError> {
    let referencing = request.referenced != ReferencedTypes::None && request.depth > 0;
    let any_provenance: bool = request.provenance != ProvenanceSelection::None
        && connection
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM reference_index INDEXED BY provenance_by_target_rid
                                WHERE tenant_id = ?1 AND provenance_target = 1 AND target_rid IS NOT NULL)
                     OR EXISTS (SELECT 1 FROM reference_index INDEXED BY provenance_unresolved
                                WHERE tenant_id = ?1 AND provenance_target = 1 AND target_rid IS NULL)",
            )?
            .query_row([tenant.0], |row| row.get(0))?;
    let sources = source_types(request, referencing, any_provenance);
    let mut has_references = connection.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM referencing_types WHERE tenant_id = ?1 AND resource_type = ?2)",
    )?;
    let mut windows: Vec<SourceWindow<'_>> = Vec::new();
    for resource_type in sources {
        // A type none of whose resources ever referenced anything to follow is not read at all
        // for references (e.g. Observations in Synthea data).
        let follow = referencing
            && request.reference_sources.contains(resource_type)
            && has_references.query_row(params![tenant.0, resource_type], |row| row.get::<_, bool>(0))?;
        let provenance = any_provenance && request.provenance_sources.contains(resource_type);
        if !follow && !provenance {
            continue;
        }
        let Some((first, last)) = type_span(connection, tenant, resource_type)? else { continue };
        let mut start = first;
        loop {
            let end = start.saturating_add(WINDOW - 1).min(last);
            windows.push(SourceWindow { resource_type, follow, provenance, span: (start, end) });
            if end == last {
                break;
            }
            start = end + 1;
        }
    }
    // The cohort's keys of the source types in one pass over the members (types it does not
    // cover are read a key window at a time).
    let mut source_types: Vec<&str> = Vec::new();
    for window in &windows {
        if !source_types.contains(&window.resource_type) {
            source_types.push(window.resource_type);
        }
    }
    let cohort = match store.cohorts.take(&StashKey::of(tenant, selection), &source_types) {
        Some(kept) => Some(kept),
        None if source_types.is_empty() => None,
        None => crate::sqlite::cohort::read(store, tenant, selection, &source_types)?,
    };
    let mut nodes = FoundNodes::new(1, &request.referenced);
    read_windows(store, tenant, selection, request, &windows, cohort.as_ref(), |found| {
        nodes.absorb(found.nodes);
        record_nodes_if_full(&mut nodes, connection)?;
        found.provenance.record(connection)
    })?;
    if any_provenance {
        resolve_provenance(connection, selection, referencing, &mut nodes)?;
    }
    record_nodes(&mut nodes, connection)?;
    if referencing {
        for level in 1..=request.depth {
            resolve_level(connection, tenant, selection, request, level)?;
        }
    }
    Ok(())
}

/// One key window of one source type of the cohort.
struct SourceWindow<'a> {
    resource_type: &'a str,
    /// Its resources' references are followed.
    follow: bool,
    /// Its resources' Provenance is added.
    provenance: bool,
    span: (i64, i64),
}

/// What the cohort's resources in one window reach.
struct WindowFound<'a> {
    nodes: FoundNodes<'a>,
    provenance: FoundProvenance,
}

/// Reads the windows on several read connections at once (one per core, at most 4), handing
/// what each found to `record`, on this thread, as it comes: a few windows' findings are in
/// flight at most. A window's findings depend only on the transaction time (the indexes are
/// versioned by time), so the readers' snapshots agree, and merging them in any order gives the
/// same set.
fn read_windows<'a>(
    store: &SqliteStore,
    tenant: TenantId,
    selection: &MemberSelection,
    request: &'a AssociatedRequest,
    windows: &[SourceWindow<'_>],
    cohort_keys: Option<&CohortKeys>,
    mut record: impl FnMut(WindowFound<'a>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    if windows.is_empty() {
        return Ok(());
    }
    // The cohort is found before `_typeFilter`: a filter narrows what is exported of its type,
    // not which Provenance and referenced resources come.
    let cohort = MemberSelection { filters: Default::default(), ..selection.clone() };
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |cores| cores.get()).clamp(1, 4).min(windows.len());
    let (sender, receiver) = std::sync::mpsc::sync_channel::<WindowFound<'a>>(workers);
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..workers)
            .map(|_| {
                let (sender, next, cohort) = (sender.clone(), &next, &cohort);
                scope.spawn(move || {
                    let read = store.with_snapshot(|connection| {
                        load_members(connection, tenant, selection)?;
                        let mut states = ProvenanceStates::default();
                        while let Some(window) = windows.get(next.fetch_add(1, Ordering::Relaxed)) {
                            let cohort = Cohort { selection: cohort, keys: cohort_keys };
                            let found =
                                read_window(connection, tenant, selection, cohort, request, window, &mut states)?;
                            if sender.send(found).is_err() {
                                break; // the recorder failed: nobody wants the rest
                            }
                        }
                        Ok(())
                    });
                    if read.is_err() {
                        next.fetch_max(windows.len(), Ordering::Relaxed); // the others stop too
                    }
                    read
                })
            })
            .collect();
        drop(sender);
        let mut result = Ok(());
        for found in receiver.iter() {
            if let Err(error) = record(found) {
                result = Err(error);
                break;
            }
        }
        drop(receiver);
        for reader in readers {
            let read =
                reader.join().map_err(|_| StoreError::Database("associated data planning thread panicked".into()))?;
            if result.is_ok() {
                result = read;
            }
        }
        result
    })
}

/// How a window finds the cohort's resources: `selection` without `_typeFilter`, and the keys
/// read in one pass over the members when they cover the window's type.
#[derive(Clone, Copy)]
struct Cohort<'a> {
    selection: &'a MemberSelection,
    keys: Option<&'a CohortKeys>,
}

/// What the cohort's resources in one window ([`choose_window`]) reach: their references
/// (level-1 nodes) and their Provenance.
fn read_window<'a>(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    cohort: Cohort<'_>,
    request: &'a AssociatedRequest,
    window: &SourceWindow<'_>,
    states: &mut ProvenanceStates,
) -> Result<WindowFound<'a>, StoreError> {
    let SourceWindow { resource_type, follow, provenance, span } = *window;
    let at = selection.transaction_time;
    let chosen = choose_window(connection, tenant, selection, cohort, resource_type, span)?;
    let mut found =
        WindowFound { nodes: FoundNodes::new(1, &request.referenced), provenance: FoundProvenance::default() };
    if follow {
        add_window_references(connection, &chosen, span, at, &mut found.nodes)?;
    }
    if provenance {
        let window = ProvenanceWindow { resource_type, chosen: &chosen, span };
        find_window_provenance(
            connection,
            tenant,
            selection,
            window,
            request.provenance,
            states,
            &mut found.provenance,
        )?;
    }
    Ok(found)
}

/// The cohort's live resources in one key window of `resource_type`, in key order, with what
/// reaches each. They are found through `cohort` (`selection` without `_typeFilter`), and only
/// those the export sends (selected and, for a filtered type, matching) force what they reach.
fn choose_window(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    cohort: Cohort<'_>,
    resource_type: &str,
    span: (i64, i64),
) -> Result<Vec<(i64, Via)>, StoreError> {
    let filtered = selection.filters.filters(resource_type);
    let sent = |rid: i64, history_version: i64| -> Result<bool, StoreError> {
        Ok(!filtered || filter_matches(connection, selection, resource_type, rid, history_version)?)
    };
    let mut chosen: Vec<(i64, Via)> = Vec::new();
    match cohort.keys.filter(|keys| keys.covers(resource_type)) {
        Some(keys) => crate::sqlite::cohort::visit(keys, connection, cohort.selection, resource_type, span, |found| {
            if found.live {
                let forced = found.selected && sent(found.rid, found.history_version)?;
                chosen.push((found.rid, Via { reach: found.reach, forced }));
            }
            Ok(())
        })?,
        None => {
            let live = |_: Reach, version: &VersionAt| !version.deleted && version.visible;
            select_window(connection, tenant, cohort.selection, resource_type, span, None, live, |found| {
                let forced =
                    selected(selection, found.reach, &found.version) && sent(found.rid, found.history_version)?;
                chosen.push((found.rid, Via { reach: found.reach, forced }));
                Ok(())
            })?;
        }
    }
    Ok(chosen)
}

fn via_from_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Via> {
    Ok(Via {
        reach: Reach { full_history: row.get(first)?, existing_since: row.get(first + 1)? },
        forced: row.get(first + 2)?,
    })
}

/// A resource's version at a time, as planning needs it.
struct StateAt {
    last_updated: Micros,
    deleted: bool,
    owner: Option<String>,
}

/// The state of `rid`'s version at `at`; `None` before it existed.
fn state_at(connection: &Connection, rid: i64, at: Micros) -> Result<Option<StateAt>, StoreError> {
    let row =
        |row: &rusqlite::Row<'_>| Ok(StateAt { last_updated: row.get(0)?, deleted: row.get(1)?, owner: row.get(2)? });
    let current = connection
        .prepare_cached("SELECT last_updated, deleted, owner FROM resources WHERE rid = ?1")?
        .query_row([rid], row)
        .optional()?;
    match current {
        Some(current) if current.last_updated <= at => Ok(Some(current)),
        Some(_) => Ok(connection
            .prepare_cached(
                "SELECT last_updated, deleted, owner FROM resource_history WHERE rid = ?1 AND last_updated <= ?2
                 ORDER BY version DESC LIMIT 1",
            )?
            .query_row(params![rid, at], row)
            .optional()?),
        None => Ok(None),
    }
}
