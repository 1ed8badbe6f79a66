//! `istio.v1.auth.IstioCertificateService/CreateCertificate`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::auth::authenticate;
use crate::authority::{Authority, CaError};
use crate::identity::{PeerIdentity, SpiffeId};
use crate::metrics::CaMetrics;
use crate::pb::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};
use crate::revocation::Revocations;
use crate::token::TokenIssuer;

/// The CA service. Every call authenticates the caller (see
/// [`crate::authenticate`]) against the revocations current at that moment,
/// and signs the CSR's key for the caller's own identity, whatever the CSR
/// asks for.
///
/// # Where the caller's certificate comes from
///
/// The service looks, in order, for
/// 1. a [`PeerIdentity`] request extension, inserted by a layer of the
///    server that terminated TLS and verified the client certificate
///    against the mesh root;
/// 2. tonic's `TlsConnectInfo<TcpConnectInfo>` extension, which tonic adds
///    by itself when the server is run with `serve_with_incoming` over
///    `tokio_rustls::server::TlsStream<tokio::net::TcpStream>` accepted with
///    [`crate::server_tls_config`] (whose verifier has already checked the
///    chain); the identity is read from the first (leaf) certificate.
///
/// Either way the certificate must have been verified before the request
/// reaches this service: the service only reads it.
#[derive(Clone)]
pub struct CertificateService {
    authority: Arc<Authority>,
    issuer: Arc<TokenIssuer>,
    revocations: watch::Receiver<Arc<Revocations>>,
    metrics: Option<CaMetrics>,
    issuance: Option<IssuanceCheck>,
    throttle: Option<Arc<dyn CallerThrottle>>,
}

/// Whether an authenticated identity may still be issued certificates (its
/// namespace still exists, say): `Err` says why not.
pub type IssuanceCheck = Arc<dyn Fn(&SpiffeId) -> Result<(), String> + Send + Sync>;

/// A brake on callers that keep presenting forged or guessed credentials,
/// by source address: `admit` is asked before a request is looked at
/// (`Err(wait)` turns it away for that long), `failed` is told of every
/// caller whose credential was never good ([`crate::AuthError::is_forgery`]).
pub trait CallerThrottle: Send + Sync {
    fn admit(&self, source: std::net::IpAddr) -> Result<(), Duration>;
    fn failed(&self, source: std::net::IpAddr);
}

impl std::fmt::Debug for CertificateService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateService")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl CertificateService {
    /// `revocations` is read at every call: sending a new value revokes at
    /// once, without restarting anything.
    pub fn new(
        authority: Arc<Authority>,
        issuer: Arc<TokenIssuer>,
        revocations: watch::Receiver<Arc<Revocations>>,
    ) -> Self {
        CertificateService {
            authority,
            issuer,
            revocations,
            metrics: None,
            issuance: None,
            throttle: None,
        }
    }

    /// The same service, turning away sources `throttle` says have failed
    /// too often, and telling it of every failed authentication.
    pub fn with_throttle(self, throttle: Arc<dyn CallerThrottle>) -> Self {
        CertificateService {
            throttle: Some(throttle),
            ..self
        }
    }

    /// The same service, asking `check` before signing for anyone.
    pub fn with_issuance_check(self, check: IssuanceCheck) -> Self {
        CertificateService {
            issuance: Some(check),
            ..self
        }
    }

    /// The same service, counting requests and certificates in `metrics`.
    pub fn with_metrics(self, metrics: CaMetrics) -> Self {
        CertificateService {
            metrics: Some(metrics),
            ..self
        }
    }

    fn count(&self, counter: impl Fn(&CaMetrics) -> &prometheus::IntCounter) {
        if let Some(metrics) = &self.metrics {
            counter(metrics).inc();
        }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }
}

/// The verified mesh identity of the caller of `request`, if it presented a
/// client certificate (see [`CertificateService`] for the two sources).
/// A certificate without a usable identity counts as none, and is logged.
pub fn peer_identity<T>(request: &Request<T>, trust_domain: &str) -> Option<PeerIdentity> {
    if let Some(peer) = request.extensions().get::<PeerIdentity>() {
        return Some(peer.clone());
    }
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    match PeerIdentity::from_certificate(leaf.as_ref(), trust_domain) {
        Ok(peer) => Some(peer),
        Err(e) => {
            tracing::debug!(error = %e, "client certificate carries no usable mesh identity");
            None
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.count(|m| &m.csrs);
        let remote = request.remote_addr();
        if let (Some(throttle), Some(source)) = (&self.throttle, remote)
            && let Err(wait) = throttle.admit(source.ip())
        {
            return Err(Status::resource_exhausted(format!(
                "too many failed attempts from {}; try again in {} s",
                source.ip(),
                wait.as_secs().max(1)
            )));
        }
        let peer = peer_identity(&request, self.authority.trust_domain());
        let revocations = self.revocations.borrow().clone();
        let caller = match authenticate(
            request.metadata(),
            peer.as_ref(),
            &self.issuer,
            &revocations,
        ) {
            Ok(caller) => caller,
            Err(e) => {
                self.count(|m| &m.authentication_failures);
                if let (Some(throttle), Some(source)) = (&self.throttle, remote)
                    && e.is_forgery()
                {
                    throttle.failed(source.ip());
                }
                tracing::warn!(remote = ?remote, error = %e, "certificate request refused: unauthenticated");
                return Err(e.into());
            }
        };
        if let Some(check) = &self.issuance
            && let Err(why) = check(&caller.id)
        {
            self.count(|m| &m.authentication_failures);
            tracing::warn!(identity = %caller.id, remote = ?remote, "certificate request refused: {why}");
            return Err(Status::permission_denied(why));
        }
        let body = request.into_inner();
        let requested = u64::try_from(body.validity_duration)
            .ok()
            .filter(|secs| *secs > 0)
            .map(Duration::from_secs);
        let authority = self.authority.clone();
        let identity = caller.id.clone();
        // Signing is CPU work (a signature check and a signature): keep it
        // off the async workers.
        let signed = tokio::task::spawn_blocking(move || {
            authority.sign_workload_in_lineage(
                &body.csr,
                &caller.id,
                requested,
                caller.lineage.as_deref(),
            )
        })
        .await
        .map_err(|e| Status::internal(format!("signing task failed: {e}")))?;
        match signed {
            Ok(cert_chain) => {
                self.count(|m| &m.issued);
                tracing::info!(identity = %identity, remote = ?remote, ttl_secs = self.authority.effective_ttl(requested).as_secs(), "issued workload certificate");
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                self.count(|m| &m.sign_errors);
                let message = with_causes(&e);
                tracing::warn!(identity = %identity, remote = ?remote, error = %message, "certificate request refused");
                Err(match e {
                    CaError::InvalidCsr { .. }
                    | CaError::CsrSignature
                    | CaError::UnsupportedKey(_) => Status::invalid_argument(message),
                    CaError::ForeignTrustDomain { .. } | CaError::Identity(_) => {
                        Status::permission_denied(message)
                    }
                    CaError::CaExpired(_) => Status::failed_precondition(message),
                    _ => Status::internal(message),
                })
            }
        }
    }
}

/// An error and its causes, `: `-separated, for a caller who sees only text.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
