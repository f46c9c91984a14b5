//! Shared server state and configuration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_export::token::{KeyRing, TokenKeys};
use bulkhead_store::Store;

use crate::credentials::SecretVerifier;
use crate::error::ApiError;
use crate::validate::ValidationMode;

/// What the HTTP layer needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Absolute base for URLs the server mints (`http://host:port`); when unset it comes from the
    /// request's `Host` header if `trust_host_header`, else it is `fallback_base_url`.
    pub public_base_url: Option<String>,
    /// Whether the `Host` header may name the server in minted URLs (when `public_base_url` is
    /// unset). A forged Host must not end up in manifests a client hands on.
    pub trust_host_header: bool,
    /// The base used when neither `public_base_url` nor a trusted Host applies.
    pub fallback_base_url: String,
    /// Connection limits, applied by [`crate::serve`].
    pub limits: ConnectionLimits,
    /// Failed logins allowed per peer address and per client id in each window, before 429.
    pub login_limits: crate::login_limits::LoginLimits,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Token for `/admin`; the admin API is off when unset.
    pub admin_token: Option<String>,
    /// Most members a Group may list.
    pub max_group_members: usize,
    /// Most resources per export file.
    pub export_part_size: u64,
    /// When false, file URLs authorise themselves (`requiresAccessToken: false`) and expire after
    /// `self_authorising_url_ttl`.
    pub file_urls_require_credentials: bool,
    pub file_url_ttl: Duration,
    pub self_authorising_url_ttl: Duration,
    /// `/healthz` answers 503 when the store's disk has less free space than this.
    pub min_free_disk_bytes: u64,
    /// Whether writes are validated against R4 (`strict`) or stored as sent (`off`)…
    pub validation: ValidationMode,
    /// …unless the tenant (by name) has its own setting.
    pub tenant_validation: BTreeMap<String, ValidationMode>,
    /// A client that takes no bytes of a response (a download) for this long is disconnected.
    pub download_stall_timeout: Duration,
    /// Export file downloads streamed at once (each holds a fixed memory budget and a read
    /// connection); one more waits up to `download_queue_wait`, then gets 429 + `Retry-After`.
    pub max_concurrent_downloads: usize,
    pub download_queue_wait: Duration,
    /// Export plans computed at once, server-wide (each holds its candidate windows, read
    /// connections and their page caches). An asynchronous job beyond it stays queued; a
    /// synchronous kick-off waits up to `plan_queue_wait`, then gets 429 + `Retry-After`.
    pub max_concurrent_plans: usize,
    pub plan_queue_wait: Duration,
    /// `$upload-ndjson` bodies imported at once, server-wide (each holds a blocking thread for
    /// its whole body, and every import goes through the store's writer); one more waits up to
    /// `upload_queue_wait`, then gets 429 + `Retry-After`.
    pub max_concurrent_uploads: usize,
    pub upload_queue_wait: Duration,
    /// Lifetime of access tokens for clients registered without their own.
    pub access_token_ttl: Duration,
    /// Timeout of one fetch of a client's JWKS URL.
    pub jwks_fetch_timeout: Duration,
    /// Development only: accept plain-http JWKS URLs on any host (always accepted on loopback).
    pub allow_http_jwks_urls: bool,
    /// Whether `GET /metrics` answers (with the admin token).
    pub metrics: bool,
    /// Whether requests are recorded in the audit trail (off: only to measure its cost, or
    /// where no patient data is served).
    pub audit_trail: bool,
    /// Per-tenant limits.
    pub quotas: crate::quotas::QuotaConfig,
    /// How long an instance's claim on an export job lasts without a heartbeat: an instance that
    /// dies mid-job has its jobs taken over by another this long after its last heartbeat.
    pub export_lease: Duration,
}

