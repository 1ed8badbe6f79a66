//! The workload's identity: an ECDSA P-256 key and a certificate for its
//! SPIFFE id from the mesh CA, kept on disk, renewed before it expires,
//! and published to whoever presents it (SDS for Envoy, the xDS proxy for
//! the control plane).
//!
//! The [`CertificateManager`]
//! - reads the last key and chain from its directory at start, and uses
//!   them if they are still valid, chain to the mesh root and name the
//!   configured identity — so a restart, or a reboot after the bootstrap
//!   token expired, carries on;
//! - otherwise asks the CA with the bootstrap token
//!   (`authorization: Bearer …`);
//! - renews at half life plus up to a tenth (see [`RenewalPolicy`]) with a
//!   new key, authenticating with the current certificate (mutual TLS, no
//!   token); if the certificate has expired, or the CA refuses it and a
//!   token is at hand, with the token;
//! - retries failures with exponential backoff, and never gives up;
//! - stores every new pair atomically (key 0600) before publishing it on a
//!   `tokio::sync::watch` channel.
//!
//! Deadlines run on tokio's clock, computed from the validity written in
//! the certificate, so renewal is testable on a paused clock; a wall-clock
//! check every few minutes catches up after the machine was suspended.
//!
//! This module does not own the CA's wire protocol details beyond one call
//! ([`CaClient`]), the sockets Envoy reads from ([`crate::sds`]), or where
//! the token and root come from (the agent's configuration).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use vmesh_ca::SpiffeId;

use crate::backoff::Backoff;
use crate::upstream::UpstreamError;

mod ca_client;
mod credentials;
mod schedule;
mod store;

pub use ca_client::CaClient;
pub use credentials::{Credentials, TrustAnchors, new_key_and_csr, split_pem_certificates};
pub use schedule::RenewalPolicy;
pub use store::{CHAIN_FILE, KEY_FILE};

/// How often a pending renewal compares its deadline with the wall clock,
/// which keeps running while a suspended machine's monotonic clock stops.
const WALL_CLOCK_CHECK: Duration = Duration::from_secs(300);

/// Why credentials could not be loaded, obtained or accepted.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mesh root certificates: {0}")]
    BadTrustAnchors(String),
    #[error("certificate: {0}")]
    BadCertificate(String),
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("certificate does not verify against the mesh root: {0}")]
    Untrusted(String),
    #[error("certificate identity: {0}")]
    CertificateIdentity(#[from] vmesh_ca::CertIdentityError),
    #[error("workload identity: {0}")]
    InvalidIdentity(#[from] vmesh_ca::IdentityError),
    #[error(
        "the CA issued a certificate for {found}, but this workload is {expected}: check the token's service account and the agent's SERVICE_ACCOUNT / POD_NAMESPACE"
    )]
    WrongIdentity {
        expected: Box<SpiffeId>,
        found: Box<SpiffeId>,
    },
    #[error("key or CSR generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(
        "no valid certificate and no bootstrap token{}: onboard the workload again (vmesh workload entry configure) to get a token",
        .token_file.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_default()
    )]
    NoCredentials { token_file: Option<PathBuf> },
    #[error("certificate request failed: {0}")]
    Sign(#[from] SignError),
}

/// Why the CA did not sign.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the CA refused ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the CA answered with an empty certificate chain")]
    EmptyChain,
    #[error("the bootstrap token contains characters not allowed in a header")]
    BadToken,
}

impl SignError {
    /// The CA did not accept the credentials presented.
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            SignError::Refused {
                code: tonic::Code::Unauthenticated | tonic::Code::PermissionDenied,
                ..
            }
        )
    }
}

/// How a certificate request is authenticated.
#[derive(Debug, Clone, Copy)]
pub enum CaAuth<'a> {
    /// `authorization: Bearer <token>`, over server-authenticated TLS.
    Token(&'a str),
    /// The current certificate as TLS client certificate, no token.
    Certificate(&'a Credentials),
}

/// Something that turns a CSR into a certificate chain: the mesh CA over
/// the network ([`CaClient`]), or a fake in tests.
#[tonic::async_trait]
pub trait CertificateSigner: Send + Sync + 'static {
    /// Signs `csr_pem`; `validity` is the life asked for (the CA decides).
    /// Returns PEM certificates, leaf first.
    async fn sign(
        &self,
        csr_pem: &str,
        validity: Option<Duration>,
        auth: CaAuth<'_>,
    ) -> Result<Vec<String>, SignError>;
}

