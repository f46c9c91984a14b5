//! Failed-login rate limits: after too many refused credentials in a window from one peer
//! address, or for one client id, further credentialed requests from that peer (or for that
//! id) are answered 429 with `Retry-After` until the window ends, without being checked.
//!
//! Memory is bounded: each table tracks at most `max_tracked` keys; when full, expired windows
//! are dropped first, then the oldest. IPv6 peers are counted per /64, the block one host
//! usually holds.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::IssueType;

use crate::error::ApiError;
use crate::state::AppState;

/// Set on a response that refused credentials (401 `login`): the limiter counts it.
#[derive(Debug, Clone, Copy)]
pub struct CredentialsRefused;

/// How many failed logins are allowed.
#[derive(Debug, Clone)]
pub struct LoginLimits {
    /// Failures per peer address (IPv6: per /64) in one window.
    pub per_peer: u32,
    /// Failures per presented client id in one window, whatever the peer.
    pub per_client: u32,
    pub window: Duration,
    /// Keys tracked per table at most.
    pub max_tracked: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits { per_peer: 20, per_client: 50, window: Duration::from_secs(60), max_tracked: 10_000 }
    }
}

/// Failures counted in a fixed window that starts with the first failure.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

struct Windows<K> {
    counts: HashMap<K, Window>,
}

impl<K: Hash + Eq + Clone> Windows<K> {
    fn new() -> Self {
        Windows { counts: HashMap::new() }
    }

    /// How long `key` stays blocked, if it is.
    fn blocked_for(&self, key: &K, limit: u32, window: Duration, now: Instant) -> Option<Duration> {
        let entry = self.counts.get(key)?;
        let ends = entry.started + window;
        (entry.failures >= limit && ends > now).then(|| ends - now)
    }

    fn record(&mut self, key: K, window: Duration, max_tracked: usize, now: Instant) {
        self.make_room(&key, window, max_tracked, now);
        let entry = self.counts.entry(key).or_insert(Window { started: now, failures: 0 });
        if entry.started + window <= now {
            *entry = Window { started: now, failures: 0 };
        }
        entry.failures = entry.failures.saturating_add(1);
    }

    /// Takes the window as the store counted it (every instance's failures).
    fn set(&mut self, key: K, counted: Window, window: Duration, max_tracked: usize, now: Instant) {
        self.make_room(&key, window, max_tracked, now);
        self.counts.insert(key, counted);
    }

    fn make_room(&mut self, key: &K, window: Duration, max_tracked: usize, now: Instant) {
        if !self.counts.contains_key(key) && self.counts.len() >= max_tracked {
            self.counts.retain(|_, entry| entry.started + window > now);
            if self.counts.len() >= max_tracked {
                let oldest = self.counts.iter().min_by_key(|(_, entry)| entry.started).map(|(key, _)| key.clone());
                if let Some(oldest) = oldest {
                    self.counts.remove(&oldest);
                }
            }
        }
    }
}

/// The failure counters of one server.
///
/// With a store ([`LoginLimiter::shared_through`]: several instances on PostgreSQL), every
/// failure is counted in the store, in one row per peer or client id, and the store's count
/// (every instance's failures) comes back into this instance's table, which decides alone
/// whether a request is refused: a request that presents credentials costs no database round
/// trip, a refused login one. An instance learns of the others' failures at its own next
/// failure for the same key, so across N instances at most N - 1 failures beyond the limit are
/// checked before every instance refuses. While the store cannot be reached, failures are
/// counted here alone.
pub struct LoginLimiter {
    limits: LoginLimits,
    peers: Mutex<Windows<IpAddr>>,
    clients: Mutex<Windows<Vec<u8>>>,
    store: Option<std::sync::Arc<dyn bulkhead_store::Store>>,
}

impl LoginLimiter {
    pub fn new(limits: LoginLimits) -> LoginLimiter {
        LoginLimiter { limits, peers: Mutex::new(Windows::new()), clients: Mutex::new(Windows::new()), store: None }
    }

