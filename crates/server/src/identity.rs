//! The mesh's identity services inside the server: the CA and the token
//! issuer (keys in `<data-dir>/ca`), token revocations (a server-owned record
//! in the store, out of the config API's reach), the mesh root published to
//! every namespace as Istio's `istio-ca-root-cert` ConfigMap, the token API,
//! and the TLS port (15012) that carries the CA service and xDS for callers
//! that prove who they are, and the VM join endpoints ([`crate::join`]).
//!
//! The store remembers the root it was set up with: a server whose `ca/`
//! went missing, or whose root changed, refuses to start rather than make a
//! new root that no VM trusts. Deleting a namespace or a ServiceAccount
//! revokes what was issued to it and stops issuance until it exists again.
//!
//! Signing, token formats and caller authentication are `vmesh-ca`'s; what a
//! proxy is sent is `vmesh-xds`'s.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use vmesh_api::mesh::config_map;
use vmesh_api::{Object, ObjectKey};
use vmesh_ca::{
    Authority, AuthorityOptions, CertificateService, PeerIdentity, Revocations, TokenIssuer,
};
use vmesh_store::{Op, Selection, Store};
use vmesh_xds::ads::{Ads, Authenticator, CallerIdentity};

/// Istio's ConfigMap holding the mesh root in every namespace.
pub const ROOT_CONFIG_MAP: &str = "istio-ca-root-cert";
const ROOT_CERT_KEY: &str = "root-cert.pem";
/// The store record of revocations.
const REVOCATIONS_RECORD: &str = "revocations";
/// Where revocations were kept before they were a record: a ConfigMap in
/// the root namespace, moved into the record at start.
const LEGACY_REVOCATIONS_CONFIG_MAP: &str = "vmesh-token-revocations";
const LEGACY_REVOCATIONS_KEY: &str = "revocations.json";
/// The store record of the SHA-256 of the root the mesh was set up with.
const ROOT_RECORD: &str = "ca/root-sha256";
const ROOT_NAMESPACE: &str = vmesh_api::mesh::DEFAULT_ROOT_NAMESPACE;
/// The longest a TLS handshake may take before the connection is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS handshake with a client on a connection of its own, under
/// [`HANDSHAKE_TIMEOUT`]; `None` (logged) when it fails or takes too long.
pub(crate) async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::info!(%peer, "TLS handshake refused: {e}");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}
/// The longest join token the API issues.
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(30 * 24 * 3600);

/// An operator's CA (the plug-in case): its certificate and key, and the
/// chain up to the root when the certificate is an intermediate.
#[derive(Debug, Clone)]
pub struct PluggedCa {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub chain: Option<PathBuf>,
}

/// How the server's CA is set up.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub trust_domain: String,
    /// `None`: a root of our own, created on first start in `<data-dir>/ca`.
    pub plugged: Option<PluggedCa>,
    pub options: AuthorityOptions,
    /// Names the serving certificate of 15012 carries besides
    /// `istiod.istio-system.svc` (a gateway hostname, an IP).
    pub extra_sans: Vec<String>,
    /// Start even though the root is not the one the store was set up with
    /// (a deliberate root change: every VM must then be given the new root).
    pub accept_new_root: bool,
}

