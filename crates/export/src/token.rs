//! Signed, expiring file tokens: the `{token}` in `/bulk-data/r4/$export/{Type}/{token}.ndjson`.
//!
//! A token names a file, it does not describe it: the tenant, the stored export record
//! ([`crate::record::PlannedExport`]: client, user, Group, filters, key ranges, lenient-mode
//! warnings) and the file's number in it, its expiry, and whether downloading it needs the
//! client's credentials. Whatever the kick-off asked, a token is at most
//! [`MAX_TOKEN_LEN`] characters, so a file URL stays well under 256.
//!
//! Format: `{kid}.{base64url(payload)}.{base64url(HMAC-SHA256(kid "." payload))}`, unpadded,
//! so only `[A-Za-z0-9_-]` and two dots; the payload is binary: a format byte, a flags byte
//! (bit 0: credentials required), the 16-byte record id, then LEB128 varints of the tenant,
//! the file number and `exp` (Unix seconds). Tokens are deterministic (same fields and key, same
//! string). Keys carry a `kid` so secrets can rotate: the first key signs, every configured key
//! verifies.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest kid accepted by [`TokenKeys::new`].
const MAX_KID_LEN: usize = 32;

/// The payload format this code writes and reads.
const FORMAT: u8 = 1;
const FLAG_CREDENTIALS: u8 = 1;

/// The longest token [`TokenKeys::sign`] makes (a 32-character kid, every varint at its longest);
/// anything longer is refused before any decoding.
pub const MAX_TOKEN_LEN: usize = MAX_KID_LEN + 1 + 58 + 1 + 43;

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
    /// Group id.
    pub group: String,
    /// Group version the export was planned against.
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

    /// Signs `file` with the current key.
    pub fn sign(&self, file: &FileRef) -> String {
        let (kid, secret) = &self.keys[0];
        let signing_input = format!("{kid}.{}", URL_SAFE_NO_PAD.encode(encode_payload(file)));
        let signature = mac(secret, &signing_input).finalize().into_bytes();
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// Verifies `token` and returns what it names.
    ///
    /// Checks, in order: length and shape, a known kid, the signature (constant-time), the
    /// payload, then `exp > now_seconds`. The payload is decoded only after the signature
    /// matched, so unauthenticated input never reaches the decoder.
    pub fn verify(&self, token: &str, now_seconds: i64) -> Result<FileRef, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (signing_input, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (kid, payload) = signing_input.split_once('.').ok_or(TokenError::Malformed)?;
        if payload.contains('.') {
            return Err(TokenError::Malformed);
        }
        let secret = self.secret(kid)?;
        let signature = decode(signature)?;
        mac(secret, signing_input).verify_slice(&signature).map_err(|_| TokenError::BadSignature)?;
        let file = decode_payload(&decode(payload)?)?;
        if file.exp <= now_seconds {
            return Err(TokenError::Expired);
        }
        Ok(file)
    }

    fn secret(&self, kid: &str) -> Result<&[u8], TokenError> {
        self.keys
            .iter()
            .find(|(known, _)| known == kid)
            .map(|(_, secret)| secret.as_slice())
            .ok_or(TokenError::UnknownKey)
    }
}

