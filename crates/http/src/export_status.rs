//! The asynchronous Bulk Data pattern: a kick-off with `Prefer: respond-async` becomes a job
//! (202 + `Content-Location`), polled and cancelled at `[/bulk-data]/r4/$export-status/{job_id}`.
//!
//! The kick-off checks the request and the Group, reserves the transaction time and stores the
//! job with its work (counted against the tenant's cap in the same transaction), wakes this
//! instance's worker and answers 202 at once. A worker of any instance on the store claims the
//! job under a lease ([`crate::export_worker`]), plans it at that transaction time (history is
//! kept, so the plan is exactly what a synchronous kick-off at that instant gives), writes its
//! files to the output store if there is one, and finishes the job: complete with the manifest,
//! or failed with an OperationOutcome. An instance that dies mid-job leaves its lease to lapse,
//! and another takes the job over. A poll (on any instance) waits a moment for a running job
//! (small exports answer 200 on the first poll) and otherwise answers 202 with `X-Progress` and
//! `Retry-After`. `DELETE` removes the job at once; its holder notices and stops.
//!
//! A job is visible only to the tenant, client and user scope that started it, until its file
//! URLs expire; anything else is a 404.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bulkhead_export::{check_group, GroupExportRequest, PlanStep};
use bulkhead_fhir::{now_micros, operation_outcome, Issue, IssueType, Micros};
use bulkhead_store::{ExportJob, ExportJobState, JobAdmission, Store, StoreError, TenantId};
use tokio::sync::{watch, Notify};

use crate::auth::{authorize, Caller};
use crate::error::ApiError;
use crate::export_work::ExportWork;
use crate::negotiation::{check_accept, fhir_response, http_date};
use crate::object_output::OutputStore;
use crate::state::AppState;

const MICROS_PER_SECOND: i64 = 1_000_000;

/// How long a poll waits for a running job to finish before answering 202.
const DEFAULT_STATUS_WAIT: Duration = Duration::from_secs(2);

/// How often a poll waiting for a job another instance runs looks at it again.
const REMOTE_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// `Retry-After` of a 202 while planning, in seconds.
const RETRY_AFTER_SECONDS: &str = "1";

/// Called at each step of every plan, before the step starts; an error fails the plan as the
/// store's own would. Tests use it to hold a planner at a step or make it fail there.
pub type PlanHook = dyn Fn(PlanStep) -> Result<(), StoreError> + Send + Sync;

/// This instance's export worker: its id (the lease owner it claims jobs as), the jobs it runs
/// now, by tenant and job id, and what wakes it.
pub struct Planners {
    running: Mutex<HashMap<(TenantId, String), Arc<Planner>>>,
    status_wait: Duration,
    pub(crate) hook: Option<Arc<PlanHook>>,
    /// The lease owner this instance claims jobs as: random, new at every start.
    pub(crate) instance: String,
    pub(crate) wake: Notify,
    pub(crate) started: AtomicBool,
    /// Set when the server shuts down: the worker claims nothing more, and the jobs it runs hand
    /// their leases back at their next step (see [`crate::export_worker::drain`]).
    pub(crate) draining: AtomicBool,
    /// Jobs this instance runs at once.
    pub(crate) slots: usize,
}

impl Default for Planners {
    fn default() -> Self {
        Planners {
            running: Mutex::new(HashMap::new()),
            status_wait: DEFAULT_STATUS_WAIT,
            hook: None,
            instance: uuid::Uuid::new_v4().to_string(),
            wake: Notify::new(),
            started: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            slots: crate::export_worker::WORKER_SLOTS,
        }
    }
}

impl Planners {
    /// How long a poll waits for a planning job before answering 202 (default 2 s).
    pub fn with_status_wait(self, status_wait: Duration) -> Planners {
        Planners { status_wait, ..self }
    }

    pub fn with_hook(self, hook: impl Fn(PlanStep) -> Result<(), StoreError> + Send + Sync + 'static) -> Planners {
        Planners { hook: Some(Arc::new(hook)), ..self }
    }

    /// How many jobs this instance runs at once (default [`crate::export_worker::WORKER_SLOTS`]).
    pub fn with_slots(self, slots: usize) -> Planners {
        Planners { slots: slots.max(1), ..self }
    }

    /// How many jobs this instance runs now.
    pub fn running(&self) -> usize {
        self.lock().len()
    }

