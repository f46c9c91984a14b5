//! The embedded SQLite store (WAL mode): one writer connection, a small pool of readers.

mod admin;
mod associated;
mod audit;
pub mod backup;
mod cohort;
mod export;
mod jobs;
mod leases;
mod migrate;
mod part_reader;
mod plan_watermarks;
mod provenance_targets;
mod resources;
mod retention;
mod shared_state;
mod write_memo;

use std::path::Path;
use std::sync::Mutex;

use bulkhead_fhir::{now_micros, Micros};
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use crate::{
    AssociatedPlan, AssociatedRequest, AuditQuery, AuditRecord, AuditRecords, ClientRecord, ClientRegistration,
    ExportJob, ExportJobState, ExportRecord, MemberSelection, PartRange, PartReader, PruneReport, SearchPage,
    SearchQuery, StorageBytes, StoreError, StoredResource, Tenant, TenantId, Visibility, WriteMode, WriteOp, Written,
};

const SCHEMA: &str = include_str!("schema.sql");

/// The WAL size the store returns to once no reader pins it (`journal_size_limit`, and the
/// size above which [`SqliteStore::checkpoint_wal`] truncates it).
pub const WAL_SIZE_LIMIT: u64 = 32 * 1024 * 1024;

/// Memory the store may use for page caches: each open connection holds its own cache.
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    pub writer_cache_mib: u32,
    pub reader_cache_mib: u32,
    /// Idle read connections kept open.
    pub idle_readers: usize,
    /// A cap on the database file, in pages (`PRAGMA max_page_count`): writes past it fail as
    /// [`StoreError::StorageFull`], as on a full disk. `None`: no cap but the disk's.
    pub max_page_count: Option<u64>,
    /// WAL pages after which a commit checkpoints (`PRAGMA wal_autocheckpoint`). A bulk load
    /// rewrites the same index pages in every batch: checkpointing less often copies each of them
    /// into the database file fewer times.
    pub wal_autocheckpoint_pages: u32,
}

impl Default for SqliteOptions {
    /// Sized for a server: its memory must stay small during exports of any size.
    fn default() -> Self {
        SqliteOptions {
            writer_cache_mib: 16,
            reader_cache_mib: 4,
            idle_readers: 4,
            max_page_count: None,
            // SQLite's default: 16 MiB of 16 KiB pages.
            wal_autocheckpoint_pages: 1000,
        }
    }
}

impl SqliteOptions {
    /// Sized for a bulk load, within an import's 400 MB budget: a writer cache for the indexes'
    /// hot pages, the rest for a transaction's batches in flight. A commit rewrites every leaf its
    /// random keys touched, so memory buys more as larger transactions than as cache (the leaves
    /// are in the OS's page cache anyway): 64 MiB here, beside `bulkhead import`'s 48 MiB
    /// transactions (BENCHMARKS.md, session 14).
    pub fn bulk_load() -> Self {
        // 128 MiB of WAL between checkpoints (disk, not memory: the WAL index is 1/500 of it).
        SqliteOptions { writer_cache_mib: 64, wal_autocheckpoint_pages: 8192, ..SqliteOptions::default() }
    }
}

/// The SQLite implementation of [`crate::Store`].
pub struct SqliteStore {
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    path: std::path::PathBuf,
    options: SqliteOptions,
    plans: crate::plan_cache::PlanCache,
    /// The cohort keys of the last count pass, for the associated-data pass after it.
    cohorts: crate::cohort_keys::CohortStash,
}

pub use crate::plan_cache::PlanCacheStats;

