//! What one write transaction has already recorded, so that a bulk batch (thousands of resources
//! of a few patients and types, all at one timestamp) does not repeat it for every resource.
//!
//! Every entry is a fact about the transaction's own state that no later statement of the same
//! write undoes: a patient's `changed_at` only grows (`MAX`), a type's change time only grows, a
//! referencing type is never removed. A write in `Batch` mode rolls an entry back to its
//! savepoint when it fails, which may undo what the entry recorded: the memo is then forgotten
//! ([`WriteMemo::forget`]). A memo lives for one write (one tenant, one timestamp) only.

use std::collections::{HashMap, HashSet};

use bulkhead_fhir::Micros;
use rusqlite::{params, Transaction};

use super::provenance_targets::PendingTargets;
use crate::{StoreError, TenantId};

#[derive(Default)]
pub(super) struct WriteMemo {
    /// Patients whose key this write has and whose `changed_at` it has already raised to its
    /// timestamp: touching them again would change nothing.
    touched_patients: HashMap<String, i64>,
    /// Types whose `associated_type_changes` row this write has already raised.
    changed_types: HashSet<String>,
    /// Types this write has already recorded in `referencing_types`.
    referencing_types: HashSet<String>,
    /// Whether the tenant may have Provenance target rows without a key (`provenance_unresolved`):
    /// `None` until asked, and again after this write inserted a Provenance target row.
    unresolved_targets: Option<bool>,
    /// A bulk load's Provenance target rows not yet written ([`PendingTargets`]); `None`: every
    /// row is written at once. Not a fact like the others: rows of an entry rolled back to its
    /// savepoint go with [`WriteMemo::forget`], so `Batch` mode flushes before each savepoint.
    pending_targets: Option<PendingTargets>,
}

impl WriteMemo {
    /// The memo of a bulk load's transaction: Provenance target rows are written in sorted
    /// batches ([`PendingTargets`]). The transaction must call [`WriteMemo::flush_targets`]
    /// before it commits.
    pub(super) fn for_bulk_load() -> WriteMemo {
        WriteMemo { pending_targets: Some(PendingTargets::default()), ..WriteMemo::default() }
    }

    /// Drops everything remembered (after a rollback to a savepoint), and the target rows not
    /// yet written (those of the entry rolled back: earlier entries' rows were flushed before it).
    pub(super) fn forget(&mut self) {
        let deferring = self.pending_targets.is_some();
        *self = WriteMemo::default();
        if deferring {
            self.pending_targets = Some(PendingTargets::default());
        }
    }

    /// Takes the Provenance target row of `rid` naming `target_type/target_id` to write later,
    /// when this write defers them (flushing when the pending rows reach their memory bound).
    /// False: the caller writes it now.
    pub(super) fn defer_target(
        &mut self,
        transaction: &Transaction<'_>,
        tenant: TenantId,
        rid: i64,
        (target_type, target_id): (&str, &str),
        from_ts: Micros,
    ) -> Result<bool, StoreError> {
        let Some(pending) = &mut self.pending_targets else { return Ok(false) };
        if pending.push(rid, target_type, target_id, from_ts) {
            self.flush_targets(transaction, tenant)?;
        }
        Ok(true)
    }

    /// Writes every pending target row.
    pub(super) fn flush_targets(&mut self, transaction: &Transaction<'_>, tenant: TenantId) -> Result<(), StoreError> {
        if let Some(pending) = &mut self.pending_targets {
            if pending.flush(transaction, tenant)? {
                self.provenance_target_added();
            }
        }
        Ok(())
    }

    /// Writes the pending target rows when some are `rid`'s, before a statement reads them.
    pub(super) fn flush_targets_of(
        &mut self,
        transaction: &Transaction<'_>,
        tenant: TenantId,
        rid: i64,
    ) -> Result<(), StoreError> {
        if let Some(pending) = &mut self.pending_targets {
            if pending.flush_if_pending(transaction, tenant, rid)? {
                self.provenance_target_added();
            }
        }
        Ok(())
    }

    /// The key of a patient this write has already touched.
    pub(super) fn touched_patient(&self, patient: &str) -> Option<i64> {
        self.touched_patients.get(patient).copied()
    }

    pub(super) fn note_touched_patient(&mut self, patient: &str, pkey: i64) {
        self.touched_patients.insert(patient.to_owned(), pkey);
    }

    /// True the first time a type's change is noted in this write.
    pub(super) fn first_type_change(&mut self, resource_type: &str) -> bool {
        first_time(&mut self.changed_types, resource_type)
    }

    /// True the first time a type is noted as referencing in this write.
    pub(super) fn first_referencing_type(&mut self, resource_type: &str) -> bool {
        first_time(&mut self.referencing_types, resource_type)
    }

    /// A Provenance target row was inserted: it may have no key.
    pub(super) fn provenance_target_added(&mut self) {
        self.unresolved_targets = None;
    }

