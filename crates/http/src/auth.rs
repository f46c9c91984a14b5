//! Client-header authentication (1upHealth style): `client_id` + `client_secret` on every
//! request, optional `x-oneup-user-id`. Credentials identify the tenant.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use bulkhead_fhir::IssueType;
use bulkhead_store::{TenantId, Visibility};

use crate::error::ApiError;
use crate::state::AppState;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: TenantId,
    pub client_id: String,
    /// What the caller may read: a user's resources or the whole tenant.
    pub visibility: Visibility,
}

impl Caller {
    /// The user new resources belong to (`None`: the tenant).
    pub fn owner(&self) -> Option<&str> {
        self.visibility.user()
    }
}

fn header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|name| headers.get(*name)).and_then(|value| value.to_str().ok())
}

/// The user scope from `x-oneup-user-id`: absent or `client` means the whole tenant.
fn visibility(headers: &HeaderMap) -> Result<Visibility, ApiError> {
    let Some(user) = header(headers, &["x-oneup-user-id"]) else { return Ok(Visibility::Tenant) };
    let user = user.trim();
    if user.eq_ignore_ascii_case("client") {
        return Ok(Visibility::Tenant);
    }
    let valid = (1..=64).contains(&user.len())
        && user.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !valid {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::Value,
            "x-oneup-user-id must be 'client' or a user id of 1-64 letters, digits, '-', '.', '_'",
        )
        .at("x-oneup-user-id"));
    }
    Ok(Visibility::User(user.to_owned()))
}

/// Checks the client headers against the store.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let client_id = header(headers, &["client_id", "client-id"]).map(str::to_owned);
    let secret = header(headers, &["client_secret", "client-secret"]).map(str::to_owned);
    let (Some(client_id), Some(secret)) = (client_id, secret) else {
        return Err(ApiError::unauthorized());
    };
    let visibility = visibility(headers)?;
    let verifier = state.verifier.clone();
    let lookup_id = client_id.clone();
    // One blocking task for the lookup and the check (Argon2 is deliberately slow).
    let tenant = state
        .blocking(move |store| {
            let record = store.client(&lookup_id)?.filter(|record| !record.revoked);
            Ok(record
                .filter(|record| verifier.verify(&lookup_id, &secret, &record.secret_hash))
                .map(|record| record.tenant))
        })
        .await?;
    let Some(tenant) = tenant else {
        tracing::info!(client_id = %client_id, "authentication failed");
        return Err(ApiError::unauthorized());
    };
    Ok(Caller { tenant, client_id, visibility })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        authenticate(state, &parts.headers).await
    }
}
