//! AuthorizationPolicy → RBAC, checked on rendered principals and permissions.

use envoy_types::pb::envoy::config::core::v3::{CidrRange, Node};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Principal, Rbac, permission, principal,
};
use envoy_types::pb::envoy::config::route::v3::header_matcher;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use super::rule::{regex_escape, spiffe_matcher};
use super::*;
use crate::testing::snapshot;

fn proxy(namespace: &str, labels: &[(&str, &str)]) -> Proxy {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let labels = Struct {
        fields: labels
            .iter()
            .map(|(k, v)| (k.to_string(), string(v)))
            .collect(),
    };
    let metadata = Struct {
        fields: [
            ("NAMESPACE".to_string(), string(namespace)),
            (
                "LABELS".to_string(),
                Value {
                    kind: Some(Kind::StructValue(labels)),
                },
            ),
        ]
        .into(),
    };
    let node = Node {
        id: format!("sidecar~10.0.0.5~vm1.{namespace}~{namespace}.svc.cluster.local"),
        metadata: Some(metadata),
        ..Default::default()
    };
    Proxy::from_node(Some(&node)).unwrap()
}

fn http_rules(filter: &HttpFilter) -> Rbac {
    assert_eq!(filter.name, HTTP_RBAC_FILTER);
    let Some(http_filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        panic!("untyped filter");
    };
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
    );
    HttpRbac::decode(any.value.as_slice())
        .unwrap()
        .rules
        .unwrap()
}

fn tcp_rules(filter: &Filter) -> Rbac {
    assert_eq!(filter.name, NETWORK_RBAC_FILTER);
    let Some(filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        panic!("untyped filter");
    };
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
    );
    let rbac = NetworkRbac::decode(any.value.as_slice()).unwrap();
    assert_eq!(rbac.stat_prefix, "tcp.");
    rbac.rules.unwrap()
}

fn action(rules: &Rbac) -> rbac::Action {
    rbac::Action::try_from(rules.action).unwrap()
}

fn names(rules: &Rbac) -> Vec<&str> {
    let mut names: Vec<&str> = rules.policies.keys().map(String::as_str).collect();
    names.sort();
    names
}

/// A compact rendering of a string matcher: `exact:x`, `prefix:x`, `regex:x`…
fn sm(m: &StringMatcher) -> String {
    use string_matcher::MatchPattern;
    let text = match m.match_pattern.as_ref().unwrap() {
        MatchPattern::Exact(v) => format!("exact:{v}"),
        MatchPattern::Prefix(v) => format!("prefix:{v}"),
        MatchPattern::Suffix(v) => format!("suffix:{v}"),
        MatchPattern::SafeRegex(r) => format!("regex:{}", r.regex),
        other => format!("{other:?}"),
    };
    if m.ignore_case {
        format!("{text}/i")
    } else {
        text
    }
}

fn cidr_text(c: &CidrRange) -> String {
    format!("{}/{}", c.address_prefix, c.prefix_len.unwrap().value)
}

fn principal_text(p: &Principal) -> String {
    use principal::Identifier;
    let list = |ids: &[Principal]| {
        ids.iter()
            .map(principal_text)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match p.identifier.as_ref().unwrap() {
        Identifier::AndIds(s) => format!("and({})", list(&s.ids)),
        Identifier::OrIds(s) => format!("or({})", list(&s.ids)),
        Identifier::Any(true) => "any".into(),
        Identifier::NotId(p) => format!("not({})", principal_text(p)),
        Identifier::Authenticated(a) => {
            format!("peer {}", sm(a.principal_name.as_ref().unwrap()))
        }
        Identifier::DirectRemoteIp(c) => format!("ip {}", cidr_text(c)),
        Identifier::RemoteIp(c) => format!("remote_ip {}", cidr_text(c)),
        other => format!("{other:?}"),
    }
}

fn permission_text(p: &Permission) -> String {
    use permission::Rule;
    let list = |rules: &[Permission]| {
        rules
            .iter()
            .map(permission_text)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match p.rule.as_ref().unwrap() {
        Rule::AndRules(s) => format!("and({})", list(&s.rules)),
        Rule::OrRules(s) => format!("or({})", list(&s.rules)),
        Rule::Any(true) => "any".into(),
        Rule::NotRule(p) => format!("not({})", permission_text(p)),
        Rule::Header(h) => match h.header_match_specifier.as_ref().unwrap() {
            header_matcher::HeaderMatchSpecifier::PresentMatch(true) => {
                format!("{} present", h.name)
            }
            header_matcher::HeaderMatchSpecifier::StringMatch(m) => {
                format!("{} {}", h.name, sm(m))
            }
            other => format!("{other:?}"),
        },
        Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(m)),
        }) => format!("path {}", sm(m)),
        Rule::DestinationPort(port) => format!("port {port}"),
        Rule::DestinationIp(c) => format!("dest_ip {}", cidr_text(c)),
        Rule::RequestedServerName(m) => format!("sni {}", sm(m)),
        other => format!("{other:?}"),
    }
}