    /// The lease owner this instance claims jobs as.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TenantId, String), Arc<Planner>>> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, tenant: TenantId, job_id: &str) -> Option<Arc<Planner>> {
        self.lock().get(&(tenant, job_id.to_owned())).cloned()
    }

    /// Registers a job this instance has claimed.
    pub(crate) fn register(&self, tenant: TenantId, job_id: &str) -> Arc<Planner> {
        let (progress, _) = watch::channel(Progress::Queued);
        let planner = Arc::new(Planner { progress, cancelled: AtomicBool::new(false) });
        self.lock().insert((tenant, job_id.to_owned()), planner.clone());
        planner
    }

    /// Unregisters a job once its row is finished (or its lease lost), then tells waiting polls.
    pub(crate) fn unregister(&self, tenant: TenantId, job_id: &str, planner: &Planner) {
        self.lock().remove(&(tenant, job_id.to_owned()));
        planner.progress.send_replace(Progress::Finished);
    }
}

/// One job this instance runs: its progress (for `X-Progress` and for polls waiting on it) and
/// whether it was cancelled here.
pub(crate) struct Planner {
    pub(crate) progress: watch::Sender<Progress>,
    pub(crate) cancelled: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    Queued,
    At(PlanStep),
    Finished,
}

impl Progress {
    pub(crate) fn text(self) -> String {
        match self {
            Progress::Queued | Progress::Finished => "planning".to_owned(),
            Progress::At(step) => step.to_string(),
        }
    }
}

/// Starts an asynchronous export: sweeps expired jobs, checks the Group (the same 404/410 as a
/// synchronous kick-off), reserves the transaction time and stores the job with its `work`
/// unless the tenant is at its cap of running exports (429), then wakes this instance's worker
/// and answers 202 with the job's absolute status URL.
pub(crate) async fn accept(
    state: &AppState,
    caller: &Caller,
    base: &str,
    request: GroupExportRequest,
    mut work: ExportWork,
) -> Result<Response, ApiError> {
    let now = now_micros();
    let job = ExportJob {
        id: work.record.clone(),
        client_id: caller.client_id.clone(),
        visibility: caller.visibility.clone(),
        created: now,
        expires: work.expires.saturating_mul(MICROS_PER_SECOND),
        state: ExportJobState::Planning,
        manifest: String::new(),
    };
    let job_id = job.id.clone();
    let tenant = caller.tenant;
    // 0: no cap (the store's meaning).
    let cap = match crate::quotas::job_cap(state, caller) {
        None => 0,
        Some(0) => return Err(crate::quotas::exports_throttled(state, caller)),
        Some(cap) => cap,
    };
    let output = state.output.clone();
    let admitted = state
        .blocking(move |store| {
            sweep_expired(store, output.as_deref(), now);
            check_group(store, &request)?;
            work.transaction_time = store.reserve_transaction_time()?;
            let admission = store.enqueue_export_job(tenant, &job, &work.to_json(), cap, now_micros())?;
            let unfinished = store.unfinished_export_jobs(tenant, now_micros())?;
            Ok((admission, work.transaction_time, unfinished))
        })
        .await?;
    let (admission, transaction_time, unfinished) = admitted;
    crate::quotas::note_exports_running(state, tenant, unfinished);
    if let JobAdmission::AtCap { unfinished } = admission {
        tracing::info!(unfinished, "export job refused: the tenant is at its cap");
        return Err(crate::quotas::exports_throttled(state, caller));
    }
    crate::audit::note_export_accepted(&job_id, transaction_time);
    crate::export_worker::wake(state);
    tracing::info!(job = %job_id, "export job accepted");
    let status_url = format!("{base}/bulk-data/r4/$export-status/{job_id}");
    let outcome = operation_outcome(&[Issue::information(format!(
        "export accepted; poll {status_url} for the manifest (DELETE it when done)"
    ))]);
    let mut response = fhir_response(StatusCode::ACCEPTED, outcome.to_string());
    let location = HeaderValue::from_str(&status_url).map_err(|_| ApiError::internal())?;
    response.headers_mut().insert(header::CONTENT_LOCATION, location);
    Ok(response)
}

