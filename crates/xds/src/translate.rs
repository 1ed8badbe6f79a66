//! Translation of the mesh into Envoy v3 resources for one sidecar, laid out
//! as Istio lays it out: `virtualOutbound` on 15001 handing connections to
//! per-port outbound listeners, `virtualInbound` on 15006, clusters named
//! `outbound|port|subset|host` fed by EDS, route configurations named by port.
//!
//! This module decides *what* Envoy gets; the ADS module decides *when*.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    self as cluster, CircuitBreakers, Cluster, OutlierDetection, circuit_breakers::Thresholds,
};
use envoy_types::pb::envoy::config::core::v3::{
    self as core, Address, AggregatedConfigSource, ConfigSource, SocketAddress, address,
    config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    self as route, HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{self as fault, HttpFault};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use parking_lot::Mutex;
use vmesh_api::kinds::common::Percent;
use vmesh_api::kinds::common::StringMatch;
use vmesh_api::kinds::destination_rule::{
    DestinationRuleSpec, LocalityFailover, SimpleLb, TrafficPolicy,
};
use vmesh_api::kinds::virtual_service::{
    Destination, HeaderOperations, HttpRoute, RouteDestination,
};
use vmesh_registry::{MeshService, OutboundPolicy, Resolution, Snapshot};

use crate::ads::{
    CLUSTER_TYPE, ConfigSource as AdsConfigSource, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE,
    ResourceSet, Resources,
};
use crate::node::Proxy;
use crate::{authz, mtls};

pub const PASSTHROUGH: &str = "PassthroughCluster";
const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const BLACKHOLE: &str = "BlackHoleCluster";
pub const OUTBOUND_PORT: u32 = 15001;
pub const INBOUND_PORT: u32 = 15006;

/// What a proxy's outbound configuration depends on: proxies that agree on
/// it share one copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OutboundKey {
    namespace: String,
    locality: Option<String>,
}

impl OutboundKey {
    fn of(proxy: &Proxy) -> OutboundKey {
        OutboundKey {
            namespace: proxy.namespace.clone(),
            locality: proxy.locality.clone(),
        }
    }
}

/// A snapshot of the mesh, ready to translate for any proxy. Outbound
/// resources (nearly everything) are computed once per namespace and locality
/// on first demand and shared; only the inbound side is the proxy's own.
pub struct MeshConfig {
    snapshot: Snapshot,
    outbound: Mutex<HashMap<OutboundKey, Arc<OnceLock<Arc<ResourceSet>>>>>,
    /// The DNS name table: the same for every proxy.
    names: OnceLock<Arc<ResourceSet>>,
}

impl MeshConfig {
    pub fn new(snapshot: Snapshot) -> MeshConfig {
        MeshConfig {
            snapshot,
            outbound: Mutex::default(),
            names: OnceLock::new(),
        }
    }
}

impl AdsConfigSource for MeshConfig {
    fn resources(&self, proxy: &Proxy) -> Resources {
        let key = OutboundKey::of(proxy);
        // The map's lock is held only to find the slot: proxies of another
        // key do not wait while this one is computed.
        let slot = self.outbound.lock().entry(key.clone()).or_default().clone();
        let shared = slot
            .get_or_init(|| Arc::new(outbound(&self.snapshot, &key)))
            .clone();
        let names = self
            .names
            .get_or_init(|| Arc::new(crate::nds::name_table_resources(&self.snapshot)))
            .clone();
        Resources::layered(vec![
            shared,
            names,
            Arc::new(inbound(&self.snapshot, proxy)),
        ])
    }
}

/// Everything a proxy gets, computed for it alone.
pub fn translate(snapshot: &Snapshot, proxy: &Proxy) -> Resources {
    Resources::layered(vec![
        Arc::new(outbound(snapshot, &OutboundKey::of(proxy))),
        Arc::new(crate::nds::name_table_resources(snapshot)),
        Arc::new(inbound(snapshot, proxy)),
    ])
}

/// `outbound|port|subset|host`, Istio's cluster name.
pub fn cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

fn duration(d: Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: core::ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn u32_value(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
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
    if let Some(options) = upstream.options() {
        cluster.typed_extension_protocol_options = HashMap::from([(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack_any(options),
        )]);
    }
    cluster
}

/// Locality-aware load balancing for one proxy: endpoints nearer the proxy
/// get higher priority, then the regions `failover` names, then the rest.
pub struct LocalityPolicy<'a> {
    /// The proxy's `region/zone/subzone`.
    pub proxy: &'a str,
    pub failover: &'a [LocalityFailover],
}

impl LocalityPolicy<'_> {
    /// Istio's order: same subzone, same zone, same region, a failover region, anywhere.
    fn rank(&self, endpoint: &str) -> u32 {
        let proxy: Vec<&str> = self.proxy.split('/').collect();
        let endpoint: Vec<&str> = endpoint.split('/').collect();
        let same = |depth: usize| {
            (0..depth).all(|i| {
                proxy
                    .get(i)
                    .is_some_and(|p| !p.is_empty() && endpoint.get(i) == Some(p))
            })
        };
        if same(3) {
            0
        } else if same(2) {
            1
        } else if same(1) {
            2
        } else if self.failover.iter().any(|f| {
            Some(&f.from.as_str()) == proxy.first() && Some(&f.to.as_str()) == endpoint.first()
        }) {
            3
        } else {
            4
        }
    }
}

