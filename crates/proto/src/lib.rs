//! Istio's own wire messages that are neither Envoy's (envoy-types) nor the
//! CA's (vmesh-ca): the DNS name table the server pushes and the agent's
//! DNS proxy answers from. Only the messages; what goes in them is the
//! xds crate's, how they are used the agent's.

#![forbid(unsafe_code)]

/// `istio.networking.nds.v1` (`proto/nds.proto`).
#[allow(clippy::all, missing_docs)]
pub mod nds {
    include!(concat!(env!("OUT_DIR"), "/istio.networking.nds.v1.rs"));
}

/// The xDS type URL of [`nds::NameTable`].
pub const NAME_TABLE_TYPE: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";

/// The type URL of Istio's health reports: DiscoveryRequests an agent sends
/// on its ADS stream (healthy with no `error_detail`, unhealthy with
/// `error_detail { code: 500, message }`), acknowledged with a response of
/// the same type carrying the report's nonce.
pub const HEALTH_INFORMATION_TYPE: &str = "type.googleapis.com/istio.v1.HealthInformation";
