//! Client credentials: generation, storage as a keyed hash, and verification.
//!
//! Secrets are generated here, 256 random bits each, so a slow password hash buys nothing: no
//! dictionary can guess them. They are stored as `hmac-sha256$<base64url>`, an HMAC-SHA-256 of
//! the client id and the secret under a server-wide key kept in the database (so every instance
//! on one database verifies the same rows), and compared in constant time. A wrong secret then
//! costs what an unknown client id costs: one database lookup and one HMAC.
//!
//! Rows written by older versions hold an Argon2id PHC string. They are still accepted, and
//! rewritten as keyed hashes on their next successful use; until then a wrong secret for such a
//! row costs one Argon2 run, so those runs are serialised (memory stays at one Argon2 instance)
//! and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bulkhead_store::{ClientRecord, Store, StoreError, TenantId};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::log_value::log_value;

/// The name of the secret-hash key in the store's server keys.
const KEY_NAME: &str = "client-secret-hmac";

/// The prefix of a keyed secret hash.
const HMAC_PREFIX: &str = "hmac-sha256$";

/// Longest secret ever compared: generated ones are 43 characters.
pub const MAX_SECRET_LEN: usize = 256;

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
    let client_secret = URL_SAFE_NO_PAD.encode(secret);
    NewCredentials { client_id, client_secret }
}

/// Generates credentials for a new client of `tenant` and stores the client with its keyed
/// secret hash. The one way clients are made (admin API, CLI, tests).
pub fn register_client(store: &dyn Store, tenant: TenantId) -> Result<(ClientRecord, NewCredentials), StoreError> {
    let credentials = generate_credentials();
    let record = store_client(store, tenant, &credentials.client_id, &credentials.client_secret)?;
    Ok((record, credentials))
}

/// Stores a client with a given id and secret (tests that reuse credentials across stores).
pub fn store_client(
    store: &dyn Store,
    tenant: TenantId,
    client_id: &str,
    secret: &str,
) -> Result<ClientRecord, StoreError> {
    let hash = SecretHasher::load(store)?.hash(client_id, secret);
    store.create_client(tenant, client_id, &hash)
}

/// Hashes a secret with Argon2id into a PHC string, as versions before the keyed hash stored
/// secrets. Only for tests and tools that need such a row.
pub fn legacy_argon2_hash(secret: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("argon2 with default parameters cannot fail on a valid salt")
        .to_string()
}

/// The keyed hash of client secrets.
pub struct SecretHasher {
    key: Vec<u8>,
}

impl std::fmt::Debug for SecretHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHasher { key: <redacted> }")
    }
}

impl SecretHasher {
    /// The store's key, created (256 random bits) by the first process that asks.
    pub fn load(store: &dyn Store) -> Result<SecretHasher, StoreError> {
        let mut candidate = [0u8; 32];
        rand::rng().fill_bytes(&mut candidate);
        let key = store.server_key(KEY_NAME, &candidate)?;
        if key.len() < 32 {
            return Err(StoreError::Database(format!("server key '{KEY_NAME}' is shorter than 32 bytes")));
        }
        Ok(SecretHasher { key })
    }

