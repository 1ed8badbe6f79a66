use serde_json::json;
use vmesh_api::decode_manifests;

use super::*;
use backup::restore;
use vmesh_testkit::etcd::EtcdCluster;

fn objects(yaml: &str) -> Vec<Object> {
    let decoded = decode_manifests("test.yaml", yaml);
    assert!(!decoded.has_errors(), "{:?}", decoded.problems);
    decoded.objects.into_iter().map(|l| l.object).collect()
}

fn entry(name: &str, ns: &str, address: &str) -> Object {
    objects(&format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{address: {address}}}\n"
    ))
    .remove(0)
}

fn entries_in(ns: Option<&str>) -> Selection {
    Selection {
        collection: "networking.istio.io/workloadentries".into(),
        namespace: ns.map(str::to_string),
    }
}

/// Where a test's store lives: the same tests run on both backends.
enum Backing {
    Embedded(tempfile::TempDir),
    Etcd {
        cluster: EtcdCluster,
        _dir: tempfile::TempDir,
    },
}

impl Backing {
    /// An empty place of the same kind to restore into.
    fn elsewhere(&self, dir: &Path) -> StoreLocation {
        match self {
            Backing::Embedded(_) => StoreLocation::Embedded(dir.to_path_buf()),
            Backing::Etcd { cluster, .. } => StoreLocation::Etcd(etcd_config(cluster, "restored")),
        }
    }

    fn embedded() -> Backing {
        Backing::Embedded(tempfile::tempdir().unwrap())
    }

    fn etcd() -> Backing {
        let dir = tempfile::tempdir().unwrap();
        let cluster = EtcdCluster::start(1, dir.path()).unwrap();
        Backing::Etcd { cluster, _dir: dir }
    }

    /// Opens the store; again after a drop, it is a restarted server.
    fn open(&self) -> Store {
        match self {
            Backing::Embedded(dir) => Store::open(dir.path()).unwrap(),
            Backing::Etcd { cluster, .. } => {
                Store::open_etcd(&etcd_config(cluster, "test")).unwrap()
            }
        }
    }
}

fn etcd_config(cluster: &EtcdCluster, prefix: &str) -> EtcdConfig {
    match StoreLocation::parse(Some(&cluster.url(prefix)), Path::new("/nonexistent")).unwrap() {
        StoreLocation::Etcd(config) => config,
        StoreLocation::Embedded(_) => unreachable!("an etcd URL"),
    }
}

/// Each test of a backend-independent rule, once per backend.
macro_rules! on_both_backends {
    (sync: [$($sync:ident),* $(,)?], async: [$($async:ident),* $(,)?]) => {
        mod on_embedded {
            $(#[test]
            fn $sync() {
                super::$sync(&super::Backing::embedded());
            })*
            $(#[tokio::test]
            async fn $async() {
                super::$async(&super::Backing::embedded()).await;
            })*
        }
        mod on_etcd {
            $(#[test]
            fn $sync() {
                super::$sync(&super::Backing::etcd());
            })*
            $(#[tokio::test]
            async fn $async() {
                super::$async(&super::Backing::etcd()).await;
            })*
        }
    };
}

on_both_backends!(
    sync: [
        writes_get_versions_and_survive_reopen,
        stale_resource_version_conflicts_and_changes_nothing,
        batches_are_atomic_and_namespaces_come_first,
        deleting_a_namespace_deletes_its_objects_but_builtins_stay,
        watch_from_before_restart_is_gone,
        status_is_set_only_by_set_status_and_kept_by_other_writes,
        immutable_config_maps_keep_their_data_until_deleted,
        records_are_apart_from_objects_and_survive_reopen,
        a_snapshot_restores_into_an_empty_store_only,
        finalizers_hold_a_delete_until_they_are_removed,
    ],
    async: [
        a_dry_run_checks_everything_and_writes_nothing,
        watches_see_every_change_in_order_and_resume,
    ]
);

