//! Translation of the mesh into Envoy v3 resources for one sidecar, laid out
//! as Istio lays it out: `virtualOutbound` on 15001 handing connections to
//! per-port outbound listeners, `virtualInbound` on 15006, clusters named
//! `outbound|port|subset|host` fed by EDS, route configurations named by port.
//!
//! This module decides *what* Envoy gets; the ADS module decides *when*. It
//! only translates: which DestinationRule, VirtualServices, PeerAuthentications
//! and AuthorizationPolicies apply to a host or a workload, and which
//! endpoints a port or subset has, are the registry's lookups on the
//! [`Snapshot`]. One submodule per Envoy resource:
//!
//! - `cluster`: clusters, with a DestinationRule's traffic policy applied;
//! - `endpoint`: load assignments, with locality priorities;
//! - `route`: route configurations, from VirtualServices' HTTP routes;
//! - `listener`: listeners and filter chains (TCP and TLS routes, inbound
//!   chains with mTLS and RBAC);
//! - `telemetry`: what listeners report: access logs, tracers and Istio's
//!   metrics, and the metadata those read;
//! - `proto`: small protobuf builders they share.
//!
//! This module puts them together per proxy: `outbound` (shared by the
//! proxies of a namespace, locality and Telemetry resources, see
//! [`MeshConfig`]) and `inbound`
//! (the proxy's own). A new Envoy feature goes in the module of the resource
//! it configures; when it depends on which rule applies to a host or a
//! workload, that choice is a lookup in the registry, not here.

mod cluster;
mod endpoint;
mod listener;
mod proto;
mod route;
mod telemetry;
#[cfg(test)]
mod testing;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use envoy_types::util::pack_any;
use parking_lot::Mutex;
use vmesh_registry::telemetry::{SideTelemetry, WorkloadTelemetry};
use vmesh_registry::{EndpointAddress, MeshService, Resolution, Snapshot};

pub use cluster::{BLACKHOLE, PASSTHROUGH, cluster_name};
pub use listener::{INBOUND_PORT, OUTBOUND_PORT};

use crate::ads::{
    CLUSTER_TYPE, ConfigSource as AdsConfigSource, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE,
    ResourceSet, Resources,
};
use crate::node::Proxy;

/// What a proxy's outbound configuration depends on: proxies that agree on
/// it share one copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OutboundKey {
    namespace: String,
    locality: Option<String>,
    /// The Telemetry resources that apply to the proxy (namespace, name).
    telemetry: Vec<(String, String)>,
}

impl OutboundKey {
    fn of(snapshot: &Snapshot, proxy: &Proxy) -> OutboundKey {
        OutboundKey {
            namespace: proxy.namespace.clone(),
            locality: proxy.locality.clone(),
            telemetry: snapshot
                .telemetries_for(&proxy.namespace, &proxy.labels)
                .into_iter()
                .map(|t| (t.namespace.clone(), t.name.clone()))
                .collect(),
        }
    }
}

/// The telemetry of a proxy's workload.
fn telemetry_of(snapshot: &Snapshot, proxy: &Proxy) -> WorkloadTelemetry {
    snapshot.telemetry_for(&proxy.namespace, &proxy.labels)
}

/// A snapshot of the mesh, ready to translate for any proxy. Outbound
/// resources (nearly everything) are computed once per namespace and locality
/// on first demand and shared; only the inbound side is the proxy's own.
pub struct MeshConfig {
    snapshot: Snapshot,
    outbound: Mutex<HashMap<OutboundKey, Arc<OnceLock<Arc<ResourceSet>>>>>,
    /// The DNS name table: the same for every proxy.
    names: OnceLock<Arc<ResourceSet>>,
    /// When the first change this snapshot carries was seen.
    changed_at: Option<tokio::time::Instant>,
    /// The shared sets the configuration before this one had built: new
    /// ones are stabilized against them (`ResourceSet::stabilized`).
    earlier: Earlier,
}

/// The shared sets of an earlier configuration.
#[derive(Default)]
struct Earlier {
    outbound: HashMap<OutboundKey, Arc<ResourceSet>>,
    names: Option<Arc<ResourceSet>>,
}

