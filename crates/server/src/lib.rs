//! The vmesh control plane process (istiod's role): the config API over the
//! store ([`api`]), the mesh controller that rebuilds the registry snapshot
//! and hands it to xDS ([`mesh`]), the CA, token API and TLS port 15012
//! ([`identity`]), VM joins ([`join`]), auto-registration and health
//! ([`registration`]), the config-dir follower ([`config_dir`]), the
//! monitoring port ([`monitoring`]), Prometheus service discovery of the
//! connected sidecars ([`discovery`]) and the Kubernetes views computed from
//! the mesh ([`views`]: Endpoints, Services' cluster IPs).
//!
//! This crate wires those together and owns their listeners; it does not
//! translate to Envoy (`xds`), build the mesh model (`registry`) or sign
//! (`ca`). [`start`] binds everything and returns the bound addresses and a
//! shutdown handle, so whole-server tests run in-process on port 0. It
//! refuses to start when the stored mesh configuration's trust domain is not
//! its CA's.

#![forbid(unsafe_code)]

pub mod api;
pub mod config_dir;
pub mod connections;
pub mod discovery;
mod enrollment;
pub mod identity;
pub mod join;
pub mod mesh;
pub mod monitoring;
pub mod registration;
pub mod throttle;
pub mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use vmesh_store::Store;

/// What `vmesh server` needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The CA's files, and the embedded store unless `store` says etcd.
    pub data_dir: PathBuf,
    pub store: vmesh_store::StoreLocation,
    pub api_addr: SocketAddr,
    /// Bearer token every API request must carry. Required off loopback.
    pub api_token: Option<String>,
    /// Serve the config API over TLS even on loopback (it always is off
    /// loopback); clients trust the mesh root.
    pub api_tls: bool,
    /// A directory of manifests to keep applied.
    pub config_dir: Option<PathBuf>,
    /// xDS and the CA over TLS, every caller authenticated (Istio's 15012).
    pub xds_addr: Option<SocketAddr>,
    /// Plaintext xDS, loopback only; off unless given.
    pub xds_plaintext_addr: Option<SocketAddr>,
    pub identity: identity::IdentityConfig,
    /// How long an auto-registered WorkloadEntry outlives its last stream.
    pub auto_registration_grace: std::time::Duration,
    /// Readiness and proxy sync status, loopback only; off unless given.
    pub monitoring_addr: Option<SocketAddr>,
    pub debounce: mesh::Debounce,
    /// Connections every listener admits, and how long they may be silent
    /// (lowered to what the process's file descriptors allow).
    pub connections: connections::ConnectionLimits,
    /// How often the store is backed up into `<data-dir>/backups` when it
    /// changed (it is also backed up at every start).
    pub backup_interval: std::time::Duration,
}

impl ServerConfig {
    /// Defaults: API on 127.0.0.1:15080 without a token, no config dir, no
    /// xDS ports, a CA of its own for `cluster.local`.
    pub fn new(data_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            store: vmesh_store::StoreLocation::Embedded(data_dir.clone()),
            data_dir,
            api_addr: SocketAddr::from(([127, 0, 0, 1], 15080)),
            api_token: None,
            api_tls: false,
            config_dir: None,
            xds_addr: None,
            xds_plaintext_addr: None,
            identity: identity::IdentityConfig::default(),
            auto_registration_grace: std::time::Duration::from_secs(10),
            monitoring_addr: None,
            debounce: mesh::Debounce::default(),
            connections: connections::ConnectionLimits::default(),
            backup_interval: std::time::Duration::from_secs(3600),
        }
    }
}

/// The shortest admin API token the server accepts: anything shorter can
/// be guessed.
pub const MIN_API_TOKEN_CHARS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "the config API on {0} is reachable from other hosts: give it a token with --api-token-file"
    )]
    UnauthenticatedRemoteApi(SocketAddr),
    #[error(
        "the API token has {0} characters; it must have at least {MIN_API_TOKEN_CHARS} \
         (make one with: openssl rand -hex 32)"
    )]
    WeakApiToken(usize),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] vmesh_store::StoreError),
    #[error(
        "the store {} is missing, but {} exists: this server has run here before and its mesh \
         would start empty. Restore the newest good backup with: vmesh store restore --data-dir {}",
        .0.join(vmesh_store::STORE_FILE).display(), .0.join("ca").display(), .0.display()
    )]
    StoreMissing(PathBuf),
    #[error("plaintext xDS must listen on loopback, not {0}: it has no authentication")]
    RemotePlaintextXds(SocketAddr),
    #[error("the monitoring port must listen on loopback, not {0}: it has no authentication")]
    RemoteMonitoring(SocketAddr),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("cannot set up the metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("config dir {path}: {message}")]
    ConfigDir { path: PathBuf, message: String },
    #[error(
        "the mesh's trust domain {mesh:?} (meshConfig.trustDomain in IstioOperator {sources}) is not the CA's {ca:?}: \
         workloads would get certificates no client accepts; start the server with --trust-domain {mesh} or change the IstioOperator"
    )]
    TrustDomainMismatch {
        mesh: String,
        ca: String,
        sources: String,
    },
}

