//! The access log: one `info` line per request, target `bulkhead::access`, with the request id,
//! tenant, client id, method, route template, status, response bytes and latency. It is written
//! when the response body ends (or is dropped, when the client goes away), so a streamed download
//! logs the bytes actually handed to the connection and says whether the body completed.
//!
//! The route is the template (`/bulk-data/r4/$export/{type}/{file}`), never the raw URI: file URLs
//! carry tokens. The request id and the client id come from the client and go through
//! [`log_value`]; the tenant and client are the authenticated caller's (recorded by
//! [`record_caller`] from `auth::authenticate`), empty for public and admin requests.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as _, Frame, SizeHint};

use crate::auth::Caller;
use crate::log_value::log_value;
use crate::REQUEST_ID;

/// The authenticated caller of the request being served: (tenant name, client id).
type CallerSlot = Arc<Mutex<Option<(String, String)>>>;

tokio::task_local! {
    static CALLER: CallerSlot;
}

/// Records the authenticated caller for the access line of the current request (a no-op outside
/// a request, e.g. in tests calling handlers directly).
pub fn record_caller(caller: &Caller) {
    let _ = CALLER.try_with(|slot| {
        if let Ok(mut slot) = slot.lock() {
            *slot = Some((caller.tenant_name.clone(), caller.client_id.clone()));
        }
    });
}

/// Middleware writing the access line of each request.
pub async fn access_log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let request_id = request.headers().get(&REQUEST_ID).map(|id| log_value(&String::from_utf8_lossy(id.as_bytes())));
    let slot = CallerSlot::default();
    let response = CALLER.scope(slot.clone(), next.run(request)).await;
    let (tenant, client) = slot.lock().ok().and_then(|caller| caller.clone()).unwrap_or_default();
    let entry = Entry {
        started,
        request_id: request_id.unwrap_or_default(),
        tenant: log_value(&tenant),
        client: log_value(&client),
        method,
        route,
        status: response.status().as_u16(),
        bytes: 0,
        complete: false,
    };
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(LoggedBody { inner: body, entry }))
}

struct Entry {
    started: Instant,
    request_id: String,
    tenant: String,
    client: String,
    method: String,
    route: String,
    status: u16,
    bytes: u64,
    complete: bool,
}

/// A response body that counts its bytes and writes the access line when it is dropped.
struct LoggedBody {
    inner: Body,
    entry: Entry,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.entry.bytes += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.entry.complete = true;
                }
            }
            Poll::Ready(None) => self.entry.complete = true,
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

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // An empty body may never be polled: it is complete all the same.
        let complete = self.entry.complete || (self.entry.bytes == 0 && self.inner.is_end_stream());
        let entry = &self.entry;
        tracing::info!(
            target: "bulkhead::access",
            request_id = %entry.request_id,
            tenant = %entry.tenant,
            client = %entry.client,
            method = %entry.method,
            route = %entry.route,
            status = entry.status,
            bytes = entry.bytes,
            latency_ms = (entry.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            complete,
            "access"
        );
    }
}
