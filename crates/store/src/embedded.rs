//! The embedded backend: objects, records and the revision counter in the
//! tables of one redb file, written by one process.
//!
//! This module owns how the tables are read and a batch is committed; what
//! a write means is [`crate::batch`]'s, the file's health (damage, reopening
//! after an I/O failure) is [`crate::file`]'s.

use std::path::Path;

use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use vmesh_api::{Object, ObjectKey};

use crate::batch::{self, Txn};
use crate::file::{META, OBJECTS, RECORDS, REVISION, STORE_FILE, StoreFile};
use crate::{BatchError, History, Outcome, StoreError};

pub(crate) struct Embedded {
    pub(crate) file: StoreFile,
    /// Held through each write, so that revisions are taken in order.
    writer: Mutex<()>,
}

impl Txn for WriteTransaction {
    fn read(&self, key: &str) -> Result<Option<Object>, StoreError> {
        let table = self.open_table(OBJECTS)?;
        let value = table.get(key)?;
        Ok(match value {
            Some(bytes) => Some(serde_json::from_slice(bytes.value())?),
            None => None,
        })
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.open_table(OBJECTS)?.insert(key, bytes)?;
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.open_table(OBJECTS)?.remove(key)?;
        Ok(())
    }

    fn objects(&self) -> Result<Vec<Object>, StoreError> {
        let table = self.open_table(OBJECTS)?;
        let mut objects = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            objects.push(serde_json::from_slice(value.value())?);
        }
        Ok(objects)
    }
}

/// The revision a read transaction sees.
fn revision_in(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    Ok(txn
        .open_table(META)?
        .get(REVISION)?
        .map_or(0, |v| v.value()))
}

