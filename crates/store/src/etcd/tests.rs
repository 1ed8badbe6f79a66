//! What only the etcd backend has: several servers on one etcd, and an etcd
//! that loses its quorum. The rules every backend keeps are tested on both
//! in `crate::tests`.

use std::sync::Arc;
use std::time::Duration;

use vmesh_api::decode_manifests;
use vmesh_testkit::etcd::EtcdCluster;

use super::*;
use crate::{Op, Selection, Store};

fn entry(name: &str, address: &str) -> Object {
    let decoded = decode_manifests(
        "test.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default}}\nspec: {{address: {address}}}\n"
        ),
    );
    decoded.objects.into_iter().next().unwrap().object
}

fn entries() -> Selection {
    Selection {
        collection: "networking.istio.io/workloadentries".into(),
        namespace: None,
    }
}

fn config(cluster: &EtcdCluster, prefix: &str) -> EtcdConfig {
    match StoreLocation::parse(Some(&cluster.url(prefix)), Path::new("/unused")).unwrap() {
        StoreLocation::Etcd(config) => config,
        StoreLocation::Embedded(_) => unreachable!("an etcd URL"),
    }
}

#[test]
fn store_urls_parse_and_bad_ones_say_why() {
    let data = Path::new("/var/lib/vmesh");
    assert_eq!(
        StoreLocation::parse(None, data).unwrap(),
        StoreLocation::Embedded(data.into())
    );
    assert_eq!(
        StoreLocation::parse(Some("redb:"), data).unwrap(),
        StoreLocation::Embedded(data.into())
    );
    let StoreLocation::Etcd(config) =
        StoreLocation::parse(Some("etcd://h1:2379,h2:2379,h3:2379"), data).unwrap()
    else {
        panic!("an etcd URL")
    };
    assert_eq!(config.endpoints, ["h1:2379", "h2:2379", "h3:2379"]);
    assert_eq!(config.prefix, "/vmesh/");
    let StoreLocation::Etcd(config) =
        StoreLocation::parse(Some("etcd://10.0.0.1:2379/mesh-a"), data).unwrap()
    else {
        panic!("an etcd URL")
    };
    assert_eq!(config.prefix, "/mesh-a/");
    for (bad, says) in [
        ("etcd://", "no etcd member"),
        ("etcd://h1", "not host:port"),
        ("etcd://h1:http", "not host:port"),
        ("postgres://db", "expected redb:"),
    ] {
        let error = StoreLocation::parse(Some(bad), data).unwrap_err();
        assert!(error.contains(says), "{bad}: {error}");
    }
}

#[tokio::test]
async fn servers_on_one_etcd_share_objects_revisions_and_changes() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(1, dir.path()).unwrap();
    let first = Store::open_etcd(&config(&cluster, "mesh")).unwrap();
    let second = Store::open_etcd(&config(&cluster, "mesh")).unwrap();
    let elsewhere = Store::open_etcd(&config(&cluster, "other-mesh")).unwrap();
    let mut watch = second.watch(entries(), None).unwrap();

    let created = first
        .commit(vec![Op::Create(entry("vm1", "10.0.0.1"))])
        .unwrap();
    let rv = created[0].object().metadata.resource_version.clone();
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the second server sees the first's write")
        .unwrap();
    assert_eq!(seen.object.metadata.resource_version, rv);
    assert_eq!(second.revision(), first.revision());
    let key = entry("vm1", "x").key().unwrap();
    assert_eq!(
        second.get(&key).unwrap().unwrap().metadata.resource_version,
        rv
    );

    // A write through the second with the version the first answered.
    let mut update = entry("vm1", "10.0.0.2");
    update.metadata.resource_version = rv.clone();
    second.commit(vec![Op::Update(update)]).unwrap();
    let mut stale = entry("vm1", "10.0.0.3");
    stale.metadata.resource_version = rv;
    let conflict = first.commit(vec![Op::Update(stale)]).unwrap_err();
    assert!(
        matches!(conflict.error, StoreError::Conflict { .. }),
        "{conflict}"
    );

    // Another prefix is another mesh.
    assert!(elsewhere.list(&entries()).unwrap().0.is_empty());
    assert!(elsewhere.get(&key).unwrap().is_none());
}

