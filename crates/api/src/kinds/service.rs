//! Core `v1` Service: a name and virtual IP for the workloads its selector picks,
//! WorkloadEntries included.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_with::skip_serializing_none;

use super::common::IntOrString;
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, Validate, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub spec: ServiceSpec,
    pub status: Option<Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub ports: Option<Vec<ServicePort>>,
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(rename = "type")]
    pub type_: Option<ServiceType>,
    pub external_name: Option<String>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    pub session_affinity: Option<String>,
    #[serde(rename = "loadBalancerIP")]
    pub load_balancer_ip: Option<String>,
    pub ip_families: Option<Vec<String>>,
    pub ip_family_policy: Option<String>,
    pub publish_not_ready_addresses: Option<bool>,
    pub internal_traffic_policy: Option<String>,
    pub external_traffic_policy: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: Option<TransportProtocol>,
    pub app_protocol: Option<String>,
    pub port: u32,
    pub target_port: Option<IntOrString>,
    pub node_port: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TransportProtocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Validate for Service {
    fn validate(&self, c: &mut Checker) {
        let spec = Path::root("spec");
        let ports = self.spec.ports.as_deref().unwrap_or_default();
        for (i, port) in ports.iter().enumerate() {
            let p = spec.f("ports").i(i);
            c.port(&p.f("port"), port.port);
            match &port.name {
                Some(name) => c.dns1123_label(&p.f("name"), name),
                None if ports.len() > 1 => c.error(
                    &p.f("name"),
                    "name is required when a Service has more than one port",
                ),
                None => {}
            }
            match &port.target_port {
                Some(IntOrString::Int(t)) => match u32::try_from(*t) {
                    Ok(t) => c.port(&p.f("targetPort"), t),
                    Err(_) => c.error(
                        &p.f("targetPort"),
                        format!("port {t} is out of range 1-65535"),
                    ),
                },
                Some(IntOrString::String(name)) => c.dns1123_label(&p.f("targetPort"), name),
                None => {}
            }
            if let Some(node_port) = port.node_port {
                c.port(&p.f("nodePort"), node_port);
            }
        }
        c.unique_names(
            &spec.f("ports"),
            "name",
            "port name",
            ports
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((i, p.name.as_deref()?))),
        );
        if let Some(selector) = &self.spec.selector {
            super::common::check_selector_labels(c, &spec.f("selector"), selector);
        }
        if let Some(ip) = &self.spec.cluster_ip
            && ip != "None"
            && !ip.is_empty()
        {
            c.ip(&spec.f("clusterIP"), ip);
        }
        if self.spec.type_ == Some(ServiceType::ExternalName) {
            match &self.spec.external_name {
                Some(name) => c.hostname(&spec.f("externalName"), name),
                None => c.error(&spec.f("externalName"), "is required for type ExternalName"),
            }
        }
    }
}

pub static KIND: KindInfo = KindInfo {
    kind: "Service",
    group: "",
    versions: &["v1"],
    plural: "services",
    short_names: &["svc"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[("TYPE", "/spec/type"), ("CLUSTER-IP", "/spec/clusterIP")],
    decode: decode_body::<Service>,
    schema: body_schema::<Service>,
};
