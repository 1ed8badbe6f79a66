//! The Kubernetes view of the mesh: what `kubectl get svc` and `kubectl get
//! endpoints` would show for a Service, computed from the [`Snapshot`] —
//! its virtual IPs ([`Snapshot::kubernetes_service`]) and the Endpoints of
//! the workloads it selects ([`endpoint_subsets`]).
//!
//! Kubernetes fills those in as it allocates addresses and watches pods;
//! here the registry's join is the only source, so what `get endpoints`
//! shows is exactly what the proxies are sent (unhealthy workloads as
//! `notReadyAddresses`).

use std::collections::BTreeMap;

use vmesh_api::kinds::endpoints::{EndpointAddress, EndpointPort, EndpointSubset, ObjectReference};
use vmesh_api::kinds::service::TransportProtocol;
use vmesh_api::kinds::workload_entry;

use crate::model::{EndpointAddress as Address, MeshService, Origin, Protocol, Snapshot};
use crate::policy::service_hostname;

impl Snapshot {
    /// The Kubernetes Service `namespace/name` as the mesh holds it, if it does.
    pub fn kubernetes_service(&self, namespace: &str, name: &str) -> Option<&MeshService> {
        self.service(&service_hostname(name, namespace, &self.mesh.domain_suffix))
            .filter(|s| s.origin == Origin::Service)
    }
}

/// The Endpoints subsets of a Service: one address per workload with an IP
/// (ready ones in `addresses`, unhealthy ones in `notReadyAddresses`),
/// workloads serving the same ports grouped together as Kubernetes groups
/// them. Workloads reached by host name, Unix socket or another network's
/// gateway have no IP and are left out, as Kubernetes has no place for them.
pub fn endpoint_subsets(service: &MeshService) -> Vec<EndpointSubset> {
    /// One workload at one address: its health, and service port → its port.
    struct Serving {
        healthy: bool,
        ports: BTreeMap<u16, u16>,
    }
    let mut workloads: BTreeMap<(&str, String), Serving> = BTreeMap::new();
    for endpoint in &service.endpoints {
        let Address::Ip(ip) = &endpoint.address else {
            continue;
        };
        let serving = workloads
            .entry((endpoint.workload.as_str(), ip.to_string()))
            .or_insert(Serving {
                healthy: endpoint.healthy,
                ports: BTreeMap::new(),
            });
        serving.healthy &= endpoint.healthy;
        serving.ports.insert(endpoint.service_port, endpoint.port);
    }
    // Port set → (ready, not ready) addresses.
    type Addresses = (Vec<EndpointAddress>, Vec<EndpointAddress>);
    let mut subsets: BTreeMap<Vec<(String, u16, bool)>, Addresses> = BTreeMap::new();
    for ((workload, ip), Serving { healthy, ports }) in workloads {
        let key: Vec<(String, u16, bool)> = ports
            .iter()
            .filter_map(|(service_port, target)| {
                let port = service.ports.iter().find(|p| p.port == *service_port)?;
                Some((port.name.clone(), *target, port.protocol == Protocol::Udp))
            })
            .collect();
        let (namespace, name) = workload.split_once('/').unwrap_or(("", workload));
        let address = EndpointAddress {
            ip,
            target_ref: Some(ObjectReference {
                kind: Some(workload_entry::KIND.kind.into()),
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                api_version: Some(workload_entry::KIND.preferred_api_version()),
                uid: None,
            }),
            ..EndpointAddress::default()
        };
        let (ready, not_ready) = subsets.entry(key).or_default();
        if healthy {
            ready.push(address);
        } else {
            not_ready.push(address);
        }
    }
    subsets
        .into_iter()
        .map(|(ports, (mut ready, mut not_ready))| {
            ready.sort();
            not_ready.sort();
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: (!ports.is_empty()).then(|| {
                    ports
                        .into_iter()
                        .map(|(name, port, udp)| EndpointPort {
                            name: (!name.is_empty()).then_some(name),
                            port: u32::from(port),
                            protocol: Some(if udp {
                                TransportProtocol::Udp
                            } else {
                                TransportProtocol::Tcp
                            }),
                            app_protocol: None,
                        })
                        .collect()
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::decode;

    fn snapshot(text: &str) -> Snapshot {
        crate::fixtures::snapshot(&decode("test.yaml", text))
    }

    const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: payment-service, namespace: vm-workloads}
spec:
  selector: {app: payment-service}
  ports:
  - {name: http, port: 8080, targetPort: 8080}
  - {name: grpc, port: 9090, targetPort: 9090}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-b, namespace: vm-workloads}
spec: {address: 10.0.0.2, labels: {app: payment-service}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-a, namespace: vm-workloads}
spec: {address: 10.0.0.1, labels: {app: payment-service}, ports: {http: 18080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-dns, namespace: vm-workloads}
spec: {address: vm.example.com, labels: {app: payment-service}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: elsewhere, namespace: other}
spec: {address: 10.0.0.9, labels: {app: payment-service}}
";

    #[test]
    fn subsets_group_workloads_by_their_ports() {
        let snapshot = snapshot(MESH);
        let service = snapshot
            .kubernetes_service("vm-workloads", "payment-service")
            .unwrap();
        assert!(
            snapshot
                .kubernetes_service("other", "payment-service")
                .is_none()
        );
        let subsets = serde_json::to_value(endpoint_subsets(service)).unwrap();
        let address = |ip: &str, name: &str| {
            serde_json::json!({"ip": ip, "targetRef": {
                "kind": "WorkloadEntry", "namespace": "vm-workloads", "name": name,
                "apiVersion": "networking.istio.io/v1",
            }})
        };
        let port = |name: &str, port: u16| serde_json::json!({"name": name, "port": port, "protocol": "TCP"});
        assert_eq!(
            subsets,
            serde_json::json!([
                {"addresses": [address("10.0.0.2", "vm-b")], "ports": [port("http", 8080), port("grpc", 9090)]},
                {"addresses": [address("10.0.0.1", "vm-a")], "ports": [port("http", 18080), port("grpc", 9090)]},
            ])
        );
    }

    #[test]
    fn unhealthy_workloads_are_not_ready() {
        let text = MESH.replace(
            "metadata: {name: vm-b, namespace: vm-workloads}",
            "metadata:\n  name: vm-b\n  namespace: vm-workloads\n  annotations: {proxy.istio.io/health-checks-enabled: \"true\"}",
        );
        let snapshot = snapshot(&text);
        let service = snapshot
            .kubernetes_service("vm-workloads", "payment-service")
            .unwrap();
        let subsets = endpoint_subsets(service);
        let not_ready: Vec<&str> = subsets
            .iter()
            .flat_map(|s| s.not_ready_addresses.iter().flatten())
            .map(|a| a.ip.as_str())
            .collect();
        let ready: Vec<&str> = subsets
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .map(|a| a.ip.as_str())
            .collect();
        assert_eq!((ready, not_ready), (vec!["10.0.0.1"], vec!["10.0.0.2"]));
    }
}