impl Default for IdentityConfig {
    fn default() -> IdentityConfig {
        IdentityConfig {
            trust_domain: vmesh_api::mesh::DEFAULT_TRUST_DOMAIN.into(),
            plugged: None,
            options: AuthorityOptions::default(),
            extra_sans: Vec::new(),
            accept_new_root: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("CA: {0}")]
    Ca(#[from] vmesh_ca::CaError),
    #[error("tokens: {0}")]
    Token(#[from] vmesh_ca::TokenError),
    #[error("TLS for the xDS port: {0}")]
    Tls(#[from] vmesh_ca::TlsError),
    #[error("store: {0}")]
    Store(#[from] vmesh_store::StoreError),
    #[error("store: {0}")]
    Batch(#[from] vmesh_store::BatchError),
    #[error("the store's token revocations are unreadable: {0}")]
    Revocations(serde_json::Error),
    #[error("enrolling with the control plane's root: {0}")]
    Enrollment(String),
    #[error(
        "{} is missing, but this store was set up with CA root {recorded}: a new root would break \
         every VM's trust. Restore {} from a backup (it holds the root key and the token-signing \
         key); if it is lost for good, start with --accept-new-root and onboard every VM again",
        dir.display(), dir.display()
    )]
    CaMissing { dir: PathBuf, recorded: String },
    #[error(
        "the CA root (SHA-256 {found}) is not the one this store was set up with ({recorded}): \
         check --data-dir and --ca-cert. Servers sharing one store (etcd) issue under one root: give \
         each an intermediate of it (vmesh ca intermediate --root-dir <the root's directory, such as \
         the first server's <data-dir>/ca> --out DIR --name NAME, then --ca-cert DIR/ca-cert.pem \
         --ca-key DIR/ca-key.pem --ca-chain DIR/cert-chain.pem). To change roots deliberately, start \
         with --accept-new-root and give every VM the new root"
    )]
    RootChanged { found: String, recorded: String },
}

/// The CA, the token issuer and the current revocations.
pub struct Identity {
    pub authority: Arc<Authority>,
    pub issuer: Arc<TokenIssuer>,
    store: Arc<Store>,
    revocations: watch::Sender<Arc<Revocations>>,
    /// Revocations are read, changed and stored under this lock, so
    /// concurrent revocations all stay.
    revoking: parking_lot::Mutex<()>,
    /// Joins spend join-token uses one at a time.
    pub(crate) joining: tokio::sync::Mutex<()>,
    /// Failed joins by source: guessing join tokens is slowed to a crawl.
    pub(crate) join_failures: crate::throttle::FailureThrottle,
    /// Failed credentials at the CA and xDS by source, likewise.
    credential_failures: Arc<crate::throttle::CredentialThrottle>,
    extra_sans: Vec<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

fn config_map_key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        group: String::new(),
        plural: "configmaps".into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn data_of<'a>(object: &'a Object, key: &str) -> Option<&'a str> {
    object.body.get("data")?.get(key)?.as_str()
}

impl Identity {
    /// Loads (or on first start creates) the CA and token keys, and the
    /// revocations from the store. Refuses a missing `ca/` or a changed
    /// root when the store remembers another one.
    pub fn open(
        data_dir: &std::path::Path,
        config: &IdentityConfig,
        store: Arc<Store>,
    ) -> Result<Identity, IdentityError> {
        let dir = data_dir.join("ca");
        let recorded_root = recorded_root(&store)?;
        // A server that enrolled before keeps its intermediate; one joining
        // a shared store that has a root elsewhere enrolls now.
        let mut plugged = config
            .plugged
            .clone()
            .or_else(|| crate::enrollment::enrolled(&dir));
        let own_root = dir.join(vmesh_ca::ROOT_CERT_FILE).exists();
        if plugged.is_none()
            && !own_root
            && recorded_root.is_some()
            && store.is_shared()
            && !config.accept_new_root
        {
            plugged = Some(crate::enrollment::enroll(
                &store,
                &dir,
                &config.trust_domain,
            )?);
        }
        // A root of our own lives in `ca/`; a plugged-in CA (each server's
        // intermediate, on a shared store) is checked against the recorded
        // root below instead.
        if let Some(recorded) = &recorded_root
            && plugged.is_none()
            && !dir.exists()
            && !config.accept_new_root
        {
            return Err(IdentityError::CaMissing {
                dir,
                recorded: recorded.clone(),
            });
        }
        let authority = match &plugged {
            Some(plugged) => Authority::from_files(
                &plugged.cert,
                &plugged.key,
                plugged.chain.as_deref(),
                &config.trust_domain,
                config.options.clone(),
            )?,
            None => Authority::load_or_create(&dir, &config.trust_domain, config.options.clone())?,
        };
        let root = sha256_hex(authority.root_pem());
        match recorded_root {
            Some(recorded) if recorded == root => {}
            Some(recorded) if !config.accept_new_root => {
                return Err(IdentityError::RootChanged {
                    found: root,
                    recorded,
                });
            }
            _ => store.write_records(vec![(ROOT_RECORD.into(), Some(root.into_bytes()))])?,
        }
        let issuer = TokenIssuer::load_or_create(&dir, &config.trust_domain)?;
        // Tokens this server signs verify on every server of the control
        // plane: its public key is published, and theirs are trusted.
        let (key_id, public_pem) = issuer.public_key();
        store.write_records(vec![(
            format!("{TOKEN_KEY_RECORDS}{key_id}"),
            Some(public_pem.as_bytes().to_vec()),
        )])?;
        trust_peer_keys(&store, &issuer)?;
        let revocations = load_revocations(&store)?;
        Ok(Identity {
            authority: Arc::new(authority),
            issuer: Arc::new(issuer),
            store,
            revocations: watch::channel(Arc::new(revocations)).0,
            revoking: parking_lot::Mutex::new(()),
            joining: tokio::sync::Mutex::new(()),
            join_failures: crate::throttle::FailureThrottle::default(),
            credential_failures: Arc::default(),
            extra_sans: config.extra_sans.clone(),
        })
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub fn revocations(&self) -> watch::Receiver<Arc<Revocations>> {
        self.revocations.subscribe()
    }

    /// Revokes one token (and the lineage of certificates issued with it),
    /// or every token and certificate issued to the account so far. The
    /// revocation is stored before it takes effect, and takes effect at once.
    pub fn revoke(
        &self,
        namespace: &str,
        service_account: &str,
        id: Option<&str>,
    ) -> Result<(), IdentityError> {
        self.change_revocations(|revocations| match id {
            Some(id) => revocations.revoke_token(id),
            None => revocations.revoke_account(namespace, service_account, SystemTime::now()),
        })
    }

    /// Changes the revocations as stored (forgetting token revocations old
    /// enough that nothing of their lineage can be alive), then makes them
    /// current. The change is written only over the record it was made to,
    /// so two servers revoking at once keep both.
    pub(crate) fn change_revocations(
        &self,
        change: impl Fn(&mut Revocations),
    ) -> Result<(), IdentityError> {
        let _revoking = self.revoking.lock();
        let keep_for = MAX_TOKEN_LIFE
            .max(crate::join::MAX_JOIN_LIFE)
            .max(self.authority.options().max_workload_ttl);
        for _ in 0..8 {
            let read = self.store.record(REVOCATIONS_RECORD)?;
            let mut next = match &read {
                Some(bytes) => serde_json::from_slice(bytes).map_err(IdentityError::Revocations)?,
                None => Revocations::new(),
            };
            change(&mut next);
            next.expire(SystemTime::now(), keep_for);
            let bytes = serde_json::to_vec(&next).map_err(IdentityError::Revocations)?;
            if self
                .store
                .swap_record(REVOCATIONS_RECORD, read.as_deref(), Some(bytes))?
            {
                self.revocations.send_replace(Arc::new(next));
                return Ok(());
            }
        }
        Err(vmesh_store::StoreError::Unavailable(
            "the revocations kept changing on other servers meanwhile: try again".into(),
        )
        .into())
    }

    /// Keeps what this server shares with the other servers on the same
    /// etcd current until shutdown, re-reading it every second: the
    /// revocations (a token revoked through any server is refused by every
    /// one) and the token keys (a token signed by any verifies on every one).
    pub async fn follow_shared_records(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(SHARED_RECORDS_POLL);
        let mut known: Option<Vec<u8>> = None;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let identity = self.clone();
            let read = tokio::task::spawn_blocking(move || {
                trust_peer_keys(&identity.store, &identity.issuer)?;
                identity
                    .store
                    .record(REVOCATIONS_RECORD)
                    .map_err(IdentityError::from)
            })
            .await;
            let bytes = match read {
                Ok(Ok(Some(bytes))) => bytes,
                Ok(Err(e)) => {
                    tracing::warn!("reading the shared records: {e}");
                    continue;
                }
                _ => continue,
            };
            if known.as_ref() == Some(&bytes) {
                continue;
            }
            match serde_json::from_slice::<Revocations>(&bytes) {
                Ok(current) => {
                    self.revocations.send_replace(Arc::new(current));
                    known = Some(bytes);
                }
                Err(e) => tracing::error!("the stored revocations do not decode: {e}"),
            }
        }
    }

