//! The agent, assembled: the certificate manager, SDS, the xDS proxy and
//! the workload's readiness probe, run together until shutdown.
//!
//! [`start`] binds both sockets before it returns (so Envoy can be started
//! right after) and hands back an [`AgentHandle`] with their paths and the
//! identity. It does not read onboarding files ([`crate::workload`] turns
//! `cluster.env` / `mesh.yaml` into an [`AgentConfig`]), write Envoy's
//! bootstrap (see [`crate::bootstrap`]), start Envoy ([`crate::envoy`]), or
//! touch iptables ([`crate::capture`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::service::Routes;
use vmesh_ca::SpiffeId;

use crate::backoff::BackoffPolicy;
use crate::dns::{DnsConfig, DnsError, DnsMetrics, DnsProxy, NameIndex};
use crate::health::{HealthPublisher, HealthReport, ProbeError, Prober};
use crate::identity::{
    CaClient, CertificateManager, CertificateSigner, IdentityConfig, IdentityError, IdentityHandle,
    RenewalPolicy, TrustAnchors,
};
use crate::istio_metrics::{IstioMetrics, MetricsLogError};
use crate::sds::SdsServer;
use crate::uds::Socket;
use crate::upstream::{Upstream, UpstreamError};
use crate::xds_proxy::XdsProxy;

/// File name of the ADS socket in the socket directory.
pub const XDS_SOCKET: &str = "xds.sock";
/// File name of the SDS socket in the socket directory.
pub const SDS_SOCKET: &str = "sds.sock";

/// Why the agent could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading the mesh root {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("binding {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} server: {source}")]
    Serve {
        what: &'static str,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the readiness probe: {0}")]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    MetricsLog(#[from] MetricsLogError),
    #[error("agent task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What the agent needs to know.
#[derive(Debug, Clone, Serialize)]
pub struct AgentConfig {
    /// The workload's identity (`TRUST_DOMAIN`, `POD_NAMESPACE`,
    /// `SERVICE_ACCOUNT`).
    pub identity: SpiffeId,
    /// The control plane's xDS + CA port, `host:port` (15012).
    pub server_address: String,
    /// The name on the control plane's certificate
    /// (`istiod.istio-system.svc`).
    pub server_name: String,
    /// The mesh root (`root-cert.pem`).
    pub root_cert_file: PathBuf,
    /// The bootstrap token (`istio-token`).
    pub token_file: Option<PathBuf>,
    /// Where the workload key and chain are kept.
    pub cert_dir: PathBuf,
    /// Where the ADS ([`XDS_SOCKET`]) and SDS ([`SDS_SOCKET`]) sockets are
    /// made.
    pub socket_dir: PathBuf,
    /// The sockets' file mode (0600: only the agent's user, which Envoy
    /// shares; 0660 to let a group in).
    pub socket_mode: u32,
    /// Sent to the CA as `clusterid` (`ISTIO_META_CLUSTER_ID`).
    pub cluster_id: Option<String>,
    /// The certificate life to ask for; the CA's default (24 h) if `None`.
    #[serde(with = "crate::duration_secs::option")]
    pub requested_ttl: Option<Duration>,
    pub renewal: RenewalPolicy,
    /// Reconnecting xDS streams to the control plane.
    pub xds_backoff: BackoffPolicy,
    /// The WorkloadGroup's probe (mesh.yaml's `readinessProbe`): run, and
    /// its verdicts reported to the control plane.
    #[serde(skip)]
    pub probe: Option<vmesh_api::kinds::workload_group::ReadinessProbe>,
    /// The user an `exec` probe runs as (the proxy user when the agent is root).
    pub probe_user: Option<u32>,
    /// The DNS proxy, when the workload's DNS is the agent's
    /// (`ISTIO_META_DNS_CAPTURE`).
    pub dns: Option<DnsConfig>,
    /// Where the last name table is kept, so names resolve after a restart
    /// while the control plane is away.
    pub name_table_file: Option<PathBuf>,
}

impl AgentConfig {
    /// A configuration with Istio's defaults for everything not given.
    pub fn new(
        identity: SpiffeId,
        server_address: impl Into<String>,
        root_cert_file: impl Into<PathBuf>,
        cert_dir: impl Into<PathBuf>,
        socket_dir: impl Into<PathBuf>,
    ) -> AgentConfig {
        AgentConfig {
            identity,
            server_address: server_address.into(),
            server_name: vmesh_ca::ISTIOD_SERVICE_NAME.to_owned(),
            root_cert_file: root_cert_file.into(),
            token_file: None,
            cert_dir: cert_dir.into(),
            socket_dir: socket_dir.into(),
            socket_mode: 0o600,
            cluster_id: None,
            requested_ttl: None,
            renewal: RenewalPolicy::default(),
            xds_backoff: BackoffPolicy {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
                jitter: 0.2,
            },
            probe: None,
            probe_user: None,
            dns: None,
            name_table_file: None,
        }
    }

    pub fn xds_socket(&self) -> PathBuf {
        self.socket_dir.join(XDS_SOCKET)
    }

    pub fn sds_socket(&self) -> PathBuf {
        self.socket_dir.join(SDS_SOCKET)
    }

    /// Envoy's metrics log, in the socket directory (Envoy's working
    /// directory, since listeners name it relatively).
    pub fn metrics_log(&self) -> PathBuf {
        self.socket_dir.join(vmesh_api::peer::METRICS_LOG_FILE)
    }

    fn upstream(&self, root_pem: &str) -> Result<Upstream, UpstreamError> {
        Upstream::new(self.server_address.clone(), root_pem).with_server_name(&self.server_name)
    }
}

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    xds_socket: PathBuf,
    sds_socket: PathBuf,
    metrics_log: PathBuf,
    istio_metrics: Arc<IstioMetrics>,
    identity: IdentityHandle,
    health: Option<watch::Receiver<Option<HealthReport>>>,
    publisher: HealthPublisher,
    dns: Option<RunningDns>,
    tasks: JoinSet<Result<(), AgentError>>,
}

