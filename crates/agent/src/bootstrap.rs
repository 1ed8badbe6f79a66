//! Envoy's bootstrap for a sidecar, the way Istio writes it: who the proxy
//! is (node id `sidecar~<ip>~<name>.<ns>~<ns>.svc.cluster.local`, metadata,
//! locality), ADS over the agent's Unix socket, SDS over the agent's other
//! socket (cluster `sds-grpc`, which the control plane's TLS contexts name),
//! admin on loopback, Prometheus stats on 15090 and readiness on 15021.
//!
//! `/healthz/ready` on the readiness port is answered by Envoy itself: it
//! is routed to the admin interface's `/ready`, which is 200 once Envoy has
//! its initial configuration (LIVE) and 503 before.
//!
//! This module only renders JSON; writing the file and starting Envoy are
//! the caller's.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, ApiVersion, ConfigSource, GrpcService, api_config_source::ApiType,
    config_source::ConfigSourceSpecifier, grpc_service::EnvoyGrpc, grpc_service::TargetSpecifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The static cluster carrying ADS to the agent.
pub const XDS_CLUSTER: &str = "xds-grpc";
/// The static cluster carrying SDS to the agent; TLS contexts from the
/// control plane name it in their `sds_config`.
pub const SDS_CLUSTER: &str = "sds-grpc";
/// The static cluster pointing at Envoy's own admin interface.
pub const ADMIN_CLUSTER: &str = "prometheus_stats";
/// What `ISTIO_VERSION` says in the node metadata: the Istio release whose
/// protocols vmesh speaks.
pub const ISTIO_VERSION: &str = "1.27.0";

/// Why a bootstrap could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{name}: not valid JSON: {source}")]
    MetaJson {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// How Envoy speaks ADS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AdsApiType {
    /// State of the world.
    #[serde(rename = "GRPC")]
    Grpc,
    /// Incremental.
    #[default]
    #[serde(rename = "DELTA_GRPC")]
    DeltaGrpc,
}

impl AdsApiType {
    pub fn as_str(self) -> &'static str {
        match self {
            AdsApiType::Grpc => "GRPC",
            AdsApiType::DeltaGrpc => "DELTA_GRPC",
        }
    }
}

/// Where the workload runs, for locality-aware load balancing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

impl Locality {
    /// Istio's `region/zone/subzone` form (trailing parts optional).
    pub fn parse(s: &str) -> Locality {
        let mut parts = s.splitn(3, '/').map(str::to_owned);
        Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            sub_zone: parts.next().unwrap_or_default(),
        }
    }
}

/// Everything the bootstrap says. [`Bootstrap::new`] fills Istio's
/// defaults; set the rest field by field.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bootstrap {
    /// The workload's address: the node id's IP and `INSTANCE_IPS`.
    pub ip: IpAddr,
    /// The proxy's name (a VM's host name), the `<name>` of `<name>.<ns>`.
    pub name: String,
    pub namespace: String,
    /// The cluster DNS domain (`cluster.local`).
    pub dns_domain: String,
    pub service_account: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub network: Option<String>,
    /// The WorkloadEntry / group name (`WORKLOAD_NAME`).
    pub workload_name: Option<String>,
    pub cluster_id: Option<String>,
    pub mesh_id: Option<String>,
    pub locality: Option<Locality>,
    /// Envoy's service cluster; `<canonical service>.<ns>` when `None`,
    /// the canonical service being the `service.istio.io/canonical-name`
    /// label, else `app`, else the name.
    pub service_cluster: Option<String>,
    /// More metadata, e.g. from `ISTIO_META_*` (see [`metadata_from_env`]);
    /// these win over the fields above.
    pub extra_metadata: BTreeMap<String, Value>,
    pub api_type: AdsApiType,
    pub xds_socket: PathBuf,
    pub sds_socket: PathBuf,
    /// Envoy's admin interface (`127.0.0.1:15000`).
    pub admin: SocketAddr,
    /// Where the stats and readiness listeners listen (`0.0.0.0`).
    pub listen_address: IpAddr,
    /// Prometheus stats (`15090`, path `/stats/prometheus`).
    pub stats_port: u16,
    /// Readiness (`15021`, path `/healthz/ready`).
    pub readiness_port: u16,
}

