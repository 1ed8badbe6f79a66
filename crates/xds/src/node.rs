//! Who a proxy is: Istio's node id (`sidecar~10.0.0.1~vm1.ns~ns.svc.cluster.local`)
//! and node metadata (NAMESPACE, SERVICE_ACCOUNT, LABELS, NETWORK, …).
//!
//! This module only parses what the proxy claims. Whether the claim is true
//! (its certificate names the same identity) is checked where the stream is
//! authenticated, not here.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NodeError {
    #[error("the request carries no node")]
    Missing,
    #[error("node id {0:?} is not TYPE~IP~NAME.NAMESPACE~DOMAIN")]
    BadId(String),
    #[error("node id {id:?}: proxy type {kind:?} is not sidecar or router")]
    BadType { id: String, kind: String },
    #[error("node id {id:?}: {ip:?} is not an IP address")]
    BadIp { id: String, ip: String },
}

/// The proxy's role, from the first part of its node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyType {
    Sidecar,
    Router,
}

/// What a proxy says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Proxy {
    pub id: String,
    pub proxy_type: ProxyType,
    pub ip: std::net::IpAddr,
    /// The workload name part of `NAME.NAMESPACE`.
    pub name: String,
    pub namespace: String,
    pub service_account: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub network: Option<String>,
    pub workload_name: Option<String>,
    pub cluster_id: Option<String>,
    /// `region/zone/subzone` from the node's locality, when it has one.
    pub locality: Option<String>,
    /// Every metadata field, as strings where they are strings.
    pub metadata: BTreeMap<String, String>,
}

fn string_of(value: &Value) -> Option<String> {
    match &value.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        Some(Kind::BoolValue(b)) => Some(b.to_string()),
        Some(Kind::NumberValue(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn labels_of(value: &Value) -> BTreeMap<String, String> {
    match &value.kind {
        Some(Kind::StructValue(Struct { fields })) => fields
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), string_of(v)?)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

impl Proxy {
    pub fn from_node(node: Option<&Node>) -> Result<Proxy, NodeError> {
        let node = node.ok_or(NodeError::Missing)?;
        let id = node.id.clone();
        let parts: Vec<&str> = id.split('~').collect();
        let [kind, ip, name_ns, _domain] = parts.as_slice() else {
            return Err(NodeError::BadId(id));
        };
        let proxy_type = match *kind {
            "sidecar" => ProxyType::Sidecar,
            "router" => ProxyType::Router,
            other => {
                return Err(NodeError::BadType {
                    id: id.clone(),
                    kind: other.to_string(),
                });
            }
        };
        let ip = ip.parse().map_err(|_| NodeError::BadIp {
            id: id.clone(),
            ip: ip.to_string(),
        })?;
        let (name, id_namespace) = name_ns
            .rsplit_once('.')
            .ok_or_else(|| NodeError::BadId(id.clone()))?;
        let fields = node.metadata.as_ref().map(|m| &m.fields);
        let field = |key: &str| fields.and_then(|f| f.get(key)).and_then(string_of);
        let metadata = fields
            .map(|f| {
                f.iter()
                    .filter_map(|(k, v)| Some((k.clone(), string_of(v)?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Proxy {
            proxy_type,
            ip,
            name: name.to_string(),
            namespace: field("NAMESPACE").unwrap_or_else(|| id_namespace.to_string()),
            service_account: field("SERVICE_ACCOUNT"),
            labels: fields
                .and_then(|f| f.get("LABELS"))
                .map(labels_of)
                .unwrap_or_default(),
            network: field("NETWORK").filter(|n| !n.is_empty()),
            workload_name: field("WORKLOAD_NAME"),
            cluster_id: field("CLUSTER_ID"),
            locality: node
                .locality
                .as_ref()
                .filter(|l| !l.region.is_empty())
                .map(|l| {
                    format!("{}/{}/{}", l.region, l.zone, l.sub_zone)
                        .trim_end_matches('/')
                        .to_string()
                }),
            metadata,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.into())),
        }
    }

    #[test]
    fn parses_istio_node_ids_and_metadata() {
        let mut labels = Struct::default();
        labels.fields.insert("app".into(), value("payment-service"));
        let mut metadata = Struct::default();
        metadata
            .fields
            .insert("NAMESPACE".into(), value("vm-workloads"));
        metadata
            .fields
            .insert("SERVICE_ACCOUNT".into(), value("payment-service-sa"));
        metadata.fields.insert("NETWORK".into(), value("network1"));
        metadata.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        let node = Node {
            id: "sidecar~10.0.0.5~payment-vm1.vm-workloads~vm-workloads.svc.cluster.local".into(),
            metadata: Some(metadata),
            ..Default::default()
        };
        let proxy = Proxy::from_node(Some(&node)).unwrap();
        assert_eq!(proxy.proxy_type, ProxyType::Sidecar);
        assert_eq!(proxy.ip.to_string(), "10.0.0.5");
        assert_eq!(proxy.name, "payment-vm1");
        assert_eq!(proxy.namespace, "vm-workloads");
        assert_eq!(proxy.service_account.as_deref(), Some("payment-service-sa"));
        assert_eq!(proxy.labels["app"], "payment-service");
        assert_eq!(proxy.network.as_deref(), Some("network1"));
    }

    #[test]
    fn refuses_malformed_ids() {
        let node = |id: &str| Node {
            id: id.into(),
            ..Default::default()
        };
        assert_eq!(Proxy::from_node(None), Err(NodeError::Missing));
        assert!(matches!(
            Proxy::from_node(Some(&node("hello"))),
            Err(NodeError::BadId(_))
        ));
        assert!(matches!(
            Proxy::from_node(Some(&node("gateway~1.2.3.4~a.b~c"))),
            Err(NodeError::BadType { .. })
        ));
        assert!(matches!(
            Proxy::from_node(Some(&node("sidecar~nope~a.b~c"))),
            Err(NodeError::BadIp { .. })
        ));
    }
}
