//! The access tokens `POST /auth/token` issues: JWTs signed by the server's token keys (HS256,
//! with the key's `kid`, header `typ` `at+jwt`), bound to the tenant, the client and the granted
//! scopes, short-lived. Only this server verifies them, so a symmetric key is enough, and the
//! keys rotate with the file-token keys (`bulkhead keys rotate`).

use std::time::Duration;

use bulkhead_export::token::{TokenError, TokenKeys};
use serde::{Deserialize, Serialize};

/// The header `typ` of access tokens (RFC 9068).
const ACCESS_TOKEN_TYPE: &str = "at+jwt";

/// The longest lifetime a client may be registered with. SMART asks for short-lived tokens;
/// an hour covers a conformance run that reuses one token.
pub const MAX_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// What an access token states, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessClaims {
    /// The `client_id`.
    pub sub: String,
    /// The tenant's id (`TenantId.0`).
    pub tenant: i64,
    /// The granted scopes, space-separated.
    pub scope: String,
    /// Issued at and expiry, Unix seconds; valid while `now < exp`.
    pub iat: i64,
    pub exp: i64,
    /// A random id, so two tokens issued in the same second differ.
    pub jti: String,
}

/// Why a presented access token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessTokenError {
    /// Not a token of this server (bad signature, unknown or retired key, not an access token).
    Invalid(TokenError),
    Expired,
}

/// Signs an access token for `client_id` of `tenant` with `scope`, valid for `ttl` from `now`.
pub fn issue(keys: &TokenKeys, client_id: &str, tenant: i64, scope: &str, ttl: Duration, now: i64) -> String {
    let claims = AccessClaims {
        sub: client_id.to_owned(),
        tenant,
        scope: scope.to_owned(),
        iat: now,
        exp: now.saturating_add(ttl.as_secs() as i64),
        jti: uuid::Uuid::new_v4().simple().to_string(),
    };
    keys.sign_jwt(ACCESS_TOKEN_TYPE, &claims)
}

/// Verifies a presented access token at `now`.
pub fn verify(keys: &TokenKeys, token: &str, now: i64) -> Result<AccessClaims, AccessTokenError> {
    let claims: AccessClaims = keys.verify_jwt(ACCESS_TOKEN_TYPE, token).map_err(AccessTokenError::Invalid)?;
    if claims.exp <= now {
        return Err(AccessTokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(kid: &str, secret: &[u8]) -> TokenKeys {
        TokenKeys::new(vec![(kid.into(), secret.to_vec())]).unwrap()
    }

    #[test]
    fn tokens_are_bound_signed_and_expire() {
        let keys = keys("k1", b"0123456789abcdef0123456789abcdef");
        let token = issue(&keys, "bh_1", 7, "system/*.rs", Duration::from_secs(300), 1_000);
        let claims = verify(&keys, &token, 1_299).unwrap();
        assert_eq!((claims.sub.as_str(), claims.tenant, claims.scope.as_str()), ("bh_1", 7, "system/*.rs"));
        assert_eq!(verify(&keys, &token, 1_300), Err(AccessTokenError::Expired));
        // Another server's key, or a key that was retired: refused.
        let other = keys_with("k1", b"another secret of thirty-two byte");
        assert!(matches!(verify(&other, &token, 1_000), Err(AccessTokenError::Invalid(TokenError::BadSignature))));
        let rotated = keys_with("k2", b"0123456789abcdef0123456789abcdef");
        assert!(matches!(verify(&rotated, &token, 1_000), Err(AccessTokenError::Invalid(TokenError::UnknownKey))));
        // A file token is not an access token.
        let file = bulkhead_export::token::FileRef {
            tenant: 7,
            record: [1; 16],
            file: 0,
            exp: 5_000,
            requires_credentials: true,
        };
        assert!(matches!(verify(&keys, &keys.sign(&file), 1_000), Err(AccessTokenError::Invalid(_))));
        // Two tokens of the same second differ.
        assert_ne!(token, issue(&keys, "bh_1", 7, "system/*.rs", Duration::from_secs(300), 1_000));
    }

    fn keys_with(kid: &str, secret: &[u8]) -> TokenKeys {
        keys(kid, secret)
    }
}