impl Bootstrap {
    pub fn new(
        ip: IpAddr,
        name: impl Into<String>,
        namespace: impl Into<String>,
        xds_socket: impl Into<PathBuf>,
        sds_socket: impl Into<PathBuf>,
    ) -> Bootstrap {
        Bootstrap {
            ip,
            name: name.into(),
            namespace: namespace.into(),
            dns_domain: "cluster.local".into(),
            service_account: None,
            labels: BTreeMap::new(),
            network: None,
            workload_name: None,
            cluster_id: None,
            mesh_id: None,
            locality: None,
            service_cluster: None,
            extra_metadata: BTreeMap::new(),
            api_type: AdsApiType::default(),
            xds_socket: xds_socket.into(),
            sds_socket: sds_socket.into(),
            admin: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15000),
            listen_address: Ipv4Addr::UNSPECIFIED.into(),
            stats_port: 15090,
            readiness_port: 15021,
        }
    }

    /// `sidecar~<ip>~<name>.<ns>~<ns>.svc.<domain>`.
    pub fn node_id(&self) -> String {
        format!(
            "sidecar~{}~{}.{}~{}.svc.{}",
            self.ip, self.name, self.namespace, self.namespace, self.dns_domain
        )
    }

    /// Envoy's `node.cluster`.
    pub fn service_cluster(&self) -> String {
        if let Some(cluster) = &self.service_cluster {
            return cluster.clone();
        }
        let service = self
            .labels
            .get("service.istio.io/canonical-name")
            .or_else(|| self.labels.get("app"))
            .unwrap_or(&self.name);
        format!("{service}.{}", self.namespace)
    }

    /// The workload as Istio's metrics name it: the `WORKLOAD_NAME` and
    /// `CLUSTER_ID` metadata win over the fields, as they do in
    /// [`metadata`](Self::metadata).
    pub fn workload_attributes(&self) -> vmesh_api::peer::WorkloadAttributes {
        let metadata = self.metadata();
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        vmesh_api::peer::WorkloadAttributes {
            workload: text("WORKLOAD_NAME").unwrap_or_else(|| self.name.clone()),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            cluster: text("CLUSTER_ID").unwrap_or_default(),
        }
    }

    /// Envoy's environment: the workload's attributes, which its
    /// configuration reads with `%ENVIRONMENT(…)%` to tell peers who is
    /// calling, and the service name OpenTelemetry spans carry.
    pub fn envoy_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vmesh_api::peer::env_for(&self.workload_attributes())
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        env.push((
            "OTEL_RESOURCE_ATTRIBUTES".into(),
            format!("service.name={}", self.service_cluster()),
        ));
        env
    }

    /// The proxy's own workload as its metrics name it, for the agent to
    /// fill into Istio's metrics (`vmesh_api::peer::OWN_VALUE`).
    pub fn own_workload(&self, principal: &str) -> vmesh_api::peer::OwnWorkload {
        vmesh_api::peer::OwnWorkload {
            attributes: self.workload_attributes().encode(),
            principal: principal.to_string(),
        }
    }

    /// The node metadata.
    pub fn metadata(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<&String>| {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                m.insert(k.to_owned(), Value::String(v.clone()));
            }
        };
        put("NAME", Some(&self.name));
        put("NAMESPACE", Some(&self.namespace));
        put("SERVICE_ACCOUNT", self.service_account.as_ref());
        put("NETWORK", self.network.as_ref());
        put("WORKLOAD_NAME", self.workload_name.as_ref());
        put("CLUSTER_ID", self.cluster_id.as_ref());
        put("MESH_ID", self.mesh_id.as_ref());
        put("ISTIO_VERSION", Some(&ISTIO_VERSION.to_owned()));
        put("INSTANCE_IPS", Some(&self.ip.to_string()));
        m.insert("LABELS".into(), json!(self.labels));
        m.insert(
            "VMESH_AGENT_VERSION".into(),
            json!(env!("CARGO_PKG_VERSION")),
        );
        for (k, v) in &self.extra_metadata {
            m.insert(k.clone(), v.clone());
        }
        m
    }

    /// The bootstrap as JSON.
    pub fn to_json(&self) -> Value {
        let mut node = json!({
            "id": self.node_id(),
            "cluster": self.service_cluster(),
            "metadata": self.metadata(),
        });
        if let Some(l) = &self.locality {
            let mut locality = Map::new();
            for (k, v) in [
                ("region", &l.region),
                ("zone", &l.zone),
                ("sub_zone", &l.sub_zone),
            ] {
                if !v.is_empty() {
                    locality.insert(k.into(), json!(v));
                }
            }
            node["locality"] = Value::Object(locality);
        }
        let ads_source =
            json!({"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"});
        // Istio's size metrics count bytes, not milliseconds: powers of ten.
        let byte_buckets = json!([1, 10, 100, 1000, 10000, 100000, 1000000, 10000000]);
        let bucket_settings: Vec<Value> = ["istio.request_bytes", "istio.response_bytes"]
            .iter()
            .map(|name| json!({"match": {"prefix": name}, "buckets": byte_buckets}))
            .collect();
        json!({
            "node": node,
            "stats_config": {"histogram_bucket_settings": bucket_settings},
            "admin": {
                "address": socket_address(self.admin.ip(), self.admin.port()),
            },
            "dynamic_resources": {
                "ads_config": {
                    "api_type": self.api_type.as_str(),
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                },
                "cds_config": ads_source,
                "lds_config": ads_source,
            },
            "static_resources": {
                "clusters": [
                    {
                        "name": ADMIN_CLUSTER,
                        "type": "STATIC",
                        "connect_timeout": "0.250s",
                        "load_assignment": endpoints(ADMIN_CLUSTER, socket_address(self.admin.ip(), self.admin.port())),
                    },
                    grpc_cluster(XDS_CLUSTER, &self.xds_socket),
                    grpc_cluster(SDS_CLUSTER, &self.sds_socket),
                ],
                "listeners": [
                    http_listener("prometheus_stats", self.listen_address, self.stats_port, json!({
                        "match": {"prefix": "/stats/prometheus"},
                        "route": {"cluster": ADMIN_CLUSTER},
                    })),
                    http_listener("readiness", self.listen_address, self.readiness_port, json!({
                        "match": {"prefix": "/healthz/ready"},
                        "route": {"cluster": ADMIN_CLUSTER, "prefix_rewrite": "/ready"},
                    })),
                ],
            },
        })
    }

    /// The bootstrap as pretty JSON text, ready for `envoy -c`.
    pub fn render(&self) -> String {
        serde_json::to_string_pretty(&self.to_json()).expect("JSON values serialise")
    }
}

