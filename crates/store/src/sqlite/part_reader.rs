//! Reading one export part in windows, each in its own short read transaction, so a download
//! never holds a snapshot (and never pins the WAL) while it waits for its client.
//!
//! Windows are exact whatever is written between them: which resources a key window selects
//! depends only on the transaction time (see [`select_window`]), and a selected resource's body
//! is its version at the transaction time: the current row while that row is no newer, else the
//! history row, which later writes never change.

use std::collections::VecDeque;

use rusqlite::{params, Connection, Row, Rows, Statement};

use super::export::{load_members, select_window, selected, type_span, KeyWindows, VersionAt};
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
    /// The key windows not resolved yet, over the range clamped to the type's keys (None until
    /// the first window).
    windows: Option<KeyWindows>,
    /// Selected, not yet read: `(key, history version holding the body, or 0 for the current row)`.
    pending: VecDeque<(i64, i64)>,
}

impl<'a> SqlitePartReader<'a> {
    pub(super) fn new(
        store: &'a SqliteStore,
        tenant: TenantId,
        selection: &'a MemberSelection,
        resource_type: &'a str,
        range: PartRange,
    ) -> SqlitePartReader<'a> {
        SqlitePartReader { store, tenant, selection, resource_type, range, windows: None, pending: VecDeque::new() }
    }

    /// Resolves key windows until one selects something or the range is exhausted.
    fn resolve(&mut self, connection: &Connection) -> Result<(), StoreError> {
        if self.windows.is_none() {
            // A type with no resources has an empty range.
            let (first, last) = type_span(connection, self.tenant, self.resource_type)?
                .map_or((1, 0), |(first, last)| (self.range.first_key.max(first), self.range.last_key.min(last)));
            self.windows = Some(KeyWindows::new(first, last));
        }
        let Some(windows) = self.windows.as_mut() else { return Ok(()) };
        if windows.current().is_none() {
            return Ok(());
        }
        let selection = self.selection;
        load_members(connection, self.tenant, selection)?;
        let select = |reach, version: &VersionAt| selected(selection, reach, version);
        while let Some((window, row_limit)) = windows.current() {
            let pending = &mut self.pending;
            let read = select_window(
                connection,
                self.tenant,
                selection,
                self.resource_type,
                window,
                row_limit,
                select,
                |chosen| {
                    pending.push_back((chosen.rid, chosen.history_version));
                    Ok(())
                },
            )?;
            windows.record(read);
            if !self.pending.is_empty() {
                break;
            }
        }
        Ok(())
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
