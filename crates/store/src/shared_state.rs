//! State every instance on one store shares: the keys that sign file URLs and access tokens,
//! token buckets of per-tenant quotas, and failed-login windows. Small global tables (Citus:
//! reference tables), never read per resource.

/// One token signing key. Its secret is never printed (`Debug` shows the id only).
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey {
    pub kid: String,
    pub secret: Vec<u8>,
    /// When it stopped signing (Unix seconds); `None` for the signing key.
    pub retired: Option<i64>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey").field("kid", &self.kid).field("retired", &self.retired).finish_non_exhaustive()
    }
}

/// The id of a key added after `keys`: `k` and one more than the largest number after a `k`.
pub fn next_kid(keys: &[TokenKey]) -> String {
    let last = keys.iter().filter_map(|key| key.kid.strip_prefix('k')?.parse::<u64>().ok()).max().unwrap_or(0);
    format!("k{}", last + 1)
}

/// A failed-login window as the store counts it (see [`crate::Store::record_login_failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginWindow {
    /// When the window began (microseconds).
    pub started: bulkhead_fhir::Micros,
    /// Failures in it, this one included.
    pub failures: u32,
}
