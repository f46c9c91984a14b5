//! Asynchronous export jobs (one row per kick-off with `Prefer: respond-async`, looked up by
//! `(tenant_id, job_id)`) and export records (one row per kick-off, what its file URLs refer to,
//! looked up by `(tenant_id, record_id)`).

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{ExportJob, ExportRecord, StoreError, TenantId, Visibility};

pub(super) fn create_export_job(connection: &Connection, tenant: TenantId, job: &ExportJob) -> Result<(), StoreError> {
    let inserted = connection.execute(
        "INSERT INTO export_jobs (tenant_id, job_id, client_id, user_id, created, expires, manifest)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (tenant_id, job_id) DO NOTHING",
        params![tenant.0, job.id, job.client_id, job.visibility.user(), job.created, job.expires, job.manifest],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("export job '{}' already exists", job.id)));
    }
    Ok(())
}

pub(super) fn export_job(
    connection: &Connection,
    tenant: TenantId,
    job_id: &str,
) -> Result<Option<ExportJob>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT job_id, client_id, user_id, created, expires, manifest FROM export_jobs
         WHERE tenant_id = ?1 AND job_id = ?2",
    )?;
    Ok(statement.query_row(params![tenant.0, job_id], job_from_row).optional()?)
}

pub(super) fn delete_export_job(connection: &Connection, tenant: TenantId, job_id: &str) -> Result<bool, StoreError> {
    let mut statement = connection.prepare_cached("DELETE FROM export_jobs WHERE tenant_id = ?1 AND job_id = ?2")?;
    Ok(statement.execute(params![tenant.0, job_id])? > 0)
}

pub(super) fn delete_expired_export_jobs(connection: &Connection, now: Micros) -> Result<u64, StoreError> {
    let mut statement = connection.prepare_cached("DELETE FROM export_jobs WHERE expires <= ?1")?;
    Ok(statement.execute([now])? as u64)
}

pub(super) fn create_export_record(
    connection: &Connection,
    tenant: TenantId,
    record: &ExportRecord,
) -> Result<(), StoreError> {
    let inserted = connection.execute(
        "INSERT INTO export_records (tenant_id, record_id, created, expires, plan) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant_id, record_id) DO NOTHING",
        params![tenant.0, record.id, record.created, record.expires, record.plan],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("export record '{}' already exists", record.id)));
    }
    Ok(())
}

pub(super) fn export_record(
    connection: &Connection,
    tenant: TenantId,
    record_id: &str,
) -> Result<Option<ExportRecord>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT record_id, created, expires, plan FROM export_records WHERE tenant_id = ?1 AND record_id = ?2",
    )?;
    let record = statement
        .query_row(params![tenant.0, record_id], |row| {
            Ok(ExportRecord { id: row.get(0)?, created: row.get(1)?, expires: row.get(2)?, plan: row.get(3)? })
        })
        .optional()?;
    Ok(record)
}

pub(super) fn delete_expired_export_records(connection: &Connection, now: Micros) -> Result<u64, StoreError> {
    let mut statement = connection.prepare_cached("DELETE FROM export_records WHERE expires <= ?1")?;
    Ok(statement.execute([now])? as u64)
}

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<ExportJob> {
    let user: Option<String> = row.get(2)?;
    Ok(ExportJob {
        id: row.get(0)?,
        client_id: row.get(1)?,
        visibility: user.map_or(Visibility::Tenant, Visibility::User),
        created: row.get(3)?,
        expires: row.get(4)?,
        manifest: row.get(5)?,
    })
}
