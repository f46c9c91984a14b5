//! The server's token keys: the keys that sign file URLs and access tokens, kept in the store
//! (table `token_signing_keys`: the data directory's SQLite, or PostgreSQL), so every instance on
//! one database signs and verifies with the same keys. The first key not retired signs; every
//! key verifies. `bulkhead keys rotate` puts a new signing key first and marks the previous one
//! retired at that time: it keeps verifying what it signed until that can have expired (the
//! longest file-URL or access-token lifetime after its retirement), then it is dropped. Every
//! running instance checks the keys' version once a second and uses the new key for everything
//! it signs from then on.
//!
//! Versions before this one kept the keys in the file `token-keys` in the data directory, one
//! `kid secret [retired=SECONDS]` line per key (secret base64url); a store without keys imports
//! that file once when it is opened, so URLs and tokens signed before the upgrade still verify.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bulkhead_export::token::{KeyRing, TokenKeys};
use bulkhead_store::{Store, TokenKey};
use rand::RngCore;

use crate::config::Config;

/// The key file of earlier versions, imported once.
const FILE_NAME: &str = "token-keys";

fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// How long a retired key must keep verifying: the longest lifetime of anything it signed.
pub fn retention(config: &Config) -> Duration {
    [
        Duration::from_secs(config.file_url_ttl_seconds),
        Duration::from_secs(config.self_authorising_url_ttl_seconds),
        bulkhead_http::access_token::MAX_ACCESS_TOKEN_TTL,
    ]
    .into_iter()
    .max()
    .unwrap_or_default()
}

fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

fn random_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    secret
}

/// The keys of an earlier version's key file, in its order (newest first).
fn read_key_file(path: &Path) -> anyhow::Result<Vec<TokenKey>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}:{}", path.display(), number + 1);
        let mut fields = line.split_whitespace();
        let (Some(kid), Some(secret)) = (fields.next(), fields.next()) else {
            anyhow::bail!("{}: expected 'kid secret [retired=SECONDS]'", at());
        };
        let secret =
            URL_SAFE_NO_PAD.decode(secret).with_context(|| format!("{}: the secret is not base64url", at()))?;
        let retired = match fields.next() {
            None => None,
            Some(field) => Some(
                field
                    .strip_prefix("retired=")
                    .and_then(|seconds| seconds.parse::<i64>().ok())
                    .with_context(|| format!("{}: expected retired=SECONDS, not '{field}'", at()))?,
            ),
        };
        anyhow::ensure!(fields.next().is_none(), "{}: unexpected text after the key", at());
        keys.push(TokenKey { kid: kid.to_owned(), secret, retired });
    }
    anyhow::ensure!(
        keys.first().is_some_and(|first| first.retired.is_none()),
        "{}: the first key must be a signing key (not retired)",
        path.display()
    );
    // Checked before it is stored: the store must never hold keys that cannot be loaded.
    TokenKeys::new(keys.iter().map(|key| (key.kid.clone(), key.secret.clone())).collect())
        .with_context(|| format!("invalid token keys in {}", path.display()))?;
    Ok(keys)
}

/// The keys in force at `now`: every key but retired ones whose retention has passed.
fn in_force(keys: Vec<TokenKey>, retention: Duration, now: i64) -> Vec<TokenKey> {
    keys.into_iter()
        .filter(|key| key.retired.is_none_or(|retired| retired.saturating_add(retention.as_secs() as i64) > now))
        .collect()
}

/// Makes sure the store holds token keys: the first time, it imports the data directory's
/// `token-keys` file of an earlier version, or creates one random key when there is none. (When
/// several instances start at once, the first to store its keys wins and the others use them.)
pub fn ensure_token_keys(config: &Config, store: &dyn Store) -> anyhow::Result<()> {
    if !store.token_keys().context("reading the token keys")?.is_empty() {
        return Ok(());
    }
    let path = key_path(&config.data_dir);
    let (keys, imported) = if path.is_file() {
        (read_key_file(&path)?, true)
    } else {
        (vec![TokenKey { kid: "k1".into(), secret: random_secret(), retired: None }], false)
    };
    if store.init_token_keys(&keys).context("storing the token keys")? {
        if imported {
            tracing::info!(
                file = %path.display(),
                keys = keys.len(),
                "token keys imported into the database; the file is no longer read (delete it once no older bulkhead uses this data directory)"
            );
        } else {
            tracing::info!("created the token signing key in the database");
        }
    }
    Ok(())
}

