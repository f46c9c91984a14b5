-- The greatest `changed_at` of each tenant's patients (the SQLite store's
-- `tenant_patient_changes`): while it is not above a plan's time, no patient of the tenant,
-- member or not, changed since, so a repeated kick-off skips the per-member watermark check,
-- which sends every member id to the server (the repeat manifest's cost that grew with the
-- Group). Kept by statement triggers on `patient_keys`, so every path that raises a patient's
-- watermark (writes, imports, pruning) raises the tenant's in the same transaction: one upsert
-- per statement, on a row writers already serialise on (they hold the clock).
--
-- Idempotent, so a test that steps the schema back to an earlier version can re-run it.
CREATE TABLE IF NOT EXISTS tenant_patient_changes (
    tenant_id bigint PRIMARY KEY,
    changed_at bigint NOT NULL
);

CREATE OR REPLACE FUNCTION raise_tenant_patient_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tenant_patient_changes (tenant_id, changed_at)
    SELECT tenant_id, max(changed_at) FROM raised GROUP BY tenant_id
    ON CONFLICT (tenant_id) DO UPDATE
    SET changed_at = GREATEST(tenant_patient_changes.changed_at, excluded.changed_at);
    RETURN NULL;
END
$$;

-- Creating the triggers locks `patient_keys` against writes until this migration commits, so
-- the seed below misses no raise.
DROP TRIGGER IF EXISTS patient_keys_raise_tenant_on_insert ON patient_keys;
CREATE TRIGGER patient_keys_raise_tenant_on_insert AFTER INSERT ON patient_keys
    REFERENCING NEW TABLE AS raised FOR EACH STATEMENT EXECUTE FUNCTION raise_tenant_patient_changes();
DROP TRIGGER IF EXISTS patient_keys_raise_tenant_on_update ON patient_keys;
CREATE TRIGGER patient_keys_raise_tenant_on_update AFTER UPDATE ON patient_keys
    REFERENCING NEW TABLE AS raised FOR EACH STATEMENT EXECUTE FUNCTION raise_tenant_patient_changes();

INSERT INTO tenant_patient_changes (tenant_id, changed_at)
SELECT tenant_id, max(changed_at) FROM patient_keys GROUP BY tenant_id
ON CONFLICT (tenant_id) DO UPDATE SET changed_at = GREATEST(tenant_patient_changes.changed_at, excluded.changed_at);
