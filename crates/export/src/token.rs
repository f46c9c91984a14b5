//! Signed, expiring file tokens: the `{token}` in `/bulk-data/r4/$export/{Type}/{token}.ndjson`.
//!
//! Like 1upHealth's file URLs, a token is an HS256 JWT whose claims state everything needed to
//! produce the file (tenant, client, group, key range, filters), so downloads need no job
//! table. Unlike 1upHealth's, it expires (`exp`) and records the filters and the group, so a
//! download reproduces exactly what the manifest announced.
//!
//! Tokens are deterministic: the same claims and key give the same string (fixed JSON field
//! order, no nonce), which keeps manifest URLs stable. They are URL-path safe: base64url
//! without padding uses only `[A-Za-z0-9_-]`, plus the two `.` separators.
//!
//! Keys carry a `kid` so secrets can rotate: the first key signs, every configured key verifies.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The only algorithm accepted. Checking it explicitly blocks `alg: none` and algorithm swaps.
const ALG: &str = "HS256";

/// Longest kid accepted by [`TokenKeys::new`].
const MAX_KID_LEN: usize = 32;

/// Tokens longer than this are refused before any decoding, so a hostile URL cannot make us
/// decode and hash megabytes. Real tokens are a few hundred bytes.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Which manifest list a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// `output[]`: resources of one type.
    Output,
    /// `deleted[]`: Bundles of deleted-resource entries.
    Deleted,
    /// `error[]`: OperationOutcomes.
    Error,
}

/// The claims of a file token.
///
/// JSON field names are shortened (shown in brackets) because a large export lists thousands
/// of URLs; `None` options are left out for the same reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileClaims {
    /// [`t`] Tenant id (`TenantId.0`).
    #[serde(rename = "t")]
    pub tenant: i64,
    /// [`c`] The `client_id` that started the export; only it may download.
    #[serde(rename = "c")]
    pub client: String,
    /// [`u`] User scope (`x-oneup-user-id`), or `None` for the whole tenant.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// [`g`] Group id.
    #[serde(rename = "g")]
    pub group: String,
    /// [`gv`] Group version the export was planned against.
    #[serde(rename = "gv")]
    pub group_version: i64,
    /// [`k`] `output`, `deleted` or `error`.
    #[serde(rename = "k")]
    pub kind: FileKind,
    /// [`rt`] Resource type of the file's contents.
    #[serde(rename = "rt")]
    pub resource_type: String,
    /// [`s`] First key of the file's range (inclusive).
    #[serde(rename = "s")]
    pub start: i64,
    /// [`e`] Last key of the file's range (inclusive).
    #[serde(rename = "e")]
    pub end: i64,
    /// [`n`] Resources in the file when the manifest was made.
    #[serde(rename = "n")]
    pub total: u64,
    /// [`si`] `_since`, µs since the epoch.
    #[serde(rename = "si", default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// [`un`] `_until`, µs since the epoch.
    #[serde(rename = "un", default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// [`tt`] The manifest's `transactionTime`, µs since the epoch.
    #[serde(rename = "tt")]
    pub transaction_time: i64,
    /// [`ty`] The `_type` list, when needed to reproduce an error file.
    #[serde(rename = "ty", default, skip_serializing_if = "Option::is_none")]
    pub requested_types: Option<Vec<String>>,
    /// [`w`] For error files: the lenient-mode warnings of the kick-off, each as the
    /// OperationOutcome line to write.
    #[serde(rename = "w", default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expiry, seconds since the epoch; the token is valid while `now < exp`.
    pub exp: i64,
}

/// Why a key set was refused or a token did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts, bad base64, bad JSON or too long.
    #[error("malformed token")]
    Malformed,
    /// The header names an algorithm other than HS256 (e.g. `none`).
    #[error("unsupported token algorithm")]
    UnsupportedAlgorithm,
    /// The header's `kid` is missing or not in the key set.
    #[error("unknown token key")]
    UnknownKey,
    /// The signature does not match.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` is not after the current time.
    #[error("token expired")]
    Expired,
    /// [`TokenKeys::new`] was given no keys.
    #[error("no token keys configured")]
    NoKeys,
    /// [`TokenKeys::new`] was given an empty secret for this kid.
    #[error("token key '{0}' has an empty secret")]
    EmptySecret(String),
    /// [`TokenKeys::new`] was given a kid outside `[A-Za-z0-9_-]{1,32}`.
    #[error("invalid token key id '{0}' (expected [A-Za-z0-9_-]{{1,32}})")]
    InvalidKid(String),
    /// [`TokenKeys::new`] was given the same kid twice.
    #[error("duplicate token key id '{0}'")]
    DuplicateKid(String),
}

