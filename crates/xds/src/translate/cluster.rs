//! Clusters: one per service port (`outbound|port||host`) and one per
//! subset of its DestinationRule (`outbound|port|subset|host`), with the
//! rule's traffic policy applied (load balancing, connection pool, outlier
//! detection, TLS, upstream HTTP options) in Istio's precedence; the
//! fallback clusters; and the inbound clusters to the local application.
//!
//! Which DestinationRule applies is the registry's decision; how a cluster's
//! connections are secured is `mtls`'s; its endpoints are `endpoint`'s.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    self as cluster, CircuitBreakers, Cluster, OutlierDetection, circuit_breakers::Thresholds,
};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::util::pack_any;
use vmesh_api::kinds::destination_rule::{DestinationRuleSpec, SimpleLb, TrafficPolicy};
use vmesh_registry::{Labels, MeshPort, MeshService, OutboundPolicy, Resolution, Snapshot};

use super::endpoint::load_assignment;
use super::proto::{ads, duration, socket, u32_value};
use crate::mtls;

/// Where connections to hosts the mesh does not know go (`ALLOW_ANY`).
pub const PASSTHROUGH: &str = "PassthroughCluster";
/// A cluster without endpoints: connections to it are dropped.
pub const BLACKHOLE: &str = "BlackHoleCluster";

/// `outbound|port|subset|host`, Istio's cluster name.
pub fn cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// `inbound|port||`, Istio's name for the cluster to the application's `port`.
pub(super) fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

/// The clusters for one port of `service`, each with the labels its subset
/// selects: the port's own (no subset), with the rule's traffic policy, then
/// one per subset of the rule, with the subset's policy layered on top.
pub(super) fn outbound_clusters<'a>(
    service: &MeshService,
    port: &MeshPort,
    rule: Option<&'a DestinationRuleSpec>,
    trust_domain: &str,
) -> Vec<(Cluster, Option<&'a Labels>)> {
    let base_policy = layered(rule.and_then(|d| d.traffic_policy.as_ref()), port.port);
    let base_policy: Vec<&TrafficPolicy> = base_policy.iter().collect();
    let name = cluster_name(port.port, "", &service.hostname);
    let mut clusters = vec![(
        outbound_cluster(name, service, port, &base_policy, trust_domain),
        None,
    )];
    for subset in rule.iter().flat_map(|d| d.subsets.iter().flatten()) {
        let name = cluster_name(port.port, &subset.name, &service.hostname);
        let subset_policy = layered(subset.traffic_policy.as_ref(), port.port);
        let mut policies = base_policy.clone();
        policies.extend(subset_policy.iter());
        clusters.push((
            outbound_cluster(name, service, port, &policies, trust_domain),
            subset.labels.as_ref(),
        ));
    }
    clusters
}

/// A traffic policy followed by its `portLevelSettings` for `port`, which
/// override it (Istio's precedence; a subset's policy layers on top the same way).
fn layered(policy: Option<&TrafficPolicy>, port: u16) -> Vec<TrafficPolicy> {
    let Some(policy) = policy else {
        return Vec::new();
    };
    let port_level = policy
        .port_level_settings
        .iter()
        .flatten()
        .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
        .map(|p| TrafficPolicy {
            load_balancer: p.load_balancer.clone(),
            connection_pool: p.connection_pool.clone(),
            outlier_detection: p.outlier_detection.clone(),
            tls: p.tls.clone(),
            ..Default::default()
        });
    std::iter::once(policy.clone()).chain(port_level).collect()
}

/// How a cluster speaks HTTP upstream, gathered from the policy layers.
#[derive(Default)]
struct UpstreamHttp {
    http2: bool,
    /// Speak to the endpoint what the client spoke (`useClientProtocol`).
    use_client_protocol: bool,
    common: core::HttpProtocolOptions,
    max_concurrent_streams: Option<u32>,
}

impl UpstreamHttp {
    /// Envoy's upstream HTTP options, when anything differs from its defaults.
    fn options(self) -> Option<HttpProtocolOptions> {
        use http_protocol_options::explicit_http_config::ProtocolConfig;
        use http_protocol_options::{ExplicitHttpConfig, UpstreamProtocolOptions};
        let common = (self.common != core::HttpProtocolOptions::default()).then_some(self.common);
        let http2_options = || core::Http2ProtocolOptions {
            max_concurrent_streams: self.max_concurrent_streams.and_then(u32_value),
            ..Default::default()
        };
        let protocol = if self.use_client_protocol {
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                http_protocol_options::UseDownstreamHttpConfig {
                    http2_protocol_options: Some(http2_options()),
                    ..Default::default()
                },
            ))
        } else if self.http2 {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(http2_options())),
                },
            ))
        } else {
            None
        };
        (common.is_some() || protocol.is_some()).then(|| HttpProtocolOptions {
            common_http_protocol_options: common,
            upstream_protocol_options: protocol,
            ..Default::default()
        })
    }
}

