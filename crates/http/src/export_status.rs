//! The asynchronous Bulk Data pattern: a kick-off with `Prefer: respond-async` becomes a job
//! (202 + `Content-Location`), polled and cancelled at `[/bulk-data]/r4/$export-status/{job_id}`.
//!
//! The kick-off checks the request and the Group, reserves the transaction time and stores the
//! job as planning, then answers 202 at once; a planner on a blocking thread plans the export at
//! that transaction time (history is kept, so the plan is exactly what a synchronous kick-off at
//! that instant gives) and finishes the job: complete with the manifest, or failed with an
//! OperationOutcome. While it plans, a poll waits a moment for it (small exports answer 200 on
//! the first poll) and otherwise answers 202 with `X-Progress` and `Retry-After`. `DELETE`
//! removes the job at once and stops its planner, whose result is then discarded. A job still
//! planning whose planner is gone (the server restarted) is marked failed when polled.
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
use bulkhead_export::{check_group, GroupExportRequest, PlanProgress, PlanStep};
use bulkhead_fhir::{now_micros, operation_outcome, Issue, IssueType, Micros};
use bulkhead_store::{ExportJob, ExportJobState, Store, StoreError, TenantId};
use tokio::sync::watch;

use crate::auth::{authorize, Caller};
use crate::bulk::Manifest;
use crate::error::ApiError;
use crate::negotiation::{check_accept, fhir_response, http_date};
use crate::object_output::OutputStore;
use crate::state::AppState;

const MICROS_PER_SECOND: i64 = 1_000_000;

/// How long a poll waits for a planning job to finish before answering 202.
const DEFAULT_STATUS_WAIT: Duration = Duration::from_secs(2);

/// `Retry-After` of a 202 while planning, in seconds.
const RETRY_AFTER_SECONDS: &str = "1";

/// Called at each step of every plan, before the step starts; an error fails the plan as the
/// store's own would. Tests use it to hold a planner at a step or make it fail there.
pub type PlanHook = dyn Fn(PlanStep) -> Result<(), StoreError> + Send + Sync;

/// The planners running in this process, by tenant and job id.
pub struct Planners {
    running: Mutex<HashMap<(TenantId, String), Arc<Planner>>>,
    status_wait: Duration,
    hook: Option<Arc<PlanHook>>,
}

impl Default for Planners {
    fn default() -> Self {
        Planners { running: Mutex::new(HashMap::new()), status_wait: DEFAULT_STATUS_WAIT, hook: None }
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

    /// How many planners are running now.
    pub fn running(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TenantId, String), Arc<Planner>>> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, tenant: TenantId, job_id: &str) -> Option<Arc<Planner>> {
        self.lock().get(&(tenant, job_id.to_owned())).cloned()
    }
}

/// One running planner: its progress (for `X-Progress` and for polls waiting on it) and whether
/// its job was cancelled.
struct Planner {
    progress: watch::Sender<Progress>,
    cancelled: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Queued,
    At(PlanStep),
    Finished,
}

impl Progress {
    fn text(self) -> String {
        match self {
            Progress::Queued | Progress::Finished => "planning".to_owned(),
            Progress::At(step) => step.to_string(),
        }
    }
}

