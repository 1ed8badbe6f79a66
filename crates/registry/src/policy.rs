//! Which routing and security rules apply where, with Istio's semantics: the
//! lookups the xDS translation asks a [`Snapshot`] (Istio's push context).
//!
//! This module owns rule selection: host names written in rules made fully
//! qualified ([`Snapshot::qualify`]), the DestinationRule for a host as seen
//! from a proxy's namespace, the VirtualServices for a host, the
//! PeerAuthentications and AuthorizationPolicies for a workload, and the
//! endpoints a subset selects. It does not decide what a rule does to Envoy's
//! configuration (the `xds` crate translates what it is given), and does not
//! validate rules (the `api` crate does).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use vmesh_api::kinds::authorization_policy::AuthorizationPolicySpec;
use vmesh_api::kinds::common::MatchLabelsSelector;
use vmesh_api::kinds::destination_rule::DestinationRuleSpec;
use vmesh_api::kinds::peer_authentication::{MtlsMode, MutualTls, PeerAuthenticationSpec};
use vmesh_api::kinds::virtual_service::VirtualServiceSpec;

use crate::model::{MeshEndpoint, MeshService, Scoped, Snapshot};
use crate::selector::{Labels, Selector};

/// `name.namespace.svc.<domain suffix>`: a Kubernetes Service's hostname.
pub(crate) fn service_hostname(name: &str, namespace: &str, domain_suffix: &str) -> String {
    format!("{name}.{namespace}.svc.{domain_suffix}")
}

/// A host as written in a rule in `namespace`, made fully qualified with
/// `domain_suffix` (see [`Snapshot::qualify`]).
fn qualify(host: &str, namespace: &str, domain_suffix: &str) -> String {
    match host.split('.').count() {
        1 => service_hostname(host, namespace, domain_suffix),
        2 => format!("{host}.svc.{domain_suffix}"),
        3 if host.ends_with(".svc") => format!("{host}.{domain_suffix}"),
        _ => host.to_string(),
    }
}

/// The DestinationRules and VirtualServices by the qualified host they name,
/// as positions in the snapshot's sorted lists: hosts are qualified once per
/// build, not again for every service of every proxy's translation.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RulesByHost {
    destination_rules: HashMap<String, Vec<usize>>,
    virtual_services: HashMap<String, Vec<usize>>,
}

impl RulesByHost {
    pub(crate) fn new(
        destination_rules: &[Arc<Scoped<DestinationRuleSpec>>],
        virtual_services: &[Arc<Scoped<VirtualServiceSpec>>],
        domain_suffix: &str,
    ) -> RulesByHost {
        let mut index = RulesByHost::default();
        for (position, dr) in destination_rules.iter().enumerate() {
            let host = qualify(&dr.spec.host, &dr.namespace, domain_suffix);
            index
                .destination_rules
                .entry(host)
                .or_default()
                .push(position);
        }
        for (position, vs) in virtual_services.iter().enumerate() {
            for host in vs.spec.hosts.iter().flatten() {
                let positions = index
                    .virtual_services
                    .entry(qualify(host, &vs.namespace, domain_suffix))
                    .or_default();
                // A rule naming a host twice (short and qualified) counts once.
                if positions.last() != Some(&position) {
                    positions.push(position);
                }
            }
        }
        index
    }
}

/// What an inbound port of a workload accepts, as its PeerAuthentications decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    /// Only mesh mTLS.
    Strict,
    /// Mesh mTLS and plaintext, on the same port.
    Permissive,
    /// Only plaintext.
    Disable,
}

fn peer_mode_of(mtls: Option<&MutualTls>) -> Option<PeerMode> {
    match mtls?.mode? {
        MtlsMode::Unset => None,
        MtlsMode::Disable => Some(PeerMode::Disable),
        MtlsMode::Permissive => Some(PeerMode::Permissive),
        MtlsMode::Strict => Some(PeerMode::Strict),
    }
}

/// The selector of a PeerAuthentication or AuthorizationPolicy.
fn match_labels(selector: Option<&MatchLabelsSelector>) -> Selector<'_> {
    Selector::new(selector.and_then(|s| s.match_labels.as_ref()))
}

impl Snapshot {
    /// A host as written in a rule in `namespace` (`payment-service`,
    /// `payment-service.vm-workloads`, `payment-service.vm-workloads.svc`),
    /// made fully qualified with the mesh's domain suffix; a host of four
    /// labels or more is already qualified.
    pub fn qualify(&self, host: &str, namespace: &str) -> String {
        qualify(host, namespace, &self.mesh.domain_suffix)
    }

