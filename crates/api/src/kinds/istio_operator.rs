//! `install.istio.io/v1alpha1` IstioOperator, read as mesh configuration:
//! `meshConfig`, `values.global` (mesh ID, network, cluster name) and the
//! gateway components. Objects without a name are called `default` and live
//! in `istio-system`, as Istio's own installer treats them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_with::skip_serializing_none;

use super::common::{Duration, SpecValidate, WithSpec, check_selector_labels};
use super::sidecar::OutboundTrafficPolicy;
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    pub default_providers: Option<DefaultProviders>,
    pub extension_providers: Option<Vec<ExtensionProvider>>,
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
    fn not_applied(&self) -> [(&'static str, bool); 9] {
        [
            ("trustDomainAliases", self.trust_domain_aliases.is_some()),
            ("enableAutoMtls", self.enable_auto_mtls == Some(false)),
            (
                "enablePrometheusMerge",
                self.enable_prometheus_merge == Some(false),
            ),
            ("connectTimeout", self.connect_timeout.is_some()),
            (
                "protocolDetectionTimeout",
                self.protocol_detection_timeout.is_some(),
            ),
            ("caCertificates", self.ca_certificates.is_some()),
            ("localityLbSetting", self.locality_lb_setting.is_some()),
            ("meshMTLS", self.mesh_mtls.is_some()),
            ("discoverySelectors", self.discovery_selectors.is_some()),
        ]
    }
}

/// `meshConfig.extensionProviders[]`: a named provider of access logs,
/// traces or metrics that Telemetry resources refer to. vmesh applies the
/// kinds it has fields for; any other kind (`envoyExtAuthzHttp`,
/// `stackdriver`, …) is kept as written and `vmesh validate` says it is not
/// applied.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    pub envoy_file_access_log: Option<FileAccessLogProvider>,
    pub zipkin: Option<ZipkinProvider>,
    pub opentelemetry: Option<OpenTelemetryProvider>,
    pub prometheus: Option<BTreeMap<String, Value>>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `envoyFileAccessLog`: Envoy's file access logger.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileAccessLogProvider {
    pub path: Option<String>,
    pub log_format: Option<LogFormat>,
}

/// A log line's shape: a text format, or JSON with these labels (each a
/// command operator such as `%RESPONSE_CODE%`).
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogFormat {
    pub text: Option<String>,
    pub labels: Option<BTreeMap<String, Value>>,
}

/// `zipkin`: spans sent to a Zipkin collector (Zipkin's JSON v2 API).
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZipkinProvider {
    /// The collector's service host, as in `zipkin.istio-system.svc.cluster.local`.
    pub service: String,
    pub port: u32,
    pub max_tag_length: Option<u32>,
    #[serde(rename = "enable64bitTraceId")]
    pub enable_64bit_trace_id: Option<bool>,
    pub path: Option<String>,
    pub trace_context_option: Option<String>,
    pub timeout: Option<Duration>,
    pub headers: Option<Vec<Value>>,
}

/// `opentelemetry`: spans sent over OTLP, gRPC unless `http` is given.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenTelemetryProvider {
    pub service: String,
    pub port: u32,
    pub max_tag_length: Option<u32>,
    pub http: Option<OtlpHttp>,
    pub grpc: Option<Value>,
    pub resource_detectors: Option<Value>,
    pub dynamic_sampler: Option<Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtlpHttp {
    pub path: Option<String>,
    pub timeout: Option<Duration>,
    pub headers: Option<Vec<Value>>,
}

/// `meshConfig.defaultProviders`: the providers used where no Telemetry names one.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefaultProviders {
    pub tracing: Option<Vec<String>>,
    pub metrics: Option<Vec<String>>,
    pub access_logging: Option<Vec<String>>,
}

