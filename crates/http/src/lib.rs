//! Bulkhead's HTTP layer: FHIR R4 REST under `/r4`, Group bulk export (also under
//! `/bulk-data/r4`, 1upHealth style; synchronous, or asynchronous with status polling), the
//! admin API, and the error → OperationOutcome mapping.

pub mod access_log;
pub mod access_token;
pub mod admin;
pub mod audit;
pub mod audit_api;
pub mod audit_event;
pub mod audit_writer;
pub mod auth;
pub mod bulk;
pub mod bundle;
pub mod capability;
mod chunk_pool;
pub mod connections;
pub mod counted_body;
pub mod credentials;
pub mod encoding;
pub mod error;
pub mod export_status;
mod export_work;
pub mod export_worker;
pub mod health;
pub mod jwks;
mod known_ids;
pub mod log_value;
pub mod login_limits;
mod materialise;
pub mod metrics;
pub mod ndjson_import;
pub mod negotiation;
pub mod object_output;
pub mod plain_errors;
pub mod planning_pool;
pub mod quotas;
pub mod registration;
pub mod rest;
pub mod scopes;
pub mod search;
pub mod stall;
pub mod state;
pub mod timeouts;
pub mod token_endpoint;
pub mod upload;
pub mod urls;
pub mod validate;

