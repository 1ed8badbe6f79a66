//! Istio `ServiceEntry`: services the registry does not learn from Services —
//! external APIs, or mesh-internal hosts such as a database on VMs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{
    LabelsSelector, NETWORKING_VERSIONS, SpecValidate, WithSpec, check_export_to, check_protocol,
};
use super::workload_entry::WorkloadEntrySpec;
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    pub addresses: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
    pub location: Option<Location>,
    pub resolution: Option<Resolution>,
    pub endpoints: Option<Vec<WorkloadEntrySpec>>,
    pub workload_selector: Option<LabelsSelector>,
    pub export_to: Option<Vec<String>>,
    pub subject_alt_names: Option<Vec<String>>,
}

/// A port of a ServiceEntry (Istio's `ServicePort`).
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub number: u32,
    pub protocol: Option<String>,
    pub name: String,
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

impl SpecValidate for ServiceEntrySpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        if self.hosts.is_empty() {
            c.error(&path.f("hosts"), "at least one host is required");
        }
        for (i, host) in self.hosts.iter().enumerate() {
            if host == "*" {
                c.error(&path.f("hosts").i(i), "a ServiceEntry host cannot be \"*\"");
            } else {
                c.hostname(&path.f("hosts").i(i), host);
            }
        }
        for (i, address) in self.addresses.iter().flatten().enumerate() {
            c.ip_or_cidr(&path.f("addresses").i(i), address);
        }
        let ports = self.ports.as_deref().unwrap_or_default();
        for (i, port) in ports.iter().enumerate() {
            let p = path.f("ports").i(i);
            c.port(&p.f("number"), port.number);
            if let Some(target) = port.target_port {
                c.port(&p.f("targetPort"), target);
            }
            if port.name.is_empty() {
                c.error(&p.f("name"), "port name is required");
            }
            if let Some(protocol) = &port.protocol {
                check_protocol(c, &p.f("protocol"), protocol);
            }
        }
        c.unique_names(
            &path.f("ports"),
            "name",
            "port name",
            ports.iter().enumerate().map(|(i, p)| (i, p.name.as_str())),
        );
        let numbers: Vec<(usize, String)> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.number.to_string()))
            .collect();
        c.unique_names(
            &path.f("ports"),
            "number",
            "port number",
            numbers.iter().map(|(i, n)| (*i, n.as_str())),
        );

        let resolution = self.resolution.unwrap_or(Resolution::None);
        let endpoints = self.endpoints.as_deref().unwrap_or_default();
        c.one_of(
            path,
            &[
                ("endpoints", !endpoints.is_empty()),
                ("workloadSelector", self.workload_selector.is_some()),
            ],
            false,
        );
        for (i, endpoint) in endpoints.iter().enumerate() {
            let p = path.f("endpoints").i(i);
            endpoint.check(c, &p, true);
            for name in endpoint.ports.iter().flatten().map(|(n, _)| n) {
                if !ports.iter().any(|port| &port.name == name) {
                    c.error(
                        &p.f("ports").f(name),
                        format!("port name {name:?} does not match any port in spec.ports"),
                    );
                }
            }
            if resolution == Resolution::Static
                && let Some(address) = &endpoint.address
                && !address.starts_with("unix://")
                && address.parse::<std::net::IpAddr>().is_err()
            {
                c.error(
                    &p.f("address"),
                    format!("{address:?} must be an IP address with resolution STATIC"),
                );
            }
        }
        if resolution == Resolution::Static
            && endpoints.is_empty()
            && self.workload_selector.is_none()
        {
            c.warn(
                path,
                "resolution STATIC without endpoints or workloadSelector has no endpoints",
            );
        }
        if let Some(selector) = &self.workload_selector {
            selector.validate(c, &path.f("workloadSelector"));
        }
        if let Some(export_to) = &self.export_to {
            check_export_to(c, &path.f("exportTo"), export_to);
        }
    }
}

pub type ServiceEntry = WithSpec<ServiceEntrySpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "ServiceEntry",
    group: "networking.istio.io",
    versions: NETWORKING_VERSIONS,
    plural: "serviceentries",
    short_names: &["se"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[
        ("HOSTS", "/spec/hosts"),
        ("LOCATION", "/spec/location"),
        ("RESOLUTION", "/spec/resolution"),
    ],
    decode: decode_body::<ServiceEntry>,
    schema: body_schema::<ServiceEntry>,
};
