//! Associated data of Patient and Group exports: the reference index kept on write, and the
//! per-export set of Provenance and referenced resources computed from it.
//!
//! `reference_index` holds, per resource version, its references to types outside the Patient
//! compartment and its `Provenance.target` entries ([`outgoing_references`]), versioned by time
//! like the compartment index: a row is valid for `[from_ts, to_ts)`, and a delete closes the
//! rows. So "what did this resource reference at the transaction time" and "which Provenance
//! targeted this resource then" are exact whatever was written since.
//!
//! Planning works in temporary tables on a connection of its own whose temporary storage is a
//! file (bounded memory whatever the cohort's size), and stores the result in
//! `export_associated` in batches of short write transactions (under a set registered first,
//! see `plan_watermarks`).

use bulkhead_fhir::references::{outgoing_references, OutgoingReference};
use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::Value;

use super::export::{filter_matches, load_members, select_window, selected, type_span, Reach, VersionAt, WINDOW};
use super::write_memo::WriteMemo;
use super::{provenance_targets, SqliteStore};
use crate::cohort_keys::{CohortKeys, StashKey};
use crate::selection::{exported, visible_to, FoundNodes, Via};
use crate::{
    AssociatedRequest, MemberSelection, PartRange, PartReader, ProvenanceSelection, ReferencedTypes, StoreError,
    TenantId,
};

const REFERENCE_INDEX: &str = "
CREATE TABLE reference_index (
    rid INTEGER NOT NULL,
    provenance_target INTEGER NOT NULL,
    target_type TEXT NOT NULL,
    target_id TEXT NOT NULL,
    from_ts INTEGER NOT NULL,
    to_ts INTEGER,
    tenant_id INTEGER NOT NULL,
    target_rid INTEGER,
    PRIMARY KEY (rid, provenance_target, target_type, target_id, from_ts)
) WITHOUT ROWID;
";

/// Provenance target rows were once also indexed by `(tenant, target type, target id)`; the
/// target keys (`provenance_targets`) answer every lookup by target now, so a database that
/// still has that index loses it on open (one index fewer to write per target row).
const DROP_TARGET_ID_INDEX: &str = "DROP INDEX IF EXISTS provenance_by_target;";

/// The types of a tenant whose resources have ever referenced a resource outside the compartment
/// (only grows): planning follows no references from the other types' cohort resources.
const REFERENCING_TYPES: &str = "
CREATE TABLE IF NOT EXISTS referencing_types (
    tenant_id INTEGER NOT NULL,
    resource_type TEXT NOT NULL,
    PRIMARY KEY (tenant_id, resource_type)
) WITHOUT ROWID;
";

/// Per tenant and type (Provenance and the types outside the Patient compartment), the timestamp
/// of the last write of a resource of that type: the plan cache reuses an associated set only
/// while none of the types it can reach changed (see `plan_cache`). A type never written since
/// the table was made has no row (no write after any cached set's time).
const ASSOCIATED_TYPE_CHANGES: &str = "
CREATE TABLE IF NOT EXISTS associated_type_changes (
    tenant_id INTEGER NOT NULL,
    resource_type TEXT NOT NULL,
    changed_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, resource_type)
) WITHOUT ROWID;
";

/// Records that a resource of `resource_type` was written at `timestamp`, when an associated set
/// can reach that type (a Provenance, or a type outside the Patient compartment).
fn note_type_changed(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    resource_type: &str,
    timestamp: Micros,
) -> Result<(), StoreError> {
    if resource_type != "Provenance" && !bulkhead_fhir::references::is_referenced_type(resource_type) {
        return Ok(());
    }
    // Once per write and type: the write has one timestamp.
    if !memo.first_type_change(resource_type) {
        return Ok(());
    }
    transaction
        .prepare_cached(
            "INSERT INTO associated_type_changes (tenant_id, resource_type, changed_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (tenant_id, resource_type) DO UPDATE SET changed_at = MAX(changed_at, excluded.changed_at)",
        )?
        .execute(params![tenant.0, resource_type, timestamp])?;
    Ok(())
}

/// Notes that `resource_type` has references to follow in `tenant`.
fn note_referencing_type(connection: &Connection, tenant: i64, resource_type: &str) -> Result<(), StoreError> {
    connection
        .prepare_cached("INSERT OR IGNORE INTO referencing_types (tenant_id, resource_type) VALUES (?1, ?2)")?
        .execute(params![tenant, resource_type])?;
    Ok(())
}

