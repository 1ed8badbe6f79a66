//! The join: Services and ServiceEntries with the workloads that back them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use vmesh_api::Object;
use vmesh_api::kinds::common::IntOrString;
use vmesh_api::kinds::service::{ServicePort, ServiceSpec, ServiceType};
use vmesh_api::kinds::service_entry::{self, Location, ServiceEntrySpec};
use vmesh_api::kinds::workload_entry::WorkloadEntrySpec;

use crate::inputs::{DecodeCache, Inputs, Workload};
use crate::model::{
    MeshEndpoint, MeshPort, MeshService, Origin, Protocol, Resolution, Scoped, Snapshot,
};
use crate::policy::service_hostname;
use crate::selector::Selector;
use crate::vip::{Pool, VipAllocator};

impl Snapshot {
    /// Joins the objects into the mesh model, typed through `decoded` (which
    /// the caller keeps from one build to the next). VIPs that are not written in
    /// the objects come from `vips`, first brought in line with the objects
    /// (the caller persists [`VipAllocator::allocations`] when they change);
    /// a service the allocator has no room for has no VIP.
    pub fn build(
        objects: &[Object],
        decoded: &mut DecodeCache,
        vips: &mut VipAllocator,
    ) -> Snapshot {
        let inputs = Inputs::decode(objects, decoded);
        let drafts = drafts(&inputs);
        vips.assign(&drafts);
        let services = drafts
            .into_iter()
            .map(|draft| {
                let mut service = draft.service;
                if draft.auto_vip.is_some() {
                    service.addresses.extend(vips.get(&service.hostname));
                }
                service
            })
            .collect();
        Snapshot {
            services,
            destination_rules: inputs.destination_rules,
            virtual_services: inputs.virtual_services,
            peer_authentications: inputs.peer_authentications,
            authorization_policies: inputs.authorization_policies,
            mesh: inputs.mesh,
        }
    }
}

/// A service before VIP allocation: its written addresses, and the pool it
/// takes a VIP from when it has none.
pub(crate) struct Draft {
    pub service: MeshService,
    pub auto_vip: Option<Pool>,
}

/// Every service of the mesh, sorted by hostname. When two objects claim a
/// hostname, Services win over ServiceEntries, then the first by namespace and name.
pub(crate) fn drafts(inputs: &Inputs) -> Vec<Draft> {
    let mut drafts: Vec<Draft> = inputs
        .services
        .iter()
        .map(|s| kube_service(s, &inputs.workloads, &inputs.mesh.domain_suffix))
        .chain(
            inputs
                .service_entries
                .iter()
                .flat_map(|e| entry_services(e, &inputs.workloads)),
        )
        .collect();
    drafts.sort_by(|a, b| a.service.hostname.cmp(&b.service.hostname));
    drafts.dedup_by(|later, kept| {
        let duplicate = later.service.hostname == kept.service.hostname;
        if duplicate {
            tracing::warn!(
                host = %later.service.hostname,
                ignored = %format!("{}/{}", later.service.namespace, later.service.name),
                kept = %format!("{}/{}", kept.service.namespace, kept.service.name),
                "hostname defined twice",
            );
        }
        duplicate
    });
    drafts
}

