//! The server's token keys: the file `token-keys` in the data directory, one `kid secret` line
//! per key (secret base64url), the first line signing file URLs and access tokens, every line
//! verifying. `bulkhead keys rotate` puts a new signing key first and marks the previous one
//! `retired=<unix seconds>`: it keeps verifying what it signed until that can have expired (the
//! longest file-URL or access-token lifetime after its retirement), then it is dropped. A running
//! server notices the rewritten file within a second and uses the new key for everything it
//! signs from then on.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bulkhead_export::token::{KeyRing, TokenKeys};
use rand::RngCore;

use crate::config::Config;

const FILE_NAME: &str = "token-keys";

/// One line of the key file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyLine {
    kid: String,
    secret: Vec<u8>,
    /// When it stopped signing (Unix seconds); `None` for keys that never did, or sign now.
    retired: Option<i64>,
}

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

/// Creates the key file with one random key when there is none (another process creating it
/// first wins).
fn create_if_missing(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let line = format!("k1 {}\n", URL_SAFE_NO_PAD.encode(random_secret()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => file.write_all(line.as_bytes()).with_context(|| format!("writing {}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error).with_context(|| format!("creating {}", path.display())),
    }
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<KeyLine>> {
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
        keys.push(KeyLine { kid: kid.to_owned(), secret, retired });
    }
    Ok(keys)
}

/// The keys in force at `now`: every key but retired ones whose retention has passed.
fn in_force(lines: Vec<KeyLine>, retention: Duration, now: i64) -> Vec<KeyLine> {
    lines
        .into_iter()
        .filter(|line| line.retired.is_none_or(|retired| retired.saturating_add(retention.as_secs() as i64) > now))
        .collect()
}

/// Loads the token keys of a data directory, creating one random key the first time.
pub fn load_token_keys(config: &Config) -> anyhow::Result<TokenKeys> {
    let path = key_path(&config.data_dir);
    create_if_missing(&path)?;
    let lines = in_force(read_lines(&path)?, retention(config), now_seconds());
    anyhow::ensure!(
        lines.first().is_some_and(|first| first.retired.is_none()),
        "{}: the first key must be a signing key (not retired)",
        path.display()
    );
    let keys = lines.into_iter().map(|line| (line.kid, line.secret)).collect();
    TokenKeys::new(keys).with_context(|| format!("invalid token keys in {}", path.display()))
}

/// `bulkhead keys rotate`: a new signing key first, the previous one retired now, keys whose
/// retention has passed dropped. Written to a new file renamed over the old one, so a reader
/// sees either version whole.
pub fn rotate(config: &Config) -> anyhow::Result<()> {
    let path = key_path(&config.data_dir);
    anyhow::ensure!(
        config.database_path().is_file(),
        "no Bulkhead data directory at {} ({})",
        config.data_dir.display(),
        crate::admin::data_dir_flag(config)
    );
    create_if_missing(&path)?;
    let now = now_seconds();
    let mut lines = in_force(read_lines(&path)?, retention(config), now);
    let next = lines.iter().filter_map(|line| line.kid.strip_prefix('k')?.parse::<u64>().ok()).max().unwrap_or(0) + 1;
    let kid = format!("k{next}");
    anyhow::ensure!(!lines.iter().any(|line| line.kid == kid), "the key id {kid} is taken");
    for line in &mut lines {
        line.retired.get_or_insert(now);
    }
    lines.insert(0, KeyLine { kid: kid.clone(), secret: random_secret(), retired: None });
    let mut text =
        String::from("# Bulkhead token keys: the first signs; retired keys verify until what they signed expired.\n");
    for line in &lines {
        text.push_str(&format!("{} {}", line.kid, URL_SAFE_NO_PAD.encode(&line.secret)));
        if let Some(retired) = line.retired {
            text.push_str(&format!(" retired={retired}"));
        }
        text.push('\n');
    }
    let temporary = path.with_extension("new");
    let _ = std::fs::remove_file(&temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temporary).with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, &path).with_context(|| format!("replacing {}", path.display()))?;
    let retired: Vec<&str> = lines[1..].iter().map(|line| line.kid.as_str()).collect();
    let until = bulkhead_fhir::format_instant((now + retention(config).as_secs() as i64).saturating_mul(1_000_000));
    say!(
        "new signing key {kid}; {} keep verifying what they signed (at most until {until})",
        if retired.is_empty() { "no older keys".to_owned() } else { retired.join(", ") }
    );
    Ok(())
}

/// Reloads the key file into `ring` whenever it changes (or once a minute, so retired keys drop
/// out when their retention passes), for as long as the ring is in use.
pub fn spawn_reloader(config: &Config, ring: &Arc<KeyRing>) {
    let ring = Arc::downgrade(ring);
    let config = config.clone();
    let path = key_path(&config.data_dir);
    let modified = |path: &Path| std::fs::metadata(path).and_then(|metadata| metadata.modified()).ok();
    let mut seen = modified(&path);
    let mut last_load = std::time::Instant::now();
    let spawned = std::thread::Builder::new().name("token-keys".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(ring) = ring.upgrade() else { return };
        let now = modified(&path);
        if now == seen && last_load.elapsed() < Duration::from_secs(60) {
            continue;
        }
        seen = now;
        last_load = std::time::Instant::now();
        match load_token_keys(&config) {
            Ok(keys) => {
                if ring.get().kids().ne(keys.kids()) {
                    tracing::info!(signing_kid = keys.current_kid(), "token keys reloaded");
                }
                ring.replace(keys);
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "token keys not reloaded; the previous keys stay")
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

    fn config(dir: &Path) -> Config {
        Config { data_dir: dir.to_owned(), ..Config::default() }
    }

    #[test]
    fn rotation_signs_with_the_new_key_and_keeps_the_old_until_retention_passes() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        std::fs::write(config.database_path(), b"").unwrap();
        let first = load_token_keys(&config).unwrap();
        assert_eq!(first.current_kid(), "k1");
        let file = bulkhead_export::token::FileRef {
            tenant: 1,
            record: [7; 16],
            file: 0,
            exp: now_seconds() + 60,
            requires_credentials: true,
        };
        let old_token = first.sign(&file);

        rotate(&config).unwrap();
        let rotated = load_token_keys(&config).unwrap();
        assert_eq!(rotated.current_kid(), "k2");
        assert_eq!(rotated.kids().collect::<Vec<_>>(), ["k2", "k1"]);
        assert_eq!(rotated.verify(&old_token, now_seconds()), Ok(file), "the old key still verifies");
        assert_ne!(rotated.sign(&file), old_token);

        rotate(&config).unwrap();
        assert_eq!(load_token_keys(&config).unwrap().kids().collect::<Vec<_>>(), ["k3", "k2", "k1"]);
        // Past the retention, retired keys stop verifying and the next rotation drops them.
        let lines = read_lines(&key_path(dir.path())).unwrap();
        let later = now_seconds() + retention(&config).as_secs() as i64 + 1;
        let kept: Vec<String> = in_force(lines, retention(&config), later).into_iter().map(|line| line.kid).collect();
        assert_eq!(kept, ["k3"]);
    }

    #[test]
    fn a_malformed_key_file_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        std::fs::write(key_path(dir.path()), "k1 c2VjcmV0 retired=soon\n").unwrap();
        let error = format!("{:#}", load_token_keys(&config).unwrap_err());
        assert!(error.contains(":1:") && error.contains("retired=SECONDS"), "{error}");
        std::fs::write(key_path(dir.path()), "k1 c2VjcmV0 retired=100\n").unwrap();
        let error = format!("{:#}", load_token_keys(&config).unwrap_err());
        assert!(error.contains("first key"), "{error}");
    }
}
