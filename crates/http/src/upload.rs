//! `POST /r4/$upload-ndjson`: a streamed NDJSON body loaded through the import path, answered
//! with an OperationOutcome that lists every refused line. (Not `$import`: in the Bulk Data
//! drafts that name means "pull from these URLs", a different operation.)

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use bulkhead_fhir::{operation_outcome, Issue, IssueType};
use bulkhead_store::StoreError;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::ndjson_import::{ImportSummary, Importer, Location};
use crate::negotiation::fhir_response;
use crate::state::AppState;

const SOURCE: &str = "request body";

/// Streams the body line by line into an [`Importer`] running on a blocking thread.
pub async fn upload_ndjson(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if !matches!(media.as_str(), "application/fhir+ndjson" | "application/ndjson" | "application/x-ndjson") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IssueType::NotSupported,
            format!("send application/fhir+ndjson, not '{content_type}'"),
        )
        .at("Content-Type"));
    }
    let body = crate::quotas::metered_upload(&state, &caller, &headers, body)?;
    let (lines_tx, mut lines_rx) = mpsc::channel::<(u64, Vec<u8>)>(256);
    let store = state.store.clone();
    let (tenant, owner, max_members, validation) = (
        caller.tenant,
        caller.owner().map(str::to_owned),
        state.config.max_group_members,
        state.config.validation_for(&caller.tenant_name),
    );
    // Returns what was stored, and the store's error when it stopped the upload part-way.
    let importer = tokio::task::spawn_blocking(move || -> (ImportSummary, Option<StoreError>) {
        // Small batches: this runs inside the server, whose memory must stay small. A batch in
        // flight holds its parsed resources and their prepared rows (~10× its text), and a few
        // are alive at once (see `BATCH_BYTES`); 1 MiB of text per batch kept the server
        // 35–45 MB smaller than 2 MiB at the same rate (BENCHMARKS.md, session 8).
        let mut importer =
            Importer::new(store, tenant, owner, max_members).with_batch_bytes(1024 * 1024).with_validation(validation);
        while let Some((line, text)) = lines_rx.blocking_recv() {
            if let Err(error) = importer.add_line(Location { source: SOURCE.into(), line }, &text) {
                return (importer.summary().clone(), Some(error));
            }
        }
        match importer.finish() {
            Ok(summary) => (summary, None),
            Err(error) => (importer.summary().clone(), Some(error)),
        }
    });
    let max_line = state.config.max_body_bytes;
    let mut stream = body.into_data_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut line_number = 0u64;
    let mut read_error = None;
    'read: while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => {
                read_error = Some(ApiError::bad_request(
                    IssueType::Structure,
                    format!("reading the request body failed: {error}"),
                ));
                break;
            }
        };
        // Only the new bytes are searched for line ends: a long line arriving in many small
        // chunks must not be rescanned from its start each time. The chunk's whole lines are
        // cut off the buffer at once afterwards (draining line by line moved the rest of the
        // buffer once per line).
        let mut start = 0;
        let mut searched = buffer.len();
        buffer.extend_from_slice(&chunk);
        while let Some(newline) = buffer[searched..].iter().position(|b| *b == b'\n').map(|at| at + searched) {
            if newline - start > max_line {
                read_error = Some(line_too_long(line_number + 1, max_line));
                break 'read;
            }
            let line = buffer[start..=newline].to_vec();
            start = newline + 1;
            searched = start;
            line_number += 1;
            if lines_tx.send((line_number, line)).await.is_err() {
                buffer.clear();
                break 'read;
            }
        }
        buffer.drain(..start);
        if buffer.len() > max_line {
            read_error = Some(line_too_long(line_number + 1, max_line));
            break;
        }
    }
    if read_error.is_none() && !buffer.is_empty() {
        line_number += 1;
        let _ = lines_tx.send((line_number, std::mem::take(&mut buffer))).await;
    }
    drop(lines_tx);
    // Lines already read are written even when the body broke off; the outcome says so.
    let (summary, store_error) = importer.await.map_err(|_| ApiError::internal())?;
    crate::audit::note_upload(&summary.stored_by_type, summary.failed);
    crate::metrics::imported(&state, &caller, summary.created + summary.updated);
    // A store failure (a full disk: 507) stops the upload; the outcome says what was committed
    // before it, so the client knows what to send again.
    let store_error = store_error.map(|error| {
        let full = matches!(error, StoreError::StorageFull(_));
        let mut error = ApiError::from(error);
        if let Some(issue) = error.issues.first_mut().filter(|_| full) {
            issue.diagnostics = "the server's storage is full: the upload stopped there; the resources counted \
                                 below are stored, the rest is not (send it again later)"
                .into();
        }
        error
    });
    if let Some(mut error) = store_error.or(read_error) {
        error.issues.extend(summary_issues(&summary));
        return Err(error);
    }
    // An upload that stored nothing failed as a whole: the client must not read it as a success.
    let stored = summary.created + summary.updated + summary.unchanged;
    if stored == 0 {
        let refusal = match summary.failed {
            0 => Issue::error(IssueType::Required, "the body holds no resources (send one JSON resource per line)"),
            failed => Issue::error(IssueType::Invalid, format!("nothing was stored: all {failed} lines were refused")),
        };
        let issues = std::iter::once(refusal).chain(summary_issues(&summary)).collect();
        return Err(ApiError { status: StatusCode::BAD_REQUEST, issues });
    }
    Ok(fhir_response(StatusCode::OK, operation_outcome(&summary_issues(&summary)).to_string()))
}

fn line_too_long(line: u64, max_line: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        IssueType::TooCostly,
        format!("line {line} is longer than {max_line} bytes"),
    )
    .at(format!("line {line}"))
}

/// What an upload stored (all of it committed, also when the upload stopped part-way): one
/// information issue with the counts, then one issue per refused line.
fn summary_issues(summary: &ImportSummary) -> Vec<Issue> {
    let stored = summary.created + summary.updated + summary.unchanged;
    let mut issues = vec![Issue::information(format!(
        "{stored} resources stored: {} created, {} updated, {} unchanged, {} failed",
        summary.created, summary.updated, summary.unchanged, summary.failed
    ))];
    for error in &summary.errors {
        issues
            .push(Issue::error(IssueType::Invalid, error.message.clone()).at(format!("line {}", error.location.line)));
    }
    if summary.failed > summary.errors.len() as u64 {
        let unlisted = summary.failed - summary.errors.len() as u64;
        issues.push(Issue::warning(IssueType::TooCostly, format!("{unlisted} more failed lines are not listed")));
    }
    issues
}