/// What the manager is to keep.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityConfig {
    /// The workload's identity, `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub identity: SpiffeId,
    /// Where key and chain are kept (created 0700).
    pub cert_dir: PathBuf,
    /// The bootstrap token (`istio-token`), read whenever it is needed.
    pub token_file: Option<PathBuf>,
    /// The certificate life asked of the CA; `None` takes the CA's default
    /// (24 h).
    #[serde(with = "crate::duration_secs::option")]
    pub requested_ttl: Option<Duration>,
    pub renewal: RenewalPolicy,
}

impl IdentityConfig {
    pub fn new(identity: SpiffeId, cert_dir: impl Into<PathBuf>) -> IdentityConfig {
        IdentityConfig {
            identity,
            cert_dir: cert_dir.into(),
            token_file: None,
            requested_ttl: None,
            renewal: RenewalPolicy::default(),
        }
    }
}

/// The manager's progress, for health and debug output.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdentityStatus {
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// Certificates obtained since start.
    pub issued: u64,
    /// When the next attempt is due (wall clock).
    pub next_attempt: Option<SystemTime>,
}

struct Shared {
    renew: Notify,
    status: Mutex<IdentityStatus>,
}

/// A view of the manager for the rest of the agent.
#[derive(Clone)]
pub struct IdentityHandle {
    credentials: watch::Receiver<Option<Arc<Credentials>>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for IdentityHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityHandle")
            .field("current", &*self.credentials.borrow())
            .finish_non_exhaustive()
    }
}

impl IdentityHandle {
    /// The credentials in force, if any yet.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.credentials.borrow().clone()
    }

    /// Sees every new certificate.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.credentials.clone()
    }

    /// Waits for the first credentials; `None` if the manager stopped first.
    pub async fn ready(&self) -> Option<Arc<Credentials>> {
        let mut rx = self.credentials.clone();
        rx.wait_for(Option::is_some).await.ok()?.clone()
    }

    /// Renews now rather than at the scheduled time (e.g. an operator's
    /// request, or after the root changed).
    pub fn renew_now(&self) {
        self.shared.renew.notify_one();
    }

    pub fn status(&self) -> IdentityStatus {
        self.shared.status.lock().clone()
    }
}

/// Obtains, keeps and renews the workload certificate. Build it with
/// [`CertificateManager::new`] (which loads what is on disk and publishes
/// it at once), then drive it with [`CertificateManager::run`].
pub struct CertificateManager {
    config: IdentityConfig,
    anchors: TrustAnchors,
    signer: Arc<dyn CertificateSigner>,
    tx: watch::Sender<Option<Arc<Credentials>>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CertificateManager {
    /// Loads the stored credentials, when usable (see the module docs).
    pub fn new(
        config: IdentityConfig,
        anchors: TrustAnchors,
        signer: Arc<dyn CertificateSigner>,
    ) -> Result<CertificateManager, IdentityError> {
        config.identity.validate()?;
        vmesh_ca::files::ensure_private_dir(&config.cert_dir).map_err(|source| {
            IdentityError::Io {
                action: "creating",
                path: config.cert_dir.clone(),
                source,
            }
        })?;
        let stored = store::load(
            &config.cert_dir,
            &anchors,
            &config.identity,
            SystemTime::now(),
        )?;
        if let Some(creds) = &stored {
            tracing::info!(identity = %creds.identity(), serial = creds.serial(), not_after = ?creds.not_after(), "using the stored workload certificate");
        }
        let (tx, _) = watch::channel(stored.map(Arc::new));
        Ok(CertificateManager {
            config,
            anchors,
            signer,
            tx,
            shared: Arc::new(Shared {
                renew: Notify::new(),
                status: Mutex::new(IdentityStatus::default()),
            }),
        })
    }

    pub fn handle(&self) -> IdentityHandle {
        IdentityHandle {
            credentials: self.tx.subscribe(),
            shared: self.shared.clone(),
        }
    }

    /// Keeps a valid certificate until `shutdown` turns true (or its sender
    /// goes away).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut retry = Backoff::new(self.config.renewal.retry);
        let current = self.tx.borrow().clone();
        let mut next = match current {
            Some(creds) => self.schedule(&creds, None),
            None => Deadline::now(),
        };
        loop {
            self.shared.status.lock().next_attempt = Some(next.wall);
            // Wait for the deadline, a request, or shutdown.
            loop {
                if Instant::now() >= next.at || SystemTime::now() >= next.wall {
                    break;
                }
                let step = next.at.min(Instant::now() + WALL_CLOCK_CHECK);
                tokio::select! {
                    biased;
                    () = crate::stopped(&mut shutdown) => return,
                    () = self.shared.renew.notified() => {
                        tracing::info!("certificate renewal requested");
                        break;
                    }
                    () = tokio::time::sleep_until(step) => {}
                }
            }
            let outcome = tokio::select! {
                biased;
                () = crate::stopped(&mut shutdown) => return,
                outcome = self.obtain() => outcome,
            };
            match outcome {
                Ok(creds) => {
                    retry.reset();
                    let creds = Arc::new(creds);
                    next = self.schedule(&creds, Some(SystemTime::now()));
                    let stored = store::save(&self.config.cert_dir, &creds);
                    {
                        let mut status = self.shared.status.lock();
                        status.issued += 1;
                        status.consecutive_failures = 0;
                        status.last_error = stored.as_ref().err().map(|e| e.to_string());
                    }
                    if let Err(e) = stored {
                        tracing::error!(error = %e, "could not store the new workload certificate; it is used, but a restart will need the token");
                    }
                    tracing::info!(identity = %creds.identity(), serial = creds.serial(), not_after = ?creds.not_after(), renew_in = ?next.at.saturating_duration_since(Instant::now()), "workload certificate issued");
                    self.tx.send_replace(Some(creds));
                }
                Err(e) => {
                    let delay = retry.next_delay();
                    next = Deadline::after(delay);
                    let mut status = self.shared.status.lock();
                    status.consecutive_failures = retry.failures();
                    status.last_error = Some(e.to_string());
                    tracing::warn!(error = %crate::error_chain(&e), retry_in = ?delay, "could not obtain a workload certificate");
                }
            }
        }
    }

