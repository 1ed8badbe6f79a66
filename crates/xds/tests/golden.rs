//! Golden tests: the Envoy resources generated for the guide's manifests,
//! rendered readably (every `Any` decoded in place) and compared with
//! `tests/golden/*.txt`, so a change in translation shows in the diff.
//!
//! After an intended change: `UPDATE_GOLDEN=1 cargo test -p vmesh-xds --test golden`,
//! then read the diff before committing it.

use std::path::PathBuf;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;
use regex::Regex;
use vmesh_api::testing::{NOT_KUBERNETES, seed_dir};
use vmesh_registry::{DecodeCache, Snapshot, VipAllocator};
use vmesh_xds::ads::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use vmesh_xds::node::Proxy;
use vmesh_xds::translate::translate;

/// The `Debug` rendering of a message of a known type.
fn render(type_url: &str, bytes: &[u8]) -> Option<String> {
    fn debug<M: Message + Default + std::fmt::Debug>(bytes: &[u8]) -> Option<String> {
        M::decode(bytes).ok().map(|m| format!("{m:#?}"))
    }
    let name = type_url.rsplit('/').next()?;
    match name {
        "envoy.config.cluster.v3.Cluster" => debug::<Cluster>(bytes),
        "envoy.config.endpoint.v3.ClusterLoadAssignment" => debug::<ClusterLoadAssignment>(bytes),
        "envoy.config.listener.v3.Listener" => debug::<Listener>(bytes),
        "envoy.config.route.v3.RouteConfiguration" => debug::<RouteConfiguration>(bytes),
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" => {
            debug::<HttpConnectionManager>(bytes)
        }
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" => debug::<TcpProxy>(bytes),
        "envoy.extensions.filters.http.router.v3.Router" => debug::<Router>(bytes),
        "envoy.extensions.filters.http.fault.v3.HTTPFault" => debug::<HttpFault>(bytes),
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst" => {
            debug::<OriginalDst>(bytes)
        }
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" => {
            debug::<TlsInspector>(bytes)
        }
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" => {
            debug::<HttpProtocolOptions>(bytes)
        }
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate" => {
            debug::<PreviousHostsPredicate>(bytes)
        }
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" => {
            debug::<UpstreamTlsContext>(bytes)
        }
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext" => {
            debug::<DownstreamTlsContext>(bytes)
        }
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => debug::<RawBuffer>(bytes),
        "envoy.extensions.filters.http.rbac.v3.RBAC" => {
            HttpRbac::decode(bytes).ok().map(|r| rbac_rules(r.rules))
        }
        "envoy.extensions.filters.network.rbac.v3.RBAC" => {
            NetworkRbac::decode(bytes).ok().map(|r| rbac_rules(r.rules))
        }
        _ => None,
    }
}

/// RBAC rules with their policies in name order (Envoy's type keeps them in a HashMap).
fn rbac_rules(rules: Option<envoy_types::pb::envoy::config::rbac::v3::Rbac>) -> String {
    let rules = rules.unwrap_or_default();
    let policies: std::collections::BTreeMap<_, _> = rules.policies.into_iter().collect();
    format!("RBAC action {:?} {policies:#?}", rules.action)
}

/// Replaces every `Any { type_url, value: [bytes] }` in a `Debug` rendering
/// by the decoded message, indented where the `Any` was.
fn expand_anys(text: &str) -> String {
    let any = Regex::new(
        r#"(?m)^( *)(.*)Any \{\n *type_url: "([^"]+)",\n *value: \[([0-9,\s]*)\],\n *\}"#,
    )
    .unwrap();
    any.replace_all(text, |captures: &regex::Captures| {
        let indent = &captures[1];
        let bytes: Vec<u8> = captures[4]
            .split(',')
            .filter_map(|b| b.trim().parse().ok())
            .collect();
        let inner = match render(&captures[3], &bytes) {
            Some(decoded) => expand_anys(&decoded),
            None => format!("<{} bytes of {}>", bytes.len(), &captures[3]),
        };
        let inner = inner.replace('\n', &format!("\n{indent}"));
        format!("{indent}{}Any<{}> {inner}", &captures[2], &captures[3])
    })
    .into_owned()
}

/// Drops the lines of fields left at their default, which are most of them.
fn without_defaults(text: &str) -> String {
    let default = Regex::new(r#"^ *[a-z_0-9]+: (None|\[\]|\{\}|0|false|""),$"#).unwrap();
    text.lines()
        .filter(|line| !default.is_match(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every resource a proxy gets, one block per resource, in type then name order.
fn golden_text(proxy: &Proxy, snapshot: &Snapshot) -> String {
    let resources = translate(snapshot, proxy);
    let mut out = String::new();
    for type_url in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE] {
        let mut named: Vec<_> = resources.of_type(type_url).collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        for (name, resource) in named {
            let rendered = render(type_url, &resource.any.value).expect("a known type");
            out += &format!(
                "### {} {name}\n{}\n\n",
                type_url.rsplit('.').next().unwrap_or(""),
                without_defaults(&expand_anys(&rendered))
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
        "payment-vm.txt",
        &golden_text(&payment_vm(), &guide_snapshot()),
    );
}

#[test]
fn rendering_decodes_nested_anys() {
    let text = golden_text(&payment_vm(), &guide_snapshot());
    assert!(!text.contains("value: ["), "an Any was left undecoded");
    assert!(text.contains("Any<type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager>"));
}
