//! The config store: every object vmesh serves, versioned, in an embedded redb
//! database, with an ordered stream of changes.
//!
//! The store owns persistence, resource versions, namespaces' existence and
//! the change history watches replay from. It does not decode or validate
//! objects (the `api` crate does) and knows nothing about HTTP.
//!
//! Every change gets the next revision of one global counter, like etcd: an
//! object's `resourceVersion` is the revision that last wrote it, and a watch
//! from revision N sees every later change exactly once, in order.

#![forbid(unsafe_code)]

pub mod backup;
mod file;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use vmesh_api::{Object, ObjectKey};

pub use file::STORE_FILE;
use file::{META, OBJECTS, RECORDS, REVISION, StoreFile};
/// Changes kept in memory for watches and controllers to read from, at most
/// this many…
const HISTORY: usize = 16_384;
/// …holding objects of at most this many bytes (encoded) together. A
/// reader that falls further behind is told it missed changes (a watch gets
/// 410 Gone and lists again), and holds nothing meanwhile.
pub const HISTORY_BYTES: usize = 64 << 20;
/// Namespaces that always exist: `default` and the mesh root namespace.
pub const BUILTIN_NAMESPACES: &[&str] = &["default", "istio-system"];

/// The largest object the store keeps, encoded: Kubernetes' limit (etcd's
/// default request size), so that what fits here fits there, and one
/// object cannot cost the server memory out of all proportion.
pub const MAX_OBJECT_BYTES: usize = 1_572_864;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{} {:?} not found", .0.resource(), .0.name)]
    NotFound(Box<ObjectKey>),
    #[error("{} {:?} already exists", .0.resource(), .0.name)]
    AlreadyExists(Box<ObjectKey>),
    #[error("the object has been modified: {} {:?} is at resourceVersion {actual}, not {expected}", key.resource(), key.name)]
    Conflict {
        key: Box<ObjectKey>,
        expected: String,
        actual: u64,
    },
    #[error("namespace {0:?} not found (create it first: vmesh create namespace {0})")]
    NamespaceNotFound(String),
    #[error("namespace {0:?} cannot be deleted")]
    ProtectedNamespace(String),
    #[error("namespace {0:?} is being deleted: nothing new can be created in it")]
    NamespaceTerminating(String),
    #[error("object has no registered kind: {0}")]
    UnknownKind(String),
    #[error("resourceVersion {0} is too old to watch from; list again")]
    Gone(u64),
    #[error("invalid resourceVersion {0:?}")]
    BadResourceVersion(String),
    #[error("{name}: {field} cannot change: the object is immutable (delete and recreate it)")]
    Immutable { name: String, field: &'static str },
    #[error("{name} is {size} bytes encoded; the limit is {MAX_OBJECT_BYTES}")]
    TooLarge { name: String, size: usize },
    #[error("store: {context}: {source}")]
    Backend {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The file cannot be written (a full disk, an I/O error). The store
    /// reopens it at the next operation, so this lasts as long as its cause.
    #[error("the store cannot write its file: {0}")]
    Unavailable(String),
    #[error(
        "the store {} is damaged: {problem}. The server will not run on it. Restore the newest \
         good backup with: vmesh store restore --data-dir {} (the damaged file is kept beside it)",
        path.display(),
        path.parent().map_or_else(|| ".".into(), |p| p.display().to_string())
    )]
    Damaged { path: PathBuf, problem: String },
    #[error("{} is open in a running server: stop it first", .0.display())]
    InUse(PathBuf),
    #[error(
        "no good backup in {}{}: move the damaged store aside to start an empty mesh, then apply your configuration again",
        dir.display(),
        if refused.is_empty() { String::new() } else { format!(" ({})", refused.join("; ")) }
    )]
    NoBackup { dir: PathBuf, refused: Vec<String> },
}

macro_rules! backend_errors {
    ($($t:ty => $context:literal),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                file::backend($context, e)
            }
        }
    )*};
}
backend_errors!(
    redb::TransactionError => "starting a transaction",
    redb::TableError => "opening a table",
    redb::StorageError => "reading or writing the database",
    redb::CommitError => "committing a transaction"
);

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Backend {
            context: "encoding or decoding a stored object".into(),
            source: Box::new(e),
        }
    }
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    /// The name Kubernetes watches use.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches deliver it. Cheap to clone: every reader shares
/// the one object.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub event_type: EventType,
    pub object: Arc<Object>,
    pub revision: u64,
    key: ObjectKey,
    /// The object's encoded size, for the history's byte bound.
    size: usize,
}

