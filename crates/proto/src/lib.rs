//! Istio's own wire messages that are neither Envoy's (envoy-types) nor the
//! CA's (vmesh-ca): the DNS name table the server pushes and the agent's
//! DNS proxy answers from; and the descriptors of Kubernetes' core/v1
//! messages (`proto/k8s.io`, from k8s.io/api and k8s.io/apimachinery
//! v0.32.4), which kubectl sends core objects in. Only the messages; what
//! goes in them is the xds crate's, how they are used the agent's and the
//! server's.

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

/// The descriptors of Kubernetes' core/v1 messages and the apimachinery
/// messages they use (`k8s.io.api.core.v1.Namespace`,
/// `k8s.io.apimachinery.pkg.runtime.Unknown`, …).
pub fn kubernetes_descriptors() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(
            include_bytes!(concat!(env!("OUT_DIR"), "/kubernetes.bin")).as_slice(),
        )
        .expect("the descriptors compiled at build time decode")
    })
}