/// Bytes SQLite has allocated now, and the most it had since the process started (page caches,
/// schemas, prepared statements, in-memory temporary tables of every connection).
pub fn sqlite_memory() -> (i64, i64) {
    // SAFETY: both only read SQLite's global memory statistics.
    unsafe { (rusqlite::ffi::sqlite3_memory_used(), rusqlite::ffi::sqlite3_memory_highwater(0)) }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies the schema.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, SqliteOptions::default())
    }

    pub fn open_with(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let mut writer = open_connection(path, options.writer_cache_mib)?;
        migrate::migrate_v1_to_v2(&mut writer, SCHEMA)?;
        audit::migrate(&mut writer, SCHEMA)?;
        audit::drop_patient_table(&writer)?;
        writer.execute_batch(SCHEMA)?;
        jobs::migrate(&writer)?;
        leases::migrate(&mut writer)?;
        associated::migrate(&mut writer)?;
        plan_watermarks::migrate(&mut writer)?;
        plan_watermarks::migrate_tenant_changes(&mut writer)?;
        // An acknowledged write survives power loss, not only a crash of the process: each
        // commit syncs the WAL (`NORMAL` syncs it only at checkpoints). Readers never commit.
        writer.pragma_update(None, "synchronous", "FULL")?;
        writer.pragma_update(None, "wal_autocheckpoint", options.wal_autocheckpoint_pages)?;
        if let Some(pages) = options.max_page_count {
            // Per connection; only the writer grows the file.
            writer.pragma_update(None, "max_page_count", pages)?;
        }
        Ok(SqliteStore {
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            path: path.to_owned(),
            options,
            plans: crate::plan_cache::PlanCache::default(),
            cohorts: crate::cohort_keys::CohortStash::default(),
        })
    }

    /// Whether a result computed at `planned_at` for `selection`'s members is still exact.
    fn members_unchanged_since(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        planned_at: Micros,
    ) -> Result<bool, StoreError> {
        let tenant_latest = || self.with_read(|connection| plan_watermarks::tenant_latest_change(connection, tenant));
        self.plans.members_unchanged_since(tenant, selection, planned_at, tenant_latest, || {
            self.with_snapshot(|connection| {
                export::load_members(connection, tenant, selection)?;
                plan_watermarks::members_latest_change(connection)
            })
        })
    }

    /// [`crate::Store::plan_parts`], computed.
    fn compute_plan(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_types: &[String],
        part_size: u64,
    ) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
        // The cohort's keys of every type in one pass over the members (types it does not
        // cover are read a key window at a time). Patient's too: the associated-data pass that
        // follows finds Provenance through it even when it is not exported (the pass reads every
        // type's rows anyway; a type costs only its keys' bytes).
        let mut type_names: Vec<&str> = resource_types.iter().map(String::as_str).collect();
        if !type_names.contains(&"Patient") {
            type_names.push("Patient");
        }
        let read = cohort::read(self, tenant, selection, &type_names)?;
        let cohort = read.as_ref();
        // Types are planned on several connections at once, one per core. A type's plan depends
        // only on the transaction time, so the workers' snapshots agree.
        let next_type = std::sync::atomic::AtomicUsize::new(0);
        let worker = || {
            self.with_snapshot(|connection| {
                export::load_members(connection, tenant, selection)?;
                let mut planned = Vec::new();
                loop {
                    let index = next_type.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(resource_type) = resource_types.get(index) else { return Ok(planned) };
                    planned.push((
                        index,
                        export::plan_type(connection, tenant, selection, resource_type, part_size, cohort)?,
                    ));
                }
            })
        };
        let workers = std::thread::available_parallelism().map_or(1, |cores| cores.get()).clamp(1, 4);
        let mut planned = std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..workers).map(|_| scope.spawn(worker)).collect();
            let mut planned = worker()?;
            for helper in helpers {
                let helped =
                    helper.join().map_err(|_| StoreError::Database("export planning thread panicked".into()))?;
                planned.extend(helped?);
            }
            Ok::<_, StoreError>(planned)
        })?;
        planned.sort_unstable_by_key(|(index, _)| *index);
        if let Some(read) = read {
            self.cohorts.put(crate::cohort_keys::StashKey::of(tenant, selection), read);
        }
        Ok(planned
            .into_iter()
            .filter(|(_, parts)| !parts.is_empty())
            .map(|(index, parts)| (resource_types[index].clone(), parts))
            .collect())
    }

    /// Copies the WAL back into the database and truncates it when it has grown past
    /// [`WAL_SIZE_LIMIT`] (writers' automatic checkpoints only restart it from its beginning).
    /// Never waits long: with readers or a writer in the way it checkpoints what it can and
    /// returns. Returns the WAL's size afterwards, in bytes.
    pub fn checkpoint_wal(&self) -> Result<u64, StoreError> {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let wal = std::path::PathBuf::from(wal);
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |metadata| metadata.len());
        if size(&wal) <= WAL_SIZE_LIMIT {
            return Ok(size(&wal));
        }
        let connection = open_connection(&self.path, 1)?;
        connection.busy_timeout(std::time::Duration::from_millis(100))?;
        let (busy, frames, copied): (i64, i64, i64) =
            connection
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        tracing::debug!(busy, frames, copied, "wal checkpoint");
        Ok(size(&wal))
    }

    /// [`crate::Store::write_audited`] with what was prepared for the ops (`prepared[i]` for
    /// `ops[i]`; missing entries: nothing).
    fn write_ops(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        ops: &[WriteOp],
        prepared: &[Option<crate::PreparedWrite>],
        mode: WriteMode,
        audit_records: &AuditRecords<'_>,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        self.with_write(|transaction, timestamp| {
            let mut memo = write_memo::WriteMemo::default();
            let results = apply_ops(transaction, &mut memo, tenant, owner, ops, prepared, mode, timestamp)?;
            audit::append(transaction, &audit_records(&results))?;
            Ok(results)
        })
    }

    /// Runs `work` inside an immediate (write-locked) transaction with a fresh timestamp,
    /// committing only when it returns `Ok`.
    fn with_write<T>(
        &self,
        work: impl FnOnce(&Transaction<'_>, Micros) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_untimed_write(|transaction| work(transaction, next_timestamp(transaction)?))
    }

    /// [`SqliteStore::with_write`] for work that needs no timestamp (the audit trail's own
    /// records): the clock row is not touched, so the commit writes one page less.
    fn with_untimed_write<T>(
        &self,
        work: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut connection = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let result = work(&transaction)?;
        transaction.commit()?;
        Ok(result)
    }

    /// Runs `work` on a read connection inside one read transaction, so every statement it runs
    /// sees the same committed state.
    fn with_snapshot<T>(&self, work: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.with_read(|connection| {
            connection.execute_batch("BEGIN DEFERRED")?;
            let result = work(connection);
            connection.execute_batch("COMMIT")?;
            result
        })
    }

    /// Runs `work` on a pooled read connection.
    fn with_read<T>(&self, work: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let pooled = self.readers.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        let connection = match pooled {
            Some(connection) => connection,
            None => open_connection(&self.path, self.options.reader_cache_mib)?,
        };
        let result = work(&connection);
        // Keep a handful of idle readers; a connection mid-transaction is never returned.
        if connection.is_autocommit() {
            let mut readers = self.readers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if readers.len() < self.options.idle_readers {
                readers.push(connection);
            }
        }
        result
    }
}

fn open_connection(path: &Path, cache_mib: u32) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)?;
    connection.busy_timeout(std::time::Duration::from_secs(10))?;
    // Larger pages mean fewer reads per exported resource (bodies are ~1 KiB). The page size
    // only takes effect while a database is still empty, and switching to WAL writes the file
    // header, so it comes first (on an existing database it changes nothing).
    connection.execute_batch(
        "PRAGMA page_size = 16384;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA temp_store = MEMORY;",
    )?;
    // When a checkpoint lets the WAL start over, it is cut back to this size.
    connection.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT as i64)?;
    connection.pragma_update(None, "cache_size", -(i64::from(cache_mib) * 1024))?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

/// Applies `ops` in an open transaction at `timestamp`: in `Transaction` mode the first failed
/// entry fails the whole (the caller rolls back); in `Batch` mode each entry in a savepoint of
/// its own, a failed one rolled back and reported in its place.
#[allow(clippy::too_many_arguments)]
fn apply_ops(
    transaction: &Transaction<'_>,
    memo: &mut write_memo::WriteMemo,
    tenant: TenantId,
    owner: Option<&str>,
    ops: &[WriteOp],
    prepared: &[Option<crate::PreparedWrite>],
    mode: WriteMode,
    timestamp: Micros,
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let mut results = Vec::with_capacity(ops.len());
    // A transaction's new rows first, in key order (a failed entry rolls everything back).
    let mut first_passes = match mode {
        WriteMode::Transaction => resources::insert_new_rows(transaction, tenant, owner, ops, prepared, timestamp)?,
        WriteMode::Batch => Vec::new(),
    }
    .into_iter();
    for (index, op) in ops.iter().enumerate() {
        let prepared = prepared.get(index).and_then(Option::as_ref);
        let first = first_passes.next().unwrap_or(resources::FirstPass::NotTried);
        match mode {
            WriteMode::Transaction => {
                results.push(Ok(resources::apply(transaction, memo, tenant, owner, op, prepared, first, timestamp)?));
            }
            WriteMode::Batch => {
                // A savepoint per entry: a failed entry leaves no partial rows behind (and its
                // pending target rows are dropped with the memo: the earlier entries' are written).
                memo.flush_targets(transaction, tenant)?;
                transaction.prepare_cached("SAVEPOINT entry")?.execute([])?;
                let result = resources::apply(transaction, memo, tenant, owner, op, prepared, first, timestamp);
                // The store's own failure ends the whole write; SQLite may already have
                // rolled the transaction back (it does on SQLITE_FULL), savepoint and all.
                if let Err(error) = result {
                    if error.is_store_failure() {
                        return Err(error);
                    }
                    transaction.prepare_cached("ROLLBACK TO entry")?.execute([])?;
                    transaction.prepare_cached("RELEASE entry")?.execute([])?;
                    // What the entry recorded may be undone with it.
                    memo.forget();
                    results.push(Err(error));
                    continue;
                }
                transaction.prepare_cached("RELEASE entry")?.execute([])?;
                results.push(result);
            }
        }
    }
    Ok(results)
}