    /// The MAC binds the client id, so a hash copied to another row does not verify there.
    fn mac(&self, client_id: &str, secret: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key length");
        mac.update(b"bulkhead client secret\0");
        mac.update(client_id.as_bytes());
        mac.update(b"\0");
        mac.update(secret.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The stored form of a secret.
    pub fn hash(&self, client_id: &str, secret: &str) -> String {
        format!("{HMAC_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.mac(client_id, secret)))
    }
}

/// Verifies presented credentials against the store.
pub struct SecretVerifier {
    hasher: OnceLock<SecretHasher>,
    /// One Argon2 run at a time: each takes ~19 MiB and tens of milliseconds.
    argon2_gate: Mutex<()>,
    argon2_runs: AtomicU64,
}

impl Default for SecretVerifier {
    fn default() -> Self {
        SecretVerifier::new()
    }
}

impl SecretVerifier {
    pub fn new() -> SecretVerifier {
        SecretVerifier { hasher: OnceLock::new(), argon2_gate: Mutex::new(()), argon2_runs: AtomicU64::new(0) }
    }

    /// How many Argon2 verifications ran (legacy rows only).
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(Ordering::Relaxed)
    }

    fn hasher(&self, store: &dyn Store) -> Result<&SecretHasher, StoreError> {
        if let Some(hasher) = self.hasher.get() {
            return Ok(hasher);
        }
        let loaded = SecretHasher::load(store)?;
        Ok(self.hasher.get_or_init(|| loaded))
    }

    /// The active client `client_id` when `secret` is its secret, else `None`. An unknown id, a
    /// revoked client and a wrong secret cost the same (one lookup, one HMAC) and look the same.
    /// A legacy Argon2 row that verifies is rewritten as a keyed hash.
    pub fn check(&self, store: &dyn Store, client_id: &str, secret: &str) -> Result<Option<ClientRecord>, StoreError> {
        let hasher = self.hasher(store)?;
        let record = store.client(client_id)?;
        let presented = hasher.mac(client_id, secret);
        let Some(record) = record else {
            // Same work as a known id: compare against a value no MAC equals in practice.
            let _ = bool::from(presented.ct_eq(&[0u8; 32]));
            return Ok(None);
        };
        let matches = if let Some(stored) = record.secret_hash.strip_prefix(HMAC_PREFIX) {
            let stored = URL_SAFE_NO_PAD.decode(stored).unwrap_or_default();
            bool::from(presented.as_slice().ct_eq(stored.as_slice()))
        } else if self.argon2_matches(secret, &record.secret_hash) {
            self.migrate(store, hasher, &record, secret);
            true
        } else {
            false
        };
        Ok((matches && !record.revoked).then_some(record))
    }

    fn argon2_matches(&self, secret: &str, stored_hash: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(stored_hash) else { return false };
        let _gate = self.argon2_gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.argon2_runs.fetch_add(1, Ordering::Relaxed);
        Argon2::default().verify_password(secret.as_bytes(), &parsed).is_ok()
    }

    /// Rewrites a verified legacy row as a keyed hash; a failure only means the next login
    /// runs Argon2 again.
    fn migrate(&self, store: &dyn Store, hasher: &SecretHasher, record: &ClientRecord, secret: &str) {
        let new_hash = hasher.hash(&record.client_id, secret);
        match store.replace_client_secret_hash(&record.client_id, &record.secret_hash, &new_hash) {
            Ok(_) => {
                tracing::info!(client_id = %log_value(&record.client_id), "client secret rehashed with the server key")
            }
            Err(error) => {
                tracing::warn!(client_id = %log_value(&record.client_id), error = %error, "rehashing a client secret failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_store::sqlite::SqliteStore;

    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore, TenantId) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("bulkhead.db")).unwrap();
        let tenant = store.create_tenant("acme").unwrap().id;
        (dir, store, tenant)
    }

    #[test]
    fn keyed_hashes_verify_and_never_contain_the_secret() {
        let (_dir, store, tenant) = store();
        let (record, credentials) = register_client(&store, tenant).unwrap();
        assert!(credentials.client_id.starts_with("bh_"));
        assert!(record.secret_hash.starts_with(HMAC_PREFIX));
        assert!(!record.secret_hash.contains(&credentials.client_secret));
        let verifier = SecretVerifier::new();
        let found = verifier.check(&store, &credentials.client_id, &credentials.client_secret).unwrap();
        assert_eq!(found.map(|record| record.tenant), Some(tenant));
        assert!(verifier.check(&store, &credentials.client_id, "wrong").unwrap().is_none());
        assert!(verifier.check(&store, "bh_unknown", &credentials.client_secret).unwrap().is_none());
        assert_eq!(verifier.argon2_runs(), 0);
        // A second verifier (another process) on the same database uses the same key.
        assert!(SecretVerifier::new()
            .check(&store, &credentials.client_id, &credentials.client_secret)
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_hash_does_not_verify_for_another_client() {
        let (_dir, store, tenant) = store();
        let (first, credentials) = register_client(&store, tenant).unwrap();
        store.create_client(tenant, "bh_copy", &first.secret_hash).unwrap();
        assert!(SecretVerifier::new().check(&store, "bh_copy", &credentials.client_secret).unwrap().is_none());
    }

    #[test]
    fn revoked_clients_are_refused() {
        let (_dir, store, tenant) = store();
        let (_, credentials) = register_client(&store, tenant).unwrap();
        store.revoke_client(&credentials.client_id).unwrap();
        let verifier = SecretVerifier::new();
        assert!(verifier.check(&store, &credentials.client_id, &credentials.client_secret).unwrap().is_none());
    }
}
