//! `bulkhead tenant …` and `bulkhead client …`: direct access to the data directory, safe while
//! a server runs on it (SQLite WAL).

use anyhow::Context;
use bulkhead_fhir::format_instant;
use bulkhead_http::admin::valid_tenant_name;
use bulkhead_http::credentials::register_client;
use bulkhead_store::sqlite::{SqliteOptions, SqliteStore};
use bulkhead_store::{Store, Tenant};

use crate::config::Config;

/// Opens (creating if needed) the data directory's store, sized for a server.
pub fn open_store(config: &Config) -> anyhow::Result<SqliteStore> {
    open_store_with(config, SqliteOptions::default())
}

pub fn open_store_with(config: &Config, options: SqliteOptions) -> anyhow::Result<SqliteStore> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let path = config.database_path();
    SqliteStore::open_with(&path, options).with_context(|| format!("opening {}", path.display()))
}

pub fn find_tenant(store: &dyn Store, name: &str) -> anyhow::Result<Tenant> {
    store
        .tenant_by_name(name)?
        .with_context(|| format!("no tenant named '{name}' (create it with: bulkhead tenant create {name})"))
}

pub fn create_tenant(config: &Config, name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(valid_tenant_name(name), "tenant names are 1-64 letters, digits, '-', '_', '.'");
    let tenant = open_store(config)?.create_tenant(name)?;
    println!("created tenant {}", tenant.name);
    Ok(())
}

pub fn list_tenants(config: &Config) -> anyhow::Result<()> {
    for tenant in open_store(config)?.list_tenants()? {
        println!("{}\t{}", tenant.name, format_instant(tenant.created));
    }
    Ok(())
}

/// Creates a client and returns `(client_id, client_secret)`.
pub fn new_client(store: &dyn Store, tenant_name: &str) -> anyhow::Result<(String, String)> {
    let tenant = find_tenant(store, tenant_name)?;
    let (_, credentials) = register_client(store, tenant.id)?;
    Ok((credentials.client_id, credentials.client_secret))
}

pub fn create_client(config: &Config, tenant_name: &str, json: bool) -> anyhow::Result<()> {
    let (client_id, client_secret) = new_client(&open_store(config)?, tenant_name)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"client_id": client_id, "client_secret": client_secret, "tenant": tenant_name})
        );
    } else {
        println!("client_id:     {client_id}\nclient_secret: {client_secret}\n(the secret is shown only once; only a keyed hash of it is stored)");
    }
    Ok(())
}

pub fn list_clients(config: &Config, tenant_name: &str) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let tenant = find_tenant(&store, tenant_name)?;
    for client in store.list_clients(tenant.id)? {
        let state = if client.revoked { "revoked" } else { "active" };
        println!("{}\t{}\t{}", client.client_id, state, format_instant(client.created));
    }
    Ok(())
}

pub fn revoke_client(config: &Config, client_id: &str) -> anyhow::Result<()> {
    anyhow::ensure!(open_store(config)?.revoke_client(client_id)?, "no client '{client_id}'");
    println!("revoked {client_id}");
    Ok(())
}