/// Creates the reference index when the database has none, backfilling it from every stored
/// version (history included, so exports as of earlier transaction times stay exact), all in
/// one transaction: a crash leaves the database as it was, and the next open starts over.
pub(super) fn migrate(connection: &mut Connection) -> Result<u64, StoreError> {
    let exists: bool = connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reference_index')",
        [],
        |row| row.get(0),
    )?;
    connection.execute_batch(ASSOCIATED_TYPE_CHANGES)?;
    if exists {
        connection.execute_batch(REFERENCING_TYPES)?;
        provenance_targets::migrate(connection)?;
        connection.execute_batch(DROP_TARGET_ID_INDEX)?;
        return Ok(0);
    }
    let transaction = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    transaction.execute_batch(REFERENCE_INDEX)?;
    transaction.execute_batch(REFERENCING_TYPES)?;
    let backfilled = backfill(&transaction)?;
    provenance_targets::resolve_all(&transaction)?;
    transaction.commit()?;
    if backfilled > 0 {
        tracing::info!(resources = backfilled, "reference index backfilled from stored resources");
    }
    Ok(backfilled)
}

/// One stored version, oldest first, as the backfill replays it.
struct StoredVersion {
    last_updated: Micros,
    body: Option<String>,
}

fn backfill(transaction: &Transaction<'_>) -> Result<u64, StoreError> {
    let mut resources = transaction.prepare("SELECT rid, tenant_id, resource_type FROM resources ORDER BY rid")?;
    let mut history = transaction
        .prepare_cached("SELECT last_updated, deleted, body FROM resource_history WHERE rid = ?1 ORDER BY version")?;
    let mut current = transaction.prepare_cached("SELECT last_updated, deleted, body FROM resources WHERE rid = ?1")?;
    let mut insert = transaction.prepare_cached(
        "INSERT OR IGNORE INTO reference_index (rid, provenance_target, target_type, target_id, from_ts, to_ts, tenant_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut rows = resources.query([])?;
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let (rid, tenant, resource_type): (i64, i64, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
        let version = |row: &rusqlite::Row<'_>| {
            let deleted: bool = row.get(1)?;
            Ok(StoredVersion { last_updated: row.get(0)?, body: if deleted { None } else { row.get(2)? } })
        };
        let mut versions: Vec<StoredVersion> = history.query_map([rid], version)?.collect::<Result<_, _>>()?;
        versions.push(current.query_row([rid], version)?);
        // Replays the versions: a reference's row opens with the first version that has it and
        // closes with the first that does not.
        let mut open: Vec<(OutgoingReference, Micros)> = Vec::new();
        for version in &versions {
            let references = match &version.body {
                Some(body) => references_of(&resource_type, body)?,
                None => Vec::new(),
            };
            let mut still_open = Vec::new();
            for (reference, from) in open.drain(..) {
                if references.contains(&reference) {
                    still_open.push((reference, from));
                } else if from < version.last_updated {
                    insert.execute(params![
                        rid,
                        reference.provenance_target,
                        reference.target_type,
                        reference.target_id,
                        from,
                        version.last_updated,
                        tenant
                    ])?;
                }
            }
            if references.iter().any(|reference| !reference.provenance_target) {
                note_referencing_type(transaction, tenant, &resource_type)?;
            }
            for reference in references {
                if !still_open.iter().any(|(held, _)| *held == reference) {
                    still_open.push((reference, version.last_updated));
                }
            }
            open = still_open;
        }
        for (reference, from) in open {
            insert.execute(params![
                rid,
                reference.provenance_target,
                reference.target_type,
                reference.target_id,
                from,
                None::<i64>,
                tenant
            ])?;
        }
        count += 1;
    }
    Ok(count)
}

fn references_of(resource_type: &str, body: &str) -> Result<Vec<OutgoingReference>, StoreError> {
    let value: Value = serde_json::from_str(body)?;
    Ok(outgoing_references(resource_type, &value))
}

/// Brings a resource's open reference rows in line with its new version (written at
/// `timestamp`): closes the rows of references it dropped, opens rows for new ones.
#[allow(clippy::too_many_arguments)]
pub(super) fn sync_references(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    references: &[OutgoingReference],
    timestamp: Micros,
    is_new_row: bool,
) -> Result<(), StoreError> {
    note_type_changed(transaction, memo, tenant, resource_type, timestamp)?;
    if references.iter().any(|reference| !reference.provenance_target) && memo.first_referencing_type(resource_type) {
        note_referencing_type(transaction, tenant.0, resource_type)?;
    }
    let open: Vec<OutgoingReference> = if is_new_row { Vec::new() } else { open_references(transaction, rid)? };
    for gone in open.iter().filter(|reference| !references.contains(reference)) {
        close(transaction, rid, Some(gone), timestamp)?;
    }
    let mut insert = transaction.prepare_cached(provenance_targets::INSERT_REFERENCE)?;
    for reference in references.iter().filter(|reference| !open.contains(reference)) {
        if reference.provenance_target {
            memo.provenance_target_added();
        }
        insert.execute(params![
            rid,
            reference.provenance_target,
            reference.target_type,
            reference.target_id,
            timestamp,
            tenant.0
        ])?;
    }
    Ok(())
}

