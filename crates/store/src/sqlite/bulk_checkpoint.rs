//! WAL checkpoints of a bulk load on a thread of their own. A bulk load's writer is the
//! import's bound, and copying its WAL back into the database file (reading each frame, writing
//! it in place, syncing both files) was a tenth of its time, done on the writer's own thread
//! whenever a commit left the WAL past `wal_autocheckpoint`. During a load the writer does not
//! checkpoint on commit; after each commit a checkpointer thread copies what was just committed
//! while the writer goes on with the next transaction.
//!
//! SQLite starts the WAL over only when a write transaction begins with every frame copied,
//! which a checkpointer running beside the writer rarely leaves it: so once the WAL has grown
//! past [`CHECKPOINT_BACKSTOP`] times the usual threshold, the writer waits for the checkpointer
//! and copies the rest itself (the frames of the commit just made, at most), and the WAL starts
//! over. The WAL stays bounded whatever the checkpointer's pace.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;

use crate::StoreError;

/// How many times the usual `wal_autocheckpoint` the WAL may grow to during a load.
const CHECKPOINT_BACKSTOP: u64 = 4;

/// The checkpointer of one bulk load: stops (after the checkpoint it is running) when dropped.
pub(super) struct BulkCheckpointer {
    /// The checkpointing connection, shared with the writer for its backstop checkpoints.
    connection: Arc<Mutex<Connection>>,
    wake: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    wal: PathBuf,
    /// The WAL size past which the writer copies the rest itself.
    backstop_bytes: u64,
}

impl BulkCheckpointer {
    /// Starts a checkpointer on the database at `path`, with its own connection, for a writer
    /// whose usual threshold is `autocheckpoint_pages`.
    pub(super) fn start(path: &Path, autocheckpoint_pages: u32) -> Result<BulkCheckpointer, StoreError> {
        // A checkpoint reads frames and writes pages straight through: no cache to speak of.
        let connection = super::open_connection(path, 1)?;
        let page_size: u64 = connection.query_row("PRAGMA page_size", [], |row| row.get(0))?;
        let connection = Arc::new(Mutex::new(connection));
        let (wake, woken) = sync_channel::<()>(1);
        let shared = Arc::clone(&connection);
        let thread = std::thread::Builder::new()
            .name("bulk-checkpoint".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    checkpoint(&shared);
                }
            })
            .map_err(|error| StoreError::Database(format!("starting the checkpoint thread: {error}")))?;
        let mut wal = path.to_owned().into_os_string();
        wal.push("-wal");
        Ok(BulkCheckpointer {
            connection,
            wake: Some(wake),
            thread: Some(thread),
            wal: wal.into(),
            backstop_bytes: u64::from(autocheckpoint_pages) * CHECKPOINT_BACKSTOP * page_size,
        })
    }

    /// A transaction was committed: wakes the checkpointer (a wake-up already pending covers
    /// this commit too), or, past the backstop, copies the rest on the caller's thread.
    pub(super) fn committed(&self) {
        let wal_bytes = std::fs::metadata(&self.wal).map_or(0, |metadata| metadata.len());
        if wal_bytes > self.backstop_bytes {
            checkpoint(&self.connection);
            return;
        }
        if let Some(wake) = &self.wake {
            match wake.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => tracing::warn!("bulk checkpoint thread is gone"),
            }
        }
    }
}

impl Drop for BulkCheckpointer {
    fn drop(&mut self) {
        drop(self.wake.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("bulk checkpoint thread panicked");
            }
        }
    }
}

/// One passive checkpoint: copies what no reader still needs, waits for no reader (only for a
/// checkpoint already running on `connection`). A failure is logged only: the next commit's
/// checkpoint copies what this one did not.
fn checkpoint(connection: &Mutex<Connection>) {
    let connection = connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = connection
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)));
    match result {
        Ok((frames, copied)) => tracing::trace!(frames, copied, "bulk checkpoint"),
        Err(error) => tracing::warn!(%error, "bulk checkpoint failed"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use crate::sqlite::{SqliteOptions, SqliteStore, WAL_SIZE_LIMIT};
    use crate::{BulkBatch, BulkSource, Store, StoreError, Visibility, WriteOp, Written};

    /// Hands over batches of large resources, one transaction each, noting the WAL's size at
    /// every commit.
    struct Source {
        batches: VecDeque<BulkBatch>,
        wal: std::path::PathBuf,
        largest_wal: u64,
        commits: usize,
    }

    impl BulkSource for Source {
        fn next_batch(&mut self, wait: bool) -> Option<BulkBatch> {
            if wait {
                self.batches.pop_front()
            } else {
                None
            }
        }
        fn written(&mut self, _batch: BulkBatch, results: Vec<Result<Written, StoreError>>) {
            assert!(results.iter().all(Result::is_ok));
        }
        fn committed(&mut self) {
            self.commits += 1;
            let size = std::fs::metadata(&self.wal).map_or(0, |metadata| metadata.len());
            self.largest_wal = self.largest_wal.max(size);
        }
        fn rewind(&mut self) {
            panic!("no entry fails");
        }
    }

    /// A load larger than the WAL's size limit, with a small checkpoint threshold: the WAL
    /// starts over during the load (it never holds the whole load), everything is stored, and the
    /// writer's own threshold is back once the load is over.
    #[test]
    fn a_bulk_load_keeps_the_wal_bounded_and_stores_everything() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("bulk.db");
        let options = SqliteOptions { wal_autocheckpoint_pages: 16, ..SqliteOptions::default() };
        let store = SqliteStore::open_with(&path, options).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        let text = "x".repeat(60_000);
        let basic = |n: usize| {
            let id = format!("b{n}");
            let body = serde_json::json!({"resourceType": "Basic", "id": id, "code": {"text": text}});
            WriteOp::Update { resource_type: "Basic".into(), id, body, if_match: None }
        };
        // 48 MB in transactions of 1.2 MB.
        let batches = (0..40)
            .map(|batch| BulkBatch { ops: (0..20).map(|n| basic(batch * 20 + n)).collect(), prepared: Vec::new() });
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        let mut source = Source { batches: batches.collect(), wal: wal.into(), largest_wal: 0, commits: 0 };
        store.write_bulk(tenant, None, &mut source).unwrap();
        assert_eq!(source.commits, 40);
        assert!(source.largest_wal <= WAL_SIZE_LIMIT + 4 * 1024 * 1024, "the WAL grew to {}", source.largest_wal);
        for n in [0, 399, 799] {
            assert!(store.read(tenant, &Visibility::Tenant, "Basic", &format!("b{n}")).unwrap().is_some(), "b{n}");
        }
        let threshold: u32 =
            store.writer.lock().unwrap().query_row("PRAGMA wal_autocheckpoint", [], |row| row.get(0)).unwrap();
        assert_eq!(threshold, 16, "the writer checkpoints on commit again");
    }
}
