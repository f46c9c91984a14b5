//! Whether PostgreSQL answers connection attempts right now, as the pool's own attempts found
//! out: a pool check-out fails at once while the latest attempt failed (the server is down or
//! restarting), instead of waiting out the whole check-out timeout for a connection that
//! cannot come. The pool keeps retrying in the background every [`RECONNECT_BACKOFF_CAP`] at
//! most, and its first success lifts the fast failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long a check-out waits at a time before it looks at reachability again.
pub(super) const RECHECK: Duration = Duration::from_millis(200);

/// The longest pause between the pool's attempts to reconnect (r2d2 backs off up to half its
/// `connection_timeout`, which is set to twice this): how soon a restarted server is noticed.
pub(super) const RECONNECT_BACKOFF_CAP: Duration = Duration::from_millis(500);

/// The outcome of the pool's latest connection attempt.
#[derive(Debug, Default)]
pub(super) struct Reachability {
    failing: AtomicBool,
}

impl Reachability {
    /// Records whether a connection attempt reached the server.
    pub(super) fn note_attempt(&self, reachable: bool) {
        let was_failing = self.failing.swap(!reachable, Ordering::AcqRel);
        if was_failing && reachable {
            tracing::info!("database reachable again");
        } else if !was_failing && !reachable {
            tracing::warn!("database unreachable: requests fail fast until a connection succeeds");
        }
    }

    /// Whether the latest connection attempt failed.
    pub(super) fn unreachable(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }
}