fn kube_service(
    svc: &Scoped<ServiceSpec>,
    workloads: &[Arc<Workload>],
    domain_suffix: &str,
) -> Draft {
    let spec = &svc.spec;
    let ports: Vec<(&ServicePort, MeshPort)> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let mesh_port = MeshPort {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.port).ok()?,
                target_port: match &p.target_port {
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    _ => None,
                },
                protocol: Protocol::of_service_port(p),
            };
            Some((p, mesh_port))
        })
        .collect();

    let mut addresses: Vec<IpAddr> = Vec::new();
    for ip in spec.cluster_ips.iter().flatten().chain(&spec.cluster_ip) {
        if let Ok(ip) = ip.parse()
            && !addresses.contains(&ip)
        {
            addresses.push(ip);
        }
    }
    let external_name = spec
        .external_name
        .as_ref()
        .filter(|_| spec.type_ == Some(ServiceType::ExternalName));
    let headless = spec.cluster_ip.as_deref() == Some("None");

    let mut endpoints = Vec::new();
    let (resolution, auto_vip) = if let Some(external_name) = external_name {
        // Like Istio: a DNS service whose one endpoint is the external name.
        let workload = Workload::written(&svc.namespace, &svc.name, at(external_name));
        for (_, port) in &ports {
            endpoints.extend(endpoint(&workload, port.port, port.port));
        }
        (Resolution::Dns, None)
    } else {
        // A Service without a selector (or with an empty one) selects no workload.
        let selector = Selector::new(spec.selector.as_ref());
        if !selector.is_empty() {
            let selected = workloads
                .iter()
                .filter(|w| w.namespace == svc.namespace && selector.matches(&w.labels));
            for workload in selected {
                for (port, mesh_port) in &ports {
                    if let Some(target) =
                        kube_target_port(port, mesh_port, workload.spec.ports.as_ref())
                    {
                        endpoints.extend(endpoint(workload, target, mesh_port.port));
                    }
                }
            }
        }
        if headless {
            (Resolution::Passthrough, None)
        } else {
            (
                Resolution::Static,
                addresses.is_empty().then_some(Pool::Service),
            )
        }
    };

    Draft {
        service: finish(MeshService {
            hostname: service_hostname(&svc.name, &svc.namespace, domain_suffix),
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            origin: Origin::Service,
            addresses,
            ports: ports.into_iter().map(|(_, p)| p).collect(),
            resolution,
            mesh_external: external_name.is_some(),
            endpoints,
            service_accounts: Vec::new(),
        }),
        auto_vip,
    }
}

/// The port on a workload behind a Service port: a named `targetPort` must be
/// in the entry's `ports` (else the workload does not serve that port);
/// otherwise the entry's port of the service port's name, else the numeric
/// `targetPort`, else the service port itself.
fn kube_target_port(
    port: &ServicePort,
    mesh_port: &MeshPort,
    named_ports: Option<&BTreeMap<String, u32>>,
) -> Option<u16> {
    let named = |name: &str| named_ports?.get(name).and_then(|p| u16::try_from(*p).ok());
    match &port.target_port {
        Some(IntOrString::String(name)) => named(name),
        _ => named(&mesh_port.name)
            .or(mesh_port.target_port)
            .or(Some(mesh_port.port)),
    }
}

/// One service per host of a ServiceEntry, all with the same ports and endpoints.
fn entry_services(entry: &Scoped<ServiceEntrySpec>, workloads: &[Arc<Workload>]) -> Vec<Draft> {
    let spec = &entry.spec;
    let resolution = match spec.resolution.unwrap_or(service_entry::Resolution::None) {
        service_entry::Resolution::None => Resolution::Passthrough,
        service_entry::Resolution::Static => Resolution::Static,
        service_entry::Resolution::Dns => Resolution::Dns,
        service_entry::Resolution::DnsRoundRobin => Resolution::DnsRoundRobin,
    };
    let ports: Vec<MeshPort> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(MeshPort {
                name: p.name.clone(),
                port: u16::try_from(p.number).ok()?,
                target_port: p.target_port.and_then(|t| u16::try_from(t).ok()),
                protocol: Protocol::parse(p.protocol.as_deref().unwrap_or_default()),
            })
        })
        .collect();
    let addresses: Option<Vec<IpAddr>> = spec
        .addresses
        .as_ref()
        .filter(|a| !a.is_empty())
        .map(|a| a.iter().filter_map(|s| single_ip(s)).collect());

    let inline: Vec<Workload> = spec
        .endpoints
        .iter()
        .flatten()
        .map(|e| Workload::written(&entry.namespace, &entry.name, e.clone()))
        .collect();
    // An empty `workloadSelector` selects every workload of the namespace.
    let selected = spec.workload_selector.iter().flat_map(|selector| {
        let selector = Selector::new(selector.labels.as_ref());
        workloads
            .iter()
            .filter(move |w| w.namespace == entry.namespace && selector.matches(&w.labels))
            .map(Arc::as_ref)
    });
    let mut endpoints = Vec::new();
    for workload in inline.iter().chain(selected) {
        for port in &ports {
            if let Some(target) = entry_target_port(port, workload.spec.ports.as_ref()) {
                endpoints.extend(endpoint(workload, target, port.port));
            }
        }
    }
    let written_endpoints = !inline.is_empty() || spec.workload_selector.is_some();
    // DNS without endpoints resolves the host itself.
    let resolve_host =
        !written_endpoints && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin);

    spec.hosts
        .iter()
        .map(|host| {
            let mut endpoints = endpoints.clone();
            if resolve_host {
                let workload = Workload::written(&entry.namespace, &entry.name, at(host));
                for port in &ports {
                    let target = port.target_port.unwrap_or(port.port);
                    endpoints.extend(endpoint(&workload, target, port.port));
                }
            }
            // Every non-wildcard host without written addresses gets a VIP,
            // except passthrough hosts with nothing to resolve to.
            let auto_vip = (addresses.is_none()
                && !host.starts_with('*')
                && (resolution != Resolution::Passthrough || written_endpoints))
                .then_some(Pool::ServiceEntry);
            Draft {
                service: finish(MeshService {
                    hostname: host.clone(),
                    namespace: entry.namespace.clone(),
                    name: entry.name.clone(),
                    origin: Origin::ServiceEntry,
                    addresses: addresses.clone().unwrap_or_default(),
                    ports: ports.clone(),
                    resolution,
                    mesh_external: spec.location != Some(Location::MeshInternal),
                    endpoints,
                    service_accounts: Vec::new(),
                }),
                auto_vip,
            }
        })
        .collect()
}

