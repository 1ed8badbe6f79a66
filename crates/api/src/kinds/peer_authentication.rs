//! Istio `PeerAuthentication`: whether a workload's inbound traffic must be mTLS.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{MatchLabelsSelector, SECURITY_VERSIONS, SpecValidate, WithSpec};
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<MatchLabelsSelector>,
    pub mtls: Option<MutualTls>,
    /// Keyed by port number (YAML writes the keys as integers, JSON as strings).
    pub port_level_mtls: Option<BTreeMap<String, MutualTls>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    pub mode: Option<MtlsMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl SpecValidate for PeerAuthenticationSpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        if let Some(selector) = &self.selector {
            selector.validate(c, &path.f("selector"));
        }
        let ports = self.port_level_mtls.as_ref();
        for port in ports.into_iter().flatten().map(|(k, _)| k) {
            match port.parse::<u32>() {
                Ok(n) => c.port(&path.f("portLevelMtls").f(port), n),
                Err(_) => c.error(
                    &path.f("portLevelMtls").f(port),
                    format!("{port:?} is not a port number"),
                ),
            }
        }
        let workload_wide = self
            .selector
            .as_ref()
            .is_none_or(MatchLabelsSelector::is_empty);
        if workload_wide && ports.is_some_and(|p| !p.is_empty()) {
            c.warn(
                &path.f("portLevelMtls"),
                "portLevelMtls without a workload selector applies to that port on every workload in scope (Istio would refuse this; vmesh honours it)",
            );
        }
    }
}

pub type PeerAuthentication = WithSpec<PeerAuthenticationSpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "PeerAuthentication",
    group: "security.istio.io",
    versions: SECURITY_VERSIONS,
    plural: "peerauthentications",
    short_names: &["pa"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[("MODE", "/spec/mtls/mode")],
    decode: decode_body::<PeerAuthentication>,
    schema: body_schema::<PeerAuthentication>,
};
