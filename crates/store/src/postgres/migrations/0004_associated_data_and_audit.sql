-- Associated data (Bulk Data IG includeAssociatedData) and the audit trail, as in the SQLite
-- store (`sqlite/associated.rs`, `sqlite/audit.rs`). Every table and index leads with tenant_id.

-- Per resource version, its references to types outside the Patient compartment and its
-- Provenance.target entries, versioned by time like the compartment index: a row is valid for
-- [from_ts, to_ts); a delete closes the rows.
CREATE TABLE reference_index (
    tenant_id bigint NOT NULL,
    rid bigint NOT NULL,
    provenance_target boolean NOT NULL,
    target_type text NOT NULL,
    target_id text NOT NULL,
    from_ts bigint NOT NULL,
    to_ts bigint,
    PRIMARY KEY (tenant_id, rid, provenance_target, target_type, target_id, from_ts)
);
CREATE INDEX provenance_by_target ON reference_index (tenant_id, target_type, target_id) WHERE provenance_target;
-- Closed rows (a version dropped a reference) are few: pruning finds them here.
CREATE INDEX reference_index_closed ON reference_index (tenant_id, to_ts) WHERE to_ts IS NOT NULL;

-- The types of a tenant whose resources have ever referenced a resource outside the compartment
-- (only grows): planning follows no references from the other types' cohort resources.
CREATE TABLE referencing_types (
    tenant_id bigint NOT NULL,
    resource_type text NOT NULL,
    PRIMARY KEY (tenant_id, resource_type)
);

-- The associated set of one Patient or Group export, computed at planning and read by its file
-- downloads. A set's rows are swept with its export records once `expires` (micros) has passed:
-- the small `associated_sets` table is scanned for expired sets, whose rows go by key prefix.
CREATE TABLE associated_sets (
    tenant_id bigint NOT NULL,
    set_id text NOT NULL,
    expires bigint NOT NULL,
    PRIMARY KEY (tenant_id, set_id)
);
CREATE TABLE export_associated (
    tenant_id bigint NOT NULL,
    set_id text NOT NULL,
    resource_type text NOT NULL,
    rid bigint NOT NULL,
    PRIMARY KEY (tenant_id, set_id, resource_type, rid)
);

-- The audit trail: one row per audited request or file download, append-only (rows leave only
-- by age, `prune_audit`). `seq` is assigned under a transaction-scoped advisory lock, so it
-- ascends in commit order and keyset paging never skips a record committed late.
CREATE TABLE audit_log (
    tenant_id bigint NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    time bigint NOT NULL,
    client_id text NOT NULL,
    user_id text,
    peer text,
    request_id text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    outcome text NOT NULL,
    status integer NOT NULL,
    detail text NOT NULL,
    cohort_group text,
    cohort_time bigint,
    PRIMARY KEY (tenant_id, seq)
);
CREATE INDEX audit_log_by_time ON audit_log (tenant_id, time);

-- The patients each audit record touched.
CREATE TABLE audit_patient (
    tenant_id bigint NOT NULL,
    patient_id text NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (tenant_id, patient_id, seq)
);
CREATE INDEX audit_patient_by_seq ON audit_patient (tenant_id, seq);

-- Append-only, whatever a future code path (or a stray UPDATE) tries.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
