//! Group commit of the audit trail's own records (reads, searches, downloads, kick-offs, …):
//! a request hands its record to one writer thread through a bounded channel, and the thread
//! stores whatever has accumulated in one store transaction, every few milliseconds.
//!
//! Before it, every audited read was one more write transaction of its own (the single SQLite
//! writer serialised them with the writes) and the response waited for it. Now a request waits
//! only for room in the channel: when the store falls behind and the channel is full, requests
//! wait for it (backpressure), never drop their record. [`AuditWriter::flush`] waits until every
//! record handed in before it is stored (the admin API reads the trail after one, so it shows
//! every request answered before it, and the server calls it at shutdown once the last response
//! is done); dropping the last handle stores what is left before its thread ends.
//!
//! While the store cannot take records (PostgreSQL unreachable, a full disk), the writer keeps
//! them in memory, up to [`MAX_PENDING`], and writes them, oldest first, once the store takes
//! writes again (it retries every [`RETRY_INTERVAL`]); a flush meanwhile returns once the
//! records before it are stored or kept. Records made while the buffer is full are dropped,
//! counted in an error line, so the earliest records of an outage survive it; records still
//! kept when the server stops are lost, and an error line says how many.
//!
//! A write's records do not come here: the store appends them in the write's own transaction
//! (`Store::write_audited`), so a write and its record commit or fail together.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_store::{AuditRecord, Store, StoreError};

/// Records waiting at most; beyond it, requests wait for the writer (backpressure).
pub const CHANNEL_RECORDS: usize = 4096;
/// Records stored in one transaction at most.
const MAX_BATCH: usize = 512;
/// How long the writer waits for more records after the first of a batch. Records of busy
/// moments share a transaction; a lone record is stored within this time.
const LINGER: Duration = Duration::from_millis(4);
/// Records kept in memory at most while the store cannot take them (about 1 KiB each).
pub const MAX_PENDING: usize = 100_000;
/// How often kept records are retried when no new record comes.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

enum Message {
    Record(Box<AuditRecord>),
    /// Answered once every record sent before it is stored (or failed to be, and was logged).
    Flush(mpsc::Sender<()>),
}

/// The writer: one thread per server, fed through a bounded channel.
pub struct AuditWriter {
    sender: SyncSender<Message>,
    store: Arc<dyn Store>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("AuditWriter").finish_non_exhaustive()
    }
}

impl AuditWriter {
    /// Starts the writer thread of `store`.
    pub fn start(store: Arc<dyn Store>) -> AuditWriter {
        AuditWriter::with_capacity(store, CHANNEL_RECORDS)
    }

    /// [`AuditWriter::start`] with a channel of `capacity` records (tests use a small one).
    pub fn with_capacity(store: Arc<dyn Store>, capacity: usize) -> AuditWriter {
        AuditWriter::with_limits(store, capacity, MAX_PENDING)
    }

