//! `install.istio.io/v1alpha1` IstioOperator, read as mesh configuration:
//! `meshConfig`, `values.global` (mesh ID, network, cluster name) and the
//! gateway components. Objects without a name are called `default` and live
//! in `istio-system`, as Istio's own installer treats them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_with::skip_serializing_none;

use super::common::{Duration, SpecValidate, WithSpec, check_selector_labels};
use super::sidecar::OutboundTrafficPolicy;
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioOperatorSpec {
    pub profile: Option<String>,
    pub hub: Option<String>,
    pub tag: Option<Value>,
    pub revision: Option<String>,
    pub namespace: Option<String>,
    pub mesh_config: Option<MeshConfig>,
    pub values: Option<Values>,
    pub components: Option<Components>,
    pub unvalidated_values: Option<Value>,
}

/// The parts of Istio's `MeshConfig` vmesh understands.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    pub default_config: Option<ProxyConfig>,
    pub trust_domain: Option<String>,
    pub trust_domain_aliases: Option<Vec<String>>,
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    pub access_log_file: Option<String>,
    pub access_log_encoding: Option<String>,
    pub access_log_format: Option<String>,
    pub enable_auto_mtls: Option<bool>,
    pub enable_tracing: Option<bool>,
    pub enable_prometheus_merge: Option<bool>,
    pub root_namespace: Option<String>,
    pub connect_timeout: Option<Duration>,
    pub protocol_detection_timeout: Option<Duration>,
    pub default_providers: Option<Value>,
    pub extension_providers: Option<Vec<Value>>,
    pub ca_certificates: Option<Vec<Value>>,
    pub locality_lb_setting: Option<Value>,
    /// Istio spells it `meshMTLS` (proto field `mesh_mTLS`).
    #[serde(rename = "meshMTLS", alias = "meshMtls")]
    pub mesh_mtls: Option<Value>,
    pub discovery_selectors: Option<Vec<Value>>,
}

