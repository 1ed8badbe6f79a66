//! Analyzers of security rules: DestinationRules that send plaintext to
//! workloads that accept only mutual TLS, and AuthorizationPolicies that
//! name namespaces that do not exist.

use std::collections::BTreeSet;

use vmesh_api::kinds::authorization_policy::AuthorizationPolicySpec;
use vmesh_api::kinds::destination_rule::{ClientTlsMode, DestinationRuleSpec, TrafficPolicy};

use super::{
    Host, Mesh, Message, REFERENCED_RESOURCE_NOT_FOUND, Resource, TLS_DISABLED_TO_STRICT_WORKLOAD,
};
use crate::model::Scoped;
use crate::policy::PeerMode;
use crate::selector::Selector;

pub(super) fn analyze(mesh: &Mesh, out: &mut Vec<Message>) {
    let entries: BTreeSet<String> = mesh
        .inputs
        .workloads
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect();
    for dr in &mesh.snapshot.destination_rules {
        plaintext_to_strict(mesh, &entries, dr, out);
    }
    for policy in &mesh.snapshot.authorization_policies {
        namespaces(mesh, policy, out);
    }
}

/// The `tls` mode a traffic policy gives `port` and where it says so: its
/// `portLevelSettings` entry for the port before its own `tls`.
fn tls_mode(
    policy: Option<&TrafficPolicy>,
    port: u16,
    field: &str,
) -> Option<(ClientTlsMode, String)> {
    let policy = policy?;
    let port_level = policy
        .port_level_settings
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, p)| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
        .and_then(|(i, p)| {
            let mode = p.tls.as_ref()?.mode?;
            Some((mode, format!("{field}.portLevelSettings[{i}].tls.mode")))
        });
    port_level.or_else(|| Some((policy.tls.as_ref()?.mode?, format!("{field}.tls.mode"))))
}

/// VM0003 (Istio's retired IST0113, MTLSPolicyConflict): a DestinationRule
/// whose `tls` mode DISABLE reaches a WorkloadEntry of its host on a port
/// the entry's PeerAuthentication makes STRICT: the entry refuses every
/// such connection. A subset's own policy counts for the entries it selects.
/// `entries` are the WorkloadEntries as endpoints name them (`namespace/name`).
fn plaintext_to_strict(
    mesh: &Mesh,
    entries: &BTreeSet<String>,
    dr: &Scoped<DestinationRuleSpec>,
    out: &mut Vec<Message>,
) {
    let Host::Service(service) = mesh.host(&dr.spec.host, &dr.namespace) else {
        return;
    };
    let mut reported = BTreeSet::new();
    for endpoint in &service.endpoints {
        if !entries.contains(&endpoint.workload) || reported.contains(&endpoint.workload) {
            continue;
        }
        let port = endpoint.service_port;
        let base = tls_mode(dr.spec.traffic_policy.as_ref(), port, "spec.trafficPolicy");
        let subsets = dr.spec.subsets.iter().flatten().enumerate();
        let by_subset = subsets
            .filter(|(_, s)| Selector::new(s.labels.as_ref()).matches(&endpoint.labels))
            .map(|(i, s)| {
                let field = format!("spec.subsets[{i}].trafficPolicy");
                tls_mode(s.traffic_policy.as_ref(), port, &field).or_else(|| base.clone())
            });
        let disabled = std::iter::once(base.clone())
            .chain(by_subset)
            .flatten()
            .find(|(mode, _)| *mode == ClientTlsMode::Disable);
        let Some((_, field)) = disabled else {
            continue;
        };
        let (namespace, _) = endpoint.workload.split_once('/').unwrap_or_default();
        let (mode, policy) = mesh
            .snapshot
            .peer_mode(namespace, &endpoint.labels, endpoint.port);
        let (PeerMode::Strict, Some(policy)) = (mode, policy) else {
            continue;
        };
        reported.insert(endpoint.workload.clone());
        out.push(Message::new(
            &TLS_DISABLED_TO_STRICT_WORKLOAD,
            Resource::new("DestinationRule", &dr.namespace, &dr.name),
            field,
            format!(
                "This DestinationRule disables TLS to port {port} of {}, but WorkloadEntry {} accepts only mutual TLS on port {} (PeerAuthentication {}/{} is STRICT): its requests through this rule are refused.",
                service.hostname, endpoint.workload, endpoint.port, policy.namespace, policy.name
            ),
        ));
    }
}

