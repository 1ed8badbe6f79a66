//! Backups of the store and restoring one: what an operator runs when the
//! server refuses a damaged store.
//!
//! A backup is a complete redb file written from one read transaction, so
//! it is consistent without stopping writes. The server takes one at start
//! (after the file passed its checks) and at an interval, into
//! `<data-dir>/backups`, keeping the newest few. [`restore`] puts the newest
//! backup that passes the same checks as a live store (or a given file) in
//! place, keeping the damaged file beside it; it runs only while no server
//! has the store open.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::file::{META, OBJECTS, RECORDS, REVISION, STORE_FILE, backend, check_copy, lock};
use crate::{Store, StoreError};

/// The folder of backups inside a data directory.
pub const BACKUP_DIR: &str = "backups";
/// How many backups are kept.
pub const KEEP_BACKUPS: usize = 3;

fn io(context: String) -> impl FnOnce(std::io::Error) -> StoreError {
    move |e| StoreError::Backend {
        context,
        source: Box::new(e),
    }
}

fn copy_table<V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    to: &redb::WriteTransaction,
    definition: TableDefinition<&str, V>,
) -> Result<(), StoreError> {
    let source = match from.open_table(definition) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(backend("reading a table to back up", e)),
    };
    let mut target = to
        .open_table(definition)
        .map_err(|e| backend("writing a backup", e))?;
    for entry in source
        .iter()
        .map_err(|e| backend("reading a table to back up", e))?
    {
        let (key, value) = entry.map_err(|e| backend("reading a table to back up", e))?;
        target
            .insert(key.value(), value.value())
            .map_err(|e| backend("writing a backup", e))?;
    }
    Ok(())
}

/// The backups in `dir`, newest (highest revision) first.
pub fn backups(data_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(data_dir.join(BACKUP_DIR)) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let revision = name.strip_prefix("store-r")?.strip_suffix(".redb")?;
            Some((revision.parse().ok()?, entry.path()))
        })
        .collect();
    found.sort_by_key(|(revision, _)| std::cmp::Reverse(*revision));
    found.into_iter().map(|(_, path)| path).collect()
}

impl Store {
    /// Writes a consistent copy of the whole store to `dest` (mode 0600: the
    /// store holds Secrets and join records).
    pub fn backup_to(&self, dest: &Path) -> Result<(), StoreError> {
        let partial = dest.with_extension("partial");
        let _ = std::fs::remove_file(&partial);
        self.embedded()?.file.with(|db| {
            let from = db
                .begin_read()
                .map_err(|e| backend("starting a backup", e))?;
            let copy = crate::file::open_database(&partial)
                .map_err(|e| backend("creating a backup", e))?;
            let to = copy
                .begin_write()
                .map_err(|e| backend("writing a backup", e))?;
            copy_table(&from, &to, OBJECTS)?;
            copy_table(&from, &to, META)?;
            copy_table(&from, &to, RECORDS)?;
            to.commit().map_err(|e| backend("writing a backup", e))
        })?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("protecting {}", partial.display())))?;
        std::fs::rename(&partial, dest).map_err(io(format!("renaming to {}", dest.display())))
    }

    /// Backs the store up into `<data-dir>/backups` unless the newest backup
    /// is already of this revision, and drops all but the newest
    /// [`KEEP_BACKUPS`]. Returns the backup's path.
    pub fn take_backup(&self) -> Result<PathBuf, StoreError> {
        let data_dir = self.data_dir()?;
        let dir = data_dir.join(BACKUP_DIR);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let dest = dir.join(format!("store-r{}.redb", self.revision()));
        if !dest.exists() {
            self.backup_to(&dest)?;
        }
        for old in backups(&data_dir).into_iter().skip(KEEP_BACKUPS) {
            let _ = std::fs::remove_file(old);
        }
        Ok(dest)
    }

    fn data_dir(&self) -> Result<PathBuf, StoreError> {
        Ok(self
            .embedded()?
            .file
            .path()
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf))
    }
}

/// A store file that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub path: PathBuf,
    pub revision: u64,
    pub objects: u64,
}

/// Checks a store file (or a backup) without serving it: the same checks
/// the server makes at start.
pub fn check(path: &Path) -> Result<Checked, StoreError> {
    if !path.exists() {
        return Err(StoreError::Damaged {
            path: path.to_path_buf(),
            problem: "the file does not exist".into(),
        });
    }
    let (revision, objects) = check_copy(path, |db| {
        let txn = db.begin_read().map_err(|e| backend("reading", e))?;
        let revision = match txn.open_table(META) {
            Ok(meta) => meta
                .get(REVISION)
                .map_err(|e| backend("reading", e))?
                .map_or(0, |v| v.value()),
            Err(_) => 0,
        };
        let objects = match txn.open_table(OBJECTS) {
            Ok(table) => table.len().map_err(|e| backend("reading", e))?,
            Err(_) => 0,
        };
        Ok((revision, objects))
    })?;
    Ok(Checked {
        path: path.to_path_buf(),
        revision,
        objects,
    })
}

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub from: Checked,
    /// Where the file it replaced now is, if there was one.
    pub kept: Option<PathBuf>,
}

/// Puts a good store in place in `data_dir`: `from`, or the newest backup
/// that passes [`check`]. The file it replaces is renamed
/// `store.redb.damaged-<unix seconds>`, never deleted. Fails if a server has
/// the store open.
pub fn restore(data_dir: &Path, from: Option<&Path>) -> Result<Restored, StoreError> {
    let target = data_dir.join(STORE_FILE);
    // Held until the restored file is in place: no server opens it meanwhile.
    let _lock = lock(&target)?;
    let chosen = match from {
        Some(path) => check(path)?,
        None => {
            let mut refused = Vec::new();
            let good = backups(data_dir)
                .into_iter()
                .find_map(|path| match check(&path) {
                    Ok(checked) => Some(checked),
                    Err(e) => {
                        refused.push(e.to_string());
                        None
                    }
                });
            good.ok_or_else(|| StoreError::NoBackup {
                dir: data_dir.join(BACKUP_DIR),
                refused,
            })?
        }
    };
    let kept = if target.exists() {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = data_dir.join(format!("{STORE_FILE}.damaged-{secs}"));
        std::fs::rename(&target, &aside)
            .map_err(io(format!("moving {} aside", target.display())))?;
        Some(aside)
    } else {
        None
    };
    let partial = data_dir.join(format!("{STORE_FILE}.partial"));
    std::fs::copy(&chosen.path, &partial)
        .map_err(io(format!("copying {}", chosen.path.display())))?;
    std::fs::rename(&partial, &target).map_err(io(format!("renaming to {}", target.display())))?;
    Ok(Restored { from: chosen, kept })
}
