//! Leases on export jobs' background work on PostgreSQL (see [`crate::job_lease`]): the lease
//! columns of `export_jobs` and the parts holders record in `export_job_parts`. Claims take the
//! job row with `FOR UPDATE SKIP LOCKED`, so concurrent claimers on any instance never wait for
//! each other and never get the same job; every fenced write checks the job's token in the same
//! statement (or under the job row's lock), so a stale holder's write changes nothing.

use bulkhead_fhir::Micros;

use super::Db;
use crate::{ClaimedJob, ExportJob, JobActivity, JobAdmission, JobLease, JobPart, StoreError, TenantId};

pub(super) fn unfinished_export_jobs(db: &mut Db<'_>, tenant: TenantId, now: Micros) -> Result<u64, StoreError> {
    let count: i64 = db
        .query_one(
            "SELECT count(*) FROM export_jobs WHERE tenant_id = $1 AND state = 'planning' AND expires > $2",
            &[&tenant.0, &now],
        )?
        .try_get(0)?;
    Ok(count.max(0) as u64)
}

pub(super) fn enqueue_export_job(
    db: &mut Db<'_>,
    tenant: TenantId,
    job: &ExportJob,
    work: &str,
    cap: u64,
    now: Micros,
) -> Result<JobAdmission, StoreError> {
    // The tenant's row lock orders its kick-offs across instances: the count and the insert
    // cannot interleave with another instance's.
    db.query_opt("SELECT 1 FROM tenants WHERE id = $1 FOR NO KEY UPDATE", &[&tenant.0])?;
    let count = unfinished_export_jobs(db, tenant, now)?;
    if cap > 0 && count >= cap {
        return Ok(JobAdmission::AtCap { unfinished: count });
    }
    let inserted = db.execute(
        "INSERT INTO export_jobs (tenant_id, job_id, client_id, user_id, created, expires, manifest, state, work)
         VALUES ($1, $2, $3, $4, $5, $6, '', 'planning', $7) ON CONFLICT (tenant_id, job_id) DO NOTHING",
        &[&tenant.0, &job.id, &job.client_id, &job.visibility.user(), &job.created, &job.expires, &work],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("export job '{}' already exists", job.id)));
    }
    Ok(JobAdmission::Queued)
}

pub(super) fn claim_export_job(
    db: &mut Db<'_>,
    owner: &str,
    now: Micros,
    lease_for: Micros,
) -> Result<Option<ClaimedJob>, StoreError> {
    let expires = now.saturating_add(lease_for);
    // Fair: the tenant with the fewest live leases first, then the oldest job. A job another
    // claimer has locked is skipped, not waited for.
    let claimed = db.query_opt(
        "WITH candidate AS (
             SELECT c.tenant_id, c.job_id FROM export_jobs AS c
             WHERE c.state = 'planning' AND c.lease_expires <= $2 AND c.expires > $2
             ORDER BY (SELECT count(*) FROM export_jobs AS running
                       WHERE running.tenant_id = c.tenant_id AND running.state = 'planning'
                         AND running.lease_expires > $2),
                      c.created, c.tenant_id, c.job_id
             LIMIT 1
             FOR UPDATE SKIP LOCKED)
         UPDATE export_jobs AS j SET lease_owner = $1, lease_expires = $3, fence = j.fence + 1, progress = ''
         FROM candidate WHERE j.tenant_id = candidate.tenant_id AND j.job_id = candidate.job_id
         RETURNING j.tenant_id, j.job_id, j.fence, j.work, j.checkpoint, j.handbacks",
        &[&owner, &now, &expires],
    )?;
    let Some(row) = claimed else { return Ok(None) };
    let tenant = TenantId(row.try_get(0)?);
    let job_id: String = row.try_get(1)?;
    let parts = parts(db, tenant, &job_id)?;
    let lease = JobLease { tenant, job_id, owner: owner.to_owned(), fence: row.try_get(2)?, expires };
    let (work, checkpoint, handed_back) = (row.try_get(3)?, row.try_get(4)?, row.try_get(5)?);
    Ok(Some(ClaimedJob { lease, work, checkpoint, parts, handed_back }))
}

fn parts(db: &mut Db<'_>, tenant: TenantId, job_id: &str) -> Result<Vec<JobPart>, StoreError> {
    db.query(
        "SELECT part, bytes, sha256, lines FROM export_job_parts WHERE tenant_id = $1 AND job_id = $2 ORDER BY part",
        &[&tenant.0, &job_id],
    )?
    .iter()
    .map(|row| {
        Ok(JobPart {
            index: row.try_get::<_, i32>(0)?.max(0) as u32,
            bytes: row.try_get::<_, i64>(1)?.max(0) as u64,
            sha256: row.try_get(2)?,
            lines: row.try_get::<_, i64>(3)?.max(0) as u64,
        })
    })
    .collect()
}