/// Where the namespace is in a value of a source field.
type NamespaceOf = fn(&str) -> Option<&str>;

/// Istio's namespace match: `*`, a `*suffix` or `prefix*`, or the name itself.
fn namespace_matches(namespace: &str, written: &str) -> bool {
    if written == "*" {
        return true;
    }
    if let Some(suffix) = written.strip_prefix('*') {
        return namespace.ends_with(suffix);
    }
    if let Some(prefix) = written.strip_suffix('*') {
        return namespace.starts_with(prefix);
    }
    namespace.eq_ignore_ascii_case(written)
}

/// Istio's AuthorizationPoliciesAnalyzer, namespace half: every namespace a
/// rule's source names exists (IST0101 `namespace`): `namespaces`,
/// `notNamespaces`, and, beyond Istio, the namespace in `principals`
/// (`<trust domain>/ns/<namespace>/sa/<account>`) and `serviceAccounts`
/// (`<namespace>/<account>`).
fn namespaces(mesh: &Mesh, policy: &Scoped<AuthorizationPolicySpec>, out: &mut Vec<Message>) {
    let resource = Resource::new("AuthorizationPolicy", &policy.namespace, &policy.name);
    for (i, rule) in policy.spec.rules.iter().flatten().enumerate() {
        for (j, from) in rule.from.iter().flatten().enumerate() {
            let source = &from.source;
            let field = format!("spec.rules[{i}].from[{j}].source");
            let lists: [(&str, &Option<Vec<String>>, NamespaceOf); 6] = [
                ("namespaces", &source.namespaces, written_namespace),
                ("notNamespaces", &source.not_namespaces, written_namespace),
                ("principals", &source.principals, principal_namespace),
                ("notPrincipals", &source.not_principals, principal_namespace),
                (
                    "serviceAccounts",
                    &source.service_accounts,
                    account_namespace,
                ),
                (
                    "notServiceAccounts",
                    &source.not_service_accounts,
                    account_namespace,
                ),
            ];
            for (name, values, namespace_of) in lists {
                for (k, value) in values.iter().flatten().enumerate() {
                    let Some(namespace) = namespace_of(value) else {
                        continue;
                    };
                    if mesh
                        .namespaces
                        .iter()
                        .any(|existing| namespace_matches(existing, namespace))
                    {
                        continue;
                    }
                    out.push(Message::new(
                        &REFERENCED_RESOURCE_NOT_FOUND,
                        resource.clone(),
                        format!("{field}.{name}[{k}]"),
                        format!("Referenced namespace not found: {namespace:?}"),
                    ));
                }
            }
        }
    }
}

/// A namespace written as itself.
fn written_namespace(namespace: &str) -> Option<&str> {
    Some(namespace)
}

/// The namespace of a principal `<trust domain>/ns/<namespace>/sa/<account>`,
/// unless a wildcard stands for it.
fn principal_namespace(principal: &str) -> Option<&str> {
    let mut parts = principal.split('/');
    let (_, ns, namespace) = (parts.next()?, parts.next()?, parts.next()?);
    (ns == "ns" && !namespace.contains('*')).then_some(namespace)
}

/// The namespace of a service account written `<namespace>/<account>`.
fn account_namespace(account: &str) -> Option<&str> {
    account
        .split_once('/')
        .map(|(namespace, _)| namespace)
        .filter(|namespace| !namespace.contains('*'))
}
