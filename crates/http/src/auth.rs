//! Who is calling, and whether the route allows it: the one place every route's authentication
//! and authorisation is decided ([`authorize`], also the [`Caller`] extractor).
//!
//! Three ways in, side by side on every route: client headers (1upHealth style: `client_id` +
//! `client_secret`, optional `x-oneup-user-id`), the same credentials as HTTP Basic, and a
//! bearer access token from `POST /auth/token` (SMART Backend Services). Credentials identify
//! the tenant. What the caller may then do is its [`Grant`]: the token's scopes, or for client
//! credentials the client's registered scopes (none registered: the whole tenant).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bulkhead_fhir::IssueType;
use bulkhead_store::{TenantId, Visibility};

use crate::access_token::AccessTokenError;
use crate::credentials::MAX_SECRET_LEN;
use crate::error::ApiError;
use crate::log_value::log_value;
use crate::scopes::{parse_scopes, Access, Grant};
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
    /// What the caller may do in the tenant.
    pub grant: Grant,
    /// How the caller authenticated.
    pub method: AuthMethod,
}

/// How a caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `client_id` and `client_secret` headers.
    ClientHeaders,
    /// `Authorization: Basic` with the same credentials.
    Basic,
    /// `Authorization: Bearer` with an access token of this server.
    Bearer,
}

impl Caller {
    /// The user new resources belong to (`None`: the tenant).
    pub fn owner(&self) -> Option<&str> {
        self.visibility.user()
    }

    /// 403 unless the caller's grant allows `access` on `resource_type`.
    pub fn require(&self, resource_type: &str, access: Access) -> Result<(), ApiError> {
        if self.grant.permits(resource_type, access) {
            return Ok(());
        }
        Err(forbidden(format!("the client's scopes do not allow {access} on {resource_type}")))
    }

    /// 403 unless the caller's grant allows `access` on every resource type.
    pub fn require_every_type(&self, access: Access) -> Result<(), ApiError> {
        if self.grant.permits_every_type(access) {
            return Ok(());
        }
        Err(forbidden(format!("the client's scopes do not allow {access} on every resource type")))
    }
}

fn forbidden(diagnostics: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, IssueType::Forbidden, diagnostics)
}

/// What a route needs beyond an authenticated caller, decided from the method and path alone.
#[derive(Debug, PartialEq, Eq)]
enum RouteAccess {
    /// One interaction on one type.
    On(String, Access),
    /// A Bundle: each entry is checked as it is planned (`bundle.rs`).
    PerEntry,
    /// An NDJSON upload may write any type: create and update on every type.
    Upload,
    /// An export kick-off: read on Group and on each exported type (`bulk.rs`).
    Export,
    /// Status, cancel and file downloads: only the client that started the export (checked
    /// against the job or file record).
    StartingClient,
    /// Anything else: the whole tenant.
    Everything,
}

/// The access a FHIR route needs.
fn route_access(method: &Method, path: &str) -> RouteAccess {
    let rest = path.strip_prefix("/bulk-data/r4").or_else(|| path.strip_prefix("/r4")).unwrap_or(path);
    let segments: Vec<&str> = rest.split('/').filter(|segment| !segment.is_empty()).collect();
    let on = |resource_type: &str, access| RouteAccess::On(resource_type.to_owned(), access);
    match (method.as_str(), segments.as_slice()) {
        ("POST", []) => RouteAccess::PerEntry,
        ("GET" | "POST", ["$export"] | [_, "$export"] | [_, _, "$export"]) => RouteAccess::Export,
        (_, ["$export-status", ..] | ["$export", ..]) => RouteAccess::StartingClient,
        ("POST", ["$upload-ndjson"]) => RouteAccess::Upload,
        ("GET", [resource_type]) => on(resource_type, Access::Search),
        ("POST", [resource_type]) => on(resource_type, Access::Create),
        ("GET", [resource_type, _, ..]) => on(resource_type, Access::Read),
        ("PUT" | "PATCH", [resource_type, _]) => on(resource_type, Access::Update),
        ("DELETE", [resource_type, _]) => on(resource_type, Access::Delete),
        _ => RouteAccess::Everything,
    }
}

