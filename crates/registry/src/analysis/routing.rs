//! Analyzers of routing rules: VirtualService destinations (host, port,
//! subset), DestinationRule hosts, subsets that select no workload, and
//! rules for one host that the merge partly drops.

use std::collections::BTreeMap;

use vmesh_api::kinds::destination_rule::DestinationRuleSpec;
use vmesh_api::kinds::virtual_service::{Destination, VirtualServiceSpec};

use super::{
    DESTINATION_RULE_NOT_MERGED, Host, Mesh, Message, REFERENCED_RESOURCE_NOT_FOUND, Resource,
    SUBSET_SELECTS_NO_WORKLOAD, UNKNOWN_DESTINATION_RULE_HOST, group_labels, selects,
};
use crate::model::{MeshService, Origin, Scoped};
use crate::selector::{Labels, Selector};

pub(super) fn analyze(mesh: &Mesh, out: &mut Vec<Message>) {
    for vs in &mesh.snapshot.virtual_services {
        destinations(mesh, vs, out);
    }
    for dr in &mesh.snapshot.destination_rules {
        destination_rule(mesh, dr, out);
    }
    merges(mesh, out);
}

/// A destination of a VirtualService, where it is written, and whether it
/// is a mirror (Istio says `mirror host` then).
struct Routed<'a> {
    field: String,
    destination: &'a Destination,
    mirror: bool,
}

fn routed(spec: &VirtualServiceSpec) -> Vec<Routed<'_>> {
    let mut found = Vec::new();
    let mut add = |field: String, destination, mirror| {
        found.push(Routed {
            field,
            destination,
            mirror,
        })
    };
    let tcp = spec.tcp.iter().flatten().enumerate();
    let tcp = tcp.map(|(i, r)| (format!("spec.tcp[{i}]"), &r.route));
    let tls = spec.tls.iter().flatten().enumerate();
    let tls = tls.map(|(i, r)| (format!("spec.tls[{i}]"), &r.route));
    for (rule, routes) in tcp.chain(tls) {
        for (j, to) in routes.iter().flatten().enumerate() {
            add(
                format!("{rule}.route[{j}].destination"),
                &to.destination,
                false,
            );
        }
    }
    for (i, route) in spec.http.iter().flatten().enumerate() {
        for (j, to) in route.route.iter().flatten().enumerate() {
            add(
                format!("spec.http[{i}].route[{j}].destination"),
                &to.destination,
                false,
            );
        }
        if let Some(mirror) = &route.mirror {
            add(format!("spec.http[{i}].mirror"), mirror, true);
        }
        for (j, mirror) in route.mirrors.iter().flatten().enumerate() {
            add(
                format!("spec.http[{i}].mirrors[{j}].destination"),
                &mirror.destination,
                true,
            );
        }
    }
    found
}

/// Istio's DestinationHostAnalyzer and DestinationRuleAnalyzer: every
/// destination names a service (and one of its ports), and a subset some
/// DestinationRule for that host defines.
fn destinations(mesh: &Mesh, vs: &Scoped<VirtualServiceSpec>, out: &mut Vec<Message>) {
    let resource = Resource::new("VirtualService", &vs.namespace, &vs.name);
    let not_found = |field: String, what: &str, value: String| {
        Message::new(
            &REFERENCED_RESOURCE_NOT_FOUND,
            resource.clone(),
            field,
            format!("Referenced {what} not found: {value:?}"),
        )
    };
    for Routed {
        field,
        destination,
        mirror,
    } in routed(&vs.spec)
    {
        let host = destination.host.as_str();
        match mesh.host(host, &vs.namespace) {
            Host::Unknown => {
                let what = if mirror { "mirror host" } else { "host" };
                out.push(not_found(format!("{field}.host"), what, host.to_string()));
            }
            Host::Service(service) => {
                if let Some(port) = &destination.port
                    && !service
                        .ports
                        .iter()
                        .any(|p| u32::from(p.port) == port.number)
                {
                    let value = format!("{host}:{}", port.number);
                    out.push(not_found(format!("{field}.port"), "host:port", value));
                }
            }
            Host::Installed => {}
        }
        let Some(subset) = destination.subset.as_deref() else {
            continue;
        };
        let qualified = mesh.snapshot.qualify(host, &vs.namespace);
        let defined = mesh
            .snapshot
            .destination_rules_named(&qualified)
            .flat_map(|dr| dr.spec.subsets.iter().flatten())
            .any(|s| s.name == subset);
        if !defined {
            let what = if mirror {
                "mirror+subset in destinationrule"
            } else {
                "host+subset in destinationrule"
            };
            out.push(not_found(
                format!("{field}.subset"),
                what,
                format!("{host}+{subset}"),
            ));
        }
    }
}