fn socket_address(ip: IpAddr, port: u16) -> Value {
    json!({"socket_address": {"address": ip.to_string(), "port_value": port}})
}

fn endpoints(cluster: &str, address: Value) -> Value {
    json!({
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    })
}

/// A static HTTP/2 cluster to one of the agent's Unix sockets.
fn grpc_cluster(name: &str, socket: &std::path::Path) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": endpoints(name, json!({"pipe": {"path": socket.to_string_lossy()}})),
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": 100000, "max_pending_requests": 100000,
            "max_requests": 100000, "max_retries": 3,
        }]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
    })
}

/// A static listener answering one route.
fn http_listener(name: &str, ip: IpAddr, port: u16, route: Value) -> Value {
    json!({
        "name": name,
        "address": socket_address(ip, port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "codec_type": "AUTO",
                "stat_prefix": name,
                "route_config": {"virtual_hosts": [{
                    "name": "backend",
                    "domains": ["*"],
                    "routes": [route],
                }]},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }],
            },
        }]}],
    })
}

/// Node metadata from environment-style pairs, as istio-agent reads them:
/// `ISTIO_META_<KEY>=v` gives `KEY: "v"`, `ISTIO_METAJSON_<KEY>=<json>`
/// gives `KEY: <json>`; other names are ignored.
pub fn metadata_from_env<K: AsRef<str>, V: AsRef<str>>(
    vars: impl IntoIterator<Item = (K, V)>,
) -> Result<BTreeMap<String, Value>, BootstrapError> {
    let mut out = BTreeMap::new();
    for (name, value) in vars {
        let (name, value) = (name.as_ref(), value.as_ref());
        if let Some(key) = name.strip_prefix("ISTIO_METAJSON_") {
            let parsed =
                serde_json::from_str(value).map_err(|source| BootstrapError::MetaJson {
                    name: name.to_owned(),
                    source,
                })?;
            out.insert(key.to_owned(), parsed);
        } else if let Some(key) = name.strip_prefix("ISTIO_META_") {
            out.insert(key.to_owned(), Value::String(value.to_owned()));
        }
    }
    Ok(out)
}