    /// Whether `id` may be issued certificates: its namespace exists, and
    /// neither it nor its ServiceAccount was deleted.
    pub(crate) fn may_issue(&self, id: &vmesh_ca::SpiffeId) -> Result<(), String> {
        match self.store.get(&namespace_key(&id.namespace)) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("namespace {:?} does not exist", id.namespace)),
            Err(e) => return Err(e.to_string()),
        }
        if self
            .revocations
            .borrow()
            .is_deleted(&id.namespace, &id.service_account)
        {
            return Err(format!(
                "service account {}/{} was deleted",
                id.namespace, id.service_account
            ));
        }
        Ok(())
    }

    /// Revokes what was issued to ServiceAccounts and namespaces as they are
    /// deleted, and lifts the stop on issuance when they are created again,
    /// until shutdown.
    pub fn follow_deletions(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let identity = self.clone();
        tokio::spawn(async move {
            let mut changes = identity.store.changes();
            loop {
                let event = tokio::select! {
                    event = changes.next() => event,
                    () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
                };
                let event = match event {
                    Ok(event) => event,
                    Err(missed) => {
                        tracing::error!(
                            "deletions of namespaces and service accounts may have been missed: {missed}"
                        );
                        continue;
                    }
                };
                let object = &event.object;
                if object.api_version != "v1" {
                    continue;
                }
                let (namespace, account) = match object.kind.as_str() {
                    "ServiceAccount" => (
                        object.metadata.namespace().unwrap_or_default(),
                        Some(object.metadata.name()),
                    ),
                    "Namespace" => (object.metadata.name(), None),
                    _ => continue,
                };
                let deleted = event.event_type == vmesh_store::EventType::Deleted;
                let marked = identity
                    .revocations
                    .borrow()
                    .is_deleted(namespace, account.unwrap_or("*"));
                if !deleted && !marked {
                    // Created, and never deleted: nothing to lift.
                    continue;
                }
                let (namespace, account) = (namespace.to_string(), account.map(str::to_string));
                let changed = identity.change_revocations(|revocations| {
                    revocations.set_deleted(
                        &namespace,
                        account.as_deref(),
                        deleted,
                        SystemTime::now(),
                    );
                });
                if let Err(e) = changed {
                    tracing::error!(%namespace, ?account, "cannot record a deletion's revocation: {e}");
                }
            }
        })
    }

    /// Keeps `istio-ca-root-cert` right in every namespace, as namespaces
    /// come and the ConfigMap is edited or deleted, until shutdown. Every
    /// namespace is looked at once at start (and again if changes were
    /// missed); after that each change costs one look at the namespace it
    /// touches, so creating N namespaces costs N, not N².
    pub fn publish_root(&self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let store = self.store.clone();
        let root = self.authority.root_pem().to_string();
        tokio::spawn(async move {
            let mut changes = store.changes();
            let mut everywhere = true;
            loop {
                if everywhere {
                    everywhere = false;
                    if let Err(e) = publish_root_everywhere(&store, &root) {
                        tracing::error!("cannot publish the mesh root to every namespace: {e}");
                    }
                }
                let event = tokio::select! {
                    event = changes.next() => event,
                    () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
                };
                match event {
                    Ok(event) => {
                        if let Some(namespace) = namespace_needing_root(&event)
                            && let Err(e) = publish_root_in(&store, &root, namespace)
                        {
                            tracing::error!(%namespace, "cannot publish the mesh root: {e}");
                        }
                    }
                    Err(_) => everywhere = true,
                }
            }
        })
    }

    /// The TLS of the config API when it is served over TLS: a serving
    /// certificate from the mesh CA for the loopback names, `api_ip` (unless
    /// it is the unspecified address) and the extra names (`--xds-san`);
    /// HTTP/2 or HTTP/1.1. Clients trust the mesh root.
    pub fn api_tls(
        self: &Arc<Self>,
        api_ip: std::net::IpAddr,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(tokio_rustls::TlsAcceptor, JoinHandle<()>), IdentityError> {
        let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        if !api_ip.is_unspecified() {
            sans.push(api_ip.to_string());
        }
        sans.extend(self.extra_sans.iter().cloned());
        let (serving, renewal) = self.renewed_serving_certificate(sans, shutdown)?;
        let mut tls = vmesh_ca::renewable_server_tls_config(serving, self.authority.root_pem())?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok((tokio_rustls::TlsAcceptor::from(Arc::new(tls)), renewal))
    }

    /// A serving certificate for `sans` from the mesh CA, renewed (a new
    /// key and certificate) when two thirds of its life have passed, for as
    /// long as the server runs: the task that renews it.
    fn renewed_serving_certificate(
        self: &Arc<Self>,
        sans: Vec<String>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(Arc<vmesh_ca::ServingCertificate>, JoinHandle<()>), IdentityError> {
        let (chain, key) = self.authority.serving_certificate(&sans)?;
        let serving = Arc::new(vmesh_ca::ServingCertificate::new(&chain, &key)?);
        let renew_every = self.authority.options().serving_ttl * 2 / 3;
        let (identity, current) = (self.clone(), serving.clone());
        let renewal = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(renew_every) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                let renewed = identity
                    .authority
                    .serving_certificate(&sans)
                    .map_err(IdentityError::from)
                    .and_then(|(chain, key)| Ok(current.replace(&chain, &key)?));
                match renewed {
                    Ok(()) => tracing::info!(names = ?sans, "serving certificate renewed"),
                    // Tried again at the next turn; the current one is still valid then.
                    Err(e) => tracing::error!("renewing the serving certificate: {e}"),
                }
            }
        });
        Ok((serving, renewal))
    }

    /// Serves the CA and authenticated xDS over TLS on `listener` until
    /// shutdown, connections admitted by `gate`.
    pub fn serve_secure(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        gate: Arc<crate::connections::Gate>,
        ads: Ads,
        ca_metrics: vmesh_ca::metrics::CaMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Result<JoinHandle<()>, IdentityError> {
        let (serving, renewal) =
            self.renewed_serving_certificate(self.extra_sans.clone(), shutdown.clone())?;
        let tls = vmesh_ca::renewable_server_tls_config(serving, self.authority.root_pem())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let keepalive = crate::connections::keepalive_interval(gate.limits());
        let connections =
            crate::connections::incoming(listener, gate, shutdown.clone(), move |tcp, peer| {
                handshake(acceptor.clone(), tcp, peer)
            });
        let authenticator = Arc::new(MeshAuthenticator {
            issuer: self.issuer.clone(),
            revocations: self.revocations(),
            throttle: self.credential_failures.clone(),
        });
        let gatekeeper = self.clone();
        let ca = CertificateService::new(
            self.authority.clone(),
            self.issuer.clone(),
            self.revocations(),
        )
        .with_metrics(ca_metrics)
        .with_issuance_check(Arc::new(move |id| gatekeeper.may_issue(id)))
        .with_throttle(self.credential_failures.clone());
        // The VM join endpoints share the port: a joining VM knows only this address.
        let join = Router::new()
            .route(crate::join::BOOTSTRAP_PATH, get(crate::join::bootstrap))
            .route(crate::join::ROOT_PATH, get(crate::join::root_cert))
            .with_state(self.clone());
        let routes = tonic::service::Routes::from(join)
            .add_service(ca.into_server())
            .add_service(ads.authenticated(authenticator).into_service());
        let serve = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(keepalive))
            .add_routes(routes)
            .serve_with_incoming_shutdown(connections, crate::stopped(shutdown));
        Ok(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!("secure xDS and CA stopped: {e}");
            }
            let _ = renewal.await;
        }))
    }

    /// The token API, behind the config API's own authentication.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                "/apis/vmesh.io/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
                post(create_token),
            )
            .route(
                "/apis/vmesh.io/v1/namespaces/{namespace}/serviceaccounts/{account}/revoke",
                post(revoke_tokens),
            )
            .route(
                "/apis/vmesh.io/v1/namespaces/{namespace}/workloadgroups/{group}/jointokens",
                post(crate::join::create),
            )
            .route(
                "/apis/vmesh.io/v1/namespaces/{namespace}/workloadgroups/{group}/jointokens/revoke",
                post(crate::join::revoke),
            )
            .with_state(self.clone())
    }
}

