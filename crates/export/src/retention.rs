//! History retention and `_since`: an export whose `_since` reaches back past the prune horizon
//! would silently miss deletions and changes; it is refused instead.

use bulkhead_fhir::{format_instant, Micros};
use bulkhead_store::Store;

use crate::ExportError;

/// Refuses a `_since` before the store's prune horizon ([`Store::history_horizon`]). Called at
/// kick-off and again once the plan is made: a prune that started meanwhile records its horizon
/// before it removes anything, so a plan that passes the second check read complete history.
pub fn check_since_retained(store: &dyn Store, since: Option<Micros>) -> Result<(), ExportError> {
    let Some(since) = since else { return Ok(()) };
    match store.history_horizon()? {
        Some(horizon) if since < horizon => Err(ExportError::HistoryPruned(format!(
            "_since {} is before {}, the oldest point of the history this server keeps (history_retention): \
             changes and deletions before then are no longer known; use a _since at or after it, or export \
             without _since for the complete current data",
            format_instant(since),
            format_instant(horizon)
        ))),
        _ => Ok(()),
    }
}
