//! `bulkhead tenant …`, `bulkhead client …` and `bulkhead migrate`: direct access to the store
//! (the data directory's SQLite, or PostgreSQL with `--database-url`), safe while a server runs
//! on it.

use anyhow::Context;
use bulkhead_fhir::format_instant;
use bulkhead_http::admin::valid_tenant_name;
use bulkhead_http::credentials::register_client;
use std::sync::Arc;

use bulkhead_store::postgres::PgStore;
use bulkhead_store::sqlite::{SqliteOptions, SqliteStore};
use std::path::PathBuf;

use bulkhead_store::{ClientRegistration, Store, Tenant};

use crate::config::Config;
use crate::private_files::{create_private_dir, create_private_file, tighten_if_exists};

/// The store a configuration names: PostgreSQL when `database_url` is set, else SQLite in the
/// data directory. Derefs to the [`Store`] it holds.
#[derive(Clone)]
pub enum OpenedStore {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PgStore>),
}

impl OpenedStore {
    /// The store as the server shares it.
    pub fn shared(&self) -> Arc<dyn Store> {
        match self {
            OpenedStore::Sqlite(store) => store.clone(),
            OpenedStore::Postgres(store) => store.clone(),
        }
    }
}

impl std::ops::Deref for OpenedStore {
    type Target = dyn Store;
    fn deref(&self) -> &(dyn Store + 'static) {
        match self {
            OpenedStore::Sqlite(store) => store.as_ref(),
            OpenedStore::Postgres(store) => store.as_ref(),
        }
    }
}

/// Opens (creating if needed) the configured store, sized for a server; PostgreSQL gets its
/// pending migrations. Only `serve`, `demo` and `tenant create` start a SQLite data directory;
/// every other command uses [`open_existing_store`].
pub fn open_store(config: &Config) -> anyhow::Result<OpenedStore> {
    open_store_with(config, SqliteOptions::default())
}

pub fn open_store_with(config: &Config, options: SqliteOptions) -> anyhow::Result<OpenedStore> {
    if let Some(url) = &config.database_url {
        let store = PgStore::open(url, config.postgres_options())
            .with_context(|| format!("opening the PostgreSQL database {}", config.database_display()))?;
        return Ok(OpenedStore::Postgres(Arc::new(store)));
    }
    create_private_dir(&config.data_dir)?;
    let path = config.database_path();
    create_private_file(&path)?;
    for existing in ["bulkhead.db-wal", "bulkhead.db-shm", "token-keys", "output"] {
        tighten_if_exists(&config.data_dir.join(existing))?;
    }
    let store = SqliteStore::open_with(&path, options).with_context(|| format!("opening {}", path.display()))?;
    Ok(OpenedStore::Sqlite(Arc::new(store)))
}

/// Opens the store of a data directory that must already hold one: a mistyped `--data-dir`
/// must not quietly start an empty database. (A PostgreSQL database is opened as it is: its URL
/// names it exactly.)
pub fn open_existing_store(config: &Config) -> anyhow::Result<OpenedStore> {
    open_existing_store_with(config, SqliteOptions::default())
}

pub fn open_existing_store_with(config: &Config, options: SqliteOptions) -> anyhow::Result<OpenedStore> {
    let path = config.database_path();
    anyhow::ensure!(
        config.database_url.is_some() || path.is_file(),
        "no Bulkhead database at {} (is the data directory right? start one with: bulkhead tenant create NAME {})",
        path.display(),
        data_dir_flag(config)
    );
    open_store_with(config, options)
}

/// `bulkhead migrate`: applies pending PostgreSQL migrations and prints the schema version.
pub fn migrate(config: &Config) -> anyhow::Result<()> {
    let Some(url) = &config.database_url else {
        anyhow::bail!(
            "bulkhead migrate is for PostgreSQL: give --database-url (or database_url / BULKHEAD_DATABASE_URL); \
             a SQLite data directory is brought up to date whenever it is opened"
        );
    };
    let store = PgStore::connect(url, config.postgres_options())?;
    let applied = store.migrate().with_context(|| format!("migrating {}", config.database_display()))?;
    let version = store.schema_version()?;
    // Keys of an earlier version's data directory (`token-keys`) move into the database now.
    crate::keys::ensure_token_keys(config, &store)?;
    if applied.is_empty() {
        say!("schema up to date at version {version}");
    } else {
        let list: Vec<String> = applied.iter().map(u32::to_string).collect();
        say!("applied migration(s) {}; schema at version {version}", list.join(", "));
    }
    Ok(())
}

