//! The mesh's identity services inside the server: the CA and the token
//! issuer (keys in `<data-dir>/ca`), token revocations (kept in the store so
//! they survive restarts), the mesh root published to every namespace as
//! Istio's `istio-ca-root-cert` ConfigMap, the token API, and the TLS port
//! (15012) that carries the CA service and xDS for callers that prove who they
//! are, and the VM join endpoints ([`crate::join`]).
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
/// Where revocations are kept: a ConfigMap in the root namespace.
const REVOCATIONS_CONFIG_MAP: &str = "vmesh-token-revocations";
const REVOCATIONS_KEY: &str = "revocations.json";
const ROOT_NAMESPACE: &str = vmesh_api::mesh::DEFAULT_ROOT_NAMESPACE;
/// The longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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
}

impl Default for IdentityConfig {
    fn default() -> IdentityConfig {
        IdentityConfig {
            trust_domain: vmesh_api::mesh::DEFAULT_TRUST_DOMAIN.into(),
            plugged: None,
            options: AuthorityOptions::default(),
            extra_sans: Vec::new(),
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
    #[error(
        "the revocations in ConfigMap {ROOT_NAMESPACE}/{REVOCATIONS_CONFIG_MAP} are unreadable: {0}"
    )]
    Revocations(serde_json::Error),
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
    /// revocations from the store.
    pub fn open(
        data_dir: &std::path::Path,
        config: &IdentityConfig,
        store: Arc<Store>,
    ) -> Result<Identity, IdentityError> {
        let dir = data_dir.join("ca");
        let authority = match &config.plugged {
            Some(plugged) => Authority::from_files(
                &plugged.cert,
                &plugged.key,
                plugged.chain.as_deref(),
                &config.trust_domain,
                config.options.clone(),
            )?,
            None => Authority::load_or_create(&dir, &config.trust_domain, config.options.clone())?,
        };
        let issuer = TokenIssuer::load_or_create(&dir, &config.trust_domain)?;
        let revocations =
            match store.get(&config_map_key(ROOT_NAMESPACE, REVOCATIONS_CONFIG_MAP))? {
                Some(object) => match data_of(&object, REVOCATIONS_KEY) {
                    Some(text) => serde_json::from_str(text).map_err(IdentityError::Revocations)?,
                    None => Revocations::new(),
                },
                None => Revocations::new(),
            };
        Ok(Identity {
            authority: Arc::new(authority),
            issuer: Arc::new(issuer),
            store,
            revocations: watch::channel(Arc::new(revocations)).0,
            revoking: parking_lot::Mutex::new(()),
            joining: tokio::sync::Mutex::new(()),
            join_failures: crate::throttle::FailureThrottle::default(),
            extra_sans: config.extra_sans.clone(),
        })
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub fn revocations(&self) -> watch::Receiver<Arc<Revocations>> {
        self.revocations.subscribe()
    }

    /// Revokes one token, or every token issued to the account so far. The
    /// revocation is stored before it takes effect, and takes effect at once.
    pub fn revoke(
        &self,
        namespace: &str,
        service_account: &str,
        id: Option<&str>,
    ) -> Result<(), IdentityError> {
        let _revoking = self.revoking.lock();
        let mut next = (**self.revocations.borrow()).clone();
        match id {
            Some(id) => next.revoke_token(id),
            None => next.revoke_account(namespace, service_account, SystemTime::now()),
        }
        let text = serde_json::to_string(&next).map_err(IdentityError::Revocations)?;
        self.store.commit(vec![Op::Apply(config_map(
            ROOT_NAMESPACE,
            REVOCATIONS_CONFIG_MAP,
            BTreeMap::from([(REVOCATIONS_KEY, text)]),
        ))])?;
        self.revocations.send_replace(Arc::new(next));
        Ok(())
    }

    /// Keeps `istio-ca-root-cert` right in every namespace, as namespaces
    /// come and the ConfigMap is edited or deleted, until shutdown.
    pub fn publish_root(&self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let store = self.store.clone();
        let root = self.authority.root_pem().to_string();
        tokio::spawn(async move {
            let mut changes = store.changes();
            loop {
                if let Err(e) = publish_root_once(&store, &root) {
                    tracing::error!("cannot publish the mesh root to every namespace: {e}");
                }
                tokio::select! {
                    event = changes.recv() => if let Err(tokio::sync::broadcast::error::RecvError::Closed) = event {
                        return;
                    },
                    () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
                }
            }
        })
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
        let (chain, key) = self.authority.serving_certificate(&self.extra_sans)?;
        let tls = vmesh_ca::server_tls_config(&chain, &key, self.authority.root_pem())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let keepalive = crate::connections::keepalive_interval(gate.limits());
        let connections =
            crate::connections::incoming(listener, gate, shutdown.clone(), move |tcp, peer| {
                let acceptor = acceptor.clone();
                async move {
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
            });
        let authenticator = Arc::new(MeshAuthenticator {
            issuer: self.issuer.clone(),
            revocations: self.revocations(),
        });
        let ca = CertificateService::new(
            self.authority.clone(),
            self.issuer.clone(),
            self.revocations(),
        )
        .with_metrics(ca_metrics);
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

fn publish_root_once(store: &Store, root: &str) -> Result<(), IdentityError> {
    let (namespaces, _) = store.list(&Selection {
        collection: "core/namespaces".into(),
        namespace: None,
    })?;
    let mut ops = Vec::new();
    for namespace in namespaces.iter().filter_map(|n| n.metadata.name.as_deref()) {
        let current = store.get(&config_map_key(namespace, ROOT_CONFIG_MAP))?;
        if current.as_ref().and_then(|c| data_of(c, ROOT_CERT_KEY)) != Some(root) {
            ops.push(Op::Apply(config_map(
                namespace,
                ROOT_CONFIG_MAP,
                BTreeMap::from([(ROOT_CERT_KEY, root.to_string())]),
            )));
        }
    }
    if !ops.is_empty() {
        store.commit(ops)?;
    }
    Ok(())
}

/// Authenticates xDS callers as the CA does: a bearer token, else the mesh
/// certificate the TLS layer verified.
struct MeshAuthenticator {
    issuer: Arc<TokenIssuer>,
    revocations: watch::Receiver<Arc<Revocations>>,
}

impl Authenticator for MeshAuthenticator {
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<CallerIdentity, tonic::Status> {
        let peer = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| {
                let leaf = certs.first()?;
                PeerIdentity::from_certificate(leaf.as_ref(), self.issuer.trust_domain()).ok()
            });
        let metadata = tonic::metadata::MetadataMap::from_headers(headers.clone());
        let revocations = self.revocations.borrow().clone();
        let id = vmesh_ca::authenticate(&metadata, peer.as_ref(), &self.issuer, &revocations)
            .map_err(|e| {
                tracing::warn!("xDS caller refused: {e}");
                tonic::Status::from(e)
            })?;
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
    let key = ObjectKey {
        group: String::new(),
        plural: "namespaces".into(),
        namespace: String::new(),
        name: namespace.into(),
    };
    match identity.store.get(&key) {
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
