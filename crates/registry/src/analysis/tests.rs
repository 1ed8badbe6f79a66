//! One fixture per analyzer case, with the exact code, object and message
//! each must produce, and the guide's complete example staying quiet.

use super::*;
use crate::fixtures::{decode, seed};

/// `Level [CODE] (Kind ns/name) message` for each message about `text`.
fn lines(text: &str) -> Vec<String> {
    analyze(&decode("t.yaml", text))
        .iter()
        .map(|m| m.line(None))
        .collect()
}

/// A namespace with a Service `pay` (ports http 80, grpc 90) selecting
/// `app: pay`, and one v1 WorkloadEntry behind it.
const PAY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: shop}
spec: {selector: {app: pay}, ports: [{name: http, port: 80}, {name: grpc, port: 90}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: pay-v1, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: pay, version: v1}, serviceAccount: pay}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pay, namespace: shop}
spec: {host: pay, subsets: [{name: v1, labels: {version: v1}}]}
"#;

fn with(extra: &str) -> String {
    format!("{PAY}---\n{extra}")
}

#[test]
fn a_consistent_mesh_has_nothing_to_say() {
    assert_eq!(lines(PAY), Vec::<String>::new());
}

#[test]
fn subset_no_rule_defines() {
    let text = with(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pay, namespace: shop}\nspec: {hosts: [pay], http: [{route: [{destination: {host: pay, subset: canry}}]}]}\n",
    );
    assert_eq!(
        lines(&text),
        [
            "Error [IST0101] (VirtualService shop/pay) Referenced host+subset in destinationrule not found: \"pay+canry\""
        ]
    );
    let messages = analyze(&decode("t.yaml", &text));
    assert_eq!(
        messages[0].field,
        "spec.http[0].route[0].destination.subset"
    );
}

#[test]
fn destination_hosts_ports_and_mirrors_that_name_nothing() {
    let text = with(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pay, namespace: shop}\nspec:\n  hosts: [pay]\n  http:\n  - route: [{destination: {host: payment}}]\n  - route: [{destination: {host: pay, port: {number: 8080}}}]\n    mirror: {host: shadow.shop.svc.cluster.local}\n  tcp: [{route: [{destination: {host: pay.shop, port: {number: 90}}}]}]\n",
    );
    assert_eq!(
        lines(&text),
        [
            "Error [IST0101] (VirtualService shop/pay) Referenced host not found: \"payment\"",
            "Error [IST0101] (VirtualService shop/pay) Referenced host:port not found: \"pay:8080\"",
            "Error [IST0101] (VirtualService shop/pay) Referenced mirror host not found: \"shadow.shop.svc.cluster.local\"",
        ]
    );
}

#[test]
fn service_entry_hosts_wildcards_and_the_control_plane_are_known() {
    let text = with(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec: {hosts: ["*.example.com"], ports: [{name: https, number: 443, protocol: TLS}], resolution: NONE}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: out, namespace: shop}
spec:
  hosts: [api.example.com]
  tls: [{match: [{sniHosts: [api.example.com]}], route: [{destination: {host: api.example.com}}]}]
  tcp: [{route: [{destination: {host: istiod.istio-system.svc.cluster.local, port: {number: 15012}}}]}]
"#,
    );
    assert_eq!(lines(&text), Vec::<String>::new());
}

#[test]
fn destination_rule_host_that_names_no_service() {
    let text = with(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: typo, namespace: shop}\nspec: {host: paymnt.shop.svc.cluster.local}\n",
    );
    assert_eq!(
        lines(&text),
        [
            "Warning [IST0174] (DestinationRule shop/typo) The host paymnt.shop.svc.cluster.local defined in the DestinationRule does not match any services in the mesh."
        ]
    );
}

#[test]
fn subset_that_selects_no_workload() {
    let text = PAY.replace(
        "subsets: [{name: v1, labels: {version: v1}}]",
        "subsets: [{name: v1, labels: {version: v1}}, {name: canary, labels: {version: v2}}]",
    );
    assert_eq!(
        lines(&text),
        [
            "Error [IST0173] (DestinationRule shop/pay) The Subset canary defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream)."
        ]
    );
    // A group the Service selects will bring such VMs: the subset is not empty then.
    let group = with(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: canary, namespace: shop}\nspec: {metadata: {labels: {app: pay, version: v2}}, template: {serviceAccount: pay}}\n",
    );
    let group = group.replace(
        "subsets: [{name: v1, labels: {version: v1}}]",
        "subsets: [{name: v1, labels: {version: v1}}, {name: canary, labels: {version: v2}}]",
    );
    assert_eq!(lines(&group), Vec::<String>::new());
}

