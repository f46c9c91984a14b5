//! The server-wide pool of export planners: at most `max_concurrent_plans` export plans are
//! computed at once, whatever the number of kick-offs.
//!
//! A plan's memory is not small: each planner reads the members' compartments in key windows
//! (a window's candidates are held at once), on one read connection per core, each with its own
//! page cache, and the associated data on one more. Twenty simultaneous kick-offs of a
//! 1,000-member Group planned in parallel took the server past 400 MiB; queued, they take a
//! planner's memory times the pool's size, and a queued kick-off of the same request usually
//! finds the plan cached by the one before it. An asynchronous job beyond the pool is not
//! claimed by the export worker until a place is free; a synchronous kick-off waits up to
//! `plan_queue_wait`, then gets 429 with `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::IssueType;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::state::AppState;

/// Seconds a synchronous kick-off turned away by a full planning pool is told to wait.
pub const PLAN_RETRY_AFTER_SECONDS: u64 = 2;

/// A permit to compute one plan for a synchronous kick-off: waits up to `plan_queue_wait` for
/// one of the `max_concurrent_plans` planners, then answers 429 with `Retry-After`.
pub(crate) async fn planning_slot(state: &AppState) -> Result<OwnedSemaphorePermit, Response> {
    slot(&state.planning_slots, state.config.plan_queue_wait, "planning", PLAN_RETRY_AFTER_SECONDS, || {
        format!(
            "{} exports are already being planned; retry after {PLAN_RETRY_AFTER_SECONDS} s \
             (or kick off with Prefer: respond-async to be queued)",
            state.config.max_concurrent_plans
        )
    })
    .await
}

/// A place in one of the server's pools (planning, downloads, uploads): at once or within
/// `wait`; otherwise the 429 answer, with the message `busy()` and `Retry-After`, logged with
/// the pool's name.
pub(crate) async fn slot(
    slots: &Arc<Semaphore>,
    wait: Duration,
    pool: &'static str,
    retry_after_seconds: u64,
    busy: impl FnOnce() -> String,
) -> Result<OwnedSemaphorePermit, Response> {
    permit_within(slots, wait).await.ok_or_else(|| {
        let message = busy();
        tracing::info!(pool, message = %message, "pool full; answering 429");
        pool_full(message, retry_after_seconds)
    })
}

/// The answer to a request turned away by a full pool: 429, `message` and `Retry-After`.
fn pool_full(message: String, retry_after_seconds: u64) -> Response {
    let mut response = ApiError::new(StatusCode::TOO_MANY_REQUESTS, IssueType::Throttled, message).into_response();
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
    response
}

/// A permit of `slots` at once, or within `wait`; `None` when none came free in time (a zero
/// `wait` does not queue).
async fn permit_within(slots: &Arc<Semaphore>, wait: Duration) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    if wait.is_zero() {
        return None;
    }
    tokio::time::timeout(wait, slots.clone().acquire_owned()).await.ok()?.ok()
}
