//! Typed configuration: defaults < TOML file < environment (`BULKHEAD_*`) < command-line flags,
//! parsed once. An invalid value is a startup error that names the key. An unknown key in the file
//! is an error too (a typo must not pass silently), but an unknown `BULKHEAD_*` variable is only a
//! warning: the environment is shared with others (Kubernetes injects `BULKHEAD_PORT=tcp://…`
//! for a Service named `bulkhead`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_http::validate::ValidationMode;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Every setting of the server. Keys are the TOML keys; the environment variable of a key is
/// `BULKHEAD_` + the key in upper case (e.g. `BULKHEAD_DATA_DIR`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `BULKHEAD_*` environment variables that name no key (ignored; see [`Config::warn_ignored`]).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
    /// Address to listen on.
    pub listen: String,
    /// Directory holding the SQLite database, the token keys and the output directory.
    pub data_dir: PathBuf,
    /// PostgreSQL instead of SQLite: `postgres://USER[:PASSWORD]@HOST:PORT/DATABASE`. The data
    /// directory then holds only the token keys and the output directory.
    pub database_url: Option<String>,
    /// PostgreSQL connections this process keeps open at most (its pool's size).
    pub database_max_connections: u32,
    /// Seconds opening a PostgreSQL connection may take.
    pub database_connect_timeout_seconds: u64,
    /// Seconds a request waits for a free pooled connection before it is answered 503.
    pub database_pool_timeout_seconds: u64,
    /// Longest a single PostgreSQL statement may run, in seconds (`statement_timeout`).
    pub database_statement_timeout_seconds: u64,
    /// Absolute base URL used in minted URLs; default: from the request's Host header when
    /// `trust_host_header`.
    pub public_base_url: Option<String>,
    /// Whether the Host header may name the server in minted URLs when `public_base_url` is
    /// unset; default: only when listening on a loopback address.
    pub trust_host_header: Option<bool>,
    /// Seconds a client has to send a request's headers (also how long an idle keep-alive
    /// connection stays open).
    pub header_read_timeout_seconds: u64,
    /// Longest pause, in seconds, within a request body.
    pub body_idle_timeout_seconds: u64,
    /// Seconds from a request's headers to the start of its response (a download's streaming
    /// after that is not counted).
    pub request_timeout_seconds: u64,
    /// Open connections at most; more are answered 503.
    pub max_connections: usize,
    /// Failed logins per peer address (IPv6: per /64), and per client id, in each window of
    /// `failed_login_window_seconds`, before further attempts get 429.
    pub failed_logins_per_peer: u32,
    pub failed_logins_per_client: u32,
    pub failed_login_window_seconds: u64,
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
    /// Output store for asynchronous exports, `s3://BUCKET/PREFIX`; unset: files stream from the
    /// database. Endpoint, region and credentials below, each defaulting to its `AWS_*` variable.
    pub output_url: Option<String>,
    pub output_endpoint: Option<String>,
    pub output_region: Option<String>,
    pub output_access_key_id: Option<String>,
    pub output_secret_access_key: Option<String>,
    /// Allow a plain-HTTP `output_endpoint` (a local test server; `AWS_ALLOW_HTTP`).
    pub output_allow_http: Option<bool>,
    /// Manifests of materialised exports list presigned S3 URLs (`requiresAccessToken: false`,
    /// expiring with the job) instead of Bulkhead URLs that need credentials.
    pub output_presigned_urls: bool,
    /// `/healthz/ready` (and `/healthz`) answer 503 when the data directory's disk has less free space than this.
    pub min_free_disk_bytes: u64,
    /// Seconds a client may take no bytes of a download (or any response) before it is
    /// disconnected.
    pub download_stall_timeout_seconds: u64,
    /// Export file downloads streamed at once; more wait (see `download_queue_seconds`).
    pub max_concurrent_downloads: usize,
    /// Seconds a download beyond `max_concurrent_downloads` waits for a stream before it is
    /// answered 429 with `Retry-After` (0: at once).
    pub download_queue_seconds: u64,
    /// Export plans computed at once; more kick-offs queue (see `plan_queue_seconds`).
    pub max_concurrent_plans: usize,
    /// Seconds a synchronous kick-off beyond `max_concurrent_plans` waits for a planner before
    /// it is answered 429 with `Retry-After` (0: at once). Asynchronous jobs wait as long as it
    /// takes.
    pub plan_queue_seconds: u64,
    /// `$upload-ndjson` bodies imported at once; one more waits `upload_queue_seconds` for a
    /// place, then gets 429 with `Retry-After`.
    pub max_concurrent_uploads: usize,
    pub upload_queue_seconds: u64,
    /// Threads for blocking work (store calls, export streams, uploads) at most; more such work
    /// queues. Each thread keeps its own allocator heap, so fewer threads hold less memory.
    pub max_blocking_threads: usize,
    /// Seconds in-flight requests get to finish on shutdown.
    pub shutdown_grace_seconds: u64,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// `strict`: every write is validated against R4; `off`: stores what the client sent.
    pub validation: ValidationMode,
    /// Per-tenant exceptions to `validation`, by tenant name (`[tenant_validation]` table).
    pub tenant_validation: BTreeMap<String, ValidationMode>,
    /// Days audit records are kept before pruning (0: forever).
    pub audit_retention_days: u64,
    /// Whether the server records requests in the audit trail. Default on; off only to measure
    /// the trail's cost, or where no patient data is served.
    pub audit_trail: bool,
    /// Lifetime of SMART access tokens, in seconds, for clients registered without their own
    /// (`--token-ttl`); at most 3600.
    pub access_token_ttl_seconds: u64,
    /// Seconds one fetch of a client's JWKS URL may take.
    pub jwks_fetch_timeout_seconds: u64,
    /// Development only: accept plain-http JWKS URLs on any host (loopback hosts always may).
    pub allow_http_jwks_urls: bool,
    /// Serve Prometheus metrics at `/metrics` (needs `admin_token`, which it then requires).
    pub metrics: bool,
    /// Authenticated requests per second per tenant, beyond which 429 (0: no limit).
    pub tenant_requests_per_second: u32,
    /// Exports of one tenant at once across instances (unfinished asynchronous jobs and
    /// synchronous plans), beyond which a kick-off gets 429 (0: no limit).
    pub tenant_concurrent_exports: usize,
    /// `$upload-ndjson` body bytes per tenant per minute, beyond which 429 (0: no limit).
    pub tenant_upload_bytes_per_minute: u64,
    /// Export files one tenant streams at once: its share of `max_concurrent_downloads`.
    pub tenant_concurrent_downloads: usize,
    /// How long history (earlier versions, tombstones) is kept, e.g. `90d`; unset: for ever.
    pub history_retention: Option<String>,
    /// Seconds an instance's claim on an export job lasts without a heartbeat: another instance
    /// takes over the jobs of one that died this long after its last sign of progress.
    pub export_lease_seconds: u64,
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
            ignored_env: Vec::new(),
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./bulkhead-data"),
            database_url: None,
            database_max_connections: 16,
            database_connect_timeout_seconds: 5,
            database_pool_timeout_seconds: 10,
            database_statement_timeout_seconds: 60,
            public_base_url: None,
            trust_host_header: None,
            header_read_timeout_seconds: 10,
            body_idle_timeout_seconds: 30,
            request_timeout_seconds: 300,
            max_connections: 1024,
            failed_logins_per_peer: 20,
            failed_logins_per_client: 50,
            failed_login_window_seconds: 60,
            max_body_bytes: 16 * 1024 * 1024,
            admin_token: None,
            max_group_members: 100_000,
            export_part_size: 100_000,
            file_urls_require_credentials: true,
            file_url_ttl_seconds: 24 * 3600,
            self_authorising_url_ttl_seconds: 600,
            output_url: None,
            output_endpoint: None,
            output_region: None,
            output_access_key_id: None,
            output_secret_access_key: None,
            output_allow_http: None,
            output_presigned_urls: false,
            min_free_disk_bytes: 64 * 1024 * 1024,
            download_stall_timeout_seconds: 60,
            max_concurrent_downloads: 8,
            download_queue_seconds: 10,
            max_concurrent_plans: 2,
            plan_queue_seconds: 30,
            max_concurrent_uploads: 2,
            upload_queue_seconds: 10,
            max_blocking_threads: 32,
            shutdown_grace_seconds: 30,
            log_format: LogFormat::Text,
            validation: ValidationMode::Strict,
            tenant_validation: BTreeMap::new(),
            // Six years: HIPAA's retention period for compliance documentation.
            audit_retention_days: 6 * 366,
            audit_trail: true,
            access_token_ttl_seconds: 300,
            jwks_fetch_timeout_seconds: 5,
            allow_http_jwks_urls: false,
            metrics: false,
            tenant_requests_per_second: 0,
            tenant_concurrent_exports: 0,
            export_lease_seconds: 30,
            tenant_upload_bytes_per_minute: 0,
            tenant_concurrent_downloads: 4,
            history_retention: None,
        }
    }
}