fn writes_get_versions_and_survive_reopen(backing: &Backing) {
    let store = backing.open();
    let out = store
        .commit(vec![Op::Create(entry("vm1", "default", "10.0.0.1"))])
        .unwrap();
    let created = out[0].object().clone();
    assert_eq!(out[0].verb(), "created");
    let rv = created.metadata.resource_version.clone().unwrap();
    assert_eq!(rv, store.revision().to_string());
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());

    let again = store
        .commit(vec![Op::Apply(entry("vm1", "default", "10.0.0.1"))])
        .unwrap();
    assert_eq!(again[0].verb(), "unchanged");
    let changed = store
        .commit(vec![Op::Apply(entry("vm1", "default", "10.0.0.2"))])
        .unwrap();
    assert_eq!(changed[0].verb(), "configured");
    assert_eq!(changed[0].object().metadata.generation, Some(2));
    assert_eq!(changed[0].object().metadata.uid, created.metadata.uid);
    drop(store);

    let store = backing.open();
    let (list, _) = store.list(&entries_in(None)).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].body["spec"]["address"], "10.0.0.2");
    let next = store
        .commit(vec![Op::Create(entry("vm2", "default", "10.0.0.3"))])
        .unwrap();
    let rv2: u64 = next[0]
        .object()
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rv2 > rv.parse::<u64>().unwrap() + 1,
        "revisions keep growing across restarts"
    );
}

fn stale_resource_version_conflicts_and_changes_nothing(backing: &Backing) {
    let store = backing.open();
    let created = store
        .commit(vec![Op::Create(entry("vm1", "default", "10.0.0.1"))])
        .unwrap();
    let rv = created[0].object().metadata.resource_version.clone();

    let mut first = entry("vm1", "default", "10.0.0.2");
    first.metadata.resource_version = rv.clone();
    let mut second = entry("vm1", "default", "10.0.0.3");
    second.metadata.resource_version = rv;
    store.commit(vec![Op::Update(first)]).unwrap();
    let err = store.commit(vec![Op::Update(second)]).unwrap_err();
    assert!(matches!(err.error, StoreError::Conflict { .. }), "{err}");
    let key = entry("vm1", "default", "x").key().unwrap();
    assert_eq!(
        store.get(&key).unwrap().unwrap().body["spec"]["address"],
        "10.0.0.2"
    );
}

async fn a_dry_run_checks_everything_and_writes_nothing(backing: &Backing) {
    let store = backing.open();
    let created = store
        .commit(vec![Op::Create(entry("vm1", "default", "10.0.0.1"))])
        .unwrap();
    let rv = created[0].object().metadata.resource_version.clone();
    let revision = store.revision();
    let mut changes = store.watch(entries_in(None), rv.as_deref()).unwrap();

    let tried = store
        .dry_run(vec![
            Op::Update(entry("vm1", "default", "10.0.0.2")),
            Op::Create(entry("vm2", "default", "10.0.0.3")),
        ])
        .unwrap();
    assert_eq!(tried[0].verb(), "configured");
    assert_eq!(tried[0].object().body["spec"]["address"], "10.0.0.2");
    assert_eq!(tried[0].object().metadata.resource_version, rv);
    assert_eq!(tried[1].verb(), "created");
    assert_eq!(tried[1].object().metadata.resource_version, None);
    // The checks are the real ones.
    let refused = store
        .dry_run(vec![Op::Create(entry("vm1", "default", "10.0.0.9"))])
        .unwrap_err();
    assert!(matches!(refused.error, StoreError::AlreadyExists(_)));

    assert_eq!(store.revision(), revision);
    let (list, _) = store.list(&entries_in(None)).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].body["spec"]["address"], "10.0.0.1");
    store
        .commit(vec![Op::Delete {
            key: entry("vm1", "default", "x").key().unwrap(),
            expected: None,
        }])
        .unwrap();
    let next = changes.next().await.unwrap();
    assert_eq!(
        next.event_type,
        EventType::Deleted,
        "no event from the dry run"
    );
}

fn batches_are_atomic_and_namespaces_come_first(backing: &Backing) {
    let store = backing.open();
    let before = store.revision();
    let err = store
        .commit(vec![
            Op::Create(entry("a", "default", "10.0.0.1")),
            Op::Create(entry("b", "missing", "10.0.0.2")),
        ])
        .unwrap_err();
    assert_eq!(err.index, 1);
    assert!(matches!(err.error, StoreError::NamespaceNotFound(ref ns) if ns == "missing"));
    assert_eq!(store.revision(), before);
    assert!(
        store.list(&entries_in(None)).unwrap().0.is_empty(),
        "nothing half-applied"
    );

    let mut batch: Vec<Op> = vec![Op::Apply(entry("b", "vm-workloads", "10.0.0.2"))];
    batch.extend(
        objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: vm-workloads}\n")
            .into_iter()
            .map(Op::Apply),
    );
    let out = store.commit(batch).unwrap();
    assert_eq!(
        out[0].object().kind,
        "WorkloadEntry",
        "outcomes keep the caller's order"
    );
    assert_eq!(out[1].object().kind, "Namespace");
}