/// Hands out the next timestamp: the wall clock, or one microsecond past the last one when the
/// clock has not moved (or moved back), so timestamps never repeat.
fn next_timestamp(transaction: &Transaction<'_>) -> Result<Micros, StoreError> {
    let timestamp = transaction.query_row(
        "UPDATE clock SET last = MAX(last + 1, ?1) WHERE id = 0 RETURNING last",
        [now_micros()],
        |row| row.get(0),
    )?;
    Ok(timestamp)
}

impl crate::Store for SqliteStore {
    fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        self.with_write(|transaction, _| admin::create_tenant(transaction, name))
    }

    fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.with_read(admin::list_tenants)
    }

    fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        self.with_read(|connection| admin::tenant_by_name(connection, name))
    }

    fn create_client(&self, tenant: TenantId, client_id: &str, secret_hash: &str) -> Result<ClientRecord, StoreError> {
        self.with_write(|transaction, _| admin::create_client(transaction, tenant, client_id, secret_hash))
    }

    fn list_clients(&self, tenant: TenantId) -> Result<Vec<ClientRecord>, StoreError> {
        self.with_read(|connection| admin::list_clients(connection, tenant))
    }

    fn client(&self, client_id: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.with_read(|connection| admin::client(connection, client_id))
    }

    fn revoke_client(&self, client_id: &str) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| admin::revoke_client(transaction, client_id))
    }

    fn replace_client_secret_hash(&self, client_id: &str, expected: &str, new_hash: &str) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| admin::replace_client_secret_hash(transaction, client_id, expected, new_hash))
    }

    fn server_key(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.with_write(|transaction, _| admin::server_key(transaction, name, candidate))
    }

    fn set_client_registration(&self, client_id: &str, registration: &ClientRegistration) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| admin::set_client_registration(transaction, client_id, registration))
    }

    fn client_registration(&self, client_id: &str) -> Result<Option<ClientRegistration>, StoreError> {
        self.with_read(|connection| admin::client_registration(connection, client_id))
    }

    fn record_assertion_jti(
        &self,
        tenant: TenantId,
        client_id: &str,
        jti: &str,
        expires: Micros,
        now: Micros,
    ) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| admin::record_assertion_jti(transaction, tenant, client_id, jti, expires, now))
    }

    fn write_audited(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        ops: &[WriteOp],
        mode: WriteMode,
        audit_records: &AuditRecords<'_>,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        self.write_ops(tenant, owner, ops, &[], mode, audit_records)
    }

    fn write_prepared(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        ops: &[WriteOp],
        prepared: &[Option<crate::PreparedWrite>],
        mode: WriteMode,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        self.write_ops(tenant, owner, ops, prepared, mode, &|_: &[Result<Written, StoreError>]| Vec::new())
    }

    /// Several batches to a transaction: every batch the source has ready when the previous one
    /// is written goes into the same transaction (with one timestamp), until the source asks
    /// for a commit. The connection is never held while the source waits. No savepoint per batch
    /// (it would copy every page a batch changes): when an entry fails, which validation ahead
    /// makes rare, the transaction is rolled back and its batches are written again one
    /// transaction each, as `write_prepared` would.
    fn write_bulk(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        source: &mut dyn crate::BulkSource,
    ) -> Result<(), StoreError> {
        // Batches to write one per transaction, after a rollback.
        let mut one_by_one = 0usize;
        while let Some(first) = source.next_batch(true) {
            if one_by_one > 0 {
                one_by_one -= 1;
                let results = crate::write_bulk_batch(self, tenant, owner, &first)?;
                source.written(first, results);
                source.committed();
                continue;
            }
            let mut batches = 0usize;
            let written = self.with_write(|transaction, timestamp| {
                let mut memo = write_memo::WriteMemo::for_bulk_load();
                let mut next = Some(first);
                while let Some(batch) = next {
                    batches += 1;
                    let mode = WriteMode::Transaction;
                    match apply_ops(transaction, &mut memo, tenant, owner, &batch.ops, &batch.prepared, mode, timestamp)
                    {
                        Ok(results) => source.written(batch, results),
                        Err(error) => {
                            // Given back unwritten: rolled back with the others, then rewound.
                            source.written(batch, Vec::new());
                            return Err(error);
                        }
                    }
                    next = source.next_batch(false);
                }
                memo.flush_targets(transaction, tenant)
            });
            match written {
                Ok(()) => source.committed(),
                Err(error) if error.is_store_failure() => return Err(error),
                Err(_) => {
                    source.rewind();
                    one_by_one = batches;
                }
            }
        }
        Ok(())
    }

    fn read(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredResource>, StoreError> {
        self.with_read(|connection| resources::read(connection, tenant, visibility, resource_type, id))
    }

    fn vread(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<StoredResource>, StoreError> {
        self.with_read(|connection| resources::vread(connection, tenant, visibility, resource_type, id, version))
    }

    fn history(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        id: &str,
    ) -> Result<Vec<StoredResource>, StoreError> {
        self.with_read(|connection| resources::history(connection, tenant, visibility, resource_type, id))
    }

    fn search(&self, tenant: TenantId, visibility: &Visibility, query: &SearchQuery) -> Result<SearchPage, StoreError> {
        self.with_read(|connection| resources::search(connection, tenant, visibility, query))
    }

    fn reserve_transaction_time(&self) -> Result<Micros, StoreError> {
        self.with_write(|_, timestamp| Ok(timestamp))
    }

    fn version_at(
        &self,
        tenant: TenantId,
        resource_type: &str,
        id: &str,
        at: Micros,
    ) -> Result<Option<StoredResource>, StoreError> {
        self.with_read(|connection| export::version_at(connection, tenant, resource_type, id, at))
    }

    fn existing_at(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        ids: &[String],
        at: Micros,
    ) -> Result<Vec<String>, StoreError> {
        let compute = || {
            self.with_snapshot(|connection| export::existing_at(connection, tenant, visibility, resource_type, ids, at))
        };
        if resource_type != "Patient" {
            return compute();
        }
        // A Group's members, checked at every kick-off: remembered while they are unchanged.
        crate::plan_cache::existing_patients(
            &self.plans,
            tenant,
            visibility,
            ids,
            at,
            |members, planned_at| self.members_unchanged_since(tenant, members, planned_at),
            compute,
        )
    }

    fn members_at(&self, tenant: TenantId, group_id: &str, at: Micros) -> Result<Vec<String>, StoreError> {
        self.with_read(|connection| export::members_at(connection, tenant, group_id, at))
    }

    fn plan_parts(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_types: &[String],
        part_size: u64,
    ) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
        // A plan of the same request at an earlier time is this plan while no member's
        // compartment changed since (see `plan_cache`).
        if !crate::plan_cache::cacheable(selection, resource_types) {
            return self.compute_plan(tenant, selection, resource_types, part_size);
        }
        let key = self.plans.key(tenant, selection, "parts", resource_types, part_size);
        let plan = self.plans.plan(
            key,
            selection.transaction_time,
            |planned_at| self.members_unchanged_since(tenant, selection, planned_at),
            || self.compute_plan(tenant, selection, resource_types, part_size),
        )?;
        Ok(plan.as_ref().clone())
    }

    fn part_reader<'a>(
        &'a self,
        tenant: TenantId,
        selection: &'a MemberSelection,
        resource_type: &'a str,
        range: PartRange,
    ) -> Box<dyn PartReader + 'a> {
        Box::new(part_reader::SqlitePartReader::new(self, tenant, selection, resource_type, range))
    }

    fn deleted_in_compartments(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_type: &str,
    ) -> Result<Vec<(String, Micros)>, StoreError> {
        let compute = || {
            self.with_snapshot(|connection| {
                export::deleted_in_compartments(connection, tenant, selection, resource_type)
            })
        };
        if !crate::plan_cache::cacheable(selection, [resource_type]) {
            return compute();
        }
        let key = self.plans.key(tenant, selection, "deleted", &[resource_type.to_owned()], 0);
        let deleted = self.plans.deleted(
            key,
            selection.transaction_time,
            |planned_at| self.members_unchanged_since(tenant, selection, planned_at),
            compute,
        )?;
        Ok(deleted.as_ref().clone())
    }

    fn plan_associated(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        request: &AssociatedRequest,
        part_size: u64,
    ) -> Result<AssociatedPlan, StoreError> {
        // Registered before any row is stored: the sweep finds every stored set through it.
        let compute = || {
            self.with_untimed_write(|transaction| {
                plan_watermarks::register(transaction, tenant, &request.set_id, request.expires)
            })?;
            self.plan_associated_set(tenant, selection, request, part_size)
        };
        // A set computed earlier for the same request is this set while neither the members'
        // compartments nor any type it reaches outside them changed since: its stored rows are
        // shared (see `crate::plan_cache`).
        if !crate::plan_cache::cacheable(selection, request.reference_sources.iter().chain(&request.provenance_sources))
        {
            return Ok(AssociatedPlan { set_id: request.set_id.clone(), parts: compute()? });
        }
        let key = self.plans.associated_key(tenant, selection, request, part_size);
        let (set_id, plan) = self.plans.associated(
            key,
            selection.transaction_time,
            &request.set_id,
            |planned_at| {
                Ok(self.members_unchanged_since(tenant, selection, planned_at)?
                    && !crate::plan_cache::reaches_any(
                        request,
                        &self.with_read(|connection| {
                            plan_watermarks::associated_types_changed_since(connection, tenant, planned_at)
                        })?,
                    ))
            },
            |set_id| {
                self.with_untimed_write(|transaction| {
                    plan_watermarks::share(transaction, tenant, set_id, request.expires)
                })
            },
            compute,
        )?;
        Ok(AssociatedPlan { set_id, parts: plan.as_ref().clone() })
    }

    fn associated_reader<'a>(
        &'a self,
        tenant: TenantId,
        selection: &'a MemberSelection,
        set_id: &'a str,
        resource_type: &'a str,
        range: PartRange,
    ) -> Box<dyn PartReader + 'a> {
        Box::new(associated::AssociatedPartReader {
            store: self,
            tenant,
            selection,
            set_id,
            resource_type,
            next_key: (range.first_key <= range.last_key).then_some(range.first_key),
            last_key: range.last_key,
        })
    }

    fn associated_ids(
        &self,
        tenant: TenantId,
        set_id: &str,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        self.with_read(|connection| associated::associated_ids(connection, tenant, set_id, resource_type, ids))
    }
    fn provenance_targeting(
        &self,
        tenant: TenantId,
        targets: &[(String, String)],
        at: Micros,
    ) -> Result<Vec<String>, StoreError> {
        self.with_read(|connection| associated::provenance_targeting(connection, tenant, targets, at))
    }
    fn plan_cache_stats(&self) -> Option<crate::PlanCacheStats> {
        Some(self.plans.stats())
    }

    fn group_at(&self, tenant: TenantId, group_id: &str, at: Micros) -> Result<Option<crate::GroupAt>, StoreError> {
        // One snapshot: the body read on a memo miss is the version's whatever is pruned meanwhile.
        self.with_snapshot(|connection| {
            let Some((rid, version)) = export::version_head_at(connection, tenant, "Group", group_id, at)? else {
                return Ok(None);
            };
            let number = version.version;
            self.plans.groups.group_at(tenant, version, || export::version_body(connection, rid, number)).map(Some)
        })
    }

    fn missing_members(&self, tenant: TenantId, selection: &MemberSelection) -> Result<Vec<String>, StoreError> {
        let at = selection.transaction_time;
        crate::plan_cache::missing_members(
            &self.plans,
            tenant,
            selection,
            |planned_at| self.members_unchanged_since(tenant, selection, planned_at),
            |ids| {
                self.with_snapshot(|connection| {
                    export::existing_at(connection, tenant, &selection.visibility, "Patient", ids, at)
                })
            },
        )
    }
    fn patients_at(&self, tenant: TenantId, visibility: &Visibility, at: Micros) -> Result<Vec<String>, StoreError> {
        self.with_snapshot(|connection| {
            let ids: Vec<String> = connection
                .prepare_cached(
                    "SELECT id FROM resources WHERE tenant_id = ?1 AND resource_type = 'Patient' ORDER BY id",
                )?
                .query_map([tenant.0], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            export::existing_at(connection, tenant, visibility, "Patient", &ids, at)
        })
    }

    fn create_export_job(&self, tenant: TenantId, job: &ExportJob) -> Result<(), StoreError> {
        self.with_write(|transaction, _| jobs::create_export_job(transaction, tenant, job))
    }

    fn export_job(&self, tenant: TenantId, job_id: &str) -> Result<Option<ExportJob>, StoreError> {
        self.with_read(|connection| jobs::export_job(connection, tenant, job_id))
    }

    fn finish_export_job(
        &self,
        tenant: TenantId,
        job_id: &str,
        state: ExportJobState,
        manifest: &str,
    ) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| jobs::finish_export_job(transaction, tenant, job_id, state, manifest))
    }

    fn delete_export_job(&self, tenant: TenantId, job_id: &str) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| jobs::delete_export_job(transaction, tenant, job_id))
    }

    fn delete_expired_export_jobs(&self, now: Micros) -> Result<u64, StoreError> {
        self.with_write(|transaction, _| jobs::delete_expired_export_jobs(transaction, now))
    }

    fn expired_export_jobs(&self, now: Micros, limit: usize) -> Result<Vec<(TenantId, String)>, StoreError> {
        self.with_read(|connection| jobs::expired_export_jobs(connection, now, limit))
    }

    fn create_export_record(&self, tenant: TenantId, record: &ExportRecord) -> Result<(), StoreError> {
        self.with_write(|transaction, _| jobs::create_export_record(transaction, tenant, record))
    }

    fn export_record(&self, tenant: TenantId, record_id: &str) -> Result<Option<ExportRecord>, StoreError> {
        self.with_read(|connection| jobs::export_record(connection, tenant, record_id))
    }

    fn delete_expired_export_records(&self, now: Micros) -> Result<u64, StoreError> {
        self.with_write(|transaction, _| jobs::delete_expired_export_records(transaction, now))
    }

    fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        self.with_untimed_write(|transaction| audit::append(transaction, records))
    }

    fn audit_records(&self, tenant: TenantId, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.with_snapshot(|connection| audit::records(connection, tenant, query))
    }

    fn prune_audit(&self, before: Micros) -> Result<u64, StoreError> {
        self.with_write(|transaction, _| audit::prune(transaction, before))
    }

    fn check_writable(&self, min_free_bytes: u64) -> Result<(), StoreError> {
        let directory = self.path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Some(available) = available_bytes(directory) {
            if available < min_free_bytes {
                return Err(StoreError::StorageFull(format!(
                    "{available} bytes available on the disk of {}, below the floor of {min_free_bytes}",
                    directory.display()
                )));
            }
        }
        // A write in progress shows that writes go through (its own failure answers its client);
        // waiting for it, possibly a large import batch, would stall the probe.
        let mut connection = match self.writer.try_lock() {
            Ok(connection) => connection,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        // A real write (the clock row): what a full disk, a read-only file or a broken
        // database refuses.
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        next_timestamp(&transaction)?;
        transaction.commit()?;
        Ok(())
    }

    fn history_horizon(&self) -> Result<Option<Micros>, StoreError> {
        self.with_read(retention::history_horizon)
    }

    fn prune_history(&self, cutoff: Micros, now: Micros, batch: usize) -> Result<PruneReport, StoreError> {
        retention::prune(self, cutoff, now, batch)
    }

    fn storage_bytes(&self) -> Result<StorageBytes, StoreError> {
        let size = |suffix: &str| {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            std::fs::metadata(path).map_or(0, |metadata| metadata.len())
        };
        Ok(StorageBytes { database: size(""), wal: size("-wal") })
    }

    fn token_keys(&self) -> Result<Vec<crate::TokenKey>, StoreError> {
        self.with_read(shared_state::token_keys)
    }

    fn token_keys_version(&self) -> Result<i64, StoreError> {
        self.with_read(shared_state::token_keys_version)
    }

    fn init_token_keys(&self, keys: &[crate::TokenKey]) -> Result<bool, StoreError> {
        self.with_untimed_write(|transaction| shared_state::init_token_keys(transaction, keys))
    }

    fn rotate_token_keys(
        &self,
        secret: &[u8],
        now: i64,
        drop_retired_before: i64,
    ) -> Result<Vec<crate::TokenKey>, StoreError> {
        self.with_untimed_write(|transaction| {
            shared_state::rotate_token_keys(transaction, secret, now, drop_retired_before)
        })
    }

    fn draw_quota_tokens(
        &self,
        tenant: TenantId,
        quota: &str,
        want: f64,
        capacity: f64,
        rate: f64,
        now: Micros,
    ) -> Result<f64, StoreError> {
        self.with_untimed_write(|transaction| {
            shared_state::draw_quota_tokens(transaction, tenant, quota, want, capacity, rate, now)
        })
    }

    fn record_login_failure(&self, key: &str, window: Micros, now: Micros) -> Result<crate::LoginWindow, StoreError> {
        self.with_untimed_write(|transaction| shared_state::record_login_failure(transaction, key, window, now))
    }

    fn enqueue_export_job(
        &self,
        tenant: TenantId,
        job: &ExportJob,
        work: &str,
        cap: u64,
        now: Micros,
    ) -> Result<crate::JobAdmission, StoreError> {
        self.with_write(|transaction, _| leases::enqueue_export_job(transaction, tenant, job, work, cap, now))
    }

    fn unfinished_export_jobs(&self, tenant: TenantId, now: Micros) -> Result<u64, StoreError> {
        self.with_read(|connection| leases::unfinished_export_jobs(connection, tenant, now))
    }

    fn claim_export_job(
        &self,
        owner: &str,
        now: Micros,
        lease_for: Micros,
    ) -> Result<Option<crate::ClaimedJob>, StoreError> {
        if !self.with_read(|connection| leases::any_due(connection, now))? {
            return Ok(None);
        }
        self.with_write(|transaction, _| leases::claim_export_job(transaction, owner, now, lease_for))
    }

    fn renew_export_job_lease(
        &self,
        lease: &crate::JobLease,
        now: Micros,
        lease_for: Micros,
        progress: &str,
    ) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| leases::renew_export_job_lease(transaction, lease, now, lease_for, progress))
    }

    fn save_export_job_checkpoint(&self, lease: &crate::JobLease, checkpoint: &str) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| leases::save_export_job_checkpoint(transaction, lease, checkpoint))
    }

    fn record_export_job_part(&self, lease: &crate::JobLease, part: &crate::JobPart) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| leases::record_export_job_part(transaction, lease, part))
    }

    fn finish_leased_export_job(
        &self,
        lease: &crate::JobLease,
        state: ExportJobState,
        manifest: &str,
    ) -> Result<bool, StoreError> {
        if state == ExportJobState::Planning {
            return Err(StoreError::Invalid("a job is finished as complete or failed, not planning".into()));
        }
        let (state, failure_status) = jobs::state_columns(state);
        self.with_write(|transaction, _| {
            leases::finish_leased_export_job(transaction, lease, state, failure_status, manifest)
        })
    }

    fn export_job_activity(&self, tenant: TenantId, job_id: &str) -> Result<Option<crate::JobActivity>, StoreError> {
        self.with_read(|connection| leases::export_job_activity(connection, tenant, job_id))
    }

    fn hand_back_export_job(&self, lease: &crate::JobLease, now: Micros, progress: &str) -> Result<bool, StoreError> {
        self.with_write(|transaction, _| leases::hand_back_export_job(transaction, lease, now, progress))
    }
}