/// A policy's principals and permissions, rendered.
fn policy_text(rules: &Rbac, name: &str) -> (Vec<String>, Vec<String>) {
    let policy = rules
        .policies
        .get(name)
        .unwrap_or_else(|| panic!("no policy {name} in {:?}", names(rules)));
    (
        policy.principals.iter().map(principal_text).collect(),
        policy.permissions.iter().map(permission_text).collect(),
    )
}

const NOTHING: (&[&str], &[&str]) = (&["not(any)"], &["not(any)"]);

fn is_nothing(text: &(Vec<String>, Vec<String>)) -> bool {
    text.0 == NOTHING.0 && text.1 == NOTHING.1
}

#[test]
fn authz_guide_payment_policy_allows_its_callers() {
    let path = vmesh_api::testing::seed_dir().join("authorization-policy-payment.yaml");
    let snapshot = snapshot(&std::fs::read_to_string(path).unwrap());
    let payment = proxy("vm-workloads", &[("app", "payment-service")]);
    let authz = authorization(&snapshot, &payment);
    assert_eq!(authz.http_filters.len(), 1);
    let rules = http_rules(&authz.http_filters[0]);
    assert_eq!(action(&rules), rbac::Action::Allow);
    let name = |i| format!("ns[vm-workloads]-policy[payment-service-authz]-rule[{i}]");
    assert_eq!(names(&rules), [name(0), name(1), name(2)]);
    assert_eq!(
        policy_text(&rules, &name(0)),
        (
            vec!["and(or(peer exact:spiffe://cluster.local/ns/frontend/sa/frontend-sa))".into()],
            vec![
                "and(or(:method exact:GET, :method exact:POST), \
                     or(path prefix:/api/payments/, path prefix:/api/refunds/))"
                    .into()
            ]
        )
    );
    assert_eq!(
        policy_text(&rules, &name(1)),
        (
            vec!["and(or(peer exact:spiffe://cluster.local/ns/orders/sa/order-service-sa))".into()],
            vec!["and(or(:method exact:POST), or(path exact:/api/payments/process))".into()]
        )
    );
    assert_eq!(
        policy_text(&rules, &name(2)),
        (
            vec!["and(or(peer regex:.*/ns/monitoring/.*))".into()],
            vec!["and(or(:method exact:GET), or(path exact:/metrics), or(port 9091))".into()]
        )
    );
    // Every rule uses methods or paths: on TCP ports, nothing is allowed.
    assert_eq!(authz.network_filters.len(), 1);
    let tcp = tcp_rules(&authz.network_filters[0]);
    assert_eq!(action(&tcp), rbac::Action::Allow);
    assert!(tcp.policies.is_empty());

    // Another workload of the namespace is not selected.
    let other = proxy("vm-workloads", &[("app", "inventory")]);
    assert_eq!(authorization(&snapshot, &other), Authorization::default());
    let unlabelled = proxy("vm-workloads", &[]);
    assert_eq!(
        authorization(&snapshot, &unlabelled),
        Authorization::default()
    );
}

