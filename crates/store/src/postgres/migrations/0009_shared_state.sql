-- (Idempotent, so a test that steps the schema back to an earlier version can re-run it.)
-- State every instance shares (small global tables; Citus: reference tables, except
-- quota_buckets, which leads with the tenant and may be distributed by tenant_id).
-- The keys that sign file URLs and access tokens, newest first by seq (the first one not
-- retired signs); `retired` is Unix seconds. Imported once from a data directory's
-- `token-keys` file by `bulkhead serve` / `bulkhead migrate` when this table is empty.
CREATE TABLE IF NOT EXISTS token_signing_keys (
    seq bigint PRIMARY KEY,
    kid text NOT NULL UNIQUE,
    secret bytea NOT NULL,
    retired bigint
);
-- Token buckets of per-tenant quotas that instances draw batches of tokens from.
CREATE TABLE IF NOT EXISTS quota_buckets (
    tenant_id bigint NOT NULL,
    quota text NOT NULL,
    tokens double precision NOT NULL,
    updated bigint NOT NULL,
    PRIMARY KEY (tenant_id, quota)
);
-- Failed logins per peer address or client id in a fixed window starting at `started` (µs).
CREATE TABLE IF NOT EXISTS login_failures (
    key text PRIMARY KEY,
    started bigint NOT NULL,
    failures integer NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_by_start ON login_failures (started);