#[test]
fn concurrent_writers_through_two_servers_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(1, dir.path()).unwrap();
    let servers = [
        Arc::new(Store::open_etcd(&config(&cluster, "mesh")).unwrap()),
        Arc::new(Store::open_etcd(&config(&cluster, "mesh")).unwrap()),
    ];
    servers[0]
        .commit(vec![Op::Create(entry("counter", "10.0.0.1"))])
        .unwrap();
    let key = entry("counter", "x").key().unwrap();
    const WRITERS: usize = 20;
    const INCREMENTS: usize = 5;
    let conflicts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = servers[writer % 2].clone();
            let key = key.clone();
            let conflicts = conflicts.clone();
            std::thread::spawn(move || {
                // Each writer's own object, and increments of a shared one
                // read-modify-written with its resourceVersion.
                store
                    .commit(vec![Op::Create(entry(&format!("vm{writer}"), "10.0.1.1"))])
                    .unwrap();
                let mut done = 0;
                while done < INCREMENTS {
                    let mut current = store.get(&key).unwrap().unwrap();
                    let annotations = current.metadata.annotations.get_or_insert_default();
                    let count: usize = annotations.get("count").map_or(0, |c| c.parse().unwrap());
                    annotations.insert("count".into(), (count + 1).to_string());
                    match store.commit(vec![Op::Update(current)]) {
                        Ok(_) => done += 1,
                        Err(e) if matches!(e.error, StoreError::Conflict { .. }) => {
                            conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for server in &servers {
        let counter = server.get(&key).unwrap().unwrap();
        assert_eq!(
            counter.metadata.annotations.unwrap()["count"],
            (WRITERS * INCREMENTS).to_string(),
            "no increment lost"
        );
        assert_eq!(server.list(&entries()).unwrap().0.len(), WRITERS + 1);
    }
    assert!(
        conflicts.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the writers did race"
    );
}

#[test]
fn without_quorum_the_store_is_unavailable_and_then_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start(3, dir.path()).unwrap();
    let mut settings = config(&cluster, "mesh");
    settings.timeout = Duration::from_secs(2);
    let store = Store::open_etcd(&settings).unwrap();
    store
        .commit(vec![Op::Create(entry("before", "10.0.0.1"))])
        .unwrap();

    cluster.kill(0);
    store
        .commit(vec![Op::Create(entry("one-member-down", "10.0.0.2"))])
        .expect("two of three members are a quorum");

    cluster.kill(1);
    let started = tokio::time::Instant::now();
    let refused = store
        .commit(vec![Op::Create(entry("no-quorum", "10.0.0.3"))])
        .unwrap_err();
    assert!(
        matches!(refused.error, StoreError::Unavailable(_)),
        "{}",
        refused.error
    );
    assert!(
        refused.error.to_string().contains("quorum"),
        "{}",
        refused.error
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(store.fault().is_some());
    assert!(store.list(&entries()).is_err(), "no stale reads either");

    cluster.restart(0).unwrap();
    cluster.restart(1).unwrap();
    let mut waited = 0;
    while store.check_writable().is_err() {
        waited += 1;
        assert!(waited < 30, "etcd did not come back");
        std::thread::sleep(Duration::from_millis(500));
    }
    store
        .commit(vec![Op::Create(entry("after", "10.0.0.4"))])
        .unwrap();
    let names: Vec<String> = store
        .list(&entries())
        .unwrap()
        .0
        .iter()
        .map(|o| o.metadata.name().to_string())
        .collect();
    assert_eq!(names, ["after", "before", "one-member-down"]);
    assert!(store.fault().is_none());
}

#[test]
fn a_mesh_moves_from_the_embedded_store_to_etcd_with_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = Store::open(&dir.path().join("redb")).unwrap();
    embedded
        .commit(vec![Op::Create(entry("vm1", "10.0.0.1"))])
        .unwrap();
    embedded
        .write_records(vec![("revocations".into(), Some(b"{}".to_vec()))])
        .unwrap();
    let mut taken = Vec::new();
    let revision = embedded.snapshot(&mut taken).unwrap();
    drop(embedded);

    let cluster = EtcdCluster::start(1, &dir.path().join("etcd")).unwrap();
    let target = StoreLocation::Etcd(config(&cluster, "moved"));
    crate::snapshot::restore(&target, &mut taken.as_slice()).unwrap();
    let moved = Store::open_at(&target).unwrap();
    assert_eq!(moved.revision(), revision);
    let (entries_moved, _) = moved.list(&entries()).unwrap();
    assert_eq!(entries_moved.len(), 1);
    assert_eq!(entries_moved[0].body["spec"]["address"], "10.0.0.1");
    assert_eq!(moved.record("revocations").unwrap(), Some(b"{}".to_vec()));
}

/// A CA, a serving certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `dir`.
fn tls_files(dir: &Path) -> (vmesh_testkit::etcd::EtcdServerTls, EtcdTls) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![usage];
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec!["vmesh-server".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let ca_path = write("ca.pem", ca_pem);
    (
        vmesh_testkit::etcd::EtcdServerTls {
            cert: write("server.pem", server_cert),
            key: write("server-key.pem", server_key),
            client_ca: ca_path.clone(),
        },
        EtcdTls {
            ca: ca_path,
            client: Some((
                write("client.pem", client_cert),
                write("client-key.pem", client_key),
            )),
        },
    )
}

#[test]
fn over_tls_etcd_takes_the_servers_certificate_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let (server_tls, client_tls) = tls_files(dir.path());
    let cluster =
        EtcdCluster::start_with(None, 1, &dir.path().join("etcd"), Some(server_tls)).unwrap();
    let mut settings = config(&cluster, "mesh");
    settings.timeout = Duration::from_secs(2);

    let with_certificate = EtcdConfig {
        tls: Some(client_tls.clone()),
        ..settings.clone()
    };
    let store = Store::open_etcd(&with_certificate).unwrap();
    store
        .commit(vec![Op::Create(entry("vm1", "10.0.0.1"))])
        .unwrap();
    assert_eq!(store.list(&entries()).unwrap().0.len(), 1);

    // No client certificate, or no TLS at all: refused.
    let without_certificate = EtcdConfig {
        tls: Some(EtcdTls {
            client: None,
            ..client_tls
        }),
        ..settings.clone()
    };
    for refused in [without_certificate, settings] {
        let error = Store::open_etcd(&refused).unwrap_err();
        assert!(
            matches!(
                error,
                StoreError::Unavailable(_) | StoreError::Backend { .. }
            ),
            "{error}"
        );
    }
}