fn namespace_key(name: &str) -> ObjectKey {
    ObjectKey {
        group: String::new(),
        plural: "namespaces".into(),
        namespace: String::new(),
        name: name.into(),
    }
}

pub(crate) fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The root the store was set up with: its record, or for a store from
/// before the record, the root it published.
fn recorded_root(store: &Store) -> Result<Option<String>, IdentityError> {
    if let Some(bytes) = store.record(ROOT_RECORD)? {
        return Ok(Some(String::from_utf8_lossy(&bytes).into_owned()));
    }
    let published = store.get(&config_map_key(ROOT_NAMESPACE, ROOT_CONFIG_MAP))?;
    Ok(published
        .as_ref()
        .and_then(|object| data_of(object, ROOT_CERT_KEY))
        .map(sha256_hex))
}

/// How often a server on a shared store reads the revocations and the
/// token keys again.
const SHARED_RECORDS_POLL: Duration = Duration::from_secs(1);

/// Where each server's token-signing public key is published, by key id.
const TOKEN_KEY_RECORDS: &str = "token-keys/";

/// Trusts the token keys every server of the control plane published.
fn trust_peer_keys(store: &Store, issuer: &TokenIssuer) -> Result<(), IdentityError> {
    for (name, pem) in store.records(TOKEN_KEY_RECORDS)? {
        let pem = String::from_utf8_lossy(&pem);
        if let Err(e) = issuer.trust_peer(&pem) {
            tracing::error!(record = %name, "a published token key is unusable: {e}");
        }
    }
    Ok(())
}

