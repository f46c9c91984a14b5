-- How many resource rows each tenant has lost to pruning (tombstones past the retention
-- horizon, `retention.rs`): the one way a resource's key (`rid`) stops naming its `(type, id)`.
-- A bulk load keeps the keys of the resources it created, to give Provenance target rows their
-- target's key without a probe of `(tenant, type, id)` each; it reads this count in every
-- batch's transaction (which holds the clock, as the prune's do) and forgets those keys when
-- the count moved.
--
-- Idempotent, so a test that steps the schema back to an earlier version can re-run it.
CREATE TABLE IF NOT EXISTS resource_removals (
    tenant_id bigint PRIMARY KEY,
    removed bigint NOT NULL
);
