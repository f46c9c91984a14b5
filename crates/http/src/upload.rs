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
/// What a line in flight costs beyond its text (its place in the block and its location), so
/// that a body of blank lines is bounded too.
const LINE_OVERHEAD_BYTES: usize = 64;
/// Whole lines are handed to the importer in blocks of about this many bytes (a longer line goes
/// alone): one queue operation and at most one wake-up of the importing thread per block, not
/// per line (per line, the reading threads took ~15 % of the server's CPU in an upload of small
/// resources: BENCHMARKS.md, session 13). Small against [`LINES_AHEAD_BYTES`], so that several
/// blocks are in flight and the reader reads ahead while the importer works.
const BLOCK_BYTES: usize = 64 * 1024;

/// Consecutive whole lines of the body on their way to the importer, holding their share of
/// [`LINES_AHEAD_BYTES`] until all of them are taken in.
struct LineBlock {
    /// The number of the block's first line in the body (from 1).
    first_line: u64,
    /// The lines, each with its `\n` (the body's last line may have none).
    text: Vec<u8>,
    _budget: tokio::sync::OwnedSemaphorePermit,
}

impl LineBlock {
    /// Each line with its number.
    fn lines(&self) -> impl Iterator<Item = (u64, &[u8])> {
        (self.first_line..).zip(self.text.split_inclusive(|byte| *byte == b'\n'))
    }
}

/// The queue of line blocks from the body's reader to the importer, bounded by bytes.
struct LineQueue {
    sender: mpsc::UnboundedSender<LineBlock>,
    budget: std::sync::Arc<tokio::sync::Semaphore>,
    capacity: u32,
}

impl LineQueue {
    fn new(capacity: u32) -> (LineQueue, mpsc::UnboundedReceiver<LineBlock>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(capacity as usize));
        (LineQueue { sender, budget, capacity }, receiver)
    }

    /// Queues `lines` whole lines starting at line `first_line` once their bytes fit in the
    /// budget (a block costlier than the whole budget waits until nothing else is in flight);
    /// `false` once the importer stopped taking lines.
    async fn send(&self, first_line: u64, lines: u64, text: Vec<u8>) -> bool {
        let overhead = usize::try_from(lines).unwrap_or(usize::MAX).saturating_mul(LINE_OVERHEAD_BYTES);
        let cost = u32::try_from(text.len().saturating_add(overhead)).unwrap_or(u32::MAX).min(self.capacity);
        let Ok(budget) = self.budget.clone().acquire_many_owned(cost).await else { return false };
        self.sender.send(LineBlock { first_line, text, _budget: budget }).is_ok()
    }
}

/// Cuts a body's bytes into blocks of whole lines, checking each line's length as it goes.
struct LineBlocks {
    /// Bytes received and not yet handed out: whole lines first, then the start of a line.
    buffer: Vec<u8>,
    /// Where in `buffer` the lines not yet handed out start.
    block_start: usize,
    /// Where in `buffer` the next line starts (the end of the last whole line found).
    line_start: usize,
    /// Whole lines in `buffer[block_start..line_start]`.
    block_lines: u64,
    /// Lines handed out so far.
    handed_out: u64,
    max_line: usize,
}

/// A block of whole lines cut from the body: its first line's number, its line count, its text.
type Block = (u64, u64, Vec<u8>);

impl LineBlocks {
    fn new(max_line: usize) -> LineBlocks {
        LineBlocks { buffer: Vec::new(), block_start: 0, line_start: 0, block_lines: 0, handed_out: 0, max_line }
    }

