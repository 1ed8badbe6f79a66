//! The benchmark's mesh and its change stream: `services` ServiceEntries
//! (`svc-N.bench.svc.cluster.local`, port 8080, HTTP) whose workloads are
//! `endpoints` WorkloadEntries each, and one change of each kind at a time.
//!
//! ServiceEntries rather than Kubernetes Services so that istiod, reading
//! the same objects from files, builds the same mesh. Every change leaves a
//! marker in the bytes of the resource that carries it (an address, an SNI,
//! a header value, a host name), so a simulated proxy can tell whether a
//! response carries a change without decoding it.

use serde_json::{Value, json};

pub const NAMESPACE: &str = "bench";
pub const PORT: u16 = 8080;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The kinds of change the benchmark makes, in the order it makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum ChangeKind {
    /// A WorkloadEntry's address moves (EDS).
    Endpoint,
    /// A DestinationRule changes a cluster (CDS, then its EDS again).
    Cluster,
    /// A VirtualService changes a route (RDS).
    Route,
    /// A new service with one endpoint (CDS, EDS, LDS/RDS).
    ServiceAdd,
    /// That service is deleted again (CDS, RDS).
    ServiceDelete,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 5] = [
        ChangeKind::Endpoint,
        ChangeKind::Cluster,
        ChangeKind::Route,
        ChangeKind::ServiceAdd,
        ChangeKind::ServiceDelete,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Endpoint => "endpoint",
            ChangeKind::Cluster => "cluster",
            ChangeKind::Route => "route",
            ChangeKind::ServiceAdd => "service-add",
            ChangeKind::ServiceDelete => "service-delete",
        }
    }
}

/// How a proxy recognises that it has a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A resource of this type whose bytes contain the marker.
    Contains(&'static str, Vec<u8>),
    /// No cluster any more whose name contains the marker.
    ClusterGone(String),
}

/// One write (or deletion) and what every proxy must then show.
#[derive(Debug, Clone)]
pub struct Change {
    pub write: Vec<Value>,
    pub delete: Vec<Value>,
    pub expect: Expect,
}

pub fn host(service: &str) -> String {
    format!("{service}.{NAMESPACE}.svc.cluster.local")
}

fn meta(name: &str) -> Value {
    json!({"name": name, "namespace": NAMESPACE})
}

fn service_entry(service: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": meta(service),
        "spec": {
            "hosts": [host(service)],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": [{"number": PORT, "name": "http", "protocol": "HTTP"}],
            "workloadSelector": {"labels": {"app": service}},
        },
    })
}

fn workload_entry(name: &str, service: &str, address: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": meta(name),
        "spec": {"address": address, "labels": {"app": service}, "serviceAccount": service},
    })
}

fn endpoint_address(n: usize) -> String {
    format!("10.{}.{}.{}", 20 + n / 62_500, n / 250 % 250, n % 250 + 1)
}

/// The whole mesh: a namespace, the services and their entries.
pub fn objects(services: usize, endpoints: usize) -> Vec<Value> {
    let mut objects = vec![json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE},
    })];
    for s in 0..services {
        let service = format!("svc-{s}");
        objects.push(service_entry(&service));
        for e in 0..endpoints {
            objects.push(workload_entry(
                &format!("{service}-{e}"),
                &service,
                &endpoint_address(s * endpoints + e),
            ));
        }
    }
    objects
}

/// The `round`th change of `kind` (rounds count from 0), on a mesh of
/// `services` services.
pub fn change(kind: ChangeKind, round: usize, services: usize) -> Change {
    let target = format!("svc-{}", round % services);
    let added = format!("bench-added-{round}");
    let (write, delete, expect) = match kind {
        ChangeKind::Endpoint => {
            let address = format!("10.250.{}.{}", round / 250 % 250, round % 250 + 1);
            let entry = workload_entry("svc-0-0", "svc-0", &address);
            let expect = Expect::Contains(ENDPOINT_TYPE, address.into_bytes());
            (vec![entry], vec![], expect)
        }
        ChangeKind::Cluster => {
            let sni = format!("bench-sni-{round}.example");
            let rule = json!({
                "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": meta(&target),
                "spec": {"host": host(&target), "trafficPolicy": {"tls": {"mode": "SIMPLE", "sni": sni}}},
            });
            (
                vec![rule],
                vec![],
                Expect::Contains(CLUSTER_TYPE, sni.into_bytes()),
            )
        }
        ChangeKind::Route => {
            let value = format!("bench-route-{round}");
            let service = json!({
                "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": meta(&target),
                "spec": {
                    "hosts": [host(&target)],
                    "http": [{
                        "headers": {"request": {"set": {"x-bench-change": value}}},
                        "route": [{"destination": {"host": host(&target)}}],
                    }],
                },
            });
            (
                vec![service],
                vec![],
                Expect::Contains(ROUTE_TYPE, value.into_bytes()),
            )
        }
        ChangeKind::ServiceAdd => {
            let objects = vec![
                service_entry(&added),
                workload_entry(&format!("{added}-0"), &added, "10.251.0.1"),
            ];
            let expect = Expect::Contains(ENDPOINT_TYPE, host(&added).into_bytes());
            (objects, vec![], expect)
        }
        ChangeKind::ServiceDelete => {
            let objects = vec![
                service_entry(&added),
                workload_entry(&format!("{added}-0"), &added, "10.251.0.1"),
            ];
            (vec![], objects, Expect::ClusterGone(host(&added)))
        }
    };
    Change {
        write,
        delete,
        expect,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_has_every_service_and_entry_once() {
        let objects = objects(300, 3);
        assert_eq!(objects.len(), 1 + 300 * 4);
        let addresses: std::collections::BTreeSet<_> = objects
            .iter()
            .filter_map(|o| o["spec"]["address"].as_str())
            .collect();
        assert_eq!(addresses.len(), 900, "no two entries share an address");
    }

    #[test]
    fn a_deletion_removes_what_the_addition_of_its_round_wrote() {
        let added = change(ChangeKind::ServiceAdd, 4, 10);
        let deleted = change(ChangeKind::ServiceDelete, 4, 10);
        assert_eq!(added.write, deleted.delete);
        assert_eq!(
            deleted.expect,
            Expect::ClusterGone("bench-added-4.bench.svc.cluster.local".into())
        );
    }
}