/// The environment variables' prefix.
const PREFIX: &str = "BULKHEAD_";

/// Command-line overrides (only the ones given).
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_url: Option<String>,
}

impl Config {
    /// Loads the configuration from its layers.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            anyhow::ensure!(file.exists(), "config file {} does not exist", file.display());
            figment = figment.merge(Toml::file(file));
        }
        let keys = Config::keys();
        let ignored_env: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .filter(|name| name.get(..PREFIX.len()).is_some_and(|prefix| prefix.eq_ignore_ascii_case(PREFIX)))
            .filter(|name| {
                let key = name[PREFIX.len()..].to_ascii_lowercase();
                key != "config" && !keys.contains(&key)
            })
            .collect();
        let mut config: Config = figment
            .merge(
                Env::prefixed(PREFIX)
                    .ignore(&["config"])
                    .filter(move |key| keys.iter().any(|known| key.as_str().eq_ignore_ascii_case(known))),
            )
            .merge(Serialized::defaults(overrides))
            .extract()
            // Name the key as the file spells it: figment alone names an environment variable's
            // key as `EXPORT_PART_SIZE`.
            .map_err(|error| match error.path.join(".") {
                key if key.is_empty() => anyhow::anyhow!("invalid configuration: {error}"),
                key => anyhow::anyhow!("invalid configuration: {key}: {error}"),
            })?;
        config.validate()?;
        config.ignored_env = ignored_env;
        Ok(config)
    }

    /// Every key a file or the environment may set.
    fn keys() -> Vec<String> {
        match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Warns about each ignored `BULKHEAD_*` variable, by name only: its value may be a secret.
    pub fn warn_ignored(&self) {
        for name in &self.ignored_env {
            crate::warn(&format!(
                "ignoring environment variable {name}: no configuration key '{}'",
                name[PREFIX.len()..].to_ascii_lowercase()
            ));
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        // A host name (`localhost:8080`) is resolved here, as binding will resolve it.
        let resolved = std::net::ToSocketAddrs::to_socket_addrs(&self.listen).map(|mut addresses| addresses.next());
        anyhow::ensure!(
            matches!(resolved, Ok(Some(_))),
            "invalid configuration: listen = '{}' is not an address like 127.0.0.1:8080 or localhost:8080{}",
            self.listen,
            resolved.err().map(|error| format!(" ({error})")).unwrap_or_default()
        );
        anyhow::ensure!(self.max_body_bytes >= 1024, "invalid configuration: max_body_bytes must be at least 1024");
        anyhow::ensure!(self.export_part_size >= 1, "invalid configuration: export_part_size must be at least 1");
        anyhow::ensure!(self.max_group_members >= 1, "invalid configuration: max_group_members must be at least 1");
        anyhow::ensure!(
            self.download_stall_timeout_seconds >= 1,
            "invalid configuration: download_stall_timeout_seconds must be at least 1"
        );
        anyhow::ensure!(
            self.max_concurrent_downloads >= 1,
            "invalid configuration: max_concurrent_downloads must be at least 1"
        );
        anyhow::ensure!(
            self.max_concurrent_plans >= 1,
            "invalid configuration: max_concurrent_plans must be at least 1"
        );
        anyhow::ensure!(
            self.max_concurrent_uploads >= 1,
            "invalid configuration: max_concurrent_uploads must be at least 1"
        );
        // Downloads, plans (export jobs included) and uploads hold a blocking thread for as long
        // as they run, and a job writing to the output store waits on requests whose name
        // lookups run on the same pool: at least one thread must stay free for everything else.
        let held = self.max_concurrent_downloads + self.max_concurrent_plans + self.max_concurrent_uploads;
        anyhow::ensure!(
            self.max_blocking_threads > held,
            "invalid configuration: max_blocking_threads ({}) must exceed max_concurrent_downloads + max_concurrent_plans + max_concurrent_uploads ({held})",
            self.max_blocking_threads,
        );
        if let Some(base) = &self.public_base_url {
            anyhow::ensure!(
                base.starts_with("http://") || base.starts_with("https://"),
                "invalid configuration: public_base_url must start with http:// or https://"
            );
        }
        for (key, value) in [
            ("header_read_timeout_seconds", self.header_read_timeout_seconds),
            ("body_idle_timeout_seconds", self.body_idle_timeout_seconds),
            ("request_timeout_seconds", self.request_timeout_seconds),
            ("failed_login_window_seconds", self.failed_login_window_seconds),
            ("max_connections", self.max_connections as u64),
            ("database_max_connections", u64::from(self.database_max_connections)),
            ("database_connect_timeout_seconds", self.database_connect_timeout_seconds),
            ("database_pool_timeout_seconds", self.database_pool_timeout_seconds),
            ("database_statement_timeout_seconds", self.database_statement_timeout_seconds),
            ("failed_logins_per_peer", u64::from(self.failed_logins_per_peer)),
            ("failed_logins_per_client", u64::from(self.failed_logins_per_client)),
            ("access_token_ttl_seconds", self.access_token_ttl_seconds),
            ("jwks_fetch_timeout_seconds", self.jwks_fetch_timeout_seconds),
            ("export_lease_seconds", self.export_lease_seconds),
        ] {
            anyhow::ensure!(value >= 1, "invalid configuration: {key} must be at least 1");
        }
        anyhow::ensure!(
            self.public_base_url.is_some() || self.trust_host_header.is_some() || self.listens_on_loopback(),
            "invalid configuration: listening on {} (not loopback) needs public_base_url (the URL clients reach \
             this server at, used in every URL it hands out) or trust_host_header = true (only behind a proxy that \
             sets Host)",
            self.listen
        );
        if let Some(url) = &self.database_url {
            anyhow::ensure!(
                url.starts_with("postgres://") || url.starts_with("postgresql://"),
                "invalid configuration: database_url must be a postgres:// URL"
            );
        }
        anyhow::ensure!(
            self.access_token_ttl_seconds <= bulkhead_http::access_token::MAX_ACCESS_TOKEN_TTL.as_secs(),
            "invalid configuration: access_token_ttl_seconds must be at most {}",
            bulkhead_http::access_token::MAX_ACCESS_TOKEN_TTL.as_secs()
        );
        if let Some(token) = &self.admin_token {
            anyhow::ensure!(token.len() >= 16, "invalid configuration: admin_token must be at least 16 characters");
        }
        anyhow::ensure!(
            !self.metrics || self.admin_token.is_some(),
            "invalid configuration: metrics = true needs admin_token (scrapes present it as a bearer token)"
        );
        anyhow::ensure!(
            self.tenant_concurrent_downloads >= 1,
            "invalid configuration: tenant_concurrent_downloads must be at least 1"
        );
        self.history_retention()?;
        if let Some(url) = &self.output_url {
            anyhow::ensure!(
                url.strip_prefix("s3://").is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/')),
                "invalid configuration: output_url = '{url}' is not s3://BUCKET or s3://BUCKET/PREFIX"
            );
        }
        Ok(())
    }

    /// The output store's settings (`None`: no output store).
    pub fn output_settings(&self) -> Option<bulkhead_http::object_output::OutputSettings> {
        Some(bulkhead_http::object_output::OutputSettings {
            url: self.output_url.clone()?,
            endpoint: self.output_endpoint.clone(),
            region: self.output_region.clone(),
            access_key_id: self.output_access_key_id.clone(),
            secret_access_key: self.output_secret_access_key.clone(),
            allow_http: self.output_allow_http,
            presigned_urls: self.output_presigned_urls,
        })
    }

    /// `history_retention` as a duration (`None`: history is kept for ever).
    pub fn history_retention(&self) -> anyhow::Result<Option<Duration>> {
        let Some(text) = &self.history_retention else { return Ok(None) };
        let retention = humantime::parse_duration(text).map_err(|error| {
            anyhow::anyhow!(
                "invalid configuration: history_retention = '{text}' is not a duration like 90d or 720h ({error})"
            )
        })?;
        anyhow::ensure!(
            retention >= Duration::from_secs(1),
            "invalid configuration: history_retention must be at least 1s"
        );
        Ok(Some(retention))
    }

    /// True when `listen` is a loopback address (or `localhost`): only local clients can then
    /// send a Host header.
    pub fn listens_on_loopback(&self) -> bool {
        match self.listen.parse::<std::net::SocketAddr>() {
            Ok(address) => address.ip().is_loopback(),
            Err(_) => self.listen.rsplit_once(':').is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
        }
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("bulkhead.db")
    }

    /// The PostgreSQL pool's settings (when `database_url` is set).
    pub fn postgres_options(&self) -> bulkhead_store::postgres::PgOptions {
        bulkhead_store::postgres::PgOptions {
            max_connections: self.database_max_connections,
            connect_timeout: Duration::from_secs(self.database_connect_timeout_seconds),
            checkout_timeout: Duration::from_secs(self.database_pool_timeout_seconds),
            statement_timeout: Duration::from_secs(self.database_statement_timeout_seconds),
            local_dir: self.data_dir.clone(),
        }
    }

    /// Where the data lives, for messages: the database URL without its password, or the
    /// SQLite file.
    pub fn database_display(&self) -> String {
        match &self.database_url {
            Some(url) => redact_password(url),
            None => self.database_path().display().to_string(),
        }
    }

    pub fn http_config(&self) -> bulkhead_http::HttpConfig {
        bulkhead_http::HttpConfig {
            public_base_url: self.public_base_url.clone(),
            trust_host_header: self.trust_host_header.unwrap_or_else(|| self.listens_on_loopback()),
            fallback_base_url: format!("http://{}", self.listen),
            limits: bulkhead_http::ConnectionLimits {
                header_read_timeout: Duration::from_secs(self.header_read_timeout_seconds),
                body_idle_timeout: Duration::from_secs(self.body_idle_timeout_seconds),
                request_timeout: Duration::from_secs(self.request_timeout_seconds),
                max_connections: self.max_connections,
            },
            login_limits: bulkhead_http::login_limits::LoginLimits {
                per_peer: self.failed_logins_per_peer,
                per_client: self.failed_logins_per_client,
                window: Duration::from_secs(self.failed_login_window_seconds),
                ..Default::default()
            },
            max_body_bytes: self.max_body_bytes,
            admin_token: self.admin_token.clone(),
            max_group_members: self.max_group_members,
            export_part_size: self.export_part_size,
            file_urls_require_credentials: self.file_urls_require_credentials,
            file_url_ttl: Duration::from_secs(self.file_url_ttl_seconds),
            self_authorising_url_ttl: Duration::from_secs(self.self_authorising_url_ttl_seconds),
            min_free_disk_bytes: self.min_free_disk_bytes,
            validation: self.validation,
            tenant_validation: self.tenant_validation.clone(),
            download_stall_timeout: Duration::from_secs(self.download_stall_timeout_seconds),
            max_concurrent_downloads: self.max_concurrent_downloads,
            download_queue_wait: Duration::from_secs(self.download_queue_seconds),
            max_concurrent_plans: self.max_concurrent_plans,
            plan_queue_wait: Duration::from_secs(self.plan_queue_seconds),
            max_concurrent_uploads: self.max_concurrent_uploads,
            upload_queue_wait: Duration::from_secs(self.upload_queue_seconds),
            access_token_ttl: Duration::from_secs(self.access_token_ttl_seconds),
            jwks_fetch_timeout: Duration::from_secs(self.jwks_fetch_timeout_seconds),
            allow_http_jwks_urls: self.allow_http_jwks_urls,
            metrics: self.metrics,
            audit_trail: self.audit_trail,
            quotas: bulkhead_http::quotas::QuotaConfig {
                requests_per_second: self.tenant_requests_per_second,
                concurrent_exports: self.tenant_concurrent_exports,
                upload_bytes_per_minute: self.tenant_upload_bytes_per_minute,
                concurrent_downloads: self.tenant_concurrent_downloads,
                // Several instances share one PostgreSQL: quota and failed-login state goes there.
                shared: self.database_url.is_some(),
            },
            export_lease: Duration::from_secs(self.export_lease_seconds),
        }
    }

    /// The validation mode of a tenant's writes (its own setting, else the server's).
    pub fn validation_for(&self, tenant_name: &str) -> ValidationMode {
        self.tenant_validation.get(tenant_name).copied().unwrap_or(self.validation)
    }
}

/// `url` with the password of its user part (`user:password@`) replaced by `***`.
pub fn redact_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|index| index + 3) else { return url.to_owned() };
    let authority_end = url[scheme_end..].find(['/', '?']).map_or(url.len(), |index| scheme_end + index);
    let authority = &url[scheme_end..authority_end];
    match authority.rsplit_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split_once(':').map_or(user_info, |(user, _)| user);
            format!("{}{user}:***@{host}{}", &url[..scheme_end], &url[authority_end..])
        }
        _ => url.to_owned(),
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
        let overrides = Overrides { listen: Some("127.0.0.1:9001".into()), ..Overrides::default() };
        assert_eq!(Config::load(Some(&file), overrides).unwrap().listen, "127.0.0.1:9001");
        std::fs::write(&file, "export_part_size = \"many\"\n").unwrap();
        let error = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("export_part_size"), "{error}");
        std::fs::write(&file, "no_such_key = 1\n").unwrap();
        let error = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("no_such_key"), "{error}");
        assert_eq!(Config::load(None, Overrides::default()).unwrap().validation, ValidationMode::Strict);
        std::fs::write(&file, "validation = \"off\"\n").unwrap();
        assert_eq!(
            Config::load(Some(&file), Overrides::default()).unwrap().http_config().validation,
            ValidationMode::Off
        );
        std::fs::write(&file, "validation = \"off\"\n[tenant_validation]\nclinic = \"strict\"\n").unwrap();
        let config = Config::load(Some(&file), Overrides::default()).unwrap();
        assert_eq!(config.validation_for("clinic"), ValidationMode::Strict);
        assert_eq!(config.validation_for("legacy"), ValidationMode::Off);
        assert_eq!(config.http_config().validation_for("clinic"), ValidationMode::Strict);
        std::fs::write(&file, "[tenant_validation]\nlegacy = \"sometimes\"\n").unwrap();
        let error = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("tenant_validation"), "{error}");
        std::fs::write(&file, "validation = \"lenient\"\n").unwrap();
        let error = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("validation"), "{error}");
        std::fs::write(&file, "listen = \"nowhere\"\n").unwrap();
        let error = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("listen"), "{error}");
    }

    #[test]
    fn the_database_url_is_checked_and_its_password_never_shown() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("bulkhead.toml");
        std::fs::write(&file, "database_url = \"mysql://x@h/db\"\n").unwrap();
        let error = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("database_url"), "{error}");
        let overrides = Overrides { database_url: Some("postgres://u:s3cret@h:5/db".into()), ..Overrides::default() };
        let config = Config::load(None, overrides).unwrap();
        assert_eq!(config.database_display(), "postgres://u:***@h:5/db");
        assert_eq!(redact_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(config.postgres_options().max_connections, 16);
        assert!(config.http_config().quotas.shared, "instances on PostgreSQL share quota state");
        assert!(!Config::default().http_config().quotas.shared, "SQLite keeps it in the process");
    }

    #[test]
    fn the_host_header_is_trusted_only_on_loopback_unless_configured() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("bulkhead.toml");
        let load = |toml: &str| {
            std::fs::write(&file, toml).unwrap();
            Config::load(Some(&file), Overrides::default())
        };
        let local = load("listen = \"127.0.0.1:9000\"\n").unwrap().http_config();
        assert!(local.trust_host_header);
        let error = load("listen = \"0.0.0.0:9000\"\n").unwrap_err().to_string();
        assert!(error.contains("public_base_url") && error.contains("trust_host_header"), "{error}");
        let public = load("listen = \"0.0.0.0:9000\"\npublic_base_url = \"https://fhir.example.org\"\n").unwrap();
        assert!(!public.http_config().trust_host_header);
        let proxied = load("listen = \"0.0.0.0:9000\"\ntrust_host_header = true\n").unwrap();
        assert!(proxied.http_config().trust_host_header);
        let error = load("max_connections = 0\n").unwrap_err().to_string();
        assert!(error.contains("max_connections"), "{error}");
    }

    /// A file at the repository root.
    fn repository_file(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(name)
    }

    #[test]
    fn the_reference_names_every_key() {
        let reference = std::fs::read_to_string(repository_file("docs/configuration.md")).unwrap();
        for key in Config::keys() {
            assert!(reference.contains(&format!("| `{key}` |")), "docs/configuration.md has no row for `{key}`");
            let variable = format!("`{PREFIX}{}`", key.to_ascii_uppercase());
            assert!(reference.contains(&variable), "docs/configuration.md does not name {variable}");
        }
    }

    #[test]
    fn the_sample_file_loads() {
        let sample = repository_file("bulkhead.toml");
        // As shipped (everything commented out): the defaults.
        let config = Config::load(Some(&sample), Overrides::default()).unwrap();
        let defaults = serde_json::to_value(Config::default()).unwrap();
        assert_eq!(serde_json::to_value(&config).unwrap(), defaults);
        // Every key switched on: each is known (unknown keys are an error), its value valid, and
        // the commented value is the default unless the key has none (an example then).
        let text = std::fs::read_to_string(&sample).unwrap();
        let mut keys = Vec::new();
        let mut in_table = false;
        let uncommented: Vec<&str> = text
            .lines()
            .map(|line| {
                let Some(setting) = line.strip_prefix("# ") else { return line };
                if setting.starts_with('[') {
                    in_table = true;
                    keys.push(setting.trim_matches(['[', ']']).to_owned());
                    return setting;
                }
                match setting.split_once(" = ") {
                    Some((key, _)) if key.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '-') => {
                        if !in_table {
                            keys.push(key.to_owned());
                        }
                        setting
                    }
                    _ => line,
                }
            })
            .collect();
        let mut all_keys = Config::keys();
        all_keys.sort();
        keys.sort();
        assert_eq!(keys, all_keys, "bulkhead.toml must list every key, once");
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("bulkhead.toml");
        std::fs::write(&file, uncommented.join("\n")).unwrap();
        let loaded = serde_json::to_value(Config::load(Some(&file), Overrides::default()).unwrap()).unwrap();
        for key in Config::keys().iter().filter(|key| !defaults[key.as_str()].is_null() && *key != "tenant_validation")
        {
            assert_eq!(
                loaded[key.as_str()],
                defaults[key.as_str()],
                "bulkhead.toml's commented `{key}` is not the default"
            );
        }
        assert_eq!(loaded["tenant_validation"]["legacy-feed"], "off");
    }
}