/// Bytes available to this process on the file system holding `directory`.
#[cfg(unix)]
pub(crate) fn available_bytes(directory: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(directory.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and `stats` is a writable statvfs for the call to fill.
    if unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled `stats`.
    let stats = unsafe { stats.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Some(stats.f_bavail as u64 * stats.f_frsize as u64)
}

#[cfg(not(unix))]
pub(crate) fn available_bytes(_directory: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    /// A store in its own temporary directory, removed when the test ends.
    struct TestStore {
        store: super::SqliteStore,
        _directory: tempfile::TempDir,
    }

    impl std::ops::Deref for TestStore {
        type Target = super::SqliteStore;
        fn deref(&self) -> &Self::Target {
            &self.store
        }
    }

    fn fresh_store() -> TestStore {
        let directory = tempfile::tempdir().unwrap();
        let store = super::SqliteStore::open(&directory.path().join("test.db")).unwrap();
        TestStore { store, _directory: directory }
    }

    crate::store_test_suite!(fresh_store());

    /// Writes commit with `synchronous = FULL` (2): the WAL is synced at every commit, so an
    /// acknowledged write survives power loss, not only a crash of the process.
    #[test]
    fn the_writer_syncs_the_wal_at_every_commit() {
        let store = fresh_store();
        let writer = store.writer.lock().unwrap();
        assert_eq!(writer.query_row("PRAGMA synchronous", [], |row| row.get::<_, i64>(0)).unwrap(), 2);
    }

    /// A new database gets 16 KiB pages (the pragma must come before WAL mode writes the header);
    /// an existing database keeps the page size it was created with.
    #[test]
    fn a_new_database_has_16_kib_pages_and_an_old_one_keeps_its_own() {
        let page_size = |store: &super::SqliteStore| {
            store.with_read(|connection| Ok(connection.query_row("PRAGMA page_size", [], |row| row.get::<_, u32>(0))?))
        };
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("new.db");
        let store = super::SqliteStore::open(&path).unwrap();
        assert_eq!(page_size(&store).unwrap(), 16384);
        drop(store);
        assert_eq!(page_size(&super::SqliteStore::open(&path).unwrap()).unwrap(), 16384, "reopened");

        let old = directory.path().join("old.db");
        {
            let connection = rusqlite::Connection::open(&old).unwrap();
            connection.execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = WAL;").unwrap();
        }
        assert_eq!(page_size(&super::SqliteStore::open(&old).unwrap()).unwrap(), 4096);
    }

    /// The tenant's bound of its patients' watermarks, kept by triggers, is their greatest
    /// `changed_at` after every kind of write (a new patient key, a raise, a delete, pruning),
    /// per tenant; a database from before it gets it seeded on open.
    #[test]
    fn the_tenant_watermark_is_the_greatest_patient_watermark() {
        use crate::{Store, TenantId, WriteMode, WriteOp};
        use serde_json::json;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("test.db");
        let store = super::SqliteStore::open(&path).unwrap();
        let (one, two) = (store.create_tenant("one").unwrap().id, store.create_tenant("two").unwrap().id);
        let write = |tenant: TenantId, op: WriteOp| {
            store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
        };
        let version = std::cell::Cell::new(0);
        let put = |tenant, id: &str, patient: &str| {
            version.set(version.get() + 1);
            let body = json!({"resourceType": "Observation", "id": id, "status": "final", "valueInteger": version.get(),
                              "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")}});
            write(tenant, WriteOp::Update { resource_type: "Observation".into(), id: id.into(), body, if_match: None });
        };
        let check = |store: &super::SqliteStore, tenant: TenantId| {
            let (bound, greatest) = store
                .with_read(|connection| {
                    let greatest: i64 = connection.query_row(
                        "SELECT COALESCE(max(changed_at), 0) FROM patient_keys WHERE tenant_id = ?1",
                        [tenant.0],
                        |row| row.get(0),
                    )?;
                    Ok((super::plan_watermarks::tenant_latest_change(connection, tenant)?, greatest))
                })
                .unwrap();
            assert_eq!(bound, greatest);
            bound
        };
        assert_eq!(check(&store, one), 0, "no patient yet");
        put(one, "o1", "a");
        let after_a = check(&store, one);
        assert!(after_a > 0);
        put(one, "o2", "b");
        put(two, "o3", "a");
        let after_b = check(&store, one);
        assert!(after_b > after_a, "a new patient key raises it");
        assert!(check(&store, two) > after_b, "per tenant");
        put(one, "o1", "a");
        let again = check(&store, one);
        assert!(again > after_b, "a raise of an existing patient raises it");
        write(one, WriteOp::Delete { resource_type: "Observation".into(), id: "o2".into() });
        let deleted = check(&store, one);
        assert!(deleted > again);
        let now = bulkhead_fhir::now_micros();
        store.prune_history(now + 1, now + 1, 100).unwrap();
        assert!(check(&store, one) >= deleted, "pruning closed rows raises it (or keeps it)");
        drop(store);

        // A database from before the table: seeded on open.
        {
            let connection = rusqlite::Connection::open(&path).unwrap();
            connection
                .execute_batch(
                    "DROP TRIGGER patient_keys_raise_tenant_on_insert; DROP TRIGGER patient_keys_raise_tenant_on_update;
                     DROP TABLE tenant_patient_changes;",
                )
                .unwrap();
        }
        let store = super::SqliteStore::open(&path).unwrap();
        assert!(check(&store, one) >= deleted);
        assert!(check(&store, two) > after_b);
    }

    /// A database from before the reference index gets it on open, backfilled from every stored
    /// version: the same rows the write path keeps (so exports as of earlier transaction times
    /// stay exact), and the same associated data at each of those times.
    #[test]
    fn an_old_database_gets_its_reference_index_backfilled() {
        use crate::{
            AssociatedRequest, MemberSelection, ProvenanceSelection, ReferencedTypes, Store, Visibility, WriteMode,
            WriteOp,
        };
        use serde_json::json;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("old.db");
        let store = super::SqliteStore::open(&path).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        let put = |body: serde_json::Value| {
            let (resource_type, id) =
                (body["resourceType"].as_str().unwrap().to_owned(), body["id"].as_str().unwrap().to_owned());
            let op = WriteOp::Update { resource_type, id, body, if_match: None };
            store.write(tenant, None, &[op], WriteMode::Transaction).unwrap();
        };
        let encounter = |practitioner: &str| {
            json!({"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
                   "subject": {"reference": "Patient/a"},
                   "participant": [{"individual": {"reference": format!("Practitioner/{practitioner}")}}]})
        };
        put(json!({"resourceType": "Patient", "id": "a"}));
        for id in ["pr1", "pr2", "pr3"] {
            put(json!({"resourceType": "Practitioner", "id": id}));
        }
        put(encounter("pr1"));
        put(json!({"resourceType": "Provenance", "id": "v", "target": [{"reference": "Encounter/e1"}],
                   "recorded": "2020-01-01T00:00:00Z", "agent": [{"who": {"reference": "Practitioner/pr3"}}]}));
        let first = store.reserve_transaction_time().unwrap();
        put(encounter("pr2"));
        store
            .write(
                tenant,
                None,
                &[WriteOp::Delete { resource_type: "Provenance".into(), id: "v".into() }],
                WriteMode::Transaction,
            )
            .unwrap();
        let second = store.reserve_transaction_time().unwrap();
        // Two versions in one transaction, and a resurrection.
        let twice = [encounter("pr3"), encounter("pr1")].map(|body| WriteOp::Update {
            resource_type: "Encounter".into(),
            id: "e1".into(),
            body,
            if_match: None,
        });
        store.write(tenant, None, &twice, WriteMode::Transaction).unwrap();
        put(json!({"resourceType": "Provenance", "id": "v", "target": [{"reference": "Patient/a"}],
                   "recorded": "2020-01-01T00:00:00Z", "agent": [{"who": {"reference": "Practitioner/pr2"}}]}));
        let third = store.reserve_transaction_time().unwrap();
        let set = std::cell::Cell::new(0);
        let associated_at = |store: &super::SqliteStore, at| {
            set.set(set.get() + 1);
            let selection = MemberSelection {
                members: vec![("a".into(), None)].into(),
                since: None,
                until: None,
                transaction_time: at,
                visibility: Visibility::Tenant,
                scope: crate::SelectionScope::Members,
                filters: Default::default(),
            };
            let sources = vec!["Patient".to_owned(), "Encounter".to_owned()];
            let request = AssociatedRequest {
                set_id: format!("s{}", set.get()),
                expires: i64::MAX,
                provenance: ProvenanceSelection::Relevant,
                provenance_sources: sources.clone(),
                referenced: ReferencedTypes::All,
                reference_sources: sources,
                depth: 2,
            };
            let planned = store.plan_associated(tenant, &selection, &request, 100).unwrap();
            planned.parts.into_iter().map(|(resource_type, parts)| (resource_type, parts[0].count)).collect::<Vec<_>>()
        };
        let rows = |store: &super::SqliteStore| {
            store
                .with_read(|connection| {
                    let mut statement = connection.prepare(
                        "SELECT rid, provenance_target, target_type, target_id, from_ts, to_ts, tenant_id, target_rid
                         FROM reference_index ORDER BY 1, 2, 3, 4, 5",
                    )?;
                    let rows = statement
                        .query_map([], |row| {
                            Ok(format!(
                                "{:?}",
                                (
                                    row.get::<_, i64>(0)?,
                                    row.get::<_, bool>(1)?,
                                    row.get::<_, String>(2)?,
                                    row.get::<_, String>(3)?,
                                    row.get::<_, i64>(4)?,
                                    row.get::<_, Option<i64>>(5)?,
                                    row.get::<_, i64>(6)?,
                                    row.get::<_, Option<i64>>(7)?
                                )
                            ))
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(rows)
                })
                .unwrap()
        };
        let kept = rows(&store);
        let expected: Vec<_> = [first, second, third].iter().map(|at| associated_at(&store, *at)).collect();
        assert_eq!(expected[0], [("Practitioner".to_owned(), 2), ("Provenance".to_owned(), 1)], "pr1, pr3 and v");
        assert_eq!(expected[1], [("Practitioner".to_owned(), 1)], "pr2; v deleted");
        assert_eq!(expected[2], [("Practitioner".to_owned(), 2), ("Provenance".to_owned(), 1)], "pr1, pr2 and v");
        drop(store);
        {
            let connection = rusqlite::Connection::open(&path).unwrap();
            connection.execute_batch("DROP TABLE reference_index; DROP TABLE export_associated;").unwrap();
        }
        let reopened = super::SqliteStore::open(&path).unwrap();
        assert_eq!(rows(&reopened), kept, "the backfill rebuilds exactly the rows the writes kept");
        let rebuilt: Vec<_> = [first, second, third].iter().map(|at| associated_at(&reopened, *at)).collect();
        assert_eq!(rebuilt, expected);
        drop(reopened);
        // Opening again changes nothing.
        assert_eq!(rows(&super::SqliteStore::open(&path).unwrap()), kept);
    }

    /// A bulk load writes every batch that is ready into one transaction; when an entry of one
    /// fails, that transaction is rolled back and its batches are written again one by one: the
    /// failed entry alone is refused, every other entry is stored once, and outcomes are handed
    /// over only with a commit.
    #[test]
    fn a_bulk_load_with_a_failed_entry_stores_every_other_entry() {
        use crate::{BulkBatch, BulkSource, Store, StoreError, Visibility, WriteMode, WriteOp, Written};
        struct Source {
            waiting: std::collections::VecDeque<BulkBatch>,
            replay: std::collections::VecDeque<BulkBatch>,
            written: Vec<(BulkBatch, Vec<Result<Written, StoreError>>)>,
            committed: Vec<Vec<Result<Written, StoreError>>>,
            commits: usize,
            rewinds: usize,
        }
        impl BulkSource for Source {
            fn next_batch(&mut self, _wait: bool) -> Option<BulkBatch> {
                self.replay.pop_front().or_else(|| self.waiting.pop_front())
            }
            fn written(&mut self, batch: BulkBatch, results: Vec<Result<Written, StoreError>>) {
                self.written.push((batch, results));
            }
            fn committed(&mut self) {
                self.commits += 1;
                self.committed.extend(self.written.drain(..).map(|(_, results)| results));
            }
            fn rewind(&mut self) {
                self.rewinds += 1;
                let rewound: Vec<BulkBatch> = self.written.drain(..).map(|(batch, _)| batch).collect();
                self.replay.extend(rewound);
            }
        }
        let store = fresh_store();
        let tenant = store.create_tenant("t").unwrap().id;
        let patient = |id: &str| WriteOp::Update {
            resource_type: "Patient".into(),
            id: id.into(),
            body: serde_json::json!({"resourceType": "Patient", "id": id}),
            if_match: None,
        };
        // Another user's resource: not updatable by the load's owner.
        store.write(tenant, Some("other"), &[patient("x")], WriteMode::Transaction).unwrap();
        let batch = |ids: &[&str]| BulkBatch { ops: ids.iter().map(|id| patient(id)).collect(), prepared: Vec::new() };
        let mut source = Source {
            waiting: [batch(&["a", "b"]), batch(&["c", "x", "d"]), batch(&["e"])].into(),
            replay: Default::default(),
            written: Vec::new(),
            committed: Vec::new(),
            commits: 0,
            rewinds: 0,
        };
        store.write_bulk(tenant, Some("u"), &mut source).unwrap();
        assert_eq!(source.rewinds, 1, "the transaction of the failed entry was rolled back once");
        assert_eq!(source.commits, 3, "then each batch was written in a transaction of its own");
        let outcomes: Vec<Vec<bool>> =
            source.committed.iter().map(|results| results.iter().map(Result::is_ok).collect()).collect();
        assert_eq!(outcomes, [vec![true, true], vec![true, false, true], vec![true]]);
        assert!(matches!(source.committed[1][1], Err(StoreError::NotFound(_))), "{:?}", source.committed[1][1]);
        for id in ["a", "b", "c", "d", "e"] {
            let stored = store.read(tenant, &Visibility::Tenant, "Patient", id).unwrap().unwrap();
            assert_eq!((stored.version, stored.owner.as_deref()), (1, Some("u")), "{id}");
        }
        let x = store.read(tenant, &Visibility::Tenant, "Patient", "x").unwrap().unwrap();
        assert_eq!((x.version, x.owner.as_deref()), (1, Some("other")));
    }

    /// A prepared batch's new resource rows are inserted in `(type, id)` order before the batch is
    /// written in its own order: keys ascend by id within the batch, a resource written twice
    /// gets its row from its first write (the second is its version 2), and one that existed is
    /// updated. A batch with a write that does not insert first (a delete) keeps arrival order.
    #[test]
    fn a_prepared_batch_inserts_its_new_rows_in_key_order() {
        use crate::{PreparedWrite, Store, Visibility, WriteMode, WriteOp};
        let store = fresh_store();
        let tenant = store.create_tenant("t").unwrap().id;
        let patient = |id: &str, gender: &str| {
            let body = serde_json::json!({"resourceType": "Patient", "id": id, "gender": gender});
            let prepared = PreparedWrite::new("Patient", id, &body);
            (WriteOp::Update { resource_type: "Patient".into(), id: id.into(), body, if_match: None }, Some(prepared))
        };
        let write = |batch: Vec<(WriteOp, Option<PreparedWrite>)>| {
            let (ops, prepared): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            store.write_prepared(tenant, None, &ops, &prepared, WriteMode::Transaction).unwrap()
        };
        write(vec![patient("e", "male")]);
        let results = write(vec![
            patient("c", "male"),
            patient("a", "male"),
            patient("e", "female"),
            patient("b", "male"),
            patient("a", "female"),
        ]);
        let outcomes: Vec<(String, i64, bool)> =
            results.into_iter().map(Result::unwrap).map(|w| (w.id, w.version, w.created)).collect();
        let expected = [("c", 1, true), ("a", 1, true), ("e", 2, false), ("b", 1, true), ("a", 2, false)];
        assert_eq!(outcomes, expected.map(|(id, version, created)| (id.to_owned(), version, created)));
        for (id, gender) in [("a", "female"), ("b", "male"), ("c", "male"), ("e", "female")] {
            let stored = store.read(tenant, &Visibility::Tenant, "Patient", id).unwrap().unwrap();
            assert!(stored.body.unwrap().contains(&format!("\"gender\":\"{gender}\"")), "{id}");
        }
        let keys = |ids: &[&str]| -> Vec<i64> {
            store
                .with_read(|connection| {
                    let mut keys = Vec::new();
                    for id in ids {
                        keys.push(
                            connection.query_row("SELECT rid FROM resources WHERE id = ?1", [id], |row| row.get(0))?,
                        );
                    }
                    Ok(keys)
                })
                .unwrap()
        };
        let [a, b, c] = keys(&["a", "b", "c"])[..] else { unreachable!() };
        assert!(a < b && b < c, "new rows in key order: a {a}, b {b}, c {c}");

        let delete = WriteOp::Delete { resource_type: "Patient".into(), id: "e".into() };
        let (z, y) = (patient("z", "male"), patient("y", "male"));
        let (ops, prepared): (Vec<_>, Vec<_>) = [z, y].into_iter().chain([(delete, None)]).unzip();
        store.write_prepared(tenant, None, &ops, &prepared, WriteMode::Transaction).unwrap();
        let [z, y] = keys(&["z", "y"])[..] else { unreachable!() };
        assert!(z < y, "arrival order beside a delete: z {z}, y {y}");
    }

    /// SQLITE_FULL (a full disk, or the page cap reached) is `StorageFull`, and a batch stops
    /// at it instead of reporting it per entry.
    #[test]
    fn a_full_database_is_storage_full() {
        use crate::{Store, StoreError, WriteMode, WriteOp};
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("test.db");
        let pages = {
            let store = super::SqliteStore::open(&path).unwrap();
            store.create_tenant("t").unwrap();
            store
                .with_read(|connection| Ok(connection.query_row("PRAGMA page_count", [], |row| row.get::<_, u64>(0))?))
                .unwrap()
        };
        let options = super::SqliteOptions { max_page_count: Some(pages + 2), ..Default::default() };
        let store = super::SqliteStore::open_with(&path, options).unwrap();
        let tenant = store.tenant_by_name("t").unwrap().unwrap().id;
        let big = |id: usize| WriteOp::Update {
            resource_type: "Basic".into(),
            id: format!("b{id}"),
            body: serde_json::json!({"resourceType": "Basic", "id": format!("b{id}"), "code": {"text": "x".repeat(60_000)}}),
            if_match: None,
        };
        let ops: Vec<WriteOp> = (0..4).map(big).collect();
        for mode in [WriteMode::Transaction, WriteMode::Batch] {
            match store.write(tenant, None, &ops, mode) {
                Err(StoreError::StorageFull(_)) => {}
                other => panic!("{mode:?}: expected StorageFull, got {other:?}"),
            }
        }
        assert!(store.read(tenant, &crate::Visibility::Tenant, "Basic", "b0").unwrap().is_none(), "nothing stored");
        store.check_writable(0).expect("small writes still fit");
    }
}
