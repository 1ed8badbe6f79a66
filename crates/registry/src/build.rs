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
use crate::policy::RulesByHost;
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
        Snapshot::from_inputs(Inputs::decode(objects, decoded), vips)
    }

    /// The snapshot of inputs already decoded.
    pub(crate) fn from_inputs(inputs: Inputs, vips: &mut VipAllocator) -> Snapshot {
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
        let rules_by_host = RulesByHost::new(
            &inputs.destination_rules,
            &inputs.virtual_services,
            &inputs.mesh.domain_suffix,
        );
        Snapshot {
            services,
            rules_by_host,
            destination_rules: inputs.destination_rules,
            virtual_services: inputs.virtual_services,
            peer_authentications: inputs.peer_authentications,
            authorization_policies: inputs.authorization_policies,
            telemetries: inputs.telemetries,
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
        workload_name: workload.workload_name.clone(),
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
mod tests;
