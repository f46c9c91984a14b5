-- (Idempotent, so a test that steps the schema back to an earlier version can re-run it.)

-- How many claims of a job ended with its holder handing it back (its instance was stopping),
-- so the claims that follow are not counted as interruptions (the worker's MAX_CLAIMS).
ALTER TABLE export_jobs ADD COLUMN IF NOT EXISTS handbacks bigint NOT NULL DEFAULT 0;

-- The patients an audit record touched, inline (sorted, distinct, NULL for none), instead of
-- in audit_patient: that table was a second insert and two more index entries in every
-- audited write's transaction, and no query was driven by it (a --patient query reads the
-- tenant's records in seq order and tests each). Records keep their patients: the column is
-- filled from the table before the table is dropped (the append-only trigger is off for that
-- one UPDATE, inside this migration's transaction).
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS patients text[];
DO $$
BEGIN
    IF to_regclass('audit_patient') IS NOT NULL THEN
        ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only;
        UPDATE audit_log AS a SET patients = p.ids
        FROM (SELECT tenant_id, seq, array_agg(patient_id ORDER BY patient_id COLLATE "C") AS ids
              FROM audit_patient GROUP BY tenant_id, seq) AS p
        WHERE a.tenant_id = p.tenant_id AND a.seq = p.seq AND a.patients IS NULL;
        ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only;
        DROP TABLE audit_patient;
    END IF;
END
$$;
