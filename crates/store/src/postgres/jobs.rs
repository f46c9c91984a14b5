//! Asynchronous export jobs and export records, keyed by `(tenant_id, id)`.

use bulkhead_fhir::Micros;
use postgres::Row;

use super::Db;
use crate::{ExportJob, ExportJobState, ExportRecord, StoreError, TenantId, Visibility};

/// The stored text of a state and its failure status.
pub(super) fn state_columns(state: ExportJobState) -> (&'static str, Option<i32>) {
    match state {
        ExportJobState::Planning => ("planning", None),
        ExportJobState::Complete => ("complete", None),
        ExportJobState::Failed { status } => ("failed", Some(i32::from(status))),
    }
}

pub(super) fn create_export_job(db: &mut Db<'_>, tenant: TenantId, job: &ExportJob) -> Result<(), StoreError> {
    let (state, failure_status) = state_columns(job.state);
    let inserted = db.execute(
        "INSERT INTO export_jobs (tenant_id, job_id, client_id, user_id, created, expires, manifest, state, failure_status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (tenant_id, job_id) DO NOTHING",
        &[
            &tenant.0,
            &job.id,
            &job.client_id,
            &job.visibility.user(),
            &job.created,
            &job.expires,
            &job.manifest,
            &state,
            &failure_status,
        ],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("export job '{}' already exists", job.id)));
    }
    Ok(())
}

pub(super) fn export_job(db: &mut Db<'_>, tenant: TenantId, job_id: &str) -> Result<Option<ExportJob>, StoreError> {
    db.query_opt(
        "SELECT job_id, client_id, user_id, created, expires, manifest, state, failure_status FROM export_jobs
         WHERE tenant_id = $1 AND job_id = $2",
        &[&tenant.0, &job_id],
    )?
    .as_ref()
    .map(job_from_row)
    .transpose()
}

pub(super) fn finish_export_job(
    db: &mut Db<'_>,
    tenant: TenantId,
    job_id: &str,
    state: ExportJobState,
    manifest: &str,
) -> Result<bool, StoreError> {
    if state == ExportJobState::Planning {
        return Err(StoreError::Invalid("a job is finished as complete or failed, not planning".into()));
    }
    let (state, failure_status) = state_columns(state);
    let changed = db.execute(
        "UPDATE export_jobs SET state = $3, failure_status = $4, manifest = $5
         WHERE tenant_id = $1 AND job_id = $2 AND state = 'planning'",
        &[&tenant.0, &job_id, &state, &failure_status, &manifest],
    )?;
    Ok(changed > 0)
}

pub(super) fn delete_export_job(db: &mut Db<'_>, tenant: TenantId, job_id: &str) -> Result<bool, StoreError> {
    Ok(db.execute("DELETE FROM export_jobs WHERE tenant_id = $1 AND job_id = $2", &[&tenant.0, &job_id])? > 0)
}

/// Housekeeping across tenants: a scan of a small table (each shard's, when distributed).
pub(super) fn delete_expired_export_jobs(db: &mut Db<'_>, now: Micros) -> Result<u64, StoreError> {
    db.execute("DELETE FROM export_jobs WHERE expires <= $1", &[&now])
}

/// Housekeeping across tenants: up to `limit` expired jobs, soonest expiry first.
pub(super) fn expired_export_jobs(
    db: &mut Db<'_>,
    now: Micros,
    limit: usize,
) -> Result<Vec<(TenantId, String)>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    db.query(
        "SELECT tenant_id, job_id FROM export_jobs WHERE expires <= $1 ORDER BY expires, tenant_id, job_id LIMIT $2",
        &[&now, &limit],
    )?
    .iter()
    .map(|row| Ok((TenantId(row.try_get(0)?), row.try_get(1)?)))
    .collect()
}

pub(super) fn create_export_record(db: &mut Db<'_>, tenant: TenantId, record: &ExportRecord) -> Result<(), StoreError> {
    let inserted = db.execute(
        "INSERT INTO export_records (tenant_id, record_id, created, expires, plan) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, record_id) DO NOTHING",
        &[&tenant.0, &record.id, &record.created, &record.expires, &record.plan],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("export record '{}' already exists", record.id)));
    }
    Ok(())
}

pub(super) fn export_record(
    db: &mut Db<'_>,
    tenant: TenantId,
    record_id: &str,
) -> Result<Option<ExportRecord>, StoreError> {
    let row = db.query_opt(
        "SELECT record_id, created, expires, plan FROM export_records WHERE tenant_id = $1 AND record_id = $2",
        &[&tenant.0, &record_id],
    )?;
    row.map(|row| {
        Ok(ExportRecord {
            id: row.try_get(0)?,
            created: row.try_get(1)?,
            expires: row.try_get(2)?,
            plan: row.try_get(3)?,
        })
    })
    .transpose()
}

pub(super) fn delete_expired_export_records(db: &mut Db<'_>, now: Micros) -> Result<u64, StoreError> {
    let swept = db.execute("DELETE FROM export_records WHERE expires <= $1", &[&now])?;
    // The associated sets of those exports expire with them.
    super::associated::delete_expired_sets(db, now)?;
    Ok(swept)
}

fn job_from_row(row: &Row) -> Result<ExportJob, StoreError> {
    let user: Option<String> = row.try_get(2)?;
    let state: &str = row.try_get(6)?;
    let status: Option<i32> = row.try_get(7)?;
    Ok(ExportJob {
        id: row.try_get(0)?,
        client_id: row.try_get(1)?,
        visibility: user.map_or(Visibility::Tenant, Visibility::User),
        created: row.try_get(3)?,
        expires: row.try_get(4)?,
        manifest: row.try_get(5)?,
        state: match (state, status) {
            ("planning", _) => ExportJobState::Planning,
            ("failed", status) => {
                ExportJobState::Failed { status: status.and_then(|status| u16::try_from(status).ok()).unwrap_or(500) }
            }
            _ => ExportJobState::Complete,
        },
    })
}
