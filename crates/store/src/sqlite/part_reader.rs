//! Reading one export part in windows, each in its own short read transaction, so a download
//! never holds a snapshot (and never pins the WAL) while it waits for its client.
//!
//! Windows are exact whatever is written between them: which resources a key window selects
//! depends only on the transaction time (see [`select_window`]), and a selected resource's body
//! is its version at the transaction time: the current row while that row is no newer, else the
//! history row, which later writes never change.

use std::collections::VecDeque;

use rusqlite::{params, Connection, Row, Rows, Statement};

use super::export::{load_members, select_window, selected, type_span, VersionAt, WINDOW};
use super::SqliteStore;
use crate::{MemberSelection, PartRange, PartReader, StoreError, TenantId};

/// The SQLite [`PartReader`]: between calls it keeps only the keys of the current key window's
/// selected resources not yet read (at most [`WINDOW`] pairs of integers), never a transaction.
pub(super) struct SqlitePartReader<'a> {
    store: &'a SqliteStore,
    tenant: TenantId,
    selection: &'a MemberSelection,
    resource_type: &'a str,
    range: PartRange,
    /// The first key whose window is not resolved yet; `None` once the whole range is.
    unresolved: Option<i64>,
    /// The end of the range, clamped to the type's keys on the first window.
    last_key: i64,
    /// Selected, not yet read: `(key, history version holding the body, or 0 for the current row)`.
    pending: VecDeque<(i64, i64)>,
    started: bool,
}

impl<'a> SqlitePartReader<'a> {
    pub(super) fn new(
        store: &'a SqliteStore,
        tenant: TenantId,
        selection: &'a MemberSelection,
        resource_type: &'a str,
        range: PartRange,
    ) -> SqlitePartReader<'a> {
        SqlitePartReader {
            store,
            tenant,
            selection,
            resource_type,
            range,
            unresolved: None,
            last_key: range.last_key,
            pending: VecDeque::new(),
            started: false,
        }
    }

    /// Resolves key windows until one selects something or the range is exhausted.
    fn resolve(&mut self, connection: &Connection) -> Result<(), StoreError> {
        if !self.started {
            self.started = true;
            let Some((type_first, type_last)) = type_span(connection, self.tenant, self.resource_type)? else {
                return Ok(());
            };
            let first = self.range.first_key.max(type_first);
            self.last_key = self.range.last_key.min(type_last);
            self.unresolved = (first <= self.last_key).then_some(first);
        }
        let Some(mut start) = self.unresolved else { return Ok(()) };
        let selection = self.selection;
        load_members(connection, self.tenant, selection)?;
        let select = |reach, version: &VersionAt| selected(selection, reach, version);
        loop {
            let end = start.saturating_add(WINDOW - 1).min(self.last_key);
            let window = (start, end);
            let chosen = select_window(connection, self.tenant, selection, self.resource_type, window, select)?;
            self.pending.extend(chosen.iter().map(|chosen| (chosen.rid, chosen.history_version)));
            self.unresolved = (end < self.last_key).then(|| end + 1);
            match self.unresolved {
                Some(next) if self.pending.is_empty() => start = next,
                _ => return Ok(()),
            }
        }
    }

    /// Appends pending resources' bodies until `max_bytes` are appended; returns how many.
    fn read_bodies(&mut self, connection: &Connection, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError> {
        let at = self.selection.transaction_time;
        let (Some(&(first, _)), Some(&(last, _))) = (self.pending.front(), self.pending.back()) else { return Ok(0) };
        let mut current_span = connection
            .prepare_cached("SELECT rid, last_updated, body FROM resources WHERE rid BETWEEN ?1 AND ?2 ORDER BY rid")?;
        let mut current_one =
            connection.prepare_cached("SELECT rid, last_updated, body FROM resources WHERE rid = ?1")?;
        let mut history_version =
            connection.prepare_cached("SELECT body FROM resource_history WHERE rid = ?1 AND version = ?2")?;
        let mut history_at = connection.prepare_cached(
            "SELECT body FROM resource_history WHERE rid = ?1 AND last_updated <= ?2 ORDER BY version DESC LIMIT 1",
        )?;
        // Dense (at least one key in four of the span is ours): one sequential scan; sparse: a
        // lookup per key.
        let dense = self.pending.len() as i64 * 4 > last - first;
        let mut scan = if dense { Some(current_span.query(params![first, last])?) } else { None };
        let (start_len, mut count) = (out.len(), 0u64);
        while out.len() - start_len < max_bytes {
            let Some((rid, version)) = self.pending.pop_front() else { break };
            let found = if version > 0 {
                append_body(history_version.query(params![rid, version])?.next()?, 0, out)?
            } else {
                match scan.as_mut() {
                    Some(rows) => append_current(rows, rid, at, &mut history_at, out)?,
                    None => append_current(&mut current_one.query([rid])?, rid, at, &mut history_at, out)?,
                }
            };
            if !found {
                return Err(StoreError::Database(format!("export: no stored version of resource {rid} at {at}")));
            }
            count += 1;
        }
        Ok(count)
    }
}

/// Advances `rows` (current rows in key order) to key `rid` and appends its version at `at`:
/// that row's body while it is no newer, else (written since an earlier window resolved it) the
/// newest history row no later than `at`. False when the key has no row.
fn append_current(
    rows: &mut Rows<'_>,
    rid: i64,
    at: i64,
    history_at: &mut Statement<'_>,
    out: &mut Vec<u8>,
) -> Result<bool, StoreError> {
    while let Some(row) = rows.next()? {
        let key: i64 = row.get(0)?;
        if key < rid {
            continue; // not ours
        }
        if key > rid {
            return Ok(false);
        }
        return if row.get::<_, i64>(1)? <= at {
            append_body(Some(row), 2, out)
        } else {
            append_body(history_at.query(params![rid, at])?.next()?, 0, out)
        };
    }
    Ok(false)
}

/// Appends column `column` of `row` (a stored JSON body) as one NDJSON line; false when there
/// is no such row or body.
fn append_body(row: Option<&Row<'_>>, column: usize, out: &mut Vec<u8>) -> Result<bool, StoreError> {
    let Some(row) = row else { return Ok(false) };
    let Some(body) = row.get_ref(column)?.as_bytes_or_null()? else { return Ok(false) };
    out.extend_from_slice(body);
    out.push(b'\n');
    Ok(true)
}

impl PartReader for SqlitePartReader<'_> {
    fn next_window(&mut self, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError> {
        let store = self.store;
        store.with_snapshot(|connection| {
            if self.pending.is_empty() {
                self.resolve(connection)?;
            }
            self.read_bodies(connection, out, max_bytes)
        })
    }
}
