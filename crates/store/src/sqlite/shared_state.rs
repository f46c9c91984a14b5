//! Token signing keys, quota token buckets and failed-login windows (see
//! [`crate::shared_state`]); every statement runs in the caller's immediate transaction, so
//! processes on one file take turns.

use bulkhead_fhir::Micros;
use rusqlite::{params, Connection};

use crate::{next_kid, LoginWindow, StoreError, TenantId, TokenKey};

pub(super) fn token_keys(connection: &Connection) -> Result<Vec<TokenKey>, StoreError> {
    let mut statement =
        connection.prepare_cached("SELECT kid, secret, retired FROM token_signing_keys ORDER BY seq DESC")?;
    let rows =
        statement.query_map([], |row| Ok(TokenKey { kid: row.get(0)?, secret: row.get(1)?, retired: row.get(2)? }))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn token_keys_version(connection: &Connection) -> Result<i64, StoreError> {
    Ok(connection.query_row("SELECT COALESCE(MAX(seq), 0) FROM token_signing_keys", [], |row| row.get(0))?)
}

pub(super) fn init_token_keys(connection: &Connection, keys: &[TokenKey]) -> Result<bool, StoreError> {
    let empty: bool =
        connection.query_row("SELECT NOT EXISTS (SELECT 1 FROM token_signing_keys)", [], |row| row.get(0))?;
    if !empty || keys.is_empty() {
        return Ok(false);
    }
    let mut insert = connection
        .prepare_cached("INSERT INTO token_signing_keys (seq, kid, secret, retired) VALUES (?1, ?2, ?3, ?4)")?;
    for (index, key) in keys.iter().enumerate() {
        insert.execute(params![(keys.len() - index) as i64, key.kid, key.secret, key.retired])?;
    }
    Ok(true)
}

pub(super) fn rotate_token_keys(
    connection: &Connection,
    secret: &[u8],
    now: i64,
    drop_retired_before: i64,
) -> Result<Vec<TokenKey>, StoreError> {
    let kid = next_kid(&token_keys(connection)?);
    let seq = token_keys_version(connection)? + 1;
    connection.execute("UPDATE token_signing_keys SET retired = ?1 WHERE retired IS NULL", [now])?;
    connection.execute("DELETE FROM token_signing_keys WHERE retired < ?1", [drop_retired_before])?;
    connection.execute(
        "INSERT INTO token_signing_keys (seq, kid, secret, retired) VALUES (?1, ?2, ?3, NULL)",
        params![seq, kid, secret],
    )?;
    token_keys(connection)
}

pub(super) fn draw_quota_tokens(
    connection: &Connection,
    tenant: TenantId,
    quota: &str,
    want: f64,
    capacity: f64,
    rate: f64,
    now: Micros,
) -> Result<f64, StoreError> {
    let tokens: f64 = connection.query_row(
        "INSERT INTO quota_buckets AS b (tenant_id, quota, tokens, updated) VALUES (?1, ?2, ?3, ?5)
         ON CONFLICT (tenant_id, quota) DO UPDATE SET
             tokens = MIN(?3, b.tokens + MAX(0, ?5 - b.updated) / 1e6 * ?4),
             updated = MAX(b.updated, ?5)
         RETURNING tokens",
        params![tenant.0, quota, capacity, rate, now],
        |row| row.get(0),
    )?;
    let taken = tokens.clamp(0.0, want.max(0.0));
    if taken > 0.0 {
        connection.execute(
            "UPDATE quota_buckets SET tokens = tokens - ?3 WHERE tenant_id = ?1 AND quota = ?2",
            params![tenant.0, quota, taken],
        )?;
    }
    Ok(taken)
}

pub(super) fn record_login_failure(
    connection: &Connection,
    key: &str,
    window: Micros,
    now: Micros,
) -> Result<LoginWindow, StoreError> {
    connection.execute("DELETE FROM login_failures WHERE started <= ?1", [now.saturating_sub(window)])?;
    let (started, failures): (i64, i64) = connection.query_row(
        "INSERT INTO login_failures AS f (key, started, failures) VALUES (?1, ?2, 1)
         ON CONFLICT (key) DO UPDATE SET
             started = CASE WHEN f.started <= ?2 - ?3 THEN ?2 ELSE f.started END,
             failures = CASE WHEN f.started <= ?2 - ?3 THEN 1 ELSE f.failures + 1 END
         RETURNING started, failures",
        params![key, now, window],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    Ok(LoginWindow { started, failures: failures.clamp(0, i64::from(u32::MAX)) as u32 })
}
