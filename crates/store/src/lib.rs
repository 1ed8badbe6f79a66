//! The config store: every object vmesh serves, versioned, with an ordered
//! stream of changes, in an embedded redb database (one server) or in etcd
//! (several servers, one mesh).
//!
//! The store owns persistence, resource versions, namespaces' existence and
//! the change history watches replay from. It does not decode or validate
//! objects (the `api` crate does) and knows nothing about HTTP. What a write
//! means is `batch.rs`, the same on both backends; `embedded.rs` and
//! `etcd.rs` only keep and commit.
//!
//! Every change gets the next revision of one global counter, like etcd: an
//! object's `resourceVersion` is the revision that last wrote it, and a watch
//! from revision N sees every later change exactly once, in order. On etcd
//! the counter is a key every commit compares and moves, so every server
//! numbers changes alike.

#![forbid(unsafe_code)]

pub mod backup;
mod batch;
mod embedded;
mod etcd;
mod file;
pub mod snapshot;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use vmesh_api::{Object, ObjectKey};

pub use etcd::{EtcdConfig, EtcdTls, StoreLocation};
pub use file::STORE_FILE;

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
    #[error("{0}")]
    Unsupported(&'static str),
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

/// The changes this process knows of, in revision order, and the latest
/// revision, for readers waiting for more. The embedded backend adds its
/// own commits; the etcd backend adds every server's, as etcd delivers them.
pub(crate) struct History {
    state: Mutex<State>,
    revisions: tokio::sync::watch::Sender<u64>,
}

impl History {
    fn new(revision: u64) -> History {
        History {
            state: Mutex::new(State {
                revision,
                history: VecDeque::new(),
                history_bytes: 0,
                history_floor: revision,
            }),
            revisions: tokio::sync::watch::Sender::new(revision),
        }
    }

    pub(crate) fn revision(&self) -> u64 {
        self.state.lock().revision
    }

    /// Adds the changes up to `revision`. Changes at or below the latest
    /// revision are known already and skipped; a gap before the first new
    /// one (a follower of another server's changes that fell too far
    /// behind) tells every reader still before it that it missed changes.
    pub(crate) fn extend(&self, revision: u64, events: Vec<WatchEvent>) {
        let mut state = self.state.lock();
        if revision <= state.revision {
            return;
        }
        let known = state.revision;
        let mut events = events.into_iter().filter(|e| e.revision > known).peekable();
        if let Some(first) = events.peek()
            && first.revision > known + 1
        {
            state.history.clear();
            state.history_bytes = 0;
            state.history_floor = first.revision - 1;
        }
        for event in events {
            state.remember(event);
        }
        state.revision = revision;
        drop(state);
        self.revisions.send_replace(revision);
    }

    /// Waits (up to `limit`) until the history holds `revision`.
    pub(crate) async fn reached(&self, revision: u64, limit: std::time::Duration) -> bool {
        let mut revisions = self.revisions.subscribe();
        tokio::time::timeout(limit, revisions.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Where the objects live.
enum Backend {
    Embedded(embedded::Embedded),
    Etcd(Box<etcd::Etcd>),
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    backend: Backend,
    history: Arc<History>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("revision", &self.history.revision())
            .finish()
    }
}

/// A reader's place in the change history: the events after it, in order,
/// one at a time. It holds no events itself, so a reader that stops reading
/// costs nothing; one that falls behind what the history keeps is told so.
pub struct Changes {
    history: Arc<History>,
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
                let state = self.history.state.lock();
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

pub(crate) fn parse_rv(rv: &str) -> Result<u64, StoreError> {
    rv.parse()
        .map_err(|_| StoreError::BadResourceVersion(rv.to_string()))
}

impl Store {
    /// Opens (or creates) the embedded store in `dir`, creating the
    /// built-in namespaces. A damaged store file is [`StoreError::Damaged`],
    /// never replaced by an empty one.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let (embedded, revision) = embedded::Embedded::open(dir)?;
        Store::with_builtins(
            Backend::Embedded(embedded),
            Arc::new(History::new(revision)),
        )
    }

    /// Connects to the store in etcd that `config` names, creating the
    /// built-in namespaces if this is the first server on it. Every server
    /// connected to the same etcd and prefix sees every other's writes.
    pub fn open_etcd(config: &EtcdConfig) -> Result<Store, StoreError> {
        let (etcd, revision) = etcd::Etcd::connect(config)?;
        let history = Arc::new(History::new(revision));
        etcd.follow(history.clone());
        Store::with_builtins(Backend::Etcd(Box::new(etcd)), history)
    }

    /// Opens the store `location` names.
    pub fn open_at(location: &StoreLocation) -> Result<Store, StoreError> {
        match location {
            StoreLocation::Embedded(dir) => Store::open(dir),
            StoreLocation::Etcd(config) => Store::open_etcd(config),
        }
    }

    fn with_builtins(backend: Backend, history: Arc<History>) -> Result<Store, StoreError> {
        let store = Store { backend, history };
        let (existing, _) = store.list(&Selection {
            collection: "core/namespaces".into(),
            namespace: None,
        })?;
        let missing: Vec<Op> = BUILTIN_NAMESPACES
            .iter()
            .filter(|ns| {
                !existing
                    .iter()
                    .any(|e| e.metadata.name.as_deref() == Some(**ns))
            })
            .map(|ns| {
                Op::Apply(Object {
                    api_version: "v1".into(),
                    kind: "Namespace".into(),
                    metadata: vmesh_api::ObjectMeta {
                        name: Some(ns.to_string()),
                        ..Default::default()
                    },
                    body: Default::default(),
                })
            })
            .collect();
        if !missing.is_empty() {
            store.commit(missing).map_err(|e| e.error)?;
        }
        Ok(store)
    }

    /// The embedded store's file, for backups; none on etcd, which keeps
    /// its own.
    pub(crate) fn embedded(&self) -> Result<&embedded::Embedded, StoreError> {
        match &self.backend {
            Backend::Embedded(embedded) => Ok(embedded),
            Backend::Etcd(_) => Err(StoreError::Unsupported(
                "the store is in etcd: take its backups with vmesh backup (etcd's own snapshots also work)",
            )),
        }
    }

    /// Whether the objects live in etcd (shared with other servers).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Etcd(_))
    }

    /// The latest revision this server knows of.
    pub fn revision(&self) -> u64 {
        self.history.revision()
    }

    /// Why the store cannot be written, while it cannot (a full disk, an
    /// etcd without quorum): the server reports it as not ready.
    pub fn fault(&self) -> Option<String> {
        match &self.backend {
            Backend::Embedded(embedded) => embedded.fault(),
            Backend::Etcd(etcd) => etcd.fault(),
        }
    }

    /// Tries the store in a way no reader notices, so that a store whose
    /// writes failed finds out when they work again.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(embedded) => embedded.check_writable(),
            Backend::Etcd(etcd) => etcd.check_writable(),
        }
    }

    pub fn get(&self, key: &ObjectKey) -> Result<Option<Object>, StoreError> {
        match &self.backend {
            Backend::Embedded(embedded) => embedded.get(key),
            Backend::Etcd(etcd) => etcd.get(key),
        }
    }

    /// Objects in a selection, sorted by namespace and name, with the revision they were read at.
    pub fn list(&self, selection: &Selection) -> Result<(Vec<Object>, u64), StoreError> {
        let mut objects = Vec::new();
        let revision = self.scan(selection, None, |_, object| {
            objects.push(object);
            true
        })?;
        Ok((objects, revision))
    }

    /// Visits the objects of `selection` in key order, all from one
    /// snapshot, starting after the storage key `after`, until `visit`
    /// returns false. Nothing but the object in hand (or, on etcd, one page
    /// of objects) is held in memory, so a list of any size costs what one
    /// object does. Returns the snapshot's revision.
    pub fn scan(
        &self,
        selection: &Selection,
        after: Option<&str>,
        visit: impl FnMut(&str, Object) -> bool,
    ) -> Result<u64, StoreError> {
        let prefix = selection.prefix();
        match &self.backend {
            Backend::Embedded(embedded) => embedded.scan(&prefix, after, visit),
            Backend::Etcd(etcd) => etcd.scan(&prefix, after, visit),
        }
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
        match &self.backend {
            Backend::Embedded(embedded) => embedded.write_batch(ops, dry_run, &self.history),
            Backend::Etcd(etcd) => etcd.write_batch(ops, dry_run, &self.history),
        }
    }

    /// A server-owned record: state of the server's own (token revocations,
    /// join records) kept in the store but apart from the objects, so that
    /// nothing of the config API (no list, watch, write or namespace
    /// deletion) can read or change it.
    pub fn record(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.backend {
            Backend::Embedded(embedded) => embedded.record(name),
            Backend::Etcd(etcd) => etcd.record(name),
        }
    }

    /// The records whose names start with `prefix`, in name order.
    pub fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match &self.backend {
            Backend::Embedded(embedded) => embedded.records(prefix),
            Backend::Etcd(etcd) => etcd.records(prefix),
        }
    }

    /// Writes (`Some`) and deletes (`None`) records, all or none.
    pub fn write_records(&self, writes: Vec<(String, Option<Vec<u8>>)>) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(embedded) => embedded.write_records(writes),
            Backend::Etcd(etcd) => etcd.write_records(writes),
        }
    }

    /// Replaces record `name` (`Some`: writes, `None`: deletes) only if it
    /// still holds `expected` (`None`: there is none); false, and nothing
    /// written, if it does not. What a server reads, decides and writes back
    /// this way cannot be undone by another server's write meanwhile: a
    /// join token's last use is spent once.
    pub fn swap_record(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Embedded(embedded) => embedded.swap_record(name, expected, new),
            Backend::Etcd(etcd) => etcd.swap_record(name, expected, new),
        }
    }

    /// Writes a snapshot of the whole store, objects and records as of one
    /// revision ([`snapshot`]), while it serves; that revision.
    pub fn snapshot(&self, out: &mut dyn std::io::Write) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Embedded(embedded) => embedded.snapshot(out),
            Backend::Etcd(etcd) => etcd.snapshot(out),
        }
    }

    /// Every future change of any object, for controllers that react to all of them.
    pub fn changes(&self) -> Changes {
        Changes {
            history: self.history.clone(),
            revisions: self.history.revisions.subscribe(),
            cursor: self.history.revision(),
            selection: None,
        }
    }

    /// The changes of a selection: from `from` (a resource version: every
    /// change after it, or [`StoreError::Gone`] if those are no longer
    /// kept), or with none from now, for a watcher that lists first
    /// ([`Store::scan`]) and then [`Changes::skip_to`] the revision it listed.
    pub fn watch(&self, selection: Selection, from: Option<&str>) -> Result<Changes, StoreError> {
        let state = self.history.state.lock();
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
            history: self.history.clone(),
            revisions: self.history.revisions.subscribe(),
            cursor,
            selection: Some(selection),
        })
    }
}

#[cfg(test)]
mod tests;