/// The DNS proxy's parts others look at.
#[derive(Debug, Clone)]
pub struct RunningDns {
    pub addrs: Vec<std::net::SocketAddr>,
    pub upstreams: Vec<std::net::IpAddr>,
    pub search: Vec<String>,
    pub index: watch::Receiver<Arc<NameIndex>>,
    pub metrics: DnsMetrics,
}

impl AgentHandle {
    /// Where Envoy's ADS cluster connects.
    pub fn xds_socket(&self) -> &Path {
        &self.xds_socket
    }

    /// Where Envoy's SDS cluster connects.
    pub fn sds_socket(&self) -> &Path {
        &self.sds_socket
    }

    /// Envoy's metrics log (a pipe); Envoy runs in its directory.
    pub fn metrics_log(&self) -> &Path {
        &self.metrics_log
    }

    /// Istio's metrics, as counted from the metrics log.
    pub fn istio_metrics(&self) -> Arc<IstioMetrics> {
        self.istio_metrics.clone()
    }

    pub fn identity(&self) -> &IdentityHandle {
        &self.identity
    }

    /// The workload's health as the probe last decided; `None` without a probe.
    pub fn health(&self) -> Option<watch::Receiver<Option<HealthReport>>> {
        self.health.clone()
    }

    /// The DNS proxy, when it runs.
    pub fn dns(&self) -> Option<&RunningDns> {
        self.dns.as_ref()
    }

    /// Reports the workload unhealthy, for good: called when it is about to
    /// stop, so that clients stop sending to it before its sidecar goes.
    pub fn drain(&self) {
        self.publisher
            .drain("the workload's agent is shutting down");
    }

    /// Waits for every part to stop (after shutdown), or for the first to
    /// fail.
    pub async fn wait(mut self) -> Result<(), AgentError> {
        while let Some(done) = self.tasks.join_next().await {
            done??;
        }
        Ok(())
    }
}