/// The JOSE header. Field order is fixed (alg, typ, kid) so tokens are deterministic.
#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// The HMAC keys: the first signs, all verify.
#[derive(Clone)]
pub struct TokenKeys {
    /// `(kid, secret)`; index 0 is the signing key. A handful at most, so a Vec beats a map.
    keys: Vec<(String, Vec<u8>)>,
}

/// Shows only the kids: secrets must never reach logs.
impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(kid, _)| kid.as_str()).collect();
        f.debug_struct("TokenKeys").field("kids", &kids).finish()
    }
}

impl TokenKeys {
    /// Builds a key set from `(kid, secret)` pairs. The first pair signs new tokens; all pairs
    /// verify, so a rotated-out key keeps its tokens valid until they expire.
    ///
    /// Fails when `keys` is empty, a secret is empty, a kid is not `[A-Za-z0-9_-]{1,32}` or a
    /// kid repeats. Use secrets of at least 32 random bytes.
    pub fn new(keys: Vec<(String, Vec<u8>)>) -> Result<TokenKeys, TokenError> {
        if keys.is_empty() {
            return Err(TokenError::NoKeys);
        }
        for (i, (kid, secret)) in keys.iter().enumerate() {
            if !is_valid_kid(kid) {
                return Err(TokenError::InvalidKid(kid.clone()));
            }
            if secret.is_empty() {
                return Err(TokenError::EmptySecret(kid.clone()));
            }
            if keys[..i].iter().any(|(earlier, _)| earlier == kid) {
                return Err(TokenError::DuplicateKid(kid.clone()));
            }
        }
        Ok(TokenKeys { keys })
    }

    /// The kid new tokens are signed with.
    pub fn current_kid(&self) -> &str {
        &self.keys[0].0
    }

