//! The redb file under the store: opened only after it proves intact, and
//! reopened after an I/O failure.
//!
//! This module owns the database handle and what can go wrong with the file
//! itself: damage found at open (an emptied file, zeroed pages, flipped
//! bytes, objects that no longer decode) and write failures such as a full
//! disk. redb latches an I/O failure and fails every later operation until
//! the database is closed, so a failure here is recorded as the store's
//! fault and the next operation reopens the file; writes resume by
//! themselves once the cause is gone. What the tables hold is `lib.rs`'s
//! business; backups and restores are [`crate::backup`]'s.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use vmesh_api::Object;

use crate::StoreError;

pub(crate) const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Server-owned records, out of the config API's reach (see [`crate::Store::record`]).
pub(crate) const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
pub(crate) const REVISION: &str = "revision";
/// redb's page cache: its default (1 GiB) would let a large store's pages
/// fill the server's memory; the OS's page cache sits under this anyway.
const CACHE_BYTES: usize = 32 << 20;

/// Opens (or creates) a redb file with the store's settings.
pub(crate) fn open_database(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
}
/// The store file's name inside the data directory.
pub const STORE_FILE: &str = "store.redb";

/// Converts redb's errors: I/O failures make the store unavailable until
/// reopened, anything else is a backend error with its context.
pub(crate) fn backend(context: &str, error: impl Into<redb::Error>) -> StoreError {
    match error.into() {
        redb::Error::Io(e) => StoreError::Unavailable(e.to_string()),
        redb::Error::PreviousIo | redb::Error::DatabaseClosed => {
            StoreError::Unavailable("an earlier write to the store file failed".into())
        }
        other => StoreError::Backend {
            context: context.into(),
            source: Box::new(other),
        },
    }
}

/// The open database, or none while it waits to be reopened.
pub(crate) struct StoreFile {
    path: PathBuf,
    db: RwLock<Option<Database>>,
    /// Why the last write failed, until one succeeds again.
    fault: Mutex<Option<String>>,
    /// Held while the store is open: one process at a time (see [`lock`]).
    _lock: std::fs::File,
}

/// Takes `<store file>.lock` for this process, so that a second server or a
/// restore on the same directory is refused before it touches the file.
pub(crate) fn lock(path: &Path) -> Result<std::fs::File, StoreError> {
    let lock_path = path.with_extension("redb.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Backend {
            context: format!("opening {}", lock_path.display()),
            source: Box::new(e),
        })?;
    // A lock released a moment ago can still be held by a child the
    // releasing process forked and has not yet exec'd (the child shares
    // the descriptor until then): a busy lock is tried again for a moment
    // before it counts as another process's.
    for attempt in 0..=LOCK_RETRIES {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if attempt < LOCK_RETRIES => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => break,
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Backend {
                    context: format!("locking {}", lock_path.display()),
                    source: Box::new(e),
                });
            }
        }
    }
    Err(StoreError::InUse(path.to_path_buf()))
}

/// How many times a busy lock is tried again, 20 ms apart.
const LOCK_RETRIES: usize = 25;

