//! Shared server state and configuration.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_export::token::TokenKeys;
use bulkhead_store::Store;

use crate::credentials::SecretVerifier;
use crate::error::ApiError;

/// What the HTTP layer needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Absolute base for URLs the server mints (`http://host:port`); when unset it comes from the
    /// request's `Host` header.
    pub public_base_url: Option<String>,
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
    /// A client that takes no bytes of a response (a download) for this long is disconnected.
    pub download_stall_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            public_base_url: None,
            max_body_bytes: 16 * 1024 * 1024,
            admin_token: None,
            max_group_members: 100_000,
            export_part_size: 100_000,
            file_urls_require_credentials: true,
            file_url_ttl: Duration::from_secs(24 * 3600),
            self_authorising_url_ttl: Duration::from_secs(600),
            download_stall_timeout: Duration::from_secs(60),
        }
    }
}

/// Everything a handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub config: Arc<HttpConfig>,
    pub verifier: Arc<SecretVerifier>,
    pub token_keys: Arc<TokenKeys>,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, config: HttpConfig, token_keys: TokenKeys) -> AppState {
        AppState {
            store,
            config: Arc::new(config),
            verifier: Arc::new(SecretVerifier::new(Duration::from_secs(300))),
            token_keys: Arc::new(token_keys),
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