/// Starts the agent with the mesh CA at `config.server_address` as signer.
pub async fn start(
    config: AgentConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<AgentHandle, AgentError> {
    let root_pem = read_root(&config.root_cert_file)?;
    let mut ca = CaClient::new(config.upstream(&root_pem)?);
    if let Some(cluster_id) = &config.cluster_id {
        ca = ca.with_cluster_id(cluster_id.clone());
    }
    start_with_signer(config, Arc::new(ca), shutdown).await
}

/// Starts the agent with another signer (tests, or a CA reached some other
/// way). ADS still goes to `config.server_address`.
pub async fn start_with_signer(
    config: AgentConfig,
    signer: Arc<dyn CertificateSigner>,
    shutdown: watch::Receiver<bool>,
) -> Result<AgentHandle, AgentError> {
    let root_pem = read_root(&config.root_cert_file)?;
    let anchors = TrustAnchors::from_pem(&root_pem)?;
    let upstream = config.upstream(&root_pem)?;
    let manager = CertificateManager::new(
        IdentityConfig {
            identity: config.identity.clone(),
            cert_dir: config.cert_dir.clone(),
            token_file: config.token_file.clone(),
            requested_ttl: config.requested_ttl,
            renewal: config.renewal,
        },
        anchors,
        signer,
    )?;
    let identity = manager.handle();
    let prober = config
        .probe
        .as_ref()
        .map(Prober::new)
        .transpose()?
        .map(|prober| match config.probe_user {
            Some(uid) => prober.run_as(uid),
            None => prober,
        });

    let xds_socket = config.xds_socket();
    let sds_socket = config.sds_socket();
    let bind = |path: &Path| {
        Socket::bind(path, config.socket_mode).map_err(|source| AgentError::Bind {
            path: path.to_path_buf(),
            source,
        })
    };
    // Should the second fail, the first is removed as it is dropped.
    let sds_listener = bind(&sds_socket)?;
    let xds_listener = bind(&xds_socket)?;
    let metrics_log = config.metrics_log();
    let metrics_pipe = crate::istio_metrics::open_log(&metrics_log)?;

    let mut tasks = JoinSet::new();
    let istio_metrics = Arc::new(IstioMetrics::default());
    let counting =
        istio_metrics
            .clone()
            .follow(metrics_pipe, metrics_log.clone(), shutdown.clone());
    tasks.spawn(async move {
        counting.await;
        Ok(())
    });
    let s = shutdown.clone();
    tasks.spawn(async move {
        manager.run(s).await;
        Ok(())
    });
    let sds = SdsServer::new(identity.subscribe(), root_pem.clone(), shutdown.clone());
    tasks.spawn(serve(
        sds_listener,
        Routes::new(sds.into_service()),
        "SDS",
        shutdown.clone(),
    ));
    let mut proxy = XdsProxy::new(
        upstream,
        identity.subscribe(),
        config.xds_backoff,
        shutdown.clone(),
    );
    // Every agent reports at least its shutdown; with a probe, its verdicts.
    let publisher = HealthPublisher::default();
    proxy = proxy.with_health(publisher.subscribe());
    let health = prober.map(|prober| {
        prober.spawn(publisher.clone(), shutdown.clone());
        publisher.subscribe()
    });
    let mut dns = None;
    if let Some(dns_config) = config.dns.clone() {
        let stored = config.name_table_file.as_deref().and_then(load_name_table);
        let (tables, received) = watch::channel(stored.map(Arc::new));
        proxy = proxy.with_name_table(tables);
        if let Some(path) = config.name_table_file.clone() {
            tasks.spawn(keep_name_table(received.clone(), path));
        }
        let index = crate::dns::index_tables(
            received,
            dns_config.namespace.clone(),
            dns_config.resolv.search.clone(),
        );
        let metrics = DnsMetrics::default();
        let (upstreams, search) = (
            dns_config.resolv.nameservers.clone(),
            dns_config.resolv.search.clone(),
        );
        let server = DnsProxy::bind(dns_config, index.clone(), metrics.clone()).await?;
        let addrs = server.local_addrs();
        tracing::info!(?addrs, "DNS proxy listening");
        let stop = shutdown.clone();
        tasks.spawn(async move {
            server.serve(stop).await;
            Ok(())
        });
        dns = Some(RunningDns {
            addrs,
            upstreams,
            search,
            index,
            metrics,
        });
    }
    tasks.spawn(serve(
        xds_listener,
        Routes::new(proxy.into_service()),
        "xDS proxy",
        shutdown.clone(),
    ));
    tracing::info!(identity = %config.identity, server = %config.server_address, xds = %xds_socket.display(), sds = %sds_socket.display(), "agent started");
    Ok(AgentHandle {
        xds_socket,
        sds_socket,
        metrics_log,
        istio_metrics,
        identity,
        health,
        publisher,
        dns,
        tasks,
    })
}

/// Serves one of Envoy's sockets until shutdown.
async fn serve(
    socket: Socket,
    routes: Routes,
    what: &'static str,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    socket
        .serve(routes, shutdown)
        .await
        .map_err(|source| AgentError::Serve { what, source })
}

/// The name table kept at `path`, if there is a readable one.
fn load_name_table(path: &Path) -> Option<vmesh_proto::nds::NameTable> {
    use prost::Message;
    let bytes = std::fs::read(path).ok()?;
    match vmesh_proto::nds::NameTable::decode(bytes.as_slice()) {
        Ok(table) => {
            tracing::info!(names = table.table.len(), path = %path.display(), "DNS name table loaded from the last run");
            Some(table)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring an unreadable name table: {e}");
            None
        }
    }
}

/// Writes each new name table to `path`.
async fn keep_name_table(
    mut tables: watch::Receiver<Option<Arc<vmesh_proto::nds::NameTable>>>,
    path: PathBuf,
) -> Result<(), AgentError> {
    use prost::Message;
    while tables.changed().await.is_ok() {
        let bytes = tables
            .borrow_and_update()
            .as_ref()
            .map(|t| t.encode_to_vec());
        if let Some(bytes) = bytes
            && let Err(e) = vmesh_ca::files::write_file(&path, &bytes, 0o644)
        {
            tracing::warn!(path = %path.display(), "cannot keep the name table: {e}");
        }
    }
    Ok(())
}

fn read_root(path: &Path) -> Result<String, AgentError> {
    std::fs::read_to_string(path).map_err(|source| AgentError::Root {
        path: path.to_path_buf(),
        source,
    })
}
