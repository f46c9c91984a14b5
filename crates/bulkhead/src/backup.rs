//! `bulkhead backup` and `bulkhead restore`: one file holding a consistent copy of the database
//! (tenants, clients, resources and history, export jobs and records, server keys and the token
//! signing keys) and any key files in the data directory (an earlier version's `token-keys`, not
//! yet imported), so a restored server verifies the same client secrets and the file URLs it
//! minted before the backup.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bulkhead_store::sqlite::backup::{database_in_use, restore_backup};

use crate::admin::{open_existing_store, open_existing_store_with, OpenedStore};
use crate::config::Config;
use crate::private_files::{create_private_dir, create_private_file};

/// The database's own files, which the backup's snapshot replaces.
const DATABASE_FILES: [&str; 3] = ["bulkhead.db", "bulkhead.db-wal", "bulkhead.db-shm"];

/// Key files larger than this are not what a data directory holds: refused rather than copied.
const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;

/// The data directory's files besides the database and `output/` (an earlier version's
/// `token-keys`, when the database has not imported it yet), by name.
fn key_files(data_dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(data_dir).with_context(|| format!("reading {}", data_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let metadata = entry.metadata()?;
        if !metadata.is_file() || DATABASE_FILES.contains(&name.as_str()) || name.ends_with(".restoring") {
            continue;
        }
        anyhow::ensure!(
            metadata.len() <= MAX_KEY_FILE_BYTES,
            "{} is {} bytes: not a key file; move it out of the data directory",
            entry.path().display(),
            metadata.len()
        );
        files.push((name, std::fs::read(entry.path()).with_context(|| format!("reading {}", entry.path().display()))?));
    }
    files.sort();
    Ok(files)
}

/// Backups of a PostgreSQL database are PostgreSQL's business (docs/deploy.md).
fn refuse_postgres(config: &Config, command: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.database_url.is_none(),
        "bulkhead {command} copies a SQLite data directory; on PostgreSQL use pg_dump or pg_basebackup \
         (the token signing keys are in the database), see docs/deploy.md"
    );
    Ok(())
}

/// `bulkhead backup --to FILE`: online (a running server keeps writing) and consistent (one
/// snapshot of the database). The file is private (0600) and written under a temporary name
/// first, so a failed backup never leaves a file that looks whole.
pub fn backup(config: &Config, to: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(!to.exists(), "{} already exists: choose a new backup file", to.display());
    refuse_postgres(config, "backup")?;
    let OpenedStore::Sqlite(store) = open_existing_store(config)? else {
        anyhow::bail!("bulkhead backup needs a SQLite data directory")
    };
    let files = key_files(&config.data_dir)?;
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    create_private_file(&partial)?;
    let written = store.backup_into(&partial, &files).with_context(|| format!("writing {}", partial.display()));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, to).with_context(|| format!("renaming {} to {}", partial.display(), to.display()))?;
    let bytes = std::fs::metadata(to).map_or(0, |metadata| metadata.len());
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    let files = if names.is_empty() { String::new() } else { format!(", and {}", names.join(", ")) };
    say!(
        "backup of {} written to {} ({bytes} bytes; the database with its token signing keys{files})",
        config.data_dir.display(),
        to.display(),
    );
    Ok(())
}

/// `bulkhead restore --from FILE --data-dir DIR [--force]`: into a new or empty directory; with
/// `--force`, over an existing one's database and keys, but never under a running server.
pub fn restore(config: &Config, from: &Path, force: bool) -> anyhow::Result<()> {
    anyhow::ensure!(from.is_file(), "no backup file at {}", from.display());
    refuse_postgres(config, "restore")?;
    let data_dir = &config.data_dir;
    let database = config.database_path();
    let occupied = std::fs::read_dir(data_dir).map(|mut entries| entries.next().is_some()).unwrap_or(false);
    if occupied {
        anyhow::ensure!(
            force,
            "{} is not empty: restore into a new directory, or pass --force to replace its database and keys \
             (stop its server first)",
            data_dir.display()
        );
        if database.is_file() {
            anyhow::ensure!(
                !database_in_use(&database).with_context(|| format!("checking {}", database.display()))?,
                "a running process (a server?) has {} open: stop it before restoring over it",
                database.display()
            );
        }
    }
    create_private_dir(data_dir)?;
    let restoring = data_dir.join("bulkhead.db.restoring");
    let _ = std::fs::remove_file(&restoring);
    create_private_file(&restoring)?;
    let files = match restore_backup(from, &restoring) {
        Ok(files) => files,
        Err(error) => {
            let _ = std::fs::remove_file(&restoring);
            return Err(error).with_context(|| format!("restoring {}", from.display()));
        }
    };
    // The old database's WAL must not be applied to the restored file.
    for name in &DATABASE_FILES[1..] {
        match std::fs::remove_file(data_dir.join(name)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).with_context(|| format!("removing {}", data_dir.join(name).display()));
            }
            _ => {}
        }
    }
    std::fs::rename(&restoring, &database).with_context(|| format!("renaming {}", restoring.display()))?;
    for (name, content) in &files {
        let plain = Path::new(name).file_name().is_some_and(|file| file == name.as_str()) && name != "..";
        anyhow::ensure!(plain, "the backup names a file '{name}' outside the data directory: refused");
        let path = data_dir.join(name);
        let _ = std::fs::remove_file(&path);
        create_private_file(&path)?;
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    create_private_dir(&data_dir.join("output"))?;
    // Opening applies the schema of this version (migrations) before a server starts on it.
    let store = open_existing_store_with(config, bulkhead_store::sqlite::SqliteOptions::default())?;
    let tenants = store.list_tenants()?.len();
    say!("restored {} into {} ({tenants} tenants)", from.display(), data_dir.display());
    Ok(())
}
