//! A bulk load's batches ([`crate::Store::write_bulk`]): one transaction per batch, as the
//! trait's default writes them, but a batch's commit does not wait for its WAL to reach disk
//! (`synchronous_commit = off`) while more batches are already waiting. Before anything is
//! reported as stored, one write commits as every other write does (waiting for the WAL to be
//! flushed up to its commit record), which makes every earlier commit durable with it: WAL is
//! one sequence, flushed in order.
//!
//! The rule, exactly: [`BulkSource::committed`] (the only way a load learns that rows are stored:
//! the import's counts, its end, the `$upload-ndjson` response) is called only after such a
//! flushing commit. A crash may lose batches committed after the last flush; none of them was
//! reported. What the commit of an unflushed batch does not change: it is visible to other
//! transactions at once (as any commit), and every write that follows it takes the clock after
//! it and flushes the WAL past it when it commits.
//!
//! The load keeps the keys of the resources it created ([`CreatedKeys`]), so that a later
//! batch's Provenance finds its targets' keys without a probe each.

use super::created_keys::CreatedKeys;
use super::{resources, PgStore};
use crate::{BulkBatch, BulkSource, StoreError, TenantId, WriteMode, Written};

/// Writes `source`'s batches, each in a transaction of its own, flushing the WAL whenever no
/// batch is waiting (or the source bounds what it keeps unconfirmed) and before returning.
pub(super) fn write_bulk(
    store: &PgStore,
    tenant: TenantId,
    owner: Option<&str>,
    source: &mut dyn BulkSource,
) -> Result<(), StoreError> {
    // Batches committed (and given back with `written`) since the last flush.
    let mut unflushed = false;
    let mut created = CreatedKeys::new();
    loop {
        // While batches wait unconfirmed, take only one that is already waiting (`next_batch`
        // never blocks then, and says `None` once the source wants a confirmation).
        let Some(batch) = source.next_batch(!unflushed) else {
            if !unflushed {
                return Ok(());
            }
            flush_wal(store)?;
            source.committed();
            unflushed = false;
            continue;
        };
        match write_batch_unflushed(store, tenant, owner, &batch, &mut created) {
            Ok(results) => {
                source.written(batch, results);
                unflushed = true;
            }
            Err(error) => {
                // The batches committed before the failure are stored: confirmed when the WAL
                // can still be flushed (a failure of this batch alone), else left unreported.
                if unflushed && flush_wal(store).is_ok() {
                    source.committed();
                }
                return Err(error);
            }
        }
    }
}

/// One batch as [`crate::write_bulk_batch`] writes it (as a whole, or entry by entry when an
/// entry fails), its commit not waiting for the WAL flush; the keys it created are kept in
/// `created` once it commits.
fn write_batch_unflushed(
    store: &PgStore,
    tenant: TenantId,
    owner: Option<&str>,
    batch: &BulkBatch,
    created: &mut CreatedKeys,
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let mut write = |mode| {
        let written = store.with_write(|db, timestamp| {
            db.batch("SET LOCAL synchronous_commit = off")?;
            resources::write(db, tenant, owner, &batch.ops, &batch.prepared, mode, timestamp, Some(&mut *created))
        });
        match written {
            Ok(_) => created.committed(),
            Err(_) => created.rolled_back(),
        }
        written
    };
    match write(WriteMode::Transaction) {
        Ok(results) => Ok(results),
        Err(error) if error.is_store_failure() => Err(error),
        Err(_) => write(WriteMode::Batch),
    }
}