/// The locality policy a DestinationRule gives a proxy, if any: it needs the
/// proxy's locality, `localityLbSetting` not disabled, and outlier detection
/// (without it Envoy would never fail over, so Istio requires it too).
fn locality_policy<'a>(
    rule: Option<&'a DestinationRuleSpec>,
    proxy_locality: Option<&'a str>,
) -> Option<LocalityPolicy<'a>> {
    let locality = proxy_locality?;
    let policy = rule?.traffic_policy.as_ref()?;
    policy.outlier_detection.as_ref()?;
    let setting = policy
        .load_balancer
        .as_ref()
        .and_then(|lb| lb.locality_lb_setting.as_ref());
    if setting.is_some_and(|s| s.enabled == Some(false)) {
        return None;
    }
    Some(LocalityPolicy {
        proxy: locality,
        failover: setting
            .and_then(|s| s.failover.as_deref())
            .unwrap_or_default(),
    })
}

fn load_assignment(
    name: &str,
    service: &MeshService,
    port: u16,
    subset: Option<&BTreeMap<String, String>>,
    locality: Option<&LocalityPolicy>,
) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<String, Vec<LbEndpoint>> = BTreeMap::new();
    for endpoint in service.endpoints_for(port, subset) {
        by_locality
            .entry(endpoint.locality.clone().unwrap_or_default())
            .or_default()
            .push(LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(socket(&endpoint.address, endpoint.port.into())),
                    ..Default::default()
                })),
                metadata: mtls::is_mesh_endpoint(endpoint).then(mtls::mesh_endpoint_metadata),
                load_balancing_weight: u32_value(endpoint.weight.max(1)),
                ..Default::default()
            });
    }
    let mut assignment = ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(|(locality, lb_endpoints)| {
                let mut parts = locality.splitn(3, '/');
                LocalityLbEndpoints {
                    locality: Some(core::Locality {
                        region: parts.next().unwrap_or_default().to_string(),
                        zone: parts.next().unwrap_or_default().to_string(),
                        sub_zone: parts.next().unwrap_or_default().to_string(),
                    }),
                    load_balancing_weight: u32_value(
                        lb_endpoints
                            .iter()
                            .filter_map(|e| e.load_balancing_weight.as_ref())
                            .map(|w| w.value)
                            .sum::<u32>()
                            .max(1),
                    ),
                    lb_endpoints,
                    ..Default::default()
                }
            })
            .collect::<Vec<_>>(),
        ..Default::default()
    };
    if let Some(policy) = locality {
        // Envoy wants priorities without gaps: number the ranks in use 0, 1, 2…
        let ranks: Vec<u32> = assignment
            .endpoints
            .iter()
            .map(|e| policy.rank(&locality_name(e.locality.as_ref())))
            .collect();
        let mut used: Vec<u32> = ranks.clone();
        used.sort_unstable();
        used.dedup();
        for (group, rank) in assignment.endpoints.iter_mut().zip(ranks) {
            group.priority = used.iter().position(|r| *r == rank).unwrap_or_default() as u32;
        }
    }
    assignment
}

fn locality_name(locality: Option<&core::Locality>) -> String {
    locality
        .map(|l| format!("{}/{}/{}", l.region, l.zone, l.sub_zone))
        .unwrap_or_default()
}

fn typed(name: &str, config: Any) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

fn tcp_proxy_filter(stat_prefix: &str, cluster: &str) -> Filter {
    typed(
        "envoy.filters.network.tcp_proxy",
        pack_any(TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
            ..Default::default()
        }),
    )
}

/// An HTTP connection manager; `access` filters (RBAC) run before faults and routing.
fn http_manager(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
    access: Vec<HttpFilter>,
) -> Filter {
    typed(
        "envoy.filters.network.http_connection_manager",
        pack_any(HttpConnectionManager {
            stat_prefix: stat_prefix.to_string(),
            route_specifier: Some(routes),
            // The fault filter does nothing unless a route configures it.
            http_filters: access
                .into_iter()
                .chain([
                    HttpFilter {
                        name: FAULT_FILTER.into(),
                        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                            HttpFault::default(),
                        ))),
                        ..Default::default()
                    },
                    HttpFilter {
                        name: "envoy.filters.http.router".into(),
                        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                            Router::default(),
                        ))),
                        ..Default::default()
                    },
                ])
                .collect(),
            ..Default::default()
        }),
    )
}

/// Tells TLS from plaintext (and reads SNI and ALPN) before a chain is chosen.
fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
            TlsInspector::default(),
        ))),
        ..Default::default()
    }
}

fn original_dst_filter() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
            OriginalDst::default(),
        ))),
        ..Default::default()
    }
}

fn string_matcher(m: &StringMatch) -> Option<StringMatcher> {
    let pattern = if let Some(exact) = &m.exact {
        string_matcher::MatchPattern::Exact(exact.clone())
    } else if let Some(prefix) = &m.prefix {
        string_matcher::MatchPattern::Prefix(prefix.clone())
    } else {
        string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: m.regex.clone()?,
            ..Default::default()
        })
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

fn header_matcher(name: &str, m: &StringMatch) -> Option<HeaderMatcher> {
    Some(HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
            string_matcher(m)?,
        )),
        ..Default::default()
    })
}

