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

/// Bytes of the body's lines read ahead of the importer, waiting for it: the reader waits when
/// they are in flight. Bounded by bytes, not by a count of lines, since a line can be 50 KB (a
/// Synthea ExplanationOfBenefit) or one byte.
const LINES_AHEAD_BYTES: u32 = 1024 * 1024;
/// What a line in flight costs beyond its text (its buffer and its place in the queue), so that a
/// body of blank lines is bounded too.
const LINE_OVERHEAD_BYTES: usize = 64;

/// A line on its way to the importer, holding its share of [`LINES_AHEAD_BYTES`] until it is
/// taken in.
struct QueuedLine {
    number: u64,
    text: Vec<u8>,
    _budget: tokio::sync::OwnedSemaphorePermit,
}

/// The queue of lines from the body's reader to the importer, bounded by bytes.
struct LineQueue {
    sender: mpsc::UnboundedSender<QueuedLine>,
    budget: std::sync::Arc<tokio::sync::Semaphore>,
    capacity: u32,
}

impl LineQueue {
    fn new(capacity: u32) -> (LineQueue, mpsc::UnboundedReceiver<QueuedLine>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(capacity as usize));
        (LineQueue { sender, budget, capacity }, receiver)
    }

    /// Queues a line once its bytes fit in the budget (a line longer than the whole budget waits
    /// until nothing else is in flight); `false` once the importer stopped taking lines.
    async fn send(&self, number: u64, text: Vec<u8>) -> bool {
        let cost = u32::try_from(text.len() + LINE_OVERHEAD_BYTES).unwrap_or(u32::MAX).min(self.capacity);
        let Ok(budget) = self.budget.clone().acquire_many_owned(cost).await else { return false };
        self.sender.send(QueuedLine { number, text, _budget: budget }).is_ok()
    }
}

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
    let (lines_tx, mut lines_rx) = LineQueue::new(LINES_AHEAD_BYTES);
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
        while let Some(line) = lines_rx.blocking_recv() {
            // The line's share of the budget is given back once it is taken in (dropped here).
            if let Err(error) = importer.add_line(Location { source: SOURCE.into(), line: line.number }, &line.text) {
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
            if !lines_tx.send(line_number, line).await {
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
        let _ = lines_tx.send(line_number, std::mem::take(&mut buffer)).await;
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

/// Seconds an upload turned away by a full upload pool is told to wait.
const UPLOAD_RETRY_AFTER_SECONDS: u64 = 5;

/// A permit to import one upload's body: waits up to `upload_queue_wait` for one of the
/// `max_concurrent_uploads` places, then answers 429 with `Retry-After`. Each upload holds a
/// blocking thread for as long as its body arrives, so without this a few slow uploads could
/// take every thread of the server's bounded pool from every other tenant's requests.
pub(crate) async fn upload_slot(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    crate::planning_pool::permit_within(&state.upload_slots, state.config.upload_queue_wait).await.ok_or_else(|| {
        tracing::info!(limit = state.config.max_concurrent_uploads, "upload pool full; answering 429");
        crate::planning_pool::pool_full(
            format!(
                "{} uploads are already being imported; retry after {UPLOAD_RETRY_AFTER_SECONDS} s",
                state.config.max_concurrent_uploads
            ),
            UPLOAD_RETRY_AFTER_SECONDS,
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// The reader waits once the lines in flight hold the budget's bytes, whatever their count,
    /// and goes on as soon as the importer takes one in.
    #[tokio::test]
    async fn lines_in_flight_are_bounded_by_their_bytes() {
        let (queue, mut received) = LineQueue::new(1_000);
        let line = |bytes: usize| vec![b'x'; bytes];
        assert_eq!(queue.send(1, line(400)).now_or_never(), Some(true));
        assert_eq!(queue.send(2, line(400)).now_or_never(), Some(true));
        // 2 × (400 + 64) are in flight: 100 more bytes do not fit.
        assert_eq!(queue.send(3, line(100)).now_or_never(), None);
        drop(received.recv().await);
        assert_eq!(queue.send(3, line(100)).now_or_never(), Some(true));
        drop((received.recv().await, received.recv().await));

        // A line longer than the whole budget goes alone.
        assert_eq!(queue.send(4, line(5_000)).now_or_never(), Some(true));
        assert_eq!(queue.send(5, line(1)).now_or_never(), None);
        let long = received.recv().await.unwrap();
        assert_eq!((long.number, long.text.len()), (4, 5_000));
        drop(long);

        // Blank lines are bounded too: 1,000 / (1 + 64) of them.
        let mut queued = 0;
        while queue.send(6 + queued, line(1)).now_or_never() == Some(true) {
            queued += 1;
        }
        assert_eq!(queued, 15);

        // Once the importer stops, the reader is told.
        drop(received);
        queue.budget.add_permits(1_000);
        assert_eq!(queue.send(100, line(1)).now_or_never(), Some(false));
    }
}