fn deleting_a_namespace_deletes_its_objects_but_builtins_stay(backing: &Backing) {
    let store = backing.open();
    let ns = objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n").remove(0);
    let ns_key = ns.key().unwrap();
    store
        .commit(vec![
            Op::Create(ns),
            Op::Create(entry("a", "team", "10.0.0.1")),
            Op::Create(entry("b", "default", "10.0.0.2")),
        ])
        .unwrap();
    store
        .commit(vec![Op::Delete {
            key: ns_key,
            expected: None,
        }])
        .unwrap();
    let (left, _) = store.list(&entries_in(None)).unwrap();
    assert_eq!(
        left.iter().map(|o| o.metadata.name()).collect::<Vec<_>>(),
        ["b"]
    );
    let default = objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n")
        .remove(0)
        .key()
        .unwrap();
    let err = store
        .commit(vec![Op::Delete {
            key: default,
            expected: None,
        }])
        .unwrap_err();
    assert!(matches!(err.error, StoreError::ProtectedNamespace(_)));
}

async fn watches_see_every_change_in_order_and_resume(backing: &Backing) {
    let store = backing.open();
    store
        .commit(vec![Op::Create(entry("a", "default", "10.0.0.1"))])
        .unwrap();
    let start = store.revision().to_string();
    // Listing first, then the changes after what was listed.
    let mut watch = store.watch(entries_in(Some("default")), None).unwrap();
    let mut listed = Vec::new();
    let revision = store
        .scan(&entries_in(Some("default")), None, |_, object| {
            listed.push(object);
            true
        })
        .unwrap();
    assert_eq!(listed.len(), 1);
    watch.skip_to(revision);

    for i in 2..=50 {
        store
            .commit(vec![Op::Apply(entry(
                "a",
                "default",
                &format!("10.0.0.{i}"),
            ))])
            .unwrap();
    }
    // Elsewhere: not this watch's business.
    store
        .commit(vec![Op::Create(entry("b", "istio-system", "10.0.1.1"))])
        .unwrap();
    let key = entry("a", "default", "x").key().unwrap();
    store
        .commit(vec![Op::Delete {
            key,
            expected: None,
        }])
        .unwrap();
    let mut last = 0;
    for i in 2..=50 {
        let event = watch.next().await.unwrap();
        assert_eq!(event.event_type, EventType::Modified);
        assert_eq!(
            event.object.body["spec"]["address"],
            json!(format!("10.0.0.{i}"))
        );
        assert!(event.revision > last);
        last = event.revision;
    }
    assert_eq!(watch.next().await.unwrap().event_type, EventType::Deleted);

    let mut resumed = store.watch(entries_in(None), Some(&start)).unwrap();
    let mut count = 0;
    while resumed.revision() < store.revision() {
        resumed.next().await.unwrap();
        count += 1;
    }
    assert_eq!(
        count, 51,
        "49 modifications, an entry elsewhere and a deletion since {start}"
    );
}

#[tokio::test]
async fn history_is_bounded_by_bytes_and_a_reader_behind_it_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut idle = store.watch(entries_in(None), None).unwrap();
    let mut controller = store.changes();
    // About 1 MB per write: the history keeps some 64 of them.
    let big = |i: usize| {
        let mut object = entry("big", "default", "10.0.0.1");
        object.metadata.annotations =
            Some([("blob".to_string(), format!("{i}{}", "x".repeat(1 << 20)))].into());
        Op::Apply(object)
    };
    for i in 0..(HISTORY_BYTES >> 20) + 10 {
        store.commit(vec![big(i)]).unwrap();
    }
    let (kept, bytes) = {
        let state = store.history.state.lock();
        (state.history.len(), state.history_bytes)
    };
    assert!(bytes <= HISTORY_BYTES, "{bytes}");
    assert!(kept < (HISTORY_BYTES >> 20));
    // The readers that did not keep up are told, and stand at the latest
    // revision afterwards.
    let missed = idle.next().await.unwrap_err();
    assert_eq!(idle.revision(), store.revision());
    assert!(missed.to_string().contains("list again"));
    assert!(controller.next().await.is_err());
    store.commit(vec![big(0)]).unwrap();
    assert_eq!(idle.next().await.unwrap().event_type, EventType::Modified);
    // A watch from a revision no longer kept is Gone at once.
    assert!(matches!(
        store.watch(entries_in(None), Some("3")),
        Err(StoreError::Gone(3))
    ));
}

