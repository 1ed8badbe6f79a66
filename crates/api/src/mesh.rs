//! Mesh-wide names and the one rule that turns IstioOperators into mesh
//! settings. Every crate that needs the root namespace, the default trust
//! domain or the DNS suffix of Service hostnames takes it from here, and every
//! reader of IstioOperators (the registry, the server's CA check, onboarding
//! through the server) resolves them with [`MeshSettings::resolve`].
//!
//! This module owns the precedence between operators; it does not decide what
//! a setting does (the registry and xds crates do) and does no I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::kinds::istio_operator::{DefaultProviders, ExtensionProvider, IstioOperatorSpec};
use crate::kinds::sidecar::OutboundMode;

/// Istio's root namespace: mesh-wide policies and the control plane's own objects.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// The trust domain of SPIFFE identities when the mesh sets none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The DNS suffix of Kubernetes Service hostnames (`name.namespace.svc.cluster.local`).
pub const DEFAULT_DOMAIN_SUFFIX: &str = "cluster.local";

/// One IstioOperator as [`MeshSettings::resolve`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct OperatorRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub spec: &'a IstioOperatorSpec,
}

/// What outbound traffic to hosts the registry does not know may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    #[default]
    AllowAny,
    RegistryOnly,
}

/// The mesh settings of one revision, resolved from its IstioOperators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSettings {
    /// `meshConfig.trustDomain`, default [`DEFAULT_TRUST_DOMAIN`].
    pub trust_domain: String,
    /// Whether an operator set [`trust_domain`](Self::trust_domain) (else it is the default).
    pub trust_domain_set: bool,
    /// `meshConfig.rootNamespace`, default [`DEFAULT_ROOT_NAMESPACE`].
    pub root_namespace: String,
    /// The DNS suffix of Service hostnames: `values.global.proxy.clusterDomain`,
    /// default [`DEFAULT_DOMAIN_SUFFIX`].
    pub domain_suffix: String,
    /// `meshConfig.outboundTrafficPolicy.mode`, default `ALLOW_ANY`.
    pub outbound_policy: OutboundPolicy,
    /// `meshConfig.defaultConfig.meshId`, else `values.global.meshID`.
    pub mesh_id: Option<String>,
    /// `values.global.multiCluster.clusterName`.
    pub cluster_name: Option<String>,
    /// `values.global.network`.
    pub network: Option<String>,
    /// `meshConfig.defaultConfig` as written (the proxy config onboarding starts from).
    pub default_config: serde_json::Map<String, Value>,
    /// `namespace/name` of the operators the settings came from, in precedence order.
    pub sources: Vec<String>,
    /// What Telemetry resources build on: access log defaults, providers, tracing defaults.
    #[serde(default)]
    pub telemetry: MeshTelemetry,
}

/// The mesh-wide telemetry settings of `meshConfig`, each from the first
/// operator that sets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshTelemetry {
    /// `accessLogFile`: every sidecar logs there unless a Telemetry says otherwise.
    pub access_log_file: Option<String>,
    /// `accessLogEncoding: JSON`.
    pub access_log_json: bool,
    /// `accessLogFormat`: a text format, or for JSON a JSON object of labels.
    pub access_log_format: Option<String>,
    pub extension_providers: Vec<ExtensionProvider>,
    pub default_providers: DefaultProviders,
    /// `enableTracing` (default true): false turns every tracer off.
    pub enable_tracing: bool,
    /// `defaultConfig.tracing.sampling`: the percentage sampled where a
    /// Telemetry does not say (Istio's default 1%).
    pub default_sampling: f64,
}

impl Default for MeshTelemetry {
    fn default() -> Self {
        MeshTelemetry {
            access_log_file: None,
            access_log_json: false,
            access_log_format: None,
            extension_providers: Vec::new(),
            default_providers: DefaultProviders::default(),
            enable_tracing: true,
            default_sampling: 1.0,
        }
    }
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            trust_domain_set: false,
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            domain_suffix: DEFAULT_DOMAIN_SUFFIX.to_string(),
            outbound_policy: OutboundPolicy::AllowAny,
            mesh_id: None,
            cluster_name: None,
            network: None,
            default_config: serde_json::Map::new(),
            sources: Vec::new(),
            telemetry: MeshTelemetry::default(),
        }
    }
}

/// `None` for the default revision (absent, empty or `default`).
fn named_revision(revision: Option<&str>) -> Option<&str> {
    revision.filter(|r| !r.is_empty() && *r != "default")
}

