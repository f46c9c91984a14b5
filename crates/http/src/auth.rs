//! Client-header authentication (1upHealth style): `client_id` + `client_secret` on every
//! request, optional `x-oneup-user-id`. Credentials identify the tenant.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use bulkhead_fhir::IssueType;
use bulkhead_store::{TenantId, Visibility};

use crate::credentials::MAX_SECRET_LEN;
use crate::error::ApiError;
use crate::log_value::log_value;
use crate::state::AppState;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: TenantId,
    /// The tenant's name (per-tenant settings are keyed by it).
    pub tenant_name: String,
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

/// The longest `client_id` compared (generated ones are 19 characters).
const MAX_CLIENT_ID_LEN: usize = 128;

fn malformed(name: &str, diagnostics: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, IssueType::Value, diagnostics).at(name.to_owned())
}

/// The one value of a credential header known under any of `names`: `None` when absent, a 400
/// when it is not visible ASCII or when it is given more than once with different values. A
/// malformed credential is refused, never treated as absent: absent can mean a wider scope.
fn credential_header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Result<Option<&'a str>, ApiError> {
    let mut found: Option<&'a str> = None;
    for name in names {
        for value in headers.get_all(*name) {
            let bytes = value.as_bytes();
            if bytes.is_empty() || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
                return Err(malformed(name, format!("the {name} header must be visible ASCII characters")));
            }
            let text = std::str::from_utf8(bytes).map_err(|_| malformed(name, "not ASCII"))?;
            match found {
                Some(previous) if previous != text => {
                    return Err(malformed(
                        name,
                        format!("the {name} header is given more than once with different values"),
                    ));
                }
                _ => found = Some(text),
            }
        }
    }
    Ok(found)
}

/// The user scope from `x-oneup-user-id`: absent or `client` means the whole tenant.
fn visibility(headers: &HeaderMap) -> Result<Visibility, ApiError> {
    let Some(user) = credential_header(headers, &["x-oneup-user-id"])? else { return Ok(Visibility::Tenant) };
    if user.eq_ignore_ascii_case("client") {
        return Ok(Visibility::Tenant);
    }
    let valid = (1..=64).contains(&user.len())
        && user.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !valid {
        return Err(malformed(
            "x-oneup-user-id",
            "x-oneup-user-id must be 'client' or a user id of 1-64 letters, digits, '-', '.', '_'",
        ));
    }
    Ok(Visibility::User(user.to_owned()))
}

/// Checks the client headers against the store.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let client_id = credential_header(headers, &["client_id", "client-id"])?;
    let secret = credential_header(headers, &["client_secret", "client-secret"])?;
    let visibility = visibility(headers)?;
    let (Some(client_id), Some(secret)) = (client_id, secret) else {
        return Err(ApiError::unauthorized());
    };
    if client_id.len() > MAX_CLIENT_ID_LEN || secret.len() > MAX_SECRET_LEN {
        tracing::info!(client_id = %log_value(client_id), "authentication failed: oversized credentials");
        return Err(ApiError::unauthorized());
    }
    let verifier = state.verifier.clone();
    let (lookup_id, secret) = (client_id.to_owned(), secret.to_owned());
    // One blocking task for the lookup and the check (a legacy Argon2 row is slow to check).
    let record = state.blocking(move |store| Ok(verifier.check(store, &lookup_id, &secret)?)).await?;
    let Some(record) = record else {
        tracing::info!(client_id = %log_value(client_id), "authentication failed");
        return Err(ApiError::unauthorized());
    };
    let caller =
        Caller { tenant: record.tenant, tenant_name: record.tenant_name, client_id: record.client_id, visibility };
    crate::access_log::record_caller(&caller);
    crate::quotas::admit_request(state, &caller)?;
    Ok(caller)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        authenticate(state, &parts.headers).await
    }
}
