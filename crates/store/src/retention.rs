//! What history retention and the operator's tools need from a store: the prune report and the
//! sizes metrics show.

use bulkhead_fhir::Micros;

/// What one [`crate::Store::prune_history`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// The horizon applied: history before it is gone, `_since` before it is refused. It is the
    /// requested cutoff, or earlier when an unexpired export still needs older history.
    pub horizon: Micros,
    /// Earlier versions superseded at or before the horizon.
    pub versions: u64,
    /// Deleted resources (tombstones) deleted at or before the horizon, with all their rows.
    pub tombstones: u64,
    /// Compartment index rows closed at or before the horizon.
    pub compartment_rows: u64,
    /// Group membership intervals that ended at or before the horizon.
    pub memberships: u64,
}

/// The store's footprint on disk, in bytes (metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageBytes {
    pub database: u64,
    /// The write-ahead log (0 where the store has none of its own).
    pub wal: u64,
}
