//! What the translation's unit tests share: manifests translated for a
//! proxy in `shop`, and one resource decoded.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{self as core, Node};
use prost::Message;

use super::translate;
use crate::ads::{CLUSTER_TYPE, Resources};
use crate::node::Proxy;
use crate::testing::snapshot;

/// Everything a proxy in `shop` (at `locality`, if any) gets from these manifests.
pub(super) fn translate_yaml(text: &str, locality: Option<core::Locality>) -> Resources {
    let snapshot = snapshot(text);
    let node = Node {
        id: "sidecar~10.0.0.9~client.shop~shop.svc.cluster.local".into(),
        locality,
        ..Default::default()
    };
    translate(&snapshot, &Proxy::from_node(Some(&node)).unwrap())
}

pub(super) fn decoded<T: Message + Default>(
    resources: &Resources,
    type_url: &str,
    name: &str,
) -> T {
    let (_, resource) = resources.get(type_url, name).unwrap();
    T::decode(resource.any.value.as_slice()).unwrap()
}

pub(super) const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: shop}
spec:
  selector: {app: pay}
  ports: [{name: http, port: 8080}, {name: grpc, port: 9090}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm1, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: pay, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pay, namespace: shop}
spec:
  host: pay
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 7}}
"#;

pub(super) fn clusters() -> BTreeMap<String, Cluster> {
    translate_yaml(MESH, None)
        .of_type(CLUSTER_TYPE)
        .map(|(name, r)| {
            let cluster = Cluster::decode(r.any.value.as_slice()).unwrap();
            (name.to_string(), cluster)
        })
        .collect()
}