fn apply_policy(cluster: &mut Cluster, policy: &TrafficPolicy, upstream: &mut UpstreamHttp) {
    if let Some(lb) = &policy.load_balancer
        && let Some(simple) = lb.simple
    {
        cluster.lb_policy = match simple {
            SimpleLb::Random => cluster::cluster::LbPolicy::Random,
            SimpleLb::LeastConn | SimpleLb::LeastRequest => {
                cluster::cluster::LbPolicy::LeastRequest
            }
            _ => cluster::cluster::LbPolicy::RoundRobin,
        } as i32;
    }
    if let Some(hash) = policy
        .load_balancer
        .as_ref()
        .and_then(|lb| lb.consistent_hash.as_ref())
    {
        if let Some(maglev) = &hash.maglev {
            cluster.lb_policy = cluster::cluster::LbPolicy::Maglev as i32;
            cluster.lb_config = Some(cluster::cluster::LbConfig::MaglevLbConfig(
                cluster::cluster::MaglevLbConfig {
                    table_size: maglev
                        .table_size
                        .map(|size| envoy_types::pb::google::protobuf::UInt64Value { value: size }),
                },
            ));
        } else {
            cluster.lb_policy = cluster::cluster::LbPolicy::RingHash as i32;
            let minimum = hash
                .ring_hash
                .as_ref()
                .and_then(|r| r.minimum_ring_size)
                .or(hash.minimum_ring_size);
            cluster.lb_config = Some(cluster::cluster::LbConfig::RingHashLbConfig(
                cluster::cluster::RingHashLbConfig {
                    minimum_ring_size: minimum
                        .map(|size| envoy_types::pb::google::protobuf::UInt64Value { value: size }),
                    ..Default::default()
                },
            ));
        }
    }
    if let Some(pool) = &policy.connection_pool {
        let mut thresholds = Thresholds::default();
        if let Some(tcp) = &pool.tcp {
            if let Some(max) = tcp.max_connections {
                thresholds.max_connections = u32_value(max.max(0) as u32);
            }
            if let Some(timeout) = &tcp.connect_timeout {
                cluster.connect_timeout = Some(duration(timeout.get()));
            }
            if let Some(keepalive) = &tcp.tcp_keepalive {
                let seconds = |d: &Option<vmesh_api::kinds::common::Duration>| {
                    d.as_ref()
                        .and_then(|d| u32::try_from(d.get().as_secs().max(1)).ok())
                        .and_then(u32_value)
                };
                cluster.upstream_connection_options = Some(cluster::UpstreamConnectionOptions {
                    tcp_keepalive: Some(core::TcpKeepalive {
                        keepalive_probes: keepalive.probes.and_then(u32_value),
                        keepalive_time: seconds(&keepalive.time),
                        keepalive_interval: seconds(&keepalive.interval),
                    }),
                    ..Default::default()
                });
            }
            if let Some(limit) = &tcp.max_connection_duration {
                upstream.common.max_connection_duration = Some(duration(limit.get()));
            }
        }
        if let Some(http) = &pool.http {
            if let Some(max) = http.http1_max_pending_requests {
                thresholds.max_pending_requests = u32_value(max.max(0) as u32);
            }
            if let Some(max) = http.http2_max_requests {
                thresholds.max_requests = u32_value(max.max(0) as u32);
            }
            if let Some(max) = http.max_retries {
                thresholds.max_retries = u32_value(max.max(0) as u32);
            }
            if http.h2_upgrade_policy
                == Some(vmesh_api::kinds::destination_rule::H2UpgradePolicy::Upgrade)
            {
                upstream.http2 = true;
            }
            if let Some(max) = http.max_requests_per_connection.filter(|m| *m > 0) {
                upstream.common.max_requests_per_connection = u32_value(max as u32);
            }
            if let Some(idle) = &http.idle_timeout {
                upstream.common.idle_timeout = Some(duration(idle.get()));
            }
            if let Some(max) = http.max_concurrent_streams.filter(|m| *m > 0) {
                upstream.max_concurrent_streams = Some(max as u32);
            }
            if let Some(use_client) = http.use_client_protocol {
                upstream.use_client_protocol = use_client;
            }
        }
        cluster.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![thresholds],
            ..Default::default()
        });
    }
    if let Some(outlier) = &policy.outlier_detection {
        cluster.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: outlier
                .consecutive_5xx_errors
                .or(outlier.consecutive_errors.map(|e| e.max(0) as u32))
                .and_then(u32_value),
            consecutive_gateway_failure: outlier.consecutive_gateway_errors.and_then(u32_value),
            interval: outlier.interval.as_ref().map(|d| duration(d.get())),
            base_ejection_time: outlier
                .base_ejection_time
                .as_ref()
                .map(|d| duration(d.get())),
            max_ejection_percent: outlier
                .max_ejection_percent
                .map(|p| p.clamp(0, 100) as u32)
                .and_then(u32_value),
            ..Default::default()
        });
    }
}