    /// Whether the tenant may have Provenance target rows without a key (one index probe, then
    /// remembered until this write adds a target row).
    pub(super) fn may_have_unresolved_targets(
        &mut self,
        transaction: &Transaction<'_>,
        tenant: TenantId,
    ) -> Result<bool, StoreError> {
        if let Some(known) = self.unresolved_targets {
            return Ok(known);
        }
        let exists: bool = transaction
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM reference_index INDEXED BY provenance_unresolved
                                WHERE tenant_id = ?1 AND provenance_target = 1 AND target_rid IS NULL)",
            )?
            .query_row(params![tenant.0], |row| row.get(0))?;
        self.unresolved_targets = Some(exists);
        Ok(exists)
    }
}

fn first_time(seen: &mut HashSet<String>, resource_type: &str) -> bool {
    if seen.contains(resource_type) {
        return false;
    }
    seen.insert(resource_type.to_owned());
    true
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;
    use serde_json::{json, Value};

    use crate::sqlite::SqliteStore;
    use crate::{Store, TenantId, WriteMode, WriteOp};

    fn update(body: Value) -> WriteOp {
        let (resource_type, id) =
            (body["resourceType"].as_str().unwrap().to_owned(), body["id"].as_str().unwrap().to_owned());
        WriteOp::Update { resource_type, id, body, if_match: None }
    }

    fn observation(id: &str, patient: &str) -> Value {
        json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
               "subject": {"reference": format!("Patient/{patient}")}})
    }

    fn provenance(id: &str, target: &str) -> Value {
        json!({"resourceType": "Provenance", "id": id, "target": [{"reference": target}],
               "recorded": "2020-01-01T00:00:00Z", "agent": [{"who": {"reference": "Practitioner/x"}}]})
    }

    fn open() -> (tempfile::TempDir, std::path::PathBuf, SqliteStore, TenantId) {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("memo.db");
        let store = SqliteStore::open(&path).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        (directory, path, store, tenant)
    }

    /// The key of every Provenance target row naming `Observation/id` (None: unresolved).
    fn target_keys(path: &std::path::Path, id: &str) -> Vec<Option<i64>> {
        let connection = Connection::open(path).unwrap();
        let mut statement = connection
            .prepare("SELECT target_rid FROM reference_index WHERE provenance_target = 1 AND target_id = ?1")
            .unwrap();
        let keys = statement.query_map([id], |row| row.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
        keys
    }

    fn rid(path: &std::path::Path, id: &str) -> i64 {
        let connection = Connection::open(path).unwrap();
        connection.query_row("SELECT rid FROM resources WHERE id = ?1", [id], |row| row.get(0)).unwrap()
    }

    /// One write creates a resource while no Provenance waits (the memo learns "none"), then a
    /// Provenance naming a target that does not exist yet, then that target: the target's key is
    /// filled in, in both write modes, also after a failed entry was rolled back in between.
    #[test]
    fn a_target_created_later_in_the_same_write_gets_its_key() {
        let (_directory, path, store, tenant) = open();
        let ops = [
            update(observation("o0", "a")),
            update(provenance("p1", "Observation/o1")),
            update(observation("o1", "a")),
        ];
        store.write(tenant, None, &ops, WriteMode::Transaction).unwrap();
        assert_eq!(target_keys(&path, "o1"), [Some(rid(&path, "o1"))]);

        let failing =
            WriteOp::Create { resource_type: "Observation".into(), id: "o0".into(), body: observation("o0", "a") };
        let ops = [
            update(observation("o2", "a")),
            update(provenance("p2", "Observation/o3")),
            failing,
            update(observation("o3", "a")),
        ];
        let results = store.write(tenant, None, &ops, WriteMode::Batch).unwrap();
        assert_eq!(results.iter().map(Result::is_ok).collect::<Vec<_>>(), [true, true, false, true]);
        assert_eq!(target_keys(&path, "o3"), [Some(rid(&path, "o3"))]);
    }

    /// An entry that made a patient's key and then failed is rolled back with its key; a later
    /// entry of the same write naming that patient makes the key again rather than reusing the
    /// rolled-back one, so the patient's compartment finds the resource.
    #[test]
    fn a_rolled_back_entry_takes_its_patient_keys_with_it() {
        let (_directory, path, store, tenant) = open();
        // Group.member is parsed for membership after the compartment rows are written: an
        // `inactive` that is not a boolean fails the entry there.
        let group = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
                           "member": [{"entity": {"reference": "Patient/new"}, "inactive": "no"}]});
        let ops = [update(group), update(observation("o1", "new"))];
        let results = store.write(tenant, None, &ops, WriteMode::Batch).unwrap();
        assert!(results[0].is_err(), "{:?}", results[0]);
        assert!(results[1].is_ok());
        let connection = Connection::open(&path).unwrap();
        let found: i64 = connection
            .query_row(
                "SELECT COUNT(*) FROM compartment c JOIN patient_keys p ON p.pkey = c.pkey
                 WHERE p.patient_id = 'new' AND c.rid = (SELECT rid FROM resources WHERE id = 'o1')",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(found, 1, "the Observation's compartment row names the patient's live key");
    }
}