/// Envoy route matches for one Istio HTTP route (one per `match` entry, or catch-all).
fn route_matches(http: &HttpRoute) -> Vec<RouteMatch> {
    let Some(matches) = http.matches.as_ref().filter(|m| !m.is_empty()) else {
        return vec![RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }];
    };
    matches
        .iter()
        .map(|m| {
            let path = match &m.uri {
                Some(StringMatch { exact: Some(p), .. }) => route::route_match::PathSpecifier::Path(p.clone()),
                Some(StringMatch { prefix: Some(p), .. }) => route::route_match::PathSpecifier::Prefix(p.clone()),
                Some(StringMatch { regex: Some(r), .. }) => {
                    route::route_match::PathSpecifier::SafeRegex(RegexMatcher { regex: r.clone(), ..Default::default() })
                }
                _ => route::route_match::PathSpecifier::Prefix("/".into()),
            };
            let mut headers: Vec<HeaderMatcher> =
                m.headers.iter().flatten().filter_map(|(name, sm)| header_matcher(name, sm)).collect();
            if let Some(method) = &m.method {
                headers.extend(header_matcher(":method", method));
            }
            if let Some(authority) = &m.authority {
                headers.extend(header_matcher(":authority", authority));
            }
            let query_parameters = m
                .query_params
                .iter()
                .flatten()
                .filter_map(|(name, sm)| {
                    Some(route::QueryParameterMatcher {
                        name: name.clone(),
                        query_parameter_match_specifier: Some(route::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                            string_matcher(sm)?,
                        )),
                    })
                })
                .collect();
            RouteMatch {
                path_specifier: Some(path),
                headers,
                query_parameters,
                case_sensitive: m.ignore_uri_case.map(|i| envoy_types::pb::google::protobuf::BoolValue { value: !i }),
                ..Default::default()
            }
        })
        .collect()
}

fn destination_cluster(
    snapshot: &Snapshot,
    destination: &Destination,
    namespace: &str,
    default_port: u16,
) -> String {
    let host = snapshot.qualify(&destination.host, namespace);
    let port = destination
        .port
        .as_ref()
        .map(|p| p.number as u16)
        .or_else(|| {
            snapshot
                .service(&host)
                .and_then(|s| (s.ports.len() == 1).then(|| s.ports[0].port))
        })
        .unwrap_or(default_port);
    cluster_name(
        port,
        destination.subset.as_deref().unwrap_or_default(),
        &host,
    )
}

fn fraction(
    percent: Option<&Percent>,
) -> Option<envoy_types::pb::envoy::r#type::v3::FractionalPercent> {
    // Istio's percentages are doubles; Envoy's finest denominator is a million.
    let value = percent.map_or(100.0, |p| p.value);
    Some(envoy_types::pb::envoy::r#type::v3::FractionalPercent {
        numerator: (value * 10_000.0).round() as u32,
        denominator:
            envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType::Million as i32,
    })
}