/// Plans one export at its transaction time and builds its manifest (storing its export record).
pub(crate) type BuildManifest =
    Box<dyn FnOnce(&dyn Store, Micros, &PlanProgress<'_>) -> Result<Manifest, ApiError> + Send + 'static>;

/// Starts an asynchronous export: sweeps expired jobs, checks the Group (the same 404/410 as a
/// synchronous kick-off), reserves the transaction time and stores the job as planning, then
/// answers 202 with the job's absolute status URL while `build` runs in the background.
pub(crate) async fn accept(
    state: &AppState,
    caller: &Caller,
    base: &str,
    request: GroupExportRequest,
    job_id: String,
    expires: i64,
    build: BuildManifest,
) -> Result<Response, ApiError> {
    let job = ExportJob {
        id: job_id,
        client_id: caller.client_id.clone(),
        visibility: caller.visibility.clone(),
        created: now_micros(),
        expires: expires.saturating_mul(MICROS_PER_SECOND),
        state: ExportJobState::Planning,
        manifest: String::new(),
    };
    let job_id = job.id.clone();
    let tenant = caller.tenant;
    let output = state.output.clone();
    let transaction_time = state
        .blocking(move |store| {
            sweep_expired(store, output.as_deref(), now_micros());
            check_group(store, &request)?;
            let transaction_time = store.reserve_transaction_time()?;
            store.create_export_job(tenant, &job)?;
            Ok(transaction_time)
        })
        .await?;
    crate::audit::note_export_accepted(&job_id, transaction_time);
    start_planner(state, tenant, job_id.clone(), transaction_time, build);
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

/// Registers the job's planner and runs it on a blocking thread. Whatever happens to it (done,
/// failed, cancelled, panicked), the job row is finished first and the planner unregistered
/// after, so a poll never finds a planning job without either.
fn start_planner(state: &AppState, tenant: TenantId, job_id: String, transaction_time: Micros, build: BuildManifest) {
    let (progress, _) = watch::channel(Progress::Queued);
    let planner = Arc::new(Planner { progress, cancelled: AtomicBool::new(false) });
    state.planners.lock().insert((tenant, job_id.clone()), planner.clone());
    let state = state.clone();
    tokio::spawn(async move {
        let store = state.store.clone();
        let (work_planner, work_job, hook) = (planner.clone(), job_id.clone(), state.planners.hook.clone());
        let output = state.output.clone();
        let planned = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let progress = |step: PlanStep| {
                work_planner.progress.send_replace(Progress::At(step));
                if let Some(hook) = &hook {
                    hook(step)?;
                }
                if work_planner.cancelled.load(Ordering::Acquire) {
                    return Err(bulkhead_export::ExportError::Cancelled);
                }
                Ok(())
            };
            let result = build(store.as_ref(), transaction_time, &progress);
            tracing::info!(job = %work_job, ok = result.is_ok(), millis = started.elapsed().as_millis() as u64, "export job planned");
            let (state, body) = match result {
                Ok(manifest) => (ExportJobState::Complete, manifest.body.to_string()),
                Err(error) => failure(error),
            };
            if !finish(store.as_ref(), tenant, &work_job, state, &body) {
                // Cancelled while its output was being written: nobody will ask for it.
                if let Some(output) = &output {
                    let runtime = tokio::runtime::Handle::current();
                    if let Err(error) = runtime.block_on(output.delete_job(tenant, &work_job)) {
                        tracing::error!(job = %work_job, error = %error, "removing a cancelled job's output failed");
                    }
                }
            }
        })
        .await;
        if let Err(join_error) = planned {
            tracing::error!(job = %job_id, error = %join_error, "export planner failed");
            let (state_after, body) = failure(ApiError::internal());
            let finish_job = job_id.clone();
            let _ = state
                .blocking(move |store| {
                    finish(store, tenant, &finish_job, state_after, &body);
                    Ok(())
                })
                .await;
        }
        state.planners.lock().remove(&(tenant, job_id));
        planner.progress.send_replace(Progress::Finished);
    });
}

/// A failed plan as the job keeps it: the status and OperationOutcome its poll answers with.
/// Server-side failures get a diagnostic saying what to do.
fn failure(error: ApiError) -> (ExportJobState, String) {
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

/// Finishes a planning job; a job deleted meanwhile (cancelled) keeps no result. False when the
/// result was discarded.
fn finish(store: &dyn Store, tenant: TenantId, job_id: &str, state: ExportJobState, body: &str) -> bool {
    match store.finish_export_job(tenant, job_id, state, body) {
        Ok(true) => true,
        Ok(false) => {
            tracing::info!(job = %job_id, "export job cancelled or finished meanwhile: plan discarded");
            false
        }
        Err(error) => {
            tracing::error!(job = %job_id, error = %error, "finishing an export job failed");
            false
        }
    }
}

/// Expired jobs whose output objects one sweep removes (the rest wait for the next kick-off).
const OUTPUT_SWEEP_BATCH: usize = 16;

/// Opportunistic housekeeping at every kick-off: deletes expired jobs and export records of
/// every tenant, and with an output store each expired job's objects first (a job whose objects
/// could not be removed stays, invisible, for the next sweep). A failed sweep is logged and
/// never fails the kick-off. Runs on a blocking thread.
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
    let mut progress = Progress::Queued;
    if job.state == ExportJobState::Planning {
        match state.planners.get(caller.tenant, &job.id) {
            Some(planner) => {
                let mut updates = planner.progress.subscribe();
                let finished = updates.wait_for(|progress| *progress == Progress::Finished);
                let _ = tokio::time::timeout(state.planners.status_wait, finished).await;
                progress = *planner.progress.borrow();
            }
            None => {
                // No planner in this process: the server restarted while the job was planning.
                let failed = ExportJobState::Failed { status: StatusCode::INTERNAL_SERVER_ERROR.as_u16() };
                let body = operation_outcome(&[Issue::error(
                    IssueType::Exception,
                    "the server restarted while this export was being planned; kick the export off again",
                )])
                .to_string();
                let (tenant, id) = (caller.tenant, job.id.clone());
                state
                    .blocking(move |store| {
                        finish(store, tenant, &id, failed, &body);
                        Ok(())
                    })
                    .await?;
            }
        }
        job = lookup(&state, &caller, &job_id).await?;
    }
    match job.state {
        ExportJobState::Planning => {
            let mut response = fhir_response(
                StatusCode::ACCEPTED,
                operation_outcome(&[Issue::information(progress.text())]).to_string(),
            );
            let response_headers = response.headers_mut();
            if let Ok(text) = HeaderValue::from_str(&progress.text()) {
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
