//! The workload a VM's agent runs for, resolved from what the operator said
//! (flags, [`WorkloadOptions`]) over what the onboarding files say
//! ([`crate::onboarding_files`], read under `--root`): its identity, the
//! control plane's address, its IP and name, labels, readiness probe and
//! DNS settings. From a resolved [`Workload`] come the agent's
//! configuration ([`Workload::agent_config`]), Envoy's bootstrap
//! ([`Workload::bootstrap`]) and the capture rules
//! ([`Workload::capture_config`]).
//!
//! This module also lays out the agent's work directory ([`CERT_DIR`],
//! [`SOCKET_DIR`], …) and finds the workload's IP: the local address that
//! reaches the control plane ([`address_towards`]).
//!
//! It does not run anything (the agent is [`crate::agent`], Envoy is
//! [`crate::envoy`]) nor parse the command line.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use vmesh_api::kinds::workload_group::ReadinessProbe;
use vmesh_ca::SpiffeId;

use crate::agent::{AgentConfig, AgentHandle};
use crate::bootstrap::{AdsApiType, Bootstrap, BootstrapError, Locality, metadata_from_env};
use crate::capture::{CaptureConfig, ConfigError, DnsCapture};
use crate::dns::{DnsConfig, ResolvConf};
use crate::onboarding_files::{FilesError, Installed, istiod_host, keys, with_port};

/// The workload's key and certificate, under the work directory.
pub const CERT_DIR: &str = "certs";
/// Envoy's xDS and SDS sockets, under the work directory.
pub const SOCKET_DIR: &str = "run";
/// The last DNS name table, under the work directory.
pub const NAME_TABLE_FILE: &str = "name-table.pb";
/// Envoy's bootstrap, under the work directory.
pub const BOOTSTRAP_FILE: &str = "envoy.json";

