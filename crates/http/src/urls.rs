//! Absolute URLs the server mints (the HTTP layer mints URLs; storage returns keys).

use axum::http::{header, HeaderMap};

use crate::state::AppState;

/// The server's absolute base (`http://host:port`), from configuration or the `Host` header.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(base) = &state.config.public_base_url {
        return base.trim_end_matches('/').to_owned();
    }
    let host = headers.get(header::HOST).and_then(|host| host.to_str().ok()).filter(|host| is_plausible_host(host));
    format!("http://{}", host.unwrap_or("127.0.0.1"))
}

/// A Host header only ever contributes `name[:port]` characters to URLs we hand out.
fn is_plausible_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}
