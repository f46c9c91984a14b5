//! The PostgreSQL store: the same [`crate::Store`] as SQLite, on a pool of blocking `postgres`
//! connections (r2d2), for several stateless `bulkhead` instances sharing one database.
//!
//! - Versioned migrations ([`migrations`]) run at start-up under an advisory lock.
//! - Every transaction is short: reads of an export part take one window each, so a stalled
//!   download never holds a snapshot (and never holds back vacuum).
//! - Connect, pool check-out and statement timeouts bound every call: while PostgreSQL is
//!   unreachable calls fail fast with [`StoreError::Unavailable`] (503 + `Retry-After`).
//! - Write transactions take the one-row clock first and keep its row lock until they commit,
//!   so commit order is timestamp order across every instance (see [`PgStore::with_write`]).

mod admin;
mod associated;
mod audit;
mod bulk_insert;
mod bulk_load;
mod cohort;
mod created_keys;
mod export;
mod jobs;
mod leases;
mod member_keys;
pub mod migrations;
mod part_reader;
mod plan_watermarks;
mod reachability;
mod resources;
mod retention;
mod shared_state;
#[cfg(any(test, feature = "testsuite"))]
pub mod testing;

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_fhir::{now_micros, Micros};
use postgres::types::ToSql;
use postgres::{NoTls, Row, Statement};

use crate::{
    AssociatedPlan, AssociatedRequest, AuditQuery, AuditRecord, AuditRecords, ClientRecord, ClientRegistration,
    ExportJob, ExportJobState, ExportRecord, MemberSelection, PartRange, PartReader, PruneReport, SearchPage,
    SearchQuery, StorageBytes, StoreError, StoredResource, Tenant, TenantId, Visibility, WriteMode, WriteOp, Written,
};

/// Pool and timeout settings (config keys `database_*`).
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections this process opens at most.
    pub max_connections: u32,
    /// How long opening a connection (TCP + authentication) may take.
    pub connect_timeout: Duration,
    /// How long a call waits for a free pooled connection before it fails as unavailable.
    pub checkout_timeout: Duration,
    /// Longest a single statement may run (server-side `statement_timeout`).
    pub statement_timeout: Duration,
    /// The local directory whose free space `check_writable` compares with its floor (this
    /// instance's data directory: output files and temporary upload files go there).
    pub local_dir: PathBuf,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(60),
            local_dir: PathBuf::from("."),
        }
    }
}

/// A pooled connection with its prepared statements (PostgreSQL plans each once per session).
pub(crate) struct Connection {
    client: ManuallyDrop<postgres::Client>,
    statements: HashMap<String, Statement>,
}

impl Drop for Connection {
    /// Closing a blocking client runs its own small runtime, which must not happen on an async
    /// runtime's thread (tokio panics): there the client is closed on a thread of its own.
    fn drop(&mut self) {
        // SAFETY: the client is taken exactly once, here, and `self` is never used again.
        let client = unsafe { ManuallyDrop::take(&mut self.client) };
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::Builder::new().name("pg-close".into()).spawn(move || drop(client));
        } else {
            drop(client);
        }
    }
}

/// Runs blocking database work where the blocking client may run: the blocking client drives
/// its own runtime, which cannot start on a thread that is running async tasks.
///
/// Outside any runtime, and on a multi-threaded runtime's blocking threads (`spawn_blocking`,
/// where the server calls from), the work runs right here: `block_in_place` runs it as it is
/// there. On a multi-threaded runtime's worker thread `block_in_place` first hands the worker's
/// tasks to another thread. Only a current-thread runtime (tests and tools that hold a store in
/// async code) needs a scoped thread of its own. Spawning a thread per call, as every call once
/// did, cost more than many of the calls themselves.
fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    match tokio::runtime::Handle::try_current() {
        Err(_) => work(),
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        Ok(_) => std::thread::scope(|scope| scope.spawn(work).join())
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
    }
}

/// Statements kept per connection; dynamic searches make many shapes, so the cache is bounded.
const STATEMENT_CACHE: usize = 256;

struct Manager {
    config: postgres::Config,
    reachability: Arc<reachability::Reachability>,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Connection;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Connection, postgres::Error> {
        let connected = self.config.connect(NoTls);
        // A server at its connection limit is up: check-outs keep waiting for a pooled one.
        let at_limit = |error: &postgres::Error| error.code() == Some(&postgres::error::SqlState::TOO_MANY_CONNECTIONS);
        self.reachability.note_attempt(connected.as_ref().err().is_none_or(at_limit));
        Ok(Connection { client: ManuallyDrop::new(connected?), statements: HashMap::new() })
    }

