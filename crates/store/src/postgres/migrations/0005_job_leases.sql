-- Leases on the background work of asynchronous export jobs (see `job_lease.rs`): the work a
-- kick-off stored, the holder's checkpoint, the lease (owner, expiry, fencing token) and the
-- holder's progress; and the parts holders finished, which go with their job.
ALTER TABLE export_jobs ADD COLUMN work text NOT NULL DEFAULT '';
ALTER TABLE export_jobs ADD COLUMN checkpoint text;
ALTER TABLE export_jobs ADD COLUMN lease_owner text;
ALTER TABLE export_jobs ADD COLUMN lease_expires bigint NOT NULL DEFAULT 0;
ALTER TABLE export_jobs ADD COLUMN fence bigint NOT NULL DEFAULT 0;
ALTER TABLE export_jobs ADD COLUMN progress text NOT NULL DEFAULT '';

CREATE TABLE export_job_parts (
    tenant_id bigint NOT NULL,
    job_id text NOT NULL,
    part integer NOT NULL,
    bytes bigint NOT NULL,
    sha256 text NOT NULL,
    lines bigint NOT NULL,
    PRIMARY KEY (tenant_id, job_id, part),
    FOREIGN KEY (tenant_id, job_id) REFERENCES export_jobs (tenant_id, job_id) ON DELETE CASCADE
);
