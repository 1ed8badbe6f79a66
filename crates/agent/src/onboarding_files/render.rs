//! What the onboarding files say, computed from a WorkloadGroup and the
//! mesh's settings. No I/O: [`Onboarding`] is filled in by the command and
//! rendered here, so every rule (key names, defaults, quoting) is in one place.
//!
//! The keys are Istio's (`istioctl x workload entry configure`):
//! `mesh.yaml` is `{defaultConfig: ProxyConfig}` whose `proxyMetadata`
//! carries the workload's identity and placement; `cluster.env` holds the
//! same keys plus the capture settings, as sorted `KEY='value'` lines.
//! Reading them back is [`super::Installed`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::{Map, Value};

use super::keys;
use crate::capture::config::{
    DEFAULT_EXCLUDE_INBOUND_PORTS, ENV_INBOUND_PORTS, ENV_LOCAL_EXCLUDE_PORTS, ENV_SERVICE_CIDR,
    SSH_PORT,
};

/// The control plane's namespace; istiod's name lives in it.
const ISTIOD_NAMESPACE: &str = "istio-system";
/// xDS and CA over TLS.
pub const XDS_PORT: u16 = 15012;
/// `--clusterID` when neither the flag nor the mesh configuration names one (Istio's default).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// [`vmesh_ca::ISTIOD_SERVICE_NAME`] (`istiod.istio-system.svc`), or
/// `istiod-<rev>.istio-system.svc` for a revision.
pub fn istiod_host(revision: Option<&str>) -> String {
    match revision.filter(|r| !r.is_empty() && *r != "default") {
        Some(rev) => format!("istiod-{rev}.{ISTIOD_NAMESPACE}.svc"),
        None => vmesh_ca::ISTIOD_SERVICE_NAME.to_string(),
    }
}

/// `host:port` with the default port when `address` has none (IPv6 in brackets).
pub fn with_port(address: &str) -> String {
    let has_port = match address.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    if has_port {
        address.to_string()
    } else if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]:{XDS_PORT}")
    } else {
        format!("{address}:{XDS_PORT}")
    }
}

/// The host part of `host:port`, without IPv6 brackets.
pub fn host_of(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Everything the onboarding files are made from.
#[derive(Debug, Clone, Default)]
pub struct Onboarding {
    /// The WorkloadGroup's name (the workload name of every VM in it).
    pub group: String,
    pub namespace: String,
    pub service_account: String,
    /// Group metadata labels, then template labels over them.
    pub labels: BTreeMap<String, String>,
    /// The template's ports, name → port.
    pub ports: BTreeMap<String, u32>,
    pub network: String,
    pub cluster_id: String,
    pub mesh_id: String,
    pub trust_domain: String,
    /// `host:15012` the agent dials for xDS and certificates.
    pub discovery_address: String,
    pub autoregister: bool,
    pub dns_capture: bool,
    /// The group's readiness probe, as the API serves it.
    pub probe: Option<Value>,
    /// The mesh's `defaultConfig` (and the group's `proxy.istio.io/config`),
    /// before the keys computed here are set.
    pub proxy_config: Map<String, Value>,
    /// The gateway address `hosts` maps the discovery host to.
    pub ingress_ip: Option<IpAddr>,
    /// The VM's own address, when given (`--internalIP`, `--externalIP`).
    pub workload_ip: Option<WorkloadIp>,
}

/// The address the VM is reached at, as istioctl's flags give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadIp {
    /// `--internalIP`: an address of the VM itself.
    Internal(IpAddr),
    /// `--externalIP`: an address in front of the VM (NAT): the agent
    /// announces it, and probes stay on localhost, where vmesh's probes go
    /// anyway.
    External(IpAddr),
}

