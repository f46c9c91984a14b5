-- Provenance targets by key, as in the SQLite store (`sqlite/provenance_targets.rs`): each
-- Provenance.target row of the reference index carries the key (`rid`) of the resource it names
-- once that resource's row exists, so planning an export's associated data finds a cohort
-- resource's Provenance from the key it already holds. Keys never change (a deleted resource
-- keeps its row as a tombstone); a row written before its target existed gets the key when the
-- target is created, and pruning a tombstone clears the keys that named it.
ALTER TABLE reference_index ADD COLUMN target_rid bigint;
UPDATE reference_index x SET target_rid = r.rid
FROM resources r
WHERE x.provenance_target AND r.tenant_id = x.tenant_id AND r.resource_type = x.target_type AND r.id = x.target_id;
-- Planning's reads: every cohort resource's targeting rows by key, without the heap.
CREATE INDEX provenance_by_target_rid ON reference_index (tenant_id, target_rid) INCLUDE (rid, from_ts, to_ts)
    WHERE provenance_target AND target_rid IS NOT NULL;
-- Rows whose target does not exist (yet): checked by every create, so kept in an index of their own.
CREATE INDEX provenance_unresolved ON reference_index (tenant_id, target_type, target_id)
    WHERE provenance_target AND target_rid IS NULL;