fn outbound_cluster(
    name: String,
    service: &MeshService,
    port: &vmesh_registry::MeshPort,
    policies: &[&TrafficPolicy],
    trust_domain: &str,
) -> Cluster {
    let mut cluster = Cluster {
        name: name.clone(),
        connect_timeout: Some(duration(Duration::from_secs(10))),
        ..Default::default()
    };
    let discovery = match service.resolution {
        Resolution::Passthrough => cluster::cluster::DiscoveryType::OriginalDst,
        Resolution::Dns | Resolution::DnsRoundRobin => cluster::cluster::DiscoveryType::StrictDns,
        Resolution::Static => cluster::cluster::DiscoveryType::Eds,
    };
    cluster.cluster_discovery_type = Some(cluster::cluster::ClusterDiscoveryType::Type(
        discovery as i32,
    ));
    match discovery {
        cluster::cluster::DiscoveryType::Eds => {
            cluster.eds_cluster_config = Some(cluster::cluster::EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: name,
            });
        }
        cluster::cluster::DiscoveryType::OriginalDst => {
            cluster.lb_policy = cluster::cluster::LbPolicy::ClusterProvided as i32;
        }
        _ => cluster.load_assignment = Some(load_assignment(&name, service, port.port, None, None)),
    }
    let mut upstream = UpstreamHttp {
        http2: matches!(
            port.protocol,
            vmesh_registry::Protocol::Http2 | vmesh_registry::Protocol::Grpc
        ),
        ..Default::default()
    };
    for policy in policies {
        apply_policy(&mut cluster, policy, &mut upstream);
    }
    let tls = policies.iter().rev().find_map(|p| p.tls.as_ref());
    mtls::secure_cluster(&mut cluster, service, port.port, tls, trust_domain);
    super::telemetry::add_metadata(
        &mut cluster.metadata,
        super::telemetry::service_metadata(&service.hostname, &service.name, &service.namespace),
    );
    if let Some(options) = upstream.options() {
        cluster.typed_extension_protocol_options = HashMap::from([(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack_any(options),
        )]);
    }
    cluster
}

/// Where outbound traffic to hosts the registry does not know goes:
/// [`BLACKHOLE`] under `REGISTRY_ONLY`, else [`PASSTHROUGH`].
pub(super) fn fallback_cluster(snapshot: &Snapshot) -> &'static str {
    if snapshot.mesh.outbound_policy == OutboundPolicy::RegistryOnly {
        BLACKHOLE
    } else {
        PASSTHROUGH
    }
}

/// The clusters every proxy has: [`PASSTHROUGH`] to the original
/// destination, and [`BLACKHOLE`], which has no endpoints.
pub(super) fn fallback_clusters() -> [Cluster; 2] {
    let passthrough = Cluster {
        name: PASSTHROUGH.into(),
        connect_timeout: Some(duration(Duration::from_secs(10))),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::cluster::LbPolicy::ClusterProvided as i32,
        metadata: named_for_metrics(PASSTHROUGH),
        ..Default::default()
    };
    let blackhole = Cluster {
        name: BLACKHOLE.into(),
        connect_timeout: Some(duration(Duration::from_secs(10))),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Static as i32,
        )),
        metadata: named_for_metrics(BLACKHOLE),
        ..Default::default()
    };
    [passthrough, blackhole]
}

