use thiserror::Error;

/// What can go wrong in a store. `Conflict`, `NotFound`, `VersionConflict` and `Invalid` are the caller's
/// doing; `Database`, `StorageFull` and `Unavailable` are ours and their detail is logged, never shown to a client.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("version conflict: {0}")]
    VersionConflict(String),
    #[error("database error: {0}")]
    Database(String),
    /// The disk (or the database's size cap) is full: the failed write stored nothing, and
    /// the same request can succeed once space is freed.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// The database cannot be reached or is overloaded now (connection refused or lost, pool
    /// exhausted, statement timeout): nothing was stored, and the same request can be sent again
    /// shortly (503 + `Retry-After`).
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// The store's own failure rather than the request's: retrying the request entry by entry
    /// cannot help, so a batch stops at it.
    pub fn is_store_failure(&self) -> bool {
        matches!(self, StoreError::Database(_) | StoreError::StorageFull(_) | StoreError::Unavailable(_))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        // SQLITE_FULL: the disk is full (SQLite maps ENOSPC to it) or `max_page_count` is reached.
        match error.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::StorageFull(error.to_string()),
            _ => StoreError::Database(error.to_string()),
        }
    }
}

impl From<rusqlite::types::FromSqlError> for StoreError {
    fn from(error: rusqlite::types::FromSqlError) -> Self {
        StoreError::Database(format!("unexpected stored value: {error}"))
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(error: serde_json::Error) -> Self {
        StoreError::Database(format!("stored json: {error}"))
    }
}
