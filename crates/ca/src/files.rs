//! Writing key material, for the CA and the agent alike: private keys are
//! created with mode 0600 from the first byte (never written and then
//! chmod-ed), each file atomically (temporary file, fsync, rename, fsync of
//! the directory), inside a directory created 0700.
//!
//! This module owns file modes and atomicity only; which files exist and
//! what they hold is its callers' business.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of private key files.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of certificate files.
pub const PUBLIC_MODE: u32 = 0o644;

/// Creates `dir` (and parents) with mode 0700 when it does not exist.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Writes `contents` to `path` with file mode `mode`, atomically: readers
/// see the old file or the new one, never a mix, even across a crash.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // A temporary file left by a crash may have any mode: start afresh so
    // that `mode` below applies (it only applies to files we create).
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The process umask may have removed bits `mode` asked for; it can
        // never add any, so a secret stays private either way.
        if fs::metadata(&tmp)?.permissions().mode() & 0o777 != mode {
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent()
            && let Ok(dir) = fs::File::open(dir)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a private key: mode 0600.
pub(crate) fn write_secret(path: &Path, contents: &str) -> io::Result<()> {
    write_file(path, contents.as_bytes(), SECRET_MODE)
}

/// Writes a public file (certificate): mode 0644.
pub(crate) fn write_public(path: &Path, contents: &str) -> io::Result<()> {
    write_file(path, contents.as_bytes(), PUBLIC_MODE)
}

/// Reads a private key file, warning when other users may read it.
pub fn read_secret(path: &Path) -> io::Result<String> {
    let contents = fs::read_to_string(path)?;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "private key file is readable by other users; it should be mode 600"
            );
        }
    }
    Ok(contents)
}

/// Whether `path` exists (a dangling symlink or unreadable entry counts as
/// existing so that it surfaces as an error rather than being overwritten).
pub(crate) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_0600_and_replace_stale_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        // A stale, world-readable temporary from a crash must not lend its mode.
        fs::write(dir.path().join("k.pem.tmp"), "old").unwrap();
        fs::set_permissions(
            dir.path().join("k.pem.tmp"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        write_secret(&path, "secret").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "secret");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!dir.path().join("k.pem.tmp").exists());

        let nested = dir.path().join("a/b");
        ensure_private_dir(&nested).unwrap();
        assert_eq!(
            fs::metadata(&nested).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