/// The keys a server signs and verifies with, from the store's keys.
fn token_keys_in_force(config: &Config, keys: Vec<TokenKey>) -> anyhow::Result<TokenKeys> {
    let keys = in_force(keys, retention(config), now_seconds());
    anyhow::ensure!(
        keys.first().is_some_and(|first| first.retired.is_none()),
        "the database holds no signing key (the newest token key is retired): run bulkhead keys rotate"
    );
    TokenKeys::new(keys.into_iter().map(|key| (key.kid, key.secret)).collect())
        .context("invalid token keys in the database")
}

/// Loads the token keys of the store, storing them first when it has none
/// ([`ensure_token_keys`]).
pub fn load_token_keys(config: &Config, store: &dyn Store) -> anyhow::Result<TokenKeys> {
    ensure_token_keys(config, store)?;
    token_keys_in_force(config, store.token_keys().context("reading the token keys")?)
}

/// `bulkhead keys rotate`: a new signing key first, the previous one retired now, keys whose
/// retention has passed dropped, in one transaction of the store every instance shares.
pub fn rotate(config: &Config) -> anyhow::Result<()> {
    let store = crate::admin::open_existing_store(config)?;
    ensure_token_keys(config, &*store)?;
    let now = now_seconds();
    let keys = store
        .rotate_token_keys(&random_secret(), now, now.saturating_sub(retention(config).as_secs() as i64))
        .context("rotating the token keys")?;
    let kid = keys.first().map_or("?", |key| key.kid.as_str());
    let retired: Vec<&str> = keys[1..].iter().map(|key| key.kid.as_str()).collect();
    let until = bulkhead_fhir::format_instant((now + retention(config).as_secs() as i64).saturating_mul(1_000_000));
    say!(
        "new signing key {kid}; {} keep verifying what they signed (at most until {until}); every server on this database uses it within a second",
        if retired.is_empty() { "no older keys".to_owned() } else { retired.join(", ") }
    );
    Ok(())
}