/// How the control plane's TLS contexts should refer to a secret of this
/// agent: `name` (`default` or `ROOTCA`) over SDS cluster `sds-grpc`, the
/// way Istio's generated configuration does.
pub fn sds_secret_config(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_owned(),
        sds_config: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    set_node_on_first_message_only: true,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
                            cluster_name: SDS_CLUSTER.to_owned(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap() -> Bootstrap {
        let mut b = Bootstrap::new(
            "10.0.0.5".parse().unwrap(),
            "payment-vm1",
            "vm-workloads",
            "/run/vmesh/xds.sock",
            "/run/vmesh/sds.sock",
        );
        b.service_account = Some("payment-service-sa".into());
        b.labels = [
            ("app".to_string(), "payment-service".to_string()),
            ("version".into(), "v1".into()),
        ]
        .into();
        b.network = Some("vm-network".into());
        b.workload_name = Some("payment-group".into());
        b.cluster_id = Some("Kubernetes".into());
        b.mesh_id = Some("mesh1".into());
        b.locality = Some(Locality::parse("us-west1/zone-a"));
        b
    }

    #[test]
    fn node_identity_and_metadata_like_istio() {
        let b = bootstrap();
        let v = b.to_json();
        assert_eq!(
            v["node"]["id"],
            "sidecar~10.0.0.5~payment-vm1.vm-workloads~vm-workloads.svc.cluster.local"
        );
        assert_eq!(v["node"]["cluster"], "payment-service.vm-workloads");
        assert_eq!(
            v["node"]["locality"],
            json!({"region": "us-west1", "zone": "zone-a"})
        );
        let md = &v["node"]["metadata"];
        assert_eq!(md["NAMESPACE"], "vm-workloads");
        assert_eq!(md["SERVICE_ACCOUNT"], "payment-service-sa");
        assert_eq!(
            md["LABELS"],
            json!({"app": "payment-service", "version": "v1"})
        );
        assert_eq!(md["NETWORK"], "vm-network");
        assert_eq!(md["WORKLOAD_NAME"], "payment-group");
        assert_eq!(md["CLUSTER_ID"], "Kubernetes");
        assert_eq!(md["MESH_ID"], "mesh1");
        assert_eq!(md["ISTIO_VERSION"], ISTIO_VERSION);
        assert_eq!(md["INSTANCE_IPS"], "10.0.0.5");

        let mut plain = Bootstrap::new(
            "127.0.0.9".parse().unwrap(),
            "frontend",
            "vm-workloads",
            "x",
            "s",
        );
        assert_eq!(
            plain.service_cluster(),
            "frontend.vm-workloads",
            "the Envoy test's naming"
        );
        plain.network = Some(String::new());
        let md = plain.metadata();
        assert!(
            !md.contains_key("NETWORK") && !md.contains_key("SERVICE_ACCOUNT"),
            "empty and unset fields are left out"
        );
        assert!(plain.to_json()["node"].get("locality").is_none());
    }

    /// JSON to protobuf `Value`, to hand the node to the server's parser.
    fn pb_value(v: &Value) -> envoy_types::pb::google::protobuf::Value {
        use envoy_types::pb::google::protobuf::{ListValue, Struct, value::Kind};
        let kind = match v {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Array(a) => Kind::ListValue(ListValue {
                values: a.iter().map(pb_value).collect(),
            }),
            Value::Object(o) => Kind::StructValue(Struct {
                fields: o.iter().map(|(k, v)| (k.clone(), pb_value(v))).collect(),
            }),
        };
        envoy_types::pb::google::protobuf::Value { kind: Some(kind) }
    }

    #[test]
    fn the_server_reads_the_node_as_written() {
        use envoy_types::pb::envoy::config::core::v3::{Locality as PbLocality, Node};
        use envoy_types::pb::google::protobuf::value::Kind;
        let b = bootstrap();
        let v = b.to_json();
        let Some(Kind::StructValue(metadata)) = pb_value(&v["node"]["metadata"]).kind else {
            panic!("metadata is an object");
        };
        let node = Node {
            id: v["node"]["id"].as_str().unwrap().to_owned(),
            cluster: v["node"]["cluster"].as_str().unwrap().to_owned(),
            metadata: Some(metadata),
            locality: Some(PbLocality {
                region: v["node"]["locality"]["region"].as_str().unwrap().to_owned(),
                zone: v["node"]["locality"]["zone"].as_str().unwrap().to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let proxy = vmesh_xds::node::Proxy::from_node(Some(&node)).unwrap();
        assert_eq!(proxy.ip, b.ip);
        assert_eq!(proxy.name, "payment-vm1");
        assert_eq!(proxy.namespace, "vm-workloads");
        assert_eq!(proxy.service_account.as_deref(), Some("payment-service-sa"));
        assert_eq!(proxy.labels, b.labels);
        assert_eq!(proxy.network.as_deref(), Some("vm-network"));
        assert_eq!(proxy.workload_name.as_deref(), Some("payment-group"));
        assert_eq!(proxy.cluster_id.as_deref(), Some("Kubernetes"));
        assert_eq!(proxy.locality.as_deref(), Some("us-west1/zone-a"));
    }

    #[test]
    fn ads_and_sds_go_to_the_agent_sockets() {
        let mut b = bootstrap();
        let v = b.to_json();
        let ads = &v["dynamic_resources"]["ads_config"];
        assert_eq!(ads["api_type"], "DELTA_GRPC", "delta by default");
        assert_eq!(ads["transport_api_version"], "V3");
        assert_eq!(
            ads["grpc_services"][0]["envoy_grpc"]["cluster_name"],
            XDS_CLUSTER
        );
        for kind in ["cds_config", "lds_config"] {
            assert_eq!(v["dynamic_resources"][kind]["ads"], json!({}));
        }
        let clusters = v["static_resources"]["clusters"].as_array().unwrap();
        let cluster = |name: &str| clusters.iter().find(|c| c["name"] == name).unwrap().clone();
        let pipe = |name: &str| {
            cluster(name)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"].clone()
        };
        assert_eq!(pipe(XDS_CLUSTER), "/run/vmesh/xds.sock");
        assert_eq!(pipe(SDS_CLUSTER), "/run/vmesh/sds.sock");
        for name in [XDS_CLUSTER, SDS_CLUSTER] {
            assert!(cluster(name)["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]["http2_protocol_options"].is_object(), "{name} speaks HTTP/2");
        }
        assert_eq!(
            v["admin"]["address"]["socket_address"],
            json!({"address": "127.0.0.1", "port_value": 15000})
        );

        b.api_type = AdsApiType::Grpc;
        b.admin = "127.0.0.1:19000".parse().unwrap();
        let v = b.to_json();
        assert_eq!(v["dynamic_resources"]["ads_config"]["api_type"], "GRPC");
        assert_eq!(v["admin"]["address"]["socket_address"]["port_value"], 19000);
        let admin = &cluster(ADMIN_CLUSTER);
        assert_eq!(
            admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                ["port_value"],
            15000,
            "the earlier render"
        );
        let clusters = v["static_resources"]["clusters"].as_array().unwrap();
        let admin = clusters
            .iter()
            .find(|c| c["name"] == ADMIN_CLUSTER)
            .unwrap();
        assert_eq!(
            admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                ["port_value"],
            19000,
            "stats and readiness follow the admin port"
        );
    }

    #[test]
    fn stats_and_readiness_listeners_like_istio() {
        let v = bootstrap().to_json();
        let listeners = v["static_resources"]["listeners"].as_array().unwrap();
        let find = |port: u64| {
            listeners
                .iter()
                .find(|l| l["address"]["socket_address"]["port_value"] == port)
                .unwrap_or_else(|| panic!("a listener on {port}"))
        };
        let route = |l: &Value| {
            l["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
                ["routes"][0]
                .clone()
        };
        let stats = route(find(15090));
        assert_eq!(stats["match"]["prefix"], "/stats/prometheus");
        assert_eq!(stats["route"]["cluster"], ADMIN_CLUSTER);
        let ready = route(find(15021));
        assert_eq!(ready["match"]["prefix"], "/healthz/ready");
        assert_eq!(ready["route"]["prefix_rewrite"], "/ready");
        assert_eq!(
            find(15090)["address"]["socket_address"]["address"],
            "0.0.0.0"
        );
    }

    #[test]
    fn istio_meta_environment_becomes_metadata_and_wins() {
        let extra = metadata_from_env([
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_META_NETWORK", "override"),
            ("ISTIO_METAJSON_ANNOTATIONS", r#"{"a":"b"}"#),
            ("PATH", "/bin"),
        ])
        .unwrap();
        assert_eq!(extra.len(), 3);
        let mut b = bootstrap();
        b.extra_metadata = extra;
        let md = b.metadata();
        assert_eq!(md["DNS_CAPTURE"], "true");
        assert_eq!(md["NETWORK"], "override");
        assert_eq!(md["ANNOTATIONS"], json!({"a": "b"}));
        assert!(matches!(
            metadata_from_env([("ISTIO_METAJSON_LABELS", "{nope")]),
            Err(BootstrapError::MetaJson { .. })
        ));
        // Round trip through the rendered text.
        let text = b.render();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b.to_json());
    }

    #[test]
    fn secret_references_use_the_sds_cluster() {
        let config = sds_secret_config("ROOTCA");
        assert_eq!(config.name, "ROOTCA");
        let Some(ConfigSourceSpecifier::ApiConfigSource(api)) =
            config.sds_config.unwrap().config_source_specifier
        else {
            panic!("an API config source");
        };
        assert_eq!(api.api_type, ApiType::Grpc as i32);
        let Some(TargetSpecifier::EnvoyGrpc(grpc)) = &api.grpc_services[0].target_specifier else {
            panic!("envoy_grpc");
        };
        assert_eq!(grpc.cluster_name, SDS_CLUSTER);
    }
}