/// A fallback cluster's metadata: Istio's metrics name its destination
/// service after the cluster.
fn named_for_metrics(name: &str) -> Option<envoy_types::pb::envoy::config::core::v3::Metadata> {
    let mut metadata = None;
    super::telemetry::add_metadata(
        &mut metadata,
        super::telemetry::service_metadata(name, name, "unknown"),
    );
    metadata
}

/// `inbound|port||`: the local application's `port`, on 127.0.0.1, which
/// `service` (the first that targets the port) names in metrics.
pub(super) fn inbound_cluster(port: u16, service: &MeshService) -> Cluster {
    let name = inbound_cluster_name(port);
    let mut metadata = None;
    super::telemetry::add_metadata(
        &mut metadata,
        super::telemetry::service_metadata(&service.hostname, &service.name, &service.namespace),
    );
    Cluster {
        name: name.clone(),
        metadata,
        connect_timeout: Some(duration(Duration::from_secs(10))),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket("127.0.0.1", port.into())),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::ads::CLUSTER_TYPE;
    use crate::translate::testing::{clusters, decoded, translate_yaml};

    #[test]
    fn port_level_settings_and_subsets_layer_over_the_rule() {
        let clusters = clusters();
        let lb = |name: &str| clusters[name].lb_policy;
        let random = cluster::cluster::LbPolicy::Random as i32;
        let least = cluster::cluster::LbPolicy::LeastRequest as i32;
        assert_eq!(lb("outbound|8080||pay.shop.svc.cluster.local"), random);
        assert_eq!(
            lb("outbound|9090||pay.shop.svc.cluster.local"),
            least,
            "port level wins on its port"
        );
        assert_eq!(
            lb("outbound|9090|v1|pay.shop.svc.cluster.local"),
            least,
            "subsets inherit port-level settings"
        );
        let limits = &clusters["outbound|8080|v1|pay.shop.svc.cluster.local"]
            .circuit_breakers
            .as_ref()
            .unwrap()
            .thresholds[0];
        assert_eq!(limits.max_connections.as_ref().map(|v| v.value), Some(7));
        assert!(
            clusters["outbound|8080||pay.shop.svc.cluster.local"]
                .circuit_breakers
                .is_none()
        );
    }

    #[test]
    fn grpc_ports_speak_http2_upstream() {
        let clusters = clusters();
        assert!(
            clusters["outbound|9090||pay.shop.svc.cluster.local"]
                .typed_extension_protocol_options
                .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        );
        assert!(
            clusters["outbound|8080||pay.shop.svc.cluster.local"]
                .typed_extension_protocol_options
                .is_empty()
        );
    }

    #[test]
    fn connection_pool_settings_reach_the_cluster() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: shop}\nspec:\n  host: web.shop.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      tcp: {tcpKeepalive: {probes: 3, time: 60s, interval: 10s}, maxConnectionDuration: 1h}\n      http: {maxRequestsPerConnection: 7, idleTimeout: 30s, maxConcurrentStreams: 50, h2UpgradePolicy: UPGRADE}\n";
        let resources = translate_yaml(yaml, None);
        let cluster: Cluster = decoded(
            &resources,
            CLUSTER_TYPE,
            "outbound|80||web.shop.svc.cluster.local",
        );
        let keepalive = cluster
            .upstream_connection_options
            .unwrap()
            .tcp_keepalive
            .unwrap();
        assert_eq!(
            (
                keepalive.keepalive_probes,
                keepalive.keepalive_time,
                keepalive.keepalive_interval
            ),
            (u32_value(3), u32_value(60), u32_value(10))
        );
        let options = HttpProtocolOptions::decode(
            cluster.typed_extension_protocol_options
                ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                .value
                .as_slice(),
        )
        .unwrap();
        let common = options.common_http_protocol_options.unwrap();
        assert_eq!(common.max_requests_per_connection, u32_value(7));
        assert_eq!(common.idle_timeout, Some(duration(Duration::from_secs(30))));
        assert_eq!(
            common.max_connection_duration,
            Some(duration(Duration::from_secs(3600)))
        );
        let Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) =
            options.upstream_protocol_options
        else {
            panic!("HTTP/2 upstream");
        };
        let Some(
            http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                http2,
            ),
        ) = explicit.protocol_config
        else {
            panic!("HTTP/2 options");
        };
        assert_eq!(http2.max_concurrent_streams, u32_value(50));
    }
}
