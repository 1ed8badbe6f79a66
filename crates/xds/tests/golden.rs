//! Golden tests: the Envoy resources generated for the guide's manifests,
//! in Envoy's JSON (every `Any` decoded in place, map keys sorted, defaults
//! left out) and compared with `tests/golden/*.json`, so a change in
//! translation shows in the diff.
//!
//! After an intended change: `UPDATE_GOLDEN=1 cargo test -p vmesh-xds --test golden`,
//! then read the diff before committing it.

use std::path::PathBuf;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::{Message, Name};
use vmesh_api::testing::{NOT_KUBERNETES, seed_dir};
use vmesh_registry::{DecodeCache, Snapshot, VipAllocator};
use vmesh_xds::ads::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use vmesh_xds::config_dump::to_json;
use vmesh_xds::node::Proxy;
use vmesh_xds::translate::translate;

/// A resource of a known type in Envoy's JSON.
fn render(type_url: &str, bytes: &[u8]) -> serde_json::Value {
    fn json<M: Message + Name + Default>(bytes: &[u8]) -> serde_json::Value {
        to_json(&M::decode(bytes).expect("a resource that decodes")).expect("Envoy's JSON")
    }
    match type_url.rsplit('/').next().unwrap_or_default() {
        "envoy.config.cluster.v3.Cluster" => json::<Cluster>(bytes),
        "envoy.config.endpoint.v3.ClusterLoadAssignment" => json::<ClusterLoadAssignment>(bytes),
        "envoy.config.listener.v3.Listener" => json::<Listener>(bytes),
        "envoy.config.route.v3.RouteConfiguration" => json::<RouteConfiguration>(bytes),
        other => panic!("no golden rendering for {other}"),
    }
}

/// `value` with every object's keys in order: Envoy's map fields come out
/// of hash maps.
fn sorted(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

fn golden_text(proxy: &Proxy, snapshot: &Snapshot) -> String {
    let resources = translate(snapshot, proxy);
    let mut out = String::new();
    for type_url in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE] {
        let mut named: Vec<_> = resources.of_type(type_url).collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        for (name, resource) in named {
            let rendered = sorted(render(type_url, &resource.any.value));
            out += &format!(
                "### {} {name}\n{}\n\n",
                type_url.rsplit('.').next().unwrap_or(""),
                serde_json::to_string_pretty(&rendered).expect("JSON")
            );
        }
    }
    out
}

fn guide_snapshot() -> Snapshot {
    let mut objects = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(seed_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !NOT_KUBERNETES.iter().any(|n| p.ends_with(n)))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let decoded = vmesh_api::decode_manifests(&path.display().to_string(), &text);
        assert!(
            !decoded.has_errors(),
            "{}: {:?}",
            path.display(),
            decoded.problems
        );
        objects.extend(decoded.objects.into_iter().map(|l| l.object));
    }
    Snapshot::build(
        &objects,
        &mut DecodeCache::default(),
        &mut VipAllocator::default(),
    )
}

/// The guide's VM (`workload-entry-payment-vm1.yaml`) as its own proxy sees itself.
fn payment_vm() -> Proxy {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    Proxy::from_node(Some(&Node {
        id: "sidecar~192.168.1.100~payment-service-vm1.vm-workloads~vm-workloads.svc.cluster.local"
            .into(),
        locality: Some(Locality {
            region: "us-west1".into(),
            zone: "zone-a".into(),
            ..Default::default()
        }),
        metadata: Some(Struct {
            fields: [
                ("NAMESPACE".to_string(), string("vm-workloads")),
                ("SERVICE_ACCOUNT".to_string(), string("payment-service-sa")),
                (
                    "LABELS".to_string(),
                    Value {
                        kind: Some(Kind::StructValue(Struct {
                            fields: [
                                ("app".to_string(), string("payment-service")),
                                ("version".to_string(), string("v1")),
                            ]
                            .into(),
                        })),
                    },
                ),
            ]
            .into(),
        }),
        ..Default::default()
    }))
    .unwrap()
}

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the generated resources from line {}:\n  golden:    {:?}\n  generated: {:?}\n\
             If the change is intended: UPDATE_GOLDEN=1 cargo test -p vmesh-xds --test golden, and review the diff.",
            path.display(),
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line),
        );
    }
}

#[test]
fn the_guides_payment_vm_gets_these_resources() {
    check(
        "payment-vm.json",
        &golden_text(&payment_vm(), &guide_snapshot()),
    );
}

#[test]
fn rendering_decodes_nested_anys() {
    let text = golden_text(&payment_vm(), &guide_snapshot());
    assert!(
        text.contains(r#""@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager""#)
    );
    assert!(text.contains(
        r#""@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog""#
    ));
}