impl MeshConfig {
    pub fn new(snapshot: Snapshot) -> MeshConfig {
        MeshConfig {
            snapshot,
            outbound: Mutex::default(),
            names: OnceLock::new(),
            changed_at: None,
            earlier: Earlier::default(),
        }
    }

    /// The same configuration, following `earlier`: its shared sets keep
    /// the bytes and versions of `earlier`'s wherever they mean the same,
    /// so that proxies are sent only what changed.
    pub fn following(self, earlier: &MeshConfig) -> MeshConfig {
        let outbound = earlier
            .outbound
            .lock()
            .iter()
            .filter_map(|(key, slot)| Some((key.clone(), slot.get()?.clone())))
            .collect();
        MeshConfig {
            earlier: Earlier {
                outbound,
                names: earlier.names.get().cloned(),
            },
            ..self
        }
    }

    /// The same configuration, built for changes first seen at `changed_at`.
    pub fn changed_at(self, changed_at: tokio::time::Instant) -> MeshConfig {
        MeshConfig {
            changed_at: Some(changed_at),
            ..self
        }
    }
}

impl AdsConfigSource for MeshConfig {
    fn changed_at(&self) -> Option<tokio::time::Instant> {
        self.changed_at
    }

    fn snapshot(&self) -> Option<&Snapshot> {
        Some(&self.snapshot)
    }

    fn resources(&self, proxy: &Proxy) -> Resources {
        let key = OutboundKey::of(&self.snapshot, proxy);
        // The map's lock is held only to find the slot: proxies of another
        // key do not wait while this one is computed.
        let slot = self.outbound.lock().entry(key.clone()).or_default().clone();
        let shared = slot
            .get_or_init(|| {
                let telemetry = telemetry_of(&self.snapshot, proxy);
                let set = outbound(&self.snapshot, &key, &telemetry.client);
                Arc::new(match self.earlier.outbound.get(&key) {
                    Some(earlier) => set.stabilized(earlier),
                    None => set,
                })
            })
            .clone();
        let names = self
            .names
            .get_or_init(|| {
                let set = crate::nds::name_table_resources(&self.snapshot);
                Arc::new(match &self.earlier.names {
                    Some(earlier) => set.stabilized(earlier),
                    None => set,
                })
            })
            .clone();
        Resources::layered(vec![
            shared,
            names,
            Arc::new(inbound(&self.snapshot, proxy)),
        ])
    }
}

/// Everything a proxy gets, computed for it alone.
pub fn translate(snapshot: &Snapshot, proxy: &Proxy) -> Resources {
    let telemetry = telemetry_of(snapshot, proxy);
    Resources::layered(vec![
        Arc::new(outbound(
            snapshot,
            &OutboundKey::of(snapshot, proxy),
            &telemetry.client,
        )),
        Arc::new(crate::nds::name_table_resources(snapshot)),
        Arc::new(inbound(snapshot, proxy)),
    ])
}

