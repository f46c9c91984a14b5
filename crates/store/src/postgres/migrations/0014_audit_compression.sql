-- (Idempotent, so a test that steps the schema back to an earlier version can re-run it.)
-- An audit record's `detail` and `patients` are compressed with LZ4 instead of pglz when the
-- server was built with it, as bodies are since migration 11. A transaction Bundle's record
-- lists every entry (~50 bytes each: ~24 KB for 500 entries) and is written inside the Bundle's
-- own transaction, while writers wait on the clock row; pglz was most of what PostgreSQL spent
-- on it. Only new values use LZ4; stored records keep pglz, and both stay readable.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE audit_log ALTER COLUMN detail SET COMPRESSION lz4;
        ALTER TABLE audit_log ALTER COLUMN patients SET COMPRESSION lz4;
    END IF;
END
$$;
