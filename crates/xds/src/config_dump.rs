//! The server's view of one proxy in the shape of Envoy's admin
//! `/config_dump` (Istio's `/debug/config_dump?proxyID=` is the model): an
//! `envoy.admin.v3.ConfigDump` whose `configs` are the bootstrap (the node
//! as the proxy announced itself), its clusters, endpoints (with
//! `include_eds`, as Envoy and Istio do; like Envoy's, the inline load
//! assignments of clusters too), listeners, routes and secrets,
//! written in Envoy's own JSON (proto field names, `@type` on every `Any`),
//! so that one reader serves the server's dump and Envoy's.
//!
//! The resources are the ones the ADS stream computed for the proxy at its
//! last configuration change (`ads::StatusTable` keeps them), each with the
//! version it is sent under. Secrets are the agent's (SDS on the VM), never
//! the server's: that section is empty, as in Istio's dump of a sidecar.
//!
//! The JSON comes from the protobuf descriptors envoy-types ships (see
//! `build.rs`), read once on first use.

use std::sync::LazyLock;

use envoy_types::pb::envoy::admin::v3::{
    BootstrapConfigDump, ClustersConfigDump, ConfigDump, EndpointsConfigDump, ListenersConfigDump,
    RoutesConfigDump, SecretsConfigDump, clusters_config_dump, endpoints_config_dump,
    listeners_config_dump, routes_config_dump,
};
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::util::pack_any;
use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;

use crate::ads::{
    CLUSTER_TYPE, ConnectedProxy, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, Versioned, version_of,
};

/// Every message envoy-types compiled, Envoy's admin messages included.
static DESCRIPTORS: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(&include_bytes!(env!("ENVOY_TYPES_DESCRIPTORS"))[..])
        .map_err(|e| e.to_string())
});

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("Envoy's protobuf descriptors do not load: {0}")]
    Descriptors(String),
    #[error("no descriptor for {0}")]
    UnknownMessage(String),
    #[error("decoding {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("writing {what} as JSON: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The proxy's `ConfigDump`, as Envoy's admin would write it.