/// The `--data-dir …` a command needs to reach this configuration's data, for hints.
pub fn data_dir_flag(config: &Config) -> String {
    if config.database_url.is_some() {
        return "--database-url URL".to_owned();
    }
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
    crate::audit::record_command(&*store, tenant.id, "tenant.create", &tenant.name);
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

/// SMART Backend Services registration flags of `client create`.
#[derive(clap::Args, Debug, Default)]
pub struct SmartArgs {
    /// A JWK Set file (JSON) with the client's public keys.
    #[arg(long, conflicts_with = "jwks_url")]
    pub jwks_file: Option<PathBuf>,
    /// The URL the client publishes its JWK Set at (https; http only for loopback hosts or with
    /// allow_http_jwks_urls).
    #[arg(long)]
    pub jwks_url: Option<String>,
    /// Space-separated SMART scopes the client may be granted, e.g. "system/*.rs" (v2) or
    /// "system/Patient.read system/Observation.read" (v1). Default: the whole tenant.
    #[arg(long)]
    pub scopes: Option<String>,
    /// Access token lifetime, e.g. 300s, 15m (at most 1h). Default: access_token_ttl_seconds.
    #[arg(long, value_parser = parse_ttl)]
    pub token_ttl: Option<u32>,
}

/// `300`, `300s`, `15m` or `1h` as seconds.
fn parse_ttl(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u32 = number.parse().map_err(|_| format!("'{text}' is not a duration like 300s or 15m"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("'{text}': use s, m or h")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("'{text}' is too long"))
}

impl SmartArgs {
    fn registration(&self) -> anyhow::Result<Option<ClientRegistration>> {
        let jwks = match &self.jwks_file {
            Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?),
            None => None,
        };
        let registration = ClientRegistration {
            jwks,
            jwks_url: self.jwks_url.clone(),
            scopes: self.scopes.clone(),
            token_ttl_seconds: self.token_ttl,
        };
        Ok((registration != ClientRegistration::default()).then_some(registration))
    }
}

pub fn create_client(config: &Config, tenant_name: &str, json: bool, smart: &SmartArgs) -> anyhow::Result<()> {
    let registration = smart.registration()?;
    if let Some(registration) = &registration {
        bulkhead_http::registration::check_registration(registration, config.allow_http_jwks_urls)
            .map_err(|error| anyhow::anyhow!(error))?;
    }
    let store = open_existing_store(config)?;
    let tenant = find_tenant(&*store, config, tenant_name)?;
    let (_, credentials) = bulkhead_http::registration::create_client(
        &*store,
        tenant.id,
        registration.as_ref(),
        config.allow_http_jwks_urls,
    )
    .map_err(|error| {
        anyhow::anyhow!("{}", error.issues.first().map_or("invalid registration", |issue| issue.diagnostics.as_str()))
    })?;
    let (client_id, client_secret) = (credentials.client_id, credentials.client_secret);
    crate::audit::record_command(&*store, tenant.id, "client.create", &client_id);
    if json {
        let mut body =
            serde_json::json!({"client_id": client_id, "client_secret": client_secret, "tenant": tenant_name});
        if let Some(registration) = &registration {
            body["scopes"] = serde_json::json!(registration.scopes);
            body["token_ttl_seconds"] = serde_json::json!(registration.token_ttl_seconds);
            body["jwks_url"] = serde_json::json!(registration.jwks_url);
        }
        say!("{body}");
    } else {
        say!("client_id:     {client_id}\nclient_secret: {client_secret}\n(the secret is shown only once; only a keyed hash of it is stored)");
        if registration.is_some() {
            say!(
                "SMART Backend Services: token endpoint [base]/auth/token, assertions signed with the registered keys"
            );
        }
    }
    Ok(())
}

pub fn list_clients(config: &Config, tenant_name: &str) -> anyhow::Result<()> {
    let store = open_existing_store(config)?;
    let tenant = find_tenant(&*store, config, tenant_name)?;
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
        config.database_display(),
        data_dir_flag(config)
    );
    if let Some(tenant) = tenant {
        crate::audit::record_command(&*store, tenant, "client.revoke", client_id);
    }
    say!("revoked {client_id}");
    Ok(())
}