/// Istio's SubsetSelectPodAnalyzer: the host names a service (IST0174), and
/// each subset selects at least one of its workloads (IST0173).
fn destination_rule(mesh: &Mesh, dr: &Scoped<DestinationRuleSpec>, out: &mut Vec<Message>) {
    let resource = Resource::new("DestinationRule", &dr.namespace, &dr.name);
    let service = match mesh.host(&dr.spec.host, &dr.namespace) {
        Host::Unknown => {
            out.push(Message::new(
                &UNKNOWN_DESTINATION_RULE_HOST,
                resource,
                "spec.host".into(),
                format!(
                    "The host {} defined in the DestinationRule does not match any services in the mesh.",
                    dr.spec.host
                ),
            ));
            return;
        }
        // A wildcard rule speaks for many services: its subsets are not one service's.
        Host::Service(service) if !dr.spec.host.starts_with('*') => service,
        _ => return,
    };
    let workloads = service_workloads(mesh, service);
    for (i, subset) in dr.spec.subsets.iter().flatten().enumerate() {
        let selector = Selector::new(subset.labels.as_ref());
        if !workloads.iter().any(|labels| selector.matches(labels)) {
            out.push(Message::new(
                &SUBSET_SELECTS_NO_WORKLOAD,
                resource.clone(),
                format!("spec.subsets[{i}]"),
                format!(
                    "The Subset {} defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
                    subset.name
                ),
            ));
        }
    }
}

/// The labels of the workloads behind a service: its endpoints (whatever
/// their port or health), and the WorkloadGroups whose VMs it will select
/// when they register.
fn service_workloads<'a>(mesh: &'a Mesh, service: &'a MeshService) -> Vec<&'a Labels> {
    let mut labels: Vec<&Labels> = service.endpoints.iter().map(|e| &e.labels).collect();
    let selector = match service.origin {
        Origin::Service => mesh
            .inputs
            .services
            .iter()
            .find(|s| s.namespace == service.namespace && s.name == service.name)
            .and_then(|s| s.spec.selector.as_ref()),
        Origin::ServiceEntry => mesh
            .inputs
            .service_entries
            .iter()
            .find(|s| s.namespace == service.namespace && s.name == service.name)
            .and_then(|s| s.spec.workload_selector.as_ref())
            .map(|s| s.labels.as_ref().unwrap_or(&super::NO_LABELS)),
    };
    let empty_selects_all = service.origin == Origin::ServiceEntry;
    for group in mesh
        .groups
        .iter()
        .filter(|g| g.namespace == service.namespace)
    {
        let group = group_labels(&group.spec);
        let selected = match selector {
            Some(s) if s.is_empty() => empty_selects_all,
            Some(s) => selects(Some(s), group),
            None => false,
        };
        if selected {
            labels.push(group);
        }
    }
    labels
}

/// Rules for one host in one namespace are merged (`Snapshot::destination_rule_for`):
/// every rule's subsets, the first definition of each name, and the first
/// traffic policy. What a later rule says beyond that is dropped: VM0001.
fn merges(mesh: &Mesh, out: &mut Vec<Message>) {
    let mut groups: BTreeMap<(&str, String), Vec<&Scoped<DestinationRuleSpec>>> = BTreeMap::new();
    for dr in &mesh.snapshot.destination_rules {
        let host = mesh.snapshot.qualify(&dr.spec.host, &dr.namespace);
        groups.entry((&dr.namespace, host)).or_default().push(dr);
    }
    for ((namespace, host), rules) in groups {
        let mut policy_from: Option<&str> = None;
        let mut subsets_from: BTreeMap<&str, &str> = BTreeMap::new();
        for dr in rules {
            let resource = Resource::new("DestinationRule", &dr.namespace, &dr.name);
            if dr.spec.traffic_policy.is_some() {
                match policy_from {
                    Some(first) => out.push(Message::new(
                        &DESTINATION_RULE_NOT_MERGED,
                        resource.clone(),
                        "spec.trafficPolicy".into(),
                        format!(
                            "The trafficPolicy of this DestinationRule is not applied: DestinationRule {namespace}/{first} for the same host {host} comes first, and rules for one host in one namespace are merged (every rule's subsets, one traffic policy)."
                        ),
                    )),
                    None => policy_from = Some(&dr.name),
                }
            }
            for (i, subset) in dr.spec.subsets.iter().flatten().enumerate() {
                match subsets_from.get(subset.name.as_str()) {
                    Some(first) if *first != dr.name => out.push(Message::new(
                        &DESTINATION_RULE_NOT_MERGED,
                        resource.clone(),
                        format!("spec.subsets[{i}]"),
                        format!(
                            "The Subset {} of this DestinationRule is not applied: DestinationRule {namespace}/{first} for the same host {host} defines it first.",
                            subset.name
                        ),
                    )),
                    Some(_) => {}
                    None => {
                        subsets_from.insert(&subset.name, &dr.name);
                    }
                }
            }
        }
    }
}