impl ExtensionProvider {
    /// The kinds written beside `name` that vmesh applies.
    fn applied_kinds(&self) -> usize {
        [
            self.envoy_file_access_log.is_some(),
            self.zipkin.is_some(),
            self.opentelemetry.is_some(),
            self.prometheus.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count()
    }

    fn validate(&self, c: &mut Checker, path: &Path) {
        c.required_str(&path.f("name"), &self.name);
        for kind in self.other.keys() {
            c.warn(
                &path.f(kind),
                format!("provider kind {kind} is accepted but not applied by vmesh yet"),
            );
        }
        if self.applied_kinds() + self.other.len() != 1 {
            c.error(path, "exactly one provider kind must be set beside name");
        }
        if let Some(zipkin) = &self.zipkin {
            c.hostname(&path.f("zipkin").f("service"), &zipkin.service);
            c.port(&path.f("zipkin").f("port"), zipkin.port);
            for (field, set) in [
                ("traceContextOption", zipkin.trace_context_option.is_some()),
                ("timeout", zipkin.timeout.is_some()),
                ("headers", zipkin.headers.is_some()),
            ] {
                if set {
                    c.warn(
                        &path.f("zipkin").f(field),
                        "accepted but not applied by vmesh yet",
                    );
                }
            }
        }
        if let Some(otel) = &self.opentelemetry {
            let p = path.f("opentelemetry");
            c.hostname(&p.f("service"), &otel.service);
            c.port(&p.f("port"), otel.port);
            for (field, set) in [
                ("resourceDetectors", otel.resource_detectors.is_some()),
                ("dynamicSampler", otel.dynamic_sampler.is_some()),
            ] {
                if set {
                    c.warn(&p.f(field), "accepted but not applied by vmesh yet");
                }
            }
            if let Some(http) = &otel.http
                && http.headers.is_some()
            {
                c.warn(
                    &p.f("http").f("headers"),
                    "accepted but not applied by vmesh yet",
                );
            }
        }
        if let Some(format) = self
            .envoy_file_access_log
            .as_ref()
            .and_then(|f| f.log_format.as_ref())
        {
            let p = path.f("envoyFileAccessLog").f("logFormat");
            if format.text.is_some() && format.labels.is_some() {
                c.error(&p, "set text or labels, not both");
            }
            for (key, value) in format.labels.iter().flatten() {
                if !value.is_string() {
                    c.error(&p.f("labels").f(key), "a label's value must be a string (a command operator such as %RESPONSE_CODE%)");
                }
            }
        }
    }
}

/// The parts of Istio's `ProxyConfig` (`meshConfig.defaultConfig`) vmesh understands.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Values {
    pub global: Option<GlobalValues>,
    /// Helm values outside `global` are installer settings vmesh does not use.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MultiCluster {
    pub cluster_name: Option<String>,
    pub enabled: Option<bool>,
    pub global_domain_suffix: Option<String>,
    pub include_env_in_ip_matcher: Option<bool>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Component {
    pub enabled: Option<bool>,
    pub namespace: Option<String>,
    pub hub: Option<String>,
    pub tag: Option<Value>,
    pub k8s: Option<Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
            if let Some(encoding) = &mesh.access_log_encoding
                && !matches!(encoding.as_str(), "TEXT" | "JSON")
            {
                c.error(
                    &mp.f("accessLogEncoding"),
                    format!("accessLogEncoding must be TEXT or JSON, not {encoding:?}"),
                );
            }
            for (i, provider) in mesh.extension_providers.iter().flatten().enumerate() {
                provider.validate(c, &mp.f("extensionProviders").i(i));
            }
            let providers = mesh.extension_providers.as_deref().unwrap_or_default();
            c.unique_names(
                &mp.f("extensionProviders"),
                "name",
                "provider name",
                providers.iter().map(|p| p.name.as_str()).enumerate(),
            );
            if let Some(proxy) = &mesh.default_config {
                for (field, port) in [
                    ("proxyAdminPort", proxy.proxy_admin_port),
                    ("statusPort", proxy.status_port),
                ] {
                    if let Some(port) = port {
                        c.port(&mp.f("defaultConfig").f(field), port);
                    }
                }
                // Only the sampling percentage is read; tracers come from
                // extensionProviders and Telemetry.
                let tracing = proxy.tracing.as_ref().and_then(Value::as_object);
                for key in tracing.into_iter().flatten().map(|(k, _)| k) {
                    if key != "sampling" {
                        c.warn(
                            &mp.f("defaultConfig").f("tracing").f(key),
                            "accepted but not applied by vmesh: configure tracers with meshConfig.extensionProviders and a Telemetry resource",
                        );
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
    columns: &[("REVISION", "/spec/revision"), ("STATUS", "/status/status")],
    decode: decode_body::<IstioOperator>,
    schema: body_schema::<IstioOperator>,
};

#[cfg(test)]
mod tests {
    /// The problems `vmesh validate` reports for an operator with this meshConfig, with their fields.
    fn problems(mesh_config: &str) -> Vec<String> {
        let text = format!(
            "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\n\
             metadata: {{name: vm, namespace: istio-system}}\nspec:\n  meshConfig:\n{mesh_config}"
        );
        crate::decode_manifests("iop.yaml", &text)
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect()
    }

    #[test]
    fn telemetry_settings_applied_quietly_the_rest_warned() {
        assert!(
            problems(
                "    accessLogFile: /dev/stdout\n    accessLogEncoding: JSON\n    enableTracing: true\n\
                 \x20   defaultConfig: {tracing: {sampling: 10}}\n\
                 \x20   extensionProviders:\n    - {name: zipkin, zipkin: {service: zipkin.tracing.svc.cluster.local, port: 9411}}\n\
                 \x20   - {name: otel, opentelemetry: {service: otel.tracing.svc.cluster.local, port: 4317}}\n\
                 \x20   - {name: logs, envoyFileAccessLog: {path: /var/log/envoy.log, logFormat: {labels: {code: '%RESPONSE_CODE%'}}}}\n"
            )
            .is_empty()
        );
        let found = problems(
            "    accessLogEncoding: YAML\n    defaultConfig: {tracing: {zipkin: {address: z:9411}}}\n\
             \x20   extensionProviders:\n    - {name: a, envoyExtAuthzHttp: {service: authz, port: 80}}\n    - {name: a, zipkin: {service: z.t.svc.cluster.local, port: 9411}}\n",
        );
        let expect = [
            "spec.meshConfig.accessLogEncoding: accessLogEncoding must be TEXT or JSON, not \"YAML\"",
            "spec.meshConfig.defaultConfig.tracing.zipkin: accepted but not applied by vmesh",
            "spec.meshConfig.extensionProviders[0].envoyExtAuthzHttp: provider kind envoyExtAuthzHttp is accepted but not applied by vmesh yet",
            "spec.meshConfig.extensionProviders[1].name: duplicate provider name \"a\"",
        ];
        for prefix in expect {
            assert!(
                found.iter().any(|p| p.starts_with(prefix)),
                "{prefix}: {found:?}"
            );
        }
    }
}
