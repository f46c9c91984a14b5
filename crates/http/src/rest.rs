//! FHIR R4 REST interactions: create, read, vread, update, delete, history.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bulkhead_fhir::{format_instant, is_resource_type, IssueType};
use bulkhead_store::{StoredResource, WriteMode, WriteOp, Written};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::negotiation::{check_accept, fhir_response, http_date, JsonBody};
use crate::state::AppState;
use crate::urls::base_url;
use crate::validate::validate_resource;

/// Refuses a path type that is not an R4 resource type.
pub fn known_type(resource_type: &str) -> Result<(), ApiError> {
    if is_resource_type(resource_type) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        IssueType::NotSupported,
        format!("'{resource_type}' is not an R4 resource type"),
    ))
}

/// `ETag`, `Last-Modified` and (for creates) `Location` for a written or read version.
fn version_headers(
    response: &mut Response,
    base: &str,
    resource_type: &str,
    id: &str,
    version: i64,
    last_updated: i64,
) {
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
        headers.insert(header::ETAG, etag);
    }
    if let Some(modified) = http_date(last_updated / 1_000_000).and_then(|date| HeaderValue::from_str(&date).ok()) {
        headers.insert(header::LAST_MODIFIED, modified);
    }
    if let Ok(location) = HeaderValue::from_str(&format!("{base}/r4/{resource_type}/{id}/_history/{version}")) {
        headers.insert(header::CONTENT_LOCATION, location.clone());
        if response.status() == StatusCode::CREATED {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
}

fn written_response(written: Written, base: &str) -> Response {
    let status = if written.created { StatusCode::CREATED } else { StatusCode::OK };
    let mut response = fhir_response(status, written.body.unwrap_or_default());
    version_headers(&mut response, base, &written.resource_type, &written.id, written.version, written.last_updated);
    response
}

/// Runs one write and returns its single result.
pub async fn write_one(state: &AppState, caller: &Caller, op: WriteOp) -> Result<Written, ApiError> {
    let (tenant, owner) = (caller.tenant, caller.owner().map(str::to_owned));
    let audit = crate::audit::WriteAudit::current();
    state
        .blocking(move |store| {
            let mut results = audit.write(store, tenant, owner.as_deref(), &[op], WriteMode::Transaction)?;
            Ok(results.pop().ok_or_else(ApiError::internal)??)
        })
        .await
}

/// `POST /r4/{type}`: create with a server-assigned id (`If-None-Exist` makes it conditional).
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    crate::audit::note("create", resource_type.clone());
    known_type(&resource_type)?;
    check_accept(&headers)?;
    validate_resource(
        &body,
        &resource_type,
        None,
        state.config.max_group_members,
        state.config.validation_for(&caller.tenant_name),
    )?;
    let base = base_url(&state, &headers);
    if let Some(condition) = headers.get("if-none-exist").and_then(|value| value.to_str().ok()) {
        let query = crate::search::conditional_query(&resource_type, condition)?;
        if let Some(existing) = crate::search::find_one(&state, &caller, query).await? {
            let mut response = fhir_response(StatusCode::OK, existing.body.clone().unwrap_or_default());
            version_headers(
                &mut response,
                &base,
                &existing.resource_type,
                &existing.id,
                existing.version,
                existing.last_updated,
            );
            return Ok(response);
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    let op = WriteOp::Create { resource_type, id, body };
    Ok(written_response(write_one(&state, &caller, op).await?, &base))
}

/// `If-Match: W/"3"` → 3.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else { return Ok(None) };
    parse_version_tag(value.to_str().unwrap_or(""), "If-Match").map(Some)
}

/// A version ETag, `W/"3"` (or `"3"`, `3`) → 3, from the `If-Match` header or a Bundle entry's
/// `request.ifMatch` (named by `expression` in the refusal).
pub(crate) fn parse_version_tag(text: &str, expression: &str) -> Result<i64, ApiError> {
    let text = text.trim();
    let digits = text.trim_start_matches("W/").trim_matches('"');
    digits.parse().map_err(|_| {
        ApiError::bad_request(IssueType::Value, format!("{expression} must look like W/\"<version>\", not '{text}'"))
            .at(expression)
    })
}

/// `PUT /r4/{type}/{id}`: update, or create with the client's id.
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    crate::audit::note("update", format!("{resource_type}/{id}"));
    known_type(&resource_type)?;
    check_accept(&headers)?;
    validate_resource(
        &body,
        &resource_type,
        Some(&id),
        state.config.max_group_members,
        state.config.validation_for(&caller.tenant_name),
    )?;
    let op = WriteOp::Update { resource_type, id, body, if_match: if_match(&headers)? };
    let base = base_url(&state, &headers);
    Ok(written_response(write_one(&state, &caller, op).await?, &base))
}