    /// [`AuditWriter::with_capacity`] keeping at most `pending` records while the store cannot
    /// take them.
    pub fn with_limits(store: Arc<dyn Store>, capacity: usize, pending: usize) -> AuditWriter {
        let (sender, receiver) = mpsc::sync_channel(capacity.max(1));
        let thread_store = store.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(thread_store.as_ref(), &receiver, pending))
            .map_err(|error| tracing::error!(target: "bulkhead::audit", error = %error, "could not start the audit writer: records are stored one by one"))
            .ok();
        AuditWriter { sender, store, thread: Mutex::new(thread) }
    }

    /// Hands `record` to the writer, waiting (off the async workers) while the channel is full.
    pub async fn submit(&self, record: AuditRecord) {
        match self.sender.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(message)) => {
                let sender = self.sender.clone();
                let store = self.store.clone();
                let sent = tokio::task::spawn_blocking(move || send_or_store(&sender, store.as_ref(), message)).await;
                if sent.is_err() {
                    tracing::error!(target: "bulkhead::audit", "an audit record could not be stored");
                }
            }
            Err(TrySendError::Disconnected(message)) => store_now(self.store.as_ref(), message),
        }
    }

    /// Hands `record` to the writer without waiting (from a response body's end, which cannot
    /// wait): when the channel is full a blocking task waits for room instead.
    pub fn submit_detached(&self, record: AuditRecord) {
        match self.sender.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(message)) => {
                let (sender, store) = (self.sender.clone(), self.store.clone());
                let send = move || send_or_store(&sender, store.as_ref(), message);
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => drop(runtime.spawn_blocking(send)),
                    Err(_) => send(),
                }
            }
            Err(TrySendError::Disconnected(message)) => store_now(self.store.as_ref(), message),
        }
    }

    /// Hands `record` to the writer and waits until it is stored: for records that must be
    /// durable before the request is answered.
    pub async fn submit_durable(&self, record: AuditRecord) {
        self.submit(record).await;
        self.flush().await;
    }

    /// Waits until every record handed in before this call is stored.
    pub async fn flush(&self) {
        let sender = self.sender.clone();
        let _ = tokio::task::spawn_blocking(move || flush_blocking(&sender)).await;
    }

    /// [`AuditWriter::flush`] for blocking code.
    pub fn flush_blocking(&self) {
        flush_blocking(&self.sender);
    }
}

impl Drop for AuditWriter {
    /// The last handle gone: the thread stores what is queued, then ends; this waits for it.
    fn drop(&mut self) {
        let (unused, _) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.sender, unused));
        let thread = self.thread.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if thread.is_some_and(|thread| thread.join().is_err()) {
            tracing::error!(target: "bulkhead::audit", "the audit writer panicked");
        }
    }
}

fn flush_blocking(sender: &SyncSender<Message>) {
    let (done, stored) = mpsc::channel();
    if sender.send(Message::Flush(done)).is_ok() {
        // An error here means the writer stopped: nothing is left in flight.
        let _ = stored.recv();
    }
}

/// Sends `message`, waiting for room; once the writer has stopped, stores it here instead.
fn send_or_store(sender: &SyncSender<Message>, store: &dyn Store, message: Message) {
    if let Err(mpsc::SendError(message)) = sender.send(message) {
        store_now(store, message);
    }
}

fn store_now(store: &dyn Store, message: Message) {
    if let Message::Record(record) = message {
        append_or_log(store, std::slice::from_ref(&record));
    }
}

/// Appends records in one transaction, logging (never answering) a failure.
pub fn append_or_log(store: &dyn Store, records: &[AuditRecord]) {
    if records.is_empty() {
        return;
    }
    if let Err(error) = store.append_audit(records) {
        tracing::error!(
            target: "bulkhead::audit",
            error = %error,
            records = records.len(),
            "audit records could not be stored"
        );
    }
}

/// Whether a failure to store is the store's passing condition (worth keeping the records for).
fn is_transient(error: &StoreError) -> bool {
    matches!(error, StoreError::Unavailable(_) | StoreError::StorageFull(_))
}

/// Records the store could not take yet, oldest first.
struct Pending {
    records: VecDeque<AuditRecord>,
    capacity: usize,
    dropped: u64,
}

impl Pending {
    fn new(capacity: usize) -> Pending {
        Pending { records: VecDeque::new(), capacity, dropped: 0 }
    }

    /// Keeps `records` (the newest dropped once full).
    fn keep(&mut self, records: &mut Vec<AuditRecord>, error: &StoreError) {
        if self.records.is_empty() {
            tracing::warn!(
                target: "bulkhead::audit",
                error = %error,
                "audit records kept in memory until the store takes writes again"
            );
        }
        let room = self.capacity.saturating_sub(self.records.len());
        let dropped = records.len().saturating_sub(room);
        self.records.extend(records.drain(..records.len() - dropped));
        if dropped > 0 {
            records.clear();
            self.dropped += dropped as u64;
            tracing::error!(
                target: "bulkhead::audit",
                dropped,
                dropped_in_outage = self.dropped,
                kept = self.records.len(),
                "audit records lost: the store is unavailable and the buffer is full"
            );
        }
    }