/// How often a store whose writes failed tries again.
const STORE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the store healthy until shutdown: after a failed write (a full
/// disk) it retries every [`STORE_RETRY`] so that readiness comes back
/// once the cause is gone, whether or not anyone writes; and it backs the
/// store up every `backup_interval` when it changed.
async fn store_upkeep(
    store: Arc<Store>,
    backup_interval: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = tokio::time::interval(STORE_RETRY);
    let mut backup = tokio::time::interval(backup_interval);
    backup.tick().await;
    let mut backed_up = store.revision();
    loop {
        tokio::select! {
            _ = retry.tick() => {
                if store.fault().is_some() {
                    let store = store.clone();
                    if let Ok(Ok(())) = tokio::task::spawn_blocking(move || store.check_writable()).await {
                        tracing::info!("the store writes again");
                    }
                }
            }
            _ = backup.tick() => {
                let revision = store.revision();
                if revision != backed_up && !store.is_shared() {
                    let store = store.clone();
                    match tokio::task::spawn_blocking(move || store.take_backup()).await {
                        Ok(Ok(path)) => {
                            backed_up = revision;
                            tracing::info!(backup = %path.display(), "store backed up");
                        }
                        Ok(Err(e)) => tracing::error!("store backup failed: {e}"),
                        Err(e) => tracing::error!("store backup task failed: {e}"),
                    }
                }
            }
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
        }
    }
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    pub api_addr: SocketAddr,
    /// Whether the config API takes TLS only (`https://`); on loopback
    /// without `--api-tls` it takes TLS and plain HTTP alike.
    pub api_tls: bool,
    pub xds_addr: Option<SocketAddr>,
    pub xds_plaintext_addr: Option<SocketAddr>,
    pub monitoring_addr: Option<SocketAddr>,
    pub identity: Arc<identity::Identity>,
    pub proxies: Arc<vmesh_xds::ads::StatusTable>,
    pub store: Arc<Store>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops every task and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Waits until the server stops on its own (it does not, short of a crash) or `shutdown` is asked.
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Room for a crowd of connections at once: every proxy of the mesh
/// reconnects together after a server restart.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), ServerError> {
    let bind_error = |source| ServerError::Bind { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

/// Each listener's gate: the connections the process's file descriptors
/// allow, shared out so that a crowd on one port leaves room on the others.
struct Gates {
    api: Arc<connections::Gate>,
    xds: Arc<connections::Gate>,
    xds_plaintext: Arc<connections::Gate>,
    monitoring: Arc<connections::Gate>,
}

impl Gates {
    fn new(limits: connections::ConnectionLimits) -> Gates {
        let fd_limit = connections::raise_fd_limit();
        let limits = limits.within_fd_limit(fd_limit);
        tracing::info!(
            fd_limit,
            connections = limits.total,
            per_source = limits.per_source,
            idle = ?limits.idle,
            "connection limits"
        );
        let share = |sixteenths: usize, what| {
            let total = (limits.total * sixteenths / 16).max(16);
            connections::Gate::new(
                connections::ConnectionLimits {
                    total,
                    per_source: limits.per_source.min(total),
                    ..limits
                },
                what,
            )
        };
        Gates {
            xds: share(10, "xDS and CA"),
            api: share(4, "config API"),
            xds_plaintext: share(1, "plaintext xDS"),
            monitoring: share(1, "monitoring"),
        }
    }
}

/// The most an HTTP/1 connection buffers, reading or writing.
const HTTP1_BUFFER_BYTES: usize = 64 << 10;

/// Resolves when shutdown is asked.
pub(crate) async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves an HTTP router until shutdown, HTTP/1 and HTTP/2 (prior
/// knowledge): connections admitted by `gate`, closed when the client is
/// silent for the idle limit with no request in flight or takes longer
/// than it to send a request head (slowloris); HTTP/2 peers are pinged. Returns once every connection
/// has finished (or been given up on, a few seconds after shutdown).
fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    gate: Arc<connections::Gate>,
    shutdown: watch::Receiver<bool>,
    tls: HttpTls,
) -> JoinHandle<()> {
    use futures::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    tokio::spawn(async move {
        let what = gate.what();
        let limits = gate.limits();
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.idle)
            // What a connection may buffer: hyper's default (~400 KiB) times
            // thousands of watchers that do not read is memory out of all
            // proportion; request heads fit in far less.
            .max_buf_size(HTTP1_BUFFER_BYTES);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(connections::keepalive_interval(limits))
            .keep_alive_timeout(connections::keepalive_interval(limits));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        // Each connection made ready (its TLS handshake, if any) on a task
        // of its own, so that a slow client holds up no one else.
        let first_byte_within = limits.idle.min(identity::HANDSHAKE_TIMEOUT);
        let mut connections = connections::incoming(listener, gate, shutdown, move |tcp, peer| {
            let tls = tls.clone();
            async move {
                let plain = |tcp| Some(Box::new(tcp) as Box<dyn HttpConnection>);
                let secure = |acceptor, tcp| async move {
                    identity::handshake(acceptor, tcp, peer)
                        .await
                        .map(|tls| Box::new(tls) as Box<dyn HttpConnection>)
                };
                match tls {
                    HttpTls::None => plain(tcp),
                    HttpTls::Only(acceptor) => secure(acceptor, tcp).await,
                    HttpTls::Either(acceptor) => {
                        // A TLS client speaks first with a handshake record (0x16);
                        // an HTTP one with a method or HTTP/2's preface.
                        let mut first = [0u8; 1];
                        match tokio::time::timeout(first_byte_within, tcp.peek(&mut first)).await {
                            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {
                                secure(acceptor, tcp).await
                            }
                            Ok(Ok(_)) => plain(tcp),
                            Ok(Err(_)) | Err(_) => None,
                        }
                    }
                }
            }
        });
        while let Some(Ok(connection)) = connections.next().await {
            let in_flight = connections::InFlight::default();
            let service =
                hyper_util::service::TowerToHyperService::new(in_flight.counting(router.clone()));
            let connection = graceful.watch(
                builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(connection.with_in_flight(in_flight)),
                        service,
                    )
                    .into_owned(),
            );
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("{what}: connection ended: {e}");
                }
            });
        }
        if tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("{what}: connections still open 5 s after shutdown; leaving them");
        }
    })
}