/// Makes every commit so far durable: a write transaction (it takes the clock, as every write
/// does, so it writes WAL) committed with the session's own `synchronous_commit`, which waits
/// until the WAL is flushed up to its commit record, past every earlier commit.
fn flush_wal(store: &PgStore) -> Result<(), StoreError> {
    store.with_write(|_, _| Ok(()))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use serde_json::json;

    use super::super::testing::{fresh_database, test_options};
    use super::super::PgStore;
    use crate::{BulkBatch, BulkSource, PreparedWrite, Store, StoreError, Visibility, WriteMode, WriteOp, Written};

    /// The WAL position, in bytes: where the next record goes (`insert`) or how far it is on
    /// disk (`flush`).
    fn wal(store: &PgStore, which: &str) -> i64 {
        let query = format!("SELECT CAST(pg_wal_lsn_diff(pg_current_wal_{which}_lsn(), '0/0') AS bigint)");
        store.with_read(|db| Ok(db.query_one(query.as_str(), &[])?.try_get(0)?)).unwrap()
    }

    /// Hands out waves of batches (the batches of a wave are all waiting at once) and checks,
    /// each time the store confirms batches, that the WAL is on disk past every commit of them.
    struct CheckingSource<'s> {
        store: &'s PgStore,
        waves: VecDeque<VecDeque<BulkBatch>>,
        /// The WAL insert position read after each batch given back since the last confirmation.
        unconfirmed: Vec<i64>,
        /// How many batches each confirmation covered.
        confirmations: Vec<usize>,
    }

    impl BulkSource for CheckingSource<'_> {
        fn next_batch(&mut self, wait: bool) -> Option<BulkBatch> {
            if wait {
                while self.waves.front().is_some_and(VecDeque::is_empty) {
                    self.waves.pop_front();
                }
            }
            self.waves.front_mut()?.pop_front()
        }
        fn written(&mut self, _batch: BulkBatch, results: Vec<Result<Written, StoreError>>) {
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            // Past the batch's commit record: it committed before it was given back.
            self.unconfirmed.push(wal(self.store, "insert"));
        }
        fn committed(&mut self) {
            let flushed = wal(self.store, "flush");
            for committed in &self.unconfirmed {
                assert!(flushed >= *committed, "a batch was confirmed before its commit was on disk");
            }
            self.confirmations.push(std::mem::take(&mut self.unconfirmed).len());
        }
        fn rewind(&mut self) {
            panic!("no entry of this load fails");
        }
    }

    fn batch(ids: std::ops::Range<usize>) -> BulkBatch {
        let (ops, prepared) = ids
            .map(|n| {
                let id = format!("p{n}");
                let body = json!({"resourceType": "Patient", "id": id});
                let prepared = PreparedWrite::new("Patient", &id, &body);
                (WriteOp::Update { resource_type: "Patient".into(), id, body, if_match: None }, Some(prepared))
            })
            .unzip();
        BulkBatch { ops, prepared }
    }

    fn op(body: serde_json::Value) -> (WriteOp, Option<PreparedWrite>) {
        let (resource_type, id) = (body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
        let prepared = PreparedWrite::new(resource_type, id, &body);
        let (resource_type, id) = (resource_type.to_owned(), id.to_owned());
        (WriteOp::Update { resource_type, id, body, if_match: None }, Some(prepared))
    }

    /// UUID ids (the form whose keys a load keeps), one per `n`.
    fn uuid(n: usize) -> String {
        format!("00000000-0000-4000-8000-{n:012x}")
    }

    /// Hands out its batches, running `between` (once) before the second.
    struct InterruptedSource<'s> {
        batches: VecDeque<BulkBatch>,
        handed: usize,
        between: Option<Box<dyn FnOnce() + 's>>,
    }

    impl BulkSource for InterruptedSource<'_> {
        fn next_batch(&mut self, _wait: bool) -> Option<BulkBatch> {
            if self.handed == 1 {
                if let Some(between) = self.between.take() {
                    between();
                }
            }
            self.handed += 1;
            self.batches.pop_front()
        }
        fn written(&mut self, _batch: BulkBatch, results: Vec<Result<Written, StoreError>>) {
            assert!(results.iter().all(Result::is_ok), "{results:?}");
        }
        fn committed(&mut self) {}
        fn rewind(&mut self) {
            panic!("no entry of this load fails");
        }
    }

    /// A Provenance of a later batch gets the keys of targets the load created earlier, and the
    /// right ones when some of them were deleted and pruned meanwhile: one created again (a new
    /// key), one gone (no key), one untouched.
    #[test]
    fn provenance_targets_created_by_the_load_keep_their_keys_across_a_prune() {
        let Some(database) = fresh_database() else { return };
        let store = PgStore::open(&database.url, test_options()).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        let observation = |id: &str| {
            json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "c"},
                   "subject": {"reference": format!("Patient/{}", uuid(0))}})
        };
        let (recreated, gone, kept) = (uuid(100), uuid(101), uuid(102));
        // Batches of at least eight writes, as the bulk path takes them.
        let patients = |ids: std::ops::Range<usize>| ids.map(|n| op(json!({"resourceType": "Patient", "id": uuid(n)})));
        let batch = |ops: Vec<(WriteOp, Option<PreparedWrite>)>| {
            let (ops, prepared) = ops.into_iter().unzip();
            BulkBatch { ops, prepared }
        };
        let first = batch(
            [op(observation(&recreated)), op(observation(&gone)), op(observation(&kept))]
                .into_iter()
                .chain(patients(0..5))
                .collect(),
        );
        let provenance = json!({"resourceType": "Provenance", "id": uuid(200), "recorded": "2020-01-01T00:00:00Z",
            "target": [{"reference": format!("Observation/{recreated}")}, {"reference": format!("Observation/{gone}")},
                       {"reference": format!("Observation/{kept}")}],
            "agent": [{"who": {"reference": format!("Patient/{}", uuid(0))}}]});
        let second = batch([op(provenance)].into_iter().chain(patients(10..17)).collect());
        let rid = |id: &str| -> Option<i64> {
            store
                .with_read(|db| {
                    let row = db.query_opt(
                        "SELECT rid FROM resources WHERE tenant_id = $1 AND resource_type = 'Observation' AND id = $2",
                        &[&tenant.0, &id],
                    )?;
                    Ok(row.map(|row| row.try_get(0)).transpose()?)
                })
                .unwrap()
        };
        let first_key = std::cell::Cell::new(None);
        let between = || {
            first_key.set(rid(&recreated));
            let delete = |id: &str| WriteOp::Delete { resource_type: "Observation".into(), id: id.into() };
            let deleted = store.write(tenant, None, &[delete(&recreated), delete(&gone)], WriteMode::Transaction);
            assert!(deleted.unwrap().iter().all(Result::is_ok));
            let report = store.prune_history(i64::MAX / 2, 0, 100).unwrap();
            assert_eq!(report.tombstones, 2);
            let op = op(observation(&recreated)).0;
            store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
        };
        let mut source =
            InterruptedSource { batches: VecDeque::from([first, second]), handed: 0, between: Some(Box::new(between)) };
        store.write_bulk(tenant, None, &mut source).unwrap();
        assert!(source.between.is_none() && source.batches.is_empty());

        let targets: Vec<(String, Option<i64>)> = store
            .with_read(|db| {
                let rows = db.query(
                    "SELECT target_id, target_rid FROM reference_index
                     WHERE tenant_id = $1 AND provenance_target ORDER BY target_id",
                    &[&tenant.0],
                )?;
                Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
            })
            .unwrap();
        let recreated_key = rid(&recreated);
        assert!(recreated_key.is_some() && recreated_key != first_key.get(), "created again under a new key");
        assert_eq!(targets, [(recreated.clone(), recreated_key), (gone.clone(), None), (kept.clone(), rid(&kept))]);
    }

    /// A bulk load reports batches stored only once the WAL is flushed past their commits: the
    /// batches waiting at once are confirmed together, after one flush, and the load's last
    /// batches before it returns. Every resource is stored.
    #[test]
    fn bulk_loads_confirm_batches_only_once_their_commits_are_on_disk() {
        let Some(database) = fresh_database() else { return };
        let store = PgStore::open(&database.url, test_options()).unwrap();
        // Commits wait for the WAL flush as on a production cluster (the test cluster's default
        // is not to), in the connections opened from here on.
        store
            .with_transaction(|db| {
                db.batch(
                    "DO $$ BEGIN
                         EXECUTE format('ALTER DATABASE %I SET synchronous_commit = on', current_database());
                     END $$",
                )
            })
            .unwrap();
        drop(store);
        let store = PgStore::open(&database.url, test_options()).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        let mut source = CheckingSource {
            store: &store,
            waves: VecDeque::from([
                VecDeque::from([batch(0..3), batch(3..6), batch(6..9)]),
                VecDeque::from([batch(9..12)]),
                VecDeque::from([batch(12..15), batch(15..18)]),
            ]),
            unconfirmed: Vec::new(),
            confirmations: Vec::new(),
        };
        store.write_bulk(tenant, None, &mut source).unwrap();
        assert_eq!(source.confirmations, [3, 1, 2]);
        for n in 0..18 {
            let stored = store.read(tenant, &Visibility::Tenant, "Patient", &format!("p{n}")).unwrap();
            assert_eq!(stored.map(|resource| resource.version), Some(1), "p{n}");
        }
    }
}
