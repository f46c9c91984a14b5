//! Request deadlines: a body that pauses longer than `body_idle_timeout` fails, and a request
//! whose response has not started within `request_timeout` is answered 408. Both close the
//! connection. (The header read timeout is the listener's, [`crate::connections`].)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::IssueType;
use tokio::time::Sleep;

use crate::error::ApiError;
use crate::state::AppState;

/// The error a request body yields after pausing too long.
#[derive(Debug, thiserror::Error)]
#[error("the request body paused for more than {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

/// A body that fails when no data arrives for `idle` while it is being read.
struct IdleTimeoutBody {
    inner: Body,
    idle: Duration,
    /// Armed when a read finds nothing, disarmed when data arrives.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl HttpBody for IdleTimeoutBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.deadline = None;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let idle = this.idle;
                let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyIdleTimeout(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// True when a body read failed because the client paused too long.
pub fn is_idle_timeout(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current.is::<BodyIdleTimeout>() {
            return true;
        }
        source = current.source();
    }
    false
}

/// Middleware: the body idle timeout and the total request timeout.
pub async fn request_deadlines(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limits = &state.config.limits;
    let request =
        request.map(|inner| Body::new(IdleTimeoutBody { inner, idle: limits.body_idle_timeout, deadline: None }));
    let mut response = match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            IssueType::Timeout,
            format!("the request did not complete within {} s", limits.request_timeout.as_secs()),
        )
        .into_response(),
    };
    // A timed-out request may have left body bytes unread: the connection cannot be reused.
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
