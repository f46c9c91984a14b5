//! Storage for Bulkhead: tenants, clients, versioned FHIR resources, the patient compartment
//! index and Group membership history, behind one [`Store`] trait.
//!
//! The trait is blocking: callers on an async runtime run it on blocking threads. Every method
//! that touches resources takes a [`TenantId`]; nothing crosses tenants. [`testsuite`] holds the
//! conformance suite every implementation runs.

mod audit;
mod cohort_keys;
mod error;
mod job_lease;
mod members;
mod model;
mod plan_cache;
pub mod postgres;
mod range_scan;
mod retention;
mod search;
mod selection;
mod shared_state;
pub mod sqlite;
mod write;

#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;

pub use audit::{AuditCohort, AuditQuery, AuditRecord};
pub use error::StoreError;
pub use job_lease::{ClaimedJob, JobActivity, JobAdmission, JobLease, JobPart};
pub use members::{GroupAt, GroupMembers, Members};
pub use model::{
    AssociatedPlan, AssociatedRequest, ClientRecord, ClientRegistration, ExportJob, ExportJobState, ExportRecord,
    MemberSelection, PartRange, ProvenanceSelection, ReferencedTypes, SelectionScope, StoredResource, Tenant, TenantId,
    Visibility,
};
pub use plan_cache::PlanCacheStats;
pub use retention::{PruneReport, StorageBytes};
pub use search::{IdentifierQuery, LastUpdatedBound, ReferenceQuery, SearchPage, SearchQuery};
pub use shared_state::{next_kid, LoginWindow, TokenKey};
pub use write::{group_members, stamped_json, PreparedWrite, StampTemplate, WriteMode, WriteOp, Written};

use bulkhead_fhir::Micros;

/// One batch of a bulk load ([`Store::write_bulk`]): ops with what was prepared for them
/// (`prepared[i]` for `ops[i]`, as in [`Store::write_prepared`]).
pub struct BulkBatch {
    pub ops: Vec<WriteOp>,
    pub prepared: Vec<Option<PreparedWrite>>,
}

/// Where a bulk load's batches come from and where their outcomes go ([`Store::write_bulk`]).
pub trait BulkSource {
    /// The next batch. `wait` is true when no transaction is open: wait for one (`None`: the
    /// load is over). `wait` is false while a transaction is open: a batch that is already
    /// waiting, when the source lets the transaction grow (`None`: commit now). A store never
    /// waits on its source with a transaction open.
    fn next_batch(&mut self, wait: bool) -> Option<BulkBatch>;
    /// A batch written in the open transaction, given back with its results: they are stored
    /// only once [`BulkSource::committed`] follows (after an `Err` from `write_bulk`, they are not).
    fn written(&mut self, batch: BulkBatch, results: Vec<Result<Written, StoreError>>);
    /// Every batch `written` since the last call is committed.
    fn committed(&mut self);
    /// The open transaction was rolled back (an entry failed): every batch `written` since the
    /// last commit is not stored, and `next_batch` hands them out again, in order, first.
    fn rewind(&mut self);
}

/// Writes one bulk batch as one transaction: as a whole, and only when an entry fails (entries
/// are checked ahead, so that is rare) entry by entry.
pub(crate) fn write_bulk_batch<S: Store + ?Sized>(
    store: &S,
    tenant: TenantId,
    owner: Option<&str>,
    batch: &BulkBatch,
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    match store.write_prepared(tenant, owner, &batch.ops, &batch.prepared, WriteMode::Transaction) {
        Ok(results) => Ok(results),
        Err(error) if error.is_store_failure() => Err(error),
        Err(_) => store.write_prepared(tenant, owner, &batch.ops, &batch.prepared, WriteMode::Batch),
    }
}

/// Reads one planned part of an export a window at a time ([`Store::part_reader`]).
pub trait PartReader {
    /// Appends the part's next resources to `out`, in key order, each as one NDJSON line (its
    /// stored JSON, then `\n`), stopping once it has appended `max_bytes` or more; returns how many
    /// it appended, 0 once the part is complete.
    ///
    /// Each call is one short read transaction, and none is open when it returns: the caller
    /// may wait as long as it likes (on a slow client) between calls without pinning the database.
    fn next_window(&mut self, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError>;
}

/// The storage seam. Implementations: [`sqlite::SqliteStore`], [`postgres::PgStore`].
pub trait Store: Send + Sync + 'static {
    // ---- tenants and clients (admin) ----

