//! Listeners and their filter chains, laid out as Istio lays them out:
//! `virtualOutbound` on 15001 hands captured connections to a listener per
//! outbound port (`0.0.0.0_port` with an HTTP connection manager fed by RDS
//! for HTTP ports, `vip_port` with a TCP proxy, TLS routes by SNI, for the
//! others); `virtualInbound` on 15006 holds a chain per port the workload
//! serves, secured as PeerAuthentication says and guarded by `authz`'s RBAC
//! filters.
//!
//! Which VirtualServices and policies apply is the registry's decision;
//! routes are `route`'s, TLS contexts `mtls`'s.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::accesslog::v3::AccessLog;
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use envoy_types::util::pack_any;
use vmesh_api::kinds::virtual_service::RouteDestination;
use vmesh_registry::telemetry::SideTelemetry;
use vmesh_registry::{MeshService, Snapshot};

use super::cluster::{BLACKHOLE, cluster_name, inbound_cluster_name};
use super::proto::{ads, socket, u32_value};
use super::route::{destination_cluster, inbound_routes};
use super::telemetry::{self, Direction};
use crate::node::Proxy;
use crate::{authz, mtls};

/// The port `virtualOutbound` listens on: where outbound connections are captured.
pub const OUTBOUND_PORT: u32 = 15001;
/// The port `virtualInbound` listens on: where inbound connections are captured.
pub const INBOUND_PORT: u32 = 15006;
/// The HTTP fault filter, configured per route.
pub(super) const FAULT_FILTER: &str = "envoy.filters.http.fault";

/// The listeners of a non-HTTP port of `service`, one per virtual IP: TLS
/// routes by SNI, else its TCP route.
pub(super) fn outbound_tcp(
    snapshot: &Snapshot,
    service: &MeshService,
    port: u16,
    telemetry: &SideTelemetry,
) -> Vec<Listener> {
    let logs = tcp_logs(telemetry, Direction::Outbound);
    service
        .addresses
        .iter()
        .map(|vip| Listener {
            name: format!("{vip}_{port}"),
            address: Some(socket(&vip.to_string(), port.into())),
            bind_to_port: Some(BoolValue { value: false }),
            traffic_direction: TrafficDirection::Outbound as i32,
            filter_chains: tls_chains(snapshot, service, port, &logs),
            default_filter_chain: Some(FilterChain {
                filters: vec![tcp_route(snapshot, service, port, &logs)],
                ..Default::default()
            }),
            listener_filters: vec![tls_inspector()],
            ..Default::default()
        })
        .collect()
}

/// The access loggers of a TCP proxy on one side.
fn tcp_logs(telemetry: &SideTelemetry, direction: Direction) -> Vec<AccessLog> {
    telemetry::access_loggers(telemetry, direction, telemetry::Protocol::Tcp)
}

/// What an HTTP connection manager reports: access logs and metrics, and
/// its tracer.
struct HttpTelemetry {
    access_log: Vec<AccessLog>,
    tracing: Option<http_connection_manager::Tracing>,
}

impl HttpTelemetry {
    fn new(snapshot: &Snapshot, telemetry: &SideTelemetry, direction: Direction) -> Self {
        HttpTelemetry {
            access_log: telemetry::access_loggers(telemetry, direction, telemetry::Protocol::Http),
            tracing: telemetry::http_tracing(snapshot, telemetry),
        }
    }
}

