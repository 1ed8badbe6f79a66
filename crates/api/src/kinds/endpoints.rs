//! Core `v1` Endpoints: the addresses behind a Service, as Kubernetes shows
//! them. vmesh computes them from the mesh (the WorkloadEntries a Service
//! selects, ready or not) and serves them read-only: they are a view
//! ([`crate::registry::views`]), not a kind anyone writes, so `apply`
//! refuses them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::service::TransportProtocol;
use crate::check::Checker;
use crate::registry::{KindInfo, Validate, body_schema, decode_body};

/// The body of an Endpoints object.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoints {
    /// Absent when the Service selects nothing, as Kubernetes leaves it.
    pub subsets: Option<Vec<EndpointSubset>>,
}

/// Addresses that serve the same ports.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSubset {
    pub addresses: Option<Vec<EndpointAddress>>,
    /// Workloads that fail their readiness probe: not sent traffic.
    pub not_ready_addresses: Option<Vec<EndpointAddress>>,
    pub ports: Option<Vec<EndpointPort>>,
}

#[skip_serializing_none]
#[derive(
    Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointAddress {
    pub ip: String,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    /// The object the address belongs to (a WorkloadEntry).
    pub target_ref: Option<ObjectReference>,
}

#[skip_serializing_none]
#[derive(
    Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectReference {
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub api_version: Option<String>,
    pub uid: Option<String>,
}

/// A port of the workloads: the Service port's name, the workload's port
/// number (the Service's `targetPort`), and the transport.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: u32,
    pub protocol: Option<TransportProtocol>,
    pub app_protocol: Option<String>,
}

impl Validate for Endpoints {
    fn validate(&self, _: &mut Checker) {}
}

pub static KIND: KindInfo = KindInfo {
    kind: "Endpoints",
    group: "",
    versions: &["v1"],
    plural: "endpoints",
    short_names: &["ep"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[],
    decode: decode_body::<Endpoints>,
    schema: body_schema::<Endpoints>,
};
