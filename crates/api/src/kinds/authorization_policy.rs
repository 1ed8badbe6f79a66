//! Istio `AuthorizationPolicy`: who may call a workload, on which operations.

use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{
    MatchLabelsSelector, PolicyTargetReference, SECURITY_VERSIONS, SpecValidate, WithSpec,
};
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<MatchLabelsSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    pub rules: Option<Vec<Rule>>,
    pub action: Option<Action>,
    pub provider: Option<ExtensionProvider>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub from: Option<Vec<RuleFrom>>,
    pub to: Option<Vec<RuleTo>>,
    pub when: Option<Vec<Condition>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
        if action == Action::Custom && self.provider.is_none() {
            c.error(
                &path.f("provider"),
                "provider is required for action CUSTOM",
            );
        }
        if action != Action::Custom && self.provider.is_some() {
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
                }
                if cond.values.is_none() && cond.not_values.is_none() {
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
};
