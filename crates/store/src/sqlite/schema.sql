-- Bulkhead SQLite schema. Every resource row carries tenant_id; rid is the export key order.
CREATE TABLE IF NOT EXISTS tenants (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants (id),
    secret_hash TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL
);

-- SMART Backend Services registrations: a client's public keys (inline JWKS or its URL), the
-- scopes it is pre-authorised for (NULL: full access to its tenant) and its token lifetime.
CREATE TABLE IF NOT EXISTS client_registrations (
    client_id TEXT PRIMARY KEY REFERENCES clients (client_id),
    jwks TEXT,
    jwks_url TEXT,
    scopes TEXT,
    token_ttl_seconds INTEGER
);

-- Client assertion ids seen (SMART: a jti is never accepted twice within its lifetime), kept
-- until the assertion expires; shared by every process on the database.
CREATE TABLE IF NOT EXISTS assertion_jtis (
    tenant_id INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, client_id, jti)
);
CREATE INDEX IF NOT EXISTS assertion_jtis_by_expiry ON assertion_jtis (expires);

-- Server-wide secret keys shared by every process on this database (e.g. the key of the keyed
-- hash of client secrets), so several instances on one database verify the same credentials.
CREATE TABLE IF NOT EXISTS server_keys (
    name TEXT PRIMARY KEY,
    key BLOB NOT NULL
);

-- The keys that sign file URLs and access tokens (newest first by seq; the first one not
-- retired signs), shared by every process on this database; `retired` is Unix seconds.
CREATE TABLE IF NOT EXISTS token_signing_keys (
    seq INTEGER PRIMARY KEY,
    kid TEXT NOT NULL UNIQUE,
    secret BLOB NOT NULL,
    retired INTEGER
);

-- Token buckets of per-tenant quotas drawn by every process (tokens left, last refill in µs).
CREATE TABLE IF NOT EXISTS quota_buckets (
    tenant_id INTEGER NOT NULL,
    quota TEXT NOT NULL,
    tokens REAL NOT NULL,
    updated INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, quota)
);