    fn is_valid(&self, connection: &mut Connection) -> Result<(), postgres::Error> {
        connection.client.simple_query("").map(drop)
    }

    fn has_broken(&self, connection: &mut Connection) -> bool {
        connection.client.is_closed()
    }
}

/// One open transaction with the connection's statement cache: every query goes through a
/// prepared statement.
pub(crate) struct Db<'a> {
    transaction: postgres::Transaction<'a>,
    statements: &'a mut HashMap<String, Statement>,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl Db<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.transaction.prepare(sql)?;
        if self.statements.len() >= STATEMENT_CACHE {
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    pub(crate) fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.transaction.query(&statement, params)?)
    }

    /// Runs a query and hands each row to `visit` as it arrives, so a long result is never held
    /// whole (nor its rows allocated together): for results turned into something smaller.
    pub(crate) fn query_each(
        &mut self,
        sql: &str,
        params: Params<'_>,
        mut visit: impl FnMut(&Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        use postgres::fallible_iterator::FallibleIterator;
        let statement = self.statement(sql)?;
        let mut rows = self.transaction.query_raw(&statement, params.iter().copied())?;
        while let Some(row) = rows.next()? {
            visit(&row)?;
        }
        Ok(())
    }

    pub(crate) fn query_opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.transaction.query_opt(&statement, params)?)
    }

    pub(crate) fn query_one(&mut self, sql: &str, params: Params<'_>) -> Result<Row, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.transaction.query_one(&statement, params)?)
    }

    pub(crate) fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.transaction.execute(&statement, params)?)
    }

    /// Runs statements without parameters (savepoints), unprepared.
    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(self.transaction.batch_execute(sql)?)
    }
}

