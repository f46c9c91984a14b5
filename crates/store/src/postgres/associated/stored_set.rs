//! A stored associated set: the computed set written to `export_associated` (its parts planned
//! from it), read back one part at a time, and removed once expired.

use bulkhead_fhir::Micros;

use super::BATCH;
use crate::postgres::{Db, PgStore};
use crate::selection::add_to_parts;
use crate::{AssociatedRequest, MemberSelection, PartRange, PartReader, StoreError, TenantId};

/// Stores the set computed in `assoc_out` under `request.set_id` and plans its parts.
pub(super) fn store_set(
    db: &mut Db<'_>,
    tenant: TenantId,
    request: &AssociatedRequest,
    part_size: u64,
) -> Result<Vec<(String, Vec<PartRange>)>, StoreError> {
    db.execute(
        "INSERT INTO associated_sets (tenant_id, set_id, expires) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id, set_id) DO UPDATE SET expires = GREATEST(associated_sets.expires, excluded.expires)",
        &[&tenant.0, &request.set_id, &request.expires],
    )?;
    db.execute(
        "INSERT INTO export_associated (tenant_id, set_id, resource_type, rid)
         SELECT $1, $2, resource_type, rid FROM assoc_out ON CONFLICT DO NOTHING",
        &[&tenant.0, &request.set_id],
    )?;
    let mut types: Vec<String> = db
        .query("SELECT DISTINCT resource_type FROM assoc_out", &[])?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    types.sort_unstable();
    let mut planned = Vec::with_capacity(types.len());
    for resource_type in types {
        let mut parts = Vec::new();
        let mut after = i64::MIN;
        loop {
            let rids: Vec<i64> = db
                .query(
                    "SELECT rid FROM assoc_out WHERE resource_type = $1 AND rid > $2 ORDER BY rid LIMIT $3",
                    &[&resource_type, &after, &BATCH],
                )?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            let Some(&last) = rids.last() else { break };
            after = last;
            for rid in rids {
                add_to_parts(&mut parts, rid, part_size);
            }
        }
        planned.push((resource_type, parts));
    }
    Ok(planned)
}

/// Keys of a stored set read per window at most.
const READ_BATCH: usize = 512;

/// Reads one part of a stored associated set: each window is one short read transaction.
pub(in crate::postgres) struct AssociatedPartReader<'a> {
    pub(in crate::postgres) store: &'a PgStore,
    pub(in crate::postgres) tenant: TenantId,
    pub(in crate::postgres) selection: &'a MemberSelection,
    pub(in crate::postgres) set_id: &'a str,
    pub(in crate::postgres) resource_type: &'a str,
    /// The next key to read; `None` once the part is complete.
    pub(in crate::postgres) next_key: Option<i64>,
    pub(in crate::postgres) last_key: i64,
    /// Bytes and lines read so far, to size the next batch to the caller's `max_bytes`.
    pub(in crate::postgres) read_bytes: u64,
    pub(in crate::postgres) read_lines: u64,
}

impl PartReader for AssociatedPartReader<'_> {
    fn next_window(&mut self, out: &mut Vec<u8>, max_bytes: usize) -> Result<u64, StoreError> {
        let Some(mut next_key) = self.next_key else { return Ok(0) };
        let at = self.selection.transaction_time;
        let start_len = out.len();
        let mut count = 0u64;
        let store = self.store;
        let next = store.with_read(|db| {
            while out.len() - start_len < max_bytes {
                let average = self.read_bytes.checked_div(self.read_lines).map_or(1024, |average| average.max(1));
                let wanted = ((max_bytes - (out.len() - start_len)) as u64).div_ceil(average) as usize;
                let limit = wanted.clamp(1, READ_BATCH) as i64;
                // Each key with the body of its version at the transaction time.
                let rows = db.query(
                    "SELECT a.rid, CASE WHEN r.last_updated <= $6 THEN r.body ELSE h.body END
                     FROM (SELECT rid FROM export_associated
                           WHERE tenant_id = $1 AND set_id = $2 AND resource_type = $3 AND rid BETWEEN $4 AND $5
                           ORDER BY rid LIMIT $7) AS a
                     JOIN resources r ON r.tenant_id = $1 AND r.rid = a.rid
                     LEFT JOIN LATERAL (
                         SELECT body FROM resource_history
                         WHERE tenant_id = $1 AND rid = a.rid AND last_updated <= $6 ORDER BY version DESC LIMIT 1
                     ) h ON r.last_updated > $6
                     ORDER BY a.rid",
                    &[&self.tenant.0, &self.set_id, &self.resource_type, &next_key, &self.last_key, &at, &limit],
                )?;
                for row in &rows {
                    let rid: i64 = row.try_get(0)?;
                    let Some(body) = row.try_get::<_, Option<&str>>(1)? else {
                        return Err(StoreError::Database(format!(
                            "export: no stored version of resource {rid} at {at}"
                        )));
                    };
                    out.extend_from_slice(body.as_bytes());
                    out.push(b'\n');
                    self.read_bytes += body.len() as u64 + 1;
                    self.read_lines += 1;
                    count += 1;
                    next_key = rid.saturating_add(1);
                }
                if (rows.len() as i64) < limit || next_key > self.last_key {
                    return Ok(None);
                }
            }
            Ok(Some(next_key))
        })?;
        self.next_key = next;
        Ok(count)
    }
}

pub(in crate::postgres) fn associated_ids(
    db: &mut Db<'_>,
    tenant: TenantId,
    set_id: &str,
    resource_type: &str,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    db.query(
        "SELECT r.id FROM unnest($4::text[]) WITH ORDINALITY AS n(id, ord)
         JOIN resources r ON r.tenant_id = $1 AND r.resource_type = $2 AND r.id = n.id
         JOIN export_associated a ON a.tenant_id = $1 AND a.set_id = $3 AND a.resource_type = $2 AND a.rid = r.rid
         ORDER BY n.ord",
        &[&tenant.0, &resource_type, &set_id, &ids],
    )?
    .iter()
    .map(|row| Ok(row.try_get(0)?))
    .collect()
}

/// Housekeeping across tenants: removes the sets that expired by `now` (a scan of the small
/// `associated_sets`; each set's rows go by their key prefix). One statement: a registration
/// leaves with its rows, and one whose expiry a sharing export extends meanwhile (its row lock
/// makes the `DELETE` re-check it) stays with all of them (see `plan_watermarks`).
pub(in crate::postgres) fn delete_expired_sets(db: &mut Db<'_>, now: Micros) -> Result<(), StoreError> {
    db.execute(
        "WITH expired AS (DELETE FROM associated_sets WHERE expires <= $1 RETURNING tenant_id, set_id)
         DELETE FROM export_associated a USING expired e WHERE a.tenant_id = e.tenant_id AND a.set_id = e.set_id",
        &[&now],
    )?;
    Ok(())
}
