//! Reading one export part in windows on PostgreSQL, each in its own short read-only
//! transaction, so a download never holds a snapshot (nor holds back vacuum) while it waits for
//! its client. Keyset paging by key (`rid`), never `OFFSET`: between calls the reader keeps
//! only the keys of the current key window's selected resources not yet read.

use std::collections::VecDeque;

use super::export::{select_window_each, selected, type_span, Candidate, Members, VersionAt, WINDOW};
use super::{Db, PgStore};
use crate::{MemberSelection, PartRange, PartReader, StoreError, TenantId};

/// Bodies fetched per statement at most (one round trip for many resources).
const BATCH: usize = 4096;

pub(super) struct PgPartReader<'a> {
    store: &'a PgStore,
    tenant: TenantId,
    selection: &'a MemberSelection,
    /// Resolved by the first window.
    members: Option<Members>,
    resource_type: &'a str,
    range: PartRange,
    /// The first key whose window is not resolved yet; `None` once the whole range is.
    unresolved: Option<i64>,
    last_key: i64,
    /// Selected, not yet read: `(key, history version holding the body, or 0 for the current row)`.
    pending: VecDeque<(i64, i64)>,
    /// The current window's candidates, kept (empty) between windows for the next one.
    scratch: Vec<Candidate>,
    started: bool,
    /// Bytes and lines read so far, to size the next batch to the caller's `max_bytes`.
    read_bytes: u64,
    read_lines: u64,
}

