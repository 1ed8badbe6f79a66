//! One AuthorizationPolicy rule as an Envoy RBAC policy: its sources and
//! `when` conditions as principals, its operations and `when` conditions as
//! permissions, with the matchers Istio writes (SPIFFE principals, trust
//! domain migration, namespace regexes, CIDR blocks, header and path
//! patterns). The parent module decides which policies and actions there
//! are; this one what a rule matches.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use vmesh_api::kinds::authorization_policy::{ConditionKey, Operation, Rule, Source};
/// The trust domain Istio reads as "this mesh's trust domain" in principals.
use vmesh_api::mesh::DEFAULT_TRUST_DOMAIN;

const SPIFFE: &str = "spiffe://";

/// The RBAC policy that matches nothing.
pub(super) fn never() -> Policy {
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
pub(super) struct Unusable;

/// Generates the RBAC policies of one policy's rules.
pub(super) struct Generator<'a> {
    pub action: rbac::Action,
    pub tcp: bool,
    pub trust_domain: &'a str,
    /// The policy's namespace, for service accounts written without one.
    pub namespace: &'a str,
}

impl Generator<'_> {
    /// One rule as an RBAC policy: any of its sources, and any of its
    /// operations, each with all of the rule's `when` conditions on its side.
    pub(super) fn policy(&self, rule: &Rule) -> Result<Policy, Unusable> {
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

pub(super) fn regex_escape(literal: &str) -> String {
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
pub(super) fn spiffe_matcher(value: &str) -> StringMatcher {
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
