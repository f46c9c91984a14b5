//! Signed, expiring server tokens: the `{token}` in `/bulk-data/r4/$export/{Type}/{token}.ndjson`,
//! and (through [`TokenKeys::sign_jwt`]) the SMART access tokens the HTTP layer issues. One JWT
//! implementation (`jsonwebtoken`) signs and verifies both, HS256 under server keys with ids.
//!
//! A file token names a file, it does not describe it: the tenant, the stored export record
//! ([`crate::record::PlannedExport`]: client, user, Group, filters, key ranges, lenient-mode
//! warnings) and the file's number in it, its expiry, and whether downloading it needs the
//! client's credentials. Whatever the kick-off asked, a token is at most [`MAX_TOKEN_LEN`]
//! characters, so a file URL stays short.
//!
//! Format: a compact JWS, `base64url(header).base64url(claims).base64url(HMAC-SHA256)`; the
//! header is `{"alg":"HS256","kid":…,"typ":"bhf"}` (each kind of token has its own `typ`, so an
//! access token is never accepted as a file token or the reverse); the claims are
//! `{"t":tenant,"r":record id (base64url of 16 bytes),"f":file number,"exp":Unix seconds,"c":1
//! when credentials are required}`. Tokens are deterministic (same fields and key, same string).
//! Keys carry a `kid` so secrets can rotate: the first key signs, every configured key verifies.

use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Longest kid accepted by [`TokenKeys::new`].
const MAX_KID_LEN: usize = 32;

/// The header `typ` of file tokens.
const FILE_TOKEN_TYPE: &str = "bhf";

/// The longest token [`TokenKeys::sign`] makes (a 32-character kid, every number at its
/// longest); anything longer is refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 280;

/// Longest server JWT of any kind [`TokenKeys::verify_jwt`] decodes.
pub const MAX_JWT_LEN: usize = 8 * 1024;
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

/// Everything needed to produce one file: what its token names ([`FileRef`]), resolved through
/// the export's stored record ([`crate::record::PlannedExport::claims`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FileClaims {
    /// Tenant id (`TenantId.0`).
    pub tenant: i64,
    /// The `client_id` that started the export; only it may download.
    pub client: String,
    /// User scope (`x-oneup-user-id`), or `None` for the whole tenant.
    pub user: Option<String>,
    /// System, Patient, or which Group.
    pub level: crate::level::ExportLevel,
    /// Group version the export was planned against (0 at the other levels).
    pub group_version: i64,
    /// `output`, `deleted` or `error`.
    pub kind: FileKind,
    /// Resource type of the file's contents.
    pub resource_type: String,
    /// First key of the file's range (inclusive).
    pub start: i64,
    /// Last key of the file's range (inclusive).
    pub end: i64,
    /// Resources in the file when the manifest was made.
    pub total: u64,
    /// `_since`, µs since the epoch.
    pub since: Option<i64>,
    /// `_until`, µs since the epoch.
    pub until: Option<i64>,
    /// The manifest's `transactionTime`, µs since the epoch.
    pub transaction_time: i64,
    /// The `_type` list, when needed to reproduce an error file.
    pub requested_types: Option<Vec<String>>,
    /// For error files: the lenient-mode warnings of the kick-off, each as the
    /// OperationOutcome line to write.
    pub warnings: Vec<String>,
    /// For an output file of associated data: the stored associated set it reads.
    pub associated_set: Option<String>,
    /// The export's associated set, if any (its `deleted[]` files leave out what it holds).
    pub export_associated_set: Option<String>,
    /// `_typeFilter` queries of the export.
    pub type_filters: Vec<String>,
    /// `_elements` entries of the export, when given.
    pub elements: Option<Vec<String>>,
    /// `patient` (POST) of the export, when given.
    pub patients: Option<Vec<String>>,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expiry, seconds since the epoch; the token is valid while `now < exp`.
    pub exp: i64,
}

/// What a file URL's token states, signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRef {
    /// Tenant id (`TenantId.0`): the record is looked up in this tenant only.
    pub tenant: i64,
    /// The export record's id (see [`FileRef::record_id`]).
    pub record: [u8; 16],
    /// The file's index in the record's file list.
    pub file: u32,
    /// Expiry, Unix seconds; the token is valid while `now < exp`.
    pub exp: i64,
    /// Minted while file URLs required the client's credentials: downloads keep requiring them,
    /// whatever the server's mode later.
    pub requires_credentials: bool,
}