/// The listener of outbound HTTP port `port`: routes from RDS (named by the port).
pub(super) fn outbound_http(snapshot: &Snapshot, port: u16, telemetry: &SideTelemetry) -> Listener {
    Listener {
        name: format!("0.0.0.0_{port}"),
        address: Some(socket("0.0.0.0", port.into())),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![http_manager(
                &format!("outbound_0.0.0.0_{port}"),
                http_connection_manager::RouteSpecifier::Rds(Rds {
                    config_source: Some(ads()),
                    route_config_name: port.to_string(),
                }),
                Vec::new(),
                HttpTelemetry::new(snapshot, telemetry, Direction::Outbound),
            )],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `virtualOutbound`: hands each captured connection to the listener of its
/// original destination, or to `fallback` when there is none.
pub(super) fn virtual_outbound(fallback: &str, telemetry: &SideTelemetry) -> Listener {
    Listener {
        name: "virtualOutbound".into(),
        address: Some(socket("0.0.0.0", OUTBOUND_PORT)),
        traffic_direction: TrafficDirection::Outbound as i32,
        use_original_dst: Some(BoolValue { value: true }),
        filter_chains: vec![FilterChain {
            name: fallback.into(),
            filters: vec![tcp_proxy(
                fallback,
                cluster(fallback),
                tcp_logs(telemetry, Direction::Outbound),
            )],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `virtualInbound`: for each port the workload serves (`true` for HTTP),
/// the chains PeerAuthentication lets in, to the local application behind
/// the proxy's RBAC filters; anything else goes to [`BLACKHOLE`].
pub(super) fn virtual_inbound(
    snapshot: &Snapshot,
    proxy: &Proxy,
    served: &BTreeMap<u16, bool>,
    telemetry: &SideTelemetry,
) -> Listener {
    let access = authz::authorization(snapshot, proxy);
    let mut inbound_chains = Vec::new();
    for (&port, &http) in served {
        let name = inbound_cluster_name(port);
        // The client's attributes are read before anything else; metrics
        // say whether the connection was mutual TLS.
        let filters = |mtls: bool| -> Vec<Filter> {
            let direction = Direction::Inbound { mtls };
            if http {
                vec![http_manager(
                    &name,
                    http_connection_manager::RouteSpecifier::RouteConfig(inbound_routes(&name)),
                    std::iter::once(telemetry::peer_metadata_filter())
                        .chain(access.http_filters.iter().cloned())
                        .collect(),
                    HttpTelemetry::new(snapshot, telemetry, direction),
                )]
            } else {
                access
                    .network_filters
                    .iter()
                    .cloned()
                    .chain([tcp_proxy(
                        &name,
                        cluster(&name),
                        tcp_logs(telemetry, direction),
                    )])
                    .collect()
            }
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
            filters: filters(tls),
            transport_socket: tls.then(mtls::inbound_tls),
            ..Default::default()
        };
        match mode {
            mtls::PeerMode::Strict => inbound_chains.push(chain(true)),
            mtls::PeerMode::Permissive => inbound_chains.extend([chain(true), chain(false)]),
            mtls::PeerMode::Disable => inbound_chains.push(chain(false)),
        }
    }
    Listener {
        name: "virtualInbound".into(),
        address: Some(socket("0.0.0.0", INBOUND_PORT)),
        // Tracers name spans by direction: server spans inbound, client spans outbound.
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters: vec![original_dst_filter(), tls_inspector()],
        filter_chains: inbound_chains,
        default_filter_chain: Some(FilterChain {
            filters: vec![tcp_proxy(
                "InboundPassthrough",
                cluster(BLACKHOLE),
                Vec::new(),
            )],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn typed(name: &str, config: Any) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

/// A TCP proxy to where `specifier` says, with `access_log` told when the
/// upstream connection is made and when the connection ends.
fn tcp_proxy(
    stat_prefix: &str,
    specifier: tcp_proxy::ClusterSpecifier,
    access_log: Vec<AccessLog>,
) -> Filter {
    let access_log_options = (!access_log.is_empty()).then(|| tcp_proxy::TcpAccessLogOptions {
        flush_access_log_on_connected: true,
        ..Default::default()
    });
    typed(
        "envoy.filters.network.tcp_proxy",
        pack_any(TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(specifier),
            access_log,
            access_log_options,
            ..Default::default()
        }),
    )
}

/// Every connection to one cluster.
fn cluster(name: &str) -> tcp_proxy::ClusterSpecifier {
    tcp_proxy::ClusterSpecifier::Cluster(name.to_string())
}

/// An HTTP connection manager; `access` filters (RBAC) run before faults and routing.
fn http_manager(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
    access: Vec<HttpFilter>,
    telemetry: HttpTelemetry,
) -> Filter {
    typed(
        "envoy.filters.network.http_connection_manager",
        pack_any(HttpConnectionManager {
            stat_prefix: stat_prefix.to_string(),
            route_specifier: Some(routes),
            access_log: telemetry.access_log,
            tracing: telemetry.tracing,
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

/// Filter chains for a VirtualService's `tls` routes on this port: one per
/// match, selected by the SNI the client sends (read by the TLS inspector).
fn tls_chains(
    snapshot: &Snapshot,
    service: &MeshService,
    port: u16,
    logs: &[AccessLog],
) -> Vec<FilterChain> {
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
                    filters: vec![tcp_proxy(
                        &cluster_name(port, "", &service.hostname),
                        specifier,
                        logs.to_vec(),
                    )],
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
fn tcp_route(snapshot: &Snapshot, service: &MeshService, port: u16, logs: &[AccessLog]) -> Filter {
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
        None => cluster(&cluster_name(port, "", &service.hostname)),
    };
    tcp_proxy(
        &cluster_name(port, "", &service.hostname),
        specifier,
        logs.to_vec(),
    )
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

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::testing::snapshot;
    use crate::translate::testing::MESH;

    #[test]
    fn tcp_routes_split_by_weight() {
        let text = format!(
            "{MESH}---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: shop}}\nspec:\n  selector: {{app: pay}}\n  ports: [{{name: tcp-db, port: 5432}}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db, namespace: shop}}\nspec:\n  hosts: [db]\n  tcp:\n  - match: [{{port: 5432}}]\n    route:\n    - {{destination: {{host: db, subset: a}}, weight: 30}}\n    - {{destination: {{host: db, subset: b}}, weight: 70}}\n"
        );
        let snapshot = snapshot(&text);
        let db = snapshot.service("db.shop.svc.cluster.local").unwrap();
        let filter = tcp_route(&snapshot, db, 5432, &[]);
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
}
