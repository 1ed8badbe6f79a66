//! Writing credentials to disk: private keys are created with mode 0600
//! from the first byte (never written and then chmod-ed), each file
//! atomically (temporary file, fsync, rename, fsync of the directory),
//! inside a directory created 0700.
//!
//! This module owns file modes and atomicity only; which files exist and
//! what they hold is [`crate::identity`]'s business.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of private key files.
pub(crate) const SECRET_MODE: u32 = 0o600;
/// Mode of certificate files.
pub(crate) const PUBLIC_MODE: u32 = 0o644;

/// Creates `dir` (and parents) with mode 0700 when it does not exist.
pub(crate) fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Writes `contents` to `path` with file mode `mode`, atomically: readers
/// see the old file or the new one, never a mix, even across a crash.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
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

/// Reads a private key file, warning when other users may read it.
pub(crate) fn read_secret(path: &Path) -> io::Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn secrets_are_0600_public_files_0644_and_stale_temporaries_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        ensure_private_dir(&nested).unwrap();
        assert_eq!(mode(&nested), 0o700);

        let key = nested.join("key.pem");
        // A stale, world-readable temporary from a crash must not lend its mode.
        fs::write(nested.join("key.pem.tmp"), "old").unwrap();
        fs::set_permissions(
            nested.join("key.pem.tmp"),
            fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        write_atomic(&key, b"secret", SECRET_MODE).unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), "secret");
        assert_eq!(mode(&key), 0o600);
        assert!(!nested.join("key.pem.tmp").exists());

        // Replacing keeps the mode and the contents are all new.
        write_atomic(&key, b"second", SECRET_MODE).unwrap();
        assert_eq!(read_secret(&key).unwrap(), "second");
        assert_eq!(mode(&key), 0o600);

        let chain = nested.join("cert-chain.pem");
        write_atomic(&chain, b"cert", PUBLIC_MODE).unwrap();
        assert_eq!(mode(&chain), 0o644);
    }
}