impl FileRef {
    /// The record id as stored: 32 lowercase hex digits.
    pub fn record_id(&self) -> String {
        record_id(&self.record)
    }
}

/// The stored form of a record id: 32 lowercase hex digits.
pub fn record_id(bytes: &[u8; 16]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Why a key set was refused or a token did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three parts, bad base64, a bad payload or too long.
    #[error("malformed token")]
    Malformed,
    /// The kid is not in the key set.
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

/// The claims of a file token (short names: they travel in every file URL).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTokenClaims {
    t: i64,
    r: String,
    f: u32,
    exp: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    c: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
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

    /// Every kid, the signing one first.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(kid, _)| kid.as_str())
    }

    /// Signs `file` with the current key.
    pub fn sign(&self, file: &FileRef) -> String {
        let claims = FileTokenClaims {
            t: file.tenant,
            r: URL_SAFE_NO_PAD.encode(file.record),
            f: file.file,
            exp: file.exp,
            c: file.requires_credentials,
        };
        self.sign_jwt(FILE_TOKEN_TYPE, &claims)
    }

    /// Verifies `token` and returns what it names.
    ///
    /// Checks, in order: length, a known kid, the algorithm and the token type, the signature
    /// (constant-time), the claims, then `exp > now_seconds`. The claims are decoded only after
    /// the signature matched, so unauthenticated input never reaches their decoder.
    pub fn verify(&self, token: &str, now_seconds: i64) -> Result<FileRef, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let claims: FileTokenClaims = self.verify_jwt(FILE_TOKEN_TYPE, token)?;
        let record: [u8; 16] = decode(&claims.r)?.try_into().map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now_seconds {
            return Err(TokenError::Expired);
        }
        Ok(FileRef { tenant: claims.t, record, file: claims.f, exp: claims.exp, requires_credentials: claims.c })
    }

    /// Signs `claims` as a compact JWS (HS256) with the current key, its kid and the header
    /// `typ` `token_type` (which [`TokenKeys::verify_jwt`] checks: each kind of server token has
    /// its own, so one kind is never accepted as another).
    pub fn sign_jwt<T: Serialize>(&self, token_type: &str, claims: &T) -> String {
        let (kid, secret) = &self.keys[0];
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        header.typ = Some(token_type.to_owned());
        let key = EncodingKey::from_secret(secret).expect("HMAC takes any non-empty key");
        // Plain claim structs always serialize, and HS256 signing cannot fail.
        jsonwebtoken::encode(&header, claims, &key).expect("HS256 signing of serializable claims")
    }

    /// Verifies a server token of type `token_type`: a known kid, HS256, the signature, then
    /// decodes its claims. Time claims are the caller's to check (with its clock).
    pub fn verify_jwt<T: DeserializeOwned>(&self, token_type: &str, token: &str) -> Result<T, TokenError> {
        if token.len() > MAX_JWT_LEN || token.bytes().filter(|b| *b == b'.').count() != 2 {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let kid = header.kid.as_deref().ok_or(TokenError::Malformed)?;
        let secret = self.secret(kid)?;
        if header.alg != Algorithm::HS256 || header.typ.as_deref() != Some(token_type) {
            return Err(TokenError::Malformed);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let key = DecodingKey::from_secret(secret).map_err(|_| TokenError::Malformed)?;
        match jsonwebtoken::decode::<T>(token, &key, &validation) {
            Ok(data) => Ok(data.claims),
            Err(error) => match error.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => Err(TokenError::BadSignature),
                _ => Err(TokenError::Malformed),
            },
        }
    }

    fn secret(&self, kid: &str) -> Result<&[u8], TokenError> {
        self.keys
            .iter()
            .find(|(known, _)| known == kid)
            .map(|(_, secret)| secret.as_slice())
            .ok_or(TokenError::UnknownKey)
    }
}