fn route_action(
    snapshot: &Snapshot,
    http: &HttpRoute,
    namespace: &str,
    port: u16,
) -> Option<route::route::Action> {
    if let Some(redirect) = &http.redirect {
        return Some(route::route::Action::Redirect(route::RedirectAction {
            host_redirect: redirect.authority.clone().unwrap_or_default(),
            port_redirect: redirect.port.unwrap_or(0),
            response_code: match redirect.redirect_code.unwrap_or(301) {
                302 => route::redirect_action::RedirectResponseCode::Found,
                303 => route::redirect_action::RedirectResponseCode::SeeOther,
                307 => route::redirect_action::RedirectResponseCode::TemporaryRedirect,
                308 => route::redirect_action::RedirectResponseCode::PermanentRedirect,
                _ => route::redirect_action::RedirectResponseCode::MovedPermanently,
            } as i32,
            scheme_rewrite_specifier: redirect
                .scheme
                .clone()
                .map(route::redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
            path_rewrite_specifier: redirect
                .uri
                .clone()
                .map(route::redirect_action::PathRewriteSpecifier::PathRedirect),
            ..Default::default()
        }));
    }
    if let Some(response) = &http.direct_response {
        let body = response
            .body
            .as_ref()
            .and_then(|b| b.string.clone())
            .map(|text| core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(text)),
                ..Default::default()
            });
        return Some(route::route::Action::DirectResponse(
            route::DirectResponseAction {
                status: response.status,
                body,
                ..Default::default()
            },
        ));
    }
    let destinations = http.route.as_ref()?;
    let mut action = RouteAction::default();
    let cluster = if destinations.len() == 1 {
        route::route_action::ClusterSpecifier::Cluster(destination_cluster(
            snapshot,
            &destinations[0].destination,
            namespace,
            port,
        ))
    } else {
        route::route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: destinations
                .iter()
                .filter(|d| d.weight.unwrap_or(0) > 0)
                .map(|d| route::weighted_cluster::ClusterWeight {
                    name: destination_cluster(snapshot, &d.destination, namespace, port),
                    weight: u32_value(d.weight.unwrap_or(0) as u32),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    action.cluster_specifier = Some(cluster);
    action.timeout = Some(duration(
        http.timeout.as_ref().map_or(Duration::ZERO, |t| t.get()),
    ));
    if let Some(retries) = &http.retries {
        action.retry_policy = Some(RetryPolicy {
            retry_on: retries.retry_on.clone().unwrap_or_else(|| {
                "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".into()
            }),
            num_retries: u32_value(retries.attempts.unwrap_or(2).max(0) as u32),
            per_try_timeout: retries.per_try_timeout.as_ref().map(|t| duration(t.get())),
            // As Istio: a retry goes to another host when there is one.
            retry_host_predicate: vec![route::retry_policy::RetryHostPredicate {
                name: "envoy.retry_host_predicates.previous_hosts".into(),
                config_type: Some(
                    route::retry_policy::retry_host_predicate::ConfigType::TypedConfig(pack_any(
                        PreviousHostsPredicate::default(),
                    )),
                ),
            }],
            host_selection_retry_max_attempts: 5,
            ..Default::default()
        });
    }
    if let Some(rewrite) = &http.rewrite {
        if let Some(uri) = &rewrite.uri {
            action.prefix_rewrite = uri.clone();
        }
        if let Some(regex) = &rewrite.uri_regex_rewrite {
            action.regex_rewrite = Some(
                envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute {
                    pattern: Some(RegexMatcher {
                        regex: regex.pattern.clone(),
                        ..Default::default()
                    }),
                    substitution: regex.rewrite.clone(),
                },
            );
        }
        if let Some(authority) = &rewrite.authority {
            action.host_rewrite_specifier = Some(
                route::route_action::HostRewriteSpecifier::HostRewriteLiteral(authority.clone()),
            );
        }
    }
    let mirrors = http
        .mirror
        .iter()
        .map(|m| (m, http.mirror_percentage.as_ref()))
        .chain(
            http.mirrors
                .iter()
                .flatten()
                .map(|m| (&m.destination, m.percentage.as_ref())),
        );
    action.request_mirror_policies = mirrors
        .map(
            |(destination, percent)| route::route_action::RequestMirrorPolicy {
                cluster: destination_cluster(snapshot, destination, namespace, port),
                runtime_fraction: Some(core::RuntimeFractionalPercent {
                    default_value: fraction(percent),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .collect();
    Some(route::route::Action::Route(action))
}

fn header_options(
    set: Option<&BTreeMap<String, String>>,
    add: Option<&BTreeMap<String, String>>,
) -> Vec<core::HeaderValueOption> {
    let option =
        |(key, value): (&String, &String),
         append: core::header_value_option::HeaderAppendAction| core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            }),
            append_action: append as i32,
            ..Default::default()
        };
    let overwrite = core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd;
    let append = core::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd;
    set.into_iter()
        .flatten()
        .map(|kv| option(kv, overwrite))
        .chain(add.into_iter().flatten().map(|kv| option(kv, append)))
        .collect()
}

/// Istio's fault injection as the fault filter's per-route configuration.
fn fault_config(http: &HttpRoute) -> Option<Any> {
    let spec = http.fault.as_ref()?;
    let delay = spec.delay.as_ref().and_then(|d| {
        Some(common_fault::FaultDelay {
            percentage: fraction(d.percentage.as_ref()),
            fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(
                duration(d.fixed_delay.as_ref()?.get()),
            )),
        })
    });
    let abort = spec.abort.as_ref().and_then(|a| {
        Some(fault::FaultAbort {
            percentage: fraction(a.percentage.as_ref()),
            error_type: Some(fault::fault_abort::ErrorType::HttpStatus(
                a.http_status? as u32,
            )),
            ..Default::default()
        })
    });
    Some(pack_any(HttpFault {
        delay,
        abort,
        ..Default::default()
    }))
}

/// Envoy routes for one Istio HTTP route: one per match, each with the same action.
fn http_routes(snapshot: &Snapshot, http: &HttpRoute, namespace: &str, port: u16) -> Vec<Route> {
    let Some(action) = route_action(snapshot, http, namespace, port) else {
        return Vec::new();
    };
    let ops =
        |pick: fn(&vmesh_api::kinds::virtual_service::Headers) -> Option<&HeaderOperations>| {
            let mut ops: Vec<&HeaderOperations> =
                http.headers.as_ref().and_then(pick).into_iter().collect();
            // Headers set on a route's only destination apply to the route as well.
            if let Some([only]) = http.route.as_deref() {
                ops.extend(only.headers.as_ref().and_then(pick));
            }
            ops
        };
    // Headers to add and to remove, built once for every match of the route.
    let changes = |ops: Vec<&HeaderOperations>| -> (Vec<core::HeaderValueOption>, Vec<String>) {
        let add = ops
            .iter()
            .flat_map(|o| header_options(o.set.as_ref(), o.add.as_ref()))
            .collect();
        let remove = ops
            .iter()
            .flat_map(|o| o.remove.iter().flatten().cloned())
            .collect();
        (add, remove)
    };
    let request = changes(ops(|h| h.request.as_ref()));
    let response = changes(ops(|h| h.response.as_ref()));
    let typed_per_filter_config: HashMap<String, Any> = fault_config(http)
        .map(|f| (FAULT_FILTER.to_string(), f))
        .into_iter()
        .collect();
    route_matches(http)
        .into_iter()
        .map(|matcher| Route {
            name: http.name.clone().unwrap_or_default(),
            r#match: Some(matcher),
            action: Some(action.clone()),
            typed_per_filter_config: typed_per_filter_config.clone(),
            request_headers_to_add: request.0.clone(),
            request_headers_to_remove: request.1.clone(),
            response_headers_to_add: response.0.clone(),
            response_headers_to_remove: response.1.clone(),
            ..Default::default()
        })
        .collect()
}

/// Filter chains for a VirtualService's `tls` routes on this port: one per
/// match, selected by the SNI the client sends (read by the TLS inspector).
fn tls_chains(snapshot: &Snapshot, service: &MeshService, port: u16) -> Vec<FilterChain> {
    let mut chains = Vec::new();
    for vs in snapshot.virtual_services_for(&service.hostname) {
        for route in vs.spec.tls.iter().flatten() {
            let Some(destinations) = route.route.as_deref().filter(|d| !d.is_empty()) else {
                continue;
            };
            for m in route
                .matches
                .iter()
                .filter(|m| m.port.is_none_or(|p| p == u32::from(port)))
            {
                let specifier = tcp_destinations(snapshot, destinations, &vs.namespace, port);
                chains.push(FilterChain {
                    filter_chain_match: Some(FilterChainMatch {
                        server_names: m.sni_hosts.clone(),
                        ..Default::default()
                    }),
                    filters: vec![tcp_proxy_to(service, port, specifier)],
                    ..Default::default()
                });
            }
        }
    }
    chains
}

/// The TCP proxy for a non-HTTP service port: the first VirtualService `tcp`
/// route for the host whose match names this port (or no port), else the
/// service's own cluster.
fn tcp_route(snapshot: &Snapshot, service: &MeshService, port: u16) -> Filter {
    let route = snapshot
        .virtual_services_for(&service.hostname)
        .flat_map(|vs| vs.spec.tcp.iter().flatten().map(move |r| (vs, r)))
        .find(|(_, r)| {
            let matches = r.matches.as_deref().unwrap_or_default();
            matches.is_empty()
                || matches
                    .iter()
                    .any(|m| m.port.is_none_or(|p| p == u32::from(port)))
        });
    let destinations =
        route.and_then(|(vs, r)| Some((vs, r.route.as_deref().filter(|d| !d.is_empty())?)));
    let specifier = match destinations {
        Some((vs, destinations)) => tcp_destinations(snapshot, destinations, &vs.namespace, port),
        None => tcp_proxy::ClusterSpecifier::Cluster(cluster_name(port, "", &service.hostname)),
    };
    tcp_proxy_to(service, port, specifier)
}

/// Where a TCP or TLS route sends connections: one cluster, or several by weight.
fn tcp_destinations(
    snapshot: &Snapshot,
    destinations: &[RouteDestination],
    namespace: &str,
    port: u16,
) -> tcp_proxy::ClusterSpecifier {
    match destinations {
        [only] => tcp_proxy::ClusterSpecifier::Cluster(destination_cluster(
            snapshot,
            &only.destination,
            namespace,
            port,
        )),
        several => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: several
                .iter()
                .filter(|d| d.weight.unwrap_or(0) > 0)
                .map(|d| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: destination_cluster(snapshot, &d.destination, namespace, port),
                    weight: d.weight.unwrap_or(0) as u32,
                    ..Default::default()
                })
                .collect(),
        }),
    }
}