/// `DELETE /r4/{type}/{id}`.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    crate::audit::note("delete", format!("{resource_type}/{id}"));
    known_type(&resource_type)?;
    write_one(&state, &caller, WriteOp::Delete { resource_type, id }).await?;
    Ok(fhir_response(StatusCode::NO_CONTENT, ""))
}

async fn load_current(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
) -> Result<StoredResource, ApiError> {
    let (tenant, visibility) = (caller.tenant, caller.visibility.clone());
    let (resource_type, id) = (resource_type.to_owned(), id.to_owned());
    let found = state.blocking(move |store| Ok(store.read(tenant, &visibility, &resource_type, &id)?)).await?;
    found.ok_or_else(|| ApiError::not_found("resource not found"))
}

/// `GET /r4/{type}/{id}`: 404 when unknown (or another tenant's), 410 when deleted.
pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::audit::note("read", format!("{resource_type}/{id}"));
    known_type(&resource_type)?;
    check_accept(&headers)?;
    let resource = load_current(&state, &caller, &resource_type, &id).await?;
    stored_response(&state, &headers, resource)
}

fn stored_response(state: &AppState, headers: &HeaderMap, resource: StoredResource) -> Result<Response, ApiError> {
    crate::audit::note_resource(&resource);
    if resource.deleted {
        return Err(ApiError::new(
            StatusCode::GONE,
            IssueType::Deleted,
            format!("{}/{} was deleted", resource.resource_type, resource.id),
        ));
    }
    let mut response = fhir_response(StatusCode::OK, resource.body.clone().unwrap_or_default());
    version_headers(
        &mut response,
        &base_url(state, headers),
        &resource.resource_type,
        &resource.id,
        resource.version,
        resource.last_updated,
    );
    Ok(response)
}

/// `GET /r4/{type}/{id}/_history/{version}`.
pub async fn vread(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id, version)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::audit::note("vread", format!("{resource_type}/{id}/_history/{version}"));
    known_type(&resource_type)?;
    check_accept(&headers)?;
    let version: i64 = version.parse().map_err(|_| ApiError::not_found(format!("no version '{version}'")))?;
    let (tenant, visibility) = (caller.tenant, caller.visibility.clone());
    let found = state
        .blocking(move |store| Ok(store.vread(tenant, &visibility, &resource_type, &id, version)?))
        .await?
        .ok_or_else(|| ApiError::not_found("version not found"))?;
    stored_response(&state, &headers, found)
}

/// `GET /r4/{type}/{id}/_history`: a `history` Bundle, newest first.
pub async fn history(
    state: AppState,
    caller: Caller,
    resource_type: String,
    id: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::audit::note("history", format!("{resource_type}/{id}"));
    known_type(&resource_type)?;
    check_accept(&headers)?;
    let (tenant, visibility) = (caller.tenant, caller.visibility.clone());
    let (lookup_type, lookup_id) = (resource_type.clone(), id.clone());
    let versions =
        state.blocking(move |store| Ok(store.history(tenant, &visibility, &lookup_type, &lookup_id)?)).await?;
    if versions.is_empty() {
        return Err(ApiError::not_found("resource not found"));
    }
    crate::audit::note_found(&versions);
    let base = base_url(&state, &headers);
    let entries = versions
        .into_iter()
        .map(|version| {
            let full_url = format!("{base}/r4/{resource_type}/{id}");
            let (method, status) = match (version.deleted, version.version) {
                (true, _) => ("DELETE", "204"),
                (false, 1) => ("POST", "201"),
                (false, _) => ("PUT", "200"),
            };
            let mut entry = json!({
                "fullUrl": full_url,
                "request": {"method": method, "url": format!("{resource_type}/{id}")},
                "response": {"status": status, "etag": format!("W/\"{}\"", version.version), "lastModified": format_instant(version.last_updated)},
            });
            if let Some(body) = version.body {
                entry["resource"] = raw_json(body)?;
            }
            Ok(entry)
        })
        .collect::<Result<Vec<Value>, ApiError>>()?;
    let bundle = json!({"resourceType": "Bundle", "type": "history", "total": entries.len(), "entry": entries});
    Ok(fhir_response(StatusCode::OK, bundle.to_string()))
}

/// Parses stored JSON text for embedding in a Bundle (search and history pages are small;
/// exports never take this path).
pub fn raw_json(text: String) -> Result<Value, ApiError> {
    bulkhead_fhir::parse_exact(text.as_bytes()).map_err(|error| {
        tracing::error!(error = %error, "stored resource is not valid json");
        ApiError::internal()
    })
}