    /// Takes in a chunk of the body and cuts the blocks it completes, in order, into `blocks`;
    /// `Err` with the number of a line longer than the limit (the blocks before it are cut).
    fn push(&mut self, chunk: &[u8], blocks: &mut Vec<Block>) -> Result<(), u64> {
        // Only the new bytes are searched for line ends: a long line arriving in many small
        // chunks must not be rescanned from its start each time.
        let mut searched = self.buffer.len();
        self.buffer.extend_from_slice(chunk);
        while let Some(newline) = memchr::memchr(b'\n', &self.buffer[searched..]).map(|at| at + searched) {
            if newline - self.line_start > self.max_line {
                blocks.extend(self.cut());
                return Err(self.handed_out + 1);
            }
            if newline + 1 - self.block_start > BLOCK_BYTES && self.block_lines > 0 {
                blocks.extend(self.cut());
            }
            self.line_start = newline + 1;
            self.block_lines += 1;
            searched = self.line_start;
        }
        blocks.extend(self.cut());
        // The handed-out lines are cut off the buffer once per chunk, not once per block.
        self.buffer.drain(..self.block_start);
        self.line_start -= self.block_start;
        self.block_start = 0;
        if self.buffer.len() > self.max_line {
            return Err(self.handed_out + 1);
        }
        Ok(())
    }

    /// The whole lines found since the last block, if any.
    fn cut(&mut self) -> Option<Block> {
        if self.block_lines == 0 {
            return None;
        }
        let block = (self.handed_out + 1, self.block_lines, self.buffer[self.block_start..self.line_start].to_vec());
        self.handed_out += self.block_lines;
        self.block_lines = 0;
        self.block_start = self.line_start;
        Some(block)
    }