impl StoreFile {
    /// Opens `path`, creating it when it does not exist, and checks every
    /// page and every object. A damaged file is an error naming the damage,
    /// never a fresh empty store.
    pub(crate) fn open_checked(path: &Path) -> Result<StoreFile, StoreError> {
        let lock = lock(path)?;
        let db = open_verified(path)?;
        Ok(StoreFile {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            fault: Mutex::new(None),
            _lock: lock,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Why writes are failing, if they are.
    pub(crate) fn fault(&self) -> Option<String> {
        self.fault.lock().clone()
    }

    /// Runs `f` on the database, reopening it first if an earlier I/O
    /// failure closed it, and recording the fault if `f` fails on I/O.
    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.db.read().is_none() {
            self.reopen()?;
        }
        let result = {
            let db = self.db.read();
            let db = db
                .as_ref()
                .ok_or_else(|| StoreError::Unavailable("the store file is closed".into()))?;
            f(db)
        };
        if let Err(StoreError::Unavailable(why)) = &result {
            tracing::error!(path = %self.path.display(), "store write failed: {why}; the file will be reopened");
            *self.fault.lock() = Some(why.clone());
            // Closing now frees redb's latched state; the next call reopens.
            self.db.write().take();
        }
        result
    }

    /// Records that a write went through: whatever failed before is over.
    pub(crate) fn wrote(&self) {
        if self.fault.lock().take().is_some() {
            tracing::info!(path = %self.path.display(), "store writes work again");
        }
    }

    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write();
        if slot.is_some() {
            return Ok(());
        }
        match open_database(&self.path) {
            Ok(db) => {
                *slot = Some(db);
                tracing::info!(path = %self.path.display(), "store file reopened");
                Ok(())
            }
            Err(e) => Err(backend("reopening the store file", e)),
        }
    }
}

/// What is wrong with a store file, for [`StoreError::Damaged`].
fn damaged(path: &Path, problem: impl Into<String>) -> StoreError {
    StoreError::Damaged {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// Opens and verifies a store file: not emptied, readable by redb, every
/// page's checksum right, every object decodable. The checks run on a copy,
/// because redb repairs what it can as it opens a file: a store that is
/// refused stays exactly as it was found, for the operator (or a restore) to
/// deal with.
pub(crate) fn open_verified(path: &Path) -> Result<Database, StoreError> {
    if path.exists() {
        check_copy(path, |_| Ok(()))?;
    }
    open_database(path).map_err(|e| backend("opening the store file", e))
}

/// Checks a copy of `path` through (see [`check_file`]) and reads what
/// `read` wants of it, leaving `path` untouched whatever is found.
pub(crate) fn check_copy<T>(
    path: &Path,
    read: impl FnOnce(&Database) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if std::fs::metadata(path).is_ok_and(|meta| meta.len() == 0) {
        return Err(damaged(
            path,
            "the file is empty (0 bytes); a store vmesh wrote never is",
        ));
    }
    let copy = path.with_extension("redb.checking");
    std::fs::copy(path, &copy).map_err(|e| StoreError::Backend {
        context: format!("copying {} to check it", path.display()),
        source: Box::new(e),
    })?;
    let checked = check_file(&copy).and_then(|db| read(&db));
    let _ = std::fs::remove_file(&copy);
    checked.map_err(|e| match e {
        StoreError::Damaged { problem, .. } => damaged(path, problem),
        other => other,
    })
}

/// Opens `path` and checks it through: whatever redb would have to repair
/// is damage. redb may change the file as it opens it: check copies.
fn check_file(path: &Path) -> Result<Database, StoreError> {
    // redb may panic on pages it cannot make sense of; that is damage too.
    let opened = catch_unwind(AssertUnwindSafe(|| -> Result<Database, StoreError> {
        let mut db = open_database(path).map_err(|e| match e {
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(why)) => {
                damaged(path, format!("redb cannot read it: {why}"))
            }
            redb::DatabaseError::Storage(redb::StorageError::Io(e))
                if e.kind() == std::io::ErrorKind::InvalidData =>
            {
                damaged(path, format!("redb cannot read it: {e}"))
            }
            other => backend("opening the store file", other),
        })?;
        match db.check_integrity() {
            Ok(true) => {}
            // redb repairs a bad page by going back to an older commit:
            // acknowledged writes would be gone.
            Ok(false) => {
                return Err(damaged(
                    path,
                    "its pages fail their checksums, and redb could only go back to an earlier state",
                ));
            }
            Err(e) => return Err(damaged(path, format!("its integrity check failed: {e}"))),
        }
        check_contents(&db).map_err(|why| damaged(path, why))?;
        Ok(db)
    }));
    opened.unwrap_or_else(|panic| {
        Err(damaged(
            path,
            format!("redb failed reading it: {}", panic_text(panic.as_ref())),
        ))
    })
}

/// Every stored object decodes and sits under its own key.
fn check_contents(db: &Database) -> Result<(), String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = match txn.open_table(OBJECTS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    for entry in table.iter().map_err(|e| e.to_string())? {
        let (key, value) = entry.map_err(|e| e.to_string())?;
        let key = key.value();
        let object: Object = serde_json::from_slice(value.value())
            .map_err(|e| format!("the object stored at {key:?} does not decode: {e}"))?;
        let own_key = object.key().map(|k| k.storage_key());
        if own_key.as_deref() != Some(key) {
            return Err(format!(
                "the object stored at {key:?} is {} {}",
                object.kind,
                object.display_name()
            ));
        }
    }
    Ok(())
}
