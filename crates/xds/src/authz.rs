//! Istio `AuthorizationPolicy` for a sidecar's inbound side: the Envoy RBAC
//! filters that enforce the policies applying to the proxy's workload, with
//! Istio's semantics (`envoy.filters.http.rbac` for HTTP ports,
//! `envoy.filters.network.rbac` for TCP ports).
//!
//! This module owns RBAC generation only. Which policies apply to a workload
//! is the registry's decision (`Snapshot::authorization_policies_for`: those
//! of the root namespace and of the workload's namespace whose selector
//! matches it, none with `targetRef(s)`). It does not decide where the
//! filters go (the inbound filter chains, before the router or the TCP
//! proxy: the caller places them), nor how peers authenticate: the
//! principals and namespaces it matches are those of the peer's mTLS
//! certificate, which only exists where mTLS is on.
//!
//! What Istio would do and vmesh does too:
//! - Order: one filter per action present, AUDIT (RBAC `LOG`, which never
//!   changes the decision), then DENY, then ALLOW, as Istio's builder emits
//!   them. CUSTOM policies are refused by validation (no external
//!   authorization yet) and skipped here.
//! - A policy without rules matches nothing: an ALLOW one alone denies every
//!   request ("allow nothing"), a DENY one denies nothing. `rules: [{}]`
//!   matches everything.
//! - On TCP ports, HTTP-only conditions (hosts, methods, paths and their
//!   `not` forms, `requestPrincipals`, `request.headers[…]`,
//!   `request.auth.*`) cannot be checked: an ALLOW rule using one is dropped
//!   (it matches nothing), a DENY or AUDIT rule keeps its other conditions
//!   (it matches more).
//!
//! Request principals: vmesh has no `RequestAuthentication` (JWT) yet, so no
//! request ever has a request principal or JWT claims. `requestPrincipals`
//! and `request.auth.*` values therefore never match, and their `not` forms
//! always match (as in Istio for a request that carries no JWT).

use std::collections::BTreeMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::{Message, Name};
use vmesh_api::kinds::authorization_policy::{
    Action, AuthorizationPolicySpec, ConditionKey, Operation, Rule, Source,
};
/// The trust domain Istio reads as "this mesh's trust domain" in principals.
use vmesh_api::mesh::DEFAULT_TRUST_DOMAIN;
use vmesh_registry::{Scoped, Snapshot};

use crate::node::Proxy;

pub const HTTP_RBAC_FILTER: &str = "envoy.filters.http.rbac";
pub const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";
/// Istio's stat prefix for the network RBAC filter.
const TCP_STAT_PREFIX: &str = "tcp.";
const SPIFFE: &str = "spiffe://";

/// The RBAC filters for one proxy's inbound side, in evaluation order. Both
/// lists are empty when no policy applies (everything is allowed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Authorization {
    /// For every HTTP inbound chain, before the router.
    pub http_filters: Vec<HttpFilter>,
    /// For every TCP inbound chain, before the TCP proxy.
    pub network_filters: Vec<Filter>,
}

/// The RBAC filters enforcing the authorization policies that apply to `proxy`.
pub fn authorization(snapshot: &Snapshot, proxy: &Proxy) -> Authorization {
    let selected: Vec<&Scoped<AuthorizationPolicySpec>> = snapshot
        .authorization_policies_for(&proxy.namespace, &proxy.labels)
        .collect();
    let trust_domain = &snapshot.mesh.trust_domain;
    let mut out = Authorization::default();
    for (action, rbac_action) in [
        (Action::Audit, rbac::Action::Log),
        (Action::Deny, rbac::Action::Deny),
        (Action::Allow, rbac::Action::Allow),
    ] {
        let policies: Vec<_> = selected
            .iter()
            .copied()
            .filter(|p| p.spec.action.unwrap_or(Action::Allow) == action)
            .collect();
        if policies.is_empty() {
            continue;
        }
        let http = rules(&policies, rbac_action, false, trust_domain);
        out.http_filters.push(HttpFilter {
            name: HTTP_RBAC_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any::<HttpRbac>(
                &HttpRbacConfig { rules: Some(http) },
            ))),
            ..Default::default()
        });
        let tcp = rules(&policies, rbac_action, true, trust_domain);
        out.network_filters.push(Filter {
            name: NETWORK_RBAC_FILTER.into(),
            config_type: Some(filter::ConfigType::TypedConfig(any::<NetworkRbac>(
                &NetworkRbacConfig {
                    rules: Some(tcp),
                    stat_prefix: TCP_STAT_PREFIX.into(),
                },
            ))),
        });
    }
    out
}

