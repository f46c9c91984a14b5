//! `GET /admin/audit?tenant=T[&since=…][&client=…][&patient=Patient/ID][&action=…][&limit=N]
//! [&format=json|AuditEvent]` (admin token): a tenant's audit records, oldest first, streamed as
//! NDJSON: one JSON object per record (`format=json`, the default, the same lines as
//! `bulkhead audit --json`), or one FHIR `AuditEvent` per record (`format=AuditEvent`).

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::{parse_since, IssueType};
use bulkhead_store::AuditQuery;
use tokio::sync::mpsc;

use crate::audit_event::{audit_event, record_json};
use crate::error::ApiError;
use crate::state::AppState;
use crate::urls::base_url;

/// Records read from the store at a time (one short read transaction each).
const PAGE: usize = 1_000;

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditFormat {
    /// One JSON object per line.
    Json,
    /// One FHIR R4 `AuditEvent` per line.
    AuditEvent,
}

impl AuditFormat {
    pub fn parse(text: &str) -> Option<AuditFormat> {
        match text.to_ascii_lowercase().as_str() {
            "json" | "ndjson" => Some(AuditFormat::Json),
            "auditevent" | "fhir" => Some(AuditFormat::AuditEvent),
            _ => None,
        }
    }
}

/// A query of one tenant's audit trail, as the API and the command line take it.
#[derive(Debug, Clone)]
pub struct AuditRequest {
    pub tenant: String,
    pub query: AuditQuery,
    pub limit: Option<u64>,
    pub format: AuditFormat,
}

/// `Patient/ID` or `ID` → `ID`.
pub fn patient_id(text: &str) -> &str {
    text.strip_prefix("Patient/").unwrap_or(text)
}

fn invalid(name: &str, diagnostics: impl Into<String>) -> ApiError {
    ApiError::bad_request(IssueType::Value, diagnostics).at(name.to_owned())
}

fn parse_request(raw_query: &str) -> Result<AuditRequest, ApiError> {
    let mut tenant = None;
    let mut request = AuditRequest {
        tenant: String::new(),
        query: AuditQuery { limit: PAGE, ..AuditQuery::default() },
        limit: None,
        format: AuditFormat::Json,
    };
    for (name, value) in form_urlencoded::parse(raw_query.as_bytes()) {
        match name.as_ref() {
            "tenant" => tenant = Some(value.into_owned()),
            "since" => {
                let since = parse_since(&value).map_err(|error| invalid("since", error.to_string()))?;
                request.query.since = Some(since);
            }
            "client" => request.query.client = Some(value.into_owned()),
            "patient" => request.query.patient = Some(patient_id(&value).to_owned()),
            "action" => request.query.action = Some(value.into_owned()),
            "limit" => {
                let limit = value.parse().ok().filter(|limit| *limit >= 1);
                request.limit =
                    Some(limit.ok_or_else(|| invalid("limit", "limit must be a whole number, at least 1"))?);
            }
            "format" => {
                request.format =
                    AuditFormat::parse(&value).ok_or_else(|| invalid("format", "format must be json or AuditEvent"))?;
            }
            other => {
                return Err(ApiError::bad_request(IssueType::NotSupported, format!("unknown parameter '{other}'"))
                    .at(other.to_owned()))
            }
        }
    }
    request.tenant = tenant.ok_or_else(|| invalid("tenant", "name the tenant: ?tenant=NAME"))?;
    Ok(request)
}

/// Writes the records `request` selects to `out` as NDJSON, a page at a time; returns how many.
/// `send` hands each page's bytes on and says whether to go on.
pub fn write_records(
    store: &dyn bulkhead_store::Store,
    tenant: &bulkhead_store::Tenant,
    request: &AuditRequest,
    base: &str,
    mut send: impl FnMut(Vec<u8>) -> bool,
) -> Result<u64, bulkhead_store::StoreError> {
    let mut query = request.query.clone();
    let mut written = 0u64;
    loop {
        let page = store.audit_records(tenant.id, &query)?;
        let mut chunk = Vec::new();
        for record in &page {
            if request.limit.is_some_and(|limit| written >= limit) {
                break;
            }
            let line = match request.format {
                AuditFormat::Json => record_json(record, &tenant.name),
                AuditFormat::AuditEvent => audit_event(record, &tenant.name, base),
            };
            chunk.extend_from_slice(line.to_string().as_bytes());
            chunk.push(b'\n');
            written += 1;
        }
        if !chunk.is_empty() && !send(chunk) {
            return Ok(written);
        }
        let limit_reached = request.limit.is_some_and(|limit| written >= limit);
        if page.len() < query.limit || limit_reached {
            return Ok(written);
        }
        query.after_seq = page.last().map(|record| record.seq);
    }
}

/// `GET /admin/audit` (behind `admin::admin_only`).
pub async fn audit_records(
    State(state): State<AppState>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let request = parse_request(raw_query.as_deref().unwrap_or(""))?;
    let name = request.tenant.clone();
    let tenant = state
        .blocking(move |store| Ok(store.tenant_by_name(&name)?))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no tenant '{}'", request.tenant)))?;
    let base = base_url(&state, &headers);
    let content_type = match request.format {
        AuditFormat::Json => "application/x-ndjson",
        AuditFormat::AuditEvent => "application/fhir+ndjson",
    };
    let (pages_tx, mut pages_rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let sent = write_records(store.as_ref(), &tenant, &request, &base, |chunk| {
            pages_tx.blocking_send(Ok(Bytes::from(chunk))).is_ok()
        });
        if let Err(error) = sent {
            // The body ends with an error: the client sees a broken response, not a short list.
            tracing::error!(error = %error, "reading the audit trail failed");
            let _ = pages_tx.blocking_send(Err(std::io::Error::other("reading the audit trail failed")));
        }
    });
    let stream = futures::stream::poll_fn(move |cx| pages_rx.poll_recv(cx));
    let mut response = (StatusCode::OK, Body::from_stream(stream)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}
