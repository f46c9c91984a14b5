//! A response body that counts the bytes handed to the connection and, when it is dropped,
//! reports them and whether the body ran to its end (the access log and the audit trail).

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use http_body::{Body as _, Frame, SizeHint};

/// Wraps `inner`; `on_drop(bytes, complete)` runs once, when the body is dropped.
pub struct CountedBody<F: FnOnce(u64, bool)> {
    inner: Body,
    bytes: u64,
    complete: bool,
    on_drop: Option<F>,
}

impl<F: FnOnce(u64, bool)> CountedBody<F> {
    pub fn new(inner: Body, on_drop: F) -> CountedBody<F> {
        CountedBody { inner, bytes: 0, complete: false, on_drop: Some(on_drop) }
    }
}

impl<F: FnOnce(u64, bool) + Unpin> http_body::Body for CountedBody<F> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.complete = true;
                }
            }
            Poll::Ready(None) => self.complete = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce(u64, bool)> Drop for CountedBody<F> {
    fn drop(&mut self) {
        // An empty body may never be polled: it is complete all the same.
        let complete = self.complete || (self.bytes == 0 && self.inner.is_end_stream());
        if let Some(on_drop) = self.on_drop.take() {
            on_drop(self.bytes, complete);
        }
    }
}