impl Onboarding {
    /// `CANONICAL_SERVICE` and `CANONICAL_REVISION`, from the labels as Istio
    /// reads them for pods, else the group's name and `latest`.
    pub fn canonical(&self) -> (String, String) {
        let first = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| self.labels.get(*k).filter(|v| !v.is_empty()).cloned())
        };
        (
            first(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| self.group.clone()),
            first(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
        )
    }

    /// `defaultConfig.proxyMetadata`: the mesh's own entries, then ours over them.
    pub fn proxy_metadata(&self) -> BTreeMap<String, String> {
        let mut md: BTreeMap<String, String> = self
            .proxy_config
            .get("proxyMetadata")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect();
        let (service, revision) = self.canonical();
        let labels = serde_json::to_string(&self.labels).unwrap_or_else(|_| "{}".into());
        for (key, value) in [
            ("CANONICAL_SERVICE", service),
            ("CANONICAL_REVISION", revision),
            (keys::POD_NAMESPACE, self.namespace.clone()),
            (keys::SERVICE_ACCOUNT, self.service_account.clone()),
            (keys::TRUST_DOMAIN, self.trust_domain.clone()),
            ("ISTIO_META_CLUSTER_ID", self.cluster_id.clone()),
            ("ISTIO_META_MESH_ID", self.mesh_id.clone()),
            ("ISTIO_META_NETWORK", self.network.clone()),
            ("ISTIO_META_WORKLOAD_NAME", self.group.clone()),
            (keys::LABELS, labels),
            (keys::DNS_CAPTURE, self.dns_capture.to_string()),
        ] {
            md.insert(key.into(), value);
        }
        if self.autoregister {
            md.insert("ISTIO_META_AUTO_REGISTER_GROUP".into(), self.group.clone());
        } else {
            md.remove("ISTIO_META_AUTO_REGISTER_GROUP");
        }
        md
    }

    /// `ISTIO_INBOUND_PORTS`: the template's ports in order, or `*` (everything).
    fn inbound_ports(&self) -> String {
        let ports: BTreeSet<u32> = self.ports.values().copied().collect();
        if ports.is_empty() {
            "*".into()
        } else {
            join(ports)
        }
    }

    /// `ISTIO_LOCAL_EXCLUDE_PORTS`: ours, plus any the mesh's metadata adds.
    fn local_exclude_ports(&self, md: &BTreeMap<String, String>) -> String {
        let mut ports: Vec<String> = [SSH_PORT]
            .iter()
            .chain(&DEFAULT_EXCLUDE_INBOUND_PORTS)
            .map(u16::to_string)
            .collect();
        for extra in md
            .get(ENV_LOCAL_EXCLUDE_PORTS)
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            if !ports.iter().any(|p| p == extra) {
                ports.push(extra.to_string());
            }
        }
        ports.join(",")
    }

    /// `cluster.env`: the metadata keys plus the capture settings and the
    /// control plane's address, sorted, one `KEY='value'` a line.
    pub fn cluster_env(&self) -> String {
        let mut env = self.proxy_metadata();
        let exclude = self.local_exclude_ports(&env);
        for (key, value) in [
            (ENV_INBOUND_PORTS, self.inbound_ports()),
            ("ISTIO_NAMESPACE", self.namespace.clone()),
            (
                "ISTIO_SERVICE",
                format!("{}.{}", self.group, self.namespace),
            ),
            (ENV_SERVICE_CIDR, "*".into()),
            (ENV_LOCAL_EXCLUDE_PORTS, exclude),
            (keys::PILOT_ADDRESS, self.discovery_address.clone()),
            (keys::CA_ADDR, self.discovery_address.clone()),
        ] {
            env.insert(key.into(), value);
        }
        // Not proxy metadata: istioctl writes these into cluster.env alone.
        match self.workload_ip {
            Some(WorkloadIp::Internal(ip)) => {
                env.insert(keys::SVC_IP.into(), ip.to_string());
            }
            Some(WorkloadIp::External(ip)) => {
                env.insert(keys::SVC_IP.into(), ip.to_string());
                env.insert(
                    "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION".into(),
                    "true".into(),
                );
            }
            None => {}
        }
        env.iter()
            .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
            .collect()
    }

    /// `holdApplicationUntilProxyStarts` of the proxy config (the mesh's
    /// `defaultConfig`, then the group's `proxy.istio.io/config`).
    pub fn hold_application(&self) -> bool {
        self.proxy_config
            .get("holdApplicationUntilProxyStarts")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// `mesh.yaml`: `{defaultConfig: ProxyConfig}`, keys sorted.
    pub fn mesh_yaml(&self) -> Result<String, serde_saphyr::SerializeError> {
        let mut config: BTreeMap<String, Value> = self
            .proxy_config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        config.insert(
            "discoveryAddress".into(),
            Value::String(self.discovery_address.clone()),
        );
        if !self.mesh_id.is_empty() {
            config.insert("meshId".into(), Value::String(self.mesh_id.clone()));
        }
        config.insert(
            "proxyMetadata".into(),
            Value::Object(
                self.proxy_metadata()
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect(),
            ),
        );
        if let Some(probe) = &self.probe {
            config.insert("readinessProbe".into(), probe.clone());
        }
        let mut root = BTreeMap::new();
        root.insert("defaultConfig", config);
        serde_saphyr::to_string(&root)
    }

    /// `hosts`: the gateway address for the discovery host, or nothing when
    /// there is no --ingressIP (or the address is itself an IP).
    pub fn hosts(&self) -> String {
        let host = host_of(&self.discovery_address);
        match self.ingress_ip {
            Some(ip) if host.parse::<IpAddr>().is_err() => format!("{ip} {host}\n"),
            _ => String::new(),
        }
    }
}