#[test]
fn rules_for_one_host_whose_merge_drops_a_policy_or_a_subset() {
    let text = with(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: pay-more, namespace: shop}\nspec: {host: pay.shop.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}, subsets: [{name: v1, labels: {app: pay}}]}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: pay-policy, namespace: shop}\nspec: {host: pay, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}\n",
    );
    assert_eq!(
        lines(&text),
        [
            "Warning [VM0001] (DestinationRule shop/pay-more) The Subset v1 of this DestinationRule is not applied: DestinationRule shop/pay for the same host pay.shop.svc.cluster.local defines it first.",
            "Warning [VM0001] (DestinationRule shop/pay-policy) The trafficPolicy of this DestinationRule is not applied: DestinationRule shop/pay-more for the same host pay.shop.svc.cluster.local comes first, and rules for one host in one namespace are merged (every rule's subsets, one traffic policy).",
        ]
    );
}

#[test]
fn port_names_without_a_protocol() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {ports: [{name: postgres, port: 5432, targetPort: 5432}, {name: mysql-ro, port: 3307}, {name: web, port: 80, appProtocol: http}, {name: db, port: 3306}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: db.example.com, ports: [{name: tcp, port: 5432}]}
"#;
    assert_eq!(
        lines(text),
        [
            "Warning [IST0150] (Service default/ext) Port name for ExternalName service is invalid. Proxy may prevent tcp named ports and unmatched traffic for ports serving TCP protocol from being forwarded correctly",
            "Info [IST0118] (Service default/db) Port name postgres (port: 5432, targetPort: 5432) doesn't follow the naming convention of Istio port.",
        ]
    );
}

#[test]
fn workload_group_meant_to_serve_that_no_service_selects() {
    let text = with(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: pay-vms, namespace: shop}
spec: {metadata: {labels: {app: pay-service}}, template: {serviceAccount: pay}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: orders, namespace: shop}
spec: {metadata: {labels: {app: orders}}, template: {serviceAccount: orders, ports: {http: 8080}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: workers, namespace: shop}
spec: {metadata: {labels: {app: worker}}, template: {serviceAccount: worker}}
---
apiVersion: v1
kind: Service
metadata: {name: pay-service, namespace: shop}
spec: {selector: {app: pay}, ports: [{name: http, port: 80}]}
"#,
    );
    assert_eq!(
        lines(&text),
        [
            "Warning [VM0002] (WorkloadGroup shop/orders) No Service selects the labels of this WorkloadGroup (app=orders), so its VMs receive no traffic, although its template declares ports http.",
            "Warning [VM0002] (WorkloadGroup shop/pay-vms) No Service selects the labels of this WorkloadGroup (app=pay-service), so its VMs receive no traffic; Service shop/pay-service selects app=pay.",
        ],
        "client-only VMs (workers) are not reported"
    );
}

#[test]
fn tls_disabled_towards_a_strict_workload_entry() {
    let text = PAY.replace(
        "spec: {host: pay, subsets: [{name: v1, labels: {version: v1}}]}",
        "spec: {host: pay, subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {tls: {mode: DISABLE}}}]}",
    ) + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
    assert_eq!(
        lines(&text),
        [
            "Error [VM0003] (DestinationRule shop/pay) This DestinationRule disables TLS to port 80 of pay.shop.svc.cluster.local, but WorkloadEntry shop/pay-v1 accepts only mutual TLS on port 80 (PeerAuthentication shop/strict is STRICT): its requests through this rule are refused."
        ]
    );
    let messages = analyze(&decode("t.yaml", &text));
    assert_eq!(messages[0].field, "spec.subsets[0].trafficPolicy.tls.mode");
    // PERMISSIVE takes plaintext: nothing to say.
    let permissive = text.replace("mode: STRICT", "mode: PERMISSIVE");
    assert_eq!(lines(&permissive), Vec::<String>::new());
}

#[test]
fn authorization_policy_namespaces_that_do_not_exist() {
    let text = with(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: pay, namespace: shop}
spec:
  selector: {matchLabels: {app: pay}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/frontend/sa/web, cluster.local/ns/shop/sa/pay, "*"]}
    - source: {namespaces: [monitoring, "istio-*", default]}
"#,
    );
    assert_eq!(
        lines(&text),
        [
            "Error [IST0101] (AuthorizationPolicy shop/pay) Referenced namespace not found: \"frontend\"",
            "Error [IST0101] (AuthorizationPolicy shop/pay) Referenced namespace not found: \"monitoring\"",
        ]
    );
}

