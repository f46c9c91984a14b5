//! A stored associated set: the computed set written to `export_associated` (with its parts
//! planned from the same sorted stream), and read back one part at a time.

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection};

use crate::selection::add_to_parts;
use crate::sqlite::SqliteStore;
use crate::{AssociatedRequest, MemberSelection, PartRange, PartReader, StoreError, TenantId};

/// Rows stored in `export_associated` per write transaction.
const STORE_BATCH: usize = 10_000;

/// Stores the set computed in `temp.assoc_out` (on `connection`) under `request.set_id`, and
/// plans its parts from the same sorted stream.
pub(super) fn store_set(
    store: &SqliteStore,
    connection: &Connection,
    tenant: TenantId,
    request: &AssociatedRequest,
    part_size: u64,
) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT resource_type, rid FROM temp.assoc_out WHERE resource_type > ?1 OR (resource_type = ?1 AND rid > ?2)
         ORDER BY resource_type, rid LIMIT ?3",
    )?;
    let mut planned: Vec<(String, Vec<PartRange>)> = Vec::new();
    let mut after = (String::new(), i64::MIN);
    loop {
        let batch: Vec<(String, i64)> = statement
            .query_map(params![after.0, after.1, STORE_BATCH as i64], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let Some(last) = batch.last() else { break };
        after = last.clone();
        store.with_write(|transaction, _| {
            let mut insert = transaction.prepare_cached(
                "INSERT OR IGNORE INTO export_associated (tenant_id, set_id, resource_type, rid, expires)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (resource_type, rid) in &batch {
                insert.execute(params![tenant.0, request.set_id, resource_type, rid, request.expires])?;
            }
            Ok(())
        })?;
        for (resource_type, rid) in batch {
            if planned.last().is_none_or(|(planned_type, _)| *planned_type != resource_type) {
                planned.push((resource_type.clone(), Vec::new()));
            }
            add_to_parts(&mut planned.last_mut().expect("pushed above").1, rid, part_size);
        }
    }
    Ok(planned)
}

/// Keys of a stored set read per window.
const READ_BATCH: i64 = 512;

/// Reads one part of a stored associated set: each window is one short read transaction.
pub(in crate::sqlite) struct AssociatedPartReader<'a> {
    pub(in crate::sqlite) store: &'a SqliteStore,
    pub(in crate::sqlite) tenant: TenantId,
    pub(in crate::sqlite) selection: &'a MemberSelection,
    pub(in crate::sqlite) set_id: &'a str,
    pub(in crate::sqlite) resource_type: &'a str,
    /// The next key to read; `None` once the part is complete.
    pub(in crate::sqlite) next_key: Option<i64>,
    pub(in crate::sqlite) last_key: i64,
}

impl PartReader for AssociatedPartReader<'_> {
    fn next_window(&mut self, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError> {
        let Some(next_key) = self.next_key else { return Ok(0) };
        let at = self.selection.transaction_time;
        let (start_len, last_key) = (out.len(), self.last_key);
        let (tenant, set_id, resource_type) = (self.tenant, self.set_id, self.resource_type);
        let (count, next) = self.store.with_snapshot(|connection| {
            let mut keys = connection.prepare_cached(
                "SELECT rid FROM export_associated WHERE tenant_id = ?1 AND set_id = ?2 AND resource_type = ?3
                   AND rid BETWEEN ?4 AND ?5 ORDER BY rid LIMIT ?6",
            )?;
            let rids: Vec<i64> = keys
                .query_map(params![tenant.0, set_id, resource_type, next_key, last_key, READ_BATCH], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let mut count = 0u64;
            let mut next = None;
            for (index, rid) in rids.iter().enumerate() {
                if out.len() - start_len >= max_bytes {
                    next = Some(*rid);
                    break;
                }
                append_version_at(connection, *rid, at, out)?;
                count += 1;
                if index + 1 == rids.len() && rids.len() as i64 == READ_BATCH && *rid < last_key {
                    next = Some(rid + 1);
                }
            }
            Ok((count, next))
        })?;
        self.next_key = next;
        if count == 0 && next.is_some() {
            // Cannot happen (max_bytes > 0 reads at least one), but never loop without progress.
            return Err(StoreError::Database("export: associated part made no progress".into()));
        }
        Ok(count)
    }
}

/// Appends the body of `rid`'s version at `at` as one NDJSON line.
fn append_version_at(connection: &Connection, rid: i64, at: Micros, out: &mut Vec<u8>) -> Result<(), StoreError> {
    let mut current = connection.prepare_cached("SELECT last_updated, body FROM resources WHERE rid = ?1")?;
    let mut earlier = connection.prepare_cached(
        "SELECT body FROM resource_history WHERE rid = ?1 AND last_updated <= ?2 ORDER BY version DESC LIMIT 1",
    )?;
    let mut rows = current.query([rid])?;
    let appended = match rows.next()? {
        Some(row) if row.get::<_, i64>(0)? <= at => append(row.get_ref(1)?.as_bytes_or_null()?, out),
        Some(_) => {
            let mut then = earlier.query(params![rid, at])?;
            match then.next()? {
                Some(row) => append(row.get_ref(0)?.as_bytes_or_null()?, out),
                None => false,
            }
        }
        None => false,
    };
    if !appended {
        return Err(StoreError::Database(format!("export: no stored version of resource {rid} at {at}")));
    }
    Ok(())
}

fn append(body: Option<&[u8]>, out: &mut Vec<u8>) -> bool {
    let Some(body) = body else { return false };
    out.extend_from_slice(body);
    out.push(b'\n');
    true
}

pub(in crate::sqlite) fn associated_ids(
    connection: &Connection,
    tenant: TenantId,
    set_id: &str,
    resource_type: &str,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM resources r JOIN export_associated a
                        ON a.tenant_id = r.tenant_id AND a.resource_type = r.resource_type AND a.rid = r.rid
                        WHERE r.tenant_id = ?1 AND r.resource_type = ?2 AND r.id = ?3 AND a.set_id = ?4)",
    )?;
    let mut held = Vec::new();
    for id in ids {
        if statement.query_row(params![tenant.0, resource_type, id, set_id], |row| row.get::<_, bool>(0))? {
            held.push(id.clone());
        }
    }
    Ok(held)
}