/// The port on a workload behind a ServiceEntry port: a workload that names
/// its ports serves only those; otherwise the `targetPort`, else the port itself.
fn entry_target_port(port: &MeshPort, named_ports: Option<&BTreeMap<String, u32>>) -> Option<u16> {
    match named_ports.filter(|p| !p.is_empty()) {
        Some(named) => named.get(&port.name).and_then(|p| u16::try_from(*p).ok()),
        None => Some(port.target_port.unwrap_or(port.port)),
    }
}

/// An address of a ServiceEntry that is one IP (`10.0.0.1` or `10.0.0.1/32`), not a range.
fn single_ip(address: &str) -> Option<IpAddr> {
    address.parse().ok().or_else(|| {
        let net: ipnet::IpNet = address.parse().ok()?;
        (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
    })
}

/// A workload at a hostname, for services that resolve a name.
fn at(host: &str) -> WorkloadEntrySpec {
    WorkloadEntrySpec {
        address: Some(host.to_string()),
        ..WorkloadEntrySpec::default()
    }
}

/// The workload as an endpoint of `service_port` on its `port`, if it has an address.
fn endpoint(workload: &Workload, port: u16, service_port: u16) -> Option<MeshEndpoint> {
    let spec = &workload.spec;
    Some(MeshEndpoint {
        address: workload.address.clone()?,
        port,
        service_port,
        weight: spec.weight.filter(|w| *w > 0).unwrap_or(1),
        locality: spec.locality.clone(),
        network: spec.network.clone(),
        labels: workload.labels.clone(),
        service_account: spec.service_account.clone(),
        workload: format!("{}/{}", workload.namespace, workload.name),
        healthy: workload.healthy,
    })
}

/// Sorts the endpoints and collects their service accounts.
fn finish(mut service: MeshService) -> MeshService {
    // By the address as written, as they were ordered when addresses were text.
    service.endpoints.sort_by_cached_key(|e| {
        (
            e.address.written().into_owned(),
            e.port,
            e.service_port,
            e.workload.clone(),
        )
    });
    let mut accounts: Vec<String> = service
        .endpoints
        .iter()
        .filter_map(|e| e.service_account.clone())
        .collect();
    accounts.sort();
    accounts.dedup();
    service.service_accounts = accounts;
    service
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{decode, seed, snapshot};
    use crate::{EndpointAddress, OutboundPolicy};

    fn owned(expected: &[(&str, u16, u16)]) -> Vec<(String, u16, u16)> {
        expected
            .iter()
            .map(|(address, port, service_port)| (address.to_string(), *port, *service_port))
            .collect()
    }

    fn addresses(service: &MeshService) -> Vec<(String, u16, u16)> {
        service
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.port, e.service_port))
            .collect()
    }

    #[test]
    fn guide_payment_service_and_database() {
        let snapshot = snapshot(&seed(&[
            "complete-vm-integration.yaml",
            "workload-entry-payment-vm1.yaml",
            "service-entry-vm-database.yaml",
        ]));

        let payment = snapshot
            .service("payment-service.vm-workloads.svc.cluster.local")
            .unwrap();
        let ports: Vec<_> = payment
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", 8080, Protocol::Http),
                ("grpc", 9090, Protocol::Grpc)
            ]
        );
        assert_eq!(payment.resolution, Resolution::Static);
        assert!(!payment.mesh_external);
        assert_eq!(
            addresses(payment),
            owned(&[("192.168.1.100", 8080, 8080), ("192.168.1.100", 9090, 9090)])
        );
        for endpoint in &payment.endpoints {
            assert_eq!(
                endpoint.service_account.as_deref(),
                Some("payment-service-sa")
            );
            assert_eq!(endpoint.locality.as_deref(), Some("us-west1/zone-a"));
            assert_eq!(endpoint.network.as_deref(), Some("network1"));
            assert_eq!(endpoint.weight, 100);
            assert_eq!(endpoint.workload, "vm-workloads/payment-service-vm1");
            assert!(endpoint.healthy);
            assert_eq!(endpoint.labels["instance-id"], "vm1");
            assert_eq!(endpoint.labels["class"], "vm");
        }
        assert_eq!(payment.service_accounts, ["payment-service-sa"]);
        assert_eq!(payment.addresses.len(), 1);

        let database = snapshot
            .service("vm-database.vm-workloads.svc.cluster.local")
            .unwrap();
        let ports: Vec<_> = database
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [
                ("mysql", 3306, Protocol::Tcp),
                ("mysql-readonly", 3307, Protocol::Tcp)
            ]
        );
        assert_eq!(
            addresses(database),
            owned(&[("192.168.1.200", 3306, 3306), ("192.168.1.201", 3307, 3307)])
        );
        assert_eq!(database.endpoints[1].labels["role"], "replica");
        assert_eq!(database.endpoints[1].workload, "vm-workloads/vm-database");
        assert!(!database.mesh_external);
        assert_eq!(database.resolution, Resolution::Static);
        let [IpAddr::V4(vip)] = database.addresses[..] else {
            panic!("one IPv4 VIP expected: {:?}", database.addresses);
        };
        assert_eq!(vip.octets()[..2], [240, 240]);

        let hosts: Vec<_> = snapshot.services.iter().map(|s| &s.hostname).collect();
        assert_eq!(hosts.len(), 2);
        assert!(hosts.is_sorted());
        assert_eq!(snapshot.destination_rules[0].name, "payment-service");
    }

    #[test]
    fn target_ports_map_through_workload_ports() {
        let snapshot = snapshot(&decode(
            "t.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: app-port}
  - {name: admin, port: 81, targetPort: 9001}
  - {name: metrics, port: 82}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: a, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: web}, ports: {app-port: 8080, admin: 9100}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: b, namespace: shop}
spec: {address: 10.0.0.2, labels: {app: web}}
"#,
        ));
        let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
        assert_eq!(
            addresses(web),
            owned(&[
                // a: named target from its ports; admin by port name over targetPort.
                ("10.0.0.1", 82, 82),
                ("10.0.0.1", 8080, 80),
                ("10.0.0.1", 9100, 81),
                // b: has no app-port, so it does not serve port 80.
                ("10.0.0.2", 82, 82),
                ("10.0.0.2", 9001, 81),
            ])
        );
        assert_eq!(web.ports[0].target_port, None);
        assert_eq!(web.ports[1].target_port, Some(9001));
        assert!(web.service_accounts.is_empty());
    }

    #[test]
    fn selectors_stay_in_their_namespace() {
        let snapshot = snapshot(&decode(
            "t.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: unselected, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: here, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: elsewhere, namespace: other}
spec: {address: 10.0.0.2, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: labelled-in-metadata, namespace: shop, labels: {app: web}}
spec: {address: 10.0.0.3}
"#,
        ));
        let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
        assert_eq!(
            addresses(web),
            owned(&[("10.0.0.1", 80, 80), ("10.0.0.3", 80, 80)])
        );
        let unselected = snapshot
            .service("unselected.shop.svc.cluster.local")
            .unwrap();
        assert!(unselected.endpoints.is_empty());
    }

    #[test]
    fn cluster_ips_headless_and_external_name_services() {
        let snapshot = snapshot(&decode(
            "t.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: fixed, namespace: shop}
spec: {clusterIP: 10.96.7.7, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{name: tcp, port: 5000}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: api.example.com, ports: [{name: https, port: 443}]}
"#,
        ));
        let fixed = snapshot.service("fixed.shop.svc.cluster.local").unwrap();
        assert_eq!(fixed.addresses, ["10.96.7.7".parse::<IpAddr>().unwrap()]);

        let headless = snapshot.service("headless.shop.svc.cluster.local").unwrap();
        assert!(headless.addresses.is_empty());
        assert_eq!(headless.resolution, Resolution::Passthrough);

        let ext = snapshot.service("ext.shop.svc.cluster.local").unwrap();
        assert!(ext.addresses.is_empty());
        assert_eq!(ext.resolution, Resolution::Dns);
        assert!(ext.mesh_external);
        assert_eq!(addresses(ext), owned(&[("api.example.com", 443, 443)]));
    }

    #[test]
    fn health_from_conditions_and_annotation() {
        let entry = |name: &str, annotated: bool, status: Option<&str>| {
            let annotations = if annotated {
                "annotations: {proxy.istio.io/health-checks-enabled: \"true\"}"
            } else {
                ""
            };
            let status = status
                .map(|s| format!("status: {{conditions: [{{type: Healthy, status: \"{s}\"}}]}}"))
                .unwrap_or_default();
            format!(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: shop\n  {annotations}\nspec: {{address: 10.0.0.1, labels: {{app: web}}}}\n{status}\n---\n"
            )
        };
        let text = [
            entry("plain", false, None),
            entry("failing", false, Some("False")),
            entry("unprobed", true, None),
            entry("probed", true, Some("True")),
            entry("probe-failing", true, Some("False")),
        ]
        .concat()
            + "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, ports: [{name: http, port: 80}]}\n";
        let snapshot = snapshot(&decode("t.yaml", &text));
        let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
        let health: BTreeMap<_, _> = web
            .endpoints
            .iter()
            .map(|e| (e.workload.as_str(), e.healthy))
            .collect();
        assert_eq!(
            health,
            BTreeMap::from([
                ("shop/failing", false),
                ("shop/plain", true),
                ("shop/probe-failing", false),
                ("shop/probed", true),
                ("shop/unprobed", false),
            ])
        );
    }

    #[test]
    fn service_entry_resolutions_and_vips() {
        let snapshot = snapshot(&decode(
            "t.yaml",
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com, "*.cdn.example.com"]
  ports: [{name: https, number: 443, protocol: HTTPS, targetPort: 8443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: shop}
spec:
  hosts: [db.internal]
  addresses: [10.1.0.0/16, 10.2.0.5/32, 10.3.0.1]
  ports: [{name: tcp, number: 5432}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: no-endpoints, namespace: shop}
spec:
  hosts: [anything.internal]
  ports: [{name: tcp, number: 5432}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: selected, namespace: shop}
spec:
  hosts: [cache.internal]
  ports: [{name: redis, number: 6379, protocol: REDIS}]
  workloadSelector: {labels: {app: cache}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: cache-1, namespace: shop}
spec: {address: 10.0.0.9, labels: {app: cache}, serviceAccount: cache}
"#,
        ));
        let api = snapshot.service("api.example.com").unwrap();
        assert_eq!(api.resolution, Resolution::Dns);
        assert!(api.mesh_external);
        assert_eq!(api.ports[0].protocol, Protocol::Https);
        assert_eq!(addresses(api), owned(&[("api.example.com", 8443, 443)]));
        assert_eq!(api.addresses.len(), 1);

        let wildcard = snapshot.service("*.cdn.example.com").unwrap();
        assert!(wildcard.addresses.is_empty());

        let db = snapshot.service("db.internal").unwrap();
        assert_eq!(db.resolution, Resolution::Passthrough);
        let written: Vec<IpAddr> = ["10.2.0.5", "10.3.0.1"].map(|a| a.parse().unwrap()).into();
        assert_eq!(db.addresses, written);

        let bare = snapshot.service("anything.internal").unwrap();
        assert!(bare.addresses.is_empty() && bare.endpoints.is_empty());

        let cache = snapshot.service("cache.internal").unwrap();
        assert_eq!(cache.addresses.len(), 1, "NONE with a selector gets a VIP");
        assert_eq!(addresses(cache), owned(&[("10.0.0.9", 6379, 6379)]));
        assert_eq!(cache.service_accounts, ["cache"]);
        assert_eq!(cache.endpoints[0].workload, "shop/cache-1");
    }

    #[test]
    fn mesh_settings_from_istio_operator() {
        let operators = |text: &str| snapshot(&decode("t.yaml", text)).mesh;
        assert_eq!(operators(""), Default::default());
        let mesh = operators(
            r#"
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: a, namespace: istio-system}
spec:
  meshConfig:
    trustDomain: example.org
    outboundTrafficPolicy: {mode: REGISTRY_ONLY}
---
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: b, namespace: istio-system}
spec:
  meshConfig: {trustDomain: ignored.org, rootNamespace: mesh-root}
