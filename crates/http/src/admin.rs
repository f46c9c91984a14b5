//! The admin API under `/admin`: tenants and clients. Off unless an admin token is configured;
//! the token comes as `Authorization: Bearer <token>` and is compared in constant time.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bulkhead_fhir::{format_instant, IssueType};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::credentials::register_client;
use crate::error::ApiError;
use crate::negotiation::JsonBody;
use crate::state::AppState;
use axum::extract::{FromRequest, Request};
use axum::middleware::Next;

/// Checks the admin token; every admin handler calls it before reading anything else of the
/// request (a body is parsed only for a caller known to be the admin).
pub(crate) fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.config.admin_token else {
        return Err(ApiError::not_found("the admin API is disabled (no admin token configured)"));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, IssueType::Login, "missing or invalid admin token"))
    }
}

/// Middleware on every admin route: the token is checked before any extractor reads the path
/// or the body, so an unauthenticated caller learns nothing from how its request is parsed.
pub async fn admin_only(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match require_admin(&state, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// Tenant names are short identifiers: they appear in CLIs and logs.
pub fn valid_tenant_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `POST /admin/tenants` with `{"name": "..."}`.
pub async fn create_tenant(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    require_admin(&state, request.headers())?;
    let JsonBody(request) = JsonBody::from_request(request, &state).await?;
    let name = request.get("name").and_then(|name| name.as_str()).unwrap_or("").to_owned();
    if !valid_tenant_name(&name) {
        return Err(
            ApiError::bad_request(IssueType::Value, "tenant names are 1-64 letters, digits, '-', '_', '.'").at("name")
        );
    }
    let tenant = state.blocking(move |store| Ok(store.create_tenant(&name)?)).await?;
    Ok((StatusCode::CREATED, Json(json!({"name": tenant.name, "created": format_instant(tenant.created)})))
        .into_response())
}

pub async fn list_tenants(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_admin(&state, &headers)?;
    let tenants = state.blocking(|store| Ok(store.list_tenants()?)).await?;
    let tenants: Vec<_> =
        tenants.iter().map(|t| json!({"name": t.name, "created": format_instant(t.created)})).collect();
    Ok(Json(json!({"tenants": tenants})).into_response())
}

pub async fn create_client(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant_name): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&state, &headers)?;
    let (record, credentials) = state
        .blocking(move |store| {
            let tenant = store
                .tenant_by_name(&tenant_name)?
                .ok_or_else(|| ApiError::not_found(format!("no tenant '{tenant_name}'")))?;
            Ok(register_client(store, tenant.id)?)
        })
        .await?;
    tracing::info!(client_id = %record.client_id, tenant = %record.tenant_name, "client created");
    let body = json!({"client_id": record.client_id, "client_secret": credentials.client_secret, "tenant": record.tenant_name});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn list_clients(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant_name): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&state, &headers)?;
    let clients = state
        .blocking(move |store| {
            let tenant = store
                .tenant_by_name(&tenant_name)?
                .ok_or_else(|| ApiError::not_found(format!("no tenant '{tenant_name}'")))?;
            Ok(store.list_clients(tenant.id)?)
        })
        .await?;
    let clients: Vec<_> = clients
        .iter()
        .map(|c| json!({"client_id": c.client_id, "tenant": c.tenant_name, "revoked": c.revoked, "created": format_instant(c.created)}))
        .collect();
    Ok(Json(json!({"clients": clients})).into_response())
}

pub async fn revoke_client(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(client_id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&state, &headers)?;
    let revoked = state.blocking(move |store| Ok(store.revoke_client(&client_id)?)).await?;
    if !revoked {
        return Err(ApiError::not_found("no such client"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
