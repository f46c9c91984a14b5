//! Token signing keys, quota token buckets and failed-login windows (see
//! [`crate::shared_state`]), shared by every instance on the database. Key changes take a
//! table lock that conflicts with itself, so two rotations (or two first starts) run one after
//! the other; bucket and window updates lock their one row.

use bulkhead_fhir::Micros;

use super::Db;
use crate::{next_kid, LoginWindow, StoreError, TenantId, TokenKey};

pub(super) fn token_keys(db: &mut Db<'_>) -> Result<Vec<TokenKey>, StoreError> {
    db.query("SELECT kid, secret, retired FROM token_signing_keys ORDER BY seq DESC", &[])?
        .iter()
        .map(|row| Ok(TokenKey { kid: row.try_get(0)?, secret: row.try_get(1)?, retired: row.try_get(2)? }))
        .collect()
}

pub(super) fn token_keys_version(db: &mut Db<'_>) -> Result<i64, StoreError> {
    Ok(db.query_one("SELECT COALESCE(max(seq), 0)::bigint FROM token_signing_keys", &[])?.try_get(0)?)
}

fn lock_keys(db: &mut Db<'_>) -> Result<(), StoreError> {
    db.batch("LOCK TABLE token_signing_keys IN SHARE ROW EXCLUSIVE MODE")
}

pub(super) fn init_token_keys(db: &mut Db<'_>, keys: &[TokenKey]) -> Result<bool, StoreError> {
    lock_keys(db)?;
    let empty: bool = db.query_one("SELECT NOT EXISTS (SELECT 1 FROM token_signing_keys)", &[])?.try_get(0)?;
    if !empty || keys.is_empty() {
        return Ok(false);
    }
    for (index, key) in keys.iter().enumerate() {
        db.execute(
            "INSERT INTO token_signing_keys (seq, kid, secret, retired) VALUES ($1, $2, $3, $4)",
            &[&((keys.len() - index) as i64), &key.kid, &key.secret, &key.retired],
        )?;
    }
    Ok(true)
}

pub(super) fn rotate_token_keys(
    db: &mut Db<'_>,
    secret: &[u8],
    now: i64,
    drop_retired_before: i64,
) -> Result<Vec<TokenKey>, StoreError> {
    lock_keys(db)?;
    let kid = next_kid(&token_keys(db)?);
    let seq = token_keys_version(db)? + 1;
    db.execute("UPDATE token_signing_keys SET retired = $1 WHERE retired IS NULL", &[&now])?;
    db.execute("DELETE FROM token_signing_keys WHERE retired < $1", &[&drop_retired_before])?;
    db.execute(
        "INSERT INTO token_signing_keys (seq, kid, secret, retired) VALUES ($1, $2, $3, NULL)",
        &[&seq, &kid, &secret],
    )?;
    token_keys(db)
}

pub(super) fn draw_quota_tokens(
    db: &mut Db<'_>,
    tenant: TenantId,
    quota: &str,
    want: f64,
    capacity: f64,
    rate: f64,
    now: Micros,
) -> Result<f64, StoreError> {
    let tokens: f64 = db
        .query_one(
            "INSERT INTO quota_buckets AS b (tenant_id, quota, tokens, updated) VALUES ($1, $2, $3, $5)
             ON CONFLICT (tenant_id, quota) DO UPDATE SET
                 tokens = LEAST($3, b.tokens + GREATEST(0, $5 - b.updated)::float8 / 1e6::float8 * $4),
                 updated = GREATEST(b.updated, $5)
             RETURNING tokens",
            &[&tenant.0, &quota, &capacity, &rate, &now],
        )?
        .try_get(0)?;
    let taken = tokens.clamp(0.0, want.max(0.0));
    if taken > 0.0 {
        db.execute(
            "UPDATE quota_buckets SET tokens = tokens - $3 WHERE tenant_id = $1 AND quota = $2",
            &[&tenant.0, &quota, &taken],
        )?;
    }
    Ok(taken)
}

pub(super) fn record_login_failure(
    db: &mut Db<'_>,
    key: &str,
    window: Micros,
    now: Micros,
) -> Result<LoginWindow, StoreError> {
    db.execute("DELETE FROM login_failures WHERE started <= $1", &[&now.saturating_sub(window)])?;
    let row = db.query_one(
        "INSERT INTO login_failures AS f (key, started, failures) VALUES ($1, $2, 1)
         ON CONFLICT (key) DO UPDATE SET
             started = CASE WHEN f.started <= $2 - $3 THEN $2 ELSE f.started END,
             failures = CASE WHEN f.started <= $2 - $3 THEN 1 ELSE f.failures + 1 END
         RETURNING started, failures",
        &[&key, &now, &window],
    )?;
    let failures: i32 = row.try_get(1)?;
    Ok(LoginWindow { started: row.try_get(0)?, failures: failures.max(0) as u32 })
}
