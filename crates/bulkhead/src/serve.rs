//! `bulkhead serve`: the HTTP server on the embedded store, with graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulkhead_http::AppState;
use bulkhead_store::sqlite::SqliteStore;

use crate::admin::{open_store, OpenedStore};
use crate::config::{Config, LogFormat};

/// Sets up `tracing` once for the process (`RUST_LOG` overrides the default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour only on a terminal: escape codes make log files and journald output unreadable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Builds the server state for a configuration.
pub fn app_state(config: &Config) -> anyhow::Result<AppState> {
    let store = open_store(config)?;
    crate::private_files::create_private_dir(&config.data_dir)?;
    crate::private_files::create_private_dir(&config.data_dir.join("output"))?;
    let keys = crate::keys::load_token_keys(config, &*store)?;
    if let OpenedStore::Sqlite(sqlite) = &store {
        spawn_wal_checkpoints(sqlite);
    }
    let store = store.shared();
    crate::audit::spawn_pruning(&store, config.audit_retention_days);
    if !config.audit_trail {
        tracing::warn!("audit_trail = false: requests are not recorded in the audit trail (for measuring its cost, or where no patient data is served)");
    }
    let mut state = AppState::new(store, config.http_config(), keys);
    if let Some(settings) = config.output_settings() {
        let output = bulkhead_http::object_output::OutputStore::connect(&settings)
            .with_context(|| format!("invalid configuration: output_url = '{}'", settings.url))?;
        tracing::info!(output = ?output, presigned_urls = settings.presigned_urls, "asynchronous exports are written to the output store");
        state.output = Some(Arc::new(output));
    }
    crate::keys::spawn_reloader(config, &state.store, &state.token_keys);
    crate::retention::spawn_pruning(&state.store, config.history_retention()?);
    crate::memory::spawn_reporter();
    Ok(state)
}

/// How often the server looks at the WAL's size.
const WAL_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Truncates the WAL whenever it has grown past its limit, for as long as the store lives, so
/// it returns to a small size once no reader pins it (writers' own checkpoints keep reusing a
/// grown file).
fn spawn_wal_checkpoints(store: &Arc<SqliteStore>) {
    let store = Arc::downgrade(store);
    let spawned = std::thread::Builder::new().name("wal-checkpoint".into()).spawn(move || loop {
        std::thread::sleep(WAL_CHECK_INTERVAL);
        let Some(store) = store.upgrade() else { return };
        if let Err(error) = store.checkpoint_wal() {
            tracing::warn!(error = %error, "wal checkpoint failed");
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(error = %error, "could not start the wal checkpoint thread");
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => return interrupt.await.unwrap_or(()),
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    interrupt.await.unwrap_or(());
}

/// The async runtime of the benchmark's load client: tokio's defaults.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// The server's runtime: tokio's workers, and at most `config.max_blocking_threads` threads for
/// blocking work (store calls, export streams, uploads), beyond which such work queues.
///
/// Every thread that allocates gets its own mimalloc heap, which keeps the pages it freed for
/// its next allocation; with tokio's default of 512 the pool grew to ~90 threads under the
/// mixed load (16 writers waiting for the one SQLite writer), holding ~200 MiB of freed memory
/// for ~20 MiB in use (BENCHMARKS.md, sessions 12 and 13).
pub fn server_runtime(config: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(config.max_blocking_threads)
        .build()
        .context("starting the async runtime")
}

pub fn serve_command(config: Config) -> anyhow::Result<()> {
    crate::set_memory_profile(crate::MemoryProfile::Server);
    init_logging(config.log_format);
    config.warn_ignored();
    let state = app_state(&config)?;
    server_runtime(&config)?.block_on(async {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        tracing::info!(
            address = %listener.local_addr()?,
            data_dir = %config.data_dir.display(),
            database = %config.database_display(),
            public_base_url = config.public_base_url.as_deref().unwrap_or("unset"),
            trust_host_header = state.config.trust_host_header,
            max_connections = config.max_connections,
            "bulkhead listening"
        );
        bulkhead_http::serve(listener, state, shutdown_signal(), Duration::from_secs(config.shutdown_grace_seconds))
            .await?;
        tracing::info!("bulkhead stopped");
        Ok(())
    })
}