    /// The destination policy for `service` as seen from a proxy in
    /// `proxy_namespace`: the rules for the host in the proxy's namespace,
    /// else in the host's, else in the root namespace, else in the first
    /// namespace that has one (Istio's lookup). Several rules in that
    /// namespace merge as Istio merges them: the first one's traffic policy,
    /// every rule's subsets (the first definition of a subset name wins);
    /// a later rule's traffic policy counts only when no earlier one has one.
    /// Borrowed when one rule applies, merged otherwise.
    pub fn destination_rule_for(
        &self,
        service: &MeshService,
        proxy_namespace: &str,
    ) -> Option<Cow<'_, DestinationRuleSpec>> {
        let mut rules = self.destination_rules_applying(service, proxy_namespace);
        let mut merged = Cow::Borrowed(&rules.next()?.spec);
        for rule in rules {
            if merged.traffic_policy.is_none() && rule.spec.traffic_policy.is_some() {
                merged.to_mut().traffic_policy = rule.spec.traffic_policy.clone();
            }
            let subsets = merged.to_mut().subsets.get_or_insert_default();
            for subset in rule.spec.subsets.iter().flatten() {
                if !subsets.iter().any(|s| s.name == subset.name) {
                    subsets.push(subset.clone());
                }
            }
        }
        Some(merged)
    }

    /// The DestinationRule that [`Snapshot::destination_rule_for`] starts
    /// from (the first one of the namespace it chooses): the one Istio names
    /// in a cluster's `istio` metadata, as istioctl's DESTINATION RULE.
    pub fn destination_rule_origin(
        &self,
        service: &MeshService,
        proxy_namespace: &str,
    ) -> Option<&Scoped<DestinationRuleSpec>> {
        self.destination_rules_applying(service, proxy_namespace)
            .next()
    }

    /// The rules for `service` in the namespace Istio's lookup chooses for
    /// a proxy in `proxy_namespace`, in order.
    fn destination_rules_applying<'a>(
        &'a self,
        service: &MeshService,
        proxy_namespace: &str,
    ) -> impl Iterator<Item = &'a Scoped<DestinationRuleSpec>> {
        let candidates: Vec<&Scoped<DestinationRuleSpec>> =
            self.destination_rules_named(&service.hostname).collect();
        let chosen = [
            proxy_namespace,
            service.namespace.as_str(),
            self.mesh.root_namespace.as_str(),
        ]
        .into_iter()
        .find(|ns| candidates.iter().any(|dr| dr.namespace == *ns))
        .or_else(|| candidates.first().map(|dr| dr.namespace.as_str()))
        .map(str::to_string);
        candidates
            .into_iter()
            .filter(move |dr| chosen.as_deref() == Some(dr.namespace.as_str()))
    }

    /// Every DestinationRule naming `hostname` (fully qualified), by
    /// namespace and name, whatever namespace it applies from.
    pub fn destination_rules_named<'a>(
        &'a self,
        hostname: &str,
    ) -> impl Iterator<Item = &'a Scoped<DestinationRuleSpec>> {
        self.rules_by_host
            .destination_rules
            .get(hostname)
            .into_iter()
            .flatten()
            .map(|&position| self.destination_rules[position].as_ref())
    }

    /// The VirtualServices for sidecars (no gateways, or the `mesh` gateway)
    /// naming `hostname` among their hosts, by namespace and name. Istio's
    /// HTTP routing uses only the first.
    pub fn virtual_services_for<'a>(
        &'a self,
        hostname: &'a str,
    ) -> impl Iterator<Item = &'a Scoped<VirtualServiceSpec>> {
        self.rules_by_host
            .virtual_services
            .get(hostname)
            .into_iter()
            .flatten()
            .map(|&position| self.virtual_services[position].as_ref())
            .filter(|vs| {
                vs.spec
                    .gateways
                    .as_ref()
                    .is_none_or(|g| g.is_empty() || g.iter().any(|g| g == "mesh"))
            })
    }

    /// The PeerAuthentications that speak for a workload in `namespace` with
    /// `labels`, most specific first: the first in its namespace whose
    /// selector matches it, the first namespace-wide one there (no selector,
    /// or `selector: {}`), the first namespace-wide one in the root
    /// namespace (mesh-wide). The first that says something about a port
    /// decides it.
    pub fn peer_authentications_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a Scoped<PeerAuthenticationSpec>> {
        let in_namespace = move |ns: &'a str| {
            self.peer_authentications
                .iter()
                .map(Arc::as_ref)
                .filter(move |p| p.namespace == ns)
        };
        let selector =
            |p: &&'a Scoped<PeerAuthenticationSpec>| match_labels(p.spec.selector.as_ref());
        let workload = in_namespace(namespace).find(|p| {
            let selector = selector(p);
            !selector.is_empty() && selector.matches(labels)
        });
        let namespace_wide = in_namespace(namespace).find(|p| selector(p).is_empty());
        let mesh = in_namespace(&self.mesh.root_namespace).find(|p| selector(p).is_empty());
        [workload, namespace_wide, mesh].into_iter().flatten()
    }

    /// The mode of `port` of a workload in `namespace` with `labels`, and
    /// the PeerAuthentication that decides it: the first of
    /// [`peer_authentications_for`](Self::peer_authentications_for) that
    /// says something about the port, a `portLevelMtls` entry before the
    /// policy's own mode; with none, PERMISSIVE.
    pub fn peer_mode<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
        port: u16,
    ) -> (PeerMode, Option<&'a Scoped<PeerAuthenticationSpec>>) {
        self.peer_authentications_for(namespace, labels)
            .find_map(|policy| {
                let port_level = policy
                    .spec
                    .port_level_mtls
                    .as_ref()
                    .and_then(|ports| ports.get(&port.to_string()));
                peer_mode_of(port_level)
                    .or_else(|| peer_mode_of(policy.spec.mtls.as_ref()))
                    .map(|mode| (mode, Some(policy)))
            })
            .unwrap_or((PeerMode::Permissive, None))
    }

    /// The AuthorizationPolicies that apply to a sidecar's workload in
    /// `namespace` with `labels`, by namespace and name: those of the root
    /// namespace and of the workload's namespace whose selector (if any)
    /// matches its labels. Policies with `targetRef(s)` are for gateways and
    /// waypoints, never for sidecars.
    pub fn authorization_policies_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a Scoped<AuthorizationPolicySpec>> {
        self.authorization_policies
            .iter()
            .map(Arc::as_ref)
            .filter(move |policy| {
                let spec = &policy.spec;
                let targeted = spec.target_ref.is_some()
                    || spec.target_refs.as_ref().is_some_and(|t| !t.is_empty());
                !targeted
                    && (policy.namespace == self.mesh.root_namespace
                        || policy.namespace == namespace)
                    && match_labels(spec.selector.as_ref()).matches(labels)
            })
    }
}

