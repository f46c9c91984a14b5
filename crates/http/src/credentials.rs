//! Client credentials: generation, slow hashing, and verification with a digest cache.
//!
//! Secrets are stored only as Argon2id PHC strings. Verifying Argon2 on every request would cost
//! tens of milliseconds, so a successful verification is remembered as a keyed digest of the
//! presented secret (never the secret), compared in constant time on later requests.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// A freshly generated `client_id` and `client_secret` pair; the secret is shown once.
pub struct NewCredentials {
    pub client_id: String,
    pub client_secret: String,
}

/// Generates a client id (`bh_` + 16 hex) and a 256-bit secret (base64url).
pub fn generate_credentials() -> NewCredentials {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut secret);
    let client_id = format!("bh_{}", id.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let client_secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    NewCredentials { client_id, client_secret }
}

/// Hashes a secret with Argon2id and a random salt into a PHC string.
pub fn hash_secret(secret: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("argon2 with default parameters cannot fail on a valid salt")
        .to_string()
}

/// A remembered successful verification: the stored hash it was checked against, a keyed
/// digest of the secret that passed, and when.
type Verified = (String, [u8; 32], Instant);

/// Verifies secrets against stored hashes, remembering successes for `ttl`.
pub struct SecretVerifier {
    key: [u8; 32],
    ttl: Duration,
    verified: Mutex<HashMap<String, Verified>>,
}

impl SecretVerifier {
    pub fn new(ttl: Duration) -> SecretVerifier {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        SecretVerifier { key, ttl, verified: Mutex::new(HashMap::new()) }
    }

    fn digest(&self, secret: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key length");
        mac.update(secret.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// True when `secret` matches `stored_hash` (the client's PHC string).
    pub fn verify(&self, client_id: &str, secret: &str, stored_hash: &str) -> bool {
        let digest = self.digest(secret);
        {
            let cache = self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some((hash, cached, at)) = cache.get(client_id) {
                // A cached success only counts for the same stored hash (a re-keyed client
                // invalidates it) and within its lifetime.
                if hash == stored_hash && at.elapsed() < self.ttl {
                    return bool::from(cached.ct_eq(&digest));
                }
            }
        }
        let Ok(parsed) = PasswordHash::new(stored_hash) else { return false };
        if Argon2::default().verify_password(secret.as_bytes(), &parsed).is_err() {
            return false;
        }
        let mut cache = self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(client_id.to_owned(), (stored_hash.to_owned(), digest, Instant::now()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let credentials = generate_credentials();
        assert!(credentials.client_id.starts_with("bh_"));
        let hash = hash_secret(&credentials.client_secret);
        assert!(hash.starts_with("$argon2id$"));
        assert!(!hash.contains(&credentials.client_secret));
        let verifier = SecretVerifier::new(Duration::from_secs(60));
        assert!(verifier.verify("c", &credentials.client_secret, &hash));
        // Cached path: still exact.
        assert!(verifier.verify("c", &credentials.client_secret, &hash));
        assert!(!verifier.verify("c", "wrong", &hash));
        assert!(!verifier.verify("c", &credentials.client_secret, "not a phc string"));
    }
}