/// The revocations record. A store without one gets one at once, with the
/// revocations of the ConfigMap that held them before records existed
/// moved in (junk there is logged and dropped); from then on that
/// ConfigMap means nothing, so the config API cannot reach revocations.
fn load_revocations(store: &Store) -> Result<Revocations, IdentityError> {
    if let Some(bytes) = store.record(REVOCATIONS_RECORD)? {
        return serde_json::from_slice(&bytes).map_err(IdentityError::Revocations);
    }
    let legacy_key = config_map_key(ROOT_NAMESPACE, LEGACY_REVOCATIONS_CONFIG_MAP);
    let legacy = store.get(&legacy_key)?;
    let revocations = match legacy
        .as_ref()
        .and_then(|object| data_of(object, LEGACY_REVOCATIONS_KEY))
        .map(serde_json::from_str::<Revocations>)
    {
        Some(Ok(old)) => old,
        Some(Err(e)) => {
            tracing::error!(
                "ConfigMap {ROOT_NAMESPACE}/{LEGACY_REVOCATIONS_CONFIG_MAP} held unreadable revocations, dropped: {e}"
            );
            Revocations::new()
        }
        None => Revocations::new(),
    };
    let bytes = serde_json::to_vec(&revocations).map_err(IdentityError::Revocations)?;
    store.write_records(vec![(REVOCATIONS_RECORD.into(), Some(bytes))])?;
    if legacy.is_some() {
        store.commit(vec![Op::Delete {
            key: legacy_key,
            expected: None,
        }])?;
        tracing::info!("token revocations moved from a ConfigMap into the store's own records");
    }
    Ok(revocations)
}