fn tcp_proxy_to(
    service: &MeshService,
    port: u16,
    specifier: tcp_proxy::ClusterSpecifier,
) -> Filter {
    typed(
        "envoy.filters.network.tcp_proxy",
        pack_any(TcpProxy {
            stat_prefix: cluster_name(port, "", &service.hostname),
            cluster_specifier: Some(specifier),
            ..Default::default()
        }),
    )
}

/// The route hash policy a DestinationRule's `consistentHash` asks for, for
/// routes whose (first) destination is `cluster`.
fn hash_policies(
    snapshot: &Snapshot,
    cluster: &str,
    proxy_namespace: &str,
) -> Vec<route::route_action::HashPolicy> {
    use route::route_action::hash_policy::{self, PolicySpecifier};
    let Some(host) = cluster.rsplit('|').next() else {
        return Vec::new();
    };
    let Some(service) = snapshot.service(host) else {
        return Vec::new();
    };
    let Some(rule) = snapshot.destination_rule_for(service, proxy_namespace) else {
        return Vec::new();
    };
    let Some(hash) = rule
        .traffic_policy
        .as_ref()
        .and_then(|p| p.load_balancer.as_ref())
        .and_then(|lb| lb.consistent_hash.as_ref())
    else {
        return Vec::new();
    };
    let specifier = if let Some(header) = &hash.http_header_name {
        PolicySpecifier::Header(hash_policy::Header {
            header_name: header.clone(),
            ..Default::default()
        })
    } else if let Some(cookie) = &hash.http_cookie {
        PolicySpecifier::Cookie(hash_policy::Cookie {
            name: cookie.name.clone(),
            path: cookie.path.clone().unwrap_or_default(),
            ttl: cookie.ttl.as_ref().map(|t| duration(t.get())),
            ..Default::default()
        })
    } else if let Some(name) = &hash.http_query_parameter_name {
        PolicySpecifier::QueryParameter(hash_policy::QueryParameter { name: name.clone() })
    } else {
        PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties { source_ip: true })
    };
    vec![route::route_action::HashPolicy {
        policy_specifier: Some(specifier),
        ..Default::default()
    }]
}

/// Adds the consistent-hash policy of each route's destination.
fn add_hash_policies(snapshot: &Snapshot, routes: &mut [Route], proxy_namespace: &str) {
    for route in routes {
        let Some(route::route::Action::Route(action)) = &mut route.action else {
            continue;
        };
        let cluster = match &action.cluster_specifier {
            Some(route::route_action::ClusterSpecifier::Cluster(name)) => name.clone(),
            Some(route::route_action::ClusterSpecifier::WeightedClusters(w)) => w
                .clusters
                .first()
                .map(|c| c.name.clone())
                .unwrap_or_default(),
            _ => continue,
        };
        action.hash_policy = hash_policies(snapshot, &cluster, proxy_namespace);
    }
}

/// The names a workload may use for `service`: its hostname, the short forms
/// of a Kubernetes Service's (`name`, `name.namespace`, `name.namespace.svc`),
/// its virtual IPs, each alone and with `:port`.
fn domains(service: &MeshService, port: u16, domain_suffix: &str) -> Vec<String> {
    let mut names = vec![service.hostname.clone()];
    if let Some(base) = service
        .hostname
        .strip_suffix(domain_suffix)
        .and_then(|h| h.strip_suffix(".svc."))
    {
        let short: Vec<&str> = base.split('.').collect();
        if short.len() == 2 {
            names.push(format!("{}.{}.svc", short[0], short[1]));
            names.push(base.to_string());
            names.push(short[0].to_string());
        }
    }
    names.extend(service.addresses.iter().map(ToString::to_string));
    let with_port: Vec<String> = names.iter().map(|n| format!("{n}:{port}")).collect();
    names.extend(with_port);
    names
}