    /// The body's last line when it has no `\n` (after the last chunk).
    fn finish(mut self) -> Option<Block> {
        self.buffer.drain(..self.block_start);
        (!self.buffer.is_empty()).then(|| (self.handed_out + 1, 1, self.buffer))
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
    // Held until the body is imported (or the request is dropped).
    let _slot = match upload_slot(&state).await {
        Ok(slot) => slot,
        Err(throttled) => return Ok(throttled),
    };
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
        while let Some(block) = lines_rx.blocking_recv() {
            for (number, line) in block.lines() {
                if let Err(error) = importer.add_line(Location { source: SOURCE.into(), line: number }, line) {
                    return (importer.summary().clone(), Some(error));
                }
            }
            // The block's share of the budget is given back once all its lines are taken in.
            drop(block);
        }
        match importer.finish() {
            Ok(summary) => (summary, None),
            Err(error) => (importer.summary().clone(), Some(error)),
        }
    });
    let max_line = state.config.max_body_bytes;
    let mut stream = body.into_data_stream();
    let mut cutter = LineBlocks::new(max_line);
    let mut blocks = Vec::new();
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
        let cut = cutter.push(&chunk, &mut blocks);
        // The lines before a line that is too long are written.
        for (first_line, lines, text) in blocks.drain(..) {
            if !lines_tx.send(first_line, lines, text).await {
                break 'read;
            }
        }
        if let Err(line) = cut {
            read_error = Some(line_too_long(line, max_line));
            break;
        }
    }
    if read_error.is_none() {
        if let Some((first_line, lines, text)) = cutter.finish() {
            let _ = lines_tx.send(first_line, lines, text).await;
        }
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
async fn upload_slot(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    let (slots, wait) = (&state.upload_slots, state.config.upload_queue_wait);
    crate::planning_pool::slot(slots, wait, "upload", UPLOAD_RETRY_AFTER_SECONDS, || {
        format!(
            "{} uploads are already being imported; retry after {UPLOAD_RETRY_AFTER_SECONDS} s",
            state.config.max_concurrent_uploads
        )
    })
    .await
}

fn line_too_long(line: u64, max_line: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        IssueType::TooCostly,
        crate::ndjson_import::line_too_long(line, max_line),
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

    /// The reader waits once the blocks in flight hold the budget's bytes, whatever their count,
    /// and goes on as soon as the importer takes one in.
    #[tokio::test]
    async fn lines_in_flight_are_bounded_by_their_bytes() {
        let (queue, mut received) = LineQueue::new(1_000);
        let text = |bytes: usize| vec![b'x'; bytes];
        assert_eq!(queue.send(1, 1, text(400)).now_or_never(), Some(true));
        assert_eq!(queue.send(2, 1, text(400)).now_or_never(), Some(true));
        // 2 × (400 + 64) are in flight: 100 more bytes do not fit.
        assert_eq!(queue.send(3, 1, text(100)).now_or_never(), None);
        drop(received.recv().await);
        assert_eq!(queue.send(3, 1, text(100)).now_or_never(), Some(true));
        drop((received.recv().await, received.recv().await));

        // A block longer than the whole budget goes alone.
        assert_eq!(queue.send(4, 1, text(5_000)).now_or_never(), Some(true));
        assert_eq!(queue.send(5, 1, text(1)).now_or_never(), None);
        let long = received.recv().await.unwrap();
        assert_eq!((long.first_line, long.text.len()), (4, 5_000));
        drop(long);

        // Blank lines are bounded too: each costs 64 bytes beyond its text. Beside one line of
        // 65 bytes, a block of 14 blank lines fits (910 bytes) and one of 15 (975) waits.
        assert_eq!(queue.send(6, 1, text(1)).now_or_never(), Some(true));
        assert_eq!(queue.send(7, 15, text(15)).now_or_never(), None);
        assert_eq!(queue.send(7, 14, text(14)).now_or_never(), Some(true));
        drop((received.recv().await, received.recv().await));

        // Once the importer stops, the reader is told.
        drop(received);
        assert_eq!(queue.send(100, 1, text(1)).now_or_never(), Some(false));
    }

    /// Every line comes out once, whole and numbered, whatever the chunks' boundaries; blocks
    /// stay near their size; a line over the limit stops the cutting after the lines before it.
    #[test]
    fn lines_are_cut_into_numbered_blocks_across_chunks() {
        let body: Vec<u8> =
            (0..5_000).flat_map(|n| format!("{{\"n\":{n}{}}}\n", " ".repeat(n % 97)).into_bytes()).collect();
        for chunk_size in [1, 7, 1_000, 65_536, 200_000, body.len()] {
            let mut cutter = LineBlocks::new(1_000);
            let mut blocks = Vec::new();
            for chunk in body.chunks(chunk_size) {
                cutter.push(chunk, &mut blocks).unwrap();
            }
            assert!(cutter.finish().is_none(), "the body ends with a newline");
            let mut next = 1;
            let mut joined = Vec::new();
            for (first_line, lines, text) in &blocks {
                assert_eq!(*first_line, next);
                assert!(text.len() <= BLOCK_BYTES, "{} bytes", text.len());
                let block = LineBlock { first_line: *first_line, text: text.clone(), _budget: permit() };
                assert_eq!(block.lines().count() as u64, *lines);
                for (number, line) in block.lines() {
                    assert_eq!(
                        line,
                        format!("{{\"n\":{}{}}}\n", number - 1, " ".repeat((number as usize - 1) % 97)).as_bytes()
                    );
                }
                next += lines;
                joined.extend_from_slice(text);
            }
            assert_eq!((next, joined.len()), (5_001, body.len()), "chunks of {chunk_size}");
        }

        // The last line without a newline comes out at the end.
        let mut cutter = LineBlocks::new(1_000);
        let mut blocks = Vec::new();
        cutter.push(b"a\n\nb", &mut blocks).unwrap();
        assert_eq!(blocks, vec![(1, 2, b"a\n\n".to_vec())]);
        assert_eq!(cutter.finish(), Some((3, 1, b"b".to_vec())));

        // Too long: within a chunk, or as the unfinished line at a chunk's end.
        let mut cutter = LineBlocks::new(3);
        let mut blocks = Vec::new();
        assert_eq!(cutter.push(b"ab\ncd\nefgh\nij\n", &mut blocks), Err(3));
        assert_eq!(blocks, vec![(1, 2, b"ab\ncd\n".to_vec())]);
        let mut cutter = LineBlocks::new(3);
        let mut blocks = Vec::new();
        assert_eq!(cutter.push(b"ab\nc", &mut blocks), Ok(()));
        assert_eq!(cutter.push(b"def", &mut blocks), Err(2));
        assert_eq!(blocks, vec![(1, 1, b"ab\n".to_vec())]);
    }

    fn permit() -> tokio::sync::OwnedSemaphorePermit {
        std::sync::Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().unwrap()
    }
}