impl<'a> PgPartReader<'a> {
    pub(super) fn new(
        store: &'a PgStore,
        tenant: TenantId,
        selection: &'a MemberSelection,
        resource_type: &'a str,
        range: PartRange,
    ) -> PgPartReader<'a> {
        PgPartReader {
            store,
            tenant,
            selection,
            members: None,
            resource_type,
            range,
            unresolved: None,
            last_key: range.last_key,
            pending: VecDeque::new(),
            scratch: Vec::new(),
            started: false,
            read_bytes: 0,
            read_lines: 0,
        }
    }

    /// Resolves key windows until one selects something or the range is exhausted.
    fn resolve(&mut self, db: &mut Db<'_>) -> Result<(), StoreError> {
        if !self.started {
            self.started = true;
            let Some((type_first, type_last)) = type_span(db, self.tenant, self.resource_type)? else { return Ok(()) };
            let first = self.range.first_key.max(type_first);
            self.last_key = self.range.last_key.min(type_last);
            self.unresolved = (first <= self.last_key).then_some(first);
        }
        let Some(mut start) = self.unresolved else { return Ok(()) };
        let selection = self.selection;
        if self.members.is_none() {
            self.members = Some(Members::resolve(db, &self.store.member_keys, self.tenant, selection)?);
        }
        let Some(members) = &self.members else { return Ok(()) };
        let select = |reach, version: &VersionAt| selected(selection, reach, version);
        loop {
            let end = start.saturating_add(WINDOW - 1).min(self.last_key);
            let (pending, scratch) = (&mut self.pending, &mut self.scratch);
            let window = (start, end);
            select_window_each(
                db,
                self.tenant,
                selection,
                members,
                self.resource_type,
                window,
                select,
                scratch,
                |chosen| pending.push_back((chosen.rid, chosen.history_version)),
            )?;
            self.unresolved = (end < self.last_key).then(|| end + 1);
            match self.unresolved {
                Some(next) if self.pending.is_empty() => start = next,
                _ => return Ok(()),
            }
        }
    }

    /// How many pending resources the next statement fetches: about what fills the rest of
    /// `max_bytes` at the average size so far, so a small window reads one resource.
    fn batch_size(&self, remaining: usize) -> usize {
        let average = self.read_bytes.checked_div(self.read_lines).map_or(1024, |average| average.max(1));
        ((remaining as u64).div_ceil(average) as usize).clamp(1, BATCH).min(self.pending.len())
    }

    /// Appends pending resources' bodies until `max_bytes` are appended; returns how many.
    fn read_bodies(&mut self, db: &mut Db<'_>, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError> {
        let (start_len, mut count) = (out.len(), 0u64);
        while out.len() - start_len < max_bytes && !self.pending.is_empty() {
            let size = self.batch_size(max_bytes - (out.len() - start_len));
            let batch: Vec<(i64, i64)> = self.pending.drain(..size).collect();
            let before = out.len();
            let read = self.read_batch(db, &batch, out)?;
            self.read_bytes += (out.len() - before) as u64;
            self.read_lines += read;
            count += read;
        }
        Ok(count)
    }

    /// Appends the bodies of `batch` (in key order) to `out`, in its order.
    ///
    /// Current rows are read by runs of consecutive keys, one index range scan per run (a dense
    /// part is one run per batch), not one index descent per key: several times cheaper per row
    /// in PostgreSQL. The text goes from the row buffer to `out` as it came, never parsed nor
    /// copied into a `String` of its own.
    fn read_batch(&self, db: &mut Db<'_>, batch: &[(i64, i64)], out: &mut Vec<u8>) -> Result<u64, StoreError> {
        let at = self.selection.transaction_time;
        let (mut run_starts, mut run_ends): (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
        for &(rid, _) in batch.iter().filter(|(_, version)| *version == 0) {
            match run_ends.last_mut() {
                Some(end) if *end + 1 == rid => *end = rid,
                _ => {
                    run_starts.push(rid);
                    run_ends.push(rid);
                }
            }
        }
        if run_starts.len() == 1 && batch.iter().all(|(_, version)| *version == 0) {
            return self.stream_run(db, (run_starts[0], run_ends[0]), out);
        }
        let current = match run_starts.len() {
            0 => Vec::new(),
            1 => db.query(
                "SELECT rid, last_updated, body FROM resources WHERE tenant_id = $1 AND rid BETWEEN $2 AND $3",
                &[&self.tenant.0, &run_starts[0], &run_ends[0]],
            )?,
            _ => db.query(
                "SELECT r.rid, r.last_updated, r.body FROM unnest($2::int8[], $3::int8[]) AS run(first, last)
                 JOIN resources r ON r.tenant_id = $1 AND r.rid BETWEEN run.first AND run.last",
                &[&self.tenant.0, &run_starts, &run_ends],
            )?,
        };
        let mut current: Vec<(i64, &postgres::Row)> =
            current.iter().map(|row| Ok((row.try_get(0)?, row))).collect::<Result<_, StoreError>>()?;
        if !current.is_sorted_by_key(|(rid, _)| *rid) {
            current.sort_unstable_by_key(|(rid, _)| *rid);
        }
        let (history_rids, history_versions): (Vec<i64>, Vec<i64>) =
            batch.iter().filter(|(_, version)| *version > 0).copied().unzip();
        let historical = match history_rids.is_empty() {
            true => Vec::new(),
            false => db.query(
                "SELECT h.rid, h.body FROM unnest($2::int8[], $3::int8[]) AS n(rid, version)
                 JOIN resource_history h ON h.tenant_id = $1 AND h.rid = n.rid AND h.version = n.version
                 ORDER BY h.rid",
                &[&self.tenant.0, &history_rids, &history_versions],
            )?,
        };
        let missing = |rid: i64| StoreError::Database(format!("export: no stored version of resource {rid} at {at}"));
        let (mut current, mut historical) = (current.iter(), historical.iter());
        let mut count = 0;
        for &(rid, version) in batch {
            let fetched;
            let body: Option<&str> = if version == 0 {
                // Both in key order: skip nothing, since every run's key is in the batch.
                let Some((_, row)) = current.next().filter(|(found, _)| *found == rid) else {
                    return Err(missing(rid));
                };
                if row.try_get::<_, i64>(1)? <= at {
                    row.try_get(2)?
                } else {
                    // Written since an earlier window resolved it: its version at `at` is in history.
                    fetched = self.body_at(db, rid)?;
                    fetched.as_deref()
                }
            } else {
                let Some(row) = historical.next().filter(|row| row.try_get::<_, i64>(0).ok() == Some(rid)) else {
                    return Err(missing(rid));
                };
                row.try_get(1)?
            };
            let Some(body) = body else { return Err(missing(rid)) };
            out.extend_from_slice(body.as_bytes());
            out.push(b'\n');
            count += 1;
        }
        Ok(count)
    }

    /// [`Self::read_batch`] of one run of consecutive keys, all current rows: each row's text is
    /// appended as it arrives and the row dropped, so the client's receive buffer is reused
    /// instead of holding (and the allocator faulting in, then returning) a whole batch of rows.
    fn stream_run(&self, db: &mut Db<'_>, (first, last): (i64, i64), out: &mut Vec<u8>) -> Result<u64, StoreError> {
        use postgres::fallible_iterator::FallibleIterator;
        let at = self.selection.transaction_time;
        let missing = |rid: i64| StoreError::Database(format!("export: no stored version of resource {rid} at {at}"));
        let statement = db.statement(
            "SELECT rid, last_updated, body FROM resources WHERE tenant_id = $1 AND rid BETWEEN $2 AND $3 ORDER BY rid",
        )?;
        let params: [&(dyn postgres::types::ToSql + Sync); 3] = [&self.tenant.0, &first, &last];
        // Written since an earlier window resolved them: their versions at `at` are in history,
        // read once the stream is done and put in their places (by offset in `out`).
        let mut later: Vec<(usize, i64)> = Vec::new();
        let mut expected = first;
        let mut rows = db.transaction.query_raw(&statement, params)?;
        while let Some(row) = rows.next()? {
            let rid: i64 = row.try_get(0)?;
            if rid != expected {
                return Err(missing(expected));
            }
            expected += 1;
            if row.try_get::<_, i64>(1)? > at {
                later.push((out.len(), rid));
                continue;
            }
            let Some(Text(body)) = row.try_get(2)? else { return Err(missing(rid)) };
            out.extend_from_slice(body);
            out.push(b'\n');
        }
        drop(rows);
        if expected != last + 1 {
            return Err(missing(expected));
        }
        for (offset, rid) in later.into_iter().rev() {
            let Some(body) = self.body_at(db, rid)? else { return Err(missing(rid)) };
            let line = body.bytes().chain(std::iter::once(b'\n'));
            out.splice(offset..offset, line);
        }
        Ok((last - first + 1) as u64)
    }

    /// The body of a resource's newest version no later than the transaction time.
    fn body_at(&self, db: &mut Db<'_>, rid: i64) -> Result<Option<String>, StoreError> {
        let row = db.query_opt(
            "SELECT body FROM resource_history WHERE tenant_id = $1 AND rid = $2 AND last_updated <= $3
             ORDER BY version DESC LIMIT 1",
            &[&self.tenant.0, &rid, &self.selection.transaction_time],
        )?;
        Ok(row.map(|row| row.try_get(0)).transpose()?.flatten())
    }
}

impl PartReader for PgPartReader<'_> {
    fn next_window(&mut self, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError> {
        let store = self.store;
        store.with_read(|db| {
            if self.pending.is_empty() {
                self.resolve(db)?;
            }
            self.read_bodies(db, out, max_bytes)
        })
    }
}

/// A `text` value's bytes as PostgreSQL sent them (UTF-8, the database encoding), without
/// checking them again on the way to the output file.
struct Text<'a>(&'a [u8]);

impl<'a> postgres::types::FromSql<'a> for Text<'a> {
    fn from_sql(_: &postgres::types::Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Text(raw))
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        *ty == postgres::types::Type::TEXT
    }
}
