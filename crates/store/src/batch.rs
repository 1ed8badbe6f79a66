//! One batch of writes as every backend applies it: the rules of creating,
//! updating, deleting and finalizing objects and namespaces, resource
//! versions, generations and status, over a [`Txn`] that reads and writes
//! one backend's transaction.
//!
//! This module owns what a write *means*; it does not know where objects
//! live (redb's tables, etcd's keys) or how a transaction commits.

use std::collections::BTreeMap;

use vmesh_api::{Object, ObjectKey};

use crate::{
    BUILTIN_NAMESPACES, BatchError, EventType, MAX_OBJECT_BYTES, Op, Outcome, StoreError,
    WatchEvent, parse_rv,
};

/// One backend's open write transaction, as the batch rules see it: the
/// objects by storage key, with this batch's own writes visible to its
/// later reads.
pub(crate) trait Txn {
    fn read(&self, key: &str) -> Result<Option<Object>, StoreError>;
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;
    fn remove(&self, key: &str) -> Result<(), StoreError>;
    /// Every object in the store (namespace deletion looks for its contents).
    fn objects(&self) -> Result<Vec<Object>, StoreError>;
}

/// What a batch did, before the backend commits it.
pub(crate) struct Applied {
    /// The revision after the batch's last change.
    pub revision: u64,
    pub outcomes: Vec<Outcome>,
    /// Its changes, oldest first (none for a dry run).
    pub events: Vec<WatchEvent>,
}

/// The storage keys `ops` will read first: each object's own and its
/// namespace's (a backend whose reads are round trips fetches them at once).
pub(crate) fn keys_read(ops: &[Op]) -> Vec<String> {
    let mut keys = Vec::new();
    for op in ops {
        let key = match op {
            Op::Delete { key, .. } => Some(key.clone()),
            Op::Create(o) | Op::Update(o) | Op::Apply(o) | Op::SetStatus(o) => o.key(),
        };
        if let Some(key) = key {
            if !key.namespace.is_empty() {
                keys.push(namespace_key(&key.namespace));
            }
            keys.push(key.storage_key());
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Applies `ops` in `txn`, numbering changes from `revision`. A dry run
/// makes every check and leaves the objects it answers with at the
/// resourceVersion they had; the caller aborts its transaction.
pub(crate) fn apply(
    txn: &impl Txn,
    ops: Vec<Op>,
    revision: u64,
    dry_run: bool,
) -> Result<Applied, BatchError> {
    let count = ops.len();
    let mut revision = revision;
    let mut outcomes: Vec<Option<Outcome>> = vec![None; count];
    let mut events = Vec::new();
    let versions_before: Vec<Option<String>> = if dry_run {
        ops.iter()
            .map(|op| {
                let key = match op {
                    Op::Delete { key, .. } => Some(key.clone()),
                    Op::Create(o) | Op::Update(o) | Op::Apply(o) | Op::SetStatus(o) => o.key(),
                };
                key.and_then(|k| txn.read(&k.storage_key()).ok().flatten())
                    .and_then(|o| o.metadata.resource_version)
            })
            .collect()
    } else {
        Vec::new()
    };
    // Namespaces are written first, so a batch may create a namespace and
    // objects in it in any order.
    let mut ordered: Vec<(usize, Op)> = ops.into_iter().enumerate().collect();
    ordered.sort_by_key(|(_, op)| !creates_namespace(op));
    for (index, op) in ordered {
        let outcome = write_one(txn, op, &mut revision, &mut events)
            .map_err(|error| BatchError { index, error })?;
        outcomes[index] = Some(outcome);
    }
    let mut outcomes: Vec<Outcome> = outcomes.into_iter().flatten().collect();
    if dry_run {
        for (outcome, version) in outcomes.iter_mut().zip(versions_before) {
            if let Outcome::Created(o) | Outcome::Configured(o) = outcome {
                o.metadata.resource_version = version;
            }
        }
        events.clear();
    }
    Ok(Applied {
        revision,
        outcomes,
        events,
    })
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

pub(crate) fn key_of(object: &Object) -> Result<ObjectKey, StoreError> {
    object
        .key()
        .ok_or_else(|| StoreError::UnknownKind(format!("{} {}", object.api_version, object.kind)))
}

pub(crate) fn namespace_key(name: &str) -> String {
    ObjectKey {
        group: String::new(),
        plural: "namespaces".into(),
        namespace: String::new(),
        name: name.into(),
    }
    .storage_key()
}

fn creates_namespace(op: &Op) -> bool {
    match op {
        Op::Create(o) | Op::Update(o) | Op::Apply(o) => {
            o.kind == "Namespace" && o.api_version == "v1"
        }
        Op::SetStatus(_) | Op::Delete { .. } => false,
    }
}

/// Writes `object` under `key`; its encoded size.
fn write(txn: &impl Txn, key: &str, object: &Object) -> Result<usize, StoreError> {
    let bytes = serde_json::to_vec(object)?;
    if bytes.len() > MAX_OBJECT_BYTES {
        return Err(StoreError::TooLarge {
            name: object.display_name(),
            size: bytes.len(),
        });
    }
    txn.put(key, bytes.as_slice())?;
    Ok(bytes.len())
}

fn remove(
    txn: &impl Txn,
    key: &ObjectKey,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<Object, StoreError> {
    let storage_key = key.storage_key();
    let mut object = txn
        .read(&storage_key)?
        .ok_or_else(|| StoreError::NotFound(Box::new(key.clone())))?;
    txn.remove(&storage_key)?;
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
    txn: &impl Txn,
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
            let current = txn
                .read(&key.storage_key())?
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
    let existing = txn.read(&storage_key)?;
    if !key.namespace.is_empty() {
        match txn.read(&namespace_key(&key.namespace))? {
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
    txn: &impl Txn,
    object: Object,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<Outcome, StoreError> {
    let key = key_of(&object)?;
    let storage_key = key.storage_key();
    let current = txn
        .read(&storage_key)?
        .ok_or_else(|| StoreError::NotFound(Box::new(key.clone())))?;
    // A status written over the version it was read at fails if anything
    // wrote the object since: two writers cannot lose one's condition.
    check_version(&key, &current, object.metadata.resource_version.clone())?;
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
    txn: &impl Txn,
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
    txn: &impl Txn,
    namespace: &str,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<bool, StoreError> {
    let mut doomed: BTreeMap<String, (ObjectKey, Object)> = BTreeMap::new();
    for object in txn.objects()? {
        let key = key_of(&object)?;
        if key.namespace == namespace {
            doomed.insert(key.storage_key(), (key, object));
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
    txn: &impl Txn,
    namespace: &str,
    revision: &mut u64,
    events: &mut Vec<WatchEvent>,
) -> Result<(), StoreError> {
    if namespace.is_empty() {
        return Ok(());
    }
    let namespace_storage_key = namespace_key(namespace);
    let Some(current) = txn.read(&namespace_storage_key)? else {
        return Ok(());
    };
    if !is_deleting(&current) || has_finalizers(&current) {
        return Ok(());
    }
    if txn
        .objects()?
        .iter()
        .any(|object| object.metadata.namespace.as_deref() == Some(namespace))
    {
        return Ok(());
    }
    let key = key_of(&current)?;
    remove(txn, &key, revision, events)?;
    Ok(())
}