impl MeshSettings {
    /// The settings of `revision` (`None` or `default`: the default revision).
    ///
    /// Only operators of that revision count. Among them, those in the root
    /// namespace ([`DEFAULT_ROOT_NAMESPACE`]) come first, then the rest by
    /// namespace and name; for each setting the first operator that says
    /// something wins.
    pub fn resolve(operators: &[OperatorRef<'_>], revision: Option<&str>) -> MeshSettings {
        let wanted = named_revision(revision);
        let mut chosen: Vec<&OperatorRef<'_>> = operators
            .iter()
            .filter(|o| named_revision(o.spec.revision.as_deref()) == wanted)
            .collect();
        chosen.sort_by_key(|o| (o.namespace != DEFAULT_ROOT_NAMESPACE, o.namespace, o.name));

        let meshes = || chosen.iter().filter_map(|o| o.spec.mesh_config.as_ref());
        let globals = || {
            chosen
                .iter()
                .filter_map(|o| o.spec.values.as_ref()?.global.as_ref())
        };
        let defaults = MeshSettings::default();
        let trust_domain = meshes().find_map(|m| m.trust_domain.clone());
        MeshSettings {
            trust_domain_set: trust_domain.is_some(),
            trust_domain: trust_domain.unwrap_or(defaults.trust_domain),
            root_namespace: meshes()
                .find_map(|m| m.root_namespace.clone())
                .unwrap_or(defaults.root_namespace),
            domain_suffix: globals()
                .find_map(|g| g.other.get("proxy")?.get("clusterDomain")?.as_str())
                .map_or(defaults.domain_suffix, str::to_string),
            outbound_policy: match meshes().find_map(|m| m.outbound_traffic_policy.as_ref()?.mode) {
                Some(OutboundMode::RegistryOnly) => OutboundPolicy::RegistryOnly,
                Some(OutboundMode::AllowAny) | None => OutboundPolicy::AllowAny,
            },
            mesh_id: meshes()
                .find_map(|m| m.default_config.as_ref()?.mesh_id.clone())
                .or_else(|| globals().find_map(|g| g.mesh_id.clone())),
            cluster_name: globals().find_map(|g| g.multi_cluster.as_ref()?.cluster_name.clone()),
            network: globals().find_map(|g| g.network.clone()),
            default_config: meshes()
                .find_map(|m| m.default_config.as_ref())
                .and_then(|c| match serde_json::to_value(c) {
                    Ok(Value::Object(map)) => Some(map),
                    _ => None,
                })
                .unwrap_or_default(),
            sources: chosen
                .iter()
                .map(|o| format!("{}/{}", o.namespace, o.name))
                .collect(),
            telemetry: MeshTelemetry {
                access_log_file: meshes().find_map(|m| m.access_log_file.clone()),
                access_log_json: meshes()
                    .find_map(|m| m.access_log_encoding.as_deref())
                    .is_some_and(|e| e == "JSON"),
                access_log_format: meshes().find_map(|m| m.access_log_format.clone()),
                extension_providers: meshes()
                    .find_map(|m| m.extension_providers.clone())
                    .unwrap_or_default(),
                default_providers: meshes()
                    .find_map(|m| m.default_providers.clone())
                    .unwrap_or_default(),
                enable_tracing: meshes().find_map(|m| m.enable_tracing).unwrap_or(true),
                default_sampling: meshes()
                    .find_map(|m| {
                        m.default_config
                            .as_ref()?
                            .tracing
                            .as_ref()?
                            .get("sampling")?
                            .as_f64()
                    })
                    // Istio reads 0 as unset, and anything over 100 as its default.
                    .filter(|pct| *pct > 0.0 && *pct <= 100.0)
                    .unwrap_or(defaults.telemetry.default_sampling),
            },
        }
    }
}

/// A core `v1` ConfigMap object holding `data`.
pub fn config_map<K: Into<String>, V: Into<String>>(
    namespace: &str,
    name: &str,
    data: impl IntoIterator<Item = (K, V)>,
) -> crate::Object {
    let data: serde_json::Map<String, Value> = data
        .into_iter()
        .map(|(k, v)| (k.into(), Value::String(v.into())))
        .collect();
    let mut body = serde_json::Map::new();
    body.insert("data".into(), Value::Object(data));
    crate::Object {
        api_version: "v1".into(),
        kind: crate::kinds::config_map::KIND.kind.into(),
        metadata: crate::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: Value) -> IstioOperatorSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn mesh_mtls_is_read_as_istio_spells_it() {
        let operator = spec(serde_json::json!({
            "meshConfig": {"meshMTLS": {"minProtocolVersion": "TLSV1_3"}},
        }));
        let mesh = operator.mesh_config.expect("meshConfig");
        assert!(mesh.mesh_mtls.is_some());
        assert_eq!(
            serde_json::to_value(&mesh).unwrap()["meshMTLS"]["minProtocolVersion"],
            "TLSV1_3"
        );
    }

    #[test]
    fn root_namespace_first_then_by_name_and_revision_filtered() {
        let other = spec(serde_json::json!({
            "meshConfig": {"trustDomain": "other.example"},
            "values": {"global": {"meshID": "m2"}}
        }));
        let root = spec(serde_json::json!({"meshConfig": {"trustDomain": "corp.example"}}));
        let canary = spec(serde_json::json!({
            "revision": "canary",
            "meshConfig": {"trustDomain": "canary.example"}
        }));
        let operators = [
            OperatorRef {
                namespace: "aaa",
                name: "a",
                spec: &other,
            },
            OperatorRef {
                namespace: DEFAULT_ROOT_NAMESPACE,
                name: "z",
                spec: &root,
            },
            OperatorRef {
                namespace: DEFAULT_ROOT_NAMESPACE,
                name: "c",
                spec: &canary,
            },
        ];
        let default = MeshSettings::resolve(&operators, None);
        assert_eq!(default.trust_domain, "corp.example");
        assert!(default.trust_domain_set);
        assert_eq!(default.mesh_id.as_deref(), Some("m2"));
        assert_eq!(default.sources, ["istio-system/z", "aaa/a"]);
        assert_eq!(MeshSettings::resolve(&operators, Some("default")), default);

        let canary = MeshSettings::resolve(&operators, Some("canary"));
        assert_eq!(canary.trust_domain, "canary.example");
        assert_eq!(canary.sources, ["istio-system/c"]);

        let none = MeshSettings::resolve(&operators, Some("nope"));
        assert_eq!(none.trust_domain, DEFAULT_TRUST_DOMAIN);
        assert!(!none.trust_domain_set && none.sources.is_empty());
    }
}