fn join(ports: impl IntoIterator<Item = u32>) -> String {
    ports
        .into_iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `'value'`, a `'` inside written `'\''` as a POSIX shell reads it.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn payment() -> Onboarding {
        Onboarding {
            group: "payment-service".into(),
            namespace: "vm-workloads".into(),
            service_account: "payment-service-sa".into(),
            labels: BTreeMap::from([
                ("app".into(), "payment-service".into()),
                ("version".into(), "v1".into()),
            ]),
            ports: BTreeMap::from([("http".into(), 8080), ("grpc".into(), 9090)]),
            network: "network1".into(),
            cluster_id: DEFAULT_CLUSTER_ID.into(),
            mesh_id: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            discovery_address: format!("{}:{XDS_PORT}", istiod_host(None)),
            dns_capture: true,
            ingress_ip: Some("192.0.2.10".parse().unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn cluster_env_is_sorted_quoted_and_complete() {
        let env = payment().cluster_env();
        let keys: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for line in [
            "CANONICAL_SERVICE='payment-service'",
            "CANONICAL_REVISION='v1'",
            "ISTIO_INBOUND_PORTS='8080,9090'",
            "ISTIO_LOCAL_EXCLUDE_PORTS='22,15090,15021,15020'",
            "ISTIO_SERVICE='payment-service.vm-workloads'",
            "ISTIO_SERVICE_CIDR='*'",
            r#"ISTIO_METAJSON_LABELS='{"app":"payment-service","version":"v1"}'"#,
            "ISTIO_META_DNS_CAPTURE='true'",
            "PILOT_ADDRESS='istiod.istio-system.svc:15012'",
            "CA_ADDR='istiod.istio-system.svc:15012'",
        ] {
            assert!(env.lines().any(|l| l == line), "{line} missing from\n{env}");
        }
        assert!(!env.contains("ISTIO_META_AUTO_REGISTER_GROUP"));
    }

    #[test]
    fn mesh_metadata_is_kept_under_ours_and_excludes_add_up() {
        let mut o = payment();
        o.autoregister = true;
        o.proxy_config = json!({
            "proxyMetadata": {"ISTIO_META_DNS_AUTO_ALLOCATE": "true", "ISTIO_LOCAL_EXCLUDE_PORTS": "15020,9000", "POD_NAMESPACE": "wrong"},
            "concurrency": 2,
        })
        .as_object()
        .unwrap()
        .clone();
        let md = o.proxy_metadata();
        assert_eq!(md["ISTIO_META_DNS_AUTO_ALLOCATE"], "true");
        assert_eq!(md["POD_NAMESPACE"], "vm-workloads");
        assert_eq!(md["ISTIO_META_AUTO_REGISTER_GROUP"], "payment-service");
        assert!(
            o.cluster_env()
                .contains("ISTIO_LOCAL_EXCLUDE_PORTS='22,15090,15021,15020,9000'\n")
        );
        let yaml = o.mesh_yaml().unwrap();
        let back: Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back["defaultConfig"]["concurrency"], 2);
        assert_eq!(
            back["defaultConfig"]["proxyMetadata"]["ISTIO_META_DNS_CAPTURE"],
            "true"
        );
        assert_eq!(
            back["defaultConfig"]["discoveryAddress"],
            "istiod.istio-system.svc:15012"
        );
    }

    #[test]
    fn workload_addresses_go_to_cluster_env_only() {
        let mut o = payment();
        o.workload_ip = Some(WorkloadIp::Internal("10.1.2.3".parse().unwrap()));
        let env = o.cluster_env();
        assert!(env.contains("ISTIO_SVC_IP='10.1.2.3'\n"), "{env}");
        assert!(!env.contains("REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"));
        assert!(!o.mesh_yaml().unwrap().contains("ISTIO_SVC_IP"));
        o.workload_ip = Some(WorkloadIp::External("203.0.113.7".parse().unwrap()));
        let env = o.cluster_env();
        assert!(env.contains("ISTIO_SVC_IP='203.0.113.7'\n"), "{env}");
        assert!(env.contains("REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION='true'\n"));
    }

    #[test]
    fn hold_application_comes_from_the_proxy_config() {
        let mut o = payment();
        assert!(!o.hold_application());
        o.proxy_config = json!({"holdApplicationUntilProxyStarts": true})
            .as_object()
            .unwrap()
            .clone();
        assert!(o.hold_application());
    }

    #[test]
    fn quotes_survive_a_posix_shell() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn addresses_and_hosts() {
        assert_eq!(with_port("gw.example.com"), "gw.example.com:15012");
        assert_eq!(with_port("gw.example.com:443"), "gw.example.com:443");
        assert_eq!(with_port("2001:db8::1"), "[2001:db8::1]:15012");
        assert_eq!(host_of("[2001:db8::1]:15012"), "2001:db8::1");
        assert_eq!(
            istiod_host(Some("canary")),
            "istiod-canary.istio-system.svc"
        );
        assert_eq!(payment().hosts(), "192.0.2.10 istiod.istio-system.svc\n");
        let mut by_name = payment();
        by_name.ingress_ip = None;
        by_name.discovery_address = "gw.example.com:15012".into();
        assert_eq!(by_name.hosts(), "");
    }

    #[test]
    fn canonical_names_fall_back_to_the_group() {
        let mut o = payment();
        o.labels.clear();
        assert_eq!(o.canonical(), ("payment-service".into(), "latest".into()));
        assert!(o.cluster_env().contains("ISTIO_INBOUND_PORTS='8080,9090'"));
        o.ports.clear();
        assert!(o.cluster_env().contains("ISTIO_INBOUND_PORTS='*'"));
    }
}