/// How an HTTP port takes TLS.
#[derive(Clone)]
enum HttpTls {
    /// Plain HTTP only (the monitoring port, loopback only).
    None,
    /// TLS or plain HTTP, told apart by the first byte the client sends
    /// (the config API on loopback).
    Either(tokio_rustls::TlsAcceptor),
    /// TLS only (the config API off loopback, or with `--api-tls`).
    Only(tokio_rustls::TlsAcceptor),
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A connection an HTTP port serves: TCP, or TLS over it.
trait HttpConnection: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> HttpConnection for T {}

/// Refuses a stored mesh configuration whose trust domain is not the CA's:
/// the identities the CA issues and those clients expect would differ.
fn check_trust_domain(store: &Store, ca_trust_domain: &str) -> Result<(), ServerError> {
    let mesh = mesh::stored_settings(store, None)?;
    if mesh.trust_domain_set && mesh.trust_domain != ca_trust_domain {
        return Err(ServerError::TrustDomainMismatch {
            sources: mesh.sources.join(", "),
            mesh: mesh.trust_domain,
            ca: ca_trust_domain.to_string(),
        });
    }
    Ok(())
}

/// Opens the store and starts the API, the mesh controller, and the xDS,
/// monitoring and config-dir services that are asked for.
pub async fn start(config: ServerConfig) -> Result<Running, ServerError> {
    if !config.api_addr.ip().is_loopback() && config.api_token.is_none() {
        return Err(ServerError::UnauthenticatedRemoteApi(config.api_addr));
    }
    if let Some(token) = &config.api_token
        && token.chars().count() < MIN_API_TOKEN_CHARS
    {
        return Err(ServerError::WeakApiToken(token.chars().count()));
    }
    if let Some(addr) = config.xds_plaintext_addr.filter(|a| !a.ip().is_loopback()) {
        return Err(ServerError::RemotePlaintextXds(addr));
    }
    if let Some(addr) = config.monitoring_addr.filter(|a| !a.ip().is_loopback()) {
        return Err(ServerError::RemoteMonitoring(addr));
    }
    if let vmesh_store::StoreLocation::Embedded(dir) = &config.store
        && !dir.join(vmesh_store::STORE_FILE).exists()
        && config.data_dir.join("ca").exists()
    {
        return Err(ServerError::StoreMissing(dir.clone()));
    }
    let store = Arc::new(Store::open_at(&config.store)?);
    let gates = Gates::new(config.connections);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (listener, api_addr) = bind(config.api_addr)?;
    let identity = Arc::new(identity::Identity::open(
        &config.data_dir,
        &config.identity,
        store.clone(),
    )?);
    check_trust_domain(&store, identity.authority.trust_domain())?;
    // A store that just passed its checks is the best backup there is
    // (etcd keeps its own copies).
    if !store.is_shared() {
        let backup = store.take_backup()?;
        tracing::info!(backup = %backup.display(), "store checked and backed up");
    }
    let metrics = monitoring::Metrics::new()?;
    let (controller, mesh) = mesh::MeshController::new(
        store.clone(),
        config.debounce,
        identity.authority.trust_domain(),
        metrics.clone(),
    )?;
    let proxies = Arc::new(vmesh_xds::ads::StatusTable::default());
    let router = api::router(
        store.clone(),
        mesh.clone(),
        config.api_token.clone(),
        shutdown_rx.clone(),
        identity.router().merge(discovery::router(proxies.clone())),
    );
    // TLS only off loopback (or when asked); on loopback TLS and plain HTTP
    // alike, as the client starts: kubectl sends a token only over TLS.
    let api_tls = config.api_tls || !api_addr.ip().is_loopback();
    let (acceptor, renewal) = identity.api_tls(api_addr.ip(), shutdown_rx.clone())?;
    let mut tasks = vec![renewal];
    tasks.push(serve_http(
        listener,
        router,
        gates.api.clone(),
        shutdown_rx.clone(),
        match api_tls {
            true => HttpTls::Only(acceptor),
            false => HttpTls::Either(acceptor),
        },
    ));
    tasks.push(tokio::spawn(controller.run(shutdown_rx.clone())));

    let registration = Arc::new(registration::AutoRegistration::new(
        store.clone(),
        config.auto_registration_grace,
    ));
    registration.sweep_orphans();
    tasks.push(tokio::spawn(registration.clone().run(shutdown_rx.clone())));
    let lifecycle: Arc<dyn vmesh_xds::ads::ProxyLifecycle> =
        Arc::new(registration::Registrar(registration));
    let mut xds_plaintext_addr = None;
    if let Some(addr) = config.xds_plaintext_addr {
        let (listener, bound) = bind(addr)?;
        xds_plaintext_addr = Some(bound);
        let ads = vmesh_xds::ads::Ads::new(mesh.clone(), proxies.clone(), shutdown_rx.clone())
            .with_lifecycle(lifecycle.clone())
            .with_metrics(metrics.xds.clone());
        let keepalive = connections::keepalive_interval(gates.xds_plaintext.limits());
        let incoming = connections::incoming(
            listener,
            gates.xds_plaintext.clone(),
            shutdown_rx.clone(),
            |tcp, _| async move { Some(tcp) },
        );
        let serve = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(keepalive))
            .add_service(ads.into_service())
            .serve_with_incoming_shutdown(incoming, stopped(shutdown_rx.clone()));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!("xDS server stopped: {e}");
            }
        }));
        tracing::info!(addr = %bound, "plaintext xDS listening (loopback only)");
    }

    tasks.push(identity.publish_root(shutdown_rx.clone()));
    tasks.push(identity.follow_deletions(shutdown_rx.clone()));
    if store.is_shared() {
        tasks.push(tokio::spawn(
            identity.clone().follow_shared_records(shutdown_rx.clone()),
        ));
        if identity.authority.is_root() {
            tasks.push(tokio::spawn(crate::enrollment::sign_requests(
                identity.clone(),
                shutdown_rx.clone(),
            )));
        }
    }
    tasks.push(tokio::spawn(store_upkeep(
        store.clone(),
        config.backup_interval,
        shutdown_rx.clone(),
    )));
    let mut xds_addr = None;
    if let Some(addr) = config.xds_addr {
        let (listener, bound) = bind(addr)?;
        xds_addr = Some(bound);
        let ads = vmesh_xds::ads::Ads::new(mesh.clone(), proxies.clone(), shutdown_rx.clone())
            .with_lifecycle(lifecycle.clone())
            .with_metrics(metrics.xds.clone());
        tasks.push(identity.serve_secure(
            listener,
            gates.xds.clone(),
            ads,
            metrics.ca.clone(),
            shutdown_rx.clone(),
        )?);
        tracing::info!(addr = %bound, "xDS and CA listening over TLS");
    }

    let mut monitoring_addr = None;
    if let Some(addr) = config.monitoring_addr {
        let (listener, bound) = bind(addr)?;
        monitoring_addr = Some(bound);
        tasks.push(serve_http(
            listener,
            monitoring::router(proxies.clone(), metrics.clone(), store.clone()),
            gates.monitoring.clone(),
            shutdown_rx.clone(),
            HttpTls::None,
        ));
    }

    if let Some(dir) = config.config_dir.clone() {
        let follower = config_dir::Follower::new(store.clone(), dir)?;
        tasks.push(tokio::spawn(follower.run(shutdown_rx.clone())));
    }
    tracing::info!(%api_addr, data_dir = %config.data_dir.display(), "config API listening");
    Ok(Running {
        api_addr,
        api_tls,
        xds_addr,
        xds_plaintext_addr,
        identity,
        monitoring_addr,
        proxies,
        store,
        shutdown,
        tasks,
    })
}
