//! The asynchronous Bulk Data pattern: a kick-off with `Prefer: respond-async` becomes a job
//! (202 + `Content-Location`), polled and cancelled at `[/bulk-data]/r4/$export-status/{job_id}`.
//!
//! The export is planned at kick-off (see [`crate::bulk`]), so a job is complete as soon as it
//! exists: the first poll answers 200 with the manifest. A job is visible only to the tenant,
//! client and user scope that started it, until its file URLs expire; anything else is a 404.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::{now_micros, operation_outcome, Issue, Micros};
use bulkhead_store::{ExportJob, Store, StoreError};

use crate::auth::{authenticate, Caller};
use crate::bulk::Manifest;
use crate::error::ApiError;
use crate::negotiation::{check_accept, fhir_response, http_date};
use crate::state::AppState;

const MICROS_PER_SECOND: i64 = 1_000_000;

/// Stores the kick-off's manifest as a new job of `caller` and answers 202 with the job's
/// absolute status URL.
pub(crate) async fn accept(
    state: &AppState,
    caller: &Caller,
    base: &str,
    manifest: Manifest,
) -> Result<Response, ApiError> {
    let created = now_micros();
    let job = ExportJob {
        id: uuid::Uuid::new_v4().to_string(),
        client_id: caller.client_id.clone(),
        visibility: caller.visibility.clone(),
        created,
        expires: manifest.expires.saturating_mul(MICROS_PER_SECOND),
        manifest: manifest.body.to_string(),
    };
    let job_id = job.id.clone();
    let tenant = caller.tenant;
    state.blocking(move |store| Ok(store.create_export_job(tenant, &job)?)).await?;
    tracing::info!(job = %job_id, "export job created");
    let status_url = format!("{base}/bulk-data/r4/$export-status/{job_id}");
    let outcome = operation_outcome(&[Issue::information(format!(
        "export accepted; poll {status_url} for the manifest (DELETE it when done)"
    ))]);
    let mut response = fhir_response(StatusCode::ACCEPTED, outcome.to_string());
    let location = HeaderValue::from_str(&status_url).map_err(|_| ApiError::internal())?;
    response.headers_mut().insert(header::CONTENT_LOCATION, location);
    Ok(response)
}

/// Opportunistic housekeeping at every kick-off: deletes expired jobs and export records of
/// every tenant. A failed sweep is logged and never fails the kick-off.
pub(crate) fn sweep_expired(store: &dyn Store, now: Micros) {
    match store.delete_expired_export_jobs(now) {
        Ok(0) => {}
        Ok(swept) => tracing::info!(swept, "expired export jobs deleted"),
        Err(error) => tracing::warn!(error = %error, "sweeping expired export jobs failed"),
    }
    match store.delete_expired_export_records(now) {
        Ok(0) => {}
        Ok(swept) => tracing::info!(swept, "expired export records deleted"),
        Err(error) => tracing::warn!(error = %error, "sweeping expired export records failed"),
    }
}

/// `GET [/bulk-data]/r4/$export-status/{job_id}`: 200 with the manifest (`application/json`)
/// and an `Expires` HTTP-date; 404 for a job that is unknown, expired, cancelled or not the
/// caller's.
pub async fn status(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    check_accept(&headers)?;
    let lookup = caller.clone();
    let job = state.blocking(move |store| Ok(owned_job(store, &lookup, &job_id)?)).await?.ok_or_else(no_such_job)?;
    let mut response = (StatusCode::OK, job.manifest).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(expires) = http_date(job.expires / MICROS_PER_SECOND).and_then(|date| HeaderValue::from_str(&date).ok())
    {
        response_headers.insert(header::EXPIRES, expires);
    }
    Ok(response)
}

/// `DELETE [/bulk-data]/r4/$export-status/{job_id}`: cancels (or, since jobs complete at once,
/// forgets) the job: 202, and every later poll is a 404. Someone else's job is a 404.
pub async fn cancel(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    check_accept(&headers)?;
    let lookup = caller.clone();
    let deleted = state
        .blocking(move |store| {
            let owned = owned_job(store, &lookup, &job_id)?;
            Ok(match owned {
                Some(job) => store.delete_export_job(lookup.tenant, &job.id)?,
                None => false,
            })
        })
        .await?;
    if !deleted {
        return Err(no_such_job());
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
