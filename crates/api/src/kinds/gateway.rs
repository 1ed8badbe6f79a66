//! Istio `Gateway`: listeners on a gateway proxy (the east-west gateway that
//! exposes the control plane and cross-network traffic to VMs).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{
    NETWORKING_VERSIONS, SpecValidate, WithSpec, check_protocol, check_selector_labels,
};
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    pub servers: Vec<Server>,
    pub selector: Option<BTreeMap<String, String>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    pub port: GatewayPort,
    pub bind: Option<String>,
    pub hosts: Vec<String>,
    pub tls: Option<ServerTlsSettings>,
    pub default_endpoint: Option<String>,
    pub name: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayPort {
    pub number: u32,
    pub protocol: String,
    pub name: String,
    pub target_port: Option<u32>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTlsSettings {
    pub https_redirect: Option<bool>,
    pub mode: Option<ServerTlsMode>,
    pub server_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub ca_crl: Option<String>,
    pub credential_name: Option<String>,
    pub credential_names: Option<Vec<String>>,
    pub subject_alt_names: Option<Vec<String>>,
    pub verify_certificate_spki: Option<Vec<String>>,
    pub verify_certificate_hash: Option<Vec<String>>,
    pub min_protocol_version: Option<String>,
    pub max_protocol_version: Option<String>,
    pub cipher_suites: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerTlsMode {
    Passthrough,
    Simple,
    Mutual,
    AutoPassthrough,
    IstioMutual,
    OptionalMutual,
}

impl SpecValidate for GatewaySpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        if self.servers.is_empty() {
            c.error(&path.f("servers"), "at least one server is required");
        }
        for (i, server) in self.servers.iter().enumerate() {
            let p = path.f("servers").i(i);
            c.port(&p.f("port").f("number"), server.port.number);
            check_protocol(c, &p.f("port").f("protocol"), &server.port.protocol);
            if server.port.name.is_empty() {
                c.error(&p.f("port").f("name"), "port name is required");
            }
            if server.hosts.is_empty() {
                c.error(&p.f("hosts"), "at least one host is required");
            }
            for (j, host) in server.hosts.iter().enumerate() {
                let host = host.split_once('/').map_or(host.as_str(), |(_, h)| h);
                c.hostname(&p.f("hosts").i(j), host);
            }
            if let Some(bind) = &server.bind {
                c.ip(&p.f("bind"), bind);
            }
            let protocol = server.port.protocol.to_ascii_uppercase();
            let needs_tls = matches!(protocol.as_str(), "HTTPS" | "TLS");
            if needs_tls && server.tls.is_none() {
                c.error(
                    &p.f("tls"),
                    format!("tls is required for protocol {protocol}"),
                );
            }
            if let Some(tls) = &server.tls {
                let tp = p.f("tls");
                let mode = tls.mode.unwrap_or(ServerTlsMode::Passthrough);
                let has_cert = tls.server_certificate.is_some()
                    || tls.credential_name.is_some()
                    || tls.credential_names.is_some();
                if matches!(
                    mode,
                    ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual
                ) && !has_cert
                {
                    c.error(
                        &tp,
                        "serverCertificate or credentialName is required for mode SIMPLE or MUTUAL",
                    );
                }
            }
        }
        let names: Vec<(usize, &str)> = self
            .servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.name.as_deref()?)))
            .collect();
        c.unique_names(&path.f("servers"), "name", "server name", names);
        if let Some(selector) = &self.selector {
            check_selector_labels(c, &path.f("selector"), selector);
        }
    }
}

pub type Gateway = WithSpec<GatewaySpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "Gateway",
    group: "networking.istio.io",
    versions: NETWORKING_VERSIONS,
    plural: "gateways",
    short_names: &["gw"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[],
    decode: decode_body::<Gateway>,
    schema: body_schema::<Gateway>,
};
