//! Load assignments (EDS, or inline for DNS clusters): the endpoints of a
//! service port, or of one subset of it, grouped by locality with their
//! weights, and for a proxy with a locality, in priorities by how near they
//! are (Istio's locality failover).
//!
//! Which endpoints belong to a port or a subset is the registry's decision
//! (`MeshService::endpoints_for`); this module turns them into Envoy's.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{self as core, Address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use vmesh_api::kinds::destination_rule::{DestinationRuleSpec, LocalityFailover};
use vmesh_registry::{EndpointAddress, Labels, MeshEndpoint, MeshService, Resolution};

use super::proto::{pipe, socket, u32_value};
use crate::mtls;

/// Locality-aware load balancing for one proxy: endpoints nearer the proxy
/// get higher priority, then the regions `failover` names, then the rest.
pub(super) struct LocalityPolicy<'a> {
    /// The proxy's `region/zone/subzone`.
    proxy: &'a str,
    failover: &'a [LocalityFailover],
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
pub(super) fn locality_policy<'a>(
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

/// Envoy's address for an endpoint of cluster `name`, if Envoy can reach it
/// there: an IP, a socket path, or a hostname in a cluster that
/// `resolves_names` (STRICT_DNS). Anything else would make Envoy refuse the
/// whole cluster, so it is left out.
fn address(name: &str, endpoint: &MeshEndpoint, resolves_names: bool) -> Option<Address> {
    match &endpoint.address {
        EndpointAddress::Ip(ip) => Some(socket(&ip.to_string(), endpoint.port.into())),
        EndpointAddress::Hostname(host) if resolves_names => {
            Some(socket(host, endpoint.port.into()))
        }
        EndpointAddress::Unix(path) if !resolves_names => Some(pipe(path)),
        EndpointAddress::Hostname(_) | EndpointAddress::Unix(_) => {
            let why = if resolves_names {
                "a DNS cluster cannot reach a socket path"
            } else {
                "only DNS clusters resolve hostnames"
            };
            tracing::warn!(
                cluster = name,
                workload = %endpoint.workload,
                address = %endpoint.address,
                "endpoint left out: {why}",
            );
            None
        }
        // Reaching another network through its gateway is not there yet:
        // such an endpoint has no address to give Envoy.
        EndpointAddress::ViaGateway { network } => {
            tracing::debug!(
                cluster = name,
                workload = %endpoint.workload,
                %network,
                "endpoint on another network left out: no gateway support yet",
            );
            None
        }
    }
}

/// The load assignment of cluster `name`: the endpoints of `service` for
/// service port `port` (those a subset's `labels` select, when given), one
/// group per locality weighted by the sum of its endpoints' weights, in
/// priorities from the proxy when `locality` says how.
pub(super) fn load_assignment(
    name: &str,
    service: &MeshService,
    port: u16,
    subset: Option<&Labels>,
    locality: Option<&LocalityPolicy>,
) -> ClusterLoadAssignment {
    let resolves_names = matches!(
        service.resolution,
        Resolution::Dns | Resolution::DnsRoundRobin
    );
    let mut by_locality: BTreeMap<String, Vec<LbEndpoint>> = BTreeMap::new();
    for endpoint in service.endpoints_for(port, subset) {
        let Some(address) = address(name, endpoint, resolves_names) else {
            continue;
        };
        by_locality
            .entry(endpoint.locality.clone().unwrap_or_default())
            .or_default()
            .push(LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(address),
                    ..Default::default()
                })),
                metadata: mtls::is_mesh_endpoint(endpoint).then(|| {
                    let mut metadata = Some(mtls::mesh_endpoint_metadata());
                    super::telemetry::add_metadata(
                        &mut metadata,
                        super::telemetry::endpoint_metadata(endpoint, service),
                    );
                    metadata.unwrap_or_default()
                }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ads::ENDPOINT_TYPE;
    use crate::translate::testing::{decoded, translate_yaml};

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
}