/// `[A-Za-z0-9_-]{1,32}`: safe in URLs, headers, logs and config keys.
fn is_valid_kid(kid: &str) -> bool {
    (1..=MAX_KID_LEN).contains(&kid.len()) && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn encode_payload(file: &FileRef) -> Vec<u8> {
    let mut payload = Vec::with_capacity(40);
    payload.push(FORMAT);
    payload.push(if file.requires_credentials { FLAG_CREDENTIALS } else { 0 });
    payload.extend_from_slice(&file.record);
    put_varint(&mut payload, zigzag(file.tenant));
    put_varint(&mut payload, u64::from(file.file));
    put_varint(&mut payload, zigzag(file.exp));
    payload
}

fn decode_payload(payload: &[u8]) -> Result<FileRef, TokenError> {
    let [FORMAT, flags, rest @ ..] = payload else { return Err(TokenError::Malformed) };
    if flags & !FLAG_CREDENTIALS != 0 || rest.len() < 16 {
        return Err(TokenError::Malformed);
    }
    let (record, mut rest) = rest.split_at(16);
    let tenant = unzigzag(take_varint(&mut rest)?);
    let file = u32::try_from(take_varint(&mut rest)?).map_err(|_| TokenError::Malformed)?;
    let exp = unzigzag(take_varint(&mut rest)?);
    if !rest.is_empty() {
        return Err(TokenError::Malformed);
    }
    let record = record.try_into().map_err(|_| TokenError::Malformed)?;
    Ok(FileRef { tenant, record, file, exp, requires_credentials: flags & FLAG_CREDENTIALS != 0 })
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// LEB128: seven bits a byte, low first, high bit set on all but the last.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads one LEB128 varint; refuses one past 64 bits or not in its shortest form.
fn take_varint(input: &mut &[u8]) -> Result<u64, TokenError> {
    let mut value: u64 = 0;
    for (i, byte) in input.iter().enumerate() {
        let bits = u64::from(byte & 0x7f);
        let shift = 7 * i as u32;
        if shift >= 64 || (shift == 63 && bits > 1) {
            return Err(TokenError::Malformed);
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            if i > 0 && bits == 0 {
                return Err(TokenError::Malformed); // a longer form of a shorter number
            }
            *input = &input[i + 1..];
            return Ok(value);
        }
    }
    Err(TokenError::Malformed)
}

/// An HMAC-SHA256 state fed with `data`.
fn mac(secret: &[u8], data: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    mac
}

/// Strict base64url: padding and non-zero trailing bits are refused, so each byte string has
/// exactly one accepted encoding and a token cannot be altered without breaking it.
fn decode(part: &str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    /// Re-signs a hand-made payload with k2, as a forger holding the key could.
    fn signed(payload: &[u8]) -> String {
        let input = format!("k2.{}", URL_SAFE_NO_PAD.encode(payload));
        let signature = mac(b"new-secret-0123456789abcdef0123", &input).finalize().into_bytes();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
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
    fn tokens_are_short_url_safe_and_deterministic() {
        let main = main_keys();
        let token = main.sign(&file());
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{token}");
        assert_eq!(parts(&token)[0], "k2");
        assert!(token.len() <= 100, "{} bytes: {token}", token.len());
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
        assert_eq!(longest.len(), MAX_TOKEN_LEN, "{longest}");
    }

    #[test]
    fn the_credentials_flag_is_signed() {
        let keys = main_keys();
        let token = keys.sign(&file());
        let p = parts(&token);
        let mut payload = URL_SAFE_NO_PAD.decode(&p[1]).unwrap();
        payload[1] = 0;
        let forged = format!("{}.{}.{}", p[0], URL_SAFE_NO_PAD.encode(&payload), p[2]);
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
    fn kid_swap_is_rejected() {
        let keys = main_keys();
        let token = keys.sign(&file());
        let rest = token.strip_prefix("k2").unwrap();
        // Claiming the other known key: the signature no longer matches.
        assert_eq!(keys.verify(&format!("k1{rest}"), NOW), Err(TokenError::BadSignature));
        assert_eq!(keys.verify(&format!("k9{rest}"), NOW), Err(TokenError::UnknownKey));
        assert_eq!(keys.verify(&rest[1..], NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_while_their_key_is_configured() {
        let old = keys(&[("k1", b"old-secret-0123456789abcdef0123")]);
        let old_token = old.sign(&file());
        let rotated = main_keys();
        assert_eq!(rotated.current_kid(), "k2");
        assert_eq!(rotated.verify(&old_token, NOW), Ok(file()));
        assert_eq!(parts(&rotated.sign(&file()))[0], "k2");
        let retired = keys(&[("k2", b"new-secret-0123456789abcdef0123")]);
        assert_eq!(retired.verify(&old_token, NOW), Err(TokenError::UnknownKey));
        let reused = keys(&[("k1", b"another-secret")]);
        assert_eq!(reused.verify(&old_token, NOW), Err(TokenError::BadSignature));
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
    fn signed_but_malformed_payloads_are_refused() {
        let good = encode_payload(&file());
        let mut wrong_format = good.clone();
        wrong_format[0] = 2;
        let mut unknown_flag = good.clone();
        unknown_flag[1] = 2;
        let mut trailing = good.clone();
        trailing.push(0);
        let mut overlong = good[..18].to_vec();
        overlong.extend([0x87, 0x00]); // 7 written in two bytes
        let cases = [
            vec![],
            vec![FORMAT],
            good[..17].to_vec(),
            good[..good.len() - 1].to_vec(),
            wrong_format,
            unknown_flag,
            trailing,
            overlong,
        ];
        for payload in cases {
            assert_eq!(main_keys().verify(&signed(&payload), NOW), Err(TokenError::Malformed), "{payload:?}");
        }
        assert_eq!(main_keys().verify(&signed(&good), NOW), Ok(file()));
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
