//! Client public keys for SMART Backend Services: registered inline or by URL. A URL is fetched
//! with a timeout, no redirects and a size cap; its answer is cached no longer than its
//! `Cache-Control` allows (SMART: "SHALL NOT cache longer than the client's Cache-Control
//! header"), and fetched again when an assertion names a `kid` the cached set lacks (the client
//! rotated its keys). Only `https` URLs, or plain `http` to a loopback host or with the
//! development flag `allow_http_jwks_urls`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::header;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// Largest JWK Set accepted (inline or fetched).
pub const MAX_JWKS_BYTES: usize = 64 * 1024;

/// How long a fetched set is kept when its answer says nothing about caching.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// The longest a fetched set is kept, whatever its answer says.
const LONGEST_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// An unknown `kid` fetches the set again at most this often per URL, so a stream of forged
/// assertions cannot turn the server into a fetch loop against the client's host.
const REFETCH_INTERVAL: Duration = Duration::from_secs(5);
/// Cached URLs at most (one per registered URL in practice).
const MAX_CACHED: usize = 1024;

/// Whether `url` may be registered or fetched: `https`, or `http` to a loopback host (or any
/// host when `allow_http`).
pub fn check_jwks_url(url: &str, allow_http: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|_| format!("'{url}' is not an absolute URL"))?;
    let Some(host) = parsed.host_str() else { return Err(format!("'{url}' names no host")) };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback || allow_http => Ok(()),
        "http" => Err(format!("'{url}': a JWKS URL must be https (plain http only for loopback hosts)")),
        _ => Err(format!("'{url}': a JWKS URL must be https")),
    }
}

/// Checks an inline JWK Set: JSON `{"keys": [...]}`, every key with `kty` and `kid`.
pub fn check_jwks(text: &str) -> Result<(), String> {
    if text.len() > MAX_JWKS_BYTES {
        return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
    }
    let keys = parse_keys(text)?;
    if keys.is_empty() {
        return Err("the JWKS has no keys".into());
    }
    for key in &keys {
        if key.get("kid").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err("every key of the JWKS needs a kid".into());
        }
        if key.get("d").is_some() || key.get("p").is_some() {
            return Err("the JWKS holds a private key: register only the public keys".into());
        }
        serde_json::from_value::<Jwk>(key.clone()).map_err(|error| format!("a key of the JWKS is invalid: {error}"))?;
    }
    Ok(())
}

fn parse_keys(text: &str) -> Result<Vec<Value>, String> {
    let set: Value = serde_json::from_str(text).map_err(|error| format!("the JWKS is not JSON: {error}"))?;
    match set.get("keys") {
        Some(Value::Array(keys)) => Ok(keys.clone()),
        _ => Err("a JWKS is an object with a 'keys' array".into()),
    }
}

/// The verification key for `alg` among `keys`: the single key whose `kid` matches and whose
/// `kty` (and curve, and `alg` if the key names one) fits. None, or more than one, is an error.
pub fn select_key(keys: &[Value], kid: &str, alg: Algorithm) -> Result<DecodingKey, String> {
    let (kty, curve) = match alg {
        Algorithm::RS256 | Algorithm::RS384 => ("RSA", None),
        Algorithm::ES256 => ("EC", Some("P-256")),
        Algorithm::ES384 => ("EC", Some("P-384")),
        other => return Err(format!("algorithm {other:?} is not accepted")),
    };
    let alg_name = format!("{alg:?}");
    let fitting: Vec<&Value> = keys
        .iter()
        .filter(|key| key.get("kid").and_then(Value::as_str) == Some(kid))
        .filter(|key| key.get("kty").and_then(Value::as_str) == Some(kty))
        .filter(|key| curve.is_none() || key.get("crv").and_then(Value::as_str) == curve)
        .filter(|key| key.get("alg").and_then(Value::as_str).is_none_or(|named| named == alg_name))
        .filter(|key| match key.get("key_ops") {
            Some(Value::Array(ops)) => ops.iter().any(|op| op.as_str() == Some("verify")),
            _ => true,
        })
        .collect();
    match fitting.as_slice() {
        [] => Err(format!("no {kty} key with kid '{kid}' is registered")),
        [key] => {
            let jwk: Jwk = serde_json::from_value((*key).clone()).map_err(|error| format!("key '{kid}': {error}"))?;
            DecodingKey::from_jwk(&jwk).map_err(|error| format!("key '{kid}': {error}"))
        }
        _ => Err(format!("more than one {kty} key has kid '{kid}'")),
    }
}

/// The keys of an inline set.
pub fn inline_keys(text: &str) -> Result<Vec<Value>, String> {
    parse_keys(text)
}

/// Fetched JWK Sets by URL.
pub struct JwksCache {
    http: reqwest::Client,
    allow_http: bool,
    entries: Mutex<HashMap<String, Cached>>,
}

#[derive(Clone)]
struct Cached {
    keys: Vec<Value>,
    fetched: Instant,
    max_age: Duration,
    /// When an unknown kid last made the set be fetched again.
    refetched_for_kid: Option<Instant>,
}