impl WatchEvent {
    fn new(
        event_type: EventType,
        object: Object,
        revision: u64,
        key: ObjectKey,
        size: usize,
    ) -> Self {
        WatchEvent {
            event_type,
            object: Arc::new(object),
            revision,
            key,
            size,
        }
    }
}

/// One write in a batch.
#[derive(Debug, Clone)]
pub enum Op {
    /// Create; fails if the object exists.
    Create(Object),
    /// Replace an existing object; fails on a resourceVersion mismatch when the
    /// object carries one.
    Update(Object),
    /// Create or update, as `vmesh apply` does; unchanged content writes nothing.
    Apply(Object),
    /// Replace only the status of an existing object (the server's own
    /// record of it, which other writes never change).
    SetStatus(Object),
    /// Delete; `expected` resourceVersion guards against deleting a newer object.
    Delete {
        key: ObjectKey,
        expected: Option<String>,
    },
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Created(Object),
    Configured(Object),
    Unchanged(Object),
    Deleted(Object),
}

impl Outcome {
    pub fn object(&self) -> &Object {
        match self {
            Outcome::Created(o)
            | Outcome::Configured(o)
            | Outcome::Unchanged(o)
            | Outcome::Deleted(o) => o,
        }
    }

    /// kubectl's word for it.
    pub fn verb(&self) -> &'static str {
        match self {
            Outcome::Created(_) => "created",
            Outcome::Configured(_) => "configured",
            Outcome::Unchanged(_) => "unchanged",
            Outcome::Deleted(_) => "deleted",
        }
    }
}

/// A batch failed at one op; nothing in the batch was written.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct BatchError {
    pub index: usize,
    pub error: StoreError,
}

/// Which objects a list or watch covers.
#[derive(Debug, Clone)]
pub struct Selection {
    /// `group/plural` (`core/services`).
    pub collection: String,
    /// `None` for every namespace.
    pub namespace: Option<String>,
}

impl Selection {
    /// The objects of one kind, in one namespace or (`None`) all.
    pub fn of_kind(info: &vmesh_api::KindInfo, namespace: Option<String>) -> Selection {
        Selection {
            collection: vmesh_api::object::collection(info.group, info.plural),
            namespace,
        }
    }

    fn matches(&self, key: &ObjectKey) -> bool {
        key.collection_prefix() == self.collection
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| ns == &key.namespace)
    }

    /// Whether a storage key (a list's continue point) is in this selection.
    pub fn holds_key(&self, key: &str) -> bool {
        key.starts_with(&self.prefix())
    }

    fn prefix(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/", self.collection),
            None => format!("{}/", self.collection),
        }
    }
}

struct State {
    revision: u64,
    /// Recent events, oldest first, for watches and controllers.
    history: VecDeque<WatchEvent>,
    /// The encoded size of the objects in `history`.
    history_bytes: usize,
    /// The revision before the oldest event still in `history`.
    history_floor: u64,
}

impl State {
    fn remember(&mut self, event: WatchEvent) {
        self.history_bytes += event.size;
        self.history.push_back(event);
        while self.history.len() > HISTORY || self.history_bytes > HISTORY_BYTES {
            let Some(dropped) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= dropped.size;
            self.history_floor = dropped.revision;
        }
    }
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    file: StoreFile,
    state: Arc<Mutex<State>>,
    /// The latest revision, for readers of the history waiting for more.
    revisions: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("revision", &self.state.lock().revision)
            .finish()
    }
}

