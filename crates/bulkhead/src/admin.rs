//! `bulkhead tenant …` and `bulkhead client …`: direct access to the data directory, safe while
//! a server runs on it (SQLite WAL).

use anyhow::Context;
use bulkhead_fhir::format_instant;
use bulkhead_http::admin::valid_tenant_name;
use bulkhead_http::credentials::register_client;
use bulkhead_store::sqlite::{SqliteOptions, SqliteStore};
use bulkhead_store::{Store, Tenant};

use crate::config::Config;
use crate::private_files::{create_private_dir, create_private_file, tighten_if_exists};

/// Opens (creating if needed) the data directory's store, sized for a server. Only `serve`,
/// `demo` and `tenant create` start a data directory; every other command uses
/// [`open_existing_store`].
pub fn open_store(config: &Config) -> anyhow::Result<SqliteStore> {
    open_store_with(config, SqliteOptions::default())
}

pub fn open_store_with(config: &Config, options: SqliteOptions) -> anyhow::Result<SqliteStore> {
    create_private_dir(&config.data_dir)?;
    let path = config.database_path();
    create_private_file(&path)?;
    for existing in ["bulkhead.db-wal", "bulkhead.db-shm", "token-keys", "output"] {
        tighten_if_exists(&config.data_dir.join(existing))?;
    }
    SqliteStore::open_with(&path, options).with_context(|| format!("opening {}", path.display()))
}

/// Opens the store of a data directory that must already hold one: a mistyped `--data-dir`
/// must not quietly start an empty database.
pub fn open_existing_store(config: &Config) -> anyhow::Result<SqliteStore> {
    open_existing_store_with(config, SqliteOptions::default())
}

pub fn open_existing_store_with(config: &Config, options: SqliteOptions) -> anyhow::Result<SqliteStore> {
    let path = config.database_path();
    anyhow::ensure!(
        path.is_file(),
        "no Bulkhead database at {} (is the data directory right? start one with: bulkhead tenant create NAME {})",
        path.display(),
        data_dir_flag(config)
    );
    open_store_with(config, options)
}

/// The `--data-dir …` a command needs to reach this configuration's data, for hints.
pub fn data_dir_flag(config: &Config) -> String {
    let directory = config.data_dir.display().to_string();
    if directory.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+,:@".contains(c)) {
        format!("--data-dir {directory}")
    } else {
        format!("--data-dir '{}'", directory.replace('\'', "'\\''"))
    }
}

pub fn find_tenant(store: &dyn Store, config: &Config, name: &str) -> anyhow::Result<Tenant> {
    store.tenant_by_name(name)?.with_context(|| {
        format!("no tenant named '{name}' (create it with: bulkhead tenant create {name} {})", data_dir_flag(config))
    })
}

pub fn create_tenant(config: &Config, name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(valid_tenant_name(name), "tenant names are 1-64 letters, digits, '-', '_', '.'");
    let store = open_store(config)?;
    let tenant = store.create_tenant(name)?;
    crate::audit::record_command(&store, tenant.id, "tenant.create", &tenant.name);
    say!(
        "created tenant {} (next: bulkhead client create --tenant {} {})",
        tenant.name,
        tenant.name,
        data_dir_flag(config)
    );
    Ok(())
}

pub fn list_tenants(config: &Config) -> anyhow::Result<()> {
    for tenant in open_existing_store(config)?.list_tenants()? {
        say!("{}\t{}", tenant.name, format_instant(tenant.created));
    }
    Ok(())
}

/// Creates a client and returns `(client_id, client_secret)`.
pub fn new_client(store: &dyn Store, config: &Config, tenant_name: &str) -> anyhow::Result<(String, String)> {
    let tenant = find_tenant(store, config, tenant_name)?;
    let (_, credentials) = register_client(store, tenant.id)?;
    crate::audit::record_command(store, tenant.id, "client.create", &credentials.client_id);
    Ok((credentials.client_id, credentials.client_secret))
}

pub fn create_client(config: &Config, tenant_name: &str, json: bool) -> anyhow::Result<()> {
    let (client_id, client_secret) = new_client(&open_existing_store(config)?, config, tenant_name)?;
    if json {
        say!("{}", serde_json::json!({"client_id": client_id, "client_secret": client_secret, "tenant": tenant_name}));
    } else {
        say!("client_id:     {client_id}\nclient_secret: {client_secret}\n(the secret is shown only once; only a keyed hash of it is stored)");
    }
    Ok(())
}

pub fn list_clients(config: &Config, tenant_name: &str) -> anyhow::Result<()> {
    let store = open_existing_store(config)?;
    let tenant = find_tenant(&store, config, tenant_name)?;
    for client in store.list_clients(tenant.id)? {
        let state = if client.revoked { "revoked" } else { "active" };
        say!("{}\t{}\t{}", client.client_id, state, format_instant(client.created));
    }
    Ok(())
}

pub fn revoke_client(config: &Config, client_id: &str) -> anyhow::Result<()> {
    let store = open_existing_store(config)?;
    let tenant = store.client(client_id)?.map(|client| client.tenant);
    anyhow::ensure!(
        store.revoke_client(client_id)?,
        "no client '{client_id}' in {} (list them with: bulkhead client list --tenant NAME {})",
        config.database_path().display(),
        data_dir_flag(config)
    );
    if let Some(tenant) = tenant {
        crate::audit::record_command(&store, tenant, "client.revoke", client_id);
    }
    say!("revoked {client_id}");
    Ok(())
}
