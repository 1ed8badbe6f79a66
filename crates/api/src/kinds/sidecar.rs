//! Istio `Sidecar`: what a workload's proxy listens for and which hosts it may reach.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{LabelsSelector, NETWORKING_VERSIONS, SpecValidate, WithSpec, check_protocol};
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarSpec {
    pub workload_selector: Option<LabelsSelector>,
    pub ingress: Option<Vec<IstioIngressListener>>,
    pub egress: Option<Vec<IstioEgressListener>>,
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    pub inbound_connection_pool: Option<serde_json::Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarPort {
    pub number: u32,
    pub protocol: Option<String>,
    pub name: Option<String>,
    pub target_port: Option<u32>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioIngressListener {
    pub port: SidecarPort,
    pub bind: Option<String>,
    pub capture_mode: Option<CaptureMode>,
    pub default_endpoint: Option<String>,
    pub tls: Option<serde_json::Value>,
    pub connection_pool: Option<serde_json::Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioEgressListener {
    pub port: Option<SidecarPort>,
    pub bind: Option<String>,
    pub capture_mode: Option<CaptureMode>,
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CaptureMode {
    Default,
    Iptables,
    None,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTrafficPolicy {
    pub mode: Option<OutboundMode>,
    pub egress_proxy: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    RegistryOnly,
    AllowAny,
}

impl SidecarPort {
    fn validate(&self, c: &mut Checker, path: &Path) {
        c.port(&path.f("number"), self.number);
        if let Some(protocol) = &self.protocol {
            check_protocol(c, &path.f("protocol"), protocol);
        }
        if let Some(target) = self.target_port {
            c.port(&path.f("targetPort"), target);
        }
    }
}

impl SpecValidate for SidecarSpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        c.warn(
            path,
            "Sidecar resources are accepted but not applied by vmesh yet: proxies see every service",
        );
        if let Some(selector) = &self.workload_selector {
            selector.validate(c, &path.f("workloadSelector"));
        }
        for (i, ingress) in self.ingress.iter().flatten().enumerate() {
            let p = path.f("ingress").i(i);
            ingress.port.validate(c, &p.f("port"));
        }
        for (i, egress) in self.egress.iter().flatten().enumerate() {
            let p = path.f("egress").i(i);
            if let Some(port) = &egress.port {
                port.validate(c, &p.f("port"));
            }
            if egress.hosts.is_empty() {
                c.error(&p.f("hosts"), "at least one host is required");
            }
            for (j, host) in egress.hosts.iter().enumerate() {
                match host.split_once('/') {
                    Some((ns, h)) => {
                        if !matches!(ns, "*" | "." | "~") {
                            c.dns1123_label(&p.f("hosts").i(j), ns);
                        }
                        c.hostname(&p.f("hosts").i(j), h);
                    }
                    None => c.error(
                        &p.f("hosts").i(j),
                        format!("host {host:?} must be namespace/dnsName"),
                    ),
                }
            }
        }
    }
}

pub type Sidecar = WithSpec<SidecarSpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "Sidecar",
    group: "networking.istio.io",
    versions: NETWORKING_VERSIONS,
    plural: "sidecars",
    short_names: &[],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[],
    decode: decode_body::<Sidecar>,
    schema: body_schema::<Sidecar>,
};