/// The namespace whose root ConfigMap a change may have made wrong: a new
/// namespace, or a change to the ConfigMap itself.
fn namespace_needing_root(event: &vmesh_store::WatchEvent) -> Option<&str> {
    let object = &event.object;
    if object.api_version != "v1" {
        return None;
    }
    match object.kind.as_str() {
        "Namespace" if event.event_type != vmesh_store::EventType::Deleted => {
            Some(object.metadata.name())
        }
        "ConfigMap" if object.metadata.name() == ROOT_CONFIG_MAP => object.metadata.namespace(),
        _ => None,
    }
}

fn root_config_map(namespace: &str, root: &str) -> Op {
    Op::Apply(config_map(
        namespace,
        ROOT_CONFIG_MAP,
        BTreeMap::from([(ROOT_CERT_KEY, root.to_string())]),
    ))
}

fn publish_root_everywhere(store: &Store, root: &str) -> Result<(), IdentityError> {
    let (namespaces, _) = store.list(&Selection {
        collection: "core/namespaces".into(),
        namespace: None,
    })?;
    let (published, _) = store.list(&Selection {
        collection: "core/configmaps".into(),
        namespace: None,
    })?;
    let right: std::collections::BTreeSet<&str> = published
        .iter()
        .filter(|c| c.metadata.name() == ROOT_CONFIG_MAP && data_of(c, ROOT_CERT_KEY) == Some(root))
        .filter_map(|c| c.metadata.namespace())
        .collect();
    let ops: Vec<Op> = namespaces
        .iter()
        .map(|n| n.metadata.name())
        .filter(|namespace| !right.contains(namespace))
        .map(|namespace| root_config_map(namespace, root))
        .collect();
    if !ops.is_empty() {
        store.commit(ops)?;
    }
    Ok(())
}

