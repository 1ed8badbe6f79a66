//! Istio `AuthorizationPolicy`: who may call a workload, on which operations.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{
    MatchLabelsSelector, PolicyTargetReference, SECURITY_VERSIONS, SpecValidate, WithSpec,
};
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<MatchLabelsSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    pub rules: Option<Vec<Rule>>,
    pub action: Option<Action>,
    pub provider: Option<ExtensionProvider>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub from: Option<Vec<RuleFrom>>,
    pub to: Option<Vec<RuleTo>>,
    pub when: Option<Vec<Condition>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub request_principals: Option<Vec<String>>,
    pub not_request_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
    pub remote_ip_blocks: Option<Vec<String>>,
    pub not_remote_ip_blocks: Option<Vec<String>>,
    pub service_accounts: Option<Vec<String>>,
    pub not_service_accounts: Option<Vec<String>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub ports: Option<Vec<String>>,
    pub not_ports: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}

/// Istio matches these with exact, prefix (`abc*`), suffix (`*abc`) or presence (`*`).
fn check_wildcards(c: &mut Checker, path: &Path, values: &Option<Vec<String>>) {
    for (i, value) in values.iter().flatten().enumerate() {
        let inner = value.strip_prefix('*').unwrap_or(value);
        let inner = inner.strip_suffix('*').unwrap_or(inner);
        if value.is_empty() {
            c.error(&path.i(i), "empty value");
        } else if inner.contains('*')
            || (value.len() > 1 && value.starts_with('*') && value.ends_with('*'))
        {
            c.error(
                &path.i(i),
                format!("{value:?}: '*' is only allowed at the start or the end"),
            );
        }
    }
}

/// The key of a `when` condition: Istio's attributes that vmesh translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionKey<'a> {
    /// `request.headers[Name]`, with the header name.
    RequestHeader(&'a str),
    /// `source.ip`: the peer address of the connection.
    SourceIp,
    /// `remote.ip`: the client address (X-Forwarded-For or proxy protocol).
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    /// `source.serviceAccount`: `namespace/name` or `name`.
    SourceServiceAccount,
    /// `request.auth.principal`, `request.auth.audiences`,
    /// `request.auth.presenter`, `request.auth.claims[…]`: what a JWT says.
    RequestAuth,
    DestinationIp,
    DestinationPort,
    ConnectionSni,
}

impl<'a> ConditionKey<'a> {
    /// Reads a key; the error says why it is refused.
    pub fn parse(key: &'a str) -> Result<ConditionKey<'a>, String> {
        let bracketed = |prefix: &str| -> Option<Result<&'a str, String>> {
            let rest = key.strip_prefix(prefix)?;
            let name = rest
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .filter(|name| !name.is_empty());
            Some(name.ok_or_else(|| format!("{key:?}: expected the form {prefix}[NAME]")))
        };
        if let Some(name) = bracketed("request.headers") {
            return name.map(ConditionKey::RequestHeader);
        }
        if let Some(name) = bracketed("request.auth.claims") {
            return name.map(|_| ConditionKey::RequestAuth);
        }
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "source.serviceAccount" => ConditionKey::SourceServiceAccount,
            "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" => {
                ConditionKey::RequestAuth
            }
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            "destination.namespace" => {
                return Err(format!(
                    "{key:?} is replaced by the policy's namespace (metadata.namespace)"
                ));
            }
            "destination.name" | "destination.user" => {
                return Err(format!(
                    "{key:?} is deprecated (only supported in v1alpha1)"
                ));
            }
            _ if key.starts_with("destination.labels") => {
                return Err(format!("{key:?} is replaced by the workload selector"));
            }
            _ if key.starts_with("experimental.envoy.filters.") => {
                return Err(format!(
                    "{key:?}: experimental Envoy metadata conditions are not supported"
                ));
            }
            _ => {
                return Err(format!(
                    "unknown attribute {key:?}; expected one of request.headers[NAME], \
                     source.ip, remote.ip, source.namespace, source.principal, \
                     source.serviceAccount, request.auth.principal, request.auth.audiences, \
                     request.auth.presenter, request.auth.claims[NAME], destination.ip, \
                     destination.port, connection.sni"
                ));
            }
        })
    }
}