/// The clusters, endpoints, listeners and routes for calling out of a proxy.
fn outbound(snapshot: &Snapshot, proxy: &OutboundKey, telemetry: &SideTelemetry) -> ResourceSet {
    let mut set = ResourceSet::default();
    let mut http_ports: BTreeMap<u16, Vec<&MeshService>> = BTreeMap::new();
    for service in &snapshot.services {
        let rule = snapshot.destination_rule_for(service, &proxy.namespace);
        let origin = snapshot
            .destination_rule_origin(service, &proxy.namespace)
            .map(|dr| proto::config_metadata("destination-rule", &dr.namespace, &dr.name));
        let locality = endpoint::locality_policy(rule.as_deref(), proxy.locality.as_deref());
        for port in &service.ports {
            let clusters = cluster::outbound_clusters(
                service,
                port,
                rule.as_deref(),
                &snapshot.mesh.trust_domain,
            );
            for (mut cluster, subset) in clusters {
                if let Some(origin) = &origin {
                    let metadata = cluster.metadata.get_or_insert_with(Default::default);
                    metadata
                        .filter_metadata
                        .extend(origin.filter_metadata.clone());
                }
                if service.resolution == Resolution::Static {
                    let assignment = endpoint::load_assignment(
                        &cluster.name,
                        service,
                        port.port,
                        subset,
                        locality.as_ref(),
                    );
                    set.insert(ENDPOINT_TYPE, cluster.name.clone(), pack_any(assignment));
                }
                set.insert(CLUSTER_TYPE, cluster.name.clone(), pack_any(cluster));
            }
            if port.protocol.is_http() {
                http_ports.entry(port.port).or_default().push(service);
            } else {
                for listener in listener::outbound_tcp(snapshot, service, port.port, telemetry) {
                    set.insert(LISTENER_TYPE, listener.name.clone(), pack_any(listener));
                }
            }
        }
    }
    for (port, services) in &http_ports {
        let routes = route::outbound_routes(snapshot, *port, services, &proxy.namespace);
        set.insert(ROUTE_TYPE, routes.name.clone(), pack_any(routes));
        let listener = listener::outbound_http(snapshot, *port, telemetry);
        set.insert(LISTENER_TYPE, listener.name.clone(), pack_any(listener));
    }
    for cluster in cluster::fallback_clusters() {
        set.insert(CLUSTER_TYPE, cluster.name.clone(), pack_any(cluster));
    }
    let listener = listener::virtual_outbound(cluster::fallback_cluster(snapshot), telemetry);
    set.insert(LISTENER_TYPE, listener.name.clone(), pack_any(listener));
    set
}

/// The inbound side of a proxy: a cluster and a chain per port its workload
/// serves, to the local application.
fn inbound(snapshot: &Snapshot, proxy: &Proxy) -> ResourceSet {
    let at_proxy = EndpointAddress::Ip(proxy.ip);
    // Each port the workload serves, the first service port that targets
    // it, and whether that is HTTP.
    let mut served: BTreeMap<u16, (&MeshService, bool)> = BTreeMap::new();
    for service in &snapshot.services {
        for endpoint in service.endpoints.iter().filter(|e| e.address == at_proxy) {
            let http = service
                .ports
                .iter()
                .find(|p| p.port == endpoint.service_port)
                .is_some_and(|p| p.protocol.is_http());
            served.entry(endpoint.port).or_insert((service, http));
        }
    }
    let mut set = ResourceSet::default();
    for (&port, (service, _)) in &served {
        let cluster = cluster::inbound_cluster(port, service);
        set.insert(CLUSTER_TYPE, cluster.name.clone(), pack_any(cluster));
    }
    let http: BTreeMap<u16, bool> = served.iter().map(|(&p, (_, http))| (p, *http)).collect();
    let telemetry = telemetry_of(snapshot, proxy);
    let listener = listener::virtual_inbound(snapshot, proxy, &http, &telemetry.server);
    set.insert(LISTENER_TYPE, listener.name.clone(), pack_any(listener));
    set
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Node;

    use super::*;
    use crate::ads::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

    const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: payment, namespace: vm}
spec: {selector: {app: payment}, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: pay-1, namespace: vm}
spec: {address: 10.0.0.1, serviceAccount: pay, labels: {app: payment, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: pay-2, namespace: vm}
spec: {address: 10.0.0.2, serviceAccount: pay, labels: {app: payment, version: v2}}
";

    #[test]
    fn a_rebuild_of_the_same_mesh_keeps_every_version() {
        let node = Node {
            id: "sidecar~10.0.0.9~client.vm~vm.svc.cluster.local".into(),
            ..Default::default()
        };
        let proxy = Proxy::from_node(Some(&node)).unwrap();
        let versions = |resources: &Resources| -> Vec<(String, u64)> {
            [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]
                .iter()
                .flat_map(|t| resources.of_type(t))
                .map(|(name, r)| (name.to_string(), r.version))
                .collect()
        };
        let first = MeshConfig::new(crate::testing::snapshot(MESH));
        let before = versions(&first.resources(&proxy));
        assert!(before.iter().any(|(name, _)| name.contains("payment")));
        // Built again from scratch: maps in endpoint and cluster metadata
        // encode in another order, yet nothing counts as changed.
        for _ in 0..5 {
            let again = MeshConfig::new(crate::testing::snapshot(MESH)).following(&first);
            assert_eq!(versions(&again.resources(&proxy)), before);
        }
    }
}
