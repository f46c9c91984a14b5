//! Tenants, clients and server keys (small global tables).

use bulkhead_fhir::{now_micros, Micros};
use postgres::Row;

use super::Db;
use crate::{ClientRecord, ClientRegistration, StoreError, Tenant, TenantId};

pub(super) fn create_tenant(db: &mut Db<'_>, name: &str) -> Result<Tenant, StoreError> {
    let created = now_micros();
    let row = db.query_opt(
        "INSERT INTO tenants (name, created) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING id",
        &[&name, &created],
    )?;
    let Some(row) = row else { return Err(StoreError::Conflict(format!("tenant '{name}' already exists"))) };
    Ok(Tenant { id: TenantId(row.try_get(0)?), name: name.to_owned(), created })
}

pub(super) fn list_tenants(db: &mut Db<'_>) -> Result<Vec<Tenant>, StoreError> {
    db.query("SELECT id, name, created FROM tenants ORDER BY name", &[])?.iter().map(tenant_from_row).collect()
}

pub(super) fn tenant_by_name(db: &mut Db<'_>, name: &str) -> Result<Option<Tenant>, StoreError> {
    db.query_opt("SELECT id, name, created FROM tenants WHERE name = $1", &[&name])?
        .as_ref()
        .map(tenant_from_row)
        .transpose()
}

fn tenant_from_row(row: &Row) -> Result<Tenant, StoreError> {
    Ok(Tenant { id: TenantId(row.try_get(0)?), name: row.try_get(1)?, created: row.try_get(2)? })
}

/// Clients with their tenant's name: a lookup by the primary key of each (no cross-tenant data).
const CLIENT_COLUMNS: &str = "SELECT c.client_id, c.tenant_id, t.name, c.secret_hash, c.revoked, c.created
     FROM clients c JOIN tenants t ON t.id = c.tenant_id";

pub(super) fn create_client(
    db: &mut Db<'_>,
    tenant: TenantId,
    client_id: &str,
    secret_hash: &str,
) -> Result<ClientRecord, StoreError> {
    let exists: bool = db.query_one("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)", &[&tenant.0])?.try_get(0)?;
    if !exists {
        return Err(StoreError::NotFound(format!("tenant {}", tenant.0)));
    }
    let inserted = db.execute(
        "INSERT INTO clients (client_id, tenant_id, secret_hash, created) VALUES ($1, $2, $3, $4)
         ON CONFLICT (client_id) DO NOTHING",
        &[&client_id, &tenant.0, &secret_hash, &now_micros()],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("client '{client_id}' already exists")));
    }
    client(db, client_id)?.ok_or_else(|| StoreError::Database("client vanished after insert".into()))
}

pub(super) fn list_clients(db: &mut Db<'_>, tenant: TenantId) -> Result<Vec<ClientRecord>, StoreError> {
    let sql = format!("{CLIENT_COLUMNS} WHERE c.tenant_id = $1 ORDER BY c.created, c.client_id");
    db.query(&sql, &[&tenant.0])?.iter().map(client_from_row).collect()
}

pub(super) fn client(db: &mut Db<'_>, client_id: &str) -> Result<Option<ClientRecord>, StoreError> {
    let sql = format!("{CLIENT_COLUMNS} WHERE c.client_id = $1");
    db.query_opt(&sql, &[&client_id])?.as_ref().map(client_from_row).transpose()
}

pub(super) fn revoke_client(db: &mut Db<'_>, client_id: &str) -> Result<bool, StoreError> {
    Ok(db.execute("UPDATE clients SET revoked = true WHERE client_id = $1", &[&client_id])? > 0)
}

pub(super) fn replace_client_secret_hash(
    db: &mut Db<'_>,
    client_id: &str,
    expected: &str,
    new_hash: &str,
) -> Result<bool, StoreError> {
    let changed = db.execute(
        "UPDATE clients SET secret_hash = $3 WHERE client_id = $1 AND secret_hash = $2",
        &[&client_id, &expected, &new_hash],
    )?;
    Ok(changed > 0)
}

pub(super) fn server_key(db: &mut Db<'_>, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
    db.execute(
        "INSERT INTO server_keys (name, key) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        &[&name, &candidate],
    )?;
    Ok(db.query_one("SELECT key FROM server_keys WHERE name = $1", &[&name])?.try_get(0)?)
}

fn client_from_row(row: &Row) -> Result<ClientRecord, StoreError> {
    Ok(ClientRecord {
        client_id: row.try_get(0)?,
        tenant: TenantId(row.try_get(1)?),
        tenant_name: row.try_get(2)?,
        secret_hash: row.try_get(3)?,
        revoked: row.try_get(4)?,
        created: row.try_get(5)?,
    })
}

pub(super) fn set_client_registration(
    db: &mut Db<'_>,
    client_id: &str,
    registration: &ClientRegistration,
) -> Result<bool, StoreError> {
    let ttl = registration.token_ttl_seconds.map(|seconds| i32::try_from(seconds).unwrap_or(i32::MAX));
    let changed = db.execute(
        "INSERT INTO client_registrations (client_id, jwks, jwks_url, scopes, token_ttl_seconds)
         SELECT client_id, $2, $3, $4, $5 FROM clients WHERE client_id = $1
         ON CONFLICT (client_id) DO UPDATE SET jwks = excluded.jwks, jwks_url = excluded.jwks_url,
             scopes = excluded.scopes, token_ttl_seconds = excluded.token_ttl_seconds",
        &[&client_id, &registration.jwks, &registration.jwks_url, &registration.scopes, &ttl],
    )?;
    Ok(changed > 0)
}

pub(super) fn client_registration(db: &mut Db<'_>, client_id: &str) -> Result<Option<ClientRegistration>, StoreError> {
    let row = db.query_opt(
        "SELECT jwks, jwks_url, scopes, token_ttl_seconds FROM client_registrations WHERE client_id = $1",
        &[&client_id],
    )?;
    row.map(|row| {
        let ttl: Option<i32> = row.try_get(3)?;
        Ok(ClientRegistration {
            jwks: row.try_get(0)?,
            jwks_url: row.try_get(1)?,
            scopes: row.try_get(2)?,
            token_ttl_seconds: ttl.and_then(|seconds| u32::try_from(seconds).ok()),
        })
    })
    .transpose()
}

pub(super) fn record_assertion_jti(
    db: &mut Db<'_>,
    tenant: TenantId,
    client_id: &str,
    jti: &str,
    expires: Micros,
    now: Micros,
) -> Result<bool, StoreError> {
    db.execute("DELETE FROM assertion_jtis WHERE tenant_id = $1 AND expires <= $2", &[&tenant.0, &now])?;
    let inserted = db.execute(
        "INSERT INTO assertion_jtis (tenant_id, client_id, jti, expires) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant_id, client_id, jti) DO NOTHING",
        &[&tenant.0, &client_id, &jti, &expires],
    )?;
    Ok(inserted > 0)
}