// ---------------------------------------------------------------------------
// Encoding. `envoy.config.rbac.v3.RBAC` keeps its policies in a HashMap,
// whose encoding follows the hash order and would change the resource's
// version (a fingerprint of its bytes) from one computation to the next.
// These mirror the filter messages field for field (same tags) with the
// policies in a BTreeMap: the same wire format, in name order.

#[derive(Clone, PartialEq, prost::Message)]
struct RbacRules {
    /// `rbac::Action`.
    #[prost(int32, tag = "1")]
    action: i32,
    #[prost(btree_map = "string, message", tag = "2")]
    policies: BTreeMap<String, Policy>,
}

/// `envoy.extensions.filters.http.rbac.v3.RBAC`.
#[derive(Clone, PartialEq, prost::Message)]
struct HttpRbacConfig {
    #[prost(message, optional, tag = "1")]
    rules: Option<RbacRules>,
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
#[derive(Clone, PartialEq, prost::Message)]
struct NetworkRbacConfig {
    #[prost(message, optional, tag = "1")]
    rules: Option<RbacRules>,
    #[prost(string, tag = "3")]
    stat_prefix: String,
}

/// `config` packed under the type URL of `T`, the message it mirrors.
fn any<T: Name>(config: &impl Message) -> Any {
    Any {
        type_url: T::type_url(),
        value: config.encode_to_vec(),
    }
}

// ---------------------------------------------------------------------------
// Policies → RBAC.

/// Istio's name for the RBAC policy of a policy's rule.
fn policy_name(namespace: &str, name: &str, rule: usize) -> String {
    format!("ns[{namespace}]-policy[{name}]-rule[{rule}]")
}

/// The RBAC rules of one action, for HTTP or TCP chains.
fn rules(
    policies: &[&Scoped<AuthorizationPolicySpec>],
    action: rbac::Action,
    tcp: bool,
    trust_domain: &str,
) -> RbacRules {
    let mut out = RbacRules {
        action: action as i32,
        policies: BTreeMap::new(),
    };
    for policy in policies {
        let generator = Generator {
            action,
            tcp,
            trust_domain,
            namespace: &policy.namespace,
        };
        let rules = policy.spec.rules.as_deref().unwrap_or_default();
        if rules.is_empty() {
            // No rules: a policy that never matches (Istio's allow-nothing).
            out.policies
                .insert(policy_name(&policy.namespace, &policy.name, 0), never());
        }
        for (i, rule) in rules.iter().enumerate() {
            if let Ok(generated) = generator.policy(rule) {
                out.policies
                    .insert(policy_name(&policy.namespace, &policy.name, i), generated);
            }
        }
    }
    out
}

/// The RBAC policy that matches nothing.
fn never() -> Policy {
    Policy {
        permissions: vec![permission_not(permission_any())],
        principals: vec![principal_not(principal_any())],
        ..Default::default()
    }
}

/// One kind of condition: a source field, an operation field or a `when` key.
#[derive(Debug, Clone, Copy)]
enum Key<'a> {
    // Principal side.
    Principal,
    ServiceAccount,
    /// requestPrincipals and `request.auth.*`: never present in vmesh.
    RequestAuth,
    Namespace,
    DirectRemoteIp,
    RemoteIp,
    // Permission side.
    Host,
    Method,
    Path,
    Port,
    DestinationIp,
    Sni,
    Header(&'a str),
}

impl Key<'_> {
    fn is_principal(self) -> bool {
        matches!(
            self,
            Key::Principal
                | Key::ServiceAccount
                | Key::RequestAuth
                | Key::Namespace
                | Key::DirectRemoteIp
                | Key::RemoteIp
        )
    }
}

/// A condition: any of `values` (when set) and none of `not_values` (when set).
#[derive(Debug, Clone, Copy)]
struct Condition<'a> {
    key: Key<'a>,
    values: &'a [String],
    not_values: &'a [String],
}

