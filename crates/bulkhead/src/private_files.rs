//! The data directory holds patient data and signing keys: it is private to the server's user,
//! whatever the umask. Directories are 0700 and files 0600, set explicitly at creation (a mode
//! passed to `open`/`mkdir` is only narrowed by the umask, never made exact); existing ones that
//! others can read are tightened when opened, with a warning.

use std::path::Path;

use anyhow::Context;

const DIRECTORY_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Creates `directory` (and missing parents) and makes `directory` itself private; an existing
/// one is tightened with a warning.
pub fn create_private_dir(directory: &Path) -> anyhow::Result<()> {
    if directory.is_dir() {
        return make_private(directory, DIRECTORY_MODE);
    }
    std::fs::create_dir_all(directory).with_context(|| format!("creating directory {}", directory.display()))?;
    set_mode(directory, DIRECTORY_MODE)
}

/// Creates an empty private file unless it exists, then makes it private. SQLite gives the
/// database's `-wal` and `-shm` files the database file's permissions, so creating
/// `bulkhead.db` this way keeps all three private.
pub fn create_private_file(path: &Path) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
    match options.open(path) {
        Ok(_) => set_mode(path, FILE_MODE),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => make_private(path, FILE_MODE),
        Err(error) => Err(error).with_context(|| format!("creating {}", path.display())),
    }
}

/// Tightens an existing file (0600) or directory (0700) that its group or others can use;
/// missing paths are left alone.
pub fn tighten_if_exists(path: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) => make_private(path, if meta.is_dir() { DIRECTORY_MODE } else { FILE_MODE }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("reading the permissions of {}", path.display())),
    }
}

#[cfg(unix)]
fn make_private(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let current = std::fs::metadata(path)
        .with_context(|| format!("reading the permissions of {}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    if current & 0o077 != 0 {
        crate::warn(&format!(
            "{} was readable by other users (mode {current:o}); setting mode {mode:o}",
            path.display()
        ));
        set_mode(path, mode)?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn make_private(_path: &Path, _mode: u32) -> anyhow::Result<()> {
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the permissions of {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_private_and_existing_ones_tightened() {
        let directory = tempfile::tempdir().unwrap();
        let data = directory.path().join("a/data");
        create_private_dir(&data).unwrap();
        assert_eq!(mode(&data), 0o700);
        let file = data.join("bulkhead.db");
        create_private_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        tighten_if_exists(&data).unwrap();
        create_private_file(&file).unwrap();
        assert_eq!((mode(&data), mode(&file)), (0o700, 0o600));
        // A stricter mode is the owner's choice and stays.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        tighten_if_exists(&file).unwrap();
        assert_eq!(mode(&file), 0o400);
        tighten_if_exists(&data.join("missing")).unwrap();
    }
}
