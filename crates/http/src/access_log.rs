//! The access log: one `info` line per request, target `bulkhead::access`, with the request id,
//! tenant, client id, method, route template, status, response bytes and latency. It is written
//! when the response body ends (or is dropped, when the client goes away), so a streamed download
//! logs the bytes actually handed to the connection and says whether the body completed.
//!
//! The route is the template (`/bulk-data/r4/$export/{type}/{file}`), never the raw URI: file URLs
//! carry tokens. The request id and the client id come from the client and go through
//! [`log_value`]; the tenant and client are the authenticated caller's (recorded by
//! [`record_caller`] from `auth::authenticate`), empty for public and admin requests.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

use crate::auth::Caller;
use crate::counted_body::CountedBody;
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
    let metrics = request.extensions().get::<crate::metrics::MetricsHandle>().and_then(|handle| handle.0.clone());
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
        metrics,
    };
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(CountedBody::new(body, move |bytes, complete| entry.write(bytes, complete))))
}

struct Entry {
    started: Instant,
    request_id: String,
    tenant: String,
    client: String,
    method: String,
    route: String,
    status: u16,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl Entry {
    /// Writes the access line (and the request's metrics) once the body is done.
    fn write(self, bytes: u64, complete: bool) {
        let entry = &self;
        if let Some(metrics) = &entry.metrics {
            metrics.observe_request(&entry.method, &entry.route, entry.status, entry.started.elapsed());
        }
        tracing::info!(
            target: "bulkhead::access",
            request_id = %entry.request_id,
            tenant = %entry.tenant,
            client = %entry.client,
            method = %entry.method,
            route = %entry.route,
            status = entry.status,
            bytes,
            latency_ms = (entry.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            complete,
            "access"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use axum::routing::get;
    use axum::Router;
    use bulkhead_store::{TenantId, Visibility};
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    use super::*;

    /// The fields of every `bulkhead::access` event, as text.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

    struct Fields(BTreeMap<String, String>);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().to_owned(), format!("{value:?}"));
        }
    }

    impl Subscriber for Lines {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            if event.metadata().target() == "bulkhead::access" {
                let mut fields = Fields(BTreeMap::new());
                event.record(&mut fields);
                self.0.lock().unwrap().push(fields.0);
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    fn app() -> Router {
        let chunks = || {
            futures::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"12345")), Ok("678".into())])
        };
        Router::new()
            .route(
                "/whole/{token}",
                get(move || async move {
                    let caller = Caller {
                        tenant: TenantId(7),
                        tenant_name: "acme".into(),
                        client_id: "bh_client".into(),
                        visibility: Visibility::Tenant,
                        grant: crate::scopes::Grant::Full,
                        method: crate::auth::AuthMethod::ClientHeaders,
                    };
                    record_caller(&caller);
                    Body::from_stream(chunks())
                }),
            )
            .route(
                "/broken",
                get(move || async move {
                    use futures::StreamExt;
                    Body::from_stream(chunks().chain(futures::stream::iter([Err(std::io::Error::other("cut"))])))
                }),
            )
            .layer(axum::middleware::from_fn(access_log))
    }

    async fn one_request(uri: &str, read_body: bool) -> BTreeMap<String, String> {
        let lines = Lines::default();
        let _default = tracing::subscriber::set_default(lines.clone());
        let request = Request::builder().uri(uri).header("x-request-id", "r\t1").body(Body::empty()).unwrap();
        let response = app().oneshot(request).await.unwrap();
        assert!(lines.0.lock().unwrap().is_empty(), "the line waits for the end of the body");
        if read_body {
            let _ = response.into_body().collect().await;
        } else {
            drop(response);
        }
        let mut lines = lines.0.lock().unwrap().clone();
        assert_eq!(lines.len(), 1, "one line per request");
        lines.remove(0)
    }

    #[tokio::test]
    async fn a_whole_body_logs_the_caller_the_route_template_and_its_bytes() {
        let line = one_request("/whole/secret-token-in-the-path", true).await;
        assert_eq!(line["route"], "/whole/{token}");
        assert_eq!((line["tenant"].as_str(), line["client"].as_str()), ("acme", "bh_client"));
        assert_eq!((line["status"].as_str(), line["bytes"].as_str(), line["complete"].as_str()), ("200", "8", "true"));
        assert_eq!(line["request_id"], "r\\u{9}1", "client values are escaped");
        assert!(!line.values().any(|value| value.contains("secret-token")), "{line:?}");
    }

    #[tokio::test]
    async fn a_broken_or_abandoned_body_logs_what_was_sent_and_that_it_did_not_complete() {
        let line = one_request("/broken", true).await;
        assert_eq!((line["bytes"].as_str(), line["complete"].as_str()), ("8", "false"));
        assert_eq!((line["tenant"].as_str(), line["client"].as_str()), ("", ""));
        let line = one_request("/whole/t", false).await;
        assert_eq!((line["bytes"].as_str(), line["complete"].as_str()), ("0", "false"));
    }
}