    fn schedule(&self, creds: &Credentials, acquired_at: Option<SystemTime>) -> Deadline {
        let delay = self.config.renewal.renewal_delay(
            creds.not_before(),
            creds.not_after(),
            acquired_at,
            SystemTime::now(),
            fastrand::f64(),
        );
        Deadline::after(delay)
    }

    fn token(&self) -> Option<String> {
        let path = self.config.token_file.as_ref()?;
        match std::fs::read_to_string(path) {
            Ok(token) => Some(token.trim().to_owned()).filter(|t| !t.is_empty()),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the bootstrap token");
                }
                None
            }
        }
    }

    /// One attempt: a new key, a CSR, the CA's answer, checked.
    async fn obtain(&self) -> Result<Credentials, IdentityError> {
        let (key, csr) = new_key_and_csr(&self.config.identity)?;
        let ttl = self.config.requested_ttl;
        let current = self
            .tx
            .borrow()
            .clone()
            .filter(|c| c.is_valid_at(SystemTime::now()));
        let chain = match &current {
            Some(creds) => {
                match self
                    .signer
                    .sign(&csr, ttl, CaAuth::Certificate(creds))
                    .await
                {
                    Ok(chain) => chain,
                    Err(e) if e.is_unauthenticated() => match self.token() {
                        Some(token) => {
                            tracing::warn!(error = %e, "the CA refused the current certificate; trying the bootstrap token");
                            self.signer.sign(&csr, ttl, CaAuth::Token(&token)).await?
                        }
                        None => return Err(e.into()),
                    },
                    Err(e) => return Err(e.into()),
                }
            }
            None => {
                let token = self.token().ok_or_else(|| IdentityError::NoCredentials {
                    token_file: self.config.token_file.clone(),
                })?;
                self.signer.sign(&csr, ttl, CaAuth::Token(&token)).await?
            }
        };
        let creds = Credentials::new(
            &chain,
            key.serialize_pem(),
            &self.anchors,
            &self.config.identity.trust_domain,
            SystemTime::now(),
        )?;
        if creds.identity() != &self.config.identity {
            return Err(IdentityError::WrongIdentity {
                expected: Box::new(self.config.identity.clone()),
                found: Box::new(creds.identity().clone()),
            });
        }
        Ok(creds)
    }
}

/// A point in time on both clocks: tokio's (for sleeping, and for paused
/// tests) and the wall clock (which keeps running through a suspend).
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    wall: SystemTime,
}

impl Deadline {
    fn now() -> Deadline {
        Deadline::after(Duration::ZERO)
    }

    fn after(delay: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + delay,
            wall: SystemTime::now() + delay,
        }
    }
}
