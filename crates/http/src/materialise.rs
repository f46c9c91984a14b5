//! Materialising an asynchronous export: with an output store configured, every file of the
//! plan is written to it as an NDJSON object before the job completes, so downloads read object
//! storage instead of the database.
//!
//! [`materialise`] is a pure function of the stored plan: object keys follow from the job and
//! the file index, the bytes from the plan's claims at its transaction time, and rewriting an
//! object gives the same bytes. The job's lease wraps it: each written file is recorded under
//! the lease's fencing token, and an instance that takes the job over (its lease lapsed) skips
//! the recorded files and writes the rest.

use std::collections::HashMap;

use bulkhead_export::files::{open_file_view, write_file};
use bulkhead_export::record::PlannedExport;
use bulkhead_export::token::FileClaims;
use bulkhead_export::{ExportError, PlanProgress, PlanStep};
use bulkhead_store::{Store, TenantId};

use crate::error::ApiError;
use crate::export_work::WorkStop;
use crate::object_output::{OutputError, OutputStore, WrittenObject};

/// How one holder of a job's lease goes through its files.
pub(crate) struct Steps<'a> {
    /// A file's claims, by index.
    pub claims_of: &'a dyn Fn(usize) -> Option<FileClaims>,
    /// Files written and recorded by earlier holders: kept, not written again.
    pub done: &'a HashMap<u32, WrittenObject>,
    /// Records a file once written (under the lease); an error stops the work.
    pub record: &'a dyn Fn(usize, &WrittenObject) -> Result<(), WorkStop>,
    /// Told before each file; an error (a lost lease, a cancellation) stops the work.
    pub progress: &'a PlanProgress<'a>,
}

/// Writes every planned file of the job `job_id` that `steps.done` lacks to `output`, recording
/// each, and returns every file's object in plan order. A failed export leaves its objects to the
/// caller (who deletes them when it fails the job, but not when its lease was taken over: the
/// new holder writes the same keys).
pub(crate) fn materialise(
    store: &dyn Store,
    output: &OutputStore,
    tenant: TenantId,
    job_id: &str,
    export: &PlannedExport,
    steps: &Steps<'_>,
) -> Result<Vec<WrittenObject>, WorkStop> {
    let runtime = tokio::runtime::Handle::current();
    let started = std::time::Instant::now();
    let result = write_all(store, output, &runtime, tenant, job_id, export, steps);
    match &result {
        Ok(written) => tracing::info!(
            job = %job_id,
            files = written.len(),
            bytes = written.iter().map(|object| object.bytes).sum::<u64>(),
            millis = started.elapsed().as_millis() as u64,
            "export output written"
        ),
        Err(error) => tracing::warn!(job = %job_id, error = %error, "writing export output stopped"),
    }
    result.map_err(|error| match error {
        Failure::Export(export_error) => export_error.into(),
        Failure::Output(output_error) => {
            tracing::error!(job = %job_id, error = %output_error, "export output store failed");
            WorkStop::Failed(ApiError::internal())
        }
        Failure::Stopped(stop) => stop,
    })
}

/// Why materialising stopped.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("{0:?}")]
    Stopped(WorkStop),
}

fn write_all(
    store: &dyn Store,
    output: &OutputStore,
    runtime: &tokio::runtime::Handle,
    tenant: TenantId,
    job_id: &str,
    export: &PlannedExport,
    steps: &Steps<'_>,
) -> Result<Vec<WrittenObject>, Failure> {
    let files = export.files.len();
    let mut written = Vec::with_capacity(files);
    // Every file of an export shares one view (same Group version, members and times).
    let mut view = None;
    for index in 0..files {
        (steps.progress)(PlanStep::Writing { done: index, files })?;
        let file = u32::try_from(index).unwrap_or(u32::MAX);
        if let Some(object) = steps.done.get(&file) {
            written.push(object.clone());
            continue;
        }
        let claims =
            (steps.claims_of)(index).ok_or_else(|| ExportError::NotFound(format!("file {index} of the plan")))?;
        if view.is_none() {
            view = Some(open_file_view(store, &claims)?);
        }
        let Some(view) = view.as_ref() else { unreachable!("set above") };
        let path = output.object_path(tenant, job_id, file);
        // The producer's own error is kept whole; the object store only sees that it stopped.
        let mut source_error = None;
        let object = output.write_object(runtime, &path, |out| {
            write_file(store, &claims, view, out).map_err(|error| {
                let message = error.to_string();
                source_error = Some(error);
                message
            })
        });
        let object = match (object, source_error) {
            (Err(OutputError::Source(_)), Some(error)) => return Err(error.into()),
            (object, _) => object?,
        };
        if object.lines != claims.total {
            tracing::error!(job = %job_id, file = index, lines = object.lines, planned = claims.total, "export object line count differs from its manifest count");
        }
        (steps.record)(index, &object).map_err(Failure::Stopped)?;
        tracing::debug!(job = %job_id, file = index, bytes = object.bytes, "export object written and recorded");
        written.push(object);
    }
    (steps.progress)(PlanStep::Writing { done: files, files })?;
    Ok(written)
}
