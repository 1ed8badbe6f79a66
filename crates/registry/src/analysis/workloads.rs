//! Analyzers of services and the workloads behind them: Service port names
//! (Istio's protocol convention), WorkloadGroups no Service selects, and
//! Gateways whose selector matches no gateway workload.

use vmesh_api::kinds::common::IntOrString;
use vmesh_api::kinds::service::ServiceType;

use super::{
    EXTERNAL_NAME_INVALID_PORT_NAME, Mesh, Message, PORT_NAME_NOT_UNDER_NAMING_CONVENTION,
    REFERENCED_RESOURCE_NOT_FOUND, Resource, WORKLOAD_GROUP_NOT_SELECTED, group_labels,
    selector_string, selects,
};
use crate::model::Protocol;
use crate::selector::Selector;

pub(super) fn analyze(mesh: &Mesh, out: &mut Vec<Message>) {
    port_names(mesh, out);
    groups(mesh, out);
    gateways(mesh, out);
}

/// Istio's PortNameAnalyzer: a port whose protocol neither its name's
/// prefix, `appProtocol` nor a well-known port number says (IST0118; for an
/// ExternalName Service, IST0150).
fn port_names(mesh: &Mesh, out: &mut Vec<Message>) {
    for service in &mesh.inputs.services {
        let resource = Resource::new("Service", &service.namespace, &service.name);
        let external = service.spec.type_ == Some(ServiceType::ExternalName);
        for (i, port) in service.spec.ports.iter().flatten().enumerate() {
            let name = port.name.as_deref().unwrap_or_default();
            if Protocol::of_service_port(port) != Protocol::Unsupported
                && !(external && name == "tcp")
            {
                continue;
            }
            let (code, text) = if external {
                (
                    &EXTERNAL_NAME_INVALID_PORT_NAME,
                    "Port name for ExternalName service is invalid. Proxy may prevent tcp named ports and unmatched traffic for ports serving TCP protocol from being forwarded correctly".to_string(),
                )
            } else {
                // Kubernetes defaults an absent targetPort to the port.
                let target = match &port.target_port {
                    Some(IntOrString::Int(n)) => n.to_string(),
                    Some(IntOrString::String(s)) => s.clone(),
                    None => port.port.to_string(),
                };
                (
                    &PORT_NAME_NOT_UNDER_NAMING_CONVENTION,
                    format!(
                        "Port name {name} (port: {}, targetPort: {target}) doesn't follow the naming convention of Istio port.",
                        port.port
                    ),
                )
            };
            out.push(Message::new(
                code,
                resource.clone(),
                format!("spec.ports[{i}]"),
                text,
            ));
        }
    }
}

/// VM0002: a WorkloadGroup that no Service or ServiceEntry of its namespace
/// selects, while it is plainly meant to serve: its template declares ports,
/// or a Service of its namespace bears its name or its `app` label. A group
/// of client-only VMs (none of these) is left alone.
fn groups(mesh: &Mesh, out: &mut Vec<Message>) {
    let inputs = &mesh.inputs;
    for group in &mesh.groups {
        let labels = group_labels(&group.spec);
        let in_namespace = |namespace: &str| namespace == group.namespace;
        let by_service = inputs
            .services
            .iter()
            .filter(|s| in_namespace(&s.namespace))
            .any(|s| selects(s.spec.selector.as_ref(), labels));
        let by_entry = inputs
            .service_entries
            .iter()
            .filter(|s| in_namespace(&s.namespace))
            .filter_map(|s| s.spec.workload_selector.as_ref())
            .any(|s| Selector::new(s.labels.as_ref()).matches(labels));
        if by_service || by_entry {
            continue;
        }
        let app = labels.get("app").map(String::as_str);
        let namesake = inputs.services.iter().find(|s| {
            in_namespace(&s.namespace) && (s.name == group.name || Some(s.name.as_str()) == app)
        });
        let ports = group.spec.template.ports.as_ref().filter(|p| !p.is_empty());
        let why = match (namesake, ports) {
            (Some(service), _) => format!(
                "; Service {}/{} selects {}",
                service.namespace,
                service.name,
                service
                    .spec
                    .selector
                    .as_ref()
                    .map(selector_string)
                    .unwrap_or_else(|| "no workload".into())
            ),
            (None, Some(ports)) => format!(
                ", although its template declares ports {}",
                ports.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            (None, None) => continue,
        };
        out.push(Message::new(
            &WORKLOAD_GROUP_NOT_SELECTED,
            Resource::new("WorkloadGroup", &group.namespace, &group.name),
            "spec.metadata.labels".into(),
            format!(
                "No Service selects the labels of this WorkloadGroup ({}), so its VMs receive no traffic{why}.",
                selector_string(labels)
            ),
        ));
    }
}

/// Istio's IngressGatewayPortAnalyzer, its first half: a Gateway's selector
/// matches some workload, in any namespace (IST0101 `selector`). Gateway
/// workloads are WorkloadEntries, WorkloadGroups' VMs, and the gateways an
/// IstioOperator installs.
fn gateways(mesh: &Mesh, out: &mut Vec<Message>) {
    for gateway in &mesh.gateways {
        let Some(selector) = gateway.spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let matched = mesh
            .workload_labels()
            .map(|(_, labels)| labels)
            .chain(mesh.installed.values())
            .any(|labels| selects(Some(selector), labels));
        if !matched {
            out.push(Message::new(
                &REFERENCED_RESOURCE_NOT_FOUND,
                Resource::new("Gateway", &gateway.namespace, &gateway.name),
                "spec.selector".into(),
                format!(
                    "Referenced selector not found: {:?}",
                    selector_string(selector)
                ),
            ));
        }
    }
}
