//! New resources in bulk (imports, `$upload-ndjson`, large Bundles): every row of a batch of
//! new resources goes in with one `COPY ... FROM STDIN (FORMAT binary)` per table instead of
//! one statement per resource or one `INSERT ... SELECT unnest(...)` per table.
//!
//! What makes `COPY` possible where the single-write path uses `INSERT ... ON CONFLICT`:
//! - the resources' keys (`rid`) are taken from the table's identity sequence up front, in the
//!   order of the writes, so the index rows can be built before the resource rows go in;
//! - the resources are new (checked under the clock's row lock, which every writer takes
//!   first, so no other writer can create them meanwhile) and their rows carry those new keys,
//!   so no index row can already exist; duplicates within one resource (an identifier listed
//!   twice) are removed here instead of by `ON CONFLICT DO NOTHING`.
//!
//! The rows are exactly those the single-write path writes (`put` in `resources.rs` and
//! `sync_references` in `associated.rs`); the conformance test
//! `bulk_writes_index_exactly_as_single_writes` compares the two.

use std::collections::{HashMap, HashSet};

use bulkhead_fhir::compartment::patient_compartments_of;
use bulkhead_fhir::references::outgoing_references;
use bulkhead_fhir::{resource_type_code, Micros};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use serde_json::Value;

use super::resources::mark_patients_changed;
use super::Db;
use crate::write::search_tokens;
use crate::{stamped_json, StoreError, TenantId, WriteOp, Written};

impl Db<'_> {
    /// Streams `rows` into `copy` (a `COPY table (columns) FROM STDIN (FORMAT binary)` whose
    /// columns have `types`) inside the open transaction; returns the rows written.
    fn copy_rows<'r>(
        &mut self,
        copy: &str,
        types: &[Type],
        rows: impl Iterator<Item = Vec<&'r (dyn ToSql + Sync)>>,
    ) -> Result<u64, StoreError> {
        let mut writer = BinaryCopyInWriter::new(self.transaction.copy_in(copy)?, types);
        for row in rows {
            writer.write(&row)?;
        }
        Ok(writer.finish()?)
    }
}

/// A new resource chosen for the bulk path: its index in the ops, type, id, body, stored text
/// and key.
struct New<'a> {
    index: usize,
    resource_type: &'a str,
    code: i16,
    id: &'a str,
    body: &'a Value,
    text: String,
    rid: i64,
}

/// Creates, with one `COPY` per table, every resource of `ops` that is new: a create or
/// unconditional update of a `(type, id)` the tenant does not have and that no other op of the
/// list names (Groups excepted: their membership history goes through the single-write path).
/// Such a write cannot fail on its own, so batch and transaction agree. Returns each one's
/// index in `ops` and result; any database error fails the whole write (its transaction is
/// rolled back, nothing of it stays).
pub(super) fn insert_new(
    db: &mut Db<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    ops: &[WriteOp],
    timestamp: Micros,
) -> Result<Vec<(usize, Written)>, StoreError> {
    let mut named: HashMap<(&str, &str), usize> = HashMap::with_capacity(ops.len());
    for op in ops {
        *named.entry((op.resource_type(), op.id())).or_default() += 1;
    }
    let (types, ids): (Vec<&str>, Vec<&str>) = named.keys().copied().unzip();
    let existing: HashSet<(String, String)> = db
        .query(
            "SELECT r.resource_type, r.id FROM resources r
             JOIN unnest($2::text[], $3::text[]) AS n(resource_type, id)
               ON r.tenant_id = $1 AND r.resource_type = n.resource_type AND r.id = n.id",
            &[&tenant.0, &types, &ids],
        )?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, StoreError>>()?;
    let mut chosen: Vec<New<'_>> = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        let body = match op {
            WriteOp::Create { body, .. } | WriteOp::Update { body, if_match: None, .. } => body,
            _ => continue,
        };
        let (resource_type, id) = (op.resource_type(), op.id());
        // A type outside R4 cannot be indexed: the single-write path fails that entry alone.
        let Some(code) = resource_type_code(resource_type).and_then(|code| i16::try_from(code).ok()) else { continue };
        if resource_type == "Group"
            || named[&(resource_type, id)] > 1
            || existing.contains(&(resource_type.to_owned(), id.to_owned()))
        {
            continue;
        }
        let text = stamped_json(body, id, 1, timestamp)?;
        chosen.push(New { index, resource_type, code, id, body, text, rid: 0 });
    }
    if chosen.is_empty() {
        return Ok(Vec::new());
    }

    // Keys in the order of the writes, as the identity default would have given them: one block
    // of the sequence, taken with one call (not one `nextval` per resource). Every insert into
    // `resources` runs under the clock's row lock (`PgStore::with_write`), so no other writer
    // takes values between the `nextval` and the `setval`.
    let count = chosen.len() as i64;
    let last: i64 = db
        .query_one(
            "SELECT setval(s, nextval(s) + $1 - 1) FROM CAST(pg_get_serial_sequence('resources', 'rid') AS regclass) AS s",
            &[&count],
        )?
        .try_get(0)?;
    for (new, rid) in chosen.iter_mut().zip(last - count + 1..) {
        new.rid = rid;
    }

    let (version, deleted) = (1i64, false);
    db.copy_rows(
        "COPY resources (tenant_id, rid, resource_type, id, version, last_updated, deleted, owner, body)
         FROM STDIN (FORMAT binary)",
        &[Type::INT8, Type::INT8, Type::TEXT, Type::TEXT, Type::INT8, Type::INT8, Type::BOOL, Type::TEXT, Type::TEXT],
        chosen.iter().map(|new| -> Vec<&(dyn ToSql + Sync)> {
            vec![&tenant.0, &new.rid, &new.resource_type, &new.id, &version, &timestamp, &deleted, &owner, &new.text]
        }),
    )?;

    copy_compartments(db, tenant, owner, &chosen, timestamp)?;
    copy_search_tokens(db, tenant, &chosen)?;
    copy_references(db, tenant, &chosen, timestamp)?;
    let types: Vec<&str> = chosen.iter().map(|new| new.resource_type).collect();
    let ids: Vec<&str> = chosen.iter().map(|new| new.id).collect();
    let new_rids: Vec<i64> = chosen.iter().map(|new| new.rid).collect();
    super::associated::resolve_new_targets(db, tenant, &types, &ids, &new_rids)?;
    Ok(chosen
        .into_iter()
        .map(|new| {
            let written = Written {
                resource_type: new.resource_type.to_owned(),
                id: new.id.to_owned(),
                version: 1,
                last_updated: timestamp,
                created: true,
                deleted: false,
                changed: true,
                body: Some(new.text),
            };
            (new.index, written)
        })
        .collect())
}

