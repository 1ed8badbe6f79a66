//! Any bytes as an xDS request off the wire (state of the world or delta),
//! and the proxy its node describes, as the ADS server reads them.
#![no_main]

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = DiscoveryRequest::decode(data) {
        let _ = vmesh_xds::node::Proxy::from_node(request.node.as_ref());
    }
    if let Ok(request) = DeltaDiscoveryRequest::decode(data) {
        let _ = vmesh_xds::node::Proxy::from_node(request.node.as_ref());
    }
});