fn watch_from_before_restart_is_gone(backing: &Backing) {
    let store = backing.open();
    store
        .commit(vec![Op::Create(entry("a", "default", "10.0.0.1"))])
        .unwrap();
    drop(store);
    let store = backing.open();
    assert!(matches!(
        store.watch(entries_in(None), Some("1")),
        Err(StoreError::Gone(1))
    ));
    assert!(
        store
            .watch(entries_in(None), Some(&store.revision().to_string()))
            .is_ok()
    );
}

fn status_is_set_only_by_set_status_and_kept_by_other_writes(backing: &Backing) {
    let store = backing.open();
    let key = entry("vm1", "default", "10.0.0.1").key().unwrap();
    let mut with_status = entry("vm1", "default", "10.0.0.1");
    with_status.body.insert(
        "status".into(),
        json!({"conditions": [{"type": "Healthy"}]}),
    );
    // A plain write drops the status it carries.
    store.commit(vec![Op::Apply(with_status.clone())]).unwrap();
    assert!(
        store
            .get(&key)
            .unwrap()
            .unwrap()
            .body
            .get("status")
            .is_none()
    );
    // SetStatus sets it, bumps the version, and keeps the generation.
    let before = store.get(&key).unwrap().unwrap();
    let out = store
        .commit(vec![Op::SetStatus(with_status.clone())])
        .unwrap();
    assert_eq!(out[0].verb(), "configured");
    let after = store.get(&key).unwrap().unwrap();
    assert_eq!(after.body["status"], with_status.body["status"]);
    assert_ne!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert_eq!(after.metadata.generation, before.metadata.generation);
    // A later write of the spec keeps it.
    store
        .commit(vec![Op::Apply(entry("vm1", "default", "10.0.0.2"))])
        .unwrap();
    assert_eq!(
        store.get(&key).unwrap().unwrap().body["status"],
        with_status.body["status"]
    );
    // A status written over a version that is no longer current is a
    // conflict: the later writer reads again instead of losing a condition.
    let mut stale = with_status.clone();
    stale.metadata.resource_version = before.metadata.resource_version.clone();
    stale.body["status"] = json!({"conditions": [{"type": "Stale"}]});
    let conflict = store.commit(vec![Op::SetStatus(stale)]).unwrap_err();
    assert!(
        matches!(conflict.error, StoreError::Conflict { .. }),
        "{conflict}"
    );
    // There must be an object to set a status on.
    let missing = entry("vm2", "default", "10.0.0.3");
    assert!(store.commit(vec![Op::SetStatus(missing)]).is_err());
}

fn immutable_config_maps_keep_their_data_until_deleted(backing: &Backing) {
    let store = backing.open();
    let config_map = |data: &str, immutable: bool| {
        objects(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: fixed, namespace: default}}\nimmutable: {immutable}\ndata: {{k: {data}}}\n"
        ))
        .remove(0)
    };
    store
        .commit(vec![Op::Apply(config_map("a", true))])
        .unwrap();
    for change in [config_map("b", true), config_map("a", false)] {
        let err = store.commit(vec![Op::Apply(change)]).unwrap_err();
        assert!(
            matches!(err.error, StoreError::Immutable { .. }),
            "{}",
            err.error
        );
    }
    // Labels may change; deleting and recreating is the way to new data.
    let mut labelled = config_map("a", true);
    labelled.metadata.labels = Some([("team".to_string(), "x".to_string())].into());
    store.commit(vec![Op::Apply(labelled)]).unwrap();
    let key = config_map("a", true).key().unwrap();
    store
        .commit(vec![Op::Delete {
            key: key.clone(),
            expected: None,
        }])
        .unwrap();
    store
        .commit(vec![Op::Apply(config_map("b", true))])
        .unwrap();
    assert_eq!(store.get(&key).unwrap().unwrap().body["data"]["k"], "b");
}