/// Reloads the store's keys into `ring` whenever their version changes (checked once a second:
/// one indexed read), and once a minute regardless, so retired keys drop out when their
/// retention passes; for as long as the ring is in use. While the store cannot be read, the
/// previous keys stay (one warning per outage).
pub fn spawn_reloader(config: &Config, store: &Arc<dyn Store>, ring: &Arc<KeyRing>) {
    let ring = Arc::downgrade(ring);
    let store = Arc::downgrade(store);
    let config = config.clone();
    let mut seen = None;
    let mut last_load = std::time::Instant::now();
    let mut failing = false;
    let spawned = std::thread::Builder::new().name("token-keys".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let (Some(ring), Some(store)) = (ring.upgrade(), store.upgrade()) else { return };
        let loaded = store.token_keys_version().map_err(anyhow::Error::from).and_then(|version| {
            if seen == Some(version) && last_load.elapsed() < Duration::from_secs(60) {
                return Ok(None);
            }
            let keys = token_keys_in_force(&config, store.token_keys()?)?;
            Ok(Some((version, keys)))
        });
        match loaded {
            Ok(None) => failing = false,
            Ok(Some((version, keys))) => {
                failing = false;
                if ring.get().kids().ne(keys.kids()) {
                    tracing::info!(signing_kid = keys.current_kid(), "token keys reloaded");
                }
                ring.replace(keys);
                seen = Some(version);
                last_load = std::time::Instant::now();
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(error = %format!("{error:#}"), "token keys not reloaded; the previous keys stay");
                }
                failing = true;
            }
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(error = %error, "could not start the token key reloader");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_store::sqlite::SqliteStore;

    fn config(dir: &Path) -> Config {
        Config { data_dir: dir.to_owned(), ..Config::default() }
    }

    fn file_ref() -> bulkhead_export::token::FileRef {
        bulkhead_export::token::FileRef {
            tenant: 1,
            record: [7; 16],
            file: 0,
            // Fixed (far ahead), so two calls make the same reference whenever they run.
            exp: 4_000_000_000,
            requires_credentials: true,
        }
    }

    #[test]
    fn rotation_signs_with_the_new_key_and_keeps_the_old_until_retention_passes() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let store = SqliteStore::open(&config.database_path()).unwrap();
        let first = load_token_keys(&config, &store).unwrap();
        assert_eq!(first.current_kid(), "k1");
        assert_eq!(load_token_keys(&config, &store).unwrap().sign(&file_ref()), first.sign(&file_ref()), "kept");
        assert!(!key_path(dir.path()).exists(), "no key file on the instance's disk");
        let old_token = first.sign(&file_ref());

        rotate(&config).unwrap();
        let rotated = load_token_keys(&config, &store).unwrap();
        assert_eq!(rotated.current_kid(), "k2");
        assert_eq!(rotated.kids().collect::<Vec<_>>(), ["k2", "k1"]);
        assert_eq!(rotated.verify(&old_token, now_seconds()), Ok(file_ref()), "the old key still verifies");
        assert_ne!(rotated.sign(&file_ref()), old_token);

        rotate(&config).unwrap();
        assert_eq!(load_token_keys(&config, &store).unwrap().kids().collect::<Vec<_>>(), ["k3", "k2", "k1"]);
        // Past the retention, retired keys stop verifying and the next rotation drops them.
        let later = now_seconds() + retention(&config).as_secs() as i64 + 1;
        let kept: Vec<String> =
            in_force(store.token_keys().unwrap(), retention(&config), later).into_iter().map(|key| key.kid).collect();
        assert_eq!(kept, ["k3"]);
    }

    /// An upgraded data directory: its `token-keys` file is imported once, so what the old
    /// keys signed keeps verifying; the file is not read again (a rotation goes to the store).
    #[test]
    fn an_earlier_versions_key_file_is_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let old = TokenKeys::new(vec![("k7".into(), vec![7; 32]), ("k6".into(), vec![6; 32])]).unwrap();
        let signed_before = old.sign(&file_ref());
        let retired = now_seconds() - 10;
        let file = format!(
            "# comment\nk7 {}\nk6 {} retired={retired}\n",
            URL_SAFE_NO_PAD.encode([7; 32]),
            URL_SAFE_NO_PAD.encode([6; 32])
        );
        std::fs::write(key_path(dir.path()), &file).unwrap();
        let store = SqliteStore::open(&config.database_path()).unwrap();
        let loaded = load_token_keys(&config, &store).unwrap();
        assert_eq!(loaded.kids().collect::<Vec<_>>(), ["k7", "k6"]);
        assert_eq!(loaded.verify(&signed_before, now_seconds()), Ok(file_ref()));
        assert_eq!(loaded.sign(&file_ref()), signed_before, "the imported signing key signs");
        assert_eq!(store.token_keys().unwrap()[1].retired, Some(retired));

        rotate(&config).unwrap();
        std::fs::write(key_path(dir.path()), format!("k1 {}\n", URL_SAFE_NO_PAD.encode([1; 32]))).unwrap();
        let after = load_token_keys(&config, &store).unwrap();
        assert_eq!(after.kids().collect::<Vec<_>>(), ["k8", "k7", "k6"], "the file is not imported twice");
        assert_eq!(after.verify(&signed_before, now_seconds()), Ok(file_ref()));
    }

    #[test]
    fn a_malformed_key_file_is_refused_with_its_line_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let store = SqliteStore::open(&config.database_path()).unwrap();
        std::fs::write(key_path(dir.path()), "k1 c2VjcmV0 retired=soon\n").unwrap();
        let error = format!("{:#}", load_token_keys(&config, &store).unwrap_err());
        assert!(error.contains(":1:") && error.contains("retired=SECONDS"), "{error}");
        std::fs::write(key_path(dir.path()), "k1 c2VjcmV0 retired=100\n").unwrap();
        let error = format!("{:#}", load_token_keys(&config, &store).unwrap_err());
        assert!(error.contains("first key"), "{error}");
        assert_eq!(store.token_keys().unwrap(), vec![], "nothing half-imported");
    }
}
