//! Tenants and clients.

use bulkhead_fhir::{now_micros, Micros};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{ClientRecord, ClientRegistration, StoreError, Tenant, TenantId};

pub(super) fn create_tenant(connection: &Connection, name: &str) -> Result<Tenant, StoreError> {
    let created = now_micros();
    let inserted = connection.execute(
        "INSERT INTO tenants (name, created) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        params![name, created],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("tenant '{name}' already exists")));
    }
    Ok(Tenant { id: TenantId(connection.last_insert_rowid()), name: name.to_owned(), created })
}

pub(super) fn list_tenants(connection: &Connection) -> Result<Vec<Tenant>, StoreError> {
    let mut statement = connection.prepare_cached("SELECT id, name, created FROM tenants ORDER BY name")?;
    let tenants = statement.query_map([], tenant_from_row)?.collect::<Result<_, _>>()?;
    Ok(tenants)
}

pub(super) fn tenant_by_name(connection: &Connection, name: &str) -> Result<Option<Tenant>, StoreError> {
    let mut statement = connection.prepare_cached("SELECT id, name, created FROM tenants WHERE name = ?1")?;
    Ok(statement.query_row([name], tenant_from_row).optional()?)
}

fn tenant_from_row(row: &Row<'_>) -> rusqlite::Result<Tenant> {
    Ok(Tenant { id: TenantId(row.get(0)?), name: row.get(1)?, created: row.get(2)? })
}

const CLIENT_COLUMNS: &str =
    "SELECT c.client_id, c.tenant_id, t.name, c.secret_hash, c.revoked, c.created FROM clients c JOIN tenants t ON t.id = c.tenant_id";

pub(super) fn create_client(
    connection: &Connection,
    tenant: TenantId,
    client_id: &str,
    secret_hash: &str,
) -> Result<ClientRecord, StoreError> {
    let created: Micros = now_micros();
    let tenant_exists: bool =
        connection.query_row("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = ?1)", [tenant.0], |row| row.get(0))?;
    if !tenant_exists {
        return Err(StoreError::NotFound(format!("tenant {}", tenant.0)));
    }
    let inserted = connection.execute(
        "INSERT INTO clients (client_id, tenant_id, secret_hash, created) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (client_id) DO NOTHING",
        params![client_id, tenant.0, secret_hash, created],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!("client '{client_id}' already exists")));
    }
    client(connection, client_id)?.ok_or_else(|| StoreError::Database("client vanished after insert".into()))
}

pub(super) fn list_clients(connection: &Connection, tenant: TenantId) -> Result<Vec<ClientRecord>, StoreError> {
    let sql = format!("{CLIENT_COLUMNS} WHERE c.tenant_id = ?1 ORDER BY c.created, c.client_id");
    let mut statement = connection.prepare_cached(&sql)?;
    let clients = statement.query_map([tenant.0], client_from_row)?.collect::<Result<_, _>>()?;
    Ok(clients)
}

pub(super) fn client(connection: &Connection, client_id: &str) -> Result<Option<ClientRecord>, StoreError> {
    let sql = format!("{CLIENT_COLUMNS} WHERE c.client_id = ?1");
    let mut statement = connection.prepare_cached(&sql)?;
    Ok(statement.query_row([client_id], client_from_row).optional()?)
}

pub(super) fn revoke_client(connection: &Connection, client_id: &str) -> Result<bool, StoreError> {
    let changed = connection.execute("UPDATE clients SET revoked = 1 WHERE client_id = ?1", [client_id])?;
    Ok(changed > 0)
}

pub(super) fn replace_client_secret_hash(
    connection: &Connection,
    client_id: &str,
    expected: &str,
    new_hash: &str,
) -> Result<bool, StoreError> {
    let changed = connection.execute(
        "UPDATE clients SET secret_hash = ?3 WHERE client_id = ?1 AND secret_hash = ?2",
        params![client_id, expected, new_hash],
    )?;
    Ok(changed > 0)
}

pub(super) fn server_key(connection: &Connection, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
    connection.execute(
        "INSERT INTO server_keys (name, key) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        params![name, candidate],
    )?;
    Ok(connection.query_row("SELECT key FROM server_keys WHERE name = ?1", [name], |row| row.get(0))?)
}

pub(super) fn set_client_registration(
    connection: &Connection,
    client_id: &str,
    registration: &ClientRegistration,
) -> Result<bool, StoreError> {
    let changed = connection.execute(
        "INSERT INTO client_registrations (client_id, jwks, jwks_url, scopes, token_ttl_seconds)
         SELECT client_id, ?2, ?3, ?4, ?5 FROM clients WHERE client_id = ?1
         ON CONFLICT (client_id) DO UPDATE SET jwks = excluded.jwks, jwks_url = excluded.jwks_url,
             scopes = excluded.scopes, token_ttl_seconds = excluded.token_ttl_seconds",
        params![
            client_id,
            registration.jwks,
            registration.jwks_url,
            registration.scopes,
            registration.token_ttl_seconds
        ],
    )?;
    Ok(changed > 0)
}

pub(super) fn client_registration(
    connection: &Connection,
    client_id: &str,
) -> Result<Option<ClientRegistration>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT jwks, jwks_url, scopes, token_ttl_seconds FROM client_registrations WHERE client_id = ?1",
    )?;
    let registration = statement
        .query_row([client_id], |row| {
            Ok(ClientRegistration {
                jwks: row.get(0)?,
                jwks_url: row.get(1)?,
                scopes: row.get(2)?,
                token_ttl_seconds: row.get(3)?,
            })
        })
        .optional()?;
    Ok(registration)
}

pub(super) fn record_assertion_jti(
    connection: &Connection,
    tenant: TenantId,
    client_id: &str,
    jti: &str,
    expires: Micros,
    now: Micros,
) -> Result<bool, StoreError> {
    connection.execute("DELETE FROM assertion_jtis WHERE expires <= ?1", [now])?;
    let inserted = connection.execute(
        "INSERT INTO assertion_jtis (tenant_id, client_id, jti, expires) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant_id, client_id, jti) DO NOTHING",
        params![tenant.0, client_id, jti, expires],
    )?;
    Ok(inserted > 0)
}

fn client_from_row(row: &Row<'_>) -> rusqlite::Result<ClientRecord> {
    Ok(ClientRecord {
        client_id: row.get(0)?,
        tenant: TenantId(row.get(1)?),
        tenant_name: row.get(2)?,
        secret_hash: row.get(3)?,
        revoked: row.get(4)?,
        created: row.get(5)?,
    })
}