/// Closes every open reference row of a deleted resource.
pub(super) fn close_references(
    transaction: &Transaction<'_>,
    memo: &mut WriteMemo,
    tenant: TenantId,
    resource_type: &str,
    rid: i64,
    timestamp: Micros,
) -> Result<(), StoreError> {
    note_type_changed(transaction, memo, tenant, resource_type, timestamp)?;
    close(transaction, rid, None, timestamp)
}

fn open_references(connection: &Connection, rid: i64) -> Result<Vec<OutgoingReference>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT target_type, target_id, provenance_target FROM reference_index WHERE rid = ?1 AND to_ts IS NULL",
    )?;
    let open = statement
        .query_map([rid], |row| {
            Ok(OutgoingReference { target_type: row.get(0)?, target_id: row.get(1)?, provenance_target: row.get(2)? })
        })?
        .collect::<Result<_, _>>()?;
    Ok(open)
}

/// Closes the open row of `reference` (every open row when `None`) at `timestamp`. A row opened
/// at that very timestamp (an earlier write of the same transaction) is removed instead: it was
/// never valid at any time.
fn close(
    transaction: &Transaction<'_>,
    rid: i64,
    reference: Option<&OutgoingReference>,
    timestamp: Micros,
) -> Result<(), StoreError> {
    let (filter, values): (&str, Vec<Box<dyn rusqlite::ToSql>>) = match reference {
        Some(reference) => (
            " AND provenance_target = ?3 AND target_type = ?4 AND target_id = ?5",
            vec![
                Box::new(reference.provenance_target),
                Box::new(reference.target_type.clone()),
                Box::new(reference.target_id.clone()),
            ],
        ),
        None => ("", Vec::new()),
    };
    let mut all: Vec<&dyn rusqlite::ToSql> = vec![&rid, &timestamp];
    all.extend(values.iter().map(|value| value.as_ref()));
    transaction
        .prepare_cached(&format!(
            "DELETE FROM reference_index WHERE rid = ?1 AND to_ts IS NULL AND from_ts = ?2{filter}"
        ))?
        .execute(rusqlite::params_from_iter(all.iter()))?;
    transaction
        .prepare_cached(&format!("UPDATE reference_index SET to_ts = ?2 WHERE rid = ?1 AND to_ts IS NULL{filter}"))?
        .execute(rusqlite::params_from_iter(all.iter()))?;
    Ok(())
}

// ---- planning ----

const UPSERT_NODE: &str = "INSERT INTO temp.assoc_node (target_type, target_id, level, full_history, since, forced)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6)
    ON CONFLICT (target_type, target_id) DO UPDATE SET
        full_history = max(full_history, excluded.full_history),
        since = CASE WHEN since IS NULL THEN excluded.since WHEN excluded.since IS NULL THEN since
                     ELSE min(since, excluded.since) END,
        forced = max(forced, excluded.forced)
    WHERE level = excluded.level";