"#,
        );
        assert_eq!(mesh.trust_domain, "example.org");
        assert_eq!(mesh.outbound_policy, OutboundPolicy::RegistryOnly);
        assert_eq!(mesh.root_namespace, "mesh-root");
        let guide = snapshot(&seed(&["istio-operator-vm.yaml", "mesh-config-dns.yaml"])).mesh;
        assert_eq!(guide.trust_domain, "cluster.local");
        assert_eq!(guide.outbound_policy, OutboundPolicy::AllowAny);
    }

    #[test]
    fn endpoint_addresses_of_every_kind() {
        let snapshot = snapshot(&decode(
            "t.yaml",
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: socket, namespace: shop}
spec:
  hosts: [socket.internal]
  ports: [{name: tcp, number: 9000}]
  resolution: STATIC
  endpoints: [{address: "unix:///var/run/app.sock"}, {network: n2}, {address: 10.0.0.1}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: named, namespace: shop}
spec: {address: web-1.example.com, labels: {app: web}}
"#,
        ));
        let socket = snapshot.service("socket.internal").unwrap();
        let found: Vec<_> = socket.endpoints.iter().map(|e| e.address.clone()).collect();
        assert_eq!(
            found,
            [
                EndpointAddress::ViaGateway {
                    network: "n2".into()
                },
                EndpointAddress::Ip("10.0.0.1".parse().unwrap()),
                EndpointAddress::Unix("/var/run/app.sock".into()),
            ],
            "ordered as written, the gateway's empty address first"
        );
        let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
        assert_eq!(
            web.endpoints[0].address,
            EndpointAddress::Hostname("web-1.example.com".into())
        );

        // An entry with neither address nor network (validation refuses it)
        // serves nothing.
        let mut objects = decode(
            "t.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, ports: [{name: http, port: 80}]}\n",
        );
        let mut nowhere = decode(
            "t.yaml",
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: nowhere, namespace: shop}\nspec: {address: 10.0.0.2, labels: {app: web}}\n",
        );
        nowhere[0].body["spec"]
            .as_object_mut()
            .unwrap()
            .remove("address");
        objects.extend(nowhere);
        let snapshot = crate::fixtures::snapshot(&objects);
        let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
        assert!(web.endpoints.is_empty());
    }

    #[test]
    fn service_hostnames_use_the_mesh_domain_suffix() {
        let snapshot = snapshot(&decode(
            "t.yaml",
            r#"
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: mesh, namespace: istio-system}
spec: {values: {global: {proxy: {clusterDomain: corp.internal}}}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
"#,
        ));
        assert_eq!(snapshot.mesh.domain_suffix, "corp.internal");
        let hosts: Vec<_> = snapshot
            .services
            .iter()
            .map(|s| s.hostname.as_str())
            .collect();
        assert_eq!(hosts, ["web.shop.svc.corp.internal"]);
    }

    #[test]
    fn invalid_bodies_and_unknown_kinds_are_skipped() {
        let mut objects = decode(
            "t.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n",
        );
        let mut broken = objects[0].clone();
        broken.metadata.name = Some("broken".into());
        broken.body["spec"] = serde_json::json!({"ports": "not a list"});
        let mut unknown = objects[0].clone();
        unknown.kind = "Gizmo".into();
        objects.extend([broken, unknown]);
        let snapshot = snapshot(&objects);
        let hosts: Vec<_> = snapshot
            .services
            .iter()
            .map(|s| s.hostname.as_str())
            .collect();
        assert_eq!(hosts, ["ok.shop.svc.cluster.local"]);
    }

    #[test]
    fn a_hostname_defined_twice_keeps_the_service() {
        let snapshot = snapshot(&decode(
            "t.yaml",
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow, namespace: aaa}
spec: {hosts: [web.shop.svc.cluster.local], ports: [{name: http, number: 80}], resolution: DNS}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
"#,
        ));
        assert_eq!(snapshot.services.len(), 1);
        assert_eq!(snapshot.services[0].name, "web");
    }
}
