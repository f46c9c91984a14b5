//! History retention: `bulkhead prune`, and the server's own hourly prune when
//! `history_retention` is set.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_fhir::{format_instant, now_micros};
use bulkhead_store::{PruneReport, Store};

use crate::admin::open_existing_store;
use crate::config::Config;

/// Rows removed per write transaction: each batch holds the write lock for milliseconds.
const PRUNE_BATCH: usize = 1000;

/// How often a server with `history_retention` prunes.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Prunes history older than `retention` (now minus it is the cutoff).
pub fn prune_older_than(store: &dyn Store, retention: Duration) -> Result<PruneReport, bulkhead_store::StoreError> {
    let now = now_micros();
    let cutoff = now.saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
    store.prune_history(cutoff, now, PRUNE_BATCH)
}

/// `bulkhead prune [--older-than DURATION]`.
pub fn prune(config: &Config, older_than: Option<&str>) -> anyhow::Result<()> {
    let retention =
        match older_than {
            Some(text) => Some(humantime::parse_duration(text).map_err(|error| {
                anyhow::anyhow!("--older-than '{text}' is not a duration like 90d or 12h ({error})")
            })?),
            None => config.history_retention()?,
        };
    let Some(retention) = retention else {
        anyhow::bail!("no retention to apply: set history_retention (e.g. 90d) or pass --older-than");
    };
    let store = open_existing_store(config)?;
    let report = prune_older_than(&*store, retention)?;
    say!(
        "pruned history before {}: {} earlier versions, {} deleted resources, {} compartment rows, {} memberships",
        format_instant(report.horizon),
        report.versions,
        report.tombstones,
        report.compartment_rows,
        report.memberships
    );
    Ok(())
}

/// Prunes every hour on a thread of its own for as long as the store lives (first a minute after
/// start), when `history_retention` is set.
pub fn spawn_pruning(store: &Arc<dyn Store>, retention: Option<Duration>) {
    let Some(retention) = retention else { return };
    let store = Arc::downgrade(store);
    let spawned = std::thread::Builder::new().name("history-prune".into()).spawn(move || {
        let mut wait = Duration::from_secs(60);
        loop {
            std::thread::sleep(wait);
            wait = PRUNE_INTERVAL;
            let Some(store) = store.upgrade() else { return };
            match prune_older_than(store.as_ref(), retention) {
                Ok(report) => tracing::info!(
                    horizon = %format_instant(report.horizon),
                    versions = report.versions,
                    tombstones = report.tombstones,
                    compartment_rows = report.compartment_rows,
                    memberships = report.memberships,
                    "history pruned"
                ),
                Err(error) => tracing::warn!(error = %error, "pruning history failed"),
            }
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(error = %error, "could not start the history prune thread");
    }
}
