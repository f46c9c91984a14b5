//! Leases on export jobs' background work (see [`crate::job_lease`]): the lease columns of
//! `export_jobs` and the parts holders record in `export_job_parts`. Every fenced write is one
//! statement (or one immediate transaction) that checks the job's token, so a stale holder's
//! write changes nothing.

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::{ClaimedJob, ExportJob, JobActivity, JobAdmission, JobLease, JobPart, StoreError, TenantId};

/// Adds the lease columns to `export_jobs` and creates `export_job_parts`, once, in one
/// immediate transaction (two processes opening an old database at once cannot both alter it).
/// Planning jobs of older databases have no work and are due: the first worker to claim one
/// fails it ("kick the export off again"), as a restart did before.
pub(super) fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let has_fence: bool = transaction.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('export_jobs') WHERE name = 'fence')",
        [],
        |row| row.get(0),
    )?;
    if !has_fence {
        transaction.execute_batch(
            "ALTER TABLE export_jobs ADD COLUMN work TEXT NOT NULL DEFAULT '';
             ALTER TABLE export_jobs ADD COLUMN checkpoint TEXT;
             ALTER TABLE export_jobs ADD COLUMN lease_owner TEXT;
             ALTER TABLE export_jobs ADD COLUMN lease_expires INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE export_jobs ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE export_jobs ADD COLUMN progress TEXT NOT NULL DEFAULT '';",
        )?;
    }
    let has_handbacks: bool = transaction.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('export_jobs') WHERE name = 'handbacks')",
        [],
        |row| row.get(0),
    )?;
    if !has_handbacks {
        // How many claims ended in a hand-back (a stopping instance), not a lost lease.
        transaction.execute_batch("ALTER TABLE export_jobs ADD COLUMN handbacks INTEGER NOT NULL DEFAULT 0;")?;
    }
    transaction.execute_batch(
        "CREATE INDEX IF NOT EXISTS export_jobs_due ON export_jobs (state, lease_expires);
         -- The finished parts of a job's work (materialised files), recorded under its lease.
         CREATE TABLE IF NOT EXISTS export_job_parts (
             tenant_id INTEGER NOT NULL,
             job_id TEXT NOT NULL,
             part INTEGER NOT NULL,
             bytes INTEGER NOT NULL,
             sha256 TEXT NOT NULL,
             lines INTEGER NOT NULL,
             PRIMARY KEY (tenant_id, job_id, part)
         );
         CREATE TRIGGER IF NOT EXISTS export_job_parts_go_with_their_job AFTER DELETE ON export_jobs
         BEGIN
             DELETE FROM export_job_parts WHERE tenant_id = old.tenant_id AND job_id = old.job_id;
         END;",
    )?;
    transaction.commit()?;
    Ok(())
}

fn unfinished(connection: &Connection, tenant: TenantId, now: Micros) -> Result<u64, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT COUNT(*) FROM export_jobs WHERE tenant_id = ?1 AND state = 'planning' AND expires > ?2",
    )?;
    let count: i64 = statement.query_row(params![tenant.0, now], |row| row.get(0))?;
    Ok(count as u64)
}

pub(super) fn unfinished_export_jobs(
    connection: &Connection,
    tenant: TenantId,
    now: Micros,
) -> Result<u64, StoreError> {
    unfinished(connection, tenant, now)
}

pub(super) fn enqueue_export_job(
    transaction: &Transaction<'_>,
    tenant: TenantId,
    job: &ExportJob,
    work: &str,
    cap: u64,
    now: Micros,
) -> Result<JobAdmission, StoreError> {
    let count = unfinished(transaction, tenant, now)?;
    if cap > 0 && count >= cap {
        return Ok(JobAdmission::AtCap { unfinished: count });
    }
    let inserted = transaction.execute(
        "INSERT INTO export_jobs (tenant_id, job_id, client_id, user_id, created, expires, manifest, state, work)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, '', 'planning', ?7) ON CONFLICT (tenant_id, job_id) DO NOTHING",
        params![tenant.0, job.id, job.client_id, job.visibility.user(), job.created, job.expires, work],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("export job '{}' already exists", job.id)));
    }
    Ok(JobAdmission::Queued)
}

/// Whether any job is due: checked on a read connection first, so an idle worker's poll never
/// takes the write lock.
pub(super) fn any_due(connection: &Connection, now: Micros) -> Result<bool, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM export_jobs WHERE state = 'planning' AND lease_expires <= ?1 AND expires > ?1)",
    )?;
    Ok(statement.query_row([now], |row| row.get(0))?)
}