    /// Signs `claims` with the current key:
    /// `base64url(header) . base64url(claims JSON) . base64url(HMAC-SHA256)`, no padding.
    pub fn sign(&self, claims: &FileClaims) -> String {
        let (kid, secret) = &self.keys[0];
        let header = Header { alg: ALG.to_owned(), typ: Some("JWT".to_owned()), kid: Some(kid.clone()) };
        let signing_input = format!("{}.{}", encode_json(&header), encode_json(claims));
        let signature = mac(secret, &signing_input).finalize().into_bytes();
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// Verifies `token` and returns its claims.
    ///
    /// Checks, in order: shape, `alg == HS256`, known `kid`, the signature (constant-time),
    /// then the claims and `exp > now_seconds`. The payload is only parsed after the signature
    /// matched, so unauthenticated input never reaches the claims deserializer.
    pub fn verify(&self, token: &str, now_seconds: i64) -> Result<FileClaims, TokenError> {
        let (signing_input, header, payload, signature) = split(token)?;
        let header: Header = decode_json(header)?;
        if header.alg != ALG {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        let secret = self.secret(header.kid.as_deref())?;
        let signature = decode(signature)?;
        mac(secret, signing_input).verify_slice(&signature).map_err(|_| TokenError::BadSignature)?;
        let claims: FileClaims = decode_json(payload)?;
        if claims.exp <= now_seconds {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    fn secret(&self, kid: Option<&str>) -> Result<&[u8], TokenError> {
        let kid = kid.ok_or(TokenError::UnknownKey)?;
        self.keys
            .iter()
            .find(|(known, _)| known == kid)
            .map(|(_, secret)| secret.as_slice())
            .ok_or(TokenError::UnknownKey)
    }
}

/// `[A-Za-z0-9_-]{1,32}`: safe in headers, logs and config keys.
fn is_valid_kid(kid: &str) -> bool {
    (1..=MAX_KID_LEN).contains(&kid.len()) && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Splits into (signing input, header, payload, signature), all still base64url.
fn split(token: &str) -> Result<(&str, &str, &str, &str), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let (signing_input, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let (header, payload) = signing_input.split_once('.').ok_or(TokenError::Malformed)?;
    if payload.contains('.') {
        return Err(TokenError::Malformed);
    }
    Ok((signing_input, header, payload, signature))
}

/// An HMAC-SHA256 state fed with `data`.
fn mac(secret: &[u8], data: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    mac
}

fn encode_json<T: Serialize>(value: &T) -> String {
    // Plain structs with string keys always serialize.
    let json = serde_json::to_vec(value).expect("token JSON serializes");
    URL_SAFE_NO_PAD.encode(json)
}

/// Strict base64url: padding and non-zero trailing bits are refused, so each byte string has
/// exactly one accepted encoding and a token cannot be altered without breaking it.
fn decode(part: &str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    serde_json::from_slice(&decode(part)?).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000;

    fn claims() -> FileClaims {
        FileClaims {
            tenant: 7,
            client: "client-abc".into(),
            user: Some("123675049".into()),
            group: "g1".into(),
            group_version: 3,
            kind: FileKind::Output,
            resource_type: "Observation".into(),
            start: 100,
            end: 1_099,
            total: 1_000,
            since: Some(1_704_067_200_000_000),
            until: None,
            transaction_time: 1_799_999_000_000_000,
            requested_types: None,
            warnings: Vec::new(),
            iat: NOW - 10,
            exp: NOW + 3_600,
        }
    }

    fn keys(list: &[(&str, &[u8])]) -> TokenKeys {
        TokenKeys::new(list.iter().map(|(k, s)| (k.to_string(), s.to_vec())).collect()).unwrap()
    }

    fn main_keys() -> TokenKeys {
        keys(&[("k2", b"new-secret-0123456789abcdef0123"), ("k1", b"old-secret-0123456789abcdef0123")])
    }

    fn parts(token: &str) -> Vec<String> {
        token.split('.').map(str::to_owned).collect()
    }

    fn json_part(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    fn b64(value: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
    }

    /// Replaces the header, keeping the payload and the (now unrelated) signature.
    fn with_header(token: &str, header: serde_json::Value) -> String {
        let p = parts(token);
        format!("{}.{}.{}", b64(&header), p[1], p[2])
    }

    #[test]
    fn round_trip() {
        let keys = main_keys();
        let token = keys.sign(&claims());
        assert_eq!(keys.verify(&token, NOW), Ok(claims()));
    }

    #[test]
    fn round_trip_with_all_options_and_kinds() {
        let keys = main_keys();
        for kind in [FileKind::Output, FileKind::Deleted, FileKind::Error] {
            let full = FileClaims {
                user: None,
                until: Some(1_800_000_000_000_000),
                requested_types: Some(vec!["Patient".into(), "Observation".into()]),
                warnings: vec!["parameter '_elements' was ignored".into()],
                kind,
                ..claims()
            };
            assert_eq!(keys.verify(&keys.sign(&full), NOW), Ok(full));
        }
    }

    #[test]
    fn token_shape_is_a_compact_url_safe_jwt() {
        let token = main_keys().sign(&claims());
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{token}");
        let p = parts(&token);
        assert_eq!(p.len(), 3);
        assert_eq!(json_part(&p[0]), serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "k2"}));
        let payload = json_part(&p[1]);
        assert_eq!(payload["k"], "output");
        assert_eq!(payload["t"], 7);
        assert!(payload.get("un").is_none(), "None options are omitted");
        assert!(token.len() < 400, "{} bytes", token.len());
    }

    #[test]
    fn deterministic() {
        let keys = main_keys();
        assert_eq!(keys.sign(&claims()), keys.sign(&claims()));
        let other = FileClaims { start: 101, ..claims() };
        assert_ne!(keys.sign(&claims()), keys.sign(&other));
    }

    #[test]
    fn expired_is_rejected() {
        let keys = main_keys();
        let token = keys.sign(&claims());
        let exp = claims().exp;
        assert!(keys.verify(&token, exp - 1).is_ok());
        assert_eq!(keys.verify(&token, exp), Err(TokenError::Expired));
        assert_eq!(keys.verify(&token, exp + 1), Err(TokenError::Expired));
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let keys = main_keys();
        let token = keys.sign(&claims());
        let p = parts(&token);
        let mut payload = json_part(&p[1]);
        payload["e"] = serde_json::json!(999_999); // widen the range
        let forged = format!("{}.{}.{}", p[0], b64(&payload), p[2]);
        assert_eq!(keys.verify(&forged, NOW), Err(TokenError::BadSignature));
        // A forged exp to extend an expired token fails the same way.
        payload["exp"] = serde_json::json!(i64::MAX);
        let forged = format!("{}.{}.{}", p[0], b64(&payload), p[2]);
        assert_eq!(keys.verify(&forged, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampered_signature_is_rejected() {
        let keys = main_keys();
        let token = keys.sign(&claims());
        let p = parts(&token);
        let mut sig = URL_SAFE_NO_PAD.decode(&p[2]).unwrap();
        sig[0] ^= 1;
        let forged = format!("{}.{}.{}", p[0], p[1], URL_SAFE_NO_PAD.encode(&sig));
        assert_eq!(keys.verify(&forged, NOW), Err(TokenError::BadSignature));
        let truncated = format!("{}.{}.{}", p[0], p[1], URL_SAFE_NO_PAD.encode(&sig[..16]));
        assert_eq!(keys.verify(&truncated, NOW), Err(TokenError::BadSignature));
        let empty = format!("{}.{}.", p[0], p[1]);
        assert_eq!(keys.verify(&empty, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_rejected() {
        let keys = main_keys();
        let token = keys.sign(&claims());
        let p = parts(&token);
        let none = format!("{}.{}.", b64(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": "k2"})), p[1]);
        assert_eq!(keys.verify(&none, NOW), Err(TokenError::UnsupportedAlgorithm));
        for alg in ["none", "None", "HS512", "RS256", "hs256"] {
            let forged = with_header(&token, serde_json::json!({"alg": alg, "typ": "JWT", "kid": "k2"}));
            assert_eq!(keys.verify(&forged, NOW), Err(TokenError::UnsupportedAlgorithm), "{alg}");
        }
    }

    #[test]
    fn kid_swap_is_rejected() {
        let keys = main_keys();
        let token = keys.sign(&claims());
        // Claiming the other known key: the signature no longer matches.
        let swapped = with_header(&token, serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "k1"}));
        assert_eq!(keys.verify(&swapped, NOW), Err(TokenError::BadSignature));
        let unknown = with_header(&token, serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "k9"}));
        assert_eq!(keys.verify(&unknown, NOW), Err(TokenError::UnknownKey));
        let missing = with_header(&token, serde_json::json!({"alg": "HS256", "typ": "JWT"}));
        assert_eq!(keys.verify(&missing, NOW), Err(TokenError::UnknownKey));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_while_their_key_is_configured() {
        let old = keys(&[("k1", b"old-secret-0123456789abcdef0123")]);
        let old_token = old.sign(&claims());
        // Rotated: k2 signs now, k1 still verifies.
        let rotated = main_keys();
        assert_eq!(rotated.current_kid(), "k2");
        assert_eq!(rotated.verify(&old_token, NOW), Ok(claims()));
        assert_eq!(json_part(&parts(&rotated.sign(&claims()))[0])["kid"], "k2");
        // Retired: k1 removed, its tokens stop working.
        let retired = keys(&[("k2", b"new-secret-0123456789abcdef0123")]);
        assert_eq!(retired.verify(&old_token, NOW), Err(TokenError::UnknownKey));
        // Same kid, different secret (a botched rotation): refused.
        let reused = keys(&[("k1", b"another-secret")]);
        assert_eq!(reused.verify(&old_token, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let keys = main_keys();
        let token = keys.sign(&claims());
        let p = parts(&token);
        let cases = [
            String::new(),
            "abc".into(),
            "a.b".into(),
            format!("{token}.x"),
            format!("{}.{}", p[0], p[1]),
            format!("{}=.{}.{}", p[0], p[1], p[2]),
            format!("!{}.{}.{}", p[0], p[1], p[2]),
            format!("{}.{}.{}", b64(&serde_json::json!([1])), p[1], p[2]),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ];
        for case in cases {
            assert_eq!(keys.verify(&case, NOW), Err(TokenError::Malformed), "{case:.60}");
        }
    }

    #[test]
    fn signed_garbage_payload_is_malformed() {
        // A correctly signed payload that is not FileClaims (e.g. from another token type).
        let (kid, secret) = ("k2", b"new-secret-0123456789abcdef0123");
        let header = b64(&serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": kid}));
        let input = format!("{header}.{}", b64(&serde_json::json!({"sub": "x"})));
        let sig = URL_SAFE_NO_PAD.encode(mac(secret, &input).finalize().into_bytes());
        assert_eq!(main_keys().verify(&format!("{input}.{sig}"), NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn key_set_validation() {
        let new = |list: Vec<(&str, &[u8])>| {
            TokenKeys::new(list.into_iter().map(|(k, s)| (k.to_string(), s.to_vec())).collect())
        };
        assert_eq!(new(vec![]).unwrap_err(), TokenError::NoKeys);
        assert_eq!(new(vec![("k1", b"")]).unwrap_err(), TokenError::EmptySecret("k1".into()));
        for kid in ["", "a.b", "a b", "ä", "k/1", &"k".repeat(33)] {
            assert_eq!(new(vec![(kid, b"s")]).unwrap_err(), TokenError::InvalidKid(kid.into()));
        }
        assert_eq!(
            new(vec![("k1", b"s"), ("k2", b"t"), ("k1", b"u")]).unwrap_err(),
            TokenError::DuplicateKid("k1".into())
        );
        assert!(new(vec![("Key_2024-01", b"s"), (&"k".repeat(32), b"t")]).is_ok());
    }

    #[test]
    fn debug_hides_secrets() {
        let shown = format!("{:?}", main_keys());
        assert!(shown.contains("k2") && !shown.contains("secret"), "{shown}");
    }

    fn any_claims() -> impl Strategy<Value = FileClaims> {
        let ids = (any::<i64>(), ".*", proptest::option::of(".*"), ".*", any::<i64>());
        let kind = prop_oneof![Just(FileKind::Output), Just(FileKind::Deleted), Just(FileKind::Error)];
        let range = (kind, "[A-Za-z]{1,30}", any::<i64>(), any::<i64>(), any::<u64>());
        let times = (
            proptest::option::of(any::<i64>()),
            proptest::option::of(any::<i64>()),
            any::<i64>(),
            proptest::option::of(prop::collection::vec("[A-Za-z]{1,20}", 0..5)),
            any::<i64>(),
            (NOW + 1)..i64::MAX,
        );
        (ids, range, times).prop_map(|((tenant, client, user, group, group_version), r, t)| FileClaims {
            tenant,
            client,
            user,
            group,
            group_version,
            kind: r.0,
            resource_type: r.1,
            start: r.2,
            end: r.3,
            total: r.4,
            since: t.0,
            until: t.1,
            transaction_time: t.2,
            requested_types: t.3,
            warnings: Vec::new(),
            iat: t.4,
            exp: t.5,
        })
    }

    proptest! {
        #[test]
        fn any_claims_round_trip(claims in any_claims()) {
            let keys = main_keys();
            let token = keys.sign(&claims);
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            prop_assert_eq!(&token, &keys.sign(&claims));
            prop_assert_eq!(keys.verify(&token, NOW), Ok(claims));
        }

        #[test]
        fn any_single_character_change_is_rejected(at in any::<prop::sample::Index>(), with in "[A-Za-z0-9_.-]") {
            let keys = main_keys();
            let token = keys.sign(&claims());
            let i = at.index(token.len());
            prop_assume!(token[i..i + 1] != with);
            let forged = format!("{}{}{}", &token[..i], with, &token[i + 1..]);
            prop_assert!(keys.verify(&forged, NOW).is_err());
        }
    }
}
