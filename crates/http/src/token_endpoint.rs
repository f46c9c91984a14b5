//! `POST /auth/token`: SMART Backend Services (client_credentials grant, private_key_jwt client
//! authentication, RFC 7523), and `/.well-known/smart-configuration` that advertises it.
//!
//! An assertion is accepted when: its header names an accepted asymmetric `alg` (never `none`
//! or HMAC: a public key must not double as a shared secret) and a `kid`; `iss == sub ==` an
//! active registered client; `jku`, if present, is the client's registered JWKS URL; exactly one
//! registered key has that `kid` and fits the `alg`; the signature verifies; `aud` is this token
//! URL; `exp` is in the future and at most five minutes (plus leeway) ahead; and its `jti` was
//! never seen for this client while unexpired (recorded in the store, so every instance agrees).
//! A `client_id` form field is optional (the assertion names the client) but, if sent, must be
//! that client (RFC 7521 §4.2).
//! Every failure is `invalid_client` (401) and counts toward the failed-login limit.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::now_micros;
use bulkhead_store::{ClientRecord, ClientRegistration};
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{json, Value};

use crate::access_token::MAX_ACCESS_TOKEN_TTL;
use crate::jwks::{inline_keys, select_key};
use crate::log_value::log_value;
use crate::scopes::{parse_scopes, Grant};
use crate::state::AppState;
use crate::urls::base_url;

/// The token endpoint's path; its absolute URL is also the `aud` assertions must name.
pub const TOKEN_PATH: &str = "/auth/token";

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Algorithms accepted for client assertions (and advertised).
pub const ASSERTION_ALGORITHMS: [Algorithm; 4] =
    [Algorithm::RS384, Algorithm::ES384, Algorithm::RS256, Algorithm::ES256];

/// Clock skew allowed on `exp` and `nbf`, seconds.
const LEEWAY_SECONDS: i64 = 60;
/// How far ahead an assertion's `exp` may be (SMART: at most five minutes).
const MAX_ASSERTION_LIFETIME_SECONDS: i64 = 300;
/// Longest assertion read.
const MAX_ASSERTION_LEN: usize = 16 * 1024;

/// An RFC 6749 §5.2 error answer.
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
}

impl OAuthError {
    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError { status, code, description: description.into() }
    }

    fn invalid_request(description: impl Into<String>) -> OAuthError {
        OAuthError::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_client(description: impl Into<String>) -> OAuthError {
        OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }

    fn invalid_scope(description: impl Into<String>) -> OAuthError {
        OAuthError::new(StatusCode::BAD_REQUEST, "invalid_scope", description)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        tracing::info!(error = self.code, description = %log_value(&self.description), "token request refused");
        let body = json!({"error": self.code, "error_description": self.description});
        let mut response = no_store((self.status, body.to_string()).into_response());
        if self.status == StatusCode::UNAUTHORIZED {
            // Counted by the failed-login limit, like refused client headers.
            response.extensions_mut().insert(crate::login_limits::CredentialsRefused);
        }
        response
    }
}

/// Marks a token endpoint answer: its errors stay RFC 6749 JSON, not OperationOutcomes.
#[derive(Debug, Clone, Copy)]
pub struct OAuthAnswer;

/// JSON with `Cache-Control: no-store` (RFC 6749 §5.1).
fn no_store(mut response: Response) -> Response {
    response.extensions_mut().insert(OAuthAnswer);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// The token endpoint's absolute URL as a client reaching this server sees it.
pub fn token_url(state: &AppState, headers: &HeaderMap) -> String {
    format!("{}{TOKEN_PATH}", base_url(state, headers))
}

/// `POST /auth/token`.
pub async fn token(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    match issue_token(&state, &headers, &body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn issue_token(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Response, OAuthError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or("");
    if !content_type.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
        return Err(OAuthError::invalid_request("the body must be application/x-www-form-urlencoded"));
    }
    let form = parse_form(body)?;
    let field = |name: &str| form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    match field("grant_type") {
        None => return Err(OAuthError::invalid_request("grant_type is required")),
        Some("client_credentials") => {}
        Some(_) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            ))
        }
    }
    if field("client_assertion_type") != Some(JWT_BEARER) {
        return Err(OAuthError::invalid_request(format!("client_assertion_type must be {JWT_BEARER}")));
    }
    let assertion = field("client_assertion")
        .filter(|assertion| !assertion.is_empty())
        .ok_or_else(|| OAuthError::invalid_request("client_assertion is required"))?;
    let requested = field("scope").ok_or_else(|| OAuthError::invalid_request("scope is required"))?.to_owned();
    let audience = token_url(state, headers);
    let (client, registration) = verify_assertion(state, assertion, &audience).await?;
    // RFC 7521 §4.2: the assertion identifies the client; a client_id sent as well must agree.
    if field("client_id").is_some_and(|client_id| client_id != client.client_id) {
        return Err(OAuthError::invalid_client("client_id is not the client the assertion names"));
    }

    let requested = parse_scopes(&requested).map_err(OAuthError::invalid_scope)?;
    let registered = match registration.scopes.as_deref() {
        Some(text) => Some(parse_scopes(text).map_err(|error| {
            tracing::error!(client_id = %client.client_id, error = %error, "registered scopes do not parse");
            OAuthError::invalid_scope("the client's registered scopes are invalid")
        })?),
        None => None,
    };
    let granted = Grant::with_group_read(Grant::narrow(&requested, registered.as_deref()), registered.as_deref());
    if granted.is_empty() {
        return Err(OAuthError::invalid_scope("none of the requested scopes is allowed for this client"));
    }
    let scope = Grant::text(&granted);
    let ttl = registration
        .token_ttl_seconds
        .map(|seconds| std::time::Duration::from_secs(u64::from(seconds)))
        .unwrap_or(state.config.access_token_ttl)
        .min(MAX_ACCESS_TOKEN_TTL);
    let keys = state.token_keys.get();
    let now = crate::bulk::now_seconds();
    let access_token = crate::access_token::issue(&keys, &client.client_id, client.tenant.0, &scope, ttl, now);
    tracing::info!(client_id = %client.client_id, tenant = %client.tenant_name, scope = %scope, "access token issued");
    crate::audit::note_token_issue(client.tenant, &client.client_id, &scope);
    let body = json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": ttl.as_secs(),
        "scope": scope,
    });
    Ok(no_store((StatusCode::OK, body.to_string()).into_response()))
}