impl HttpConfig {
    /// The validation mode of a tenant's writes: its own setting, else the server's.
    pub fn validation_for(&self, tenant_name: &str) -> ValidationMode {
        self.tenant_validation.get(tenant_name).copied().unwrap_or(self.validation)
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            public_base_url: None,
            trust_host_header: true,
            fallback_base_url: "http://127.0.0.1".into(),
            limits: ConnectionLimits::default(),
            login_limits: crate::login_limits::LoginLimits::default(),
            max_body_bytes: 16 * 1024 * 1024,
            admin_token: None,
            max_group_members: 100_000,
            export_part_size: 100_000,
            file_urls_require_credentials: true,
            file_url_ttl: Duration::from_secs(24 * 3600),
            self_authorising_url_ttl: Duration::from_secs(600),
            min_free_disk_bytes: 64 * 1024 * 1024,
            validation: ValidationMode::Strict,
            tenant_validation: BTreeMap::new(),
            download_stall_timeout: Duration::from_secs(60),
            max_concurrent_downloads: 8,
            download_queue_wait: Duration::from_secs(10),
            max_concurrent_plans: 2,
            plan_queue_wait: Duration::from_secs(30),
            max_concurrent_uploads: 2,
            upload_queue_wait: Duration::from_secs(10),
            access_token_ttl: Duration::from_secs(300),
            jwks_fetch_timeout: Duration::from_secs(5),
            allow_http_jwks_urls: false,
            metrics: false,
            audit_trail: true,
            quotas: crate::quotas::QuotaConfig::default(),
            export_lease: Duration::from_secs(30),
        }
    }
}

/// Limits that keep slow or idle clients from holding the server.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers (and an idle keep-alive connection lives).
    pub header_read_timeout: Duration,
    /// Longest pause between two pieces of a request body.
    pub body_idle_timeout: Duration,
    /// Time from a request's headers until its response starts (a download's streaming after
    /// that is not counted).
    pub request_timeout: Duration,
    /// Open connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(300),
            max_connections: 1024,
        }
    }
}

/// Everything a handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub config: Arc<HttpConfig>,
    pub verifier: Arc<SecretVerifier>,
    /// The keys of file tokens and access tokens (replaced when the key file is rotated).
    pub token_keys: Arc<KeyRing>,
    /// Clients' JWK Sets fetched by URL.
    pub jwks: Arc<crate::jwks::JwksCache>,
    pub login_limiter: Arc<crate::login_limits::LoginLimiter>,
    /// This instance's export worker and the jobs it runs.
    pub planners: Arc<crate::export_status::Planners>,
    /// Permits for streaming export files: `max_concurrent_downloads` of them.
    pub download_slots: Arc<tokio::sync::Semaphore>,
    /// Permits for computing export plans: `max_concurrent_plans` of them.
    pub planning_slots: Arc<tokio::sync::Semaphore>,
    /// Permits for importing an upload's body: `max_concurrent_uploads` of them.
    pub upload_slots: Arc<tokio::sync::Semaphore>,
    /// Prometheus metrics; `None` when `metrics` is off.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The per-tenant quotas' running state.
    pub quotas: Arc<crate::quotas::Quotas>,
    /// Where asynchronous exports are materialised; `None`: every file streams from the store.
    pub output: Option<Arc<crate::object_output::OutputStore>>,
    /// Group commit of the audit records that are not part of a write.
    pub audit: Arc<crate::audit_writer::AuditWriter>,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, config: HttpConfig, token_keys: TokenKeys) -> AppState {
        AppState {
            audit: Arc::new(crate::audit_writer::AuditWriter::start(store.clone())),
            login_limiter: Arc::new(match config.quotas.shared {
                true => {
                    crate::login_limits::LoginLimiter::new(config.login_limits.clone()).shared_through(store.clone())
                }
                false => crate::login_limits::LoginLimiter::new(config.login_limits.clone()),
            }),
            store,

            download_slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_downloads.max(1))),
            planning_slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_plans.max(1))),
            upload_slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_uploads.max(1))),
            jwks: Arc::new(crate::jwks::JwksCache::new(config.jwks_fetch_timeout, config.allow_http_jwks_urls)),
            metrics: config.metrics.then(|| Arc::new(crate::metrics::Metrics::new())),
            quotas: Arc::default(),
            config: Arc::new(config),
            verifier: Arc::new(SecretVerifier::new()),
            token_keys: Arc::new(KeyRing::new(token_keys)),
            planners: Arc::new(crate::export_status::Planners::default()),
            output: None,
        }
    }

    /// Runs blocking store work off the async runtime.
    pub async fn blocking<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, ApiError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(store.as_ref())).await.map_err(|join_error| {
            tracing::error!(error = %join_error, "blocking task failed");
            ApiError::internal()
        })?
    }
}