/// Rows stored in `export_associated` per write transaction.
const STORE_BATCH: usize = 10_000;
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
        let connection = super::open_connection(&self.path, self.options.reader_cache_mib)?;
        connection.execute_batch("PRAGMA temp_store = FILE;")?;
        connection.execute_batch(WORK_TABLES)?;
        connection.execute_batch("BEGIN DEFERRED")?;
        let computed = compute(self, &connection, tenant, selection, request);
        connection.execute_batch("COMMIT")?;
        computed?;
        // Stores the set and plans its parts from the same sorted stream.
        let mut statement = connection.prepare(
            "SELECT resource_type, rid FROM temp.assoc_out WHERE resource_type > ?1 OR (resource_type = ?1 AND rid > ?2)
             ORDER BY resource_type, rid LIMIT ?3",
        )?;
        let mut planned: Vec<(String, Vec<PartRange>)> = Vec::new();
        let mut after = (String::new(), i64::MIN);
        loop {
            let batch: Vec<(String, i64)> = statement
                .query_map(params![after.0, after.1, STORE_BATCH as i64], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let Some(last) = batch.last() else { break };
            after = last.clone();
            self.with_write(|transaction, _| {
                let mut insert = transaction.prepare_cached(
                    "INSERT OR IGNORE INTO export_associated (tenant_id, set_id, resource_type, rid, expires)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (resource_type, rid) in &batch {
                    insert.execute(params![tenant.0, request.set_id, resource_type, rid, request.expires])?;
                }
                Ok(())
            })?;
            for (resource_type, rid) in batch {
                if planned.last().is_none_or(|(planned_type, _)| *planned_type != resource_type) {
                    planned.push((resource_type.clone(), Vec::new()));
                }
                let parts = &mut planned.last_mut().expect("pushed above").1;
                match parts.last_mut() {
                    Some(part) if part.count < part_size.max(1) => {
                        part.last_key = rid;
                        part.count += 1;
                    }
                    _ => parts.push(PartRange { first_key: rid, last_key: rid, count: 1 }),
                }
            }
        }
        Ok(planned)
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
    let mut sources: Vec<&String> = Vec::new();
    if referencing {
        sources.extend(&request.reference_sources);
    }
    if any_provenance {
        for resource_type in &request.provenance_sources {
            if !sources.contains(&resource_type) {
                sources.push(resource_type);
            }
        }
    }
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
        None => super::cohort::read(store, tenant, selection, &source_types)?,
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

/// What the cohort's resources in one window reach: their references (level-1 nodes) and their
/// Provenance. The window's resources are found through `cohort` (`selection` without
/// `_typeFilter`), and only those the export sends (selected and, for a filtered type, matching)
/// force what they reach.
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
    let filtered = selection.filters.filters(resource_type);
    let sent = |rid: i64, history_version: i64| -> Result<bool, StoreError> {
        Ok(!filtered || filter_matches(connection, selection, resource_type, rid, history_version)?)
    };
    let mut chosen: Vec<(i64, Via)> = Vec::new();
    match cohort.keys.filter(|keys| keys.covers(resource_type)) {
        Some(keys) => super::cohort::visit(keys, connection, cohort.selection, resource_type, span, |found| {
            if found.live {
                let forced = found.selected && sent(found.rid, found.history_version)?;
                chosen.push((found.rid, Via { reach: found.reach, forced }));
            }
            Ok(())
        })?,
        None => {
            let live = |_: Reach, version: &VersionAt| !version.deleted && version.visible;
            select_window(connection, tenant, cohort.selection, resource_type, span, live, |found| {
                let forced =
                    selected(selection, found.reach, &found.version) && sent(found.rid, found.history_version)?;
                chosen.push((found.rid, Via { reach: found.reach, forced }));
                Ok(())
            })?
        }
    }
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

/// Whether a window's chosen keys are dense in its key range (more than one key in `DENSE`):
/// one scan of the range then reads fewer index entries than one seek per chosen resource.
/// (Lower in unit tests, so the conformance suite's tiny windows take both paths.)
fn dense(chosen: usize, (start, end): (i64, i64)) -> bool {
    const DENSE: i64 = if cfg!(test) { 2 } else { 4 };
    (chosen as i64).saturating_mul(DENSE) > end - start
}

/// Finds keys in a window's chosen resources (sorted by key) for keys that arrive in ascending
/// order, as a range scan's rows do: a walk forward instead of a binary search per row (those
/// searches were ~8 % of a first manifest's time at 10,000 members, session 9). A key below the
/// last one found is still found, by a binary search.
struct SortedKeys<'a> {
    chosen: &'a [(i64, Via)],
    next: usize,
}

impl<'a> SortedKeys<'a> {
    fn new(chosen: &'a [(i64, Via)]) -> Self {
        SortedKeys { chosen, next: 0 }
    }

    /// The index of `key` in the chosen resources.
    fn position(&mut self, key: i64) -> Option<usize> {
        if self.next > 0 && self.chosen[self.next - 1].0 >= key {
            self.next = self.chosen.partition_point(|(held, _)| *held < key);
        }
        while self.chosen.get(self.next).is_some_and(|(held, _)| *held < key) {
            self.next += 1;
        }
        self.chosen.get(self.next).is_some_and(|(held, _)| *held == key).then_some(self.next)
    }
}

/// Adds the references of the window's chosen resources (sorted by key) to `nodes`. A dense
/// window (a large cohort, or a type imported in one go) reads the index once over the key
/// range instead of seeking per resource.
fn add_window_references(
    connection: &Connection,
    chosen: &[(i64, Via)],
    (start, end): (i64, i64),
    at: Micros,
    nodes: &mut FoundNodes<'_>,
) -> Result<(), StoreError> {
    let (Some(&(first, _)), Some(&(last, _))) = (chosen.first(), chosen.last()) else { return Ok(()) };
    if !dense(chosen.len(), (start, end)) {
        for &(rid, via) in chosen {
            add_references(connection, rid, at, via, nodes)?;
        }
        return Ok(());
    }
    let mut references = connection.prepare_cached(
        "SELECT rid, target_type, target_id FROM reference_index
         WHERE rid BETWEEN ?1 AND ?2 AND provenance_target = 0 AND from_ts <= ?3 AND (to_ts IS NULL OR to_ts > ?3)
         ORDER BY rid",
    )?;
    let mut rows = references.query(params![first, last, at])?;
    let mut found_in = SortedKeys::new(chosen);
    while let Some(row) = rows.next()? {
        let rid: i64 = row.get(0)?;
        let Some(index) = found_in.position(rid) else { continue };
        nodes.add(row.get_ref(1)?.as_str()?, row.get_ref(2)?.as_str()?, chosen[index].1);
    }
    Ok(())
}

