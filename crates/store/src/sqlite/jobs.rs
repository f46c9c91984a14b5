//! Asynchronous export jobs (one row per kick-off with `Prefer: respond-async`, looked up by
//! `(tenant_id, job_id)`) and export records (one row per kick-off, what its file URLs refer to,
//! looked up by `(tenant_id, record_id)`).

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{ExportJob, ExportJobState, ExportRecord, StoreError, TenantId, Visibility};

/// Adds the columns of background planning (`state`, `failure_status`) to an `export_jobs`
/// table created before them; its jobs were all planned at kick-off, so they are 'complete'.
pub(super) fn migrate(connection: &Connection) -> Result<(), StoreError> {
    let has_state: bool = connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('export_jobs') WHERE name = 'state')",
        [],
        |row| row.get(0),
    )?;
    if !has_state {
        connection.execute_batch(
            "ALTER TABLE export_jobs ADD COLUMN state TEXT NOT NULL DEFAULT 'complete';
             ALTER TABLE export_jobs ADD COLUMN failure_status INTEGER;",
        )?;
    }
    Ok(())
}

/// The stored text of a state and its failure status.
pub(super) fn state_columns(state: ExportJobState) -> (&'static str, Option<u16>) {
    match state {
        ExportJobState::Planning => ("planning", None),
        ExportJobState::Complete => ("complete", None),
        ExportJobState::Failed { status } => ("failed", Some(status)),
    }
}

pub(super) fn create_export_job(connection: &Connection, tenant: TenantId, job: &ExportJob) -> Result<(), StoreError> {
    let (state, failure_status) = state_columns(job.state);
    let inserted = connection.execute(
        "INSERT INTO export_jobs (tenant_id, job_id, client_id, user_id, created, expires, manifest, state,
                                  failure_status)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (tenant_id, job_id) DO NOTHING",
        params![
            tenant.0,
            job.id,
            job.client_id,
            job.visibility.user(),
            job.created,
            job.expires,
            job.manifest,
            state,
            failure_status
        ],
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
        "SELECT job_id, client_id, user_id, created, expires, manifest, state, failure_status FROM export_jobs
         WHERE tenant_id = ?1 AND job_id = ?2",
    )?;
    Ok(statement.query_row(params![tenant.0, job_id], job_from_row).optional()?)
}

pub(super) fn finish_export_job(
    connection: &Connection,
    tenant: TenantId,
    job_id: &str,
    state: ExportJobState,
    manifest: &str,
) -> Result<bool, StoreError> {
    if state == ExportJobState::Planning {
        return Err(StoreError::Invalid("a job is finished as complete or failed, not planning".into()));
    }
    let (state, failure_status) = state_columns(state);
    let mut statement = connection.prepare_cached(
        "UPDATE export_jobs SET state = ?3, failure_status = ?4, manifest = ?5
         WHERE tenant_id = ?1 AND job_id = ?2 AND state = 'planning'",
    )?;
    Ok(statement.execute(params![tenant.0, job_id, state, failure_status, manifest])? > 0)
}

pub(super) fn delete_export_job(connection: &Connection, tenant: TenantId, job_id: &str) -> Result<bool, StoreError> {
    let mut statement = connection.prepare_cached("DELETE FROM export_jobs WHERE tenant_id = ?1 AND job_id = ?2")?;
    Ok(statement.execute(params![tenant.0, job_id])? > 0)
}

pub(super) fn delete_expired_export_jobs(connection: &Connection, now: Micros) -> Result<u64, StoreError> {
    let mut statement = connection.prepare_cached("DELETE FROM export_jobs WHERE expires <= ?1")?;
    Ok(statement.execute([now])? as u64)
}

pub(super) fn expired_export_jobs(
    connection: &Connection,
    now: Micros,
    limit: usize,
) -> Result<Vec<(TenantId, String)>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT tenant_id, job_id FROM export_jobs WHERE expires <= ?1 ORDER BY expires, tenant_id, job_id LIMIT ?2",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = statement.query_map(params![now, limit], |row| Ok((TenantId(row.get(0)?), row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
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
    let swept = statement.execute([now])? as u64;
    // The associated sets of those exports expire with them.
    super::plan_watermarks::delete_expired(connection, now)?;
    Ok(swept)
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
        state: match (row.get_ref(6)?.as_str()?, row.get::<_, Option<u16>>(7)?) {
            ("planning", _) => ExportJobState::Planning,
            ("failed", status) => ExportJobState::Failed { status: status.unwrap_or(500) },
            _ => ExportJobState::Complete,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_from_before_background_planning_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE export_jobs (tenant_id INTEGER NOT NULL, job_id TEXT NOT NULL,
                     client_id TEXT NOT NULL, user_id TEXT, created INTEGER NOT NULL,
                     expires INTEGER NOT NULL, manifest TEXT NOT NULL, PRIMARY KEY (tenant_id, job_id));
                 INSERT INTO export_jobs VALUES (1, 'old-job', 'c', NULL, 10, 20, '{\"output\":[]}');",
            )
            .unwrap();
        }
        let store = crate::sqlite::SqliteStore::open(&path).unwrap();
        let job = crate::Store::export_job(&store, TenantId(1), "old-job").unwrap().unwrap();
        assert_eq!(job.state, ExportJobState::Complete, "jobs of old databases were planned at kick-off");
        assert_eq!(job.manifest, "{\"output\":[]}");
        drop(store);
        // Opening again finds the columns and changes nothing.
        let store = crate::sqlite::SqliteStore::open(&path).unwrap();
        assert_eq!(crate::Store::export_job(&store, TenantId(1), "old-job").unwrap().unwrap(), job);
    }
}