pub fn config_dump(proxy: &ConnectedProxy, include_eds: bool) -> ConfigDump {
    let resources = |type_url: &'static str| {
        proxy
            .resources
            .of_type(type_url)
            .map(|(name, resource)| (name.to_string(), resource))
    };
    let version = |type_url: &str| {
        proxy
            .status
            .types
            .get(type_url)
            .and_then(|t| t.sent_version.clone())
            .unwrap_or_default()
    };
    let resource_version = |r: &Versioned| version_of(r.version);

    let mut configs = vec![pack_any(BootstrapConfigDump {
        bootstrap: Some(Bootstrap {
            node: Some(proxy.node.clone()),
            ..Default::default()
        }),
        last_updated: None,
    })];
    configs.push(pack_any(ClustersConfigDump {
        version_info: version(CLUSTER_TYPE),
        dynamic_active_clusters: resources(CLUSTER_TYPE)
            .map(|(_, r)| clusters_config_dump::DynamicCluster {
                version_info: resource_version(r),
                cluster: Some(r.any.clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }));
    if include_eds {
        // As Envoy's: every cluster's load assignment, sent by EDS or inline.
        let inline = resources(CLUSTER_TYPE).filter_map(|(_, r)| {
            let assignment = Cluster::decode(r.any.value.as_slice())
                .ok()?
                .load_assignment?;
            Some((r, pack_any(assignment)))
        });
        configs.push(pack_any(EndpointsConfigDump {
            dynamic_endpoint_configs: resources(ENDPOINT_TYPE)
                .map(|(_, r)| (r, r.any.clone()))
                .chain(inline)
                .map(
                    |(r, assignment)| endpoints_config_dump::DynamicEndpointConfig {
                        version_info: resource_version(r),
                        endpoint_config: Some(assignment),
                        ..Default::default()
                    },
                )
                .collect(),
            ..Default::default()
        }));
    }
    configs.push(pack_any(ListenersConfigDump {
        version_info: version(LISTENER_TYPE),
        dynamic_listeners: resources(LISTENER_TYPE)
            .map(|(name, r)| listeners_config_dump::DynamicListener {
                name,
                active_state: Some(listeners_config_dump::DynamicListenerState {
                    version_info: resource_version(r),
                    listener: Some(r.any.clone()),
                    last_updated: None,
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }));
    configs.push(pack_any(RoutesConfigDump {
        dynamic_route_configs: resources(ROUTE_TYPE)
            .map(|(_, r)| routes_config_dump::DynamicRouteConfig {
                version_info: resource_version(r),
                route_config: Some(r.any.clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }));
    configs.push(pack_any(SecretsConfigDump::default()));
    ConfigDump { configs }
}

/// `message` in Envoy's JSON: proto field names, enums by name, `Any` with
/// its `@type` and fields, defaults left out.
pub fn to_json<M: Message + Name>(message: &M) -> Result<Value, DumpError> {
    let pool = DESCRIPTORS
        .as_ref()
        .map_err(|e| DumpError::Descriptors(e.clone()))?;
    let name = M::full_name();
    let descriptor = pool
        .get_message_by_name(&name)
        .ok_or_else(|| DumpError::UnknownMessage(name.clone()))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()).map_err(
        |source| DumpError::Decode {
            what: name.clone(),
            source,
        },
    )?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|source| DumpError::Json { what: name, source })
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::google::protobuf::Duration;

    use super::*;
    use crate::ads::{ProxyStatus, ResourceSet, Resources};

    #[test]
    fn dump_is_envoys_json_with_every_section() {
        let mut set = ResourceSet::default();
        let cluster = Cluster {
            name: "outbound|8080||payment.ns.svc.cluster.local".into(),
            connect_timeout: Some(Duration {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        };
        set.insert(CLUSTER_TYPE, cluster.name.clone(), pack_any(cluster));
        let listener = Listener {
            name: "virtualOutbound".into(),
            ..Default::default()
        };
        set.insert(LISTENER_TYPE, listener.name.clone(), pack_any(listener));
        let resources = Resources::from(set);
        let node = Node {
            id: "sidecar~10.0.0.1~vm.ns~ns.svc.cluster.local".into(),
            ..Default::default()
        };
        let mut status = ProxyStatus {
            id: node.id.clone(),
            namespace: "ns".into(),
            connected_at: String::new(),
            types: Default::default(),
        };
        status
            .types
            .entry(CLUSTER_TYPE.to_string())
            .or_default()
            .sent_version = Some("abc".into());
        let proxy = ConnectedProxy {
            status,
            node,
            resources,
        };
        let node = &proxy.node;
        let json = to_json(&config_dump(&proxy, true)).unwrap();
        let configs = json["configs"].as_array().unwrap();
        let types: Vec<&str> = configs
            .iter()
            .map(|c| c["@type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
                "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
                "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
                "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
                "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
            ]
        );
        assert_eq!(configs[0]["bootstrap"]["node"]["id"], node.id.as_str());
        assert_eq!(configs[1]["version_info"], "abc");
        let cluster = &configs[1]["dynamic_active_clusters"][0]["cluster"];
        assert_eq!(
            cluster["@type"],
            "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        );
        assert_eq!(
            cluster["name"],
            "outbound|8080||payment.ns.svc.cluster.local"
        );
        assert_eq!(cluster["connect_timeout"], "10s");
        assert_eq!(
            configs[3]["dynamic_listeners"][0]["active_state"]["listener"]["name"],
            "virtualOutbound"
        );
        // Without include_eds, no endpoints (as Envoy's admin).
        let json = to_json(&config_dump(&proxy, false)).unwrap();
        assert!(
            json["configs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| !c["@type"].as_str().unwrap().contains("Endpoints"))
        );
    }
}