    /// Stores the kept records, then `batch`, in order; on a transient failure keeps what was
    /// not stored (a record the store refuses otherwise is logged and dropped, as before).
    fn write(&mut self, store: &dyn Store, batch: &mut Vec<AuditRecord>) {
        while !self.records.is_empty() {
            let count = self.records.len().min(MAX_BATCH);
            match store.append_audit(&self.records.make_contiguous()[..count]) {
                Ok(()) => {
                    self.records.drain(..count);
                    if self.records.is_empty() {
                        tracing::info!(target: "bulkhead::audit", "the audit records kept during the outage are stored");
                        self.dropped = 0;
                    }
                }
                Err(error) if is_transient(&error) => return self.keep(batch, &error),
                Err(error) => {
                    tracing::error!(target: "bulkhead::audit", error = %error, records = count, "audit records could not be stored");
                    self.records.drain(..count);
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        match store.append_audit(batch) {
            Ok(()) => batch.clear(),
            Err(error) if is_transient(&error) => self.keep(batch, &error),
            Err(error) => {
                tracing::error!(target: "bulkhead::audit", error = %error, records = batch.len(), "audit records could not be stored");
                batch.clear();
            }
        }
    }
}

/// The writer thread: waits for a first record, gathers more for up to [`LINGER`] (a flush or
/// a full batch ends the wait), stores them in one transaction (after any kept records),
/// answers the flushes; with records kept, it retries every [`RETRY_INTERVAL`] even when none
/// come. It ends once every sender is gone and the channel is empty, so nothing sent is left
/// behind.
fn run(store: &dyn Store, receiver: &Receiver<Message>, pending_capacity: usize) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut flushes = Vec::new();
    let mut pending = Pending::new(pending_capacity);
    loop {
        let first = if pending.records.is_empty() {
            match receiver.recv() {
                Ok(message) => Some(message),
                Err(_) => break,
            }
        } else {
            match receiver.recv_timeout(RETRY_INTERVAL) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        let deadline = Instant::now() + LINGER;
        let mut next = first;
        while let Some(message) = next.take() {
            match message {
                Message::Record(record) => batch.push(*record),
                Message::Flush(done) => flushes.push(done),
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            // A flush is answered as soon as what came before it is stored; what is already
            // queued still joins the batch.
            next = if flushes.is_empty() {
                receiver.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()
            } else {
                receiver.try_recv().ok()
            };
        }
        pending.write(store, &mut batch);
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
    pending.write(store, &mut batch);
    if !pending.records.is_empty() {
        tracing::error!(
            target: "bulkhead::audit",
            lost = pending.records.len(),
            "the server stops with audit records the store could not take"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bulkhead_store::sqlite::SqliteStore;
    use bulkhead_store::{AuditQuery, TenantId};

    use super::*;

    fn record(tenant: TenantId, request_id: String) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time: 1,
            tenant,
            client: "c".into(),
            user: None,
            peer: None,
            request_id,
            action: "read".into(),
            target: "Patient/p".into(),
            outcome: "success".into(),
            status: 200,
            detail: "{}".into(),
            patients: vec!["p".into()],
            cohort: None,
        }
    }

    fn store() -> (tempfile::TempDir, Arc<SqliteStore>, TenantId) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let tenant = store.create_tenant("t").unwrap().id;
        (dir, store, tenant)
    }

    /// How many records each request id has.
    fn stored(store: &SqliteStore, tenant: TenantId) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        let mut query = AuditQuery { limit: 10_000, ..AuditQuery::default() };
        loop {
            let page = store.audit_records(tenant, &query).unwrap();
            for found in &page {
                *counts.entry(found.request_id.clone()).or_default() += 1;
            }
            match page.last() {
                Some(last) if page.len() == query.limit => query.after_seq = Some(last.seq),
                _ => return counts,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_burst_through_a_full_channel_stores_each_record_exactly_once() {
        let (_dir, store, tenant) = store();
        // A channel of 4 records: most of the burst finds it full and waits (backpressure).
        let writer = Arc::new(AuditWriter::with_capacity(store.clone(), 4));
        let tasks: Vec<_> = (0..16)
            .map(|task| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    for index in 0..50 {
                        let id = format!("r-{task}-{index}");
                        if index % 2 == 0 {
                            writer.submit(record(tenant, id)).await;
                        } else {
                            writer.submit_detached(record(tenant, id));
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // Detached records still waiting for room are handed in by blocking tasks: the flush
        // may pass them, so wait for the count, then check nothing is doubled.
        let started = Instant::now();
        let counts = loop {
            writer.flush().await;
            let counts = stored(&store, tenant);
            if counts.len() == 800 || started.elapsed() > Duration::from_secs(10) {
                break counts;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(counts.len(), 16 * 50, "one record per request id");
        assert!(counts.values().all(|count| *count == 1), "no record stored twice");
    }

    #[tokio::test]
    async fn a_flush_waits_for_every_record_handed_in_before_it() {
        let (_dir, store, tenant) = store();
        let writer = AuditWriter::start(store.clone());
        for index in 0..300 {
            writer.submit(record(tenant, format!("r-{index}"))).await;
        }
        writer.flush().await;
        assert_eq!(stored(&store, tenant).len(), 300);
    }

    #[test]
    fn dropping_the_writer_stores_what_is_queued() {
        let (_dir, store, tenant) = store();
        let writer = AuditWriter::start(store.clone());
        for index in 0..1_000 {
            writer.submit_detached(record(tenant, format!("r-{index}")));
        }
        drop(writer);
        let counts = stored(&store, tenant);
        assert_eq!(counts.len(), 1_000);
        assert!(counts.values().all(|count| *count == 1));
    }

    /// Forwards connections to `port` on to `to`, from now on (the database "returns").
    fn forward(port: u16, to: String) {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&to) else { continue };
                let (mut client_in, mut server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut client_in, &mut server_out));
                let (mut server_in, mut client_out) = (server, client);
                std::thread::spawn(move || std::io::copy(&mut server_in, &mut client_out));
            }
        });
    }

    /// Records made while PostgreSQL cannot be reached are kept and written, each once and in
    /// order, when it returns, without a new record to prompt it; past the buffer's size the
    /// newest are dropped.
    #[test]
    fn records_made_while_the_database_is_unreachable_are_written_when_it_returns() {
        use bulkhead_store::postgres::{testing, PgOptions, PgStore};
        let Some(database) = testing::fresh_database() else { return };
        let direct = PgStore::open(&database.url, testing::test_options()).unwrap();
        let tenant = direct.create_tenant("t").unwrap().id;
        // The same database behind a port where nothing listens yet.
        let (user, rest) = database.url.split_once('@').unwrap();
        let (address, name) = rest.split_once('/').unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options = PgOptions {
            connect_timeout: Duration::from_secs(1),
            checkout_timeout: Duration::from_secs(2),
            ..testing::test_options()
        };
        let flaky = PgStore::connect(&format!("{user}@127.0.0.1:{port}/{name}"), options).unwrap();
        let writer = AuditWriter::with_limits(Arc::new(flaky), 64, 40);
        for index in 0..50 {
            writer.submit_detached(record(tenant, format!("r-{index:02}")));
        }
        writer.flush_blocking();
        let all = || direct.audit_records(tenant, &AuditQuery { limit: 1_000, ..AuditQuery::default() }).unwrap();
        assert!(all().is_empty());

        forward(port, address.to_owned());
        let started = Instant::now();
        while all().len() < 40 {
            assert!(started.elapsed() < Duration::from_secs(20), "the kept records were not written");
            std::thread::sleep(Duration::from_millis(100));
        }
        let ids: Vec<String> = all().into_iter().map(|found| found.request_id).collect();
        let expected: Vec<String> = (0..40).map(|index| format!("r-{index:02}")).collect();
        assert_eq!(ids, expected, "the first 40 kept, in order, each once; the 10 beyond the buffer dropped");
        writer.submit_detached(record(tenant, "after".into()));
        writer.flush_blocking();
        assert_eq!(all().len(), 41);
    }
}