/// Adds the references of `rid`'s version at `at` to `nodes`.
fn add_references(
    connection: &Connection,
    rid: i64,
    at: Micros,
    via: Via,
    nodes: &mut FoundNodes<'_>,
) -> Result<(), StoreError> {
    let mut references = connection.prepare_cached(
        "SELECT target_type, target_id FROM reference_index
         WHERE rid = ?1 AND provenance_target = 0 AND from_ts <= ?2 AND (to_ts IS NULL OR to_ts > ?2)",
    )?;
    let mut rows = references.query(params![rid, at])?;
    while let Some(row) = rows.next()? {
        nodes.add(row.get_ref(0)?.as_str()?, row.get_ref(1)?.as_str()?, via);
    }
    Ok(())
}

/// Nodes held at most: [`record_nodes_if_full`] records them once they are this many.
const NODE_BATCH: usize = 50_000;

/// Records `nodes` in `temp.assoc_node` ([`UPSERT_NODE`] merges alike) once they hold
/// [`NODE_BATCH`]: called after each batch of additions, it bounds what they hold.
fn record_nodes_if_full(nodes: &mut FoundNodes<'_>, connection: &Connection) -> Result<(), StoreError> {
    if nodes.len() >= NODE_BATCH {
        record_nodes(nodes, connection)?;
    }
    Ok(())
}

/// Records the nodes held as nodes of their level, merging with those recorded earlier; a node
/// recorded at a lower level stays as it is.
fn record_nodes(nodes: &mut FoundNodes<'_>, connection: &Connection) -> Result<(), StoreError> {
    let mut upsert = connection.prepare_cached(UPSERT_NODE)?;
    let level = nodes.level();
    for (target_type, ids) in nodes.drain() {
        for (target_id, via) in ids {
            upsert.execute(params![
                target_type,
                target_id,
                level,
                via.reach.full_history,
                via.reach.existing_since,
                via.forced
            ])?;
        }
    }
    Ok(())
}

/// The Provenance found through one window of cohort resources, merged in memory and recorded
/// once each ([`FoundProvenance::record`]): a Provenance usually targets many resources of a
/// window. Bounded by the window's resources and their targeting rows.
#[derive(Default)]
struct FoundProvenance {
    found: std::collections::HashMap<i64, Via>,
}

impl FoundProvenance {
    /// Merges `via` into what reaches Provenance `rid`.
    fn add(&mut self, rid: i64, via: Via) {
        self.found.entry(rid).and_modify(|held| *held = held.merge(via)).or_insert(via);
    }

    /// Records the window's Provenance in `temp.assoc_provenance`, merging with earlier windows'.
    fn record(self, connection: &Connection) -> Result<(), StoreError> {
        let mut upsert = connection.prepare_cached(
            "INSERT INTO temp.assoc_provenance (rid, full_history, since, forced) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (rid) DO UPDATE SET
                 full_history = max(full_history, excluded.full_history),
                 since = CASE WHEN since IS NULL THEN excluded.since WHEN excluded.since IS NULL THEN since
                              ELSE min(since, excluded.since) END,
                 forced = max(forced, excluded.forced)",
        )?;
        for (rid, via) in self.found {
            upsert.execute(params![rid, via.reach.full_history, via.reach.existing_since, via.forced])?;
        }
        Ok(())
    }
}

/// Provenance states remembered at most: past it, [`ProvenanceStates`] starts over.
const STATE_CACHE: usize = 100_000;

/// Each Provenance looked up so far during one planning: `Some(lastUpdated)` when its version
/// at the transaction time is live and visible. Kept across windows (a Provenance usually
/// targets resources of several windows and types), bounded by [`STATE_CACHE`].
#[derive(Default)]
struct ProvenanceStates(std::collections::HashMap<i64, Option<Micros>>);

impl ProvenanceStates {
    fn live(
        &mut self,
        connection: &Connection,
        selection: &MemberSelection,
        rid: i64,
    ) -> Result<Option<Micros>, StoreError> {
        if let Some(live) = self.0.get(&rid) {
            return Ok(*live);
        }
        if self.0.len() >= STATE_CACHE {
            self.0.clear();
        }
        // A target row valid at the transaction time means that version was live then; the
        // owner decides visibility, the version's time which one is latest.
        let live = state_at(connection, rid, selection.transaction_time)?
            .filter(|state| !state.deleted && visible_to(selection, state.owner.as_deref()))
            .map(|state| state.last_updated);
        self.0.insert(rid, live);
        Ok(live)
    }
}

