-- TEST FIXTURE: the version-1 schema (TEXT patient ids and type names in the indexes), kept so
-- migrate.rs is tested against a database built with it. Not used by the store itself.
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

-- Server-wide secret keys shared by every process on this database (e.g. the key of the keyed
-- hash of client secrets), so several instances on one database verify the same credentials.
CREATE TABLE IF NOT EXISTS server_keys (
    name TEXT PRIMARY KEY,
    key BLOB NOT NULL
);

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

-- Patient compartment index, versioned by time: a row is valid for [from_ts, to_ts).
-- Rows stay open when a resource is deleted, so deletions can be found per patient.
-- last_updated/deleted/owner describe the last version written while the row was open, so
-- planning an export reads no resource rows at all.
-- WITHOUT ROWID: the table is its own index (one b-tree less to write per resource).
CREATE TABLE IF NOT EXISTS compartment (
    tenant_id INTEGER NOT NULL,
    patient_id TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    rid INTEGER NOT NULL,
    from_ts INTEGER NOT NULL,
    to_ts INTEGER,
    last_updated INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    owner TEXT,
    PRIMARY KEY (tenant_id, patient_id, resource_type, rid, from_ts)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS compartment_open_by_rid ON compartment (rid) WHERE to_ts IS NULL;
-- Closed rows (a version moved the resource out of a patient's compartment) are rare: these two
-- small indexes find the resources that left the cohort's compartments since `_since`.
CREATE INDEX IF NOT EXISTS compartment_closed_by_time ON compartment (tenant_id, resource_type, to_ts)
    WHERE to_ts IS NOT NULL;
CREATE INDEX IF NOT EXISTS compartment_closed_by_rid ON compartment (rid, to_ts) WHERE to_ts IS NOT NULL;

-- Search tokens of current versions: identifiers and subject/patient references.
CREATE TABLE IF NOT EXISTS search_token (
    tenant_id INTEGER NOT NULL,
    resource_type TEXT NOT NULL,
    param TEXT NOT NULL,
    value TEXT NOT NULL,
    system TEXT NOT NULL,
    rid INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, resource_type, param, value, system, rid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS search_token_by_rid ON search_token (rid);

-- Group membership history: one row per interval during which a patient was an active member.
CREATE TABLE IF NOT EXISTS group_membership (
    tenant_id INTEGER NOT NULL,
    group_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    removed_at INTEGER
);
CREATE INDEX IF NOT EXISTS group_membership_by_group ON group_membership (tenant_id, group_id, patient_id);

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
