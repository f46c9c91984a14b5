//! `POST /r4/$upload-ndjson`: a streamed NDJSON body loaded through the import path, answered
//! with an OperationOutcome that lists every refused line. (Not `$import`: in the Bulk Data
//! drafts that name means "pull from these URLs", a different operation.)

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use bulkhead_fhir::{operation_outcome, Issue, IssueType};
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
    let (lines_tx, mut lines_rx) = mpsc::channel::<(u64, String)>(256);
    let store = state.store.clone();
    let (tenant, owner, max_members, validation) =
        (caller.tenant, caller.owner().map(str::to_owned), state.config.max_group_members, state.config.validation);
    let importer = tokio::task::spawn_blocking(move || -> Result<ImportSummary, ApiError> {
        // Small batches: this runs inside the server, whose memory must stay small.
        let mut importer = Importer::new(store, tenant, owner, max_members)
            .with_batch_bytes(2 * 1024 * 1024)
            .with_validation(validation);
        while let Some((line, text)) = lines_rx.blocking_recv() {
            importer.add_line(Location { source: SOURCE.into(), line }, &text)?;
        }
        Ok(importer.finish()?)
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
        // chunks must not be rescanned from its start each time.
        let searched = buffer.len();
        buffer.extend_from_slice(&chunk);
        let mut next_line_end = buffer[searched..].iter().position(|b| *b == b'\n').map(|at| at + searched);
        while let Some(newline) = next_line_end {
            if newline > max_line {
                read_error = Some(line_too_long(line_number + 1, max_line));
                break 'read;
            }
            let line: Vec<u8> = buffer.drain(..=newline).collect();
            line_number += 1;
            if lines_tx.send((line_number, String::from_utf8_lossy(&line).into_owned())).await.is_err() {
                break 'read;
            }
            next_line_end = buffer.iter().position(|b| *b == b'\n');
        }
        if buffer.len() > max_line {
            read_error = Some(line_too_long(line_number + 1, max_line));
            break;
        }
    }
    if read_error.is_none() && !buffer.is_empty() {
        line_number += 1;
        let _ = lines_tx.send((line_number, String::from_utf8_lossy(&buffer).into_owned())).await;
    }
    drop(lines_tx);
    // Lines already read are written even when the body broke off; the outcome says so.
    let summary = importer.await.map_err(|_| ApiError::internal())??;
    if let Some(mut error) = read_error {
        error.issues.extend(summary_issues(&summary));
        return Err(error);
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

/// What an upload did: one information issue with the counts, then one issue per refused line.
fn summary_issues(summary: &ImportSummary) -> Vec<Issue> {
    let mut issues = vec![Issue::information(format!(
        "processed {} resources: {} created, {} updated, {} unchanged, {} failed",
        summary.processed(),
        summary.created,
        summary.updated,
        summary.unchanged,
        summary.failed
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