/// A failed plan as the job keeps it: the status and OperationOutcome its poll answers with.
/// Server-side failures get a diagnostic saying what to do.
pub(crate) fn failure(error: ApiError) -> (ExportJobState, String) {
    let error = if error.status == StatusCode::INTERNAL_SERVER_ERROR {
        ApiError::new(
            error.status,
            IssueType::Exception,
            "planning this export failed on the server; kick the export off again",
        )
    } else {
        error
    };
    (ExportJobState::Failed { status: error.status.as_u16() }, operation_outcome(&error.issues).to_string())
}

/// Expired jobs whose output objects one sweep removes (the rest wait for the next kick-off).
const OUTPUT_SWEEP_BATCH: usize = 16;

/// Opportunistic housekeeping at every kick-off: deletes expired jobs and export records of
/// every tenant, and with an output store each expired job's objects first (a job whose objects
/// could not be removed stays, invisible, for the next sweep; one kick-off at a time sweeps
/// objects). A failed sweep is logged and never fails the kick-off. Runs on a blocking thread.
pub(crate) fn sweep_expired(store: &dyn Store, output: Option<&OutputStore>, now: Micros) {
    match output {
        None => match store.delete_expired_export_jobs(now) {
            Ok(0) => {}
            Ok(swept) => tracing::info!(swept, "expired export jobs deleted"),
            Err(error) => tracing::warn!(error = %error, "sweeping expired export jobs failed"),
        },
        Some(output) => sweep_expired_output(store, output, now),
    }
    match store.delete_expired_export_records(now) {
        Ok(0) => {}
        Ok(swept) => tracing::info!(swept, "expired export records deleted"),
        Err(error) => tracing::warn!(error = %error, "sweeping expired export records failed"),
    }
}

fn sweep_expired_output(store: &dyn Store, output: &OutputStore, now: Micros) {
    // Another kick-off is sweeping: the next one will find what is left.
    let Some(_turn) = output.sweep_turn() else { return };
    let expired = match store.expired_export_jobs(now, OUTPUT_SWEEP_BATCH) {
        Ok(expired) => expired,
        Err(error) => return tracing::warn!(error = %error, "listing expired export jobs failed"),
    };
    let runtime = tokio::runtime::Handle::current();
    for (tenant, job_id) in expired {
        match runtime.block_on(output.delete_job(tenant, &job_id)) {
            Ok(objects) => match store.delete_export_job(tenant, &job_id) {
                Ok(_) => tracing::info!(job = %job_id, objects, "expired export job and its output deleted"),
                Err(error) => tracing::warn!(job = %job_id, error = %error, "deleting an expired export job failed"),
            },
            Err(error) => tracing::warn!(job = %job_id, error = %error, "deleting an expired job's output failed"),
        }
    }
}

/// `GET [/bulk-data]/r4/$export-status/{job_id}`: 200 with the manifest (`application/json`)
/// and an `Expires` HTTP-date; 202 with `X-Progress` and `Retry-After` while planning; the
/// failure's status and OperationOutcome if planning failed; 404 for a job that is unknown,
/// expired, cancelled or not the caller's.
pub async fn status(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::audit::note("export.status", job_id.clone());
    let caller = authorize(&state, &Method::GET, uri.path(), &headers).await?;
    check_accept(&headers)?;
    let mut job = lookup(&state, &caller, &job_id).await?;
    let mut progress = Progress::Queued.text();
    if job.state == ExportJobState::Planning {
        progress = wait_for_job(&state, &caller, &job.id).await?;
        job = lookup(&state, &caller, &job_id).await?;
    }
    match job.state {
        ExportJobState::Planning => {
            let mut response = fhir_response(
                StatusCode::ACCEPTED,
                operation_outcome(&[Issue::information(progress.clone())]).to_string(),
            );
            let response_headers = response.headers_mut();
            if let Ok(text) = HeaderValue::from_str(&progress) {
                response_headers.insert("x-progress", text);
            }
            response_headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
            Ok(response)
        }
        ExportJobState::Failed { status } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Ok(fhir_response(status, job.manifest))
        }
        ExportJobState::Complete => {
            let mut response = (StatusCode::OK, job.manifest).into_response();
            let response_headers = response.headers_mut();
            response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(expires) =
                http_date(job.expires / MICROS_PER_SECOND).and_then(|date| HeaderValue::from_str(&date).ok())
            {
                response_headers.insert(header::EXPIRES, expires);
            }
            Ok(response)
        }
    }
}