impl<'a> Condition<'a> {
    fn new(key: Key<'a>, values: &'a Option<Vec<String>>, not: &'a Option<Vec<String>>) -> Self {
        Condition {
            key,
            values: values.as_deref().unwrap_or_default(),
            not_values: not.as_deref().unwrap_or_default(),
        }
    }

    fn is_set(&self) -> bool {
        !self.values.is_empty() || !self.not_values.is_empty()
    }
}

/// The conditions of a source, in Istio's order.
fn source_conditions(s: &Source) -> Vec<Condition<'_>> {
    [
        Condition::new(Key::Principal, &s.principals, &s.not_principals),
        Condition::new(
            Key::ServiceAccount,
            &s.service_accounts,
            &s.not_service_accounts,
        ),
        Condition::new(
            Key::RequestAuth,
            &s.request_principals,
            &s.not_request_principals,
        ),
        Condition::new(Key::Namespace, &s.namespaces, &s.not_namespaces),
        Condition::new(Key::RemoteIp, &s.remote_ip_blocks, &s.not_remote_ip_blocks),
        Condition::new(Key::DirectRemoteIp, &s.ip_blocks, &s.not_ip_blocks),
    ]
    .into_iter()
    .filter(Condition::is_set)
    .collect()
}

/// The conditions of an operation, in Istio's order.
fn operation_conditions(o: &Operation) -> Vec<Condition<'_>> {
    [
        Condition::new(Key::Host, &o.hosts, &o.not_hosts),
        Condition::new(Key::Method, &o.methods, &o.not_methods),
        Condition::new(Key::Path, &o.paths, &o.not_paths),
        Condition::new(Key::Port, &o.ports, &o.not_ports),
    ]
    .into_iter()
    .filter(Condition::is_set)
    .collect()
}

fn when_key(key: &str) -> Option<Key<'_>> {
    Some(match ConditionKey::parse(key).ok()? {
        ConditionKey::RequestHeader(name) => Key::Header(name),
        ConditionKey::SourceIp => Key::DirectRemoteIp,
        ConditionKey::RemoteIp => Key::RemoteIp,
        ConditionKey::SourceNamespace => Key::Namespace,
        ConditionKey::SourcePrincipal => Key::Principal,
        ConditionKey::SourceServiceAccount => Key::ServiceAccount,
        ConditionKey::RequestAuth => Key::RequestAuth,
        ConditionKey::DestinationIp => Key::DestinationIp,
        ConditionKey::DestinationPort => Key::Port,
        ConditionKey::ConnectionSni => Key::Sni,
    })
}

/// A value that cannot be checked here: an HTTP-only condition on a TCP
/// chain, or a malformed value (validation refuses those). In an ALLOW
/// policy the whole rule is dropped; otherwise only the value is.
#[derive(Debug)]
struct Unusable;

/// Generates the RBAC policies of one policy's rules.
struct Generator<'a> {
    action: rbac::Action,
    tcp: bool,
    trust_domain: &'a str,
    /// The policy's namespace, for service accounts written without one.
    namespace: &'a str,
}