fn virtual_host(
    snapshot: &Snapshot,
    service: &MeshService,
    port: u16,
    proxy_namespace: &str,
) -> VirtualHost {
    let mut routes = Vec::new();
    // Istio uses only the first VirtualService for a host.
    if let Some(vs) = snapshot.virtual_services_for(&service.hostname).next() {
        for http in vs.spec.http.iter().flatten() {
            routes.extend(http_routes(snapshot, http, &vs.namespace, port));
        }
    }
    if routes.is_empty() {
        routes.push(Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::route::Action::Route(RouteAction {
                cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                    cluster_name(port, "", &service.hostname),
                )),
                timeout: Some(duration(Duration::ZERO)),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    add_hash_policies(snapshot, &mut routes, proxy_namespace);
    VirtualHost {
        name: format!("{}:{port}", service.hostname),
        domains: domains(service, port, &snapshot.mesh.domain_suffix),
        routes,
        ..Default::default()
    }
}

/// Everything one sidecar needs.
/// The clusters, endpoints, listeners and routes for calling out of a proxy.
fn outbound(snapshot: &Snapshot, proxy: &OutboundKey) -> ResourceSet {
    let mut clusters: BTreeMap<String, Any> = BTreeMap::new();
    let mut endpoints: BTreeMap<String, Any> = BTreeMap::new();
    let mut listeners: BTreeMap<String, Any> = BTreeMap::new();
    let mut routes: BTreeMap<String, Any> = BTreeMap::new();
    let mut http_ports: BTreeMap<u16, Vec<&MeshService>> = BTreeMap::new();

    for service in &snapshot.services {
        let dr = snapshot.destination_rule_for(service, &proxy.namespace);
        let locality = locality_policy(dr.as_deref(), proxy.locality.as_deref());
        for port in &service.ports {
            let base_policy = layered(
                dr.as_ref().and_then(|d| d.traffic_policy.as_ref()),
                port.port,
            );
            let base_policy: Vec<&TrafficPolicy> = base_policy.iter().collect();
            let name = cluster_name(port.port, "", &service.hostname);
            let cluster = outbound_cluster(
                name.clone(),
                service,
                port,
                &base_policy,
                &snapshot.mesh.trust_domain,
            );
            if service.resolution == Resolution::Static {
                endpoints.insert(
                    name.clone(),
                    pack_any(load_assignment(
                        &name,
                        service,
                        port.port,
                        None,
                        locality.as_ref(),
                    )),
                );
            }
            clusters.insert(name, pack_any(cluster));
            for subset in dr.iter().flat_map(|d| d.subsets.iter().flatten()) {
                let name = cluster_name(port.port, &subset.name, &service.hostname);
                let subset_policy = layered(subset.traffic_policy.as_ref(), port.port);
                let mut policies = base_policy.clone();
                policies.extend(subset_policy.iter());
                clusters.insert(
                    name.clone(),
                    pack_any(outbound_cluster(
                        name.clone(),
                        service,
                        port,
                        &policies,
                        &snapshot.mesh.trust_domain,
                    )),
                );
                if service.resolution == Resolution::Static {
                    endpoints.insert(
                        name.clone(),
                        pack_any(load_assignment(
                            &name,
                            service,
                            port.port,
                            subset.labels.as_ref(),
                            locality.as_ref(),
                        )),
                    );
                }
            }
            if port.protocol.is_http() {
                http_ports.entry(port.port).or_default().push(service);
            } else {
                for vip in &service.addresses {
                    let listener_name = format!("{vip}_{}", port.port);
                    let listener = Listener {
                        name: listener_name.clone(),
                        address: Some(socket(&vip.to_string(), port.port.into())),
                        bind_to_port: Some(envoy_types::pb::google::protobuf::BoolValue {
                            value: false,
                        }),
                        filter_chains: tls_chains(snapshot, service, port.port),
                        default_filter_chain: Some(FilterChain {
                            filters: vec![tcp_route(snapshot, service, port.port)],
                            ..Default::default()
                        }),
                        listener_filters: vec![tls_inspector()],
                        ..Default::default()
                    };
                    listeners.insert(listener_name, pack_any(listener));
                }
            }
        }
    }

    for (port, services) in &http_ports {
        let route_name = port.to_string();
        let mut virtual_hosts: Vec<VirtualHost> = services
            .iter()
            .map(|s| virtual_host(snapshot, s, *port, &proxy.namespace))
            .collect();
        let fallback = if snapshot.mesh.outbound_policy == OutboundPolicy::RegistryOnly {
            BLACKHOLE
        } else {
            PASSTHROUGH
        };
        virtual_hosts.push(VirtualHost {
            name: "allow_any".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(RouteAction {
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                        fallback.into(),
                    )),
                    timeout: Some(duration(Duration::ZERO)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        });
        routes.insert(
            route_name.clone(),
            pack_any(RouteConfiguration {
                name: route_name.clone(),
                virtual_hosts,
                validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue {
                    value: false,
                }),
                ..Default::default()
            }),
        );
        let listener_name = format!("0.0.0.0_{port}");
        listeners.insert(
            listener_name.clone(),
            pack_any(Listener {
                name: listener_name.clone(),
                address: Some(socket("0.0.0.0", (*port).into())),
                bind_to_port: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
                filter_chains: vec![FilterChain {
                    filters: vec![http_manager(
                        &format!("outbound_0.0.0.0_{port}"),
                        http_connection_manager::RouteSpecifier::Rds(Rds {
                            config_source: Some(ads()),
                            route_config_name: route_name,
                        }),
                        Vec::new(),
                    )],
                    ..Default::default()
                }],
                ..Default::default()
            }),
        );
    }

    // Fallback clusters, and the capture listeners.
    let passthrough = Cluster {
        name: PASSTHROUGH.into(),
        connect_timeout: Some(duration(Duration::from_secs(10))),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::cluster::LbPolicy::ClusterProvided as i32,
        ..Default::default()
    };
    clusters.insert(PASSTHROUGH.into(), pack_any(passthrough));
    let blackhole = Cluster {
        name: BLACKHOLE.into(),
        connect_timeout: Some(duration(Duration::from_secs(10))),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Static as i32,
        )),
        ..Default::default()
    };
    clusters.insert(BLACKHOLE.into(), pack_any(blackhole));
    let fallback = if snapshot.mesh.outbound_policy == OutboundPolicy::RegistryOnly {
        BLACKHOLE
    } else {
        PASSTHROUGH
    };
    listeners.insert(
        "virtualOutbound".into(),
        pack_any(Listener {
            name: "virtualOutbound".into(),
            address: Some(socket("0.0.0.0", OUTBOUND_PORT)),
            use_original_dst: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
            filter_chains: vec![FilterChain {
                name: fallback.into(),
                filters: vec![tcp_proxy_filter(fallback, fallback)],
                ..Default::default()
            }],
            ..Default::default()
        }),
    );

    resource_set([
        (CLUSTER_TYPE, clusters),
        (ENDPOINT_TYPE, endpoints),
        (LISTENER_TYPE, listeners),
        (ROUTE_TYPE, routes),
    ])
}