pub(super) fn claim_export_job(
    transaction: &Transaction<'_>,
    owner: &str,
    now: Micros,
    lease_for: Micros,
) -> Result<Option<ClaimedJob>, StoreError> {
    let expires = now.saturating_add(lease_for);
    // Fair: the tenant with the fewest live leases first, then the oldest job.
    let claimed = transaction
        .query_row(
            "UPDATE export_jobs SET lease_owner = ?1, lease_expires = ?3, fence = fence + 1, progress = ''
             WHERE rowid = (
                 SELECT candidate.rowid FROM export_jobs AS candidate
                 WHERE candidate.state = 'planning' AND candidate.lease_expires <= ?2 AND candidate.expires > ?2
                 ORDER BY (SELECT COUNT(*) FROM export_jobs AS running
                           WHERE running.tenant_id = candidate.tenant_id AND running.state = 'planning'
                             AND running.lease_expires > ?2),
                          candidate.created, candidate.tenant_id, candidate.job_id
                 LIMIT 1)
             RETURNING tenant_id, job_id, fence, work, checkpoint, handbacks",
            params![owner, now, expires],
            |row| {
                Ok((
                    TenantId(row.get(0)?),
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, Option<String>>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            },
        )
        .optional()?;
    let Some((tenant, job_id, fence, work, checkpoint, handed_back)) = claimed else { return Ok(None) };
    let parts = parts(transaction, tenant, &job_id)?;
    let lease = JobLease { tenant, job_id, owner: owner.to_owned(), fence, expires };
    Ok(Some(ClaimedJob { lease, work, checkpoint, parts, handed_back }))
}

fn parts(connection: &Connection, tenant: TenantId, job_id: &str) -> Result<Vec<JobPart>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT part, bytes, sha256, lines FROM export_job_parts WHERE tenant_id = ?1 AND job_id = ?2 ORDER BY part",
    )?;
    let rows = statement.query_map(params![tenant.0, job_id], |row| {
        Ok(JobPart {
            index: row.get(0)?,
            bytes: row.get::<_, i64>(1)? as u64,
            sha256: row.get(2)?,
            lines: row.get::<_, i64>(3)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Whether `lease` still holds: its job is planning and its token the newest.
fn holds(connection: &Connection, lease: &JobLease) -> Result<bool, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM export_jobs WHERE tenant_id = ?1 AND job_id = ?2 AND fence = ?3
                        AND state = 'planning')",
    )?;
    Ok(statement.query_row(params![lease.tenant.0, lease.job_id, lease.fence], |row| row.get(0))?)
}

pub(super) fn renew_export_job_lease(
    connection: &Connection,
    lease: &JobLease,
    now: Micros,
    lease_for: Micros,
    progress: &str,
) -> Result<bool, StoreError> {
    let mut statement = connection.prepare_cached(
        "UPDATE export_jobs SET lease_expires = ?4, progress = ?5
         WHERE tenant_id = ?1 AND job_id = ?2 AND fence = ?3 AND state = 'planning'",
    )?;
    let expires = now.saturating_add(lease_for);
    Ok(statement.execute(params![lease.tenant.0, lease.job_id, lease.fence, expires, progress])? > 0)
}

pub(super) fn hand_back_export_job(
    connection: &Connection,
    lease: &JobLease,
    now: Micros,
    progress: &str,
) -> Result<bool, StoreError> {
    let mut statement = connection.prepare_cached(
        "UPDATE export_jobs SET lease_expires = ?4, progress = ?5, handbacks = handbacks + 1
         WHERE tenant_id = ?1 AND job_id = ?2 AND fence = ?3 AND state = 'planning'",
    )?;
    Ok(statement.execute(params![lease.tenant.0, lease.job_id, lease.fence, now, progress])? > 0)
}

pub(super) fn save_export_job_checkpoint(
    connection: &Connection,
    lease: &JobLease,
    checkpoint: &str,
) -> Result<bool, StoreError> {
    let mut statement = connection.prepare_cached(
        "UPDATE export_jobs SET checkpoint = ?4 WHERE tenant_id = ?1 AND job_id = ?2 AND fence = ?3 AND state = 'planning'",
    )?;
    Ok(statement.execute(params![lease.tenant.0, lease.job_id, lease.fence, checkpoint])? > 0)
}

pub(super) fn record_export_job_part(
    transaction: &Transaction<'_>,
    lease: &JobLease,
    part: &JobPart,
) -> Result<bool, StoreError> {
    if !holds(transaction, lease)? {
        return Ok(false);
    }
    transaction
        .prepare_cached(
            "INSERT INTO export_job_parts (tenant_id, job_id, part, bytes, sha256, lines) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (tenant_id, job_id, part) DO UPDATE SET bytes = excluded.bytes, sha256 = excluded.sha256,
                 lines = excluded.lines",
        )?
        .execute(params![
            lease.tenant.0,
            lease.job_id,
            part.index,
            i64::try_from(part.bytes).unwrap_or(i64::MAX),
            part.sha256,
            i64::try_from(part.lines).unwrap_or(i64::MAX)
        ])?;
    Ok(true)
}

pub(super) fn finish_leased_export_job(
    transaction: &Transaction<'_>,
    lease: &JobLease,
    state: &str,
    failure_status: Option<u16>,
    manifest: &str,
) -> Result<bool, StoreError> {
    let finished = transaction
        .prepare_cached(
            "UPDATE export_jobs SET state = ?4, failure_status = ?5, manifest = ?6, lease_expires = 0, checkpoint = NULL
             WHERE tenant_id = ?1 AND job_id = ?2 AND fence = ?3 AND state = 'planning'",
        )?
        .execute(params![lease.tenant.0, lease.job_id, lease.fence, state, failure_status, manifest])?;
    if finished == 0 {
        return Ok(false);
    }
    transaction
        .prepare_cached("DELETE FROM export_job_parts WHERE tenant_id = ?1 AND job_id = ?2")?
        .execute(params![lease.tenant.0, lease.job_id])?;
    Ok(true)
}

pub(super) fn export_job_activity(
    connection: &Connection,
    tenant: TenantId,
    job_id: &str,
) -> Result<Option<JobActivity>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT lease_owner, lease_expires, fence, progress FROM export_jobs WHERE tenant_id = ?1 AND job_id = ?2",
    )?;
    let activity = statement
        .query_row(params![tenant.0, job_id], |row| {
            Ok(JobActivity {
                owner: row.get(0)?,
                lease_expires: row.get(1)?,
                fence: row.get(2)?,
                progress: row.get(3)?,
            })
        })
        .optional()?;
    Ok(activity)
}