impl Generator<'_> {
    /// One rule as an RBAC policy: any of its sources, and any of its
    /// operations, each with all of the rule's `when` conditions on its side.
    fn policy(&self, rule: &Rule) -> Result<Policy, Unusable> {
        let mut principal_when = Vec::new();
        let mut permission_when = Vec::new();
        for cond in rule.when.iter().flatten() {
            // Validation refuses unknown keys; Istio skips such a rule.
            let key = when_key(&cond.key).ok_or(Unusable)?;
            let condition = Condition::new(key, &cond.values, &cond.not_values);
            if key.is_principal() {
                principal_when.push(condition);
            } else {
                permission_when.push(condition);
            }
        }
        let from = rule.from.as_deref().unwrap_or_default();
        let principals = if from.is_empty() {
            vec![self.principal_and(&principal_when)?]
        } else {
            from.iter()
                .map(|f| {
                    let mut conditions = source_conditions(&f.source);
                    conditions.extend(principal_when.iter().copied());
                    self.principal_and(&conditions)
                })
                .collect::<Result<_, _>>()?
        };
        let to = rule.to.as_deref().unwrap_or_default();
        let permissions = if to.is_empty() {
            vec![self.permission_and(&permission_when)?]
        } else {
            to.iter()
                .map(|t| {
                    let mut conditions = operation_conditions(&t.operation);
                    conditions.extend(permission_when.iter().copied());
                    self.permission_and(&conditions)
                })
                .collect::<Result<_, _>>()?
        };
        Ok(Policy {
            permissions,
            principals,
            ..Default::default()
        })
    }

    /// Each value through `generate`, leaving out the unusable ones unless
    /// this is an ALLOW policy (then the whole rule is unusable).
    fn each<T>(
        &self,
        values: &[String],
        generate: impl Fn(&str) -> Result<T, Unusable>,
    ) -> Result<Vec<T>, Unusable> {
        let mut out = Vec::new();
        for value in values {
            match generate(value) {
                Ok(generated) => out.push(generated),
                Err(Unusable) if self.action != rbac::Action::Allow => {}
                Err(Unusable) => return Err(Unusable),
            }
        }
        Ok(out)
    }

    fn principal_and(&self, conditions: &[Condition]) -> Result<Principal, Unusable> {
        let mut and = Vec::new();
        for c in conditions {
            let any_of = self.each(c.values, |v| self.principal(c.key, v))?;
            if !any_of.is_empty() {
                and.push(principal_or(any_of));
            }
            let none_of = self.each(c.not_values, |v| self.principal(c.key, v))?;
            if !none_of.is_empty() {
                and.push(principal_not(principal_or(none_of)));
            }
        }
        if and.is_empty() {
            and.push(principal_any());
        }
        Ok(principal_and(and))
    }

    fn permission_and(&self, conditions: &[Condition]) -> Result<Permission, Unusable> {
        let mut and = Vec::new();
        for c in conditions {
            let any_of = self.each(c.values, |v| self.permission(c.key, v))?;
            if !any_of.is_empty() {
                and.push(permission_or(any_of));
            }
            let none_of = self.each(c.not_values, |v| self.permission(c.key, v))?;
            if !none_of.is_empty() {
                and.push(permission_not(permission_or(none_of)));
            }
        }
        if and.is_empty() {
            and.push(permission_any());
        }
        Ok(permission_and(and))
    }

    fn principal(&self, key: Key, value: &str) -> Result<Principal, Unusable> {
        use principal::Identifier;
        Ok(match key {
            Key::Principal => authenticated(spiffe_matcher(&self.migrate(value))),
            Key::ServiceAccount => {
                let (namespace, account) = value.split_once('/').unwrap_or((self.namespace, value));
                authenticated(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(format!(
                        "{SPIFFE}{}/ns/{namespace}/sa/{account}",
                        self.trust_domain
                    ))),
                    ..Default::default()
                })
            }
            Key::RequestAuth if self.tcp => return Err(Unusable),
            // No JWT authentication: nothing to match.
            Key::RequestAuth => principal_not(principal_any()),
            Key::Namespace => {
                let namespace = value
                    .split('*')
                    .map(regex_escape)
                    .collect::<Vec<_>>()
                    .join(".*");
                authenticated(regex(&format!(".*/ns/{namespace}/.*")))
            }
            Key::DirectRemoteIp => Principal {
                identifier: Some(Identifier::DirectRemoteIp(cidr(value)?)),
            },
            Key::RemoteIp => Principal {
                identifier: Some(Identifier::RemoteIp(cidr(value)?)),
            },
            _ => return Err(Unusable),
        })
    }

    fn permission(&self, key: Key, value: &str) -> Result<Permission, Unusable> {
        use permission::Rule;
        let http_only = matches!(key, Key::Host | Key::Method | Key::Path | Key::Header(_));
        if http_only && self.tcp {
            return Err(Unusable);
        }
        Ok(Permission {
            rule: Some(match key {
                Key::Host => Rule::Header(header(":authority", value, true)),
                Key::Method => Rule::Header(header(":method", value, false)),
                Key::Header(name) => Rule::Header(header(name, value, false)),
                Key::Path => Rule::UrlPath(PathMatcher {
                    rule: Some(path_matcher::Rule::Path(string(value))),
                }),
                Key::Port => Rule::DestinationPort(value.parse().map_err(|_| Unusable)?),
                Key::DestinationIp => Rule::DestinationIp(cidr(value)?),
                Key::Sni => Rule::RequestedServerName(string(value)),
                _ => return Err(Unusable),
            }),
        })
    }

    /// Istio's trust domain migration for a single trust domain: a principal
    /// naming `cluster.local` means this mesh's trust domain.
    fn migrate(&self, principal: &str) -> String {
        let parts: Vec<&str> = principal.split('/').collect();
        if parts.len() == 5 && parts[0] == DEFAULT_TRUST_DOMAIN {
            format!("{}/{}", self.trust_domain, parts[1..].join("/"))
        } else {
            principal.to_string()
        }
    }
}