/// Authenticates the request and checks that its route is within the caller's grant: every
/// authenticated FHIR route goes through here (handlers take a [`Caller`] or call this).
pub async fn authorize(state: &AppState, method: &Method, path: &str, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let caller = authenticate(state, headers).await?;
    match route_access(method, path) {
        RouteAccess::On(resource_type, access) => caller.require(&resource_type, access)?,
        RouteAccess::Upload => {
            caller.require_every_type(Access::Create)?;
            caller.require_every_type(Access::Update)?;
        }
        RouteAccess::Everything => {
            for access in [Access::Create, Access::Read, Access::Update, Access::Delete, Access::Search] {
                caller.require_every_type(access)?;
            }
        }
        RouteAccess::PerEntry | RouteAccess::Export | RouteAccess::StartingClient => {}
    }
    Ok(caller)
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

/// The credentials a request presents.
enum Presented<'a> {
    Secret { client_id: String, secret: String, method: AuthMethod },
    Bearer(&'a str),
    Nothing,
}

/// Reads the credentials of a request: client headers, or an `Authorization` header (Basic or
/// Bearer). Both kinds at once are refused: which one counts would be a guess.
fn presented(headers: &HeaderMap) -> Result<Presented<'_>, ApiError> {
    let client_id = credential_header(headers, &["client_id", "client-id"])?;
    let secret = credential_header(headers, &["client_secret", "client-secret"])?;
    let authorization = credential_header_with_spaces(headers)?;
    if let Some(authorization) = authorization {
        if client_id.is_some() || secret.is_some() {
            return Err(malformed("authorization", "send either client headers or an Authorization header, not both"));
        }
        let (scheme, value) = authorization.split_once(' ').unwrap_or((authorization, ""));
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return Ok(if value.is_empty() { Presented::Nothing } else { Presented::Bearer(value) });
        }
        if scheme.eq_ignore_ascii_case("basic") {
            return basic_credentials(value);
        }
        return Err(ApiError::unauthorized());
    }
    match (client_id, secret) {
        (Some(client_id), Some(secret)) => Ok(Presented::Secret {
            client_id: client_id.to_owned(),
            secret: secret.to_owned(),
            method: AuthMethod::ClientHeaders,
        }),
        _ => Ok(Presented::Nothing),
    }
}

/// `Basic base64(client_id:client_secret)`, each part form-urlencoded (RFC 6749 §2.3.1).
fn basic_credentials(value: &str) -> Result<Presented<'static>, ApiError> {
    let decoded = STANDARD.decode(value).map_err(|_| ApiError::unauthorized())?;
    let text = String::from_utf8(decoded).map_err(|_| ApiError::unauthorized())?;
    let (id, secret) = text.split_once(':').ok_or_else(ApiError::unauthorized)?;
    let unescape = |part: &str| -> String {
        form_urlencoded::parse(format!("x={part}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default()
    };
    let (id, secret) = (unescape(id), unescape(secret));
    if id.is_empty() || secret.is_empty() {
        return Err(ApiError::unauthorized());
    }
    Ok(Presented::Secret { client_id: id, secret, method: AuthMethod::Basic })
}

/// The `Authorization` header (one value, visible ASCII and spaces), if any.
fn credential_header_with_spaces(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(malformed("authorization", "the Authorization header is given more than once"));
    }
    let bytes = value.as_bytes();
    if bytes.len() > 16 * 1024 || !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(malformed("authorization", "the Authorization header must be visible ASCII characters"));
    }
    Ok(Some(std::str::from_utf8(bytes).map_err(|_| malformed("authorization", "not ASCII"))?.trim()))
}

/// Authenticates a request by whichever credentials it presents.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let visibility = visibility(headers)?;
    let caller = match presented(headers)? {
        Presented::Nothing => return Err(ApiError::unauthorized()),
        Presented::Secret { client_id, secret, method } => {
            secret_caller(state, &client_id, secret, method, visibility).await?
        }
        Presented::Bearer(token) => bearer_caller(state, token, visibility).await?,
    };
    crate::access_log::record_caller(&caller);
    crate::audit::record_caller(&caller);
    crate::quotas::admit_request(state, &caller)?;
    Ok(caller)
}

/// A caller by client id and secret (headers or Basic).
async fn secret_caller(
    state: &AppState,
    client_id: &str,
    secret: String,
    method: AuthMethod,
    visibility: Visibility,
) -> Result<Caller, ApiError> {
    if client_id.len() > MAX_CLIENT_ID_LEN || secret.len() > MAX_SECRET_LEN {
        tracing::info!(client_id = %log_value(client_id), "authentication failed: oversized credentials");
        return Err(ApiError::unauthorized());
    }
    let verifier = state.verifier.clone();
    let lookup_id = client_id.to_owned();
    // One blocking task for the lookup and the check (a legacy Argon2 row is slow to check).
    let found = state
        .blocking(move |store| {
            let record = verifier.check(store, &lookup_id, &secret)?;
            let registration = match &record {
                Some(_) => store.client_registration(&lookup_id)?,
                None => None,
            };
            Ok(record.map(|record| (record, registration)))
        })
        .await?;
    let Some((record, registration)) = found else {
        tracing::info!(client_id = %log_value(client_id), "authentication failed");
        return Err(ApiError::unauthorized());
    };
    let grant = match registration.and_then(|registration| registration.scopes) {
        Some(scopes) => Grant::Scopes(parse_scopes(&scopes).map_err(|error| {
            tracing::error!(client_id = %record.client_id, error = %error, "registered scopes do not parse");
            ApiError::internal()
        })?),
        None => Grant::Full,
    };
    Ok(Caller {
        tenant: record.tenant,
        tenant_name: record.tenant_name,
        client_id: record.client_id,
        visibility,
        grant,
        method,
    })
}

