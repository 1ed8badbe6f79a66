//! Small protobuf builders the resource modules share: durations, wrapped
//! integers, socket and pipe addresses, the ADS config source, and the
//! metadata naming the Istio config a resource came from.

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    self as core, Address, AggregatedConfigSource, ConfigSource, Pipe, SocketAddress, address,
    config_source, socket_address,
};
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value::Kind};

/// A protobuf duration.
pub(super) fn duration(d: Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A TCP socket address: an IP, or a host name for clusters that resolve it.
pub(super) fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// A Unix domain socket address.
pub(super) fn pipe(path: &Path) -> Address {
    Address {
        address: Some(address::Address::Pipe(Pipe {
            path: path.to_string_lossy().into_owned(),
            ..Default::default()
        })),
    }
}

/// Configuration that comes over the proxy's ADS stream.
pub(super) fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: core::ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// A wrapped `u32`, as optional protobuf fields take it.
pub(super) fn u32_value(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

/// `filter_metadata.istio.config`: the path of the Istio object a cluster
/// or route came from (`/apis/networking.istio.io/v1/namespaces/NS/KIND/NAME`,
/// KIND as `destination-rule`), as Istio writes it and istioctl reads it.
pub(super) fn config_metadata(kind: &str, namespace: &str, name: &str) -> core::Metadata {
    let path = format!("/apis/networking.istio.io/v1/namespaces/{namespace}/{kind}/{name}");
    core::Metadata {
        filter_metadata: [(
            "istio".to_string(),
            Struct {
                fields: [(
                    "config".to_string(),
                    Value {
                        kind: Some(Kind::StringValue(path)),
                    },
                )]
                .into(),
            },
        )]
        .into(),
        ..Default::default()
    }
}