    /// Counts failures in `store`, shared with every instance on it.
    pub fn shared_through(mut self, store: std::sync::Arc<dyn bulkhead_store::Store>) -> LoginLimiter {
        self.store = Some(store);
        self
    }

    /// The store's window of `key` after counting one more failure, as a local window.
    fn count_in_store(&self, key: &str, now: Instant) -> Option<Window> {
        let store = self.store.as_ref()?;
        let now_micros = bulkhead_fhir::now_micros();
        let window = i64::try_from(self.limits.window.as_micros()).unwrap_or(i64::MAX);
        match store.record_login_failure(key, window, now_micros) {
            Ok(counted) => {
                let age = Duration::from_micros(now_micros.saturating_sub(counted.started).max(0) as u64);
                Some(Window { started: now.checked_sub(age).unwrap_or(now), failures: counted.failures })
            }
            Err(error) => {
                tracing::debug!(error = %error, "failed login counted in this process only");
                None
            }
        }
    }

    /// How long a request from `peer` presenting `client_id` must wait, if it must.
    pub fn retry_after(&self, peer: Option<IpAddr>, client_id: Option<&[u8]>) -> Option<Duration> {
        let now = Instant::now();
        let limits = &self.limits;
        let by_peer =
            peer.and_then(|peer| lock(&self.peers).blocked_for(&peer_key(peer), limits.per_peer, limits.window, now));
        let by_client = client_id
            .and_then(|id| lock(&self.clients).blocked_for(&client_key(id), limits.per_client, limits.window, now));
        by_peer.max(by_client)
    }

    pub fn record_failure(&self, peer: Option<IpAddr>, client_id: Option<&[u8]>) {
        let now = Instant::now();
        let limits = &self.limits;
        if let Some(peer) = peer {
            let key = peer_key(peer);
            match self.count_in_store(&format!("peer:{key}"), now) {
                Some(counted) => lock(&self.peers).set(key, counted, limits.window, limits.max_tracked, now),
                None => lock(&self.peers).record(key, limits.window, limits.max_tracked, now),
            }
        }
        if let Some(id) = client_id {
            let key = client_key(id);
            let hex: String = key.iter().map(|byte| format!("{byte:02x}")).collect();
            match self.count_in_store(&format!("client:{hex}"), now) {
                Some(counted) => lock(&self.clients).set(key, counted, limits.window, limits.max_tracked, now),
                None => lock(&self.clients).record(key, limits.window, limits.max_tracked, now),
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// IPv4 as is (also when mapped into IPv6); IPv6 by its /64 prefix.
fn peer_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Client ids are short; a longer one is counted by its first 128 bytes (it never verifies).
fn client_key(id: &[u8]) -> Vec<u8> {
    id[..id.len().min(128)].to_vec()
}

/// The presented client id's raw bytes, if any: a client header, or the id of HTTP Basic.
fn presented_client_id(headers: &HeaderMap) -> Option<Vec<u8>> {
    if let Some(id) = headers.get("client_id").or_else(|| headers.get("client-id")) {
        return Some(id.as_bytes().to_vec());
    }
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, value) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
    let id = decoded.split(|b| *b == b':').next()?;
    Some(id.to_vec())
}

/// Whether a request carries credentials of any kind (client headers or an admin token).
fn carries_credentials(headers: &HeaderMap) -> bool {
    ["client_id", "client-id", "client_secret", "client-secret"].iter().any(|name| headers.contains_key(*name))
        || headers.contains_key(header::AUTHORIZATION)
}

/// Middleware: refuses (429) credentialed requests from a peer or for a client id over its
/// limit, and counts the credentials other layers refused.
pub async fn limit_failed_logins(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Token requests carry their credentials in the body: every one counts as a login.
    let token_request = request.uri().path() == crate::token_endpoint::TOKEN_PATH;
    if !carries_credentials(request.headers()) && !token_request {
        return next.run(request).await;
    }
    let peer = crate::connections::peer_address(&request).map(|address| address.ip());
    let client_id = presented_client_id(request.headers());
    let limiter = &state.login_limiter;
    if let Some(wait) = limiter.retry_after(peer, client_id.as_deref()) {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            IssueType::Throttled,
            format!("too many failed logins; retry after {seconds} s"),
        )
        .into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        return response;
    }
    let response = next.run(request).await;
    if response.extensions().get::<CredentialsRefused>().is_some() {
        limiter.record_failure(peer, client_id.as_deref());
    }
    response
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn limiter(per_peer: u32, per_client: u32, max_tracked: usize) -> LoginLimiter {
        LoginLimiter::new(LoginLimits { per_peer, per_client, window: Duration::from_secs(60), max_tracked })
    }

    #[test]
    fn blocks_after_the_limit_per_peer_and_per_client() {
        let limiter = limiter(3, 5, 100);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(limiter.retry_after(Some(a), Some(b"x")).is_none());
            limiter.record_failure(Some(a), Some(b"x"));
        }
        let wait = limiter.retry_after(Some(a), Some(b"y")).expect("peer a is blocked");
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(50));
        assert!(limiter.retry_after(Some(b), Some(b"x")).is_none(), "client x has 3 of 5");
        limiter.record_failure(Some(b), Some(b"x"));
        limiter.record_failure(Some(b), Some(b"x"));
        assert!(limiter.retry_after(Some(b), Some(b"x")).is_some(), "client x is blocked from any peer");
        assert!(limiter.retry_after(Some(b), Some(b"y")).is_none());
    }