/// One window of chosen cohort resources of one type, sorted by key, with what reaches each.
struct ProvenanceWindow<'a> {
    resource_type: &'a str,
    chosen: &'a [(i64, Via)],
    /// The window's key range.
    span: (i64, i64),
}

/// Finds the Provenance that targeted the window's resources at the transaction time (only the
/// latest one per resource for [`ProvenanceSelection::Latest`]), merging each resource's `via`
/// into those found. Target rows carry their target's key (`target_rid`): a dense window reads
/// the rows targeting its key range in one scan of `provenance_by_target_rid` (the index leads
/// with the type, so other types' keys in the range are not read), a sparse one seeks per
/// resource.
fn find_window_provenance(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    window: ProvenanceWindow<'_>,
    mode: ProvenanceSelection,
    states: &mut ProvenanceStates,
    found: &mut FoundProvenance,
) -> Result<(), StoreError> {
    let ProvenanceWindow { resource_type, chosen, span } = window;
    let (Some(&(first, _)), Some(&(last, _))) = (chosen.first(), chosen.last()) else { return Ok(()) };
    let at = selection.transaction_time;
    // `(index in chosen, Provenance key)` of the rows valid at the transaction time, by target.
    let mut targeting: Vec<(usize, i64)> = Vec::new();
    if dense(chosen.len(), span) {
        let mut statement = connection.prepare_cached(
            "SELECT target_rid, rid FROM reference_index INDEXED BY provenance_by_target_rid
             WHERE tenant_id = ?1 AND target_type = ?2 AND target_rid BETWEEN ?3 AND ?4 AND provenance_target = 1
               AND from_ts <= ?5 AND (to_ts IS NULL OR to_ts > ?5)
             ORDER BY target_rid",
        )?;
        let mut rows = statement.query(params![tenant.0, resource_type, first, last, at])?;
        let mut found_in = SortedKeys::new(chosen);
        while let Some(row) = rows.next()? {
            let target: i64 = row.get(0)?;
            if let Some(index) = found_in.position(target) {
                targeting.push((index, row.get(1)?));
            }
        }
    } else {
        let mut statement = connection.prepare_cached(
            "SELECT rid FROM reference_index INDEXED BY provenance_by_target_rid
             WHERE tenant_id = ?1 AND target_type = ?2 AND target_rid = ?3 AND provenance_target = 1
               AND from_ts <= ?4 AND (to_ts IS NULL OR to_ts > ?4)",
        )?;
        for (index, &(rid, _)) in chosen.iter().enumerate() {
            let mut rows = statement.query(params![tenant.0, resource_type, rid, at])?;
            while let Some(row) = rows.next()? {
                targeting.push((index, row.get(0)?));
            }
        }
    }
    let mut candidates: Vec<(Micros, i64)> = Vec::new();
    for rows in targeting.chunk_by(|a, b| a.0 == b.0) {
        candidates.clear();
        for &(_, provenance) in rows {
            if let Some(last_updated) = states.live(connection, selection, provenance)? {
                candidates.push((last_updated, provenance));
            }
        }
        if mode == ProvenanceSelection::Latest {
            candidates.sort_unstable();
            candidates.drain(..candidates.len().saturating_sub(1));
        }
        let via = chosen[rows[0].0].1;
        for &(_, provenance) in &candidates {
            found.add(provenance, via);
        }
    }
    Ok(())
}

fn via_from_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Via> {
    Ok(Via {
        reach: Reach { full_history: row.get(first)?, existing_since: row.get(first + 1)? },
        forced: row.get(first + 2)?,
    })
}

/// Moves the found Provenance into the output, and adds their references to the level-1 `nodes`.
fn resolve_provenance(
    connection: &Connection,
    selection: &MemberSelection,
    referencing: bool,
    nodes: &mut FoundNodes<'_>,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let mut batch_statement = connection.prepare(
        "SELECT rid, full_history, since, forced FROM temp.assoc_provenance WHERE rid > ?1 ORDER BY rid LIMIT ?2",
    )?;
    let mut output = connection
        .prepare_cached("INSERT OR IGNORE INTO temp.assoc_out (resource_type, rid) VALUES ('Provenance', ?1)")?;
    let mut after = i64::MIN;
    loop {
        let batch: Vec<(i64, Via)> = batch_statement
            .query_map(params![after, LEVEL_BATCH as i64], |row| Ok((row.get(0)?, via_from_row(row, 1)?)))?
            .collect::<Result<_, _>>()?;
        let Some(&(last, _)) = batch.last() else { return Ok(()) };
        after = last;
        for (rid, via) in batch {
            let Some(state) = state_at(connection, rid, at)? else { continue };
            let sent = exported(selection, via, state.last_updated);
            if sent {
                output.execute([rid])?;
            }
            if referencing {
                add_references(connection, rid, at, Via { forced: sent, ..via }, nodes)?;
            }
        }
        record_nodes_if_full(nodes, connection)?;
    }
}