const SELECTION: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [untrusted]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-everywhere, namespace: istio-system}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{to: [{operation: {ports: ["5432"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-all, namespace: shop}
spec:
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-db, namespace: shop}
spec:
  selector: {matchLabels: {app: db, tier: data}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: elsewhere, namespace: other}
spec:
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: for-a-gateway, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: shop-gw}]
  action: DENY
  rules: [{}]
"#;

/// The names of the policies in each HTTP filter, with the filter's action.
fn summary(authz: &Authorization) -> Vec<(rbac::Action, Vec<String>)> {
    authz
        .http_filters
        .iter()
        .map(|f| {
            let rules = http_rules(f);
            let names = names(&rules).into_iter().map(String::from).collect();
            (action(&rules), names)
        })
        .collect()
}

#[test]
fn authz_selection_follows_namespaces_and_selectors() {
    let snapshot = snapshot(SELECTION);
    // A db workload in shop: the mesh-wide and root-selector DENYs, the
    // namespace-wide AUDIT, and the selected ALLOW; not the other
    // namespace's policy nor the gateway's.
    let db = proxy(
        "shop",
        &[("app", "db"), ("tier", "data"), ("version", "v1")],
    );
    assert_eq!(
        summary(&authorization(&snapshot, &db)),
        [
            (
                rbac::Action::Log,
                vec!["ns[shop]-policy[shop-all]-rule[0]".into()]
            ),
            (
                rbac::Action::Deny,
                vec![
                    "ns[istio-system]-policy[db-everywhere]-rule[0]".into(),
                    "ns[istio-system]-policy[mesh-wide]-rule[0]".into()
                ]
            ),
            (
                rbac::Action::Allow,
                vec!["ns[shop]-policy[shop-db]-rule[0]".into()]
            ),
        ]
    );
    // shop-db wants tier=data too.
    let partial = proxy("shop", &[("app", "db")]);
    let actions: Vec<_> = summary(&authorization(&snapshot, &partial))
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(actions, [rbac::Action::Log, rbac::Action::Deny]);
    // In a namespace without policies, only the root namespace's apply.
    let web = proxy("web", &[("app", "web")]);
    assert_eq!(
        summary(&authorization(&snapshot, &web)),
        [(
            rbac::Action::Deny,
            vec!["ns[istio-system]-policy[mesh-wide]-rule[0]".into()]
        )]
    );
    let web_db = proxy("web", &[("app", "db")]);
    assert_eq!(summary(&authorization(&snapshot, &web_db))[0].1.len(), 2);
    // With another root namespace, istio-system is an ordinary namespace.
    let mut moved = snapshot.clone();
    moved.mesh.root_namespace = "mesh-root".into();
    assert_eq!(authorization(&moved, &web), Authorization::default());
}

#[test]
fn authz_deny_comes_before_allow_and_audit_first() {
    let snapshot = snapshot(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-allow, namespace: shop}
spec:
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-deny, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/admin/*]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c-audit, namespace: shop}
spec:
  action: AUDIT
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
"#,
    );
    let authz = authorization(&snapshot, &proxy("shop", &[]));
    let http: Vec<_> = authz
        .http_filters
        .iter()
        .map(|f| action(&http_rules(f)))
        .collect();
    let tcp: Vec<_> = authz
        .network_filters
        .iter()
        .map(|f| action(&tcp_rules(f)))
        .collect();
    let order = [rbac::Action::Log, rbac::Action::Deny, rbac::Action::Allow];
    assert_eq!(http, order);
    assert_eq!(tcp, order);
    let deny = http_rules(&authz.http_filters[1]);
    assert_eq!(
        policy_text(&deny, "ns[shop]-policy[b-deny]-rule[0]"),
        (
            vec!["and(any)".into()],
            vec!["and(or(path prefix:/admin/))".into()]
        )
    );
}

#[test]
fn authz_allow_nothing_deny_nothing_and_allow_all() {
    let text = |action: &str, rules: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: p, namespace: shop}}\nspec: {{{action}{rules}}}\n"
        )
    };
    let name = "ns[shop]-policy[p]-rule[0]";
    let shop = proxy("shop", &[]);

    // `spec: {}`: an ALLOW policy that matches nothing denies everything.
    let authz = authorization(&snapshot(&text("", "")), &shop);
    assert_eq!(authz.http_filters.len(), 1);
    let rules = http_rules(&authz.http_filters[0]);
    assert_eq!(action(&rules), rbac::Action::Allow);
    assert!(is_nothing(&policy_text(&rules, name)));
    let tcp = tcp_rules(&authz.network_filters[0]);
    assert_eq!(action(&tcp), rbac::Action::Allow);
    assert!(is_nothing(&policy_text(&tcp, name)));

    // A DENY policy without rules denies nothing.
    let authz = authorization(&snapshot(&text("action: DENY", "")), &shop);
    let rules = http_rules(&authz.http_filters[0]);
    assert_eq!(action(&rules), rbac::Action::Deny);
    assert!(is_nothing(&policy_text(&rules, name)));

    // `rules: [{}]` matches every request.
    let authz = authorization(&snapshot(&text("", "rules: [{}]")), &shop);
    let everything = (vec!["and(any)".to_string()], vec!["and(any)".to_string()]);
    assert_eq!(
        policy_text(&http_rules(&authz.http_filters[0]), name),
        everything
    );
    assert_eq!(
        policy_text(&tcp_rules(&authz.network_filters[0]), name),
        everything
    );
}

#[test]
fn authz_tcp_drops_http_allow_rules_and_trims_deny_rules() {
    let snapshot = snapshot(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  rules:
  - to: [{operation: {ports: ["8080"], methods: [GET]}}]
  - from: [{source: {namespaces: [shop]}}]
    to: [{operation: {ports: ["9090"]}}]
  - from: [{source: {requestPrincipals: ["*"]}}]
  - when: [{key: "request.headers[x-token]", values: ["*"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [untrusted], notRequestPrincipals: ["*"]}}]
    to: [{operation: {methods: [POST], notPaths: [/public/*], ports: ["8080"]}}]
  - to: [{operation: {hosts: [admin.example.com]}}]
"#,
    );
    let authz = authorization(&snapshot, &proxy("shop", &[]));
    let allow_name = |i| format!("ns[shop]-policy[allow]-rule[{i}]");
    let deny_name = |i| format!("ns[shop]-policy[deny]-rule[{i}]");

    // TCP: only the ALLOW rule without HTTP-only fields survives.
    let tcp_allow = tcp_rules(&authz.network_filters[1]);
    assert_eq!(action(&tcp_allow), rbac::Action::Allow);
    assert_eq!(names(&tcp_allow), [allow_name(1)]);
    assert_eq!(
        policy_text(&tcp_allow, &allow_name(1)),
        (
            vec!["and(or(peer regex:.*/ns/shop/.*))".into()],
            vec!["and(or(port 9090))".into()]
        )
    );
    // TCP DENY: the rules lose their HTTP-only conditions and deny more.
    let tcp_deny = tcp_rules(&authz.network_filters[0]);
    assert_eq!(action(&tcp_deny), rbac::Action::Deny);
    assert_eq!(
        policy_text(&tcp_deny, &deny_name(0)),
        (
            vec!["and(or(peer regex:.*/ns/untrusted/.*))".into()],
            vec!["and(or(port 8080))".into()]
        )
    );
    assert_eq!(
        policy_text(&tcp_deny, &deny_name(1)),
        (vec!["and(any)".into()], vec!["and(any)".into()])
    );

    // HTTP keeps everything; request principals never exist in vmesh.
    let http_allow = http_rules(&authz.http_filters[1]);
    assert_eq!(names(&http_allow).len(), 4);
    assert_eq!(
        policy_text(&http_allow, &allow_name(2)).0,
        ["and(or(not(any)))"]
    );
    assert_eq!(
        policy_text(&http_allow, &allow_name(3)),
        (
            vec!["and(any)".into()],
            vec!["and(or(x-token present))".into()]
        )
    );
    let http_deny = http_rules(&authz.http_filters[0]);
    assert_eq!(
        policy_text(&http_deny, &deny_name(0)),
        (
            vec!["and(not(or(not(any))), or(peer regex:.*/ns/untrusted/.*))".into()],
            vec![
                "and(or(:method exact:POST), not(or(path prefix:/public/)), or(port 8080))".into()
            ]
        )
    );
    assert_eq!(
        policy_text(&http_deny, &deny_name(1)).1,
        ["and(or(:authority exact:admin.example.com/i))"]
    );
}

