//! Materialising an asynchronous export: with an output store configured, every file of the
//! plan is written to it as an NDJSON object before the job completes, so downloads read object
//! storage instead of the database.
//!
//! [`materialise`] is a pure function of the stored plan: object keys follow from the job and
//! the file index, the bytes from the plan's claims at its transaction time, and rewriting an
//! object gives the same bytes. That is what a later job lease wraps: an instance that claims a
//! job (or takes over one whose lease expired) runs it again, file by file, and each write can
//! check the claim's fencing token before it starts.

use bulkhead_export::files::{open_file_view, write_file};
use bulkhead_export::record::PlannedExport;
use bulkhead_export::token::FileClaims;
use bulkhead_export::{ExportError, PlanProgress, PlanStep};
use bulkhead_store::{Store, TenantId};

use crate::error::ApiError;
use crate::object_output::{OutputError, OutputStore, WrittenObject};

/// Writes every planned file of the job `job_id` to `output`, telling `progress` before each;
/// `claims_of(index)` gives a file's claims. On any failure (or cancellation, which `progress`
/// reports) the objects written so far are deleted and the error returned: a job's output is
/// either complete or absent.
pub(crate) fn materialise(
    store: &dyn Store,
    output: &OutputStore,
    tenant: TenantId,
    job_id: &str,
    export: &PlannedExport,
    claims_of: &dyn Fn(usize) -> Option<FileClaims>,
    progress: &PlanProgress<'_>,
) -> Result<Vec<WrittenObject>, ApiError> {
    let runtime = tokio::runtime::Handle::current();
    let started = std::time::Instant::now();
    let result = write_all(store, output, &runtime, tenant, job_id, export, claims_of, progress);
    match &result {
        Ok(written) => tracing::info!(
            job = %job_id,
            files = written.len(),
            bytes = written.iter().map(|object| object.bytes).sum::<u64>(),
            millis = started.elapsed().as_millis() as u64,
            "export output written"
        ),
        Err(error) => {
            tracing::warn!(job = %job_id, error = %error, "writing export output failed; removing what was written");
            if let Err(cleanup) = runtime.block_on(output.delete_job(tenant, job_id)) {
                tracing::error!(job = %job_id, error = %cleanup, "removing partial export output failed");
            }
        }
    }
    result.map_err(|error| match error {
        Failure::Export(export_error) => export_error.into(),
        Failure::Output(output_error) => {
            tracing::error!(job = %job_id, error = %output_error, "export output store failed");
            ApiError::internal()
        }
    })
}

/// Why materialising stopped.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Output(#[from] OutputError),
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    store: &dyn Store,
    output: &OutputStore,
    runtime: &tokio::runtime::Handle,
    tenant: TenantId,
    job_id: &str,
    export: &PlannedExport,
    claims_of: &dyn Fn(usize) -> Option<FileClaims>,
    progress: &PlanProgress<'_>,
) -> Result<Vec<WrittenObject>, Failure> {
    let files = export.files.len();
    let mut written = Vec::with_capacity(files);
    // Every file of an export shares one view (same Group version, members and times).
    let mut view = None;
    for index in 0..files {
        progress(PlanStep::Writing { done: index, files })?;
        let claims = claims_of(index).ok_or_else(|| ExportError::NotFound(format!("file {index} of the plan")))?;
        if view.is_none() {
            view = Some(open_file_view(store, &claims)?);
        }
        let Some(view) = view.as_ref() else { unreachable!("set above") };
        let path = output.object_path(tenant, job_id, u32::try_from(index).unwrap_or(u32::MAX));
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
        written.push(object);
    }
    progress(PlanStep::Writing { done: files, files })?;
    Ok(written)
}