/// Resolves the nodes of one level: those live and visible at the transaction time join the
/// output when [`exported`]; below the depth limit, their own references become the next level.
fn resolve_level(
    connection: &Connection,
    tenant: TenantId,
    selection: &MemberSelection,
    request: &AssociatedRequest,
    level: u32,
) -> Result<(), StoreError> {
    let at = selection.transaction_time;
    let mut batch_statement = connection.prepare(
        "SELECT target_type, target_id, full_history, since, forced FROM temp.assoc_node
         WHERE level = ?1 AND (target_type > ?2 OR (target_type = ?2 AND target_id > ?3))
         ORDER BY target_type, target_id LIMIT ?4",
    )?;
    let mut rid_of = connection
        .prepare_cached("SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3")?;
    let mut output =
        connection.prepare_cached("INSERT OR IGNORE INTO temp.assoc_out (resource_type, rid) VALUES (?1, ?2)")?;
    let mut next = FoundNodes::new(level + 1, &request.referenced);
    let mut after = (String::new(), String::new());
    loop {
        let batch: Vec<(String, String, Via)> = batch_statement
            .query_map(params![level, after.0, after.1, LEVEL_BATCH as i64], |row| {
                Ok((row.get(0)?, row.get(1)?, via_from_row(row, 2)?))
            })?
            .collect::<Result<_, _>>()?;
        let Some(last) = batch.last() else { break };
        after = (last.0.clone(), last.1.clone());
        for (target_type, target_id, via) in batch {
            let rid: Option<i64> =
                rid_of.query_row(params![tenant.0, target_type, target_id], |row| row.get(0)).optional()?;
            let Some(rid) = rid else { continue }; // referenced, never stored
            let Some(state) = state_at(connection, rid, at)? else { continue };
            if state.deleted || !visible_to(selection, state.owner.as_deref()) {
                continue;
            }
            let sent = exported(selection, via, state.last_updated);
            if sent {
                output.execute(params![target_type, rid])?;
            }
            if level < request.depth {
                add_references(connection, rid, at, Via { forced: sent, ..via }, &mut next)?;
            }
        }
        record_nodes_if_full(&mut next, connection)?;
    }
    // The next level's nodes are all recorded before it is resolved.
    record_nodes(&mut next, connection)
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

// ---- reading ----

/// Keys of a stored set read per window.
const READ_BATCH: i64 = 512;

/// Reads one part of a stored associated set: each window is one short read transaction.
pub(super) struct AssociatedPartReader<'a> {
    pub(super) store: &'a SqliteStore,
    pub(super) tenant: TenantId,
    pub(super) selection: &'a MemberSelection,
    pub(super) set_id: &'a str,
    pub(super) resource_type: &'a str,
    /// The next key to read; `None` once the part is complete.
    pub(super) next_key: Option<i64>,
    pub(super) last_key: i64,
}