impl MeshConfig {
    /// The fields vmesh reads but does not act on, and whether each is set:
    /// `vmesh validate` warns about those that are.
    fn not_applied(&self) -> [(&'static str, bool); 15] {
        [
            ("trustDomainAliases", self.trust_domain_aliases.is_some()),
            ("accessLogFile", self.access_log_file.is_some()),
            ("accessLogEncoding", self.access_log_encoding.is_some()),
            ("accessLogFormat", self.access_log_format.is_some()),
            ("enableAutoMtls", self.enable_auto_mtls == Some(false)),
            ("enableTracing", self.enable_tracing.is_some()),
            (
                "enablePrometheusMerge",
                self.enable_prometheus_merge == Some(false),
            ),
            ("connectTimeout", self.connect_timeout.is_some()),
            (
                "protocolDetectionTimeout",
                self.protocol_detection_timeout.is_some(),
            ),
            ("defaultProviders", self.default_providers.is_some()),
            ("extensionProviders", self.extension_providers.is_some()),
            ("caCertificates", self.ca_certificates.is_some()),
            ("localityLbSetting", self.locality_lb_setting.is_some()),
            ("meshMTLS", self.mesh_mtls.is_some()),
            ("discoverySelectors", self.discovery_selectors.is_some()),
        ]
    }
}

/// The parts of Istio's `ProxyConfig` (`meshConfig.defaultConfig`) vmesh understands.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    pub hold_application_until_proxy_starts: Option<bool>,
    pub proxy_metadata: Option<BTreeMap<String, String>>,
    pub discovery_address: Option<String>,
    pub cluster_name: Option<String>,
    pub drain_duration: Option<Duration>,
    pub termination_drain_duration: Option<Duration>,
    pub concurrency: Option<u32>,
    pub proxy_admin_port: Option<u32>,
    pub status_port: Option<u32>,
    pub tracing: Option<Value>,
    pub readiness_probe: Option<Value>,
    pub proxy_stats_matcher: Option<Value>,
    pub mesh_id: Option<String>,
    pub image: Option<Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Values {
    pub global: Option<GlobalValues>,
    /// Helm values outside `global` are installer settings vmesh does not use.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalValues {
    #[serde(rename = "meshID")]
    pub mesh_id: Option<String>,
    pub network: Option<String>,
    pub multi_cluster: Option<MultiCluster>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MultiCluster {
    pub cluster_name: Option<String>,
    pub enabled: Option<bool>,
    pub global_domain_suffix: Option<String>,
    pub include_env_in_ip_matcher: Option<bool>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Components {
    pub base: Option<Component>,
    pub pilot: Option<Component>,
    pub cni: Option<Component>,
    pub ztunnel: Option<Component>,
    pub istiod_remote: Option<Component>,
    pub ingress_gateways: Option<Vec<GatewayComponent>>,
    pub egress_gateways: Option<Vec<GatewayComponent>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Component {
    pub enabled: Option<bool>,
    pub namespace: Option<String>,
    pub hub: Option<String>,
    pub tag: Option<Value>,
    pub k8s: Option<Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayComponent {
    pub name: String,
    pub namespace: Option<String>,
    pub enabled: Option<bool>,
    pub label: Option<BTreeMap<String, String>>,
    pub hub: Option<String>,
    pub tag: Option<Value>,
    /// Kubernetes deployment settings (service ports, env) in Kubernetes' own shape.
    pub k8s: Option<Value>,
}

impl SpecValidate for IstioOperatorSpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        if let Some(mesh) = &self.mesh_config {
            let mp = path.f("meshConfig");
            if let Some(td) = &mesh.trust_domain {
                c.dns1123_subdomain(&mp.f("trustDomain"), td);
            }
            for (field, set) in mesh.not_applied() {
                if set {
                    c.warn(&mp.f(field), "accepted but not applied by vmesh yet");
                }
            }
            if let Some(proxy) = &mesh.default_config {
                for (field, port) in [
                    ("proxyAdminPort", proxy.proxy_admin_port),
                    ("statusPort", proxy.status_port),
                ] {
                    if let Some(port) = port {
                        c.port(&mp.f("defaultConfig").f(field), port);
                    }
                }
                for (key, value) in proxy.proxy_metadata.iter().flatten() {
                    let is_flag = key.ends_with("_CAPTURE") || key.ends_with("_AUTO_ALLOCATE");
                    if is_flag && !matches!(value.as_str(), "true" | "false") {
                        c.error(
                            &mp.f("defaultConfig").f("proxyMetadata").f(key),
                            format!("{key} must be \"true\" or \"false\", not {value:?}"),
                        );
                    }
                }
            }
        }
        if let Some(global) = self.values.as_ref().and_then(|v| v.global.as_ref()) {
            let gp = path.f("values").f("global");
            if let Some(network) = &global.network {
                c.dns1123_label(&gp.f("network"), network);
            }
        }
        if let Some(components) = &self.components {
            for (field, gateways) in [
                ("ingressGateways", &components.ingress_gateways),
                ("egressGateways", &components.egress_gateways),
            ] {
                for (i, gw) in gateways.iter().flatten().enumerate() {
                    let gp = path.f("components").f(field).i(i);
                    c.dns1123_label(&gp.f("name"), &gw.name);
                    if let Some(labels) = &gw.label {
                        check_selector_labels(c, &gp.f("label"), labels);
                    }
                }
            }
        }
    }
}

pub type IstioOperator = WithSpec<IstioOperatorSpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "IstioOperator",
    group: "install.istio.io",
    versions: &["v1alpha1"],
    plural: "istiooperators",
    short_names: &["iop", "io"],
    namespaced: true,
    default_name: Some("default"),
    default_namespace: Some("istio-system"),
    columns: &[("PROFILE", "/spec/profile")],
    decode: decode_body::<IstioOperator>,
};