impl Embedded {
    /// Opens (or creates) the store file in `dir`; its revision.
    pub(crate) fn open(dir: &Path) -> Result<(Embedded, u64), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend {
            context: format!("creating {}", dir.display()),
            source: Box::new(e),
        })?;
        let file = StoreFile::open_checked(&dir.join(STORE_FILE))?;
        let revision = file.with(|db| {
            let txn = db.begin_write()?;
            let revision = {
                txn.open_table(OBJECTS)?;
                txn.open_table(RECORDS)?;
                let meta = txn.open_table(META)?;
                meta.get(REVISION)?.map(|v| v.value()).unwrap_or(0)
            };
            txn.commit()?;
            Ok(revision)
        })?;
        let embedded = Embedded {
            file,
            writer: Mutex::new(()),
        };
        Ok((embedded, revision))
    }

    pub(crate) fn fault(&self) -> Option<String> {
        self.file.fault()
    }

    pub(crate) fn check_writable(&self) -> Result<(), StoreError> {
        let _writer = self.writer.lock();
        self.file.with(|db| {
            let txn = db.begin_write()?;
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            txn.open_table(META)?.insert("checked", unix)?;
            txn.commit()?;
            Ok(())
        })?;
        self.file.wrote();
        Ok(())
    }

    pub(crate) fn get(&self, key: &ObjectKey) -> Result<Option<Object>, StoreError> {
        self.file.with(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            match table.get(key.storage_key().as_str())? {
                Some(bytes) => Ok(Some(serde_json::from_slice(bytes.value())?)),
                None => Ok(None),
            }
        })
    }

    pub(crate) fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        mut visit: impl FnMut(&str, Object) -> bool,
    ) -> Result<u64, StoreError> {
        use std::ops::Bound;
        self.file.with(|db| {
            let txn = db.begin_read()?;
            let revision = revision_in(&txn)?;
            let table = txn.open_table(OBJECTS)?;
            let start = match after {
                Some(after) => Bound::Excluded(after),
                None => Bound::Included(prefix),
            };
            for entry in table.range::<&str>((start, Bound::Unbounded))? {
                let (key, value) = entry?;
                let key = key.value();
                if !key.starts_with(prefix) || !visit(key, serde_json::from_slice(value.value())?) {
                    break;
                }
            }
            Ok(revision)
        })
    }

    pub(crate) fn write_batch(
        &self,
        ops: Vec<crate::Op>,
        dry_run: bool,
        history: &History,
    ) -> Result<Vec<Outcome>, BatchError> {
        let _writer = self.writer.lock();
        // The index of the op that failed, when one did.
        let mut failed_at = 0;
        let applied = self
            .file
            .with(|db| {
                let txn = db.begin_write()?;
                let applied =
                    batch::apply(&txn, ops, history.revision(), dry_run).map_err(|e| {
                        failed_at = e.index;
                        e.error
                    })?;
                if dry_run {
                    txn.abort()?;
                } else {
                    txn.open_table(META)?.insert(REVISION, applied.revision)?;
                    txn.commit()?;
                }
                Ok(applied)
            })
            .map_err(|error| BatchError {
                index: failed_at,
                error,
            })?;
        if !dry_run {
            self.file.wrote();
            history.extend(applied.revision, applied.events);
        }
        Ok(applied.outcomes)
    }

    pub(crate) fn record(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.file.with(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(RECORDS)?;
            Ok(table.get(name)?.map(|v| v.value().to_vec()))
        })
    }

    pub(crate) fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.file.with(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(RECORDS)?;
            let mut found = Vec::new();
            for entry in table.range(prefix..)? {
                let (name, value) = entry?;
                if !name.value().starts_with(prefix) {
                    break;
                }
                found.push((name.value().to_string(), value.value().to_vec()));
            }
            Ok(found)
        })
    }

    pub(crate) fn snapshot(&self, out: &mut dyn std::io::Write) -> Result<u64, StoreError> {
        self.file.with(|db| {
            let txn = db.begin_read()?;
            let revision = revision_in(&txn)?;
            let mut objects = Vec::new();
            for entry in txn.open_table(OBJECTS)?.iter()? {
                let (_, value) = entry?;
                objects.push(serde_json::from_slice(value.value())?);
            }
            let mut records = Vec::new();
            for entry in txn.open_table(RECORDS)?.iter()? {
                let (name, value) = entry?;
                records.push((name.value().to_string(), value.value().to_vec()));
            }
            crate::snapshot::write(out, revision, objects, records)?;
            Ok(revision)
        })
    }

    /// Writes a snapshot's contents into a new store file in `dir`; one
    /// that is there already is refused.
    pub(crate) fn import(
        dir: &Path,
        contents: &crate::snapshot::Contents,
    ) -> Result<(), StoreError> {
        let path = dir.join(STORE_FILE);
        if path.exists() {
            return Err(StoreError::Unsupported(
                "the data directory holds a store already: restore into an empty one (or use vmesh store restore for the server's own backups)",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend {
            context: format!("creating {}", dir.display()),
            source: Box::new(e),
        })?;
        let _lock = crate::file::lock(&path)?;
        let db = crate::file::open_database(&path)
            .map_err(|e| crate::file::backend("creating the store file", e))?;
        let txn = db.begin_write()?;
        {
            let mut objects = txn.open_table(OBJECTS)?;
            for object in &contents.objects {
                let key = crate::batch::key_of(object)?.storage_key();
                objects.insert(key.as_str(), serde_json::to_vec(object)?.as_slice())?;
            }
            let mut records = txn.open_table(RECORDS)?;
            for (name, value) in &contents.records {
                records.insert(name.as_str(), value.as_slice())?;
            }
            txn.open_table(META)?.insert(REVISION, contents.revision)?;
        }
        txn.commit()?;
        Ok(())
    }

    pub(crate) fn swap_record(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let _writer = self.writer.lock();
        let swapped = self.file.with(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(RECORDS)?;
                let current = table.get(name)?.map(|v| v.value().to_vec());
                if current.as_deref() != expected {
                    return Ok(false);
                }
                match &new {
                    Some(bytes) => table.insert(name, bytes.as_slice())?,
                    None => table.remove(name)?,
                };
            }
            txn.commit()?;
            Ok(true)
        })?;
        self.file.wrote();
        Ok(swapped)
    }

    pub(crate) fn write_records(
        &self,
        writes: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), StoreError> {
        let _writer = self.writer.lock();
        self.file.with(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(RECORDS)?;
                for (name, value) in &writes {
                    match value {
                        Some(bytes) => table.insert(name.as_str(), bytes.as_slice())?,
                        None => table.remove(name.as_str())?,
                    };
                }
            }
            txn.commit()?;
            Ok(())
        })?;
        self.file.wrote();
        Ok(())
    }
}