impl JwksCache {
    pub fn new(timeout: Duration, allow_http: bool) -> JwksCache {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        JwksCache { http, allow_http, entries: Mutex::new(HashMap::new()) }
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The keys at `url` for an assertion naming `kid`: the cached set while it is fresh and
    /// has the kid; else a new fetch (at most every few seconds when the kid stays unknown).
    pub async fn keys(&self, url: &str, kid: &str) -> Result<Vec<Value>, String> {
        let now = Instant::now();
        let mut refetched_for_kid = None;
        if let Some(cached) = self.cached().get(url).cloned() {
            let fresh = now.duration_since(cached.fetched) < cached.max_age;
            let has_kid = cached.keys.iter().any(|key| key.get("kid").and_then(Value::as_str) == Some(kid));
            let recently = cached.refetched_for_kid.is_some_and(|at| now.duration_since(at) < REFETCH_INTERVAL);
            if fresh && (has_kid || recently) {
                return Ok(cached.keys);
            }
            refetched_for_kid = (fresh && !has_kid).then_some(now);
        }
        let (keys, max_age) = self.fetch(url).await?;
        let mut entries = self.cached();
        if entries.len() >= MAX_CACHED {
            entries.clear();
        }
        if !max_age.is_zero() {
            let cached = Cached { keys: keys.clone(), fetched: now, max_age, refetched_for_kid };
            entries.insert(url.to_owned(), cached);
        } else {
            entries.remove(url);
        }
        Ok(keys)
    }

    async fn fetch(&self, url: &str) -> Result<(Vec<Value>, Duration), String> {
        check_jwks_url(url, self.allow_http)?;
        let mut response = self
            .http
            .get(url)
            .header(header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|error| format!("fetching the JWKS failed: {}", error.without_url()))?;
        if !response.status().is_success() {
            return Err(format!("fetching the JWKS answered {}", response.status()));
        }
        let max_age = cache_lifetime(response.headers().get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok()));
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|error| format!("reading the JWKS failed: {error}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
            }
        }
        let text = String::from_utf8(body).map_err(|_| "the JWKS is not UTF-8".to_owned())?;
        Ok((parse_keys(&text)?, max_age))
    }
}

/// How long an answer with this `Cache-Control` may be kept: zero for `no-store`, `no-cache`
/// or `max-age=0`, `max-age` (capped at a day), else a default of five minutes.
pub fn cache_lifetime(cache_control: Option<&str>) -> Duration {
    let Some(value) = cache_control else { return DEFAULT_MAX_AGE };
    let mut lifetime = DEFAULT_MAX_AGE;
    for directive in value.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Duration::ZERO;
        }
        if let Some(seconds) = lower.strip_prefix("max-age=") {
            match seconds.trim_matches('"').parse::<u64>() {
                Ok(seconds) => lifetime = Duration::from_secs(seconds).min(LONGEST_MAX_AGE),
                Err(_) => return Duration::ZERO,
            }
        }
    }
    lifetime
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_bounds_the_lifetime() {
        assert_eq!(cache_lifetime(None), DEFAULT_MAX_AGE);
        assert_eq!(cache_lifetime(Some("public, max-age=60")), Duration::from_secs(60));
        assert_eq!(cache_lifetime(Some("max-age=0")), Duration::ZERO);
        assert_eq!(cache_lifetime(Some("no-store")), Duration::ZERO);
        assert_eq!(cache_lifetime(Some("max-age=60, no-cache")), Duration::ZERO);
        assert_eq!(cache_lifetime(Some("max-age=junk")), Duration::ZERO);
        assert_eq!(cache_lifetime(Some("max-age=99999999")), LONGEST_MAX_AGE);
    }

    #[test]
    fn urls_must_be_https_unless_loopback_or_allowed() {
        assert!(check_jwks_url("https://keys.example/jwks.json", false).is_ok());
        assert!(check_jwks_url("http://127.0.0.1:9000/jwks.json", false).is_ok());
        assert!(check_jwks_url("http://localhost/jwks.json", false).is_ok());
        assert!(check_jwks_url("http://[::1]/jwks.json", false).is_ok());
        assert!(check_jwks_url("http://keys.example/jwks.json", false).is_err());
        assert!(check_jwks_url("http://keys.example/jwks.json", true).is_ok());
        assert!(check_jwks_url("ftp://keys.example/jwks.json", true).is_err());
        assert!(check_jwks_url("/jwks.json", true).is_err());
    }

    #[test]
    fn inline_sets_need_kids_and_no_private_parts() {
        let key = r#"{"kty":"EC","crv":"P-384","kid":"a","x":"AAAA","y":"AAAA"}"#;
        assert!(check_jwks(&format!(r#"{{"keys":[{key}]}}"#)).is_ok());
        assert!(check_jwks(r#"{"keys":[]}"#).is_err());
        assert!(check_jwks(r#"{"keys":[{"kty":"EC","crv":"P-384","x":"AAAA","y":"AAAA"}]}"#).is_err());
        assert!(
            check_jwks(r#"{"keys":[{"kty":"EC","crv":"P-384","kid":"a","x":"AAAA","y":"AAAA","d":"AAAA"}]}"#).is_err()
        );
        assert!(check_jwks("[]").is_err());
    }

    #[test]
    fn a_key_is_chosen_by_kid_and_kty_and_only_when_unique() {
        let coordinate = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [7u8; 48]);
        let ec = serde_json::json!({"kty":"EC","crv":"P-384","kid":"a","x": coordinate,"y": coordinate});
        let n = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [0xc5u8; 256]);
        let rsa = serde_json::json!({"kty":"RSA","kid":"a","n": n,"e":"AQAB"});
        let keys = vec![ec.clone(), rsa.clone()];
        assert!(select_key(&keys, "a", Algorithm::ES384).is_ok());
        assert!(select_key(&keys, "a", Algorithm::RS384).is_ok());
        assert!(select_key(&keys, "a", Algorithm::ES256).is_err(), "a P-384 key does not verify ES256");
        assert!(select_key(&keys, "b", Algorithm::RS384).is_err());
        assert!(select_key(&keys, "a", Algorithm::HS256).is_err());
        assert!(select_key(&[rsa.clone(), rsa], "a", Algorithm::RS384).is_err(), "two keys with the same kid");
    }
}