use axum::extract::{FromRequest, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use connections::serve;
pub use error::ApiError;
pub use state::{AppState, ConnectionLimits, HttpConfig};

/// The FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json";

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds the complete router.
pub fn router(state: AppState) -> Router {
    let metrics = metrics::MetricsHandle(state.metrics.clone());
    let fhir = Router::new()
        .route("/r4", post(bundle::process_bundle))
        .route("/r4/{type}", get(type_get).post(type_post))
        .route("/r4/{type}/{id}", get(rest::read).put(rest::update).delete(rest::delete))
        .route("/r4/{type}/{id}/{operation}", get(instance_operation).post(instance_operation_post))
        .route("/r4/Patient/$export", get(bulk::patient_kick_off).post(bulk::patient_kick_off_post))
        .route("/r4/{type}/{id}/_history/{version}", get(rest::vread))
        .route("/bulk-data/r4/Group/{id}/$export", get(bulk::kick_off).post(bulk::group_kick_off_post))
        .route("/bulk-data/r4/Patient/$export", get(bulk::patient_kick_off).post(bulk::patient_kick_off_post))
        .route("/bulk-data/r4/$export", get(bulk::system_kick_off).post(bulk::system_kick_off_post))
        .route("/bulk-data/r4/metadata", get(bulk_metadata))
        .route("/bulk-data/r4/$export/{type}/{file}", get(bulk::download))
        .route("/bulk-data/r4/$export-object/{type}/{file}", get(bulk::download_object))
        .route("/bulk-data/r4/$export-status/{job_id}", get(export_status::status).delete(export_status::cancel))
        .route("/r4/$export-status/{job_id}", get(export_status::status).delete(export_status::cancel))
        .route_layer(axum::middleware::from_fn(negotiation::general_params));
    // SMART Backend Services: discovery at each FHIR base, and the token endpoint.
    let smart = Router::new()
        .route("/r4/.well-known/smart-configuration", get(token_endpoint::smart_configuration))
        .route("/bulk-data/r4/.well-known/smart-configuration", get(token_endpoint::smart_configuration))
        .route(token_endpoint::TOKEN_PATH, post(token_endpoint::token));
    let admin = Router::new()
        .route("/admin/tenants", get(admin::list_tenants).post(admin::create_tenant))
        .route("/admin/tenants/{tenant}/clients", get(admin::list_clients).post(admin::create_client))
        .route("/admin/clients/{client_id}/revoke", post(admin::revoke_client))
        .route("/admin/audit", get(audit_api::audit_records))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admin::admin_only));
    Router::new()
        .route("/healthz", get(health::ready))
        .route("/healthz/ready", get(health::ready))
        .route("/healthz/live", get(health::live))
        .route("/metrics", get(metrics::scrape))
        .merge(fhir)
        .merge(smart)
        .merge(admin)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                bulkhead_fhir::IssueType::NotSupported,
                "method not allowed on this endpoint",
            )
        })
        .with_state(state.clone())
        .layer(CatchPanicLayer::custom(error::panic_response))
        .layer(axum::middleware::from_fn_with_state(state.clone(), login_limits::limit_failed_logins))
        .layer(axum::middleware::from_fn_with_state(state.clone(), timeouts::request_deadlines))
        .layer(axum::middleware::from_fn(quotas::retry_after_header))
        .layer(axum::middleware::from_fn(plain_errors::errors_as_operation_outcomes))
        // Outside every layer that can answer, so each audited request's final status is known.
        .layer(axum::middleware::from_fn_with_state(state, audit::trail))
        // Inside the span, outside everything that can answer: one line per request, final status.
        .layer(axum::middleware::from_fn(access_log::access_log))
        .layer(axum::Extension(metrics))
        .layer(
            // Spans name the route template, never the raw URI: file URLs carry tokens. The
            // request id may come from the client, so it is logged through `log_value`.
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let route = request.extensions().get::<MatchedPath>().map(MatchedPath::as_str).unwrap_or("unmatched");
                let request_id = request.headers().get(&REQUEST_ID).map(|id| String::from_utf8_lossy(id.as_bytes()));
                let request_id = log_value::log_value(request_id.as_deref().unwrap_or(""));
                tracing::info_span!("request", method = %request.method(), route, request_id = %request_id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// `GET /bulk-data/r4/metadata` (public): the same CapabilityStatement as `/r4/metadata`.
async fn bulk_metadata(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    negotiation::check_accept(&headers)?;
    Ok(capability::metadata_response(&urls::base_url(&state, &headers)))
}

/// `GET /r4/metadata` (public), `GET /r4/$export` (system-level export) or a type-level search.
async fn type_get(
    State(state): State<AppState>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if resource_type == "metadata" {
        negotiation::check_accept(&headers)?;
        return Ok(capability::metadata_response(&urls::base_url(&state, &headers)));
    }
    if resource_type == "$export" {
        return bulk::system_kick_off(State(state), uri, headers).await;
    }
    let caller = auth::authorize(&state, &method, uri.path(), &headers).await?;
    search::search(state, caller, resource_type, query, headers).await
}

/// `POST /r4/$upload-ndjson`, `POST /r4/$export` (system-level export) or a create.
async fn type_post(
    State(state): State<AppState>,
    Path(resource_type): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    if resource_type == "$export" {
        let body = negotiation::JsonBody::from_request(request, &state).await?;
        return bulk::system_kick_off_post(State(state), uri, headers, body).await;
    }
    let caller = auth::authorize(&state, request.method(), request.uri().path(), &headers).await?;
    if resource_type == "$upload-ndjson" {
        return upload::upload_ndjson(state, caller, headers, request.into_body()).await;
    }
    let body = negotiation::JsonBody::from_request(request, &state).await?;
    rest::create(State(state), caller, Path(resource_type), headers, body).await
}

/// `GET /r4/{type}/{id}/_history` and `GET /r4/Group/{id}/$export`.
async fn instance_operation(
    State(state): State<AppState>,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    match (resource_type.as_str(), operation.as_str()) {
        (_, "_history") => {
            let caller = auth::authorize(&state, &Method::GET, uri.path(), &headers).await?;
            rest::history(state, caller, resource_type, id, headers).await
        }
        ("Group", "$export") => bulk::kick_off(State(state), Path(id), uri, headers).await,
        (_, "$export") => Err(export_elsewhere()),
        _ => Err(ApiError::not_found(format!("no operation '{operation}' on {resource_type}"))),
    }
}

/// `POST /r4/Group/{id}/$export` (a `Parameters` body).
async fn instance_operation_post(
    State(state): State<AppState>,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    match (resource_type.as_str(), operation.as_str()) {
        ("Group", "$export") => {
            let body = negotiation::JsonBody::from_request(request, &state).await?;
            bulk::group_kick_off_post(State(state), Path(id), uri, headers, body).await
        }
        (_, "$export") => Err(export_elsewhere()),
        _ => Err(ApiError::not_found(format!("no operation '{operation}' on {resource_type}"))),
    }
}

fn export_elsewhere() -> ApiError {
    ApiError::bad_request(
        bulkhead_fhir::IssueType::NotSupported,
        "$export is available at [base]/$export, [base]/Patient/$export and [base]/Group/[id]/$export",
    )
}