/// A store with enough objects to fill several pages, closed.
fn filled_store(dir: &Path) -> u64 {
    let store = Store::open(dir).unwrap();
    let ops = (0..400)
        .map(|i| {
            Op::Create(entry(
                &format!("vm{i}"),
                "default",
                &format!("10.0.{}.{}", i / 200, i % 200),
            ))
        })
        .collect();
    store.commit(ops).unwrap();
    store.revision()
}

fn damage_of(dir: &Path) -> String {
    match Store::open(dir) {
        Err(e @ StoreError::Damaged { .. }) => e.to_string(),
        Err(e) => panic!("not reported as damage: {e}"),
        Ok(_) => panic!("a damaged store opened"),
    }
}

#[test]
fn an_emptied_store_file_is_refused_not_started_empty() {
    let dir = tempfile::tempdir().unwrap();
    filled_store(dir.path());
    std::fs::File::create(dir.path().join(STORE_FILE)).unwrap();
    let message = damage_of(dir.path());
    assert!(message.contains("empty (0 bytes)"), "{message}");
    assert!(
        message.contains(&format!(
            "vmesh store restore --data-dir {}",
            dir.path().display()
        )),
        "{message}"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join(STORE_FILE))
            .unwrap()
            .len(),
        0,
        "the refused file is left as it was"
    );
}

/// Overwrites `len` bytes at `offset` of the store file with `byte`, or
/// flips every bit there when `byte` is `None`.
fn damage(dir: &Path, offset: u64, len: usize, byte: Option<u8>) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(STORE_FILE))
        .unwrap();
    let mut bytes = vec![0; len];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut bytes).unwrap();
    for b in &mut bytes {
        *b = byte.unwrap_or(!*b);
    }
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&bytes).unwrap();
}

#[test]
fn zeroed_pages_and_flipped_bytes_are_refused_or_harmless() {
    let dir = tempfile::tempdir().unwrap();
    filled_store(dir.path());
    let size = std::fs::metadata(dir.path().join(STORE_FILE))
        .unwrap()
        .len();
    let pristine = std::fs::read(dir.path().join(STORE_FILE)).unwrap();
    // Where an object lives, every kind of damage is found.
    let object_at = pristine
        .windows(7)
        .position(|w| w == b"\"vm200\"")
        .expect("an object's bytes are in the file") as u64;
    let page = object_at - object_at % 4096;
    for (offset, len, byte) in [
        (0, 4096, Some(0)),
        (page, 4096, Some(0)),
        (page, 8192, Some(0)),
        (object_at + 2, 1, None),
        (object_at, 64, None),
    ] {
        std::fs::write(dir.path().join(STORE_FILE), &pristine).unwrap();
        damage(dir.path(), offset, len, byte);
        let message = damage_of(dir.path());
        assert!(message.contains("is damaged"), "{offset}+{len}: {message}");
    }
    // Anywhere else (a byte redb never reads, a page it freed), the damage is
    // found or the store is whole: every object there, and writable.
    for page in 0..size / 4096 {
        for (offset, len, byte) in [(page * 4096, 4096, Some(0)), (page * 4096 + 2000, 1, None)] {
            std::fs::write(dir.path().join(STORE_FILE), &pristine).unwrap();
            damage(dir.path(), offset, len, byte);
            match Store::open(dir.path()) {
                Err(StoreError::Damaged { .. }) => {}
                Err(e) => panic!("{offset}+{len}: not reported as damage: {e}"),
                Ok(store) => {
                    assert_eq!(
                        store.list(&entries_in(None)).unwrap().0.len(),
                        400,
                        "{offset}+{len} opened with objects missing"
                    );
                    store
                        .commit(vec![Op::Create(entry("after", "default", "10.9.9.9"))])
                        .unwrap();
                }
            }
        }
    }
    std::fs::write(dir.path().join(STORE_FILE), &pristine).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.list(&entries_in(None)).unwrap().0.len(), 400);
}