    #[test]
    fn ipv6_peers_count_per_slash_64() {
        let limiter = limiter(2, 100, 100);
        let one: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let two: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        limiter.record_failure(Some(one.into()), None);
        limiter.record_failure(Some(two.into()), None);
        assert!(limiter.retry_after(Some(one.into()), None).is_some());
        assert!(limiter.retry_after(Some(other.into()), None).is_none());
    }

    /// Two instances on one store: the failures one saw count at the other's next failure, so
    /// the other refuses after one more, not after a limit of its own.
    #[test]
    fn failures_are_counted_across_instances_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn bulkhead_store::Store> =
            std::sync::Arc::new(bulkhead_store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap());
        let one = limiter(3, 100, 100).shared_through(store.clone());
        let two = limiter(3, 100, 100).shared_through(store);
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        one.record_failure(Some(peer), Some(b"x"));
        one.record_failure(Some(peer), Some(b"x"));
        assert!(two.retry_after(Some(peer), None).is_none(), "two has seen none of them itself");
        two.record_failure(Some(peer), Some(b"x"));
        let wait = two.retry_after(Some(peer), None).expect("the third failure in total blocks at two");
        assert!(wait > Duration::from_secs(50), "the window began at the first failure, on one: {wait:?}");
        assert!(one.retry_after(Some(peer), None).is_none(), "one learns at its next failure");
        one.record_failure(Some(peer), None);
        assert!(one.retry_after(Some(peer), None).is_some());
    }

    #[test]
    fn memory_stays_bounded() {
        let limiter = limiter(2, 2, 50);
        for n in 0..10_000u32 {
            limiter.record_failure(Some(IpAddr::from(n.to_be_bytes())), Some(n.to_string().as_bytes()));
        }
        assert!(lock(&limiter.peers).counts.len() <= 50);
        assert!(lock(&limiter.clients).counts.len() <= 50);
        // The newest keys are still counted.
        limiter.record_failure(Some(IpAddr::from(9_999u32.to_be_bytes())), None);
        assert!(limiter.retry_after(Some(IpAddr::from(9_999u32.to_be_bytes())), None).is_some());
    }
}