/// A caller by access token: a token of this server, unexpired, of a client that is still
/// active in the token's tenant.
async fn bearer_caller(state: &AppState, token: &str, visibility: Visibility) -> Result<Caller, ApiError> {
    let keys = state.token_keys.get();
    let claims = match crate::access_token::verify(&keys, token, crate::bulk::now_seconds()) {
        Ok(claims) => claims,
        Err(AccessTokenError::Expired) => {
            tracing::info!("authentication failed: expired access token");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                IssueType::Login,
                "the access token has expired; request a new one from the token endpoint",
            ));
        }
        Err(AccessTokenError::Invalid(error)) => {
            tracing::info!(error = %error, "authentication failed: invalid access token");
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, IssueType::Login, "invalid access token"));
        }
    };
    let lookup = claims.sub.clone();
    let record = state.blocking(move |store| Ok(store.client(&lookup)?)).await?;
    let Some(record) = record.filter(|record| !record.revoked && record.tenant.0 == claims.tenant) else {
        tracing::info!(client_id = %log_value(&claims.sub), "authentication failed: the token's client is revoked");
        return Err(ApiError::unauthorized());
    };
    let grant = Grant::Scopes(parse_scopes(&claims.scope).map_err(|_| ApiError::unauthorized())?);
    Ok(Caller {
        tenant: record.tenant,
        tenant_name: record.tenant_name,
        client_id: record.client_id,
        visibility,
        grant,
        method: AuthMethod::Bearer,
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        authorize(state, &parts.method, parts.uri.path(), &parts.headers).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fhir_route_needs_the_right_access() {
        let access = |method: Method, path: &str| route_access(&method, path);
        let on = |resource_type: &str, access| RouteAccess::On(resource_type.into(), access);
        assert_eq!(access(Method::GET, "/r4/Observation"), on("Observation", Access::Search));
        assert_eq!(access(Method::POST, "/r4/Observation"), on("Observation", Access::Create));
        assert_eq!(access(Method::GET, "/r4/Patient/p1"), on("Patient", Access::Read));
        assert_eq!(access(Method::GET, "/r4/Patient/p1/_history"), on("Patient", Access::Read));
        assert_eq!(access(Method::GET, "/r4/Patient/p1/_history/2"), on("Patient", Access::Read));
        assert_eq!(access(Method::PUT, "/r4/Patient/p1"), on("Patient", Access::Update));
        assert_eq!(access(Method::DELETE, "/r4/Patient/p1"), on("Patient", Access::Delete));
        assert_eq!(access(Method::POST, "/r4"), RouteAccess::PerEntry);
        assert_eq!(access(Method::POST, "/r4/$upload-ndjson"), RouteAccess::Upload);
        assert_eq!(access(Method::GET, "/r4/Group/g1/$export"), RouteAccess::Export);
        assert_eq!(access(Method::GET, "/bulk-data/r4/Group/g1/$export"), RouteAccess::Export);
        assert_eq!(access(Method::POST, "/r4/Group/g1/$export"), RouteAccess::Export);
        assert_eq!(access(Method::GET, "/r4/$export"), RouteAccess::Export);
        assert_eq!(access(Method::POST, "/bulk-data/r4/Patient/$export"), RouteAccess::Export);
        assert_eq!(access(Method::GET, "/bulk-data/r4/$export-status/j"), RouteAccess::StartingClient);
        assert_eq!(access(Method::DELETE, "/r4/$export-status/j"), RouteAccess::StartingClient);
        assert_eq!(access(Method::GET, "/bulk-data/r4/$export/Patient/t.ndjson"), RouteAccess::StartingClient);
        assert_eq!(access(Method::PATCH, "/r4/Patient"), RouteAccess::Everything);
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let encoded = STANDARD.encode("bh_1:a%2Bb+c");
        let Presented::Secret { client_id, secret, method } = basic_credentials(&encoded).unwrap() else {
            panic!("credentials expected")
        };
        assert_eq!((client_id.as_str(), secret.as_str(), method), ("bh_1", "a+b c", AuthMethod::Basic));
        assert!(basic_credentials("!!!").is_err());
        assert!(basic_credentials(&STANDARD.encode("no-colon")).is_err());
        assert!(basic_credentials(&STANDARD.encode(":secret")).is_err());
    }
}
