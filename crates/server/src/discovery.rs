//! Prometheus HTTP service discovery (`http_sd_configs`): every proxy
//! connected to this server, at its agent's merged metrics endpoint
//! (15020 `/stats/prometheus`), labelled with its namespace, workload, app,
//! version, network and cluster, so that one static Prometheus job finds
//! every VM, auto-registered ones included, as they come and go.
//!
//! Served on the config API (behind its authentication: Prometheus sends
//! the token with `authorization.credentials_file`). This module reads the
//! table of connected proxies; it does not decide who is connected.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use vmesh_api::peer::STATUS_PORT_METADATA;
use vmesh_xds::ads::StatusTable;
use vmesh_xds::node::Proxy;

/// Where Prometheus asks.
pub const TARGETS_PATH: &str = "/v1/prometheus/targets";
/// The merged metrics' path on the status port.
const METRICS_PATH: &str = "/stats/prometheus";

pub fn router(proxies: Arc<StatusTable>) -> Router {
    Router::new()
        .route(TARGETS_PATH, get(targets))
        .with_state(proxies)
}

async fn targets(State(proxies): State<Arc<StatusTable>>) -> Json<Vec<Value>> {
    let mut groups: Vec<(String, Value)> = proxies
        .nodes()
        .iter()
        .filter_map(|node| Proxy::from_node(Some(node)).ok())
        .filter_map(|proxy| Some((proxy.id.clone(), target_group(&proxy)?)))
        .collect();
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    Json(groups.into_iter().map(|(_, group)| group).collect())
}

/// One proxy's target group; `None` when its agent announced no status port
/// others can reach.
fn target_group(proxy: &Proxy) -> Option<Value> {
    let port: u16 = proxy.metadata.get(STATUS_PORT_METADATA)?.parse().ok()?;
    let label = |name: &str| proxy.labels.get(name).cloned().unwrap_or_default();
    let address = std::net::SocketAddr::new(proxy.ip, port);
    Some(json!({
        "targets": [address.to_string()],
        "labels": {
            "__metrics_path__": METRICS_PATH,
            "namespace": proxy.namespace,
            "workload": proxy.workload_name.clone().unwrap_or_else(|| proxy.name.clone()),
            "app": label("app"),
            "version": label("version"),
            "network": proxy.network.clone().unwrap_or_default(),
            "cluster": proxy.cluster_id.clone().unwrap_or_default(),
            "proxy": format!("{}.{}", proxy.name, proxy.namespace),
        },
    }))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};

    use super::*;

    fn node(metadata: &[(&str, &str)]) -> Node {
        let string = |s: &str| PbValue {
            kind: Some(Kind::StringValue(s.into())),
        };
        let mut fields: std::collections::BTreeMap<String, PbValue> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), string(v)))
            .collect();
        fields.insert(
            "LABELS".into(),
            PbValue {
                kind: Some(Kind::StructValue(Struct {
                    fields: [
                        ("app".to_string(), string("payment")),
                        ("version".to_string(), string("v2")),
                    ]
                    .into(),
                })),
            },
        );
        Node {
            id: "sidecar~10.0.0.7~vm7.shop~shop.svc.cluster.local".into(),
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_proxy_is_a_target_at_its_status_port_with_its_labels() {
        let proxy = Proxy::from_node(Some(&node(&[
            ("STATUS_PORT", "15020"),
            ("WORKLOAD_NAME", "payment-group"),
            ("NETWORK", "vm-net"),
            ("CLUSTER_ID", "vms"),
        ])))
        .unwrap();
        let group = target_group(&proxy).unwrap();
        assert_eq!(group["targets"], json!(["10.0.0.7:15020"]));
        assert_eq!(group["labels"]["__metrics_path__"], "/stats/prometheus");
        assert_eq!(group["labels"]["workload"], "payment-group");
        assert_eq!(group["labels"]["version"], "v2");
        assert_eq!(group["labels"]["network"], "vm-net");
        assert_eq!(group["labels"]["cluster"], "vms");
        // An agent whose status port is on loopback announces none: no target.
        let hidden = Proxy::from_node(Some(&node(&[]))).unwrap();
        assert!(target_group(&hidden).is_none());
    }
}