// ---------------------------------------------------------------------------
// Matchers, as Istio writes them.

fn regex(regex: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: regex.to_string(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn regex_escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Exact, `prefix*`, `*suffix`, or `*` for any non-empty value.
fn string(value: &str) -> StringMatcher {
    use string_matcher::MatchPattern;
    let pattern = if value == "*" {
        return regex(".+");
    } else if let Some(suffix) = value.strip_prefix('*') {
        MatchPattern::Suffix(suffix.to_string())
    } else if let Some(prefix) = value.strip_suffix('*') {
        MatchPattern::Prefix(prefix.to_string())
    } else {
        MatchPattern::Exact(value.to_string())
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

/// A peer principal (`td/ns/x/sa/y`) as its SPIFFE URI: `*` is any
/// authenticated peer, `*suffix` and `prefix*` match the URI's ends.
fn spiffe_matcher(value: &str) -> StringMatcher {
    use string_matcher::MatchPattern;
    let pattern = if value == "*" {
        return regex(".+");
    } else if let Some(suffix) = value.strip_prefix('*') {
        return regex(&format!(
            "{}.*{}",
            regex_escape(SPIFFE),
            regex_escape(suffix)
        ));
    } else if let Some(prefix) = value.strip_suffix('*') {
        MatchPattern::Prefix(format!("{SPIFFE}{prefix}"))
    } else {
        MatchPattern::Exact(format!("{SPIFFE}{value}"))
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

/// A header: `*` for present, `*suffix`, `prefix*` or exact.
fn header(name: &str, value: &str, ignore_case: bool) -> HeaderMatcher {
    let specifier = if value == "*" {
        header_matcher::HeaderMatchSpecifier::PresentMatch(true)
    } else {
        let mut matcher = string(value);
        matcher.ignore_case = ignore_case;
        header_matcher::HeaderMatchSpecifier::StringMatch(matcher)
    };
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(specifier),
        ..Default::default()
    }
}

/// An address or CIDR block; a bare address is a /32 or /128.
fn cidr(value: &str) -> Result<CidrRange, Unusable> {
    let (address, len) = match value.split_once('/') {
        Some((address, len)) => (address, Some(len)),
        None => (value, None),
    };
    let address: IpAddr = address.parse().map_err(|_| Unusable)?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(len) => len
            .parse::<u32>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or(Unusable)?,
        None => max,
    };
    Ok(CidrRange {
        address_prefix: address.to_string(),
        prefix_len: Some(UInt32Value { value: len }),
    })
}

fn authenticated(name: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(name),
            },
        )),
    }
}

fn principal_any() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn principal_or(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

fn principal_and(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
    }
}

fn principal_not(id: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(id))),
    }
}

fn permission_any() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn permission_or(rules: Vec<Permission>) -> Permission {
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules })),
    }
}

fn permission_and(rules: Vec<Permission>) -> Permission {
    Permission {
        rule: Some(permission::Rule::AndRules(permission::Set { rules })),
    }
}

fn permission_not(rule: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(rule))),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::rbac::v3::Rbac;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        let decoded = vmesh_api::decode_manifests("authz.yaml", text);
        assert!(!decoded.has_errors(), "{:?}", decoded.problems);
        let objects: Vec<_> = decoded.objects.into_iter().map(|l| l.object).collect();
        Snapshot::build(&objects, &mut vmesh_registry::VipAllocator::default())
    }

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
                vec![
                    "and(or(peer exact:spiffe://cluster.local/ns/frontend/sa/frontend-sa))".into()
                ],
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
                vec![
                    "and(or(peer exact:spiffe://cluster.local/ns/orders/sa/order-service-sa))"
                        .into()
                ],
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
                    "and(or(:method exact:POST), not(or(path prefix:/public/)), or(port 8080))"
                        .into()
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
}
