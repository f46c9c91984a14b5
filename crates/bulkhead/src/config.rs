//! Typed configuration: defaults < TOML file < environment (`BULKHEAD_*`) < command-line flags,
//! parsed once. An invalid value is a startup error that names the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Every setting of the server. Keys are the TOML keys; the environment variable of a key is
/// `BULKHEAD_` + the key in upper case (e.g. `BULKHEAD_DATA_DIR`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Directory holding the SQLite database, the token keys and the output directory.
    pub data_dir: PathBuf,
    /// Absolute base URL used in minted URLs; default: from the request's Host header.
    pub public_base_url: Option<String>,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Bearer token for the `/admin` API; the admin API is off when unset.
    pub admin_token: Option<String>,
    /// Most members a Group may list.
    pub max_group_members: usize,
    /// Most resources per export file.
    pub export_part_size: u64,
    /// When false, export file URLs authorise themselves (and expire after
    /// `self_authorising_url_ttl_seconds`).
    pub file_urls_require_credentials: bool,
    pub file_url_ttl_seconds: u64,
    pub self_authorising_url_ttl_seconds: u64,
    /// Seconds a client may take no bytes of a download (or any response) before it is
    /// disconnected.
    pub download_stall_timeout_seconds: u64,
    /// Seconds in-flight requests get to finish on shutdown.
    pub shutdown_grace_seconds: u64,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./bulkhead-data"),
            public_base_url: None,
            max_body_bytes: 16 * 1024 * 1024,
            admin_token: None,
            max_group_members: 100_000,
            export_part_size: 100_000,
            file_urls_require_credentials: true,
            file_url_ttl_seconds: 24 * 3600,
            self_authorising_url_ttl_seconds: 600,
            download_stall_timeout_seconds: 60,
            shutdown_grace_seconds: 30,
            log_format: LogFormat::Text,
        }
    }
}

/// Command-line overrides (only the ones given).
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// Loads the configuration from its layers.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            anyhow::ensure!(file.exists(), "config file {} does not exist", file.display());
            figment = figment.merge(Toml::file(file));
        }
        let config: Config = figment
            .merge(Env::prefixed("BULKHEAD_").ignore(&["config"]))
            .merge(Serialized::defaults(overrides))
            .extract()
            // Name the key as the file spells it: figment alone names an environment variable's
            // key as `EXPORT_PART_SIZE`.
            .map_err(|error| match error.path.join(".") {
                key if key.is_empty() => anyhow::anyhow!("invalid configuration: {error}"),
                key => anyhow::anyhow!("invalid configuration: {key}: {error}"),
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.listen.parse::<std::net::SocketAddr>().with_context(|| {
            format!("invalid configuration: listen = '{}' is not an address like 127.0.0.1:8080", self.listen)
        })?;
        anyhow::ensure!(self.max_body_bytes >= 1024, "invalid configuration: max_body_bytes must be at least 1024");
        anyhow::ensure!(self.export_part_size >= 1, "invalid configuration: export_part_size must be at least 1");
        anyhow::ensure!(self.max_group_members >= 1, "invalid configuration: max_group_members must be at least 1");
        anyhow::ensure!(
            self.download_stall_timeout_seconds >= 1,
            "invalid configuration: download_stall_timeout_seconds must be at least 1"
        );
        if let Some(base) = &self.public_base_url {
            anyhow::ensure!(
                base.starts_with("http://") || base.starts_with("https://"),
                "invalid configuration: public_base_url must start with http:// or https://"
            );
        }
        if let Some(token) = &self.admin_token {
            anyhow::ensure!(token.len() >= 16, "invalid configuration: admin_token must be at least 16 characters");
        }
        Ok(())
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("bulkhead.db")
    }

    pub fn http_config(&self) -> bulkhead_http::HttpConfig {
        bulkhead_http::HttpConfig {
            public_base_url: self.public_base_url.clone(),
            max_body_bytes: self.max_body_bytes,
            admin_token: self.admin_token.clone(),
            max_group_members: self.max_group_members,
            export_part_size: self.export_part_size,
            file_urls_require_credentials: self.file_urls_require_credentials,
            file_url_ttl: Duration::from_secs(self.file_url_ttl_seconds),
            self_authorising_url_ttl: Duration::from_secs(self.self_authorising_url_ttl_seconds),
            download_stall_timeout: Duration::from_secs(self.download_stall_timeout_seconds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_errors_name_the_key() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("bulkhead.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\nexport_part_size = 10\n").unwrap();
        let config = Config::load(Some(&file), Overrides::default()).unwrap();
        assert_eq!((config.listen.as_str(), config.export_part_size), ("127.0.0.1:9000", 10));
        let overrides = Overrides { listen: Some("127.0.0.1:9001".into()), data_dir: None };
        assert_eq!(Config::load(Some(&file), overrides).unwrap().listen, "127.0.0.1:9001");
        std::fs::write(&file, "export_part_size = \"many\"\n").unwrap();
        let error = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("export_part_size"), "{error}");
        std::fs::write(&file, "no_such_key = 1\n").unwrap();
        let error = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("no_such_key"), "{error}");
        std::fs::write(&file, "listen = \"nowhere\"\n").unwrap();
        let error = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("listen"), "{error}");
    }
}