-- Failed logins per peer address or client id in a fixed window starting at `started` (µs).
CREATE TABLE IF NOT EXISTS login_failures (
    key TEXT PRIMARY KEY,
    started INTEGER NOT NULL,
    failures INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_by_start ON login_failures (started);

-- One row: the last timestamp handed out. Writes and transaction-time reservations bump it
-- inside the write lock, so timestamps are unique and ordered across processes.
CREATE TABLE IF NOT EXISTS clock (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    last INTEGER NOT NULL
);
INSERT OR IGNORE INTO clock (id, last) VALUES (0, 0);

-- The current version of every resource (a tombstone has deleted = 1 and no body).
CREATE TABLE IF NOT EXISTS resources (
    rid INTEGER PRIMARY KEY,
    tenant_id INTEGER NOT NULL,
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    owner TEXT,
    body TEXT,
    UNIQUE (tenant_id, resource_type, id)
);
CREATE INDEX IF NOT EXISTS resources_by_type ON resources (tenant_id, resource_type, rid);

-- Every earlier version.
CREATE TABLE IF NOT EXISTS resource_history (
    rid INTEGER NOT NULL,
    version INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    owner TEXT,
    body TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS resource_history_key ON resource_history (rid, version);

-- ---- Schema version 2: integer keys in the compartment and search indexes ----
-- (Version 1, `schema_v1.sql`, keyed these by TEXT patient ids and resource type names;
-- `migrate.rs` converts a version-1 database on open, in one transaction.)
--
-- Summary for other stores (PostgreSQL mirrors this design):
-- * `patient_keys`: one integer `pkey` per (tenant, patient id) that a compartment row or a Group
--   names, created on first mention (the Patient resource need not exist yet) and never deleted.
--   `changed_at` is the timestamp of the last write that opened, closed or changed a compartment
--   row of that patient: an export plan computed at T stays valid at a later T' while no member's
--   `changed_at` exceeds T (the store's plan cache relies on it). `tenant_patient_changes` holds
--   each tenant's greatest `changed_at`, kept by triggers (created with it on open, see
--   `plan_watermarks.rs`): while it is not above T, the members are not checked one by one.
-- * Resource types in indexes are `type_code`s: the position of the type in the R4 type list
--   (`bulkhead_fhir::resource_type_code`, Account = 0 … Patient = 102 … VisionPrescription = 145).
-- * `compartment` is keyed (pkey, type_code, rid, from_ts): all integers, so each key is a few
--   bytes instead of a 36-byte UUID plus a type name; `group_membership` is keyed (group_rid,
--   pkey) where group_rid is the Group resource's `rid`; `search_token` by type_code.
-- * tenant_id stays on every row (checked by every query) even where the key implies it.

-- Per-tenant integer keys of patient ids (see above). INTEGER PRIMARY KEY: pkeys only grow.
CREATE TABLE IF NOT EXISTS patient_keys (
    pkey INTEGER PRIMARY KEY,
    tenant_id INTEGER NOT NULL,
    patient_id TEXT NOT NULL,
    changed_at INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant_id, patient_id)
);

-- Patient compartment index, versioned by time: a row is valid for [from_ts, to_ts).
-- Rows stay open when a resource is deleted, so deletions can be found per patient.
-- last_updated/deleted/owner describe the last version written while the row was open, so
-- planning an export reads no resource rows at all.
-- WITHOUT ROWID: the table is its own index (one b-tree less to write per resource).
CREATE TABLE IF NOT EXISTS compartment (
    pkey INTEGER NOT NULL,
    type_code INTEGER NOT NULL,
    rid INTEGER NOT NULL,
    from_ts INTEGER NOT NULL,
    to_ts INTEGER,
    tenant_id INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    owner TEXT,
    PRIMARY KEY (pkey, type_code, rid, from_ts)
) WITHOUT ROWID;
-- Open rows by resource (updates and deletes find a resource's compartments); keys only grow,
-- so inserts append.
CREATE INDEX IF NOT EXISTS compartment_open_by_rid ON compartment (rid) WHERE to_ts IS NULL;
-- Closed rows (a version moved the resource out of a patient's compartment) are rare: these two
-- small indexes find the resources that left the cohort's compartments since `_since`.
CREATE INDEX IF NOT EXISTS compartment_closed_by_time ON compartment (tenant_id, type_code, to_ts)
    WHERE to_ts IS NOT NULL;
CREATE INDEX IF NOT EXISTS compartment_closed_by_rid ON compartment (rid, to_ts) WHERE to_ts IS NOT NULL;

-- Search tokens of current versions: identifiers and subject/patient references.
CREATE TABLE IF NOT EXISTS search_token (
    tenant_id INTEGER NOT NULL,
    type_code INTEGER NOT NULL,
    param TEXT NOT NULL,
    value TEXT NOT NULL,
    system TEXT NOT NULL,
    rid INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, type_code, param, value, system, rid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS search_token_by_rid ON search_token (rid);

-- Group membership history: one row per interval during which a patient was an active member.
-- group_rid is the Group resource's rid (a Group keeps its rid across versions and deletion).
CREATE TABLE IF NOT EXISTS group_membership (
    group_rid INTEGER NOT NULL,
    pkey INTEGER NOT NULL,
    added_at INTEGER NOT NULL,
    removed_at INTEGER,
    tenant_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS group_membership_by_group ON group_membership (group_rid, pkey);

-- Asynchronous export jobs (Prefer: respond-async). Keyed by tenant first: every lookup names
-- the tenant. `state` is 'planning' (manifest empty) until the background planner sets
-- 'complete' (the manifest) or 'failed' (an OperationOutcome, answered with `failure_status`);
-- a job lives until `expires` (micros). Databases from before background planning get the two
-- columns added on open (`jobs::migrate`).
CREATE TABLE IF NOT EXISTS export_jobs (
    tenant_id INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    user_id TEXT,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'complete',
    failure_status INTEGER,
    PRIMARY KEY (tenant_id, job_id)
);
CREATE INDEX IF NOT EXISTS export_jobs_by_expiry ON export_jobs (expires);

-- What an export's file URLs point at (one row per kick-off, either mode), so the URLs stay short
-- whatever the request. Keyed by tenant first; lives until `expires` (micros), then is swept.
CREATE TABLE IF NOT EXISTS export_records (
    tenant_id INTEGER NOT NULL,
    record_id TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    plan TEXT NOT NULL,
    PRIMARY KEY (tenant_id, record_id)
);
CREATE INDEX IF NOT EXISTS export_records_by_expiry ON export_records (expires);

-- The associated data of one Patient or Group export (Provenance and referenced resources),
-- computed at planning and read by its file downloads (of every export that shares the set).
-- The set's expiry is kept once, in `associated_sets` (`plan_watermarks::migrate`), and the set
-- goes with it; the per-row `expires` is its first export's and is no longer read. The reference
-- index it is computed from (`reference_index`) is created by `associated::migrate`, which
-- backfills it on databases from before it.
CREATE TABLE IF NOT EXISTS export_associated (
    tenant_id INTEGER NOT NULL,
    set_id TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    rid INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, set_id, resource_type, rid)
) WITHOUT ROWID;

-- The audit trail: one row per audited request or file download, append-only (nothing updates
-- it; rows leave only by age, `prune_audit`). The export's Group and transaction time
-- (cohort_*) let a patient's records include exports whose Group had them as a member.
-- Kept lean, because a write's record is inserted in the write's own transaction: the table is
-- clustered by (tenant, seq) (`seq` ascends per tenant), which is the order every query reads
-- it in, so it needs no index of its own; `patients` (a JSON array) lists the record's
-- patients, which `--patient` tests. Each appended record thus touches one B-tree, always at
-- its right edge. Databases of earlier layouts (a rowid table with indexes by tenant and by
-- time; a patient index `audit_patient`) are converted on open (`audit::migrate`,
-- `audit::drop_patient_table`).
CREATE TABLE IF NOT EXISTS audit_log (
    tenant_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    user_id TEXT,
    peer TEXT,
    request_id TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT NOT NULL,
    cohort_group TEXT,
    cohort_time INTEGER,
    patients TEXT,
    PRIMARY KEY (tenant_id, seq)
) WITHOUT ROWID;
-- Append-only, whatever a future code path tries.
CREATE TRIGGER IF NOT EXISTS audit_log_append_only BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;
-- History retention: history before `horizon` (micros) has been pruned, so `_since` exports
-- before it are refused. One row, written by the first prune; it never moves back.
CREATE TABLE IF NOT EXISTS retention (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    horizon INTEGER NOT NULL
);