/// The form's fields; a field given twice is an error (RFC 6749 §3.2).
fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, OAuthError> {
    let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    for (index, (name, _)) in form.iter().enumerate() {
        if form[..index].iter().any(|(earlier, _)| earlier == name) {
            return Err(OAuthError::invalid_request(format!("{name} is given more than once")));
        }
    }
    Ok(form)
}

/// Verifies a client assertion (see the module docs) and returns its client.
async fn verify_assertion(
    state: &AppState,
    assertion: &str,
    audience: &str,
) -> Result<(ClientRecord, ClientRegistration), OAuthError> {
    if assertion.len() > MAX_ASSERTION_LEN {
        return Err(OAuthError::invalid_client("the client assertion is too long"));
    }
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| OAuthError::invalid_client("the client assertion is not a signed JWT with a supported alg"))?;
    if !ASSERTION_ALGORITHMS.contains(&header.alg) {
        return Err(OAuthError::invalid_client(format!(
            "alg {:?} is not accepted; use RS384 or ES384 (RS256 and ES256 are accepted too)",
            header.alg
        )));
    }
    if header.typ.as_deref().is_some_and(|typ| !typ.eq_ignore_ascii_case("JWT")) {
        return Err(OAuthError::invalid_client("the client assertion's typ must be JWT"));
    }
    let kid = header.kid.clone().ok_or_else(|| OAuthError::invalid_client("the client assertion has no kid"))?;
    // Unverified, only to find the client whose keys verify it; every claim is checked below.
    let unverified: Value = jsonwebtoken::dangerous::insecure_decode_claims(assertion)
        .map_err(|_| OAuthError::invalid_client("the client assertion's claims are not JSON"))?;
    let issuer = unverified
        .get("iss")
        .and_then(Value::as_str)
        .filter(|iss| !iss.is_empty() && iss.len() <= 128)
        .ok_or_else(|| OAuthError::invalid_client("the client assertion has no iss"))?
        .to_owned();
    let lookup = issuer.clone();
    let found = state
        .blocking(move |store| Ok((store.client(&lookup)?, store.client_registration(&lookup)?)))
        .await
        .map_err(|_| OAuthError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal server error"))?;
    let (Some(client), Some(registration)) = found else {
        return Err(OAuthError::invalid_client("unknown client"));
    };
    if client.revoked {
        return Err(OAuthError::invalid_client("unknown client"));
    }
    let keys = match (&registration.jwks, &registration.jwks_url, &header.jku) {
        (_, Some(url), Some(jku)) if jku != url => {
            return Err(OAuthError::invalid_client("the jku header is not the client's registered JWKS URL"))
        }
        (_, None, Some(_)) => {
            return Err(OAuthError::invalid_client("the client registered no JWKS URL, but the assertion names a jku"))
        }
        (_, Some(url), _) => state.jwks.keys(url, &kid).await.map_err(OAuthError::invalid_client)?,
        (Some(inline), None, None) => inline_keys(inline).map_err(OAuthError::invalid_client)?,
        (None, None, None) => return Err(OAuthError::invalid_client("the client has no registered keys")),
    };
    let key = select_key(&keys, &kid, header.alg).map_err(OAuthError::invalid_client)?;
    let mut validation = Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|error| OAuthError::invalid_client(format!("the client assertion does not verify: {error}")))?
        .claims;
    check_claims(&claims, &client.client_id, audience, crate::bulk::now_seconds())?;
    let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
    let exp = claims["exp"].as_i64().unwrap_or_default();
    let (tenant, client_id) = (client.tenant, client.client_id.clone());
    let fresh = state
        .blocking(move |store| {
            let expires = (exp + LEEWAY_SECONDS).saturating_mul(1_000_000);
            Ok(store.record_assertion_jti(tenant, &client_id, &jti, expires, now_micros())?)
        })
        .await
        .map_err(|_| OAuthError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal server error"))?;
    if !fresh {
        return Err(OAuthError::invalid_client("this client assertion's jti was used before"));
    }
    Ok((client, registration))
}