/// Istio's `serviceAccounts` / `source.serviceAccount` value: `namespace/name`
/// or `name` (in the policy's namespace), without wildcards.
fn check_service_account(c: &mut Checker, path: &Path, value: &str) {
    let parts: Vec<&str> = value.split('/').collect();
    if value.contains('*') {
        c.error(
            path,
            format!("{value:?}: wildcards are not allowed in service accounts"),
        );
    } else if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        c.error(
            path,
            format!("{value:?}: expected \"namespace/serviceAccount\" or \"serviceAccount\""),
        );
    }
}

fn check_condition_value(c: &mut Checker, path: &Path, key: ConditionKey, value: &str) {
    match key {
        _ if value.is_empty() => c.error(path, "empty value"),
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
            c.ip_or_cidr(path, value)
        }
        ConditionKey::DestinationPort => match value.parse::<u32>() {
            Ok(n) => c.port(path, n),
            Err(_) => c.error(path, format!("{value:?} is not a port number")),
        },
        ConditionKey::SourceServiceAccount => check_service_account(c, path, value),
        _ => {}
    }
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl SpecValidate for AuthorizationPolicySpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        if let Some(selector) = &self.selector {
            selector.validate(c, &path.f("selector"));
        }
        if self.selector.is_some() && (self.target_ref.is_some() || self.target_refs.is_some()) {
            c.error(
                path,
                "selector and targetRef(s) are mutually exclusive; set only one",
            );
        }
        let action = self.action.unwrap_or(Action::Allow);
        if action == Action::Custom {
            c.error(
                &path.f("action"),
                "action CUSTOM (external authorization) is not supported yet; \
                 use ALLOW, DENY or AUDIT",
            );
        } else if self.provider.is_some() {
            c.error(
                &path.f("provider"),
                "provider is only allowed with action CUSTOM",
            );
        }
        for (i, rule) in self.rules.iter().flatten().enumerate() {
            let p = path.f("rules").i(i);
            for (j, from) in rule.from.iter().flatten().enumerate() {
                let sp = p.f("from").i(j).f("source");
                let s = &from.source;
                for (field, values) in [
                    ("principals", &s.principals),
                    ("notPrincipals", &s.not_principals),
                    ("requestPrincipals", &s.request_principals),
                    ("notRequestPrincipals", &s.not_request_principals),
                    ("namespaces", &s.namespaces),
                    ("notNamespaces", &s.not_namespaces),
                ] {
                    check_wildcards(c, &sp.f(field), values);
                }
                for (field, values) in [
                    ("serviceAccounts", &s.service_accounts),
                    ("notServiceAccounts", &s.not_service_accounts),
                ] {
                    for (k, v) in values.iter().flatten().enumerate() {
                        check_service_account(c, &sp.f(field).i(k), v);
                    }
                }
                for (field, values) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ] {
                    for (k, v) in values.iter().flatten().enumerate() {
                        c.ip_or_cidr(&sp.f(field).i(k), v);
                    }
                }
                if s == &Source::default() {
                    c.error(&sp, "source must set at least one field");
                }
            }
            for (j, to) in rule.to.iter().flatten().enumerate() {
                let op_path = p.f("to").i(j).f("operation");
                let op = &to.operation;
                for (field, values) in [
                    ("hosts", &op.hosts),
                    ("notHosts", &op.not_hosts),
                    ("paths", &op.paths),
                    ("notPaths", &op.not_paths),
                ] {
                    check_wildcards(c, &op_path.f(field), values);
                }
                for (field, values) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                    for (k, v) in values.iter().flatten().enumerate() {
                        match v.parse::<u32>() {
                            Ok(n) => c.port(&op_path.f(field).i(k), n),
                            Err(_) => c.error(
                                &op_path.f(field).i(k),
                                format!("{v:?} is not a port number"),
                            ),
                        }
                    }
                }
                for (field, values) in [("methods", &op.methods), ("notMethods", &op.not_methods)] {
                    for (k, m) in values.iter().flatten().enumerate() {
                        if !METHODS.contains(&m.as_str()) && m != "*" {
                            let upper = m.to_ascii_uppercase();
                            let message = if METHODS.contains(&upper.as_str()) {
                                format!(
                                    "unknown HTTP method {m:?}: methods are upper case ({upper:?})"
                                )
                            } else {
                                format!(
                                    "unknown HTTP method {m:?}; expected one of {}",
                                    METHODS.join(", ")
                                )
                            };
                            c.error(&op_path.f(field).i(k), message);
                        }
                    }
                }
                for (field, values) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
                    for (k, v) in values.iter().flatten().enumerate() {
                        if !v.starts_with('/') && !v.starts_with('*') {
                            c.error(
                                &op_path.f(field).i(k),
                                format!("path {v:?} must start with '/'"),
                            );
                        }
                    }
                }
                if op == &Operation::default() {
                    c.error(&op_path, "operation must set at least one field");
                }
            }
            for (j, cond) in rule.when.iter().flatten().enumerate() {
                let cp = p.f("when").i(j);
                if cond.key.is_empty() {
                    c.error(&cp.f("key"), "key is required");
                } else {
                    match ConditionKey::parse(&cond.key) {
                        Err(message) => c.error(&cp.f("key"), message),
                        Ok(key) => {
                            for (field, values) in
                                [("values", &cond.values), ("notValues", &cond.not_values)]
                            {
                                for (k, v) in values.iter().flatten().enumerate() {
                                    check_condition_value(c, &cp.f(field).i(k), key, v);
                                }
                            }
                        }
                    }
                }
                if cond.values.as_ref().is_none_or(Vec::is_empty)
                    && cond.not_values.as_ref().is_none_or(Vec::is_empty)
                {
                    c.error(&cp, "values or notValues is required");
                }
            }
        }
    }
}