pub(super) fn renew_export_job_lease(
    db: &mut Db<'_>,
    lease: &JobLease,
    now: Micros,
    lease_for: Micros,
    progress: &str,
) -> Result<bool, StoreError> {
    let expires = now.saturating_add(lease_for);
    Ok(db.execute(
        "UPDATE export_jobs SET lease_expires = $4, progress = $5
         WHERE tenant_id = $1 AND job_id = $2 AND fence = $3 AND state = 'planning'",
        &[&lease.tenant.0, &lease.job_id, &lease.fence, &expires, &progress],
    )? > 0)
}

pub(super) fn hand_back_export_job(
    db: &mut Db<'_>,
    lease: &JobLease,
    now: Micros,
    progress: &str,
) -> Result<bool, StoreError> {
    Ok(db.execute(
        "UPDATE export_jobs SET lease_expires = $4, progress = $5, handbacks = handbacks + 1
         WHERE tenant_id = $1 AND job_id = $2 AND fence = $3 AND state = 'planning'",
        &[&lease.tenant.0, &lease.job_id, &lease.fence, &now, &progress],
    )? > 0)
}

pub(super) fn save_export_job_checkpoint(
    db: &mut Db<'_>,
    lease: &JobLease,
    checkpoint: &str,
) -> Result<bool, StoreError> {
    Ok(db.execute(
        "UPDATE export_jobs SET checkpoint = $4 WHERE tenant_id = $1 AND job_id = $2 AND fence = $3 AND state = 'planning'",
        &[&lease.tenant.0, &lease.job_id, &lease.fence, &checkpoint],
    )? > 0)
}

pub(super) fn record_export_job_part(db: &mut Db<'_>, lease: &JobLease, part: &JobPart) -> Result<bool, StoreError> {
    // The job row's lock keeps a claim from moving the token between the check and the insert.
    let holds = db.query_opt(
        "SELECT 1 FROM export_jobs WHERE tenant_id = $1 AND job_id = $2 AND fence = $3 AND state = 'planning'
         FOR UPDATE",
        &[&lease.tenant.0, &lease.job_id, &lease.fence],
    )?;
    if holds.is_none() {
        return Ok(false);
    }
    db.execute(
        "INSERT INTO export_job_parts (tenant_id, job_id, part, bytes, sha256, lines) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (tenant_id, job_id, part) DO UPDATE SET bytes = excluded.bytes, sha256 = excluded.sha256,
             lines = excluded.lines",
        &[
            &lease.tenant.0,
            &lease.job_id,
            &i32::try_from(part.index).unwrap_or(i32::MAX),
            &i64::try_from(part.bytes).unwrap_or(i64::MAX),
            &part.sha256,
            &i64::try_from(part.lines).unwrap_or(i64::MAX),
        ],
    )?;
    Ok(true)
}

pub(super) fn finish_leased_export_job(
    db: &mut Db<'_>,
    lease: &JobLease,
    state: &str,
    failure_status: Option<i32>,
    manifest: &str,
) -> Result<bool, StoreError> {
    let finished = db.execute(
        "UPDATE export_jobs SET state = $4, failure_status = $5, manifest = $6, lease_expires = 0, checkpoint = NULL
         WHERE tenant_id = $1 AND job_id = $2 AND fence = $3 AND state = 'planning'",
        &[&lease.tenant.0, &lease.job_id, &lease.fence, &state, &failure_status, &manifest],
    )?;
    if finished == 0 {
        return Ok(false);
    }
    db.execute("DELETE FROM export_job_parts WHERE tenant_id = $1 AND job_id = $2", &[&lease.tenant.0, &lease.job_id])?;
    Ok(true)
}

pub(super) fn export_job_activity(
    db: &mut Db<'_>,
    tenant: TenantId,
    job_id: &str,
) -> Result<Option<JobActivity>, StoreError> {
    db.query_opt(
        "SELECT lease_owner, lease_expires, fence, progress FROM export_jobs WHERE tenant_id = $1 AND job_id = $2",
        &[&tenant.0, &job_id],
    )?
    .map(|row| {
        Ok(JobActivity {
            owner: row.try_get(0)?,
            lease_expires: row.try_get(1)?,
            fence: row.try_get(2)?,
            progress: row.try_get(3)?,
        })
    })
    .transpose()
}