    /// Creates a tenant; a duplicate name is [`StoreError::Conflict`].
    fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError>;
    fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError>;
    /// Registers a client; `secret_hash` is already a hash of the secret (never the secret).
    fn create_client(&self, tenant: TenantId, client_id: &str, secret_hash: &str) -> Result<ClientRecord, StoreError>;
    fn list_clients(&self, tenant: TenantId) -> Result<Vec<ClientRecord>, StoreError>;
    /// Looks a client up by its globally unique id (credentials identify the tenant).
    fn client(&self, client_id: &str) -> Result<Option<ClientRecord>, StoreError>;
    /// Revokes a client; false when no such client exists.
    fn revoke_client(&self, client_id: &str) -> Result<bool, StoreError>;
    /// Replaces a client's secret hash if it still is `expected` (a compare-and-swap, so two
    /// processes migrating the same row cannot undo a re-key); true when it was replaced.
    fn replace_client_secret_hash(&self, client_id: &str, expected: &str, new_hash: &str) -> Result<bool, StoreError>;
    /// The server-wide key stored under `name`, storing `candidate` first when there is none
    /// (the first process to ask wins; every later caller gets the same bytes).
    fn server_key(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// Stores the SMART Backend Services registration of `client_id` (keys, scopes, token
    /// lifetime), replacing any earlier one; false when no such client exists.
    fn set_client_registration(&self, client_id: &str, registration: &ClientRegistration) -> Result<bool, StoreError>;
    /// The registration of `client_id` (None when it has none: a client-headers-only client with
    /// full access to its tenant).
    fn client_registration(&self, client_id: &str) -> Result<Option<ClientRegistration>, StoreError>;
    /// Records that `client_id` of `tenant` used the assertion `jti`, which expires at
    /// `expires`: true when it is new, false when a record of it that has not expired (by `now`)
    /// exists, i.e. a replay. Records that expired by `now` are deleted on the way, so the table
    /// holds only live assertions. Shared by every instance on the store.
    fn record_assertion_jti(
        &self,
        tenant: TenantId,
        client_id: &str,
        jti: &str,
        expires: Micros,
        now: Micros,
    ) -> Result<bool, StoreError>;

    // ---- FHIR resources ----

    /// Applies writes as one transaction ([`WriteMode::Transaction`]: all or nothing; the first
    /// failure is returned as `Err`) or entry by entry ([`WriteMode::Batch`]). Each written
    /// version gets `meta.versionId` and `meta.lastUpdated`; the compartment index, search index
    /// and Group membership history follow in the same transaction. `owner` is the user the
    /// writes belong to (`None`: the tenant itself).
    fn write(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        ops: &[WriteOp],
        mode: WriteMode,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        self.write_audited(tenant, owner, ops, mode, &|_: &[Result<Written, StoreError>]| Vec::new())
    }

    /// [`Store::write`], appending the audit records `audit` makes from the entries' results in
    /// the same transaction: the records commit exactly when the writes do. A transaction that
    /// fails (`Err`) stores neither, and the caller records the failure on its own.
    fn write_audited(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        ops: &[WriteOp],
        mode: WriteMode,
        audit: &AuditRecords<'_>,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError>;

    /// [`Store::write`] with what each op's write derives from its body prepared ahead
    /// (`prepared[i]` for `ops[i]`, built by [`PreparedWrite::new`] from that op's type, id and
    /// body; `None`, or a missing entry, for ops without one): a bulk load prepares them on its
    /// own thread while the previous batch is written. The result is exactly [`Store::write`]'s;
    /// a store that has no use for them writes the ops as they are. An op prepared by
    /// [`PreparedWrite::detached`] carries a placeholder body: the body is its template's text,
    /// parsed only when a write needs it ([`PreparedWrite::detached_body`]).
    fn write_prepared(
        &self,
        tenant: TenantId,
        owner: Option<&str>,
        ops: &[WriteOp],
        prepared: &[Option<PreparedWrite>],
        mode: WriteMode,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        // Only the bodies of detached writes are needed from what was prepared.
        if !prepared.iter().flatten().any(|prepared| prepared.detached) {
            return self.write(tenant, owner, ops, mode);
        }
        let ops = ops
            .iter()
            .enumerate()
            .map(|(index, op)| match prepared.get(index).and_then(Option::as_ref) {
                Some(prepared) => prepared.attach(op),
                None => Ok(op.clone()),
            })
            .collect::<Result<Vec<WriteOp>, _>>()?;
        self.write(tenant, owner, &ops, mode)
    }

    /// Writes a bulk load's batches, pulled from `source` until it has no more: each batch as
    /// [`Store::write_prepared`] would in [`WriteMode::Transaction`], or, when an entry fails,
    /// in [`WriteMode::Batch`]. A store may write several batches in one transaction (as many as
    /// the source hands over without waiting): a bulk load then rewrites its indexes' hot pages
    /// once per transaction instead of once per batch. By default, one transaction per batch.
    /// `Err` (the store's own failure) stops the load; batches not yet committed are not stored.
    fn write_bulk(&self, tenant: TenantId, owner: Option<&str>, source: &mut dyn BulkSource) -> Result<(), StoreError> {
        while let Some(batch) = source.next_batch(true) {
            let results = write_bulk_batch(self, tenant, owner, &batch)?;
            source.written(batch, results);
            source.committed();
        }
        Ok(())
    }

    /// The current version (possibly a tombstone) of a resource visible to `visibility`.
    fn read(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredResource>, StoreError>;
    /// One version of a resource.
    fn vread(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<StoredResource>, StoreError>;
    /// Every version of a resource, newest first.
    fn history(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        id: &str,
    ) -> Result<Vec<StoredResource>, StoreError>;
    /// Type-level search over current, non-deleted versions, in key order, keyset-paged.
    fn search(&self, tenant: TenantId, visibility: &Visibility, query: &SearchQuery) -> Result<SearchPage, StoreError>;
    // ---- export ----

    /// Reserves a transaction time: every write committed before the call has
    /// `lastUpdated <= T`, every write after it `> T` (Bulk Data IG: transactionTime).
    fn reserve_transaction_time(&self) -> Result<Micros, StoreError>;
    /// The version of a resource as it was at `at` (None if it did not exist or was deleted).
    fn version_at(
        &self,
        tenant: TenantId,
        resource_type: &str,
        id: &str,
        at: Micros,
    ) -> Result<Option<StoredResource>, StoreError>;
    /// The ids among `ids` (of `resource_type`) that existed, not deleted and visible, at `at`.
    fn existing_at(
        &self,
        tenant: TenantId,
        visibility: &Visibility,
        resource_type: &str,
        ids: &[String],
        at: Micros,
    ) -> Result<Vec<String>, StoreError>;
    /// Patient ids that were (active) members of the Group at `at`, from membership history.
    fn members_at(&self, tenant: TenantId, group_id: &str, at: Micros) -> Result<Vec<String>, StoreError>;
    /// For each of `resource_types`, splits its selected resources into consecutive key ranges
    /// of at most `part_size` resources each, with exact counts (types with none get no part).
    fn plan_parts(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_types: &[String],
        part_size: u64,
    ) -> Result<Vec<(String, Vec<PartRange>)>, StoreError>;
    /// A reader of the selected resources of one type within `range` (a planned part), in key
    /// order. Every window is read as of the selection's transaction time, so the windows agree
    /// with each other and with the plan whatever is written between them.
    fn part_reader<'a>(
        &'a self,
        tenant: TenantId,
        selection: &'a MemberSelection,
        resource_type: &'a str,
        range: PartRange,
    ) -> Box<dyn PartReader + 'a>;
    /// `deleted[]` of one type (empty without `since`), as `(id, lastUpdated of the version at the
    /// transaction time)`, in key order, each resource once: resources deleted in
    /// `(since, transaction_time]` found through a member that was a member at `since` too, and
    /// resources that at `since` were live in such a member's compartment but at the transaction
    /// time are live in no member's compartment (re-pointed elsewhere: "no longer part of this
    /// cohort's data"). Data held only through members removed since `since` is not listed.
    fn deleted_in_compartments(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        resource_type: &str,
    ) -> Result<Vec<(String, Micros)>, StoreError>;
    /// Computes the associated data of a Patient or Group export (Provenance and referenced
    /// resources, see [`AssociatedRequest`]) as of the selection's transaction time, stores it
    /// under `request.set_id` (swept by [`Store::delete_expired_export_records`] once
    /// `request.expires` has passed), and splits each type's resources into consecutive key
    /// ranges of at most `part_size`, with exact counts (types with none get no entry). Memory
    /// stays bounded whatever the cohort's size: the working sets live in the database.
    ///
    /// A store may instead answer with a set it stored earlier that is provably the same set
    /// (its plan cache): then the returned set id is that set's, and its expiry is extended to
    /// at least `request.expires`. Readers use the returned set id.
    fn plan_associated(
        &self,
        tenant: TenantId,
        selection: &MemberSelection,
        request: &AssociatedRequest,
        part_size: u64,
    ) -> Result<AssociatedPlan, StoreError>;
    /// A reader of one planned part of a stored associated set (see [`Store::plan_associated`]):
    /// each resource's version at the selection's transaction time, in key order, a window at a
    /// time, like [`Store::part_reader`].
    fn associated_reader<'a>(
        &'a self,
        tenant: TenantId,
        selection: &'a MemberSelection,
        set_id: &'a str,
        resource_type: &'a str,
        range: PartRange,
    ) -> Box<dyn PartReader + 'a>;
    /// The ids among `ids` (of `resource_type`) that the stored associated set `set_id` holds.
    fn associated_ids(
        &self,
        tenant: TenantId,
        set_id: &str,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<String>, StoreError>;
    /// Ids of the tenant's Patients that existed, not deleted and visible, at `at`, sorted (the
    /// members of a Patient-level export).
    fn patients_at(&self, tenant: TenantId, visibility: &Visibility, at: Micros) -> Result<Vec<String>, StoreError>;
    /// The ids of the Provenance resources whose `Provenance.target`, at `at`, names one of
    /// `targets` (`(type, id)`), sorted, each once: the Provenance of one patient's resources,
    /// for output organised by patient (which ones the export holds, its associated set says).
    fn provenance_targeting(
        &self,
        tenant: TenantId,
        targets: &[(String, String)],
        at: Micros,
    ) -> Result<Vec<String>, StoreError>;
    /// How often this store's plan cache answered plans, `deleted[]` lists and associated sets
    /// (for tests and operators); `None` for a store without one.
    fn plan_cache_stats(&self) -> Option<PlanCacheStats> {
        None
    }
    /// `Group/group_id` as of `at`, for an export: its version then (a tombstone included;
    /// `body` left out) and the Patient members that version lists (time-filtered by
    /// [`GroupMembers::at`] as [`group_members`] filters them). None when it had no version by
    /// `at`. The caller checks visibility (`owner`). A store parses each version's members once
    /// and shares the list between kick-offs: a repeated kick-off of a large Group neither reads
    /// its text nor copies its members.
    fn group_at(&self, tenant: TenantId, group_id: &str, at: Micros) -> Result<Option<GroupAt>, StoreError>;
    /// The members of `selection` (ids, in member order) whose Patient did not exist, not
    /// deleted and visible for the selection's visibility, at its transaction time (a Group
    /// export's error file names them). A store may answer from its plan cache while no member
    /// changed, as [`Store::existing_at`] of Patients does.
    fn missing_members(&self, tenant: TenantId, selection: &MemberSelection) -> Result<Vec<String>, StoreError>;

    // ---- asynchronous export jobs ----

    /// Stores a new export job of `tenant`; an existing `(tenant, job.id)` is
    /// [`StoreError::Conflict`].
    fn create_export_job(&self, tenant: TenantId, job: &ExportJob) -> Result<(), StoreError>;
    /// The job `job_id` of `tenant` (None for another tenant's or an unknown id). Expired jobs
    /// not yet swept are returned: the caller compares `expires` with its clock.
    fn export_job(&self, tenant: TenantId, job_id: &str) -> Result<Option<ExportJob>, StoreError>;
    /// Finishes the job `job_id` of `tenant` if it is still [`ExportJobState::Planning`]: sets
    /// `state` (never `Planning`) and `manifest`. False when there is no such planning job (it
    /// was deleted, i.e. cancelled, or already finished): the caller's result is discarded.
    fn finish_export_job(
        &self,
        tenant: TenantId,
        job_id: &str,
        state: ExportJobState,
        manifest: &str,
    ) -> Result<bool, StoreError>;
    /// Deletes the job `job_id` of `tenant`; false when `tenant` has no such job.
    fn delete_export_job(&self, tenant: TenantId, job_id: &str) -> Result<bool, StoreError>;
    /// Housekeeping across all tenants: deletes every job with `expires <= now`; returns how many.
    fn delete_expired_export_jobs(&self, now: Micros) -> Result<u64, StoreError>;
    /// Housekeeping across all tenants: up to `limit` jobs with `expires <= now`, as
    /// `(tenant, job id)`, soonest expiry first, without deleting them. The caller removes what a
    /// job owns outside the store (its output objects) before [`Store::delete_export_job`], so a
    /// failed removal leaves the job to be found again by the next sweep.
    fn expired_export_jobs(&self, now: Micros, limit: usize) -> Result<Vec<(TenantId, String)>, StoreError>;

    // ---- export job leases (background work shared by every instance on the store) ----

    /// Stores a new [`ExportJobState::Planning`] job of `tenant` with its `work` (what a worker
    /// needs to run it, as text the caller owns), due at once, unless the tenant already has
    /// `cap` or more unfinished jobs (planning, not expired by `now`); `cap` 0 is no cap. The
    /// count and the insert are one transaction, so instances sharing the store cannot together
    /// pass the cap. An existing `(tenant, job.id)` is [`StoreError::Conflict`].
    fn enqueue_export_job(
        &self,
        tenant: TenantId,
        job: &ExportJob,
        work: &str,
        cap: u64,
        now: Micros,
    ) -> Result<JobAdmission, StoreError>;
    /// How many unfinished jobs (planning, not expired by `now`) `tenant` has, across instances.
    fn unfinished_export_jobs(&self, tenant: TenantId, now: Micros) -> Result<u64, StoreError>;
    /// Claims one due job for `owner` until `now + lease_for`: a planning job, not expired, whose
    /// lease is free (never claimed, or lapsed by `now`). Fair across tenants: a job of the
    /// tenant with the fewest jobs under a live lease first, then the oldest job. The claim
    /// increments the job's fencing token and hands over its work, checkpoint and recorded parts;
    /// `None` when nothing is due. Exactly one of several concurrent claimers gets a given job.
    fn claim_export_job(&self, owner: &str, now: Micros, lease_for: Micros) -> Result<Option<ClaimedJob>, StoreError>;
    /// The holder's heartbeat: extends the lease to `now + lease_for` and records `progress`.
    /// False when `lease` is stale (the job was claimed since), or the job finished or is gone
    /// (cancelled): the holder stops and writes nothing more.
    fn renew_export_job_lease(
        &self,
        lease: &JobLease,
        now: Micros,
        lease_for: Micros,
        progress: &str,
    ) -> Result<bool, StoreError>;
    /// Saves a checkpoint of the work (replacing any earlier one) while `lease` holds; false
    /// (nothing saved) when it is stale or the job is finished or gone.
    fn save_export_job_checkpoint(&self, lease: &JobLease, checkpoint: &str) -> Result<bool, StoreError>;
    /// Records a finished part of the work (replacing a record of the same index) while `lease`
    /// holds; false (nothing recorded) when it is stale or the job is finished or gone.
    fn record_export_job_part(&self, lease: &JobLease, part: &JobPart) -> Result<bool, StoreError>;
    /// [`Store::finish_export_job`] under a lease: finishes the job only while `lease` holds
    /// (false otherwise: the result is discarded) and forgets its recorded parts.
    fn finish_leased_export_job(
        &self,
        lease: &JobLease,
        state: ExportJobState,
        manifest: &str,
    ) -> Result<bool, StoreError>;
    /// Who holds the job `job_id` of `tenant` and its last progress (None: no such job).
    fn export_job_activity(&self, tenant: TenantId, job_id: &str) -> Result<Option<JobActivity>, StoreError>;
    /// A live holder gives its job back (its instance is stopping): the lease ends at `now`, so
    /// any instance's next claim resumes the job, and the hand-back is counted, so that claim
    /// is not counted as an interrupted one ([`ClaimedJob::interrupted_claims`]). The fencing
    /// token is left as it is: the next claim increments it, so this holder can write nothing
    /// more. False (nothing changed) when `lease` is stale or the job is finished or gone.
    fn hand_back_export_job(&self, lease: &JobLease, now: Micros, progress: &str) -> Result<bool, StoreError>;

    // ---- export records (what file URLs refer to) ----

    /// Stores the record of a planned export of `tenant`; an existing `(tenant, record.id)` is
    /// [`StoreError::Conflict`].
    fn create_export_record(&self, tenant: TenantId, record: &ExportRecord) -> Result<(), StoreError>;
    /// The record `record_id` of `tenant` (None for another tenant's or an unknown id). Expired
    /// records not yet swept are returned: the caller compares `expires` with its clock.
    fn export_record(&self, tenant: TenantId, record_id: &str) -> Result<Option<ExportRecord>, StoreError>;
    /// Housekeeping across all tenants: deletes every record with `expires <= now`; returns how
    /// many.
    fn delete_expired_export_records(&self, now: Micros) -> Result<u64, StoreError>;

    // ---- health ----

    /// Whether the store can take writes now: [`StoreError::StorageFull`] when the disk holding
    /// its data has less than `min_free_bytes` available, else the error of a small real write
    /// (a read-only or broken database), if any.
    fn check_writable(&self, min_free_bytes: u64) -> Result<(), StoreError>;

    // ---- audit trail (append-only) ----

    /// Appends audit records (their `seq` is assigned by the store), in one transaction.
    fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError>;
    /// The audit records of `tenant` matching `query`, in append order (ascending `seq`), at most
    /// `query.limit`, each with its `patients`.
    fn audit_records(&self, tenant: TenantId, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;
    /// Housekeeping across all tenants (audit retention): deletes audit records with
    /// `time < before`, never a later one; returns how many. The only way records leave the
    /// trail. A store may keep an old record appended after a newer one of its tenant (a long
    /// download's, recorded when it ends) until a later prune: at least every record appended
    /// before the tenant's first one at or after `before` goes.
    fn prune_audit(&self, before: Micros) -> Result<u64, StoreError>;

    // ---- retention and operations ----

    /// The prune horizon: history before it has been removed ([`Store::prune_history`]), so an
    /// export with a `_since` before it would be incomplete. `None` until the first prune.
    fn history_horizon(&self) -> Result<Option<Micros>, StoreError>;
    /// Removes history from before `cutoff`, in small batches (each its own short write
    /// transaction, so writers are never held up for long): earlier versions superseded at or
    /// before the horizon, tombstones deleted at or before it (with their index rows), closed
    /// compartment rows and ended Group memberships. Current versions are never removed. The
    /// horizon is `cutoff`, or earlier when an unexpired export record or a planning export job
    /// (created before `cutoff`) still needs the history at its transaction time; it is recorded
    /// (never moving back) before anything is removed.
    fn prune_history(&self, cutoff: Micros, now: Micros, batch: usize) -> Result<PruneReport, StoreError>;
    /// The store's size on disk.
    fn storage_bytes(&self) -> Result<StorageBytes, StoreError>;

    // ---- state shared by every instance on the store (signing keys, quotas, failed logins) ----

    /// The keys that sign and verify file URLs and access tokens, newest first (the first one
    /// not retired signs); empty until [`Store::init_token_keys`].
    fn token_keys(&self) -> Result<Vec<TokenKey>, StoreError>;
    /// A number that changes whenever the token keys change (one indexed read: every instance
    /// polls it once a second).
    fn token_keys_version(&self) -> Result<i64, StoreError>;
    /// Stores `keys` (newest first) if the store holds no token keys yet, atomically across
    /// processes; false (nothing changed) when it already holds some.
    fn init_token_keys(&self, keys: &[TokenKey]) -> Result<bool, StoreError>;
    /// Rotation, in one transaction: every key not yet retired is retired at `now` (Unix
    /// seconds), keys retired before `drop_retired_before` are removed, and `secret` becomes the
    /// signing key under [`next_kid`]. Returns the keys after it, newest first.
    fn rotate_token_keys(&self, secret: &[u8], now: i64, drop_retired_before: i64)
        -> Result<Vec<TokenKey>, StoreError>;
    /// Takes up to `want` tokens from the shared token bucket `(tenant, quota)`, atomically
    /// across processes: the bucket starts full at `capacity` and refills at `rate` per second of
    /// `now` (microseconds) since its last draw, up to `capacity`. Returns the tokens taken (0
    /// when it is empty).
    fn draw_quota_tokens(
        &self,
        tenant: TenantId,
        quota: &str,
        want: f64,
        capacity: f64,
        rate: f64,
        now: Micros,
    ) -> Result<f64, StoreError>;
    /// Counts one failed login for `key` (a peer address or a client id) in its fixed window of
    /// `window` microseconds (a new window starts at `now` when there is none or it has ended),
    /// atomically across processes; windows that ended are removed. Returns the window after it.
    fn record_login_failure(&self, key: &str, window: Micros, now: Micros) -> Result<LoginWindow, StoreError>;
}

/// Makes the audit records of a write from its entries' results ([`Store::write_audited`]).
pub type AuditRecords<'a> = dyn Fn(&[Result<Written, StoreError>]) -> Vec<AuditRecord> + Sync + 'a;