/// A reader's place in the change history: the events after it, in order,
/// one at a time. It holds no events itself, so a reader that stops reading
/// costs nothing; one that falls behind what the history keeps is told so.
pub struct Changes {
    state: Arc<Mutex<State>>,
    revisions: tokio::sync::watch::Receiver<u64>,
    cursor: u64,
    selection: Option<Selection>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes")
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

/// The reader fell behind: the changes after its place are no longer kept.
/// It now stands at the latest revision; whatever it keeps from the store
/// must be read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("changes after revision {after} are no longer kept; list again")]
pub struct Missed {
    pub after: u64,
}

impl Changes {
    /// The next change (in this reader's selection, if it has one).
    pub async fn next(&mut self) -> Result<WatchEvent, Missed> {
        loop {
            // Marked seen before the history is read: a commit after this
            // point wakes the wait below.
            self.revisions.borrow_and_update();
            {
                let state = self.state.lock();
                if self.cursor < state.history_floor {
                    let missed = Missed { after: self.cursor };
                    self.cursor = state.revision;
                    return Err(missed);
                }
                let first = state.history.partition_point(|e| e.revision <= self.cursor);
                for event in state.history.range(first..) {
                    self.cursor = event.revision;
                    if self
                        .selection
                        .as_ref()
                        .is_none_or(|s| s.matches(&event.key))
                    {
                        return Ok(event.clone());
                    }
                }
            }
            if self.revisions.changed().await.is_err() {
                // The store is gone; nothing will change any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Skips every change up to `revision`: a reader that has just listed a
    /// snapshot of that revision has seen them.
    pub fn skip_to(&mut self, revision: u64) {
        self.cursor = self.cursor.max(revision);
    }

    /// The revision this reader has read up to.
    pub fn revision(&self) -> u64 {
        self.cursor
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn key_of(object: &Object) -> Result<ObjectKey, StoreError> {
    object
        .key()
        .ok_or_else(|| StoreError::UnknownKind(format!("{} {}", object.api_version, object.kind)))
}

fn namespace_key(name: &str) -> String {
    ObjectKey {
        group: String::new(),
        plural: "namespaces".into(),
        namespace: String::new(),
        name: name.into(),
    }
    .storage_key()
}

fn parse_rv(rv: &str) -> Result<u64, StoreError> {
    rv.parse()
        .map_err(|_| StoreError::BadResourceVersion(rv.to_string()))
}

impl Store {
    /// Opens (or creates) the store in `dir`, creating the built-in
    /// namespaces. A damaged store file is [`StoreError::Damaged`], never
    /// replaced by an empty one.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
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
        let store = Store {
            file,
            state: Arc::new(Mutex::new(State {
                revision,
                history: VecDeque::new(),
                history_bytes: 0,
                history_floor: revision,
            })),
            revisions: tokio::sync::watch::Sender::new(revision),
        };
        let builtins = BUILTIN_NAMESPACES.iter().map(|ns| {
            Op::Apply(Object {
                api_version: "v1".into(),
                kind: "Namespace".into(),
                metadata: vmesh_api::ObjectMeta {
                    name: Some(ns.to_string()),
                    ..Default::default()
                },
                body: Default::default(),
            })
        });
        let existing = store.list(&Selection {
            collection: "core/namespaces".into(),
            namespace: None,
        })?;
        let missing: Vec<Op> = builtins
            .filter(|op| match op {
                Op::Apply(o) => !existing
                    .0
                    .iter()
                    .any(|e| e.metadata.name == o.metadata.name),
                _ => false,
            })
            .collect();
        if !missing.is_empty() {
            store.commit(missing).map_err(|e| e.error)?;
        }
        Ok(store)
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.state.lock().revision
    }

    /// Why writes fail, while they do (a full disk): the server reports it
    /// as not ready.
    pub fn fault(&self) -> Option<String> {
        self.file.fault()
    }

    /// Tries a write that changes nothing a reader sees, so that a store
    /// whose writes failed finds out when they work again.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        let _state = self.state.lock();
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

    pub fn get(&self, key: &ObjectKey) -> Result<Option<Object>, StoreError> {
        self.file.with(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            match table.get(key.storage_key().as_str())? {
                Some(bytes) => Ok(Some(serde_json::from_slice(bytes.value())?)),
                None => Ok(None),
            }
        })
    }

    /// Objects in a selection, sorted by namespace and name, with the revision they were read at.
    pub fn list(&self, selection: &Selection) -> Result<(Vec<Object>, u64), StoreError> {
        let revision = self.revision();
        Ok((self.read_selection(selection)?, revision))
    }

    fn read_selection(&self, selection: &Selection) -> Result<Vec<Object>, StoreError> {
        self.file.with(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            let prefix = selection.prefix();
            let mut objects = Vec::new();
            for entry in table.range(prefix.as_str()..)? {
                let (key, value) = entry?;
                if !key.value().starts_with(&prefix) {
                    break;
                }
                objects.push(serde_json::from_slice(value.value())?);
            }
            Ok(objects)
        })
    }

    /// Visits the objects of `selection` in key order, all from one
    /// snapshot, starting after the storage key `after`, until `visit`
    /// returns false. Nothing but the object in hand is held in memory, so
    /// a list of any size costs what one object does. Returns the
    /// snapshot's revision.
    pub fn scan(
        &self,
        selection: &Selection,
        after: Option<&str>,
        mut visit: impl FnMut(&str, Object) -> bool,
    ) -> Result<u64, StoreError> {
        use std::ops::Bound;
        self.file.with(|db| {
            let txn = db.begin_read()?;
            let revision = txn
                .open_table(META)?
                .get(REVISION)?
                .map_or(0, |v| v.value());
            let table = txn.open_table(OBJECTS)?;
            let prefix = selection.prefix();
            let start = match after {
                Some(after) => Bound::Excluded(after),
                None => Bound::Included(prefix.as_str()),
            };
            for entry in table.range::<&str>((start, Bound::Unbounded))? {
                let (key, value) = entry?;
                let key = key.value();
                if !key.starts_with(&prefix) || !visit(key, serde_json::from_slice(value.value())?)
                {
                    break;
                }
            }
            Ok(revision)
        })
    }

    /// Applies a batch of writes atomically: all of them, or none and the error
    /// of the first that failed.
    pub fn commit(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, BatchError> {
        self.write_batch(ops, false)
    }

    /// What [`Store::commit`] would answer, every check made, with nothing
    /// written (Kubernetes' `dryRun=All`): as in Kubernetes, the objects keep
    /// the resourceVersion they have (none for one that would be created).
    pub fn dry_run(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, BatchError> {
        self.write_batch(ops, true)
    }

    fn write_batch(&self, ops: Vec<Op>, dry_run: bool) -> Result<Vec<Outcome>, BatchError> {
        let mut state = self.state.lock();
        let count = ops.len();
        // The index of the op that failed, when one did.
        let mut failed_at = 0;
        let written = self.file.with(|db| {
            let txn = db.begin_write()?;
            let mut revision = state.revision;
            let mut outcomes: Vec<Option<Outcome>> = vec![None; count];
            let mut events = Vec::new();
            // Namespaces are written first, so a batch may create a namespace and
            // objects in it in any order.
            let versions_before: Vec<Option<String>> = if dry_run {
                ops.iter()
                    .map(|op| {
                        let key = match op {
                            Op::Delete { key, .. } => Some(key.clone()),
                            Op::Create(o) | Op::Update(o) | Op::Apply(o) | Op::SetStatus(o) => {
                                o.key()
                            }
                        };
                        key.and_then(|k| read(&txn, &k.storage_key()).ok().flatten())
                            .and_then(|o| o.metadata.resource_version)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let mut ordered: Vec<(usize, Op)> = ops.into_iter().enumerate().collect();
            ordered.sort_by_key(|(_, op)| !creates_namespace(op));
            for (index, op) in ordered {
                failed_at = index;
                outcomes[index] = Some(write_one(&txn, op, &mut revision, &mut events)?);
            }
            failed_at = 0;
            if dry_run {
                txn.abort()?;
                for (outcome, version) in outcomes.iter_mut().flatten().zip(versions_before) {
                    if let Outcome::Created(o) | Outcome::Configured(o) = outcome {
                        o.metadata.resource_version = version;
                    }
                }
                return Ok((revision, outcomes, Vec::new()));
            }
            txn.open_table(META)?.insert(REVISION, revision)?;
            txn.commit()?;
            Ok((revision, outcomes, events))
        });
        let (revision, outcomes, events) = written.map_err(|error| BatchError {
            index: failed_at,
            error,
        })?;
        if dry_run {
            return Ok(outcomes.into_iter().flatten().collect());
        }
        self.file.wrote();
        state.revision = revision;
        for event in events {
            state.remember(event);
        }
        drop(state);
        self.revisions.send_replace(revision);
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// A server-owned record: state of the server's own (token revocations,
    /// join records) kept in the store's file but apart from the objects, so
    /// that nothing of the config API (no list, watch, write or namespace
    /// deletion) can read or change it.
    pub fn record(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.file.with(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(RECORDS)?;
            Ok(table.get(name)?.map(|v| v.value().to_vec()))
        })
    }

    /// The records whose names start with `prefix`, in name order.
    pub fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
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

    /// Writes (`Some`) and deletes (`None`) records, all or none.
    pub fn write_records(&self, writes: Vec<(String, Option<Vec<u8>>)>) -> Result<(), StoreError> {
        let _state = self.state.lock();
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

    /// Every future change of any object, for controllers that react to all of them.
    pub fn changes(&self) -> Changes {
        Changes {
            state: self.state.clone(),
            revisions: self.revisions.subscribe(),
            cursor: self.state.lock().revision,
            selection: None,
        }
    }

    /// The changes of a selection: from `from` (a resource version: every
    /// change after it, or [`StoreError::Gone`] if those are no longer
    /// kept), or with none from now, for a watcher that lists first
    /// ([`Store::scan`]) and then [`Changes::skip_to`] the revision it listed.
    pub fn watch(&self, selection: Selection, from: Option<&str>) -> Result<Changes, StoreError> {
        let state = self.state.lock();
        let cursor = match from.filter(|rv| !rv.is_empty() && *rv != "0") {
            None => state.revision,
            Some(rv) => {
                let from = parse_rv(rv)?;
                if from < state.history_floor {
                    return Err(StoreError::Gone(from));
                }
                from
            }
        };
        Ok(Changes {
            state: self.state.clone(),
            revisions: self.revisions.subscribe(),
            cursor,
            selection: Some(selection),
        })
    }
}

fn creates_namespace(op: &Op) -> bool {
    match op {
        Op::Create(o) | Op::Update(o) | Op::Apply(o) => {
            o.kind == "Namespace" && o.api_version == "v1"
        }
        Op::SetStatus(_) | Op::Delete { .. } => false,
    }
}

fn read(txn: &WriteTransaction, key: &str) -> Result<Option<Object>, StoreError> {
    let table = txn.open_table(OBJECTS)?;
    let value = table.get(key)?;
    Ok(match value {
        Some(bytes) => Some(serde_json::from_slice(bytes.value())?),
        None => None,
    })
}

/// Writes `object` under `key`; its encoded size.
fn write(txn: &WriteTransaction, key: &str, object: &Object) -> Result<usize, StoreError> {
    let bytes = serde_json::to_vec(object)?;
    if bytes.len() > MAX_OBJECT_BYTES {
        return Err(StoreError::TooLarge {
            name: object.display_name(),
            size: bytes.len(),
        });
    }
    txn.open_table(OBJECTS)?.insert(key, bytes.as_slice())?;
    Ok(bytes.len())
}

fn remove(
    txn: &WriteTransaction,
    key: &ObjectKey,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<Object, StoreError> {
    let storage_key = key.storage_key();
    let mut object =
        read(txn, &storage_key)?.ok_or_else(|| StoreError::NotFound(Box::new(key.clone())))?;
    txn.open_table(OBJECTS)?.remove(storage_key.as_str())?;
    *revision += 1;
    object.metadata.resource_version = Some(revision.to_string());
    let size = serde_json::to_vec(&object).map_or(0, |bytes| bytes.len());
    events.push(WatchEvent::new(
        EventType::Deleted,
        object.clone(),
        *revision,
        key.clone(),
        size,
    ));
    Ok(object)
}

fn write_one(
    txn: &WriteTransaction,
    op: Op,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<Outcome, StoreError> {
    let (mut object, mode) = match op {
        Op::Delete { key, expected } => {
            if key.group.is_empty()
                && key.plural == "namespaces"
                && BUILTIN_NAMESPACES.contains(&key.name.as_str())
            {
                return Err(StoreError::ProtectedNamespace(key.name));
            }
            let current = read(txn, &key.storage_key())?
                .ok_or_else(|| StoreError::NotFound(Box::new(key.clone())))?;
            check_version(&key, &current, expected)?;
            let is_namespace = key.group.is_empty() && key.plural == "namespaces";
            let mut finalized = has_finalizers(&current);
            if is_namespace {
                finalized |= delete_namespace_contents(txn, &key.name, revision, events)?;
            }
            // Finalizers hold the object (and a namespace holding such
            // objects) until whoever set them removes them: it is only
            // marked as being deleted.
            if finalized {
                return mark_deleting(txn, current, &key, revision, events);
            }
            let deleted = remove(txn, &key, revision, events)?;
            return Ok(Outcome::Deleted(deleted));
        }
        Op::SetStatus(object) => return set_status(txn, object, revision, events),
        Op::Create(o) => (o, Mode::Create),
        Op::Update(o) => (o, Mode::Update),
        Op::Apply(o) => (o, Mode::Apply),
    };
    let key = key_of(&object)?;
    let storage_key = key.storage_key();
    let existing = read(txn, &storage_key)?;
    if !key.namespace.is_empty() {
        match read(txn, &namespace_key(&key.namespace))? {
            None => return Err(StoreError::NamespaceNotFound(key.namespace)),
            Some(namespace) if existing.is_none() && is_deleting(&namespace) => {
                return Err(StoreError::NamespaceTerminating(key.namespace));
            }
            Some(_) => {}
        }
    }
    // Only a delete marks an object as being deleted; the mark stays.
    object.metadata.deletion_timestamp = existing
        .as_ref()
        .and_then(|current| current.metadata.deletion_timestamp.clone());
    // A writer that keeps no field ownership (vmesh apply, a config dir)
    // leaves that of the others as it is.
    if object.metadata.managed_fields.is_none()
        && let Some(current) = &existing
    {
        object.metadata.managed_fields = current.metadata.managed_fields.clone();
    }
    if let Some(current) = &existing
        && is_deleting(current)
        && !has_finalizers(&object)
    {
        // The last finalizer is gone: the delete completes.
        check_version(&key, current, object.metadata.resource_version.take())?;
        let deleted = remove(txn, &key, revision, events)?;
        finish_namespace_if_empty(txn, &key.namespace, revision, events)?;
        return Ok(Outcome::Deleted(deleted));
    }
    let expected = object.metadata.resource_version.take();
    // Status belongs to the server: a write of the object never changes it.
    object.body.remove("status");
    let outcome = match existing {
        None if mode == Mode::Update => return Err(StoreError::NotFound(Box::new(key))),
        Some(_) if mode == Mode::Create => return Err(StoreError::AlreadyExists(Box::new(key))),
        None => {
            *revision += 1;
            let meta = &mut object.metadata;
            meta.uid = Some(uuid::Uuid::new_v4().to_string());
            meta.creation_timestamp = Some(now_rfc3339());
            meta.generation = Some(1);
            meta.resource_version = Some(revision.to_string());
            let size = write(txn, &storage_key, &object)?;
            events.push(WatchEvent::new(
                EventType::Added,
                object.clone(),
                *revision,
                key,
                size,
            ));
            Outcome::Created(object)
        }
        Some(current) => {
            check_version(&key, &current, expected)?;
            if let Some(status) = current.body.get("status") {
                object.body.insert("status".into(), status.clone());
            }
            if object.same_content(&current) {
                return Ok(Outcome::Unchanged(current));
            }
            check_immutable(&current, &object)?;
            *revision += 1;
            let spec_changed = {
                let strip = |o: &Object| {
                    let mut b = o.body.clone();
                    b.remove("status");
                    b
                };
                strip(&object) != strip(&current)
            };
            let meta = &mut object.metadata;
            meta.uid = current.metadata.uid.clone();
            meta.creation_timestamp = current.metadata.creation_timestamp.clone();
            meta.generation =
                Some(current.metadata.generation.unwrap_or(1) + i64::from(spec_changed));
            meta.resource_version = Some(revision.to_string());
            let size = write(txn, &storage_key, &object)?;
            events.push(WatchEvent::new(
                EventType::Modified,
                object.clone(),
                *revision,
                key,
                size,
            ));
            Outcome::Configured(object)
        }
    };
    Ok(outcome)
}

fn set_status(
    txn: &WriteTransaction,
    object: Object,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<Outcome, StoreError> {
    let key = key_of(&object)?;
    let storage_key = key.storage_key();
    let current =
        read(txn, &storage_key)?.ok_or_else(|| StoreError::NotFound(Box::new(key.clone())))?;
    let mut updated = current.clone();
    match object.body.get("status") {
        Some(status) => updated.body.insert("status".into(), status.clone()),
        None => updated.body.remove("status"),
    };
    if updated.body == current.body {
        return Ok(Outcome::Unchanged(current));
    }
    *revision += 1;
    updated.metadata.resource_version = Some(revision.to_string());
    let size = write(txn, &storage_key, &updated)?;
    events.push(WatchEvent::new(
        EventType::Modified,
        updated.clone(),
        *revision,
        key,
        size,
    ));
    Ok(Outcome::Configured(updated))
}

/// A ConfigMap or Secret marked `immutable: true` keeps its data (and the
/// mark) until it is deleted, as in Kubernetes.
fn check_immutable(current: &Object, update: &Object) -> Result<(), StoreError> {
    if !matches!(current.kind.as_str(), "ConfigMap" | "Secret")
        || current.body.get("immutable") != Some(&serde_json::Value::Bool(true))
    {
        return Ok(());
    }
    for field in ["immutable", "data", "binaryData", "stringData"] {
        if current.body.get(field) != update.body.get(field) {
            return Err(StoreError::Immutable {
                name: current.display_name(),
                field,
            });
        }
    }
    Ok(())
}

/// A write that names a resourceVersion must name the current one.
fn check_version(
    key: &ObjectKey,
    current: &Object,
    expected: Option<String>,
) -> Result<(), StoreError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let actual = current
        .metadata
        .resource_version
        .as_deref()
        .map(parse_rv)
        .transpose()?
        .unwrap_or(0);
    if parse_rv(&expected)? != actual {
        return Err(StoreError::Conflict {
            key: Box::new(key.clone()),
            expected,
            actual,
        });
    }
    Ok(())
}

#[derive(PartialEq)]
enum Mode {
    Create,
    Update,
    Apply,
}

/// Deleting a namespace deletes everything in it, as Kubernetes does.
fn has_finalizers(object: &Object) -> bool {
    object
        .metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| !f.is_empty())
}

fn is_deleting(object: &Object) -> bool {
    object.metadata.deletion_timestamp.is_some()
}

/// Marks `current` as being deleted (its `deletionTimestamp`), once.
fn mark_deleting(
    txn: &WriteTransaction,
    mut current: Object,
    key: &ObjectKey,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<Outcome, StoreError> {
    if is_deleting(&current) {
        return Ok(Outcome::Unchanged(current));
    }
    *revision += 1;
    current.metadata.deletion_timestamp = Some(now_rfc3339());
    current.metadata.resource_version = Some(revision.to_string());
    let size = write(txn, &key.storage_key(), &current)?;
    events.push(WatchEvent::new(
        EventType::Modified,
        current.clone(),
        *revision,
        key.clone(),
        size,
    ));
    Ok(Outcome::Configured(current))
}

/// Deletes a namespace's objects, but marks those with finalizers as being
/// deleted instead; true when any of them is left.
fn delete_namespace_contents(
    txn: &WriteTransaction,
    namespace: &str,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<bool, StoreError> {
    let mut doomed: BTreeMap<String, (ObjectKey, Object)> = BTreeMap::new();
    {
        let table = txn.open_table(OBJECTS)?;
        for entry in table.iter()? {
            let (_, value) = entry?;
            let object: Object = serde_json::from_slice(value.value())?;
            let key = key_of(&object)?;
            if key.namespace == namespace {
                doomed.insert(key.storage_key(), (key, object));
            }
        }
    }
    let mut held = false;
    for (key, object) in doomed.into_values() {
        if has_finalizers(&object) {
            held = true;
            mark_deleting(txn, object, &key, revision, events)?;
        } else {
            remove(txn, &key, revision, events)?;
        }
    }
    Ok(held)
}

/// Removes a namespace being deleted once nothing is left in it.
fn finish_namespace_if_empty(
    txn: &WriteTransaction,
    namespace: &str,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<(), StoreError> {
    if namespace.is_empty() {
        return Ok(());
    }
    let namespace_storage_key = namespace_key(namespace);
    let Some(current) = read(txn, &namespace_storage_key)? else {
        return Ok(());
    };
    if !is_deleting(&current) || has_finalizers(&current) {
        return Ok(());
    }
    {
        let table = txn.open_table(OBJECTS)?;
        for entry in table.iter()? {
            let (_, value) = entry?;
            let object: Object = serde_json::from_slice(value.value())?;
            if object.metadata.namespace.as_deref() == Some(namespace) {
                return Ok(());
            }
        }
    }
    let key = key_of(&current)?;
    remove(txn, &key, revision, events)?;
    Ok(())
}

#[cfg(test)]
mod tests;