/// The key set in force, replaceable while the server runs (`bulkhead keys rotate` writes the
/// key file; the server reloads it): readers take a snapshot per token.
pub struct KeyRing {
    current: RwLock<Arc<TokenKeys>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl KeyRing {
    pub fn new(keys: TokenKeys) -> KeyRing {
        KeyRing { current: RwLock::new(Arc::new(keys)) }
    }

    /// The keys in force now.
    pub fn get(&self) -> Arc<TokenKeys> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Puts `keys` in force for every later token.
    pub fn replace(&self, keys: TokenKeys) {
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
    }
}

/// `[A-Za-z0-9_-]{1,32}`: safe in URLs, headers, logs and config keys.
fn is_valid_kid(kid: &str) -> bool {
    (1..=MAX_KID_LEN).contains(&kid.len()) && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Strict base64url: padding and non-zero trailing bits are refused, so each byte string has
/// exactly one accepted encoding.
fn decode(part: &str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    const NOW: i64 = 1_800_000_000;

    fn file() -> FileRef {
        FileRef { tenant: 7, record: [0xab; 16], file: 3, exp: NOW + 3_600, requires_credentials: true }
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

    fn decoded(part: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    fn encoded(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    /// Signs hand-made claims with k2, as a forger holding the key could.
    fn signed(claims: Value) -> String {
        main_keys().sign_jwt(FILE_TOKEN_TYPE, &claims)
    }

    #[test]
    fn round_trip() {
        let keys = main_keys();
        let token = keys.sign(&file());
        assert_eq!(keys.verify(&token, NOW), Ok(file()));
        let open = FileRef { requires_credentials: false, tenant: -1, file: 0, ..file() };
        assert_eq!(keys.verify(&keys.sign(&open), NOW), Ok(open));
        assert_eq!(file().record_id(), "ab".repeat(16));
    }

    #[test]
    fn tokens_are_short_url_safe_and_deterministic_jws() {
        let main = main_keys();
        let token = main.sign(&file());
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{token}");
        let header = decoded(&parts(&token)[0]);
        assert_eq!(header, json!({"typ": "bhf", "alg": "HS256", "kid": "k2"}));
        assert!(token.len() <= 190, "{} bytes: {token}", token.len());
        assert_eq!(token, main.sign(&file()));
        assert_ne!(token, main.sign(&FileRef { file: 4, ..file() }));
        // The longest possible token stays within the bound.
        let longest_kid = "k".repeat(MAX_KID_LEN);
        let longest = keys(&[(longest_kid.as_str(), b"s")]).sign(&FileRef {
            tenant: i64::MIN,
            file: u32::MAX,
            exp: i64::MIN,
            ..file()
        });
        assert!(longest.len() <= MAX_TOKEN_LEN, "{} bytes: {longest}", longest.len());
    }

    #[test]
    fn the_credentials_flag_is_signed() {
        let keys = main_keys();
        let token = keys.sign(&file());
        let p = parts(&token);
        let mut claims = decoded(&p[1]);
        claims.as_object_mut().unwrap().remove("c");
        let forged = format!("{}.{}.{}", p[0], encoded(&claims), p[2]);
        assert_eq!(keys.verify(&forged, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn expired_is_rejected() {
        let keys = main_keys();
        let token = keys.sign(&file());
        let exp = file().exp;
        assert!(keys.verify(&token, exp - 1).is_ok());
        assert_eq!(keys.verify(&token, exp), Err(TokenError::Expired));
        assert_eq!(keys.verify(&token, exp + 1), Err(TokenError::Expired));
    }

    #[test]
    fn tampered_signature_is_rejected() {
        let keys = main_keys();
        let token = keys.sign(&file());
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
    fn kid_swap_alg_swap_and_other_token_types_are_rejected() {
        let keys = main_keys();
        let token = keys.sign(&file());
        let p = parts(&token);
        let with_header = |header: Value| format!("{}.{}.{}", encoded(&header), p[1], p[2]);
        // Claiming the other known key: the signature no longer matches.
        assert_eq!(
            keys.verify(&with_header(json!({"typ": "bhf", "alg": "HS256", "kid": "k1"})), NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            keys.verify(&with_header(json!({"typ": "bhf", "alg": "HS256", "kid": "k9"})), NOW),
            Err(TokenError::UnknownKey)
        );
        for header in [
            json!({"typ": "bhf", "alg": "none", "kid": "k2"}),
            json!({"typ": "bhf", "alg": "HS512", "kid": "k2"}),
            json!({"typ": "bhf", "alg": "RS256", "kid": "k2"}),
            json!({"typ": "bhf", "alg": "HS256"}),
        ] {
            assert_eq!(keys.verify(&with_header(header.clone()), NOW), Err(TokenError::Malformed), "{header}");
        }
        // Same key and claims, another kind of token: refused.
        let claims = decoded(&p[1]);
        let access = keys.sign_jwt("at+jwt", &claims);
        assert_eq!(keys.verify(&access, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_while_their_key_is_configured() {
        let old = keys(&[("k1", b"old-secret-0123456789abcdef0123")]);
        let old_token = old.sign(&file());
        let rotated = main_keys();
        assert_eq!(rotated.current_kid(), "k2");
        assert_eq!(rotated.verify(&old_token, NOW), Ok(file()));
        assert_eq!(decoded(&parts(&rotated.sign(&file()))[0])["kid"], "k2");
        let retired = keys(&[("k2", b"new-secret-0123456789abcdef0123")]);
        assert_eq!(retired.verify(&old_token, NOW), Err(TokenError::UnknownKey));
        let reused = keys(&[("k1", b"another-secret")]);
        assert_eq!(reused.verify(&old_token, NOW), Err(TokenError::BadSignature));
        // A key ring swaps the whole set at once.
        let ring = KeyRing::new(old);
        assert_eq!(ring.get().current_kid(), "k1");
        ring.replace(rotated);
        assert_eq!(ring.get().current_kid(), "k2");
        assert_eq!(ring.get().verify(&old_token, NOW), Ok(file()));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let keys = main_keys();
        let token = keys.sign(&file());
        let p = parts(&token);
        let cases = [
            String::new(),
            "abc".into(),
            "k2.b".into(),
            format!("{token}.x"),
            format!("{}=.{}.{}", p[0], p[1], p[2]),
            format!("{}.{}=.{}", p[0], p[1], p[2]),
            format!("{}.{}.{}=", p[0], p[1], p[2]),
            format!("{}.!{}.{}", p[0], p[1], p[2]),
            format!("k2.{}", "x".repeat(MAX_TOKEN_LEN)),
        ];
        for case in cases {
            assert!(
                matches!(keys.verify(&case, NOW), Err(TokenError::Malformed | TokenError::BadSignature)),
                "{case:.60}"
            );
        }
        assert_eq!(keys.verify(&format!("k2.{}", "x".repeat(MAX_TOKEN_LEN)), NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn signed_but_malformed_claims_are_refused() {
        let record = URL_SAFE_NO_PAD.encode([0xab; 16]);
        let good = json!({"t": 7, "r": record, "f": 3, "exp": NOW + 3_600, "c": true});
        assert_eq!(main_keys().verify(&signed(good.clone()), NOW), Ok(file()));
        let with = |key: &str, value: Value| {
            let mut claims = good.clone();
            claims[key] = value;
            claims
        };
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("f");
        let cases = [
            json!({}),
            missing,
            with("x", json!(1)),
            with("r", json!(URL_SAFE_NO_PAD.encode([0xab; 15]))),
            with("r", json!("not base64!")),
            with("f", json!(-1)),
            with("t", json!("7")),
            with("exp", json!(1.5)),
        ];
        for claims in cases {
            assert_eq!(main_keys().verify(&signed(claims.clone()), NOW), Err(TokenError::Malformed), "{claims}");
        }
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

    fn any_file() -> impl Strategy<Value = FileRef> {
        (any::<i64>(), any::<[u8; 16]>(), any::<u32>(), (NOW + 1)..i64::MAX, any::<bool>()).prop_map(
            |(tenant, record, file, exp, requires_credentials)| FileRef {
                tenant,
                record,
                file,
                exp,
                requires_credentials,
            },
        )
    }

    proptest! {
        #[test]
        fn any_file_round_trips_in_a_short_token(file in any_file()) {
            let keys = main_keys();
            let token = keys.sign(&file);
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            prop_assert!(token.len() <= MAX_TOKEN_LEN);
            prop_assert_eq!(keys.verify(&token, NOW), Ok(file));
        }

        #[test]
        fn any_single_character_change_is_rejected(at in any::<prop::sample::Index>(), with in "[A-Za-z0-9_.-]") {
            let keys = main_keys();
            let token = keys.sign(&file());
            let i = at.index(token.len());
            prop_assume!(token[i..i + 1] != with);
            let forged = format!("{}{}{}", &token[..i], with, &token[i + 1..]);
            prop_assert!(keys.verify(&forged, NOW).is_err());
        }
    }
}