/// Waits up to the status wait for a planning job to finish and returns its progress text: on
/// the job's own progress when this instance runs it, else by looking at the store (another
/// instance runs it, or nobody yet: then this instance's worker is woken, so a job whose holder
/// died is taken over as soon as its lease lapses).
async fn wait_for_job(state: &AppState, caller: &Caller, job_id: &str) -> Result<String, ApiError> {
    if let Some(planner) = state.planners.get(caller.tenant, job_id) {
        let mut updates = planner.progress.subscribe();
        let finished = updates.wait_for(|progress| *progress == Progress::Finished);
        let _ = tokio::time::timeout(state.planners.status_wait, finished).await;
        return Ok(planner.progress.borrow().text());
    }
    crate::export_worker::wake(state);
    let deadline = tokio::time::Instant::now() + state.planners.status_wait;
    loop {
        let (tenant, id) = (caller.tenant, job_id.to_owned());
        let (job, activity) = state
            .blocking(move |store| Ok((store.export_job(tenant, &id)?, store.export_job_activity(tenant, &id)?)))
            .await?;
        let still_planning = job.is_some_and(|job| job.state == ExportJobState::Planning);
        let now = tokio::time::Instant::now();
        if !still_planning || now >= deadline {
            let text = activity.map(|activity| activity.progress).filter(|text| !text.is_empty());
            return Ok(text.unwrap_or_else(|| Progress::Queued.text()));
        }
        if let Some(planner) = state.planners.get(caller.tenant, job_id) {
            // This instance's worker has claimed it meanwhile.
            let mut updates = planner.progress.subscribe();
            let finished = updates.wait_for(|progress| *progress == Progress::Finished);
            let _ = tokio::time::timeout(deadline - now, finished).await;
            return Ok(planner.progress.borrow().text());
        }
        tokio::time::sleep(REMOTE_POLL_INTERVAL.min(deadline - now)).await;
    }
}

/// The caller's live job `job_id`, or the 404.
async fn lookup(state: &AppState, caller: &Caller, job_id: &str) -> Result<ExportJob, ApiError> {
    let (lookup, job_id) = (caller.clone(), job_id.to_owned());
    state.blocking(move |store| Ok(owned_job(store, &lookup, &job_id)?)).await?.ok_or_else(no_such_job)
}

/// `DELETE [/bulk-data]/r4/$export-status/{job_id}`: cancels a planning job (its planner stops
/// and its result is discarded) or forgets a finished one: 202, and every later poll is a 404.
/// Someone else's job is a 404.
pub async fn cancel(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::audit::note("export.cancel", job_id.clone());
    let caller = authorize(&state, &Method::DELETE, uri.path(), &headers).await?;
    check_accept(&headers)?;
    if let Some(output) = &state.output {
        // The objects go first: a failure leaves the job for the client to DELETE again. A job
        // still being written is cancelled below, and its planner removes what it wrote.
        let job = lookup(&state, &caller, &job_id).await?;
        output.delete_job(caller.tenant, &job.id).await.map_err(|error| {
            tracing::error!(job = %job.id, error = %error, "deleting a job's output failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                IssueType::Transient,
                "the export's output could not be deleted now; retry the DELETE",
            )
        })?;
    }
    let lookup = caller.clone();
    let deleted = state
        .blocking(move |store| {
            let owned = owned_job(store, &lookup, &job_id)?;
            Ok(match owned {
                Some(job) => store.delete_export_job(lookup.tenant, &job.id)?.then_some(job.id),
                None => None,
            })
        })
        .await?;
    let Some(job_id) = deleted else { return Err(no_such_job()) };
    if let Some(planner) = state.planners.get(caller.tenant, &job_id) {
        planner.cancelled.store(true, Ordering::Release);
    }
    let outcome = operation_outcome(&[Issue::information("export job deleted")]);
    Ok(fhir_response(StatusCode::ACCEPTED, outcome.to_string()))
}

/// The caller's live job `job_id`: same tenant (by the lookup key), same client, same user scope,
/// not expired.
fn owned_job(store: &dyn Store, caller: &Caller, job_id: &str) -> Result<Option<ExportJob>, StoreError> {
    let job = store.export_job(caller.tenant, job_id)?;
    let now = now_micros();
    Ok(job.filter(|job| job.client_id == caller.client_id && job.visibility == caller.visibility && job.expires > now))
}

fn no_such_job() -> ApiError {
    ApiError::not_found("no such export job (unknown, expired or deleted)")
}
