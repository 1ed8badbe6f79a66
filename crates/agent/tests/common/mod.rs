//! An in-process control plane for the agent's tests: the mesh CA
//! (`IstioCertificateService`) and ADS (`vmesh_xds::ads::Ads` over a fixed
//! configuration) on one TLS port on 127.0.0.1, accepted with
//! `vmesh_ca::server_tls_config`, as the server runs 15012. ADS streams must
//! present a mesh client certificate and claim no other identity (`Ads`'s
//! admission check); the identities and serials that opened them are
//! recorded.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::TransportSocket;
use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, UpstreamTlsContext,
};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::util::pack_any;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Channel, Endpoint, Server, Uri};
use vmesh_agent::bootstrap::sds_secret_config;
use vmesh_ca::{Authority, AuthorityOptions, CertificateService, Revocations, TokenIssuer};
use vmesh_xds::ads::{
    Ads, Authenticator, CLUSTER_TYPE, CallerIdentity, ConfigSource, ResourceSet, Resources,
    StatusTable,
};
use vmesh_xds::node::Proxy;

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "vm-ns";
pub const SERVICE_ACCOUNT: &str = "payment";
pub const CLUSTER: &str = "outbound|8080||echo.test.svc.cluster.local";
pub const WAIT: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "vmesh_agent=debug,warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn workload_id() -> vmesh_ca::SpiffeId {
    vmesh_ca::SpiffeId::new(TRUST_DOMAIN, NAMESPACE, SERVICE_ACCOUNT).unwrap()
}

/// The same resources for every proxy.
pub struct Fixed(pub Resources);

impl ConfigSource for Fixed {
    fn resources(&self, _proxy: &Proxy) -> Resources {
        self.0.clone()
    }
}

/// One static cluster whose upstream TLS takes the workload certificate
/// (`default`) and the mesh root (`ROOTCA`) from the agent's SDS.
pub fn sds_cluster_resources() -> Resources {
    let tls = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds_secret_config("default")],
            validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(
                sds_secret_config("ROOTCA"),
            )),
            ..Default::default()
        }),
        sni: "outbound_.8080_._.echo.test.svc.cluster.local".into(),
        ..Default::default()
    };
    let cluster = Cluster {
        name: CLUSTER.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(PbDuration {
            seconds: 1,
            nanos: 0,
        }),
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(ConfigType::TypedConfig(pack_any(tls))),
        }),
        ..Default::default()
    };
    let mut set = ResourceSet::default();
    set.insert(CLUSTER_TYPE, CLUSTER, pack_any(cluster));
    Resources::from(set)
}

/// Who opened an ADS stream: SPIFFE id and certificate serial (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdsPeer {
    pub id: String,
    pub serial: String,
}

pub struct Mesh {
    pub authority: Arc<Authority>,
    pub issuer: Arc<TokenIssuer>,
    pub revocations: watch::Sender<Arc<Revocations>>,
    pub addr: SocketAddr,
    pub ads_peers: Arc<Mutex<Vec<AdsPeer>>>,
    _config: watch::Sender<Arc<dyn ConfigSource>>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    acceptor: JoinHandle<()>,
}

/// Admits ADS callers by their verified mesh client certificate only (the
/// server also takes tokens; the agent must not need one), and records who
/// they were. `Ads` then refuses a node claiming another identity.
struct CertificateOnly {
    peers: Arc<Mutex<Vec<AdsPeer>>>,
}

impl Authenticator for CertificateOnly {
    fn authenticate(
        &self,
        _headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<CallerIdentity, Status> {
        let leaf = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().cloned())
            .ok_or_else(|| Status::unauthenticated("ADS needs a mesh client certificate"))?;
        let peer = vmesh_ca::PeerIdentity::from_certificate(leaf.as_ref(), TRUST_DOMAIN)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        self.peers.lock().push(AdsPeer {
            id: peer.id.to_string(),
            serial: serial_of(leaf.as_ref()),
        });
        Ok(CallerIdentity {
            namespace: peer.id.namespace,
            service_account: peer.id.service_account,
        })
    }
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let raw = cert.raw_serial();
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

impl Mesh {
    /// Starts on `addr` (`127.0.0.1:0` for any port) with the CA kept in
    /// `ca_dir` (so a restart keeps the root).
    pub async fn start(ca_dir: &Path, addr: &str, options: AuthorityOptions) -> Mesh {
        let authority = Arc::new(Authority::load_or_create(ca_dir, TRUST_DOMAIN, options).unwrap());
        let issuer = Arc::new(TokenIssuer::load_or_create(ca_dir, TRUST_DOMAIN).unwrap());
        let (revocations, revocations_rx) = watch::channel(Arc::new(Revocations::new()));
        let ca = CertificateService::new(authority.clone(), issuer.clone(), revocations_rx);

        let (config, config_rx) =
            watch::channel(Arc::new(Fixed(sds_cluster_resources())) as Arc<dyn ConfigSource>);
        let (stop, stop_rx) = watch::channel(false);
        let ads_peers: Arc<Mutex<Vec<AdsPeer>>> = Arc::default();
        let ads = Ads::new(config_rx, Arc::new(StatusTable::default()), stop_rx.clone())
            .authenticated(Arc::new(CertificateOnly {
                peers: ads_peers.clone(),
            }))
            .into_service();

        let (chain, key) = authority
            .serving_certificate(&["127.0.0.1".into()])
            .unwrap();
        let tls = TlsAcceptor::from(Arc::new(
            vmesh_ca::server_tls_config(&chain, &key, authority.root_pem()).unwrap(),
        ));
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (incoming, acceptor) = vmesh_testkit::tls::incoming(listener, tls);
        let mut server_stop = stop_rx;
        let server = tokio::spawn(
            Server::builder()
                .add_service(ca.into_server())
                .add_service(ads)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = server_stop.wait_for(|s| *s).await;
                }),
        );
        Mesh {
            authority,
            issuer,
            revocations,
            addr,
            ads_peers,
            _config: config,
            stop,
            server: Some(server),
            acceptor,
        }
    }

    pub fn root_pem(&self) -> &str {
        self.authority.root_pem()
    }

    /// Writes the onboarding files the agent reads: `root-cert.pem` and
    /// `istio-token` (for the workload's account, one hour).
    pub fn onboard(&self, dir: &Path) -> (PathBuf, PathBuf, vmesh_ca::IssuedToken) {
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, self.root_pem()).unwrap();
        let token = self
            .issuer
            .issue(NAMESPACE, SERVICE_ACCOUNT, Duration::from_secs(3600))
            .unwrap();
        let token_file = dir.join("istio-token");
        std::fs::write(&token_file, &token.token).unwrap();
        (root, token_file, token)
    }

    pub fn revoke(&self, f: impl FnOnce(&mut Revocations)) {
        self.revocations.send_modify(|r| f(Arc::make_mut(r)));
    }

    pub fn peers(&self) -> Vec<AdsPeer> {
        self.ads_peers.lock().clone()
    }

    /// Stops accepting and ends every stream.
    pub async fn stop(mut self) {
        self.acceptor.abort();
        let _ = (&mut self.acceptor).await;
        self.stop.send_replace(true);
        tokio::time::timeout(WAIT, self.server.take().unwrap())
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// A gRPC channel to a Unix socket, as Envoy would open it.
pub async fn uds_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://agent")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}