/// The compartment rows of the new resources (one per patient compartment a resource is in,
/// open from `timestamp`), and the patients' change watermarks.
fn copy_compartments(
    db: &mut Db<'_>,
    tenant: TenantId,
    owner: Option<&str>,
    chosen: &[New<'_>],
    timestamp: Micros,
) -> Result<(), StoreError> {
    // (patient, type code, rid); `patient_compartments_of` lists each patient once.
    let mut rows: Vec<(String, i16, i64)> = Vec::new();
    for new in chosen {
        for patient in patient_compartments_of(new.resource_type, new.id, new.body) {
            rows.push((patient, new.code, new.rid));
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let mut patients: Vec<&str> = rows.iter().map(|row| row.0.as_str()).collect();
    patients.sort_unstable();
    patients.dedup();
    let pkeys = patient_keys(db, tenant, &patients)?;
    let pkey_of = |patient: &str| {
        pkeys
            .get(patient)
            .copied()
            .ok_or_else(|| StoreError::Database("a patient key is missing after its insert".into()))
    };
    let keyed: Vec<(i64, i16, i64)> = rows
        .iter()
        .map(|(patient, code, rid)| Ok((pkey_of(patient)?, *code, *rid)))
        .collect::<Result<_, StoreError>>()?;
    let deleted = false;
    db.copy_rows(
        "COPY compartment (tenant_id, pkey, type_code, rid, from_ts, last_updated, deleted, owner)
         FROM STDIN (FORMAT binary)",
        &[Type::INT8, Type::INT8, Type::INT2, Type::INT8, Type::INT8, Type::INT8, Type::BOOL, Type::TEXT],
        keyed.iter().map(|(pkey, code, rid)| -> Vec<&(dyn ToSql + Sync)> {
            vec![&tenant.0, pkey, code, rid, &timestamp, &timestamp, &deleted, &owner]
        }),
    )?;
    let mut changed: Vec<i64> = pkeys.into_values().collect();
    changed.sort_unstable();
    mark_patients_changed(db, tenant, &changed, timestamp)
}

/// The tenant's keys of `patients` (distinct), each created on first mention.
fn patient_keys(db: &mut Db<'_>, tenant: TenantId, patients: &[&str]) -> Result<HashMap<String, i64>, StoreError> {
    db.execute(
        "INSERT INTO patient_keys (tenant_id, patient_id) SELECT $1, p FROM unnest($2::text[]) AS p
         ON CONFLICT DO NOTHING",
        &[&tenant.0, &patients],
    )?;
    db.query(
        "SELECT k.patient_id, k.pkey FROM patient_keys k
         WHERE k.tenant_id = $1 AND k.patient_id = ANY($2::text[])",
        &[&tenant.0, &patients],
    )?
    .iter()
    .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
    .collect()
}

/// The search tokens of the new resources, each distinct token of a resource once.
fn copy_search_tokens(db: &mut Db<'_>, tenant: TenantId, chosen: &[New<'_>]) -> Result<(), StoreError> {
    let mut rows: Vec<(i16, &'static str, String, String, i64)> = Vec::new();
    for new in chosen {
        let mut tokens = search_tokens(new.body);
        tokens.sort_unstable();
        tokens.dedup();
        rows.extend(tokens.into_iter().map(|(param, system, value)| (new.code, param, system, value, new.rid)));
    }
    if rows.is_empty() {
        return Ok(());
    }
    db.copy_rows(
        "COPY search_token (tenant_id, type_code, param, system, value, rid) FROM STDIN (FORMAT binary)",
        &[Type::INT8, Type::INT2, Type::TEXT, Type::TEXT, Type::TEXT, Type::INT8],
        rows.iter().map(|(code, param, system, value, rid)| -> Vec<&(dyn ToSql + Sync)> {
            vec![&tenant.0, code, param, system, value, rid]
        }),
    )?;
    Ok(())
}

/// The reference-index rows of the new resources (open from `timestamp`). A Provenance
/// target's row carries its target's key when the target's row exists: one of this batch, or
/// one already stored (deleted or not), as the single-write path's insert looks it up.
fn copy_references(db: &mut Db<'_>, tenant: TenantId, chosen: &[New<'_>], timestamp: Micros) -> Result<(), StoreError> {
    // (rid, provenance target, target type, target id, target rid)
    let mut rows: Vec<(i64, bool, String, String, Option<i64>)> = Vec::new();
    let mut referencing: Vec<&str> = Vec::new();
    for new in chosen {
        // Sorted and distinct.
        let references = outgoing_references(new.resource_type, new.body);
        if references.iter().any(|reference| !reference.provenance_target) && !referencing.contains(&new.resource_type)
        {
            referencing.push(new.resource_type);
        }
        rows.extend(
            references.into_iter().map(|reference| {
                (new.rid, reference.provenance_target, reference.target_type, reference.target_id, None)
            }),
        );
    }
    super::associated::note_referencing_types(db, tenant, &referencing)?;
    if rows.is_empty() {
        return Ok(());
    }
    let in_batch: HashMap<(&str, &str), i64> =
        chosen.iter().map(|new| ((new.resource_type, new.id), new.rid)).collect();
    let mut unresolved: (Vec<&str>, Vec<&str>) = Default::default();
    let mut resolved_here: Vec<Option<i64>> = Vec::with_capacity(rows.len());
    for (_, provenance_target, target_type, target_id, _) in &rows {
        let here = match provenance_target {
            true => in_batch.get(&(target_type.as_str(), target_id.as_str())).copied(),
            false => None,
        };
        if *provenance_target && here.is_none() {
            unresolved.0.push(target_type);
            unresolved.1.push(target_id);
        }
        resolved_here.push(here);
    }
    let stored: HashMap<(String, String), i64> = if unresolved.0.is_empty() {
        HashMap::new()
    } else {
        db.query(
            "SELECT r.resource_type, r.id, r.rid FROM resources r
             JOIN unnest($2::text[], $3::text[]) AS n(resource_type, id)
               ON r.tenant_id = $1 AND r.resource_type = n.resource_type AND r.id = n.id",
            &[&tenant.0, &unresolved.0, &unresolved.1],
        )?
        .iter()
        .map(|row| Ok(((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?)))
        .collect::<Result<_, StoreError>>()?
    };
    for (row, here) in rows.iter_mut().zip(resolved_here) {
        row.4 = match (row.1, here) {
            (false, _) => None,
            (true, Some(rid)) => Some(rid),
            (true, None) => stored.get(&(row.2.clone(), row.3.clone())).copied(),
        };
    }
    db.copy_rows(
        "COPY reference_index (tenant_id, rid, provenance_target, target_type, target_id, from_ts, target_rid)
         FROM STDIN (FORMAT binary)",
        &[Type::INT8, Type::INT8, Type::BOOL, Type::TEXT, Type::TEXT, Type::INT8, Type::INT8],
        rows.iter().map(|(rid, provenance_target, target_type, target_id, target_rid)| -> Vec<&(dyn ToSql + Sync)> {
            vec![&tenant.0, rid, provenance_target, target_type, target_id, &timestamp, target_rid]
        }),
    )?;
    Ok(())
}