#[test]
fn authz_source_and_operation_shapes() {
    let mut snapshot = snapshot(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shapes, namespace: shop}
spec:
  rules:
  - from:
    - source:
        principals: ["*", "cluster.local/ns/a/sa/b", "example.org/ns/c/*", "*/sa/d"]
        notPrincipals: [cluster.local/ns/bad/sa/bad]
    - source:
        namespaces: [prod-*]
        notNamespaces: ["*-test"]
    - source:
        ipBlocks: [10.0.0.0/8, 192.168.1.1, "2001:db8::1"]
        notIpBlocks: [10.1.0.0/16]
        remoteIpBlocks: [203.0.113.0/24]
    - source:
        serviceAccounts: [billing/charger, local-sa]
        notServiceAccounts: [billing/refunder]
    to:
    - operation:
        paths: ["*", "*.html", /api/*, /exact]
        notPaths: [/api/internal/*]
        hosts: ["*.example.com", "api.*", "*"]
        notMethods: [DELETE]
    - operation:
        notPorts: ["22"]
    when:
    - {key: source.namespace, values: [prod-eu]}
    - {key: destination.port, notValues: ["9999"]}
    - {key: connection.sni, values: ["*.shop.svc"]}
    - {key: destination.ip, values: [10.0.0.5]}
    - {key: remote.ip, notValues: [198.51.100.7]}
    - {key: "request.auth.claims[groups]", values: [admin]}
"#,
    );
    snapshot.mesh.trust_domain = "example.org".into();
    let authz = authorization(&snapshot, &proxy("shop", &[]));
    let rules = http_rules(&authz.http_filters[0]);
    let (principals, permissions) = policy_text(&rules, "ns[shop]-policy[shapes]-rule[0]");
    let when = "or(peer regex:.*/ns/prod-eu/.*), not(or(remote_ip 198.51.100.7/32)), \
                    or(not(any))";
    assert_eq!(
        principals,
        [
            // `cluster.local` stands for the mesh's trust domain.
            format!(
                "and(or(peer regex:.+, peer exact:spiffe://example.org/ns/a/sa/b, \
                     peer prefix:spiffe://example.org/ns/c/, \
                     peer regex:spiffe://.*/sa/d), \
                     not(or(peer exact:spiffe://example.org/ns/bad/sa/bad)), {when})"
            ),
            format!(
                "and(or(peer regex:.*/ns/prod-.*/.*), not(or(peer regex:.*/ns/.*-test/.*)), \
                     {when})"
            ),
            format!(
                "and(or(remote_ip 203.0.113.0/24), \
                     or(ip 10.0.0.0/8, ip 192.168.1.1/32, ip 2001:db8::1/128), \
                     not(or(ip 10.1.0.0/16)), {when})"
            ),
            format!(
                "and(or(peer exact:spiffe://example.org/ns/billing/sa/charger, \
                     peer exact:spiffe://example.org/ns/shop/sa/local-sa), \
                     not(or(peer exact:spiffe://example.org/ns/billing/sa/refunder)), {when})"
            ),
        ]
    );
    let when = "not(or(port 9999)), or(sni suffix:.shop.svc), or(dest_ip 10.0.0.5/32)";
    assert_eq!(
        permissions,
        [
            format!(
                "and(or(:authority suffix:.example.com/i, :authority prefix:api./i, \
                     :authority present), \
                     not(or(:method exact:DELETE)), \
                     or(path regex:.+, path suffix:.html, path prefix:/api/, path exact:/exact), \
                     not(or(path prefix:/api/internal/)), {when})"
            ),
            format!("and(not(or(port 22)), {when})"),
        ]
    );
}

#[test]
fn authz_encoding_is_stable() {
    let mut text = String::new();
    for i in 0..20 {
        text.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: p{i}, namespace: shop}}\n\
                 spec: {{rules: [{{to: [{{operation: {{ports: [\"{}\"]}}}}]}}, {{}}]}}\n",
            1000 + i
        ));
    }
    let snapshot = snapshot(&text);
    let shop = proxy("shop", &[]);
    let first = authorization(&snapshot, &shop);
    assert_eq!(http_rules(&first.http_filters[0]).policies.len(), 40);
    for _ in 0..5 {
        assert_eq!(authorization(&snapshot, &shop), first);
    }
}

#[test]
fn authz_regex_literals_are_escaped() {
    assert_eq!(regex_escape("a.b*c-d"), "a\\.b\\*c-d");
    assert_eq!(
        sm(&spiffe_matcher("*.example/ns/x/sa/y")),
        "regex:spiffe://.*\\.example/ns/x/sa/y"
    );
}
