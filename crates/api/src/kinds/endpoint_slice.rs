//! `discovery.k8s.io/v1` EndpointSlice: the addresses behind a Service in
//! the form Kubernetes' own clients (and `kubectl get endpointslices`) read
//! now, one slice per Service and address family, each endpoint with its
//! readiness. Like Endpoints, computed from the mesh and served read-only
//! ([`crate::registry::views`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::endpoints::{EndpointPort, EndpointSubset, ObjectReference};
use crate::check::Checker;
use crate::registry::{KindInfo, Validate, body_schema, decode_body};

/// The label that names a slice's Service, as Kubernetes sets it.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label that names who manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// The body of an EndpointSlice.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSlice {
    /// `IPv4` or `IPv6`: every address of the slice is of this family.
    pub address_type: String,
    /// The workloads behind the Service.
    pub endpoints: Vec<SliceEndpoint>,
    /// The ports every endpoint of the slice serves.
    pub ports: Option<Vec<EndpointPort>>,
}

/// One workload of a slice.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    pub conditions: Option<Conditions>,
    /// The object the endpoint is (a WorkloadEntry).
    pub target_ref: Option<ObjectReference>,
}

/// Whether an endpoint takes traffic.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Conditions {
    /// It passes its readiness probe.
    pub ready: Option<bool>,
    /// It serves, ready or not.
    pub serving: Option<bool>,
    /// It is going away.
    pub terminating: Option<bool>,
}

impl Validate for EndpointSlice {
    fn validate(&self, _: &mut Checker) {}
}

impl EndpointSlice {
    /// The slices of a Service's Endpoints subsets: one per address family
    /// (with the ports of its first subset; vmesh's subsets of one Service
    /// serve the same ports unless workloads map them differently, and each
    /// such group becomes a slice of its own), not-ready addresses as
    /// endpoints whose `ready` is false.
    pub fn from_subsets(subsets: &[EndpointSubset]) -> Vec<EndpointSlice> {
        let mut slices: Vec<EndpointSlice> = Vec::new();
        for subset in subsets {
            let ready = subset.addresses.iter().flatten().map(|a| (a, true));
            let not_ready = subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| (a, false));
            for family in ["IPv4", "IPv6"] {
                let endpoints: Vec<SliceEndpoint> = ready
                    .clone()
                    .chain(not_ready.clone())
                    .filter(|(a, _)| (a.ip.contains(':')) == (family == "IPv6"))
                    .map(|(address, ready)| SliceEndpoint {
                        addresses: vec![address.ip.clone()],
                        conditions: Some(Conditions {
                            ready: Some(ready),
                            serving: Some(ready),
                            terminating: Some(false),
                        }),
                        target_ref: address.target_ref.clone(),
                    })
                    .collect();
                if !endpoints.is_empty() {
                    slices.push(EndpointSlice {
                        address_type: family.into(),
                        endpoints,
                        ports: subset.ports.clone(),
                    });
                }
            }
        }
        slices
    }
}

pub static KIND: KindInfo = KindInfo {
    kind: "EndpointSlice",
    group: "discovery.k8s.io",
    versions: &["v1"],
    plural: "endpointslices",
    short_names: &[],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[],
    decode: decode_body::<EndpointSlice>,
    schema: body_schema::<EndpointSlice>,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::endpoints::EndpointAddress;

    #[test]
    fn subsets_become_one_slice_per_family_with_readiness() {
        let address = |ip: &str| EndpointAddress {
            ip: ip.into(),
            ..Default::default()
        };
        let subsets = vec![EndpointSubset {
            addresses: Some(vec![address("10.0.0.1"), address("2001:db8::1")]),
            not_ready_addresses: Some(vec![address("10.0.0.2")]),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: 8080,
                protocol: None,
                app_protocol: None,
            }]),
        }];
        let slices = EndpointSlice::from_subsets(&subsets);
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[0].address_type, "IPv4");
        let ready: Vec<(String, Option<bool>)> = slices[0]
            .endpoints
            .iter()
            .map(|e| (e.addresses[0].clone(), e.conditions.as_ref().unwrap().ready))
            .collect();
        assert_eq!(
            ready,
            [
                ("10.0.0.1".to_string(), Some(true)),
                ("10.0.0.2".to_string(), Some(false))
            ]
        );
        assert_eq!(slices[1].address_type, "IPv6");
        assert_eq!(slices[1].ports.as_ref().unwrap()[0].port, 8080);
    }
}