pub type AuthorizationPolicy = WithSpec<AuthorizationPolicySpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "AuthorizationPolicy",
    group: "security.istio.io",
    versions: SECURITY_VERSIONS,
    plural: "authorizationpolicies",
    short_names: &["ap"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[("ACTION", "/spec/action")],
    decode: decode_body::<AuthorizationPolicy>,
    schema: body_schema::<AuthorizationPolicy>,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems `vmesh validate` reports for a policy with this spec.
    fn problems(spec: &str) -> Vec<String> {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
        );
        crate::decode_manifests("p.yaml", &text)
            .problems
            .iter()
            .map(|p| p.message.clone())
            .collect()
    }

    #[test]
    fn condition_keys_are_istios() {
        assert_eq!(
            ConditionKey::parse("request.headers[User-Agent]"),
            Ok(ConditionKey::RequestHeader("User-Agent"))
        );
        assert_eq!(
            ConditionKey::parse("request.auth.claims[groups][0]"),
            Ok(ConditionKey::RequestAuth)
        );
        assert_eq!(
            ConditionKey::parse("destination.port"),
            Ok(ConditionKey::DestinationPort)
        );
        for refused in [
            "request.headers",
            "request.headers[]",
            "destination.namespace",
            "destination.labels[app]",
            "experimental.envoy.filters.a.b[c]",
            "source.user",
        ] {
            assert!(ConditionKey::parse(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn conditions_custom_and_service_accounts_are_checked() {
        let fine = "  rules: [{when: [{key: source.ip, values: [10.0.0.0/8]}, \
                    {key: \"request.headers[x-user]\", notValues: [\"*\"]}]}]\n";
        assert_eq!(problems(fine), Vec::<String>::new());
        let found = problems(
            "  rules:\n  - when:\n    - {key: source.user, values: [a]}\n    \
             - {key: destination.port, values: [http]}\n    \
             - {key: remote.ip, notValues: [nope]}\n    \
             - {key: connection.sni, values: []}\n",
        );
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[0].starts_with("unknown attribute \"source.user\""));
        assert_eq!(found[1], "\"http\" is not a port number");
        assert_eq!(found[2], "\"nope\" is not an IP address or CIDR block");
        assert_eq!(found[3], "values or notValues is required");

        let found = problems(
            "  rules: [{from: [{source: {serviceAccounts: [a/b/c, \"ns/*\", ok, ns/ok]}}]}]\n",
        );
        assert_eq!(found.len(), 2, "{found:?}");

        let found = problems("  action: CUSTOM\n  provider: {name: opa}\n");
        assert_eq!(
            found,
            [
                "action CUSTOM (external authorization) is not supported yet; use ALLOW, DENY or AUDIT"
            ]
        );
    }
}
