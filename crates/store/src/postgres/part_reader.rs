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

/// Body bytes a statement's batch is sized to hold at most, at the longest line read so far.
const BATCH_BYTES: u64 = 4 << 20;

/// Bodies the first statement of a reader fetches, before it knows their sizes.
const FIRST_BATCH: u64 = 32;

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
    /// The longest line read so far (bytes), to bound a batch's rows held at once.
    longest_line: u64,
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
            longest_line: 0,
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
    /// `max_bytes` at the average size so far (so a small window reads one resource), and no
    /// more than [`BATCH_BYTES`] would hold at the longest line so far, since a statement's rows
    /// are held together. Before any is read, sizes are unknown: at most [`FIRST_BATCH`].
    fn batch_size(&self, remaining: usize) -> usize {
        let size = match self.read_bytes.checked_div(self.read_lines) {
            None => (remaining as u64).div_ceil(1024).min(FIRST_BATCH),
            Some(average) => {
                let filling = (remaining as u64).div_ceil(average.max(1));
                filling.min(BATCH_BYTES / self.longest_line.max(1))
            }
        };
        (size as usize).clamp(1, BATCH).min(self.pending.len())
    }

    /// Appends pending resources' bodies until `max_bytes` are appended; returns how many.
    fn read_bodies(&mut self, db: &mut Db<'_>, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError> {
        let (start_len, mut count) = (out.len(), 0u64);
        while out.len() - start_len < max_bytes && !self.pending.is_empty() {
            let size = self.batch_size(max_bytes - (out.len() - start_len));
            let batch: Vec<(i64, i64)> = self.pending.drain(..size).collect();
            let before = out.len();
            let (read, longest) = self.read_batch(db, &batch, out)?;
            self.read_bytes += (out.len() - before) as u64;
            self.read_lines += read;
            self.longest_line = self.longest_line.max(longest as u64);
            count += read;
        }
        Ok(count)
    }

    /// Appends the bodies of `batch` (in key order) to `out`, in its order; returns how many
    /// and the longest line's length.
    ///
    /// Current rows are read by runs of consecutive keys, one index range scan per run (a dense
    /// part is one run per batch), not one index descent per key: several times cheaper per row
    /// in PostgreSQL. Each statement's rows arrive together (one round trip, one entry into the
    /// blocking client's runtime: entering it per row, as a row iterator does, cost more than
    /// the rows), so a batch is sized by bytes ([`Self::batch_size`]). The text goes from the row
    /// buffer to `out` as it came, never parsed nor copied into a `String` of its own.
    fn read_batch(&self, db: &mut Db<'_>, batch: &[(i64, i64)], out: &mut Vec<u8>) -> Result<(u64, usize), StoreError> {
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
        let current = match run_starts.len() {
            0 => Vec::new(),
            1 => db.query(
                "SELECT rid, last_updated, body FROM resources WHERE tenant_id = $1 AND rid BETWEEN $2 AND $3
                 ORDER BY rid",
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
        let (mut count, mut longest) = (0, 0);
        for &(rid, version) in batch {
            let fetched;
            let body: Option<&[u8]> = if version == 0 {
                // Both in key order: skip nothing, since every run's key is in the batch.
                let Some((_, row)) = current.next().filter(|(found, _)| *found == rid) else {
                    return Err(missing(rid));
                };
                if row.try_get::<_, i64>(1)? <= at {
                    row.try_get::<_, Option<Text>>(2)?.map(|Text(body)| body)
                } else {
                    // Written since an earlier window resolved it: its version at `at` is in history.
                    fetched = self.body_at(db, rid)?;
                    fetched.as_deref().map(str::as_bytes)
                }
            } else {
                let Some(row) = historical.next().filter(|row| row.try_get::<_, i64>(0).ok() == Some(rid)) else {
                    return Err(missing(rid));
                };
                row.try_get::<_, Option<Text>>(1)?.map(|Text(body)| body)
            };
            let Some(body) = body else { return Err(missing(rid)) };
            out.extend_from_slice(body);
            out.push(b'\n');
            longest = longest.max(body.len() + 1);
            count += 1;
        }
        Ok((count, longest))
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