#[test]
fn restore_puts_the_newest_good_backup_in_place_and_keeps_the_damaged_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .commit(vec![Op::Create(entry("first", "default", "10.0.0.1"))])
        .unwrap();
    let older = store.take_backup().unwrap();
    store
        .commit(vec![Op::Create(entry("second", "default", "10.0.0.2"))])
        .unwrap();
    let newer = store.take_backup().unwrap();
    assert_ne!(older, newer);
    let revision = store.revision();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&newer).unwrap().permissions().mode() & 0o777,
        0o600
    );
    match restore(dir.path(), None) {
        Err(StoreError::InUse(_)) => {}
        other => panic!("restore ran beside an open store: {other:?}"),
    }
    drop(store);

    // The newest backup is itself damaged: the one before it is chosen.
    std::fs::write(&newer, b"").unwrap();
    std::fs::write(dir.path().join(STORE_FILE), b"").unwrap();
    let restored = restore(dir.path(), None).unwrap();
    assert_eq!(restored.from.path, older);
    assert_eq!(restored.from.objects, 3, "two namespaces and one entry");
    let kept = restored.kept.unwrap();
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), 0);
    let store = Store::open(dir.path()).unwrap();
    let names: Vec<String> = store
        .list(&entries_in(None))
        .unwrap()
        .0
        .iter()
        .map(|o| o.metadata.name().to_string())
        .collect();
    assert_eq!(names, ["first"]);
    assert!(store.revision() < revision);
    drop(store);

    for path in backup::backups(dir.path()) {
        std::fs::remove_file(path).unwrap();
    }
    let message = restore(dir.path(), None).unwrap_err().to_string();
    assert!(message.contains("no good backup"), "{message}");
}

#[test]
fn backups_keep_the_newest_few() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for i in 0..5 {
        store
            .commit(vec![Op::Create(entry(
                &format!("vm{i}"),
                "default",
                "10.0.0.1",
            ))])
            .unwrap();
        store.take_backup().unwrap();
        // The same revision twice is one backup.
        store.take_backup().unwrap();
    }
    let kept = backup::backups(dir.path());
    assert_eq!(kept.len(), backup::KEEP_BACKUPS);
    assert!(kept[0].ends_with(format!("store-r{}.redb", store.revision())));
    assert_eq!(backup::check(&kept[0]).unwrap().revision, store.revision());
}

fn records_are_apart_from_objects_and_survive_reopen(backing: &Backing) {
    let store = backing.open();
    let revision = store.revision();
    store
        .write_records(vec![
            ("join/a".into(), Some(b"one".to_vec())),
            ("join/b".into(), Some(b"two".to_vec())),
            ("other".into(), Some(b"three".to_vec())),
        ])
        .unwrap();
    assert_eq!(store.revision(), revision, "records are not object changes");
    let records_as_objects = store
        .list(&Selection {
            collection: "core/configmaps".into(),
            namespace: None,
        })
        .unwrap()
        .0;
    assert!(records_as_objects.is_empty(), "records are no objects");
    store.write_records(vec![("join/a".into(), None)]).unwrap();
    drop(store);
    let store = backing.open();
    assert_eq!(
        store.records("join/").unwrap(),
        [("join/b".to_string(), b"two".to_vec())]
    );
    assert_eq!(store.record("other").unwrap(), Some(b"three".to_vec()));
    assert_eq!(store.record("join/a").unwrap(), None);

    // A swap writes only over what the caller read.
    assert!(
        !store
            .swap_record("other", Some(b"stale"), Some(b"four".to_vec()))
            .unwrap()
    );
    assert_eq!(store.record("other").unwrap(), Some(b"three".to_vec()));
    assert!(
        store
            .swap_record("other", Some(b"three"), Some(b"four".to_vec()))
            .unwrap()
    );
    assert_eq!(store.record("other").unwrap(), Some(b"four".to_vec()));
    assert!(
        !store
            .swap_record("join/b", None, Some(b"new".to_vec()))
            .unwrap()
    );
    assert!(
        store
            .swap_record("join/c", None, Some(b"new".to_vec()))
            .unwrap()
    );
    assert!(store.swap_record("join/c", Some(b"new"), None).unwrap());
    assert_eq!(store.record("join/c").unwrap(), None);
}