/// Why the workload could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error("no {what}: give --{flag} or onboarding files with {key}")]
    Missing {
        what: &'static str,
        flag: &'static str,
        key: &'static str,
    },
    #[error("{}", keys::LABELS)]
    Labels(#[source] serde_json::Error),
    #[error("the workload's identity")]
    Identity(#[source] vmesh_ca::IdentityError),
    #[error("resolving {server} (give --ip)")]
    Resolve {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{server} has no address (give --ip)")]
    NoAddress { server: String },
    #[error("cluster.env's {key} {value:?} is not an IP address", key = keys::SVC_IP)]
    SvcIp { value: String },
    #[error("finding the local address towards {server}")]
    LocalAddress {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the host name (give --name)")]
    HostName(#[source] std::io::Error),
    #[error("{} lists no nameserver for the DNS proxy to forward to", path.display())]
    NoNameserver { path: PathBuf },
    #[error("capture settings in cluster.env")]
    Capture(#[source] ConfigError),
    #[error("resolving {server}")]
    ResolveForCapture {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node metadata from cluster.env")]
    Metadata(#[source] BootstrapError),
}

/// What the operator says about the workload; each given value wins over
/// the onboarding files.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// Where the onboarding files are installed (Istio's paths below it).
    /// Without it none are read, though the root certificate and token are
    /// still looked for at Istio's paths under `/`.
    pub root: Option<PathBuf>,
    /// The control plane's xDS and CA port (else cluster.env's `CA_ADDR`,
    /// `PILOT_ADDRESS`, else `istiod.istio-system.svc:15012`).
    pub server: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    /// Else cluster.env's `TRUST_DOMAIN`, else `cluster.local`.
    pub trust_domain: Option<String>,
    pub root_cert: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// Else cluster.env's `ISTIO_SVC_IP`, else the local address that reaches the server.
    pub ip: Option<IpAddr>,
    /// Else the host name.
    pub name: Option<String>,
    /// Added to cluster.env's `ISTIO_METAJSON_LABELS`.
    pub labels: Vec<(String, String)>,
    /// Run the DNS proxy even if cluster.env's `ISTIO_META_DNS_CAPTURE` does not ask.
    pub dns: bool,
    /// Where the DNS proxy listens (default: [`DnsConfig::new`]'s).
    pub dns_addrs: Vec<SocketAddr>,
    /// The resolver configuration whose nameservers the DNS proxy forwards to.
    pub resolv_conf: PathBuf,
}

/// The workload, from options and onboarding files.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The control plane's xDS and CA port, `host:port`.
    pub server: String,
    pub identity: SpiffeId,
    pub root_cert: PathBuf,
    pub token_file: Option<PathBuf>,
    pub ip: IpAddr,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// cluster.env, as read.
    pub env: BTreeMap<String, String>,
    /// mesh.yaml's `readinessProbe`.
    pub probe: Option<ReadinessProbe>,
    /// The DNS proxy's settings, when the agent answers DNS.
    pub dns: Option<DnsConfig>,
}

/// How Envoy's bootstrap differs from the defaults, beyond the workload.
#[derive(Debug, Clone, Default)]
pub struct BootstrapOptions {
    pub locality: Option<Locality>,
    pub admin_port: u16,
    /// Register into this WorkloadGroup (`AUTO_REGISTER_GROUP` metadata).
    pub auto_register_group: Option<String>,
    /// State-of-the-world ADS instead of delta.
    pub state_of_the_world: bool,
}

impl WorkloadOptions {
    /// The onboarding files' cluster.env, when there are onboarding files.
    pub fn cluster_env(&self) -> Result<BTreeMap<String, String>, WorkloadError> {
        match &self.root {
            Some(root) => Ok(Installed::at(root).cluster_env()?),
            None => Ok(BTreeMap::new()),
        }
    }

    /// The control plane's address as given (flag, then cluster.env), if it is.
    pub fn server(&self, env: &BTreeMap<String, String>) -> Option<String> {
        self.server
            .clone()
            .or_else(|| env.get(keys::CA_ADDR).cloned())
            .or_else(|| env.get(keys::PILOT_ADDRESS).cloned())
    }

    /// The DNS proxy's settings, when the agent answers DNS: [`dns`](Self::dns),
    /// or cluster.env's `ISTIO_META_DNS_CAPTURE=true`.
    pub fn dns_config(
        &self,
        env: &BTreeMap<String, String>,
        namespace: &str,
    ) -> Result<Option<DnsConfig>, WorkloadError> {
        let asked = env
            .get(keys::DNS_CAPTURE)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        if !self.dns && !asked {
            return Ok(None);
        }
        let resolv = std::fs::read_to_string(&self.resolv_conf)
            .map(|text| ResolvConf::parse(&text))
            .unwrap_or_default();
        if resolv.nameservers.is_empty() {
            let error = WorkloadError::NoNameserver {
                path: self.resolv_conf.clone(),
            };
            // Asked for by the operator: an error. By the onboarding files:
            // DNS is left as it is rather than broken.
            if self.dns {
                return Err(error);
            }
            tracing::warn!("{error}: the DNS proxy stays off and DNS is not captured");
            return Ok(None);
        }
        let mut config = DnsConfig::new(resolv, namespace);
        if !self.dns_addrs.is_empty() {
            config.listen = self.dns_addrs.clone();
        }
        Ok(Some(config))
    }

    /// The workload: options over onboarding files over defaults.
    pub fn resolve(&self) -> Result<Workload, WorkloadError> {
        let installed = Installed::at(self.root.clone().unwrap_or_else(|| PathBuf::from("/")));
        let env = self.cluster_env()?;
        let required = |given: &Option<String>, key: &'static str, what, flag| {
            given
                .clone()
                .or_else(|| env.get(key).cloned())
                .ok_or(WorkloadError::Missing { what, flag, key })
        };
        let namespace = required(
            &self.namespace,
            keys::POD_NAMESPACE,
            "namespace",
            "namespace",
        )?;
        let account = required(
            &self.service_account,
            keys::SERVICE_ACCOUNT,
            "service account",
            "service-account",
        )?;
        let trust_domain = self
            .trust_domain
            .clone()
            .or_else(|| env.get(keys::TRUST_DOMAIN).cloned())
            .unwrap_or_else(|| vmesh_api::mesh::DEFAULT_TRUST_DOMAIN.into());
        let server = self
            .server(&env)
            .unwrap_or_else(|| with_port(&istiod_host(None)));
        let mut labels: BTreeMap<String, String> = env
            .get(keys::LABELS)
            .map(|json| serde_json::from_str(json).map_err(WorkloadError::Labels))
            .transpose()?
            .unwrap_or_default();
        labels.extend(self.labels.iter().cloned());
        let ip = match self.ip {
            Some(ip) => ip,
            None => match env.get(keys::SVC_IP).filter(|v| !v.trim().is_empty()) {
                Some(text) => text.trim().parse().map_err(|_| WorkloadError::SvcIp {
                    value: text.clone(),
                })?,
                None => address_towards(&server)?,
            },
        };
        let name = match &self.name {
            Some(name) => name.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .map_err(WorkloadError::HostName)?,
        };
        let probe = match &self.root {
            Some(root) => Installed::at(root).readiness_probe()?,
            None => None,
        };
        Ok(Workload {
            identity: SpiffeId::new(&trust_domain, &namespace, &account)
                .map_err(WorkloadError::Identity)?,
            server,
            root_cert: self
                .root_cert
                .clone()
                .unwrap_or_else(|| installed.root_cert()),
            token_file: self.token_file.clone().or_else(|| installed.token()),
            ip,
            name,
            labels,
            dns: self.dns_config(&env, &namespace)?,
            env,
            probe,
        })
    }
}

impl Workload {
    /// The agent's configuration, its state under `work_dir`. When the
    /// agent runs as root, `exec` probes run as `proxy_uid`.
    pub fn agent_config(&self, work_dir: &Path, proxy_uid: u32) -> AgentConfig {
        let mut config = AgentConfig::new(
            self.identity.clone(),
            self.server.clone(),
            self.root_cert.clone(),
            work_dir.join(CERT_DIR),
            work_dir.join(SOCKET_DIR),
        );
        config.token_file = self.token_file.clone();
        config.probe = self.probe.clone();
        // Root may run the probe's command as the proxy user; anyone else runs it as themselves.
        config.probe_user = running_as_root().then_some(proxy_uid);
        config.dns = self.dns.clone();
        config.name_table_file = Some(work_dir.join(NAME_TABLE_FILE));
        config
    }

    /// Envoy's bootstrap for this workload and `agent`'s sockets; cluster.env's
    /// `ISTIO_META_*` become node metadata, as Istio's agent does.
    pub fn bootstrap(
        &self,
        agent: &AgentHandle,
        options: &BootstrapOptions,
    ) -> Result<Bootstrap, WorkloadError> {
        let mut bootstrap = Bootstrap::new(
            self.ip,
            &self.name,
            &self.identity.namespace,
            agent.xds_socket(),
            agent.sds_socket(),
        );
        bootstrap.service_account = Some(self.identity.service_account.clone());
        bootstrap.labels = self.labels.clone();
        bootstrap.locality = options.locality.clone();
        bootstrap.admin.set_port(options.admin_port);
        bootstrap.extra_metadata = metadata_from_env(
            self.env
                .iter()
                .filter(|(key, _)| key.as_str() != keys::LABELS),
        )
        .map_err(WorkloadError::Metadata)?;
        if let Some(group) = &options.auto_register_group {
            bootstrap
                .extra_metadata
                .insert("AUTO_REGISTER_GROUP".into(), group.clone().into());
        }
        if options.state_of_the_world {
            bootstrap.api_type = AdsApiType::Grpc;
        }
        Ok(bootstrap)
    }

    /// The capture rules for this workload, Envoy running as `proxy_uid`.
    pub fn capture_config(&self, proxy_uid: u32) -> Result<CaptureConfig, WorkloadError> {
        capture_config(&self.env, proxy_uid, Some(&self.server), self.dns.as_ref())
    }
}

/// The capture rules cluster.env asks for, Envoy running as `proxy_uid`;
/// connections to `server` go straight out, and DNS to `dns`'s nameservers
/// goes to its port when the agent answers DNS.
pub fn capture_config(
    env: &BTreeMap<String, String>,
    proxy_uid: u32,
    server: Option<&str>,
    dns: Option<&DnsConfig>,
) -> Result<CaptureConfig, WorkloadError> {
    let mut config = CaptureConfig::from_env(env).map_err(WorkloadError::Capture)?;
    // The agent itself runs as root: its connections to the control plane
    // must go straight out, not through the Envoy it feeds.
    if let Some(server) = server {
        let addresses =
            server_addresses(server).map_err(|source| WorkloadError::ResolveForCapture {
                server: server.to_string(),
                source,
            })?;
        config
            .exclude_outbound_cidrs
            .extend(addresses.into_iter().map(|a| ipnet::IpNet::from(a.ip())));
    }
    config.proxy_uid = proxy_uid;
    config.proxy_gid = Some(proxy_uid);
    config.dns = dns.map(|dns| DnsCapture {
        nameservers: dns.resolv.nameservers.clone(),
        port: dns.listen[0].port(),
    });
    Ok(config)
}

/// Every address of the control plane's servers: `server` is one
/// `host:port` or several, comma-separated.
pub fn server_addresses(server: &str) -> std::io::Result<Vec<std::net::SocketAddr>> {
    let mut addresses = Vec::new();
    for entry in server.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        addresses.extend(entry.to_socket_addrs()?);
    }
    Ok(addresses)
}

/// The local address the kernel would use to reach `server` (the first of
/// several; no packet is sent).
pub fn address_towards(server: &str) -> Result<IpAddr, WorkloadError> {
    let target = server_addresses(server)
        .map_err(|source| WorkloadError::Resolve {
            server: server.to_string(),
            source,
        })?
        .into_iter()
        .next()
        .ok_or_else(|| WorkloadError::NoAddress {
            server: server.to_string(),
        })?;
    let local = |source| WorkloadError::LocalAddress {
        server: server.to_string(),
        source,
    };
    let socket = std::net::UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .map_err(local)?;
    socket.connect(target).map_err(local)?;
    Ok(socket.local_addr().map_err(local)?.ip())
}

/// Whether this process runs as root.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(root: Option<&Path>) -> WorkloadOptions {
        WorkloadOptions {
            root: root.map(Path::to_path_buf),
            server: None,
            namespace: None,
            service_account: None,
            trust_domain: None,
            root_cert: None,
            token_file: None,
            ip: Some("10.0.0.5".parse().unwrap()),
            name: Some("vm-1".into()),
            labels: vec![("zone".into(), "a".into())],
            dns: false,
            dns_addrs: Vec::new(),
            resolv_conf: PathBuf::from("/nonexistent/resolv.conf"),
        }
    }

    #[test]
    fn onboarding_files_fill_in_what_options_leave_out() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join(crate::onboarding_files::CLUSTER_ENV_PATH);
        std::fs::create_dir_all(env.parent().unwrap()).unwrap();
        std::fs::write(
            &env,
            "CA_ADDR='gw.mesh.test:15012'\nISTIO_METAJSON_LABELS='{\"app\":\"pay\"}'\n\
             ISTIO_META_DNS_CAPTURE='true'\nPOD_NAMESPACE='vm-workloads'\n\
             SERVICE_ACCOUNT='pay-sa'\nTRUST_DOMAIN='corp.example'\n",
        )
        .unwrap();
        let workload = options(Some(dir.path())).resolve().unwrap();
        assert_eq!(
            workload.identity.to_string(),
            "spiffe://corp.example/ns/vm-workloads/sa/pay-sa"
        );
        assert_eq!(workload.server, "gw.mesh.test:15012");
        assert_eq!(
            workload.labels,
            BTreeMap::from([("app".into(), "pay".into()), ("zone".into(), "a".into())])
        );
        assert_eq!(
            workload.root_cert,
            dir.path().join(crate::onboarding_files::ROOT_CERT_PATH)
        );
        assert!(workload.token_file.is_none() && workload.probe.is_none());
        // Asked for by cluster.env, but there is no nameserver: DNS stays off.
        assert!(workload.dns.is_none());

        let mut flags = options(Some(dir.path()));
        flags.namespace = Some("other".into());
        flags.server = Some("10.0.0.1:15012".into());
        let workload = flags.resolve().unwrap();
        assert_eq!(workload.identity.namespace, "other");
        assert_eq!(workload.server, "10.0.0.1:15012");

        // The address configure's --internalIP/--externalIP wrote, unless --ip says.
        let mut svc_ip = std::fs::read_to_string(&env).unwrap();
        svc_ip.push_str("ISTIO_SVC_IP='203.0.113.7'\n");
        std::fs::write(&env, svc_ip).unwrap();
        assert_eq!(
            options(Some(dir.path())).resolve().unwrap().ip.to_string(),
            "10.0.0.5"
        );
        let mut unsaid = options(Some(dir.path()));
        unsaid.ip = None;
        assert_eq!(unsaid.resolve().unwrap().ip.to_string(), "203.0.113.7");

        let mut dns = options(Some(dir.path()));
        dns.dns = true;
        assert!(matches!(
            dns.resolve(),
            Err(WorkloadError::NoNameserver { .. })
        ));
    }

    #[test]
    fn without_onboarding_files_the_flags_must_say() {
        let error = options(None).resolve().unwrap_err();
        assert_eq!(
            error.to_string(),
            "no namespace: give --namespace or onboarding files with POD_NAMESPACE"
        );
        let mut given = options(None);
        given.namespace = Some("ns".into());
        given.service_account = Some("sa".into());
        let workload = given.resolve().unwrap();
        assert_eq!(workload.server, "istiod.istio-system.svc:15012");
        assert_eq!(workload.identity.trust_domain, "cluster.local");
        assert_eq!(workload.root_cert, Path::new("/etc/certs/root-cert.pem"));
    }

    #[test]
    fn several_servers_are_all_resolved() {
        let addresses = server_addresses("127.0.0.1:15012, 127.0.0.2:15012").unwrap();
        assert_eq!(addresses.len(), 2);
        assert_eq!(
            address_towards("127.0.0.1:15012,127.0.0.2:15012").unwrap(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_local_address_towards_loopback_is_loopback() {
        assert_eq!(
            address_towards("127.0.0.1:15012").unwrap(),
            IpAddr::from([127, 0, 0, 1])
        );
    }
}