impl PartReader for AssociatedPartReader<'_> {
    fn next_window(&mut self, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError> {
        let Some(next_key) = self.next_key else { return Ok(0) };
        let at = self.selection.transaction_time;
        let (start_len, last_key) = (out.len(), self.last_key);
        let (tenant, set_id, resource_type) = (self.tenant, self.set_id, self.resource_type);
        let (count, next) = self.store.with_snapshot(|connection| {
            let mut keys = connection.prepare_cached(
                "SELECT rid FROM export_associated WHERE tenant_id = ?1 AND set_id = ?2 AND resource_type = ?3
                   AND rid BETWEEN ?4 AND ?5 ORDER BY rid LIMIT ?6",
            )?;
            let rids: Vec<i64> = keys
                .query_map(params![tenant.0, set_id, resource_type, next_key, last_key, READ_BATCH], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let mut count = 0u64;
            let mut next = None;
            for (index, rid) in rids.iter().enumerate() {
                if out.len() - start_len >= max_bytes {
                    next = Some(*rid);
                    break;
                }
                append_version_at(connection, *rid, at, out)?;
                count += 1;
                if index + 1 == rids.len() && rids.len() as i64 == READ_BATCH && *rid < last_key {
                    next = Some(rid + 1);
                }
            }
            Ok((count, next))
        })?;
        self.next_key = next;
        if count == 0 && next.is_some() {
            // Cannot happen (max_bytes > 0 reads at least one), but never loop without progress.
            return Err(StoreError::Database("export: associated part made no progress".into()));
        }
        Ok(count)
    }
}

/// Appends the body of `rid`'s version at `at` as one NDJSON line.
fn append_version_at(connection: &Connection, rid: i64, at: Micros, out: &mut Vec<u8>) -> Result<(), StoreError> {
    let mut current = connection.prepare_cached("SELECT last_updated, body FROM resources WHERE rid = ?1")?;
    let mut earlier = connection.prepare_cached(
        "SELECT body FROM resource_history WHERE rid = ?1 AND last_updated <= ?2 ORDER BY version DESC LIMIT 1",
    )?;
    let mut rows = current.query([rid])?;
    let appended = match rows.next()? {
        Some(row) if row.get::<_, i64>(0)? <= at => append(row.get_ref(1)?.as_bytes_or_null()?, out),
        Some(_) => {
            let mut then = earlier.query(params![rid, at])?;
            match then.next()? {
                Some(row) => append(row.get_ref(0)?.as_bytes_or_null()?, out),
                None => false,
            }
        }
        None => false,
    };
    if !appended {
        return Err(StoreError::Database(format!("export: no stored version of resource {rid} at {at}")));
    }
    Ok(())
}

fn append(body: Option<&[u8]>, out: &mut Vec<u8>) -> bool {
    let Some(body) = body else { return false };
    out.extend_from_slice(body);
    out.push(b'\n');
    true
}

pub(super) fn associated_ids(
    connection: &Connection,
    tenant: TenantId,
    set_id: &str,
    resource_type: &str,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM resources r JOIN export_associated a
                        ON a.tenant_id = r.tenant_id AND a.resource_type = r.resource_type AND a.rid = r.rid
                        WHERE r.tenant_id = ?1 AND r.resource_type = ?2 AND r.id = ?3 AND a.set_id = ?4)",
    )?;
    let mut held = Vec::new();
    for id in ids {
        if statement.query_row(params![tenant.0, resource_type, id, set_id], |row| row.get::<_, bool>(0))? {
            held.push(id.clone());
        }
    }
    Ok(held)
}

/// The Provenance whose target rows valid at `at` name one of `targets` (a deleted Provenance's
/// rows are closed), sorted and deduplicated. A target row carries the key of the resource it
/// names whenever that resource has a row, and no key otherwise (`provenance_targets`), so each
/// target is one seek into `provenance_by_target_rid` or, for a resource without a row, into
/// `provenance_unresolved`.
pub(super) fn provenance_targeting(
    connection: &Connection,
    tenant: TenantId,
    targets: &[(String, String)],
    at: Micros,
) -> Result<Vec<String>, StoreError> {
    let mut key = connection
        .prepare_cached("SELECT rid FROM resources WHERE tenant_id = ?1 AND resource_type = ?2 AND id = ?3")?;
    let mut by_key = connection.prepare_cached(
        "SELECT r.id FROM reference_index x INDEXED BY provenance_by_target_rid JOIN resources r ON r.rid = x.rid
         WHERE x.tenant_id = ?1 AND x.target_type = ?2 AND x.target_rid = ?3 AND x.provenance_target = 1
           AND x.from_ts <= ?4 AND (x.to_ts IS NULL OR x.to_ts > ?4)",
    )?;
    let mut unresolved = connection.prepare_cached(
        "SELECT r.id FROM reference_index x INDEXED BY provenance_unresolved JOIN resources r ON r.rid = x.rid
         WHERE x.tenant_id = ?1 AND x.target_type = ?2 AND x.target_id = ?3 AND x.provenance_target = 1
           AND x.target_rid IS NULL AND x.from_ts <= ?4 AND (x.to_ts IS NULL OR x.to_ts > ?4)",
    )?;
    let mut ids = Vec::new();
    for (target_type, target_id) in targets {
        let target: Option<i64> =
            key.query_row(params![tenant.0, target_type, target_id], |row| row.get(0)).optional()?;
        let mut rows = match target {
            Some(target) => by_key.query(params![tenant.0, target_type, target, at])?,
            None => unresolved.query(params![tenant.0, target_type, target_id, at])?,
        };
        while let Some(row) = rows.next()? {
            ids.push(row.get::<_, String>(0)?);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys are found walking forward, repeated, skipped, missing, or going back.
    #[test]
    fn sorted_keys_find_every_key_in_any_order() {
        let via = Via { reach: Reach { full_history: true, existing_since: None }, forced: true };
        let chosen: Vec<(i64, Via)> = [2, 5, 9, 14].iter().map(|&key| (key, via)).collect();
        let mut keys = SortedKeys::new(&chosen);
        let found: Vec<Option<usize>> = [1, 2, 2, 5, 6, 14, 9, 15, 2].iter().map(|&key| keys.position(key)).collect();
        assert_eq!(found, [None, Some(0), Some(0), Some(1), None, Some(3), Some(2), None, Some(0)]);
    }
}