impl MeshService {
    /// The endpoints traffic for service port `port` may go to: the healthy
    /// ones serving it, and of those the ones a subset's `labels` select
    /// (all of them without a subset).
    pub fn endpoints_for<'a>(
        &'a self,
        port: u16,
        subset: Option<&'a Labels>,
    ) -> impl Iterator<Item = &'a MeshEndpoint> {
        let subset = Selector::new(subset);
        self.endpoints
            .iter()
            .filter(move |e| e.service_port == port && e.healthy && subset.matches(&e.labels))
    }
}

#[cfg(test)]
mod tests {
    use vmesh_api::kinds::destination_rule::SimpleLb;

    use super::*;
    use crate::fixtures::{decode, labels, snapshot};

    const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
"#;

    fn rule(namespace: &str, name: &str, host: &str, body: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{host: {host}, {body}}}\n"
        )
    }

    /// The load balancer of the rule a proxy in `proxy_namespace` gets for `pay`.
    fn chosen(snapshot: &Snapshot, proxy_namespace: &str) -> Option<SimpleLb> {
        let pay = snapshot.service("pay.shop.svc.cluster.local").unwrap();
        let rule = snapshot.destination_rule_for(pay, proxy_namespace)?;
        rule.traffic_policy.as_ref()?.load_balancer.as_ref()?.simple
    }

    #[test]
    fn qualify_uses_the_rule_namespace_and_the_domain_suffix() {
        let mut snapshot = Snapshot::default();
        assert_eq!(
            snapshot.qualify("pay", "shop"),
            "pay.shop.svc.cluster.local"
        );
        assert_eq!(
            snapshot.qualify("pay.other", "shop"),
            "pay.other.svc.cluster.local"
        );
        assert_eq!(
            snapshot.qualify("pay.other.svc", "shop"),
            "pay.other.svc.cluster.local"
        );
        assert_eq!(
            snapshot.qualify("api.example.com", "shop"),
            "api.example.com"
        );
        assert_eq!(
            snapshot.qualify("a.b.c", "shop"),
            "a.b.c",
            "three labels, not .svc"
        );
        snapshot.mesh.domain_suffix = "corp.internal".into();
        assert_eq!(
            snapshot.qualify("pay", "shop"),
            "pay.shop.svc.corp.internal"
        );
        assert_eq!(
            snapshot.qualify("pay.other.svc", "shop"),
            "pay.other.svc.corp.internal"
        );
    }

    #[test]
    fn destination_rule_from_proxy_namespace_then_host_then_root_then_any() {
        let rules = [
            rule(
                "client",
                "a",
                "pay.shop.svc.cluster.local",
                "trafficPolicy: {loadBalancer: {simple: RANDOM}}",
            ),
            rule(
                "shop",
                "b",
                "pay",
                "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
            ),
            rule(
                "istio-system",
                "c",
                "pay.shop",
                "trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}",
            ),
            rule(
                "elsewhere",
                "d",
                "pay.shop.svc",
                "trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}",
            ),
            rule(
                "shop",
                "unrelated",
                "other",
                "trafficPolicy: {loadBalancer: {simple: RANDOM}}",
            ),
        ];
        let all = snapshot(&decode("t.yaml", &(SERVICES.to_string() + &rules.concat())));
        assert_eq!(chosen(&all, "client"), Some(SimpleLb::Random));
        assert_eq!(chosen(&all, "shop"), Some(SimpleLb::LeastRequest));
        assert_eq!(
            chosen(&all, "web"),
            Some(SimpleLb::LeastRequest),
            "the host's namespace"
        );
        let no_host_rule = [rules[0].clone(), rules[2].clone(), rules[3].clone()].concat();
        let root_only = snapshot(&decode("t.yaml", &(SERVICES.to_string() + &no_host_rule)));
        assert_eq!(
            chosen(&root_only, "web"),
            Some(SimpleLb::Passthrough),
            "the root namespace"
        );
        let only_elsewhere = snapshot(&decode("t.yaml", &(SERVICES.to_string() + &rules[3])));
        assert_eq!(
            chosen(&only_elsewhere, "web"),
            Some(SimpleLb::RoundRobin),
            "any namespace"
        );
        let none = snapshot(&decode("t.yaml", &(SERVICES.to_string() + &rules[4])));
        assert_eq!(chosen(&none, "shop"), None);
    }

    #[test]
    fn rules_of_one_namespace_merge_their_subsets() {
        let text = SERVICES.to_string()
            + &rule(
                "shop",
                "a",
                "pay",
                "trafficPolicy: {loadBalancer: {simple: RANDOM}}, subsets: [{name: v1, labels: {version: v1}}]",
            )
            + &rule(
                "shop",
                "b",
                "pay",
                "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}, subsets: [{name: v1, labels: {version: other}}, {name: v2, labels: {version: v2}}]",
            );
        let snapshot = snapshot(&decode("t.yaml", &text));
        assert_eq!(
            chosen(&snapshot, "shop"),
            Some(SimpleLb::Random),
            "the first rule's policy"
        );
        let pay = snapshot.service("pay.shop.svc.cluster.local").unwrap();
        let merged = snapshot.destination_rule_for(pay, "shop").unwrap();
        assert!(matches!(merged, Cow::Owned(_)));
        let subsets: Vec<_> = merged
            .subsets
            .iter()
            .flatten()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.labels.as_ref().unwrap()["version"].as_str(),
                )
            })
            .collect();
        assert_eq!(subsets, [("v1", "v1"), ("v2", "v2")]);

        // Istio's merge: a later rule's policy counts when the first has none.
        let text = SERVICES.to_string()
            + &rule(
                "shop",
                "a",
                "pay",
                "subsets: [{name: v1, labels: {version: v1}}]",
            )
            + &rule(
                "shop",
                "b",
                "pay",
                "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
            );
        let later = crate::fixtures::snapshot(&decode("t.yaml", &text));
        assert_eq!(chosen(&later, "shop"), Some(SimpleLb::LeastRequest));
    }

    #[test]
    fn virtual_services_for_sidecars_naming_the_host() {
        let text = SERVICES.to_string()
            + r#"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-gateway-only, namespace: shop}
spec: {hosts: [pay], gateways: [shop-gw], http: [{route: [{destination: {host: pay}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-mesh, namespace: shop}
spec: {hosts: [pay], gateways: [shop-gw, mesh], http: [{route: [{destination: {host: pay}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: c-short-name-elsewhere, namespace: web}
spec: {hosts: [pay], http: [{route: [{destination: {host: pay}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: d-qualified, namespace: web}
spec: {hosts: [pay.shop], http: [{route: [{destination: {host: pay.shop}}]}]}
"#;
        let snapshot = snapshot(&decode("t.yaml", &text));
        let names: Vec<_> = snapshot
            .virtual_services_for("pay.shop.svc.cluster.local")
            .map(|vs| vs.name.as_str())
            .collect();
        assert_eq!(names, ["b-mesh", "d-qualified"]);
    }

    #[test]
    fn peer_authentications_most_specific_first() {
        let policy = |namespace: &str, name: &str, body: &str| {
            format!(
                "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {body}\n"
            )
        };
        let text = [
            policy("istio-system", "mesh", "{mtls: {mode: STRICT}}"),
            policy(
                "istio-system",
                "root-selected",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}",
            ),
            policy(
                "shop",
                "a-web",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
            ),
            policy("shop", "b-ns", "{selector: {}, mtls: {mode: PERMISSIVE}}"),
            policy("shop", "c-ns", "{mtls: {mode: DISABLE}}"),
        ]
        .concat();
        let snapshot = snapshot(&decode("t.yaml", &text));
        let names = |namespace: &str, labels: &Labels| -> Vec<String> {
            snapshot
                .peer_authentications_for(namespace, labels)
                .map(|p| p.name.clone())
                .collect()
        };
        assert_eq!(
            names("shop", &labels(&[("app", "web")])),
            ["a-web", "b-ns", "mesh"]
        );
        assert_eq!(names("shop", &labels(&[("app", "db")])), ["b-ns", "mesh"]);
        assert_eq!(
            names("other", &labels(&[("app", "web")])),
            ["mesh"],
            "root selectors stay in the root"
        );
    }

    #[test]
    fn authorization_policies_of_the_root_and_own_namespace_that_select_the_workload() {
        let policy = |namespace: &str, name: &str, body: &str| {
            format!(
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {body}\n"
            )
        };
        let text = [
            policy("istio-system", "mesh", "{action: DENY, rules: [{}]}"),
            policy("istio-system", "root-db", "{selector: {matchLabels: {app: db}}, rules: [{}]}"),
            policy("shop", "all", "{rules: [{}]}"),
            policy("shop", "db", "{selector: {matchLabels: {app: db}}, rules: [{}]}"),
            policy("shop", "gateway", "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}], rules: [{}]}"),
            policy("other", "elsewhere", "{rules: [{}]}"),
        ]
        .concat();
        let snapshot = snapshot(&decode("t.yaml", &text));
        let names = |namespace: &str, labels: &Labels| -> Vec<String> {
            snapshot
                .authorization_policies_for(namespace, labels)
                .map(|p| p.name.clone())
                .collect()
        };
        assert_eq!(
            names("shop", &labels(&[("app", "db")])),
            ["mesh", "root-db", "all", "db"]
        );
        assert_eq!(names("shop", &labels(&[("app", "web")])), ["mesh", "all"]);
        assert_eq!(names("web", &labels(&[("app", "db")])), ["mesh", "root-db"]);
    }

    #[test]
    fn subsets_select_healthy_endpoints_of_the_port() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: shop}
spec: {selector: {app: pay}, ports: [{name: http, port: 80}, {name: grpc, port: 90}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: v1, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: pay, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: v2, namespace: shop}
spec: {address: 10.0.0.2, labels: {app: pay, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: sick, namespace: shop}
spec: {address: 10.0.0.3, labels: {app: pay, version: v1}}
status: {conditions: [{type: Healthy, status: "False"}]}
"#;
        let snapshot = snapshot(&decode("t.yaml", text));
        let pay = snapshot.service("pay.shop.svc.cluster.local").unwrap();
        let workloads = |port: u16, subset: Option<&Labels>| -> Vec<String> {
            pay.endpoints_for(port, subset)
                .map(|e| e.workload.clone())
                .collect()
        };
        assert_eq!(workloads(80, None), ["shop/v1", "shop/v2"]);
        assert_eq!(
            workloads(90, Some(&labels(&[("version", "v2")]))),
            ["shop/v2"]
        );
        assert!(workloads(80, Some(&labels(&[("version", "v3")]))).is_empty());
    }
}
