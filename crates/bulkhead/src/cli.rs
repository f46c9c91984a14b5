//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};

#[derive(Parser)]
#[command(name = "bulkhead", version, about = "Multi-tenant FHIR R4 server for bulk export of patient cohorts")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the configuration comes from; shared by every subcommand that opens the data directory.
#[derive(Args, Clone, Default)]
pub struct ConfigArgs {
    /// TOML configuration file (keys in docs/configuration.md).
    #[arg(long, env = "BULKHEAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (database, token keys, output); overrides the file and environment. Only
    /// `serve`, `demo` and `tenant create` start a new one; other commands refuse a directory
    /// without a database.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL to use instead of SQLite in the data directory:
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DATABASE` (config `database_url`, env
    /// `BULKHEAD_DATABASE_URL`).
    #[arg(long)]
    pub database_url: Option<String>,
}

impl ConfigArgs {
    /// Loads the configuration; the caller reports [`Config::warn_ignored`] once logging is set.
    pub fn load(&self, listen: Option<String>) -> anyhow::Result<Config> {
        self.load_with(Overrides { listen, ..Overrides::default() })
    }

    /// Loads the configuration with command-line overrides besides `--data-dir` and
    /// `--database-url`.
    pub fn load_with(&self, overrides: Overrides) -> anyhow::Result<Config> {
        Config::load(
            self.config.as_deref(),
            Overrides { data_dir: self.data_dir.clone(), database_url: self.database_url.clone(), ..overrides },
        )
    }

    /// Loads the configuration for a command-line tool, warning on stderr at once.
    pub fn load_for_tool(&self) -> anyhow::Result<Config> {
        let config = self.load(None)?;
        config.warn_ignored();
        Ok(config)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address to listen on, e.g. 127.0.0.1:8080 or localhost:8080.
        #[arg(long)]
        listen: Option<String>,
        /// Serve Prometheus metrics at /metrics (config key `metrics`; needs admin_token).
        #[arg(long)]
        metrics: bool,
        /// Output store for asynchronous exports, s3://BUCKET/PREFIX (config key `output_url`).
        #[arg(long)]
        output_url: Option<String>,
    },
    /// Start a server with a demo tenant, client, synthetic patients and a Group, run an export
    /// against it, print working curl lines, and keep serving.
    Demo(crate::demo::DemoArgs),
    /// Manage tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Manage clients (credentials acting inside one tenant).
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Manage the keys that sign file URLs and access tokens.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Generate deterministic synthetic FHIR R4 data.
    Synth(crate::synth::SynthArgs),
    /// Import NDJSON (plain or .gz) and Bundle JSON files or directories into a tenant.
    Import(crate::import::ImportArgs),
    /// Measure import and export against the release binary (see BENCHMARKS.md).
    Bench(crate::bench::BenchArgs),
    /// Apply pending PostgreSQL schema migrations (`serve` also applies them at start-up) and
    /// print the schema version. SQLite data directories need no migration command.
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Show a tenant's audit trail (who accessed which data, when, from where, with what outcome).
    Audit(crate::audit::AuditArgs),
    /// Write a consistent backup of a data directory (database, server keys and file-URL
    /// signing keys) to one file, while a server keeps running on it.
    Backup {
        /// The backup file to write (must not exist).
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Restore a backup into a data directory (a new or empty one unless --force).
    Restore {
        /// The backup file (from `bulkhead backup`).
        #[arg(long)]
        from: PathBuf,
        /// Replace the database and keys of a data directory that already holds some (never
        /// one a running server has open).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove history older than `history_retention` (earlier versions, tombstones), in small
    /// batches, while a server keeps running.
    Prune {
        /// Retention to apply instead of the configured `history_retention`, e.g. 90d or 12h.
        #[arg(long)]
        older_than: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant.
    Create {
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List tenants.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Start signing with a new key; the previous keys keep verifying what they signed until it
    /// expires. A running server picks the change up within a second.
    Rotate {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Create a client; prints its client_id and client_secret once. With --jwks-file or
    /// --jwks-url it can also get SMART Backend Services access tokens.
    Create {
        #[arg(long)]
        tenant: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        smart: crate::admin::SmartArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List a tenant's clients.
    List {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Revoke a client: its credentials stop working at once.
    Revoke {
        client_id: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, listen, metrics, output_url } => {
            crate::serve::serve_command(config.load_with(Overrides {
                listen,
                metrics: metrics.then_some(true),
                output_url,
                ..Overrides::default()
            })?)
        }
        Command::Demo(args) => crate::demo::run(args),
        Command::Tenant { command: TenantCommand::Create { name, config } } => {
            crate::admin::create_tenant(&config.load_for_tool()?, &name)
        }
        Command::Tenant { command: TenantCommand::List { config } } => {
            crate::admin::list_tenants(&config.load_for_tool()?)
        }
        Command::Client { command: ClientCommand::Create { tenant, json, smart, config } } => {
            crate::admin::create_client(&config.load_for_tool()?, &tenant, json, &smart)
        }
        Command::Keys { command: KeysCommand::Rotate { config } } => crate::keys::rotate(&config.load_for_tool()?),
        Command::Client { command: ClientCommand::List { tenant, config } } => {
            crate::admin::list_clients(&config.load_for_tool()?, &tenant)
        }
        Command::Client { command: ClientCommand::Revoke { client_id, config } } => {
            crate::admin::revoke_client(&config.load_for_tool()?, &client_id)
        }
        Command::Synth(args) => crate::synth::run(args),
        Command::Import(args) => crate::import::run(args),
        Command::Bench(args) => crate::bench::run(args),
        Command::Migrate { config } => crate::admin::migrate(&config.load_for_tool()?),
        Command::Audit(args) => crate::audit::run(args),
        Command::Backup { to, config } => crate::backup::backup(&config.load_for_tool()?, &to),
        Command::Restore { from, force, config } => crate::backup::restore(&config.load_for_tool()?, &from, force),
        Command::Prune { older_than, config } => {
            crate::retention::prune(&config.load_for_tool()?, older_than.as_deref())
        }
    }
}