fn finalizers_hold_a_delete_until_they_are_removed(backing: &Backing) {
    let store = backing.open();
    let held = |name: &str, address: &str| {
        let mut object = entry(name, "app", address);
        object.metadata.finalizers = Some(vec!["example.com/hold".into()]);
        object
    };
    let namespace = objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n").remove(0);
    let namespace_key = namespace.key().unwrap();
    store
        .commit(vec![
            Op::Create(namespace),
            Op::Create(held("vm1", "10.0.0.1")),
        ])
        .unwrap();
    let key = entry("vm1", "app", "x").key().unwrap();

    // A delete only marks it; deleting again changes nothing.
    let marked = store
        .commit(vec![Op::Delete {
            key: key.clone(),
            expected: None,
        }])
        .unwrap();
    assert_eq!(marked[0].verb(), "configured");
    let stamped = marked[0].object().metadata.deletion_timestamp.clone();
    assert!(stamped.is_some());
    let again = store
        .commit(vec![Op::Delete {
            key: key.clone(),
            expected: None,
        }])
        .unwrap();
    assert_eq!(again[0].verb(), "unchanged");
    // Writes keep the mark, whatever they say of it.
    let mut changed = held("vm1", "10.0.0.2");
    changed.metadata.deletion_timestamp = None;
    let kept = store.commit(vec![Op::Update(changed)]).unwrap();
    assert_eq!(kept[0].object().metadata.deletion_timestamp, stamped);
    // The last finalizer removed, the delete completes.
    let done = store
        .commit(vec![Op::Update(entry("vm1", "app", "10.0.0.2"))])
        .unwrap();
    assert_eq!(done[0].verb(), "deleted");
    assert!(store.get(&key).unwrap().is_none());

    // A namespace waits for its held objects; nothing new goes in meanwhile.
    store
        .commit(vec![
            Op::Create(held("vm2", "10.0.0.3")),
            Op::Create(entry("vm3", "app", "10.0.0.4")),
        ])
        .unwrap();
    let deleting = store
        .commit(vec![Op::Delete {
            key: namespace_key.clone(),
            expected: None,
        }])
        .unwrap();
    assert_eq!(deleting[0].verb(), "configured");
    assert!(store.get(&namespace_key).unwrap().is_some());
    assert!(
        store
            .get(&entry("vm3", "app", "x").key().unwrap())
            .unwrap()
            .is_none()
    );
    let refused = store
        .commit(vec![Op::Create(entry("vm4", "app", "10.0.0.5"))])
        .unwrap_err();
    assert!(
        matches!(refused.error, StoreError::NamespaceTerminating(_)),
        "{refused}"
    );
    store
        .commit(vec![Op::Update(entry("vm2", "app", "10.0.0.3"))])
        .unwrap();
    assert!(
        store
            .get(&entry("vm2", "app", "x").key().unwrap())
            .unwrap()
            .is_none()
    );
    assert!(
        store.get(&namespace_key).unwrap().is_none(),
        "the namespace went with its last object"
    );
}

fn a_snapshot_restores_into_an_empty_store_only(backing: &Backing) {
    let store = backing.open();
    store
        .commit(vec![
            Op::Create(entry("vm1", "default", "10.0.0.1")),
            Op::Create(entry("vm2", "istio-system", "10.0.0.2")),
        ])
        .unwrap();
    store
        .write_records(vec![("join/a".into(), Some(vec![0, 1, 2, 255]))])
        .unwrap();
    let mut taken = Vec::new();
    let revision = store.snapshot(&mut taken).unwrap();
    assert_eq!(revision, store.revision());

    let dir = tempfile::tempdir().unwrap();
    let target = backing.elsewhere(dir.path());
    let restored_at = snapshot::restore(&target, &mut taken.as_slice()).unwrap();
    assert_eq!(restored_at, revision);
    let restored = Store::open_at(&target).unwrap();
    assert_eq!(restored.revision(), revision);
    for selection in [
        entries_in(None),
        Selection {
            collection: "core/namespaces".into(),
            namespace: None,
        },
    ] {
        assert_eq!(
            restored.list(&selection).unwrap().0,
            store.list(&selection).unwrap().0
        );
    }
    assert_eq!(restored.record("join/a").unwrap(), Some(vec![0, 1, 2, 255]));
    // Writes go on from the snapshot's revision.
    let next = restored
        .commit(vec![Op::Create(entry("vm3", "default", "10.0.0.3"))])
        .unwrap();
    assert_eq!(
        next[0].object().metadata.resource_version,
        Some((revision + 1).to_string())
    );
    drop(restored);
    // A restore never merges into a store that holds something.
    let refused = snapshot::restore(&target, &mut taken.as_slice()).unwrap_err();
    assert!(refused.to_string().contains("already"), "{refused}");
    // A file that is no snapshot says where.
    let garbage = snapshot::restore(&backing.elsewhere(&dir.path().join("x")), &mut &b"{}\n"[..]);
    assert!(garbage.unwrap_err().to_string().contains("line 1"));
}
