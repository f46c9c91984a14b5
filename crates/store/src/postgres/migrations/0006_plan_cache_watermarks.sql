-- The plan cache's watermarks (`crate::plan_cache`), as in the SQLite store. Every write that
-- opens, closes or changes a patient's compartment rows raises that patient's `changed_at` to its
-- timestamp in the same transaction; every write of a Provenance or of a type outside the
-- Patient compartment raises that type's row here. Timestamps are handed out in commit order (the
-- clock row), so "no member's `changed_at`, and no reachable type's, is above T1", read after T2
-- was reserved, proves a plan, `deleted[]` list or associated set computed at T1 is the one at T2.
--
-- Rows from before this migration start at 0: no instance holds a cached result from before it
-- (the cache lives in memory, and only binaries that know this migration keep one), and such a
-- binary raises the watermarks on every write. Older binaries do not: stop them before starting
-- this one (docs/deploy.md, "Upgrade").
ALTER TABLE patient_keys ADD COLUMN changed_at bigint NOT NULL DEFAULT 0;

CREATE TABLE associated_type_changes (
    tenant_id bigint NOT NULL,
    resource_type text NOT NULL,
    changed_at bigint NOT NULL,
    PRIMARY KEY (tenant_id, resource_type)
);