/// The PostgreSQL implementation of [`crate::Store`].
pub struct PgStore {
    pool: r2d2::Pool<Manager>,
    options: PgOptions,
    reachability: Arc<reachability::Reachability>,
    /// This instance's plan cache (each instance has its own; the watermarks it checks are in
    /// the database, so any instance's writes invalidate every instance's entries).
    plans: crate::plan_cache::PlanCache,
    /// Patient keys this instance has read (they never change: see [`member_keys`]).
    member_keys: member_keys::MemberKeys,
    /// The cohort keys of the latest plan, for its associated-data pass (see [`cohort`]).
    cohorts: crate::cohort_keys::CohortStash,
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host:port/database`), applies pending
    /// migrations and returns the store. Fails when the database cannot be reached within the
    /// connect timeout, or holds a schema newer than this binary knows.
    pub fn open(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let store = PgStore::connect(url, options)?;
        store.migrate()?;
        Ok(store)
    }

    /// The migration runner needs the bare client.
    fn with_client<T: Send>(
        &self,
        work: impl FnOnce(&mut postgres::Client) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        off_runtime(|| {
            let mut connection = self.checkout()?;
            work(&mut connection.client)
        })
    }

    /// Connects without migrating (`bulkhead migrate` reports what it applies itself).
    pub fn connect(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let mut config: postgres::Config =
            url.parse().map_err(|error| StoreError::Invalid(format!("database URL: {error}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        // A server that vanished mid-statement is noticed within seconds, not after the kernel's
        // two-hour keepalive default.
        config.keepalives(true).keepalives_idle(Duration::from_secs(10)).keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        config.tcp_user_timeout(options.statement_timeout + Duration::from_secs(5));
        let statement_ms = options.statement_timeout.as_millis().max(1);
        // An abandoned transaction (a crashed caller) is ended by the server.
        let idle_ms = (options.statement_timeout * 2).as_millis().max(1);
        config.options(&format!(
            "-c statement_timeout={statement_ms} -c idle_in_transaction_session_timeout={idle_ms} -c TimeZone=UTC"
        ));
        if config.get_application_name().is_none() {
            config.application_name("bulkhead");
        }
        let reachability = Arc::new(reachability::Reachability::default());
        // r2d2's own timeout only caps its reconnect backoff here (half of it): check-outs wait
        // `checkout_timeout` in `checkout`.
        let pool = r2d2::Pool::builder()
            .max_size(options.max_connections.max(1))
            .min_idle(Some(0))
            .connection_timeout(reachability::RECONNECT_BACKOFF_CAP * 2)
            .idle_timeout(Some(Duration::from_secs(300)))
            .test_on_check_out(true)
            .build_unchecked(Manager { config, reachability: reachability.clone() });
        Ok(PgStore {
            pool,
            options,
            reachability,
            plans: Default::default(),
            member_keys: Default::default(),
            cohorts: Default::default(),
        })
    }

    /// Applies every migration this binary knows that the database lacks; returns the versions
    /// applied (empty when up to date).
    pub fn migrate(&self) -> Result<Vec<u32>, StoreError> {
        self.with_client(migrations::apply)
    }

    /// The schema version the database is at (0: empty).
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.with_client(migrations::current_version)
    }

    /// Refreshes the planner's statistics of every table (`ANALYZE`), for the end of a bulk
    /// load: the statements that follow it are then planned for the rows it wrote, not for the
    /// tables as autovacuum last saw them (its first analysis of a large load can come a minute
    /// or more later). Reads a sample of each table; writers are not blocked. Not bounded by the
    /// statement timeout, which is sized for requests.
    pub fn refresh_statistics(&self) -> Result<(), StoreError> {
        self.with_transaction(|db| db.batch("SET LOCAL statement_timeout = 0; ANALYZE"))
    }

    /// A pooled connection, waiting up to `checkout_timeout` while every connection is busy, but
    /// failing at once while the database refuses connections (a restart, an outage): a request
    /// then gets its 503 in milliseconds, not after the whole timeout.
    fn checkout(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        let deadline = Instant::now() + self.options.checkout_timeout;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now()).min(reachability::RECHECK);
            match self.pool.get_timeout(wait) {
                Ok(connection) => return Ok(connection),
                Err(error) if self.reachability.unreachable() => {
                    return Err(StoreError::Unavailable(format!("database unreachable: {error}")))
                }
                Err(error) if Instant::now() >= deadline => {
                    return Err(StoreError::Unavailable(format!("no database connection: {error}")))
                }
                Err(_) => {}
            }
        }
    }

    /// Runs `work` in a write transaction stamped with a fresh timestamp, committing only when
    /// it returns `Ok`.
    ///
    /// The timestamp comes from the clock row, whose row lock the transaction then holds until it
    /// commits: a later writer (or [`crate::Store::reserve_transaction_time`]) waits, so a
    /// transaction time T is handed out only after every write stamped before T has committed,
    /// and every write after it gets a later stamp (Bulk Data IG: transactionTime). This
    /// serialises writers, as SQLite's single writer does.
    fn with_write<T: Send>(
        &self,
        work: impl FnOnce(&mut Db<'_>, Micros) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        off_runtime(|| {
            let mut connection = self.checkout()?;
            let Connection { client, statements } = &mut *connection;
            let mut db = Db { transaction: client.transaction()?, statements };
            let timestamp = next_timestamp(&mut db)?;
            let result = work(&mut db, timestamp)?;
            db.transaction.commit()?;
            Ok(result)
        })
    }

    /// Runs `work` in one read-write transaction that does not take the clock (it writes nothing
    /// versioned: audit records, associated sets), committing only when it returns `Ok`.
    fn with_transaction<T: Send>(
        &self,
        work: impl FnOnce(&mut Db<'_>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        off_runtime(|| {
            let mut connection = self.checkout()?;
            let Connection { client, statements } = &mut *connection;
            let mut db = Db { transaction: client.transaction()?, statements };
            let result = work(&mut db)?;
            db.transaction.commit()?;
            Ok(result)
        })
    }

    /// Runs `work` in one read-only snapshot transaction.
    fn with_read<T: Send>(
        &self,
        work: impl FnOnce(&mut Db<'_>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        off_runtime(|| {
            let mut connection = self.checkout()?;
            let Connection { client, statements } = &mut *connection;
            let transaction = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let mut db = Db { transaction, statements };
            let result = work(&mut db)?;
            db.transaction.commit()?;
            Ok(result)
        })
    }
}

impl PgStore {
    /// Whether a result computed at `planned_at` for `selection`'s members is still exact.
    fn members_unchanged_since(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        planned_at: Micros,
    ) -> Result<bool, StoreError> {
        // While no patient of the tenant changed since, the members are not sent at all.
        let tenant_latest = || self.with_read(|db| plan_watermarks::tenant_latest_change(db, tenant));
        self.plans.members_unchanged_since(tenant, selection, planned_at, tenant_latest, || {
            self.with_read(|db| plan_watermarks::members_latest_change(db, tenant, selection))
        })
    }

    /// [`crate::Store::plan_parts`], computed: one short transaction per type (what a type
    /// selects depends only on the transaction time, so separate snapshots agree).
    fn compute_plan(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_types: &[String],
        part_size: u64,
    ) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
        // The members' rows of every type read once (`cohort.rs`), kept for the associated-data
        // pass that follows.
        let types: Vec<&str> = resource_types.iter().map(String::as_str).collect();
        let (members, cohort) = self.with_read(|db| {
            let members = export::Members::resolve(db, &self.member_keys, tenant, selection)?;
            let cohort = cohort::read(db, tenant, selection, &members, &types)?;
            Ok((members, cohort))
        })?;
        let mut planned = Vec::new();
        for resource_type in resource_types {
            let parts = self.with_read(|db| {
                export::plan_type(db, tenant, selection, &members, resource_type, part_size, cohort.as_ref())
            })?;
            if !parts.is_empty() {
                planned.push((resource_type.clone(), parts));
            }
        }
        if let Some(cohort) = cohort {
            self.cohorts.put(crate::cohort_keys::StashKey::of(tenant, selection), cohort);
        }
        Ok(planned)
    }
}

/// The next timestamp: the wall clock, or one microsecond past the last one when the clock has
/// not moved (or moved back), so timestamps never repeat.
fn next_timestamp(db: &mut Db<'_>) -> Result<Micros, StoreError> {
    let row =
        db.query_one("UPDATE clock SET last = GREATEST(last + 1, $1) WHERE id = 0 RETURNING last", &[&now_micros()])?;
    Ok(row.try_get(0)?)
}

impl From<postgres::Error> for StoreError {
    fn from(error: postgres::Error) -> Self {
        if let Some(db) = error.as_db_error() {
            // The server's own message (the error's Display says only "db error").
            let message = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
            return match db.code().code() {
                // disk_full, out_of_memory's neighbours in class 53 that mean "no space".
                "53100" => StoreError::StorageFull(message),
                // Class 08 (connection exception), admin/crash shutdown, cannot connect now, too
                // many connections, a statement timeout, serialisation failure, deadlock: the
                // same request can succeed later.
                code if code.starts_with("08")
                    || matches!(
                        code,
                        "57P01" | "57P02" | "57P03" | "53300" | "57014" | "40001" | "40P01" | "55P03"
                    ) =>
                {
                    StoreError::Unavailable(message)
                }
                _ => StoreError::Database(message),
            };
        }
        let io = std::error::Error::source(&error).is_some_and(|source| source.is::<std::io::Error>());
        if error.is_closed() || io || error.to_string().contains("timeout") || error.to_string().contains("connect") {
            StoreError::Unavailable(error.to_string())
        } else {
            StoreError::Database(error.to_string())
        }
    }
}

impl crate::Store for PgStore {
    fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        self.with_write(|db, _| admin::create_tenant(db, name))
    }

    fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.with_read(admin::list_tenants)
    }

    fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        self.with_read(|db| admin::tenant_by_name(db, name))
    }

    fn create_client(&self, tenant: TenantId, client_id: &str, secret_hash: &str) -> Result<ClientRecord, StoreError> {
        self.with_write(|db, _| admin::create_client(db, tenant, client_id, secret_hash))
    }

    fn list_clients(&self, tenant: TenantId) -> Result<Vec<ClientRecord>, StoreError> {
        self.with_read(|db| admin::list_clients(db, tenant))
    }

    fn client(&self, client_id: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.with_read(|db| admin::client(db, client_id))
    }

    fn revoke_client(&self, client_id: &str) -> Result<bool, StoreError> {
        self.with_write(|db, _| admin::revoke_client(db, client_id))
    }

    fn replace_client_secret_hash(&self, client_id: &str, expected: &str, new_hash: &str) -> Result<bool, StoreError> {
        self.with_write(|db, _| admin::replace_client_secret_hash(db, client_id, expected, new_hash))
    }

    fn server_key(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.with_write(|db, _| admin::server_key(db, name, candidate))
    }

    fn write_audited(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        ops: &[WriteOp],
        mode: WriteMode,
        audit_records: &AuditRecords<'_>,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        self.with_write(|db, timestamp| {
            let results = resources::write(db, tenant, owner, ops, &[], mode, timestamp, None)?;
            audit::append(db, &audit_records(&results))?;
            Ok(results)
        })
    }

    /// Takes each new resource's stored text and index rows from what was prepared (no detached
    /// body is parsed back, nor its rows derived again); only the ops the bulk path leaves to
    /// single writes get their bodies.
    fn write_prepared(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        ops: &[WriteOp],
        prepared: &[Option<crate::PreparedWrite>],
        mode: WriteMode,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        self.with_write(|db, timestamp| resources::write(db, tenant, owner, ops, prepared, mode, timestamp, None))
    }

    /// One transaction per batch, its commit not waiting for the WAL while more batches wait;
    /// the WAL flushed before any batch is reported stored (`bulk_load.rs`).
    fn write_bulk(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        source: &mut dyn crate::BulkSource,
    ) -> Result<(), StoreError> {
        bulk_load::write_bulk(self, tenant, owner, source)
    }

    fn read(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredResource>, StoreError> {
        self.with_read(|db| resources::read(db, tenant, visibility, resource_type, id))
    }

    fn vread(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<StoredResource>, StoreError> {
        self.with_read(|db| resources::vread(db, tenant, visibility, resource_type, id, version))
    }

    fn history(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        id: &str,
    ) -> Result<Vec<StoredResource>, StoreError> {
        self.with_read(|db| resources::history(db, tenant, visibility, resource_type, id))
    }

    fn search(&self, tenant: TenantId, visibility: &Visibility, query: &SearchQuery) -> Result<SearchPage, StoreError> {
        self.with_read(|db| resources::search(db, tenant, visibility, query))
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
        self.with_read(|db| export::version_at(db, tenant, resource_type, id, at))
    }

    fn existing_at(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        ids: &[String],
        at: Micros,
    ) -> Result<Vec<String>, StoreError> {
        let compute = || self.with_read(|db| export::existing_at(db, tenant, visibility, resource_type, ids, at));
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
        self.with_read(|db| export::members_at(db, tenant, group_id, at))
    }

    fn plan_parts(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_types: &[String],
        part_size: u64,
    ) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
        // A plan of the same request at an earlier time is this plan while no member's
        // compartment changed since (see `crate::plan_cache`).
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
        Box::new(part_reader::PgPartReader::new(self, tenant, selection, resource_type, range))
    }

    fn deleted_in_compartments(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_type: &str,
    ) -> Result<Vec<(String, Micros)>, StoreError> {
        let compute = || {
            self.with_read(|db| {
                export::deleted_in_compartments(db, &self.member_keys, tenant, selection, resource_type)
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
        let compute = || self.plan_associated_set(tenant, selection, request, part_size);
        if !crate::plan_cache::cacheable(selection, request.reference_sources.iter().chain(&request.provenance_sources))
        {
            return Ok(AssociatedPlan { set_id: request.set_id.clone(), parts: compute()? });
        }
        // A set computed earlier for the same request is this set while neither the members'
        // compartments nor any type it reaches outside them changed since: its stored rows are
        // shared (see `crate::plan_cache`).
        let key = self.plans.associated_key(tenant, selection, request, part_size);
        let (set_id, plan) = self.plans.associated(
            key,
            selection.transaction_time,
            &request.set_id,
            |planned_at| {
                Ok(self.members_unchanged_since(tenant, selection, planned_at)?
                    && !crate::plan_cache::reaches_any(
                        request,
                        &self
                            .with_read(|db| plan_watermarks::associated_types_changed_since(db, tenant, planned_at))?,
                    ))
            },
            |set_id| self.with_transaction(|db| plan_watermarks::share(db, tenant, set_id, request.expires)),
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
            next_key: Some(range.first_key),
            last_key: range.last_key,
            read_bytes: 0,
            read_lines: 0,
        })
    }

    fn associated_ids(
        &self,
        tenant: TenantId,
        set_id: &str,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        self.with_read(|db| associated::associated_ids(db, tenant, set_id, resource_type, ids))
    }

    fn provenance_targeting(
        &self,
        tenant: TenantId,
        targets: &[(String, String)],
        at: Micros,
    ) -> Result<Vec<String>, StoreError> {
        self.with_read(|db| associated::provenance_targeting(db, tenant, targets, at))
    }

    fn create_export_job(&self, tenant: TenantId, job: &ExportJob) -> Result<(), StoreError> {
        self.with_write(|db, _| jobs::create_export_job(db, tenant, job))
    }

    fn export_job(&self, tenant: TenantId, job_id: &str) -> Result<Option<ExportJob>, StoreError> {
        self.with_read(|db| jobs::export_job(db, tenant, job_id))
    }

    fn finish_export_job(
        &self,
        tenant: TenantId,
        job_id: &str,
        state: ExportJobState,
        manifest: &str,
    ) -> Result<bool, StoreError> {
        self.with_write(|db, _| jobs::finish_export_job(db, tenant, job_id, state, manifest))
    }

    fn delete_export_job(&self, tenant: TenantId, job_id: &str) -> Result<bool, StoreError> {
        self.with_write(|db, _| jobs::delete_export_job(db, tenant, job_id))
    }

    fn delete_expired_export_jobs(&self, now: Micros) -> Result<u64, StoreError> {
        self.with_write(|db, _| jobs::delete_expired_export_jobs(db, now))
    }

    fn expired_export_jobs(&self, now: Micros, limit: usize) -> Result<Vec<(TenantId, String)>, StoreError> {
        self.with_read(|db| jobs::expired_export_jobs(db, now, limit))
    }

    fn enqueue_export_job(
        &self,
        tenant: TenantId,
        job: &ExportJob,
        work: &str,
        cap: u64,
        now: Micros,
    ) -> Result<crate::JobAdmission, StoreError> {
        self.with_transaction(|db| leases::enqueue_export_job(db, tenant, job, work, cap, now))
    }

    fn unfinished_export_jobs(&self, tenant: TenantId, now: Micros) -> Result<u64, StoreError> {
        self.with_read(|db| leases::unfinished_export_jobs(db, tenant, now))
    }

    fn claim_export_job(
        &self,
        owner: &str,
        now: Micros,
        lease_for: Micros,
    ) -> Result<Option<crate::ClaimedJob>, StoreError> {
        self.with_transaction(|db| leases::claim_export_job(db, owner, now, lease_for))
    }

    fn renew_export_job_lease(
        &self,
        lease: &crate::JobLease,
        now: Micros,
        lease_for: Micros,
        progress: &str,
    ) -> Result<bool, StoreError> {
        self.with_transaction(|db| leases::renew_export_job_lease(db, lease, now, lease_for, progress))
    }

    fn save_export_job_checkpoint(&self, lease: &crate::JobLease, checkpoint: &str) -> Result<bool, StoreError> {
        self.with_transaction(|db| leases::save_export_job_checkpoint(db, lease, checkpoint))
    }

    fn record_export_job_part(&self, lease: &crate::JobLease, part: &crate::JobPart) -> Result<bool, StoreError> {
        self.with_transaction(|db| leases::record_export_job_part(db, lease, part))
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
        self.with_transaction(|db| leases::finish_leased_export_job(db, lease, state, failure_status, manifest))
    }

    fn export_job_activity(&self, tenant: TenantId, job_id: &str) -> Result<Option<crate::JobActivity>, StoreError> {
        self.with_read(|db| leases::export_job_activity(db, tenant, job_id))
    }

    fn hand_back_export_job(&self, lease: &crate::JobLease, now: Micros, progress: &str) -> Result<bool, StoreError> {
        self.with_transaction(|db| leases::hand_back_export_job(db, lease, now, progress))
    }

    fn create_export_record(&self, tenant: TenantId, record: &ExportRecord) -> Result<(), StoreError> {
        self.with_write(|db, _| jobs::create_export_record(db, tenant, record))
    }

    fn export_record(&self, tenant: TenantId, record_id: &str) -> Result<Option<ExportRecord>, StoreError> {
        self.with_read(|db| jobs::export_record(db, tenant, record_id))
    }

    fn delete_expired_export_records(&self, now: Micros) -> Result<u64, StoreError> {
        self.with_write(|db, _| jobs::delete_expired_export_records(db, now))
    }

    /// PostgreSQL's own disk is not visible to a client (a full one fails writes with SQLSTATE
    /// 53100, answered 507); what is checked is this instance's local directory, and a real
    /// write on the server.
    fn check_writable(&self, min_free_bytes: u64) -> Result<(), StoreError> {
        let directory = &self.options.local_dir;
        if let Some(available) = crate::sqlite::available_bytes(directory) {
            if available < min_free_bytes {
                return Err(StoreError::StorageFull(format!(
                    "{available} bytes available on the disk of {}, below the floor of {min_free_bytes}",
                    directory.display()
                )));
            }
        }
        off_runtime(|| {
            let mut connection = self.checkout()?;
            let Connection { client, statements } = &mut *connection;
            let mut db = Db { transaction: client.transaction()?, statements };
            db.execute("UPDATE health_probe SET checked = $1 WHERE id = 0", &[&now_micros()])?;
            db.transaction.commit()?;
            Ok(())
        })
    }

    fn set_client_registration(&self, client_id: &str, registration: &ClientRegistration) -> Result<bool, StoreError> {
        self.with_write(|db, _| admin::set_client_registration(db, client_id, registration))
    }

    fn client_registration(&self, client_id: &str) -> Result<Option<ClientRegistration>, StoreError> {
        self.with_read(|db| admin::client_registration(db, client_id))
    }

    fn record_assertion_jti(
        &self,
        tenant: TenantId,
        client_id: &str,
        jti: &str,
        expires: Micros,
        now: Micros,
    ) -> Result<bool, StoreError> {
        self.with_write(|db, _| admin::record_assertion_jti(db, tenant, client_id, jti, expires, now))
    }

    fn patients_at(&self, tenant: TenantId, visibility: &Visibility, at: Micros) -> Result<Vec<String>, StoreError> {
        self.with_read(|db| {
            let ids: Vec<String> = db
                .query(
                    "SELECT id FROM resources WHERE tenant_id = $1 AND resource_type = 'Patient' ORDER BY id",
                    &[&tenant.0],
                )?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            export::existing_at(db, tenant, visibility, "Patient", &ids, at)
        })
    }

    fn plan_cache_stats(&self) -> Option<crate::PlanCacheStats> {
        Some(self.plans.stats())
    }

    fn group_at(&self, tenant: TenantId, group_id: &str, at: Micros) -> Result<Option<crate::GroupAt>, StoreError> {
        // One transaction: the body read on a memo miss is the version's whatever is pruned meanwhile.
        self.with_read(|db| {
            let Some((rid, version)) = export::version_head_at(db, tenant, "Group", group_id, at)? else {
                return Ok(None);
            };
            let number = version.version;
            self.plans.groups.group_at(tenant, version, || export::version_body(db, tenant, rid, number)).map(Some)
        })
    }

    fn missing_members(&self, tenant: TenantId, selection: &MemberSelection) -> Result<Vec<String>, StoreError> {
        let at = selection.transaction_time;
        crate::plan_cache::missing_members(
            &self.plans,
            tenant,
            selection,
            |planned_at| self.members_unchanged_since(tenant, selection, planned_at),
            |ids| self.with_read(|db| export::existing_at(db, tenant, &selection.visibility, "Patient", ids, at)),
        )
    }

    fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        self.with_transaction(|db| audit::append(db, records))
    }

    fn audit_records(&self, tenant: TenantId, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.with_read(|db| audit::records(db, tenant, query))
    }

    fn prune_audit(&self, before: Micros) -> Result<u64, StoreError> {
        self.with_transaction(|db| audit::prune(db, before))
    }

    fn history_horizon(&self) -> Result<Option<Micros>, StoreError> {
        self.with_read(retention::history_horizon)
    }

    fn prune_history(&self, cutoff: Micros, now: Micros, batch: usize) -> Result<PruneReport, StoreError> {
        retention::prune(self, cutoff, now, batch)
    }

    /// The database's size as PostgreSQL reports it; its WAL is the server's, shared with other
    /// databases, so it is not counted here.
    fn storage_bytes(&self) -> Result<StorageBytes, StoreError> {
        let database: i64 =
            self.with_read(|db| Ok(db.query_one("SELECT pg_database_size(current_database())", &[])?.try_get(0)?))?;
        Ok(StorageBytes { database: database.max(0) as u64, wal: 0 })
    }

    fn token_keys(&self) -> Result<Vec<crate::TokenKey>, StoreError> {
        self.with_transaction(shared_state::token_keys)
    }

    fn token_keys_version(&self) -> Result<i64, StoreError> {
        self.with_transaction(shared_state::token_keys_version)
    }

    fn init_token_keys(&self, keys: &[crate::TokenKey]) -> Result<bool, StoreError> {
        self.with_transaction(|db| shared_state::init_token_keys(db, keys))
    }

    fn rotate_token_keys(
        &self,
        secret: &[u8],
        now: i64,
        drop_retired_before: i64,
    ) -> Result<Vec<crate::TokenKey>, StoreError> {
        self.with_transaction(|db| shared_state::rotate_token_keys(db, secret, now, drop_retired_before))
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
        self.with_transaction(|db| shared_state::draw_quota_tokens(db, tenant, quota, want, capacity, rate, now))
    }

    fn record_login_failure(&self, key: &str, window: Micros, now: Micros) -> Result<crate::LoginWindow, StoreError> {
        self.with_transaction(|db| shared_state::record_login_failure(db, key, window, now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::{Store, StoreError};

    // Without BULKHEAD_TEST_DATABASE_URL each test returns at once (after a loud notice; under
    // CI it fails instead): see `testing::fresh_store`.
    crate::store_test_suite!(match super::testing::fresh_store() {
        Some(store) => store,
        None => return,
    });

    /// The audit trail is append-only in the database itself: an UPDATE fails, whoever runs it,
    /// and the record stays as it was.
    #[test]
    fn audit_records_cannot_be_updated() {
        use crate::{AuditQuery, AuditRecord};
        let Some(store) = super::testing::fresh_store() else { return };
        let tenant = store.create_tenant("t").unwrap().id;
        let record = AuditRecord {
            seq: 0,
            time: 1,
            tenant,
            client: "c".into(),
            user: None,
            peer: None,
            request_id: "r".into(),
            action: "read".into(),
            target: "Patient/a".into(),
            outcome: "failure".into(),
            status: 404,
            detail: "{}".into(),
            patients: vec!["a".into()],
            cohort: None,
        };
        store.append_audit(&[record]).unwrap();
        let updated = store.with_transaction(|db| db.execute("UPDATE audit_log SET outcome = 'success'", &[]));
        match updated {
            Err(StoreError::Database(message)) => assert!(message.contains("append-only"), "{message}"),
            other => panic!("an UPDATE of the audit trail must fail, got {other:?}"),
        }
        let stored = store.audit_records(tenant, &AuditQuery { limit: 10, ..Default::default() }).unwrap();
        assert_eq!((stored.len(), stored[0].outcome.as_str()), (1, "failure"));
    }

    /// On a database whose default collation is a language's (ICU en-US: case and punctuation
    /// weigh less than letters, so "a" < "B" < "b"), text keys still sort by bytes, as on SQLite
    /// and in Rust: the schema gives them the "C" collation. Without it the Patient ids of a
    /// Patient-level export, a Group's members and tenant names come back in the language's order.
    #[test]
    fn text_keys_sort_by_bytes_under_a_language_collation() {
        let Some(database) = super::testing::fresh_database_with(
            "TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'",
        ) else {
            return;
        };
        let store = super::PgStore::open(&database.url, super::testing::test_options()).unwrap();
        let language_order: bool =
            store.with_read(|db| Ok(db.query_one("SELECT 'a'::text < 'B'::text", &[])?.try_get(0)?)).unwrap();
        assert!(language_order, "the database's default collation is not byte order");
        crate::testsuite::text_keys_sort_by_bytes(&store);
        drop(store);
    }

    /// After `refresh_statistics` the planner knows how many rows a load wrote (`reltuples` is
    /// -1 for a table never analysed).
    #[test]
    fn refreshed_statistics_count_the_rows_written() {
        let Some(store) = super::testing::fresh_store() else { return };
        let tenant = store.create_tenant("t").unwrap().id;
        for n in 0..10 {
            let body = serde_json::json!({"resourceType": "Patient", "id": format!("p{n}")});
            let op =
                crate::WriteOp::Update { resource_type: "Patient".into(), id: format!("p{n}"), body, if_match: None };
            store.write(tenant, None, &[op], crate::WriteMode::Transaction).unwrap().remove(0).unwrap();
        }
        let estimated = |store: &super::PgStore| -> f32 {
            store
                .with_read(|db| {
                    Ok(db
                        .query_one("SELECT reltuples FROM pg_class WHERE oid = 'resources'::regclass", &[])?
                        .try_get(0)?)
                })
                .unwrap()
        };
        assert_eq!(estimated(&store), -1.0, "not analysed yet (10 rows are below autovacuum's threshold)");
        store.refresh_statistics().unwrap();
        assert_eq!(estimated(&store), 10.0);
    }

    /// Nothing listens: calls fail within the connect timeout as `Unavailable` (503), never hang.
    #[test]
    fn an_unreachable_database_is_unavailable_quickly() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options = super::PgOptions {
            connect_timeout: Duration::from_secs(1),
            checkout_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let store = super::PgStore::connect(&format!("postgres://nobody@127.0.0.1:{port}/none"), options).unwrap();
        let started = Instant::now();
        match store.tenant_by_name("acme") {
            Err(StoreError::Unavailable(_)) => {}
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "failed fast: {:?}", started.elapsed());
        assert!(store.check_writable(0).is_err());
    }
}
