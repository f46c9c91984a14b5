//! Registering a client for SMART Backend Services: its keys (an inline JWKS or a JWKS URL), the
//! scopes it is pre-authorised for and its token lifetime, checked the same way for the CLI and
//! the admin API.

use bulkhead_store::{ClientRecord, ClientRegistration, Store, TenantId};

use crate::access_token::MAX_ACCESS_TOKEN_TTL;
use crate::credentials::{register_client, NewCredentials};
use crate::error::ApiError;
use crate::jwks::{check_jwks, check_jwks_url};
use crate::scopes::parse_scopes;

/// Checks a registration before it is stored; the error says what to fix.
pub fn check_registration(registration: &ClientRegistration, allow_http_jwks_urls: bool) -> Result<(), String> {
    if registration.jwks.is_some() && registration.jwks_url.is_some() {
        return Err("register either an inline JWKS or a JWKS URL, not both".into());
    }
    if let Some(jwks) = &registration.jwks {
        check_jwks(jwks)?;
    }
    if let Some(url) = &registration.jwks_url {
        check_jwks_url(url, allow_http_jwks_urls)?;
    }
    if let Some(scopes) = &registration.scopes {
        parse_scopes(scopes)?;
    }
    if let Some(seconds) = registration.token_ttl_seconds {
        let longest = MAX_ACCESS_TOKEN_TTL.as_secs();
        if seconds == 0 || u64::from(seconds) > longest {
            return Err(format!("the token lifetime must be 1 to {longest} seconds"));
        }
    }
    Ok(())
}

/// Creates a client of `tenant` (a generated id and secret) with `registration`, checked first.
pub fn create_client(
    store: &dyn Store,
    tenant: TenantId,
    registration: Option<&ClientRegistration>,
    allow_http_jwks_urls: bool,
) -> Result<(ClientRecord, NewCredentials), ApiError> {
    if let Some(registration) = registration {
        check_registration(registration, allow_http_jwks_urls)
            .map_err(|error| ApiError::bad_request(bulkhead_fhir::IssueType::Value, error))?;
    }
    let (record, credentials) = register_client(store, tenant)?;
    if let Some(registration) = registration {
        store.set_client_registration(&record.client_id, registration)?;
    }
    Ok((record, credentials))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_checked() {
        let jwks = r#"{"keys":[{"kty":"EC","crv":"P-384","kid":"a","x":"AAAA","y":"AAAA"}]}"#;
        let ok = ClientRegistration {
            jwks: Some(jwks.into()),
            scopes: Some("system/*.rs".into()),
            token_ttl_seconds: Some(300),
            ..Default::default()
        };
        assert!(check_registration(&ok, false).is_ok());
        let both = ClientRegistration { jwks_url: Some("https://keys.example/jwks".into()), ..ok.clone() };
        assert!(check_registration(&both, false).is_err());
        let bad_scope = ClientRegistration { scopes: Some("patient/*.read".into()), ..ok.clone() };
        assert!(check_registration(&bad_scope, false).is_err());
        let long = ClientRegistration { token_ttl_seconds: Some(86_400), ..ok.clone() };
        assert!(check_registration(&long, false).is_err());
        let plain = ClientRegistration { jwks: None, jwks_url: Some("http://keys.example/jwks".into()), ..ok };
        assert!(check_registration(&plain, false).is_err());
        assert!(check_registration(&plain, true).is_ok());
    }
}
