//! Istio `AuthorizationPolicy` for a sidecar's inbound side: the Envoy RBAC
//! filters that enforce the policies applying to the proxy's workload, with
//! Istio's semantics (`envoy.filters.http.rbac` for HTTP ports,
//! `envoy.filters.network.rbac` for TCP ports).
//!
//! This module owns RBAC generation only: the filters per action here, one
//! rule as an RBAC policy in `rule`. Which policies apply to a workload
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

mod rule;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::config::rbac::v3::{Policy, rbac};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use vmesh_api::kinds::authorization_policy::{Action, AuthorizationPolicySpec};
use vmesh_registry::{Scoped, Snapshot};

use self::rule::{Generator, never};
use crate::node::Proxy;

pub const HTTP_RBAC_FILTER: &str = "envoy.filters.http.rbac";
pub const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";
/// Istio's stat prefix for the network RBAC filter.
const TCP_STAT_PREFIX: &str = "tcp.";

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
