//! The admin API under `/admin`: tenants and clients. Off unless an admin token is configured;
//! the token comes as `Authorization: Bearer <token>` and is compared in constant time.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bulkhead_fhir::{format_instant, IssueType};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::negotiation::JsonBody;
use crate::registration::create_client as create_client_with;
use crate::state::AppState;
use axum::extract::{FromRequest, Request};
use axum::middleware::Next;
use bulkhead_store::ClientRegistration;

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
    crate::audit::note_admin(tenant.id, "tenant.create", &tenant.name);
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
    Path(tenant_name): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    require_admin(&state, request.headers())?;
    let registration = client_registration(&state, request).await?;
    let allow_http = state.config.allow_http_jwks_urls;
    let (record, credentials) = state
        .blocking(move |store| {
            let tenant = store
                .tenant_by_name(&tenant_name)?
                .ok_or_else(|| ApiError::not_found(format!("no tenant '{tenant_name}'")))?;
            create_client_with(store, tenant.id, registration.as_ref(), allow_http)
        })
        .await?;
    tracing::info!(client_id = %record.client_id, tenant = %record.tenant_name, "client created");
    crate::audit::note_admin(record.tenant, "client.create", &record.client_id);
    let body = json!({"client_id": record.client_id, "client_secret": credentials.client_secret, "tenant": record.tenant_name});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The optional SMART registration in a client-creation body: `{"jwks": {...}}` or
/// `{"jwks_url": "..."}`, `"scopes": "system/*.rs ..."`, `"token_ttl_seconds": 300`. No body: a
/// client-headers client with full access to its tenant.
async fn client_registration(state: &AppState, request: Request) -> Result<Option<ClientRegistration>, ApiError> {
    let bytes = axum::body::to_bytes(request.into_body(), state.config.max_body_bytes)
        .await
        .map_err(|_| ApiError::bad_request(IssueType::Invalid, "the request body could not be read"))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let body: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|error| ApiError::bad_request(IssueType::Invalid, format!("the body is not JSON: {error}")))?;
    let field_error = |name: &str, what: &str| {
        ApiError::bad_request(IssueType::Value, format!("{name} must be {what}")).at(name.to_owned())
    };
    let jwks = match body.get("jwks") {
        None | Some(serde_json::Value::Null) => None,
        Some(set @ serde_json::Value::Object(_)) => Some(set.to_string()),
        Some(_) => return Err(field_error("jwks", "a JWK Set object")),
    };
    let text = |name: &str| -> Result<Option<String>, ApiError> {
        match body.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(field_error(name, "a string")),
        }
    };
    let token_ttl_seconds = match body.get("token_ttl_seconds") {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| field_error("token_ttl_seconds", "a number of seconds"))?,
        ),
    };
    let registration =
        ClientRegistration { jwks, jwks_url: text("jwks_url")?, scopes: text("scopes")?, token_ttl_seconds };
    Ok((registration != ClientRegistration::default()).then_some(registration))
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
    // The client's tenant is looked up first: the revocation is recorded in its audit trail.
    let revoked = state
        .blocking(move |store| {
            let client = store.client(&client_id)?;
            Ok(match client {
                Some(client) if store.revoke_client(&client.client_id)? => Some(client),
                _ => None,
            })
        })
        .await?;
    let Some(client) = revoked else { return Err(ApiError::not_found("no such client")) };
    crate::audit::note_admin(client.tenant, "client.revoke", &client.client_id);
    Ok(StatusCode::NO_CONTENT.into_response())
}