fn publish_root_in(store: &Store, root: &str, namespace: &str) -> Result<(), IdentityError> {
    let current = store.get(&config_map_key(namespace, ROOT_CONFIG_MAP))?;
    if current.as_ref().and_then(|c| data_of(c, ROOT_CERT_KEY)) == Some(root) {
        return Ok(());
    }
    match store.commit(vec![root_config_map(namespace, root)]) {
        // The namespace went meanwhile: nothing to publish into.
        Err(vmesh_store::BatchError {
            error: vmesh_store::StoreError::NamespaceNotFound(_),
            ..
        }) => Ok(()),
        other => other.map(drop).map_err(Into::into),
    }
}

/// Authenticates xDS callers as the CA does: a bearer token, else the mesh
/// certificate the TLS layer verified.
struct MeshAuthenticator {
    issuer: Arc<TokenIssuer>,
    revocations: watch::Receiver<Arc<Revocations>>,
    throttle: Arc<crate::throttle::CredentialThrottle>,
}

impl Authenticator for MeshAuthenticator {
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<CallerIdentity, tonic::Status> {
        use vmesh_ca::CallerThrottle;
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let source = tls
            .and_then(|info| info.get_ref().remote_addr())
            .map(|addr| addr.ip());
        if let Some(source) = source
            && let Err(wait) = self.throttle.admit(source)
        {
            return Err(tonic::Status::resource_exhausted(format!(
                "too many failed attempts from {source}; try again in {} s",
                wait.as_secs().max(1)
            )));
        }
        let peer = tls.and_then(|info| info.peer_certs()).and_then(|certs| {
            let leaf = certs.first()?;
            PeerIdentity::from_certificate(leaf.as_ref(), self.issuer.trust_domain()).ok()
        });
        let metadata = tonic::metadata::MetadataMap::from_headers(headers.clone());
        let revocations = self.revocations.borrow().clone();
        let id = vmesh_ca::authenticate(&metadata, peer.as_ref(), &self.issuer, &revocations)
            .map_err(|e| {
                if let Some(source) = source
                    && e.is_forgery()
                {
                    self.throttle.failed(source);
                }
                tracing::warn!("xDS caller refused: {e}");
                tonic::Status::from(e)
            })?
            .id;
        Ok(CallerIdentity {
            namespace: id.namespace,
            service_account: id.service_account,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    duration_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    id: Option<String>,
}

pub(crate) fn problem(code: StatusCode, message: String) -> Response {
    (
        code,
        Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code.as_u16()})),
    )
        .into_response()
}

fn namespace_exists(identity: &Identity, namespace: &str) -> Result<(), (StatusCode, String)> {
    match identity.store.get(&namespace_key(namespace)) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err((
            StatusCode::NOT_FOUND,
            format!("namespace {namespace:?} does not exist"),
        )),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn create_token(
    State(identity): State<Arc<Identity>>,
    Path((namespace, account)): Path<(String, String)>,
    request: Option<Json<TokenRequest>>,
) -> Response {
    if let Err((code, message)) = namespace_exists(&identity, &namespace) {
        return problem(code, message);
    }
    if identity
        .revocations
        .borrow()
        .is_deleted(&namespace, &account)
    {
        return problem(
            StatusCode::NOT_FOUND,
            format!("service account {namespace}/{account} was deleted; create it again first"),
        );
    }
    let seconds = request.and_then(|r| r.duration_seconds).unwrap_or(3600);
    let life = Duration::from_secs(seconds);
    if life.is_zero() || life > MAX_TOKEN_LIFE {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "durationSeconds {seconds} is out of range: 1 to {}",
                MAX_TOKEN_LIFE.as_secs()
            ),
        );
    }
    match identity.issuer.issue(&namespace, &account, life) {
        Ok(issued) => Json(json!({
            "token": issued.token,
            "id": issued.id,
            "expires": humantime::format_rfc3339_seconds(issued.expires).to_string(),
        }))
        .into_response(),
        Err(e) => problem(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

async fn revoke_tokens(
    State(identity): State<Arc<Identity>>,
    Path((namespace, account)): Path<(String, String)>,
    request: Option<Json<RevokeRequest>>,
) -> Response {
    if let Err((code, message)) = namespace_exists(&identity, &namespace) {
        return problem(code, message);
    }
    let id = request.and_then(|r| r.0.id);
    match identity.revoke(&namespace, &account, id.as_deref()) {
        Ok(()) => Json(json!({"revoked": id.map_or_else(
            || format!("every token of {namespace}/{account} issued so far"),
            |id| format!("token {id}"),
        )}))
        .into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