/// The claim checks of RFC 7523 §3 and SMART client-confidential-asymmetric.
fn check_claims(claims: &Value, client_id: &str, audience: &str, now: i64) -> Result<(), OAuthError> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("iss") != Some(client_id) || text("sub") != Some(client_id) {
        return Err(OAuthError::invalid_client("iss and sub must both be the client_id"));
    }
    let normalise = |url: &str| url.trim_end_matches('/').to_owned();
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => normalise(aud) == normalise(audience),
        Some(Value::Array(auds)) => {
            auds.iter().filter_map(Value::as_str).any(|aud| normalise(aud) == normalise(audience))
        }
        _ => false,
    };
    if !audience_ok {
        return Err(OAuthError::invalid_client(format!("aud must be the token URL {audience}")));
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| OAuthError::invalid_client("exp is required (seconds since the epoch)"))?;
    if exp + LEEWAY_SECONDS <= now {
        return Err(OAuthError::invalid_client("the client assertion has expired"));
    }
    if exp > now + MAX_ASSERTION_LIFETIME_SECONDS + LEEWAY_SECONDS {
        return Err(OAuthError::invalid_client("exp may be at most five minutes ahead"));
    }
    if let Some(nbf) = claims.get("nbf") {
        if nbf.as_i64().is_none_or(|nbf| nbf > now + LEEWAY_SECONDS) {
            return Err(OAuthError::invalid_client("the client assertion is not valid yet (nbf)"));
        }
    }
    if text("jti").is_none_or(|jti| jti.is_empty() || jti.len() > 256) {
        return Err(OAuthError::invalid_client("jti is required (at most 256 characters)"));
    }
    Ok(())
}

/// `GET [base]/.well-known/smart-configuration` (SMART App Launch 2.2 §conformance): JSON
/// whatever the `Accept` header says.
pub async fn smart_configuration(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let algorithms: Vec<String> = ASSERTION_ALGORITHMS.iter().map(|alg| format!("{alg:?}")).collect();
    let scopes: Vec<String> = ["*", "Patient", "Group", "Observation"]
        .iter()
        .flat_map(|t| [format!("system/{t}.rs"), format!("system/{t}.read"), format!("system/{t}.cruds")])
        .collect();
    let body = json!({
        "token_endpoint": token_url(&state, &headers),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": algorithms,
        "scopes_supported": scopes,
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        "code_challenge_methods_supported": ["S256"],
    });
    let mut response = (StatusCode::OK, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUD: &str = "http://127.0.0.1:8080/auth/token";
    const NOW: i64 = 1_800_000_000;

    fn claims() -> Value {
        json!({"iss": "bh_1", "sub": "bh_1", "aud": AUD, "exp": NOW + 300, "jti": "j1"})
    }

    fn refused(claims: Value) -> String {
        check_claims(&claims, "bh_1", AUD, NOW).expect_err("refused").description
    }

    #[test]
    fn claims_are_checked() {
        assert!(check_claims(&claims(), "bh_1", AUD, NOW).is_ok());
        let mut trailing_slash = claims();
        trailing_slash["aud"] = json!(format!("{AUD}/"));
        assert!(check_claims(&trailing_slash, "bh_1", AUD, NOW).is_ok());
        let mut listed = claims();
        listed["aud"] = json!(["other", AUD]);
        assert!(check_claims(&listed, "bh_1", AUD, NOW).is_ok());
        let with = |key: &str, value: Value| {
            let mut claims = claims();
            claims[key] = value;
            claims
        };
        assert!(refused(with("aud", json!("http://elsewhere/auth/token"))).contains("aud"));
        assert!(refused(with("sub", json!("bh_2"))).contains("iss and sub"));
        assert!(refused(with("exp", json!(NOW - 61))).contains("expired"));
        assert!(check_claims(&with("exp", json!(NOW - 30)), "bh_1", AUD, NOW).is_ok(), "within the leeway");
        assert!(refused(with("exp", json!(NOW + 301 + LEEWAY_SECONDS))).contains("five minutes"));
        assert!(refused(with("exp", json!("soon"))).contains("exp"));
        assert!(refused(with("nbf", json!(NOW + 600))).contains("nbf"));
        assert!(refused(with("jti", json!(""))).contains("jti"));
        let mut no_jti = claims();
        no_jti.as_object_mut().unwrap().remove("jti");
        assert!(refused(no_jti).contains("jti"));
    }
}
