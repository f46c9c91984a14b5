//! Backup files of the embedded store: one SQLite database holding a consistent copy of every
//! table (server keys included) and, in one extra table, the files of the data directory that
//! the database alone does not hold (the file-URL signing keys), so one file restores a server
//! whose outstanding file URLs and client secrets keep working.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags};

use super::{open_connection, SqliteStore};
use crate::StoreError;

/// The table of a backup that carries the data directory's files: `(name, content)`.
const FILES_TABLE: &str = "bulkhead_backup_files";

fn utf8(path: &Path) -> Result<&str, StoreError> {
    path.to_str().ok_or_else(|| StoreError::Database(format!("path {} is not UTF-8", path.display())))
}

impl SqliteStore {
    /// Writes a consistent copy of the database, plus `files` (name, content), to `target`,
    /// which must not exist or be empty (create it empty with the permissions it must have).
    /// Online: `VACUUM INTO` reads one snapshot (in WAL mode writers go on meanwhile) and writes
    /// it compacted, with the WAL folded in.
    pub fn backup_into(&self, target: &Path, files: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let connection = open_connection(&self.path, self.options.reader_cache_mib)?;
        connection.execute("VACUUM INTO ?1", [utf8(target)?])?;
        drop(connection);
        let backup = Connection::open_with_flags(target, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        backup.execute_batch(&format!("CREATE TABLE {FILES_TABLE} (name TEXT PRIMARY KEY, content BLOB NOT NULL)"))?;
        for (name, content) in files {
            backup.execute(
                &format!("INSERT INTO {FILES_TABLE} (name, content) VALUES (?1, ?2)"),
                params![name, content],
            )?;
        }
        Ok(())
    }
}

/// Restores a backup written by [`SqliteStore::backup_into`] as the database `target` (which
/// must not exist or be empty; nothing may have it open) and returns the files it carries. The
/// backup is checked first (`PRAGMA quick_check`, and that it is a Bulkhead backup): a damaged
/// or foreign file is refused before anything is written.
pub fn restore_backup(backup: &Path, target: &Path) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let source = Connection::open_with_flags(backup, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|error| StoreError::Invalid(format!("{} is not a readable database: {error}", backup.display())))?;
    let check: String = source
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(|error| StoreError::Invalid(format!("{} is not a Bulkhead backup: {error}", backup.display())))?;
    if check != "ok" {
        return Err(StoreError::Invalid(format!("{} is damaged: {check}", backup.display())));
    }
    let is_backup: bool = source.query_row(
        "SELECT COUNT(*) = 2 FROM sqlite_schema WHERE type = 'table' AND name IN (?1, 'resources')",
        [FILES_TABLE],
        |row| row.get(0),
    )?;
    if !is_backup {
        return Err(StoreError::Invalid(format!("{} is not a Bulkhead backup", backup.display())));
    }
    source.execute("VACUUM INTO ?1", [utf8(target)?])?;
    drop(source);
    let restored = Connection::open_with_flags(target, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let files = restored
        .prepare(&format!("SELECT name, content FROM {FILES_TABLE} ORDER BY name"))?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<Vec<(String, Vec<u8>)>, _>>()?;
    restored.execute_batch(&format!("DROP TABLE {FILES_TABLE}"))?;
    Ok(files)
}

/// Whether another process has the database open (a running server): every connection to a
/// WAL database holds a shared lock on it, so an exclusive lock is refused at once.
pub fn database_in_use(path: &Path) -> Result<bool, StoreError> {
    let connection = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    connection.busy_timeout(std::time::Duration::ZERO)?;
    connection.execute_batch("PRAGMA locking_mode = EXCLUSIVE")?;
    match connection.execute_batch("BEGIN EXCLUSIVE; ROLLBACK;") {
        Ok(()) => Ok(false),
        Err(rusqlite::Error::SqliteFailure(error, _)) if error.code == rusqlite::ErrorCode::DatabaseBusy => Ok(true),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Store, Visibility, WriteMode, WriteOp};

    #[test]
    fn a_backup_restores_every_row_and_its_files_and_refuses_foreign_files() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("live.db")).unwrap();
        let tenant = store.create_tenant("t").unwrap().id;
        let key = store.server_key("k", b"secret").unwrap();
        let body = serde_json::json!({"resourceType": "Patient", "id": "p1"});
        let op = WriteOp::Update { resource_type: "Patient".into(), id: "p1".into(), body, if_match: None };
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap();
        let backup = directory.path().join("backup.db");
        store.backup_into(&backup, &[("token-keys".into(), b"k1 abc\n".to_vec())]).unwrap();
        assert!(!database_in_use(&backup).unwrap());

        let target = directory.path().join("restored.db");
        let files = restore_backup(&backup, &target).unwrap();
        assert_eq!(files, vec![("token-keys".to_owned(), b"k1 abc\n".to_vec())]);
        let restored = SqliteStore::open(&target).unwrap();
        assert_eq!(restored.server_key("k", b"other").unwrap(), key, "server keys come back");
        assert!(restored.read(tenant, &Visibility::Tenant, "Patient", "p1").unwrap().is_some());
        assert!(database_in_use(&target).unwrap(), "open by `restored`");
        drop(restored);
        assert!(!database_in_use(&target).unwrap());

        let foreign = directory.path().join("foreign.db");
        std::fs::write(&foreign, b"not a database at all").unwrap();
        assert!(matches!(restore_backup(&foreign, &directory.path().join("x.db")), Err(StoreError::Invalid(_))));
        assert!(matches!(
            restore_backup(&directory.path().join("live.db"), &directory.path().join("y.db")),
            Err(StoreError::Invalid(_))
        ));
    }
}