#[test]
fn gateway_selector_that_matches_no_workload() {
    let text = with(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec: {selector: {istio: ingressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]}
"#,
    );
    assert_eq!(
        lines(&text),
        [
            "Error [IST0101] (Gateway istio-system/ingress) Referenced selector not found: \"istio=ingressgateway\""
        ]
    );
    // An IstioOperator that installs the gateway gives it its workloads.
    let installed = text
        + "---\napiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: gw, namespace: istio-system}\nspec: {components: {ingressGateways: [{name: istio-ingressgateway, enabled: true}]}}\n";
    assert_eq!(lines(&installed), Vec::<String>::new());
}

#[test]
fn validation_problems_are_schema_messages() {
    let error = Message::schema(true, "WorkloadEntry shop/vm1", "spec.ports.http", "bad");
    assert_eq!(
        error.line(Some("we.yaml:9")),
        "Error [IST0106] (WorkloadEntry shop/vm1 we.yaml:9) Schema validation error: spec.ports.http: bad"
    );
    let warning = Message::schema(false, "Telemetry shop/t", "spec", "not applied");
    assert_eq!(
        warning.line(None),
        "Warning [IST0133] (Telemetry shop/t) Schema validation warning: spec: not applied"
    );
    assert_eq!(warning.resource.as_ref().unwrap().scope(), "shop");
    let namespace = Message::schema(true, "Namespace shop", "", "bad");
    assert_eq!(namespace.resource.as_ref().unwrap().scope(), "shop");
}

#[test]
fn messages_are_in_istioctls_order() {
    let mut messages = [
        Message::schema(false, "Telemetry b/t", "", "w"),
        Message::schema(true, "VirtualService b/v", "", "e"),
        Message::schema(true, "VirtualService a/v", "", "e"),
        Message::schema(true, "VirtualService a/v", "", "e"),
    ]
    .to_vec();
    sort(&mut messages);
    let lines: Vec<String> = messages.iter().map(|m| m.line(None)).collect();
    assert_eq!(
        lines,
        [
            "Error [IST0106] (VirtualService a/v) Schema validation error: e",
            "Error [IST0106] (VirtualService b/v) Schema validation error: e",
            "Warning [IST0133] (Telemetry b/t) Schema validation warning: w",
        ]
    );
}

#[test]
fn the_guides_complete_example_is_quiet_where_its_namespaces_exist() {
    let mut objects = seed(&["complete-vm-integration.yaml"]);
    let quiet: Vec<String> = analyze(&objects).iter().map(|m| m.line(None)).collect();
    assert_eq!(
        quiet,
        [
            "Error [IST0101] (AuthorizationPolicy vm-workloads/payment-service-authz) Referenced namespace not found: \"frontend\"",
            "Error [IST0101] (AuthorizationPolicy vm-workloads/payment-service-authz) Referenced namespace not found: \"orders\"",
        ],
        "the guide's callers' namespaces are not among its manifests"
    );
    objects.extend(decode(
        "callers.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: frontend}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: orders}\n",
    ));
    assert_eq!(analyze(&objects), Vec::<Message>::new());
}

#[test]
fn telemetry_providers_that_do_nothing() {
    let text = with(
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: vm, namespace: istio-system}\n\
         spec:\n  meshConfig:\n    extensionProviders:\n    - {name: zipkin, zipkin: {service: zipkin.tracing.svc.cluster.local, port: 9411}}\n    - {name: shop-zipkin, zipkin: {service: pay.shop.svc.cluster.local, port: 80}}\n---\n\
         apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: shop}\n\
         spec:\n  accessLogging: [{providers: [{name: envoy}, {name: zipkin}]}]\n  tracing: [{providers: [{name: nope}]}, {providers: [{name: zipkin}]}, {providers: [{name: shop-zipkin}]}]\n  metrics: [{providers: [{name: prometheus}]}]\n",
    );
    assert_eq!(
        lines(&text),
        [
            "Warning [VM0004] (Telemetry shop/t) provider \"nope\" is not defined in meshConfig.extensionProviders: the workloads it selects are not traced",
            "Warning [VM0004] (Telemetry shop/t) provider \"zipkin\" is not of a kind vmesh applies to accessLogging: nothing is logged to it",
            "Warning [VM0004] (Telemetry shop/t) provider \"zipkin\" sends spans to zipkin.tracing.svc.cluster.local:9411, which is not a service of the mesh: the workloads it selects are not traced",
        ]
    );
    let messages = analyze(&decode("t.yaml", &text));
    assert_eq!(messages[0].field, "spec.tracing[0].providers[0].name");
}
