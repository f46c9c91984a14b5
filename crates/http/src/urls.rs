//! Absolute URLs the server mints (the HTTP layer mints URLs; storage returns keys).

use axum::http::{header, HeaderMap};

use crate::state::AppState;

/// The server's absolute base (`http://host:port`): `public_base_url` when configured, else the
/// `Host` header when the configuration trusts it, else the configured fallback. A forged Host
/// must not reach a manifest or a `Location` a client hands on.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    let config = &state.config;
    if let Some(base) = &config.public_base_url {
        return base.trim_end_matches('/').to_owned();
    }
    let host = headers.get(header::HOST).and_then(|host| host.to_str().ok()).filter(|host| is_plausible_host(host));
    match host {
        Some(host) if config.trust_host_header => format!("http://{host}"),
        _ => config.fallback_base_url.trim_end_matches('/').to_owned(),
    }
}

/// A Host header only ever contributes `name[:port]` characters to URLs we hand out.
fn is_plausible_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}
