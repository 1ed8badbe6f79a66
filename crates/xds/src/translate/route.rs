//! Routes: one route configuration per outbound HTTP port (named by the
//! port) with a virtual host per service on it and the fallback host, the
//! routes of the host's first VirtualService (matches, weighted
//! destinations, redirects, direct responses, retries, rewrites, mirrors,
//! header changes, fault injection) and the DestinationRule's consistent
//! hash; and the inbound route to the local application.
//!
//! Which VirtualService and DestinationRule apply to a host is the
//! registry's decision; this module translates them.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3::{
    self as route, HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{self as fault, HttpFault};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use envoy_types::util::pack_any;
use vmesh_api::kinds::common::{Percent, StringMatch};
use vmesh_api::kinds::virtual_service::{Destination, HeaderOperations, HttpRoute};
use vmesh_registry::{MeshService, Snapshot};

use super::cluster::{cluster_name, fallback_cluster};
use super::listener::FAULT_FILTER;
use super::proto::{duration, u32_value};

/// The route configuration for outbound HTTP port `port`: a virtual host per
/// service on it, then one for every other host, to the fallback cluster.
pub(super) fn outbound_routes(
    snapshot: &Snapshot,
    port: u16,
    services: &[&MeshService],
    proxy_namespace: &str,
) -> RouteConfiguration {
    let mut virtual_hosts: Vec<VirtualHost> = services
        .iter()
        .map(|s| virtual_host(snapshot, s, port, proxy_namespace))
        .collect();
    virtual_hosts.push(VirtualHost {
        name: "allow_any".into(),
        domains: vec!["*".into()],
        routes: vec![catch_all(fallback_cluster(snapshot).into())],
        ..Default::default()
    });
    RouteConfiguration {
        name: port.to_string(),
        virtual_hosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// The route configuration of an inbound HTTP chain: everything to cluster `name`.
pub(super) fn inbound_routes(name: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_string(),
            domains: vec!["*".into()],
            routes: vec![catch_all(name.to_string())],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Every request to `cluster`, without a timeout.
fn catch_all(cluster: String) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::route::Action::Route(RouteAction {
            cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(cluster)),
            timeout: Some(duration(Duration::ZERO)),
            ..Default::default()
        })),
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
                case_sensitive: m.ignore_uri_case.map(|i| BoolValue { value: !i }),
                ..Default::default()
            }
        })
        .collect()
}

pub(super) fn destination_cluster(
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

/// The virtual host of `service` on `port`: the HTTP routes of its first
/// VirtualService, else everything to its cluster.
fn virtual_host(
    snapshot: &Snapshot,
    service: &MeshService,
    port: u16,
    proxy_namespace: &str,
) -> VirtualHost {
    let mut routes = Vec::new();
    // Istio uses only the first VirtualService for a host.
    if let Some(vs) = snapshot.virtual_services_for(&service.hostname).next() {
        let origin = super::proto::config_metadata("virtual-service", &vs.namespace, &vs.name);
        for http in vs.spec.http.iter().flatten() {
            routes.extend(
                http_routes(snapshot, http, &vs.namespace, port)
                    .into_iter()
                    .map(|route| Route {
                        metadata: Some(origin.clone()),
                        ..route
                    }),
            );
        }
    }
    if routes.is_empty() {
        routes.push(catch_all(cluster_name(port, "", &service.hostname)));
    }
    add_hash_policies(snapshot, &mut routes, proxy_namespace);
    VirtualHost {
        name: format!("{}:{port}", service.hostname),
        domains: domains(service, port, &snapshot.mesh.domain_suffix),
        routes,
        // The client's attributes for the server side's metrics; never sent
        // out of the mesh.
        request_headers_to_add: if service.mesh_external {
            Vec::new()
        } else {
            super::telemetry::peer_headers()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::{self as cluster, Cluster};

    use super::*;
    use crate::ads::{CLUSTER_TYPE, ROUTE_TYPE};
    use crate::translate::testing::{MESH, decoded, translate_yaml};

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
}