fn resource_set<const N: usize>(types: [(&'static str, BTreeMap<String, Any>); N]) -> ResourceSet {
    let mut set = ResourceSet::default();
    for (type_url, resources) in types {
        for (name, any) in resources {
            set.insert(type_url, name, any);
        }
    }
    set
}

/// The inbound side of a proxy: one chain per port its workload serves, to
/// the local application.
fn inbound(snapshot: &Snapshot, proxy: &Proxy) -> ResourceSet {
    let access = authz::authorization(snapshot, proxy);
    let mut clusters: BTreeMap<String, Any> = BTreeMap::new();
    let mut inbound_chains = Vec::new();
    let proxy_ip = proxy.ip.to_string();
    let mut served: BTreeMap<u16, bool> = BTreeMap::new();
    for service in &snapshot.services {
        for endpoint in service.endpoints.iter().filter(|e| e.address == proxy_ip) {
            let http = service
                .ports
                .iter()
                .find(|p| p.port == endpoint.service_port)
                .is_some_and(|p| p.protocol.is_http());
            served.entry(endpoint.port).or_insert(http);
        }
    }
    for (port, http) in served {
        let name = inbound_cluster_name(port);
        clusters.insert(
            name.clone(),
            pack_any(Cluster {
                name: name.clone(),
                connect_timeout: Some(duration(Duration::from_secs(10))),
                cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
                    cluster::cluster::DiscoveryType::Static as i32,
                )),
                load_assignment: Some(ClusterLoadAssignment {
                    cluster_name: name.clone(),
                    endpoints: vec![LocalityLbEndpoints {
                        lb_endpoints: vec![LbEndpoint {
                            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                                Endpoint {
                                    address: Some(socket("127.0.0.1", port.into())),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        let filter = if http {
            http_manager(
                &name,
                http_connection_manager::RouteSpecifier::RouteConfig(RouteConfiguration {
                    name: name.clone(),
                    virtual_hosts: vec![VirtualHost {
                        name: name.clone(),
                        domains: vec!["*".into()],
                        routes: vec![Route {
                            r#match: Some(RouteMatch {
                                path_specifier: Some(route::route_match::PathSpecifier::Prefix(
                                    "/".into(),
                                )),
                                ..Default::default()
                            }),
                            action: Some(route::route::Action::Route(RouteAction {
                                cluster_specifier: Some(
                                    route::route_action::ClusterSpecifier::Cluster(name.clone()),
                                ),
                                timeout: Some(duration(Duration::ZERO)),
                                ..Default::default()
                            })),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                access.http_filters.clone(),
            )
        } else {
            tcp_proxy_filter(&name, &name)
        };
        let filters: Vec<Filter> = if http {
            vec![filter]
        } else {
            access
                .network_filters
                .iter()
                .cloned()
                .chain([filter])
                .collect()
        };
        // What PeerAuthentication lets in: mTLS chains present our
        // certificate and require one from the mesh; plaintext falls through
        // to the default chain when only mTLS is allowed.
        let mode = mtls::peer_mode(snapshot, proxy, port);
        let chain = |tls: bool| FilterChain {
            name: format!("{name}{}", if tls { "mtls" } else { "plaintext" }),
            filter_chain_match: Some(FilterChainMatch {
                destination_port: u32_value(port.into()),
                transport_protocol: match (tls, mode) {
                    (true, _) => "tls".into(),
                    (false, mtls::PeerMode::Permissive) => "raw_buffer".into(),
                    (false, _) => String::new(),
                },
                ..Default::default()
            }),
            filters: filters.clone(),
            transport_socket: tls.then(mtls::inbound_tls),
            ..Default::default()
        };
        match mode {
            mtls::PeerMode::Strict => inbound_chains.push(chain(true)),
            mtls::PeerMode::Permissive => inbound_chains.extend([chain(true), chain(false)]),
            mtls::PeerMode::Disable => inbound_chains.push(chain(false)),
        }
    }
    let virtual_inbound = pack_any(Listener {
        name: "virtualInbound".into(),
        address: Some(socket("0.0.0.0", INBOUND_PORT)),
        listener_filters: vec![original_dst_filter(), tls_inspector()],
        filter_chains: inbound_chains,
        default_filter_chain: Some(FilterChain {
            filters: vec![tcp_proxy_filter("InboundPassthrough", BLACKHOLE)],
            ..Default::default()
        }),
        ..Default::default()
    });
    let listeners = BTreeMap::from([("virtualInbound".to_string(), virtual_inbound)]);
    resource_set([(CLUSTER_TYPE, clusters), (LISTENER_TYPE, listeners)])
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use prost::Message;

    use super::*;

    /// Everything a proxy in `shop` (at `locality`, if any) gets from these manifests.
    fn translate_yaml(text: &str, locality: Option<core::Locality>) -> Resources {
        let objects: Vec<_> = vmesh_api::decode_manifests("mesh.yaml", text)
            .objects
            .into_iter()
            .map(|l| l.object)
            .collect();
        let snapshot = Snapshot::build(&objects, &mut vmesh_registry::VipAllocator::default());
        let node = Node {
            id: "sidecar~10.0.0.9~client.shop~shop.svc.cluster.local".into(),
            locality,
            ..Default::default()
        };
        translate(&snapshot, &Proxy::from_node(Some(&node)).unwrap())
    }

    fn decoded<T: Message + Default>(resources: &Resources, type_url: &str, name: &str) -> T {
        let (_, resource) = resources.get(type_url, name).unwrap();
        T::decode(resource.any.value.as_slice()).unwrap()
    }

    const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: shop}
spec:
  selector: {app: pay}
  ports: [{name: http, port: 8080}, {name: grpc, port: 9090}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm1, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: pay, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pay, namespace: shop}
spec:
  host: pay
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 7}}
"#;

    fn clusters() -> BTreeMap<String, Cluster> {
        translate_yaml(MESH, None)
            .of_type(CLUSTER_TYPE)
            .map(|(name, r)| {
                let cluster = Cluster::decode(r.any.value.as_slice()).unwrap();
                (name.to_string(), cluster)
            })
            .collect()
    }

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
    fn tcp_routes_split_by_weight() {
        let text = format!(
            "{MESH}---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: shop}}\nspec:\n  selector: {{app: pay}}\n  ports: [{{name: tcp-db, port: 5432}}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db, namespace: shop}}\nspec:\n  hosts: [db]\n  tcp:\n  - match: [{{port: 5432}}]\n    route:\n    - {{destination: {{host: db, subset: a}}, weight: 30}}\n    - {{destination: {{host: db, subset: b}}, weight: 70}}\n"
        );
        let objects: Vec<_> = vmesh_api::decode_manifests("mesh.yaml", &text)
            .objects
            .into_iter()
            .map(|l| l.object)
            .collect();
        let snapshot = Snapshot::build(&objects, &mut vmesh_registry::VipAllocator::default());
        let db = snapshot.service("db.shop.svc.cluster.local").unwrap();
        let filter = tcp_route(&snapshot, db, 5432);
        let Some(filter::ConfigType::TypedConfig(any)) = filter.config_type else {
            panic!("typed config")
        };
        let proxy = TcpProxy::decode(any.value.as_slice()).unwrap();
        let Some(tcp_proxy::ClusterSpecifier::WeightedClusters(weighted)) = proxy.cluster_specifier
        else {
            panic!("weighted")
        };
        let split: Vec<(String, u32)> = weighted
            .clusters
            .into_iter()
            .map(|c| (c.name, c.weight))
            .collect();
        assert_eq!(
            split,
            [
                ("outbound|5432|a|db.shop.svc.cluster.local".to_string(), 30),
                ("outbound|5432|b|db.shop.svc.cluster.local".to_string(), 70)
            ]
        );
    }

    #[test]
    fn consistent_hash_sets_ring_hash_and_the_route_hash_policy() {
        let text = MESH.replace(
            "loadBalancer: {simple: RANDOM}",
            "loadBalancer: {consistentHash: {httpHeaderName: x-user}}",
        );
        let resources = translate_yaml(&text, None);
        let cluster: Cluster = decoded(
            &resources,
            CLUSTER_TYPE,
            "outbound|8080||pay.shop.svc.cluster.local",
        );
        assert_eq!(
            cluster.lb_policy,
            cluster::cluster::LbPolicy::RingHash as i32
        );
        let routes: RouteConfiguration = decoded(&resources, ROUTE_TYPE, "8080");
        let Some(route::route::Action::Route(action)) = &routes.virtual_hosts[0].routes[0].action
        else {
            panic!("route")
        };
        let Some(route::route_action::hash_policy::PolicySpecifier::Header(header)) =
            &action.hash_policy[0].policy_specifier
        else {
            panic!("header hash policy")
        };
        assert_eq!(header.header_name, "x-user");
    }

    #[test]
    fn locality_failover_orders_priorities_from_the_proxy() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: shop}
spec:
  selector: {app: pay}
  ports: [{name: http, port: 8080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pay, namespace: shop}
spec:
  host: pay
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1}
    loadBalancer:
      localityLbSetting:
        failover: [{from: us-west1, to: us-east1}]
"#
        .to_string()
            + &[("a", "us-west1/zone-a"), ("b", "us-west1/zone-b"), ("c", "us-east1/zone-a"), ("d", "eu-west1/zone-a")]
                .iter()
                .enumerate()
                .map(|(i, (name, locality))| {
                    format!("---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{address: 10.0.0.{}, labels: {{app: pay}}, locality: {locality}}}\n", i + 1)
                })
                .collect::<String>();
        let locality = core::Locality {
            region: "us-west1".into(),
            zone: "zone-a".into(),
            ..Default::default()
        };
        let assignment: ClusterLoadAssignment = decoded(
            &translate_yaml(&text, Some(locality)),
            ENDPOINT_TYPE,
            "outbound|8080||pay.shop.svc.cluster.local",
        );
        let priorities: BTreeMap<String, u32> = assignment
            .endpoints
            .iter()
            .map(|e| (locality_name(e.locality.as_ref()), e.priority))
            .collect();
        assert_eq!(
            priorities,
            BTreeMap::from([
                ("us-west1/zone-a/".to_string(), 0),
                ("us-west1/zone-b/".to_string(), 1),
                ("us-east1/zone-a/".to_string(), 2),
                ("eu-west1/zone-a/".to_string(), 3),
            ])
        );
        // Without a locality on the proxy everything is one priority.
        let assignment: ClusterLoadAssignment = decoded(
            &translate_yaml(&text, None),
            ENDPOINT_TYPE,
            "outbound|8080||pay.shop.svc.cluster.local",
        );
        assert!(assignment.endpoints.iter().all(|e| e.priority == 0));
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
