//! vmesh's certificate authority and caller authentication — what istiod's
//! CA does for the mesh.
//!
//! This crate owns:
//! - workload identities ([`SpiffeId`], `spiffe://<td>/ns/<ns>/sa/<sa>`) and
//!   reading one out of a verified mesh certificate
//!   ([`identity_of_certificate`], [`PeerIdentity`]);
//! - the signing [`Authority`]: a self-signed ECDSA P-256 root kept in the
//!   data directory (`root-cert.pem`, `root-key.pem` mode 0600), or an
//!   operator's plugged-in intermediate with its chain; workload
//!   certificates whose only name is the caller's authenticated identity,
//!   whatever the CSR asks; the control plane's serving certificate;
//! - bootstrap tokens ([`TokenIssuer`], ES256 JWTs with audience
//!   `istio-ca`, key in `token-key.pem`) and their [`Revocations`];
//! - caller authentication ([`authenticate`]: bearer token, else verified
//!   client certificate);
//! - Istio's CA protocol ([`pb`], `istio.v1.auth.IstioCertificateService`)
//!   and its server ([`CertificateService`]);
//! - rustls configurations for port 15012 ([`server_tls_config`],
//!   [`client_tls_config`]).
//!
//! It does not own: listening sockets, the TLS accept loop or the tonic
//! server (the server crate runs them, with xDS on the same port); where
//! revocations are stored and how operators change them (the server keeps
//! [`Revocations`] in its store and publishes the current value through a
//! `tokio::sync::watch` channel); certificate rotation on the workload side
//! and SDS (the agent); onboarding files (the CLI).
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmesh_ca::{Authority, AuthorityOptions, CertificateService, Revocations, TokenIssuer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("/var/lib/vmesh/ca");
//! let authority = Arc::new(Authority::load_or_create(dir, "cluster.local", AuthorityOptions::default())?);
//! let issuer = Arc::new(TokenIssuer::load_or_create(dir, "cluster.local")?);
//! let token = issuer.issue("vm-ns", "payment", std::time::Duration::from_secs(3600))?;
//! let (_revoke, revocations) = tokio::sync::watch::channel(Arc::new(Revocations::new()));
//! let service = CertificateService::new(authority.clone(), issuer, revocations).into_server();
//! let (chain, key) = authority.serving_certificate(&["vmesh.example".into()])?;
//! let tls = vmesh_ca::server_tls_config(&chain, &key, authority.root_pem())?;
//! # let _ = (token, service, tls);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod auth;
mod authority;
pub mod files;
mod identity;
pub mod metrics;
mod revocation;
mod service;
mod tls;
mod token;

/// Generated types, client and server of `istio.v1.auth`
/// (`proto/istio_ca.proto`). `metadata` is Envoy types'
/// `google.protobuf.Struct`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("istio.v1.auth");
}

pub use auth::{AuthError, Caller, authenticate, bearer_token};
pub use authority::{
    Authority, AuthorityOptions, CaError, INTERMEDIATE_FILES, ISTIOD_SERVICE_NAME, ROOT_CERT_FILE,
    ROOT_KEY_FILE, intermediate_request, write_intermediate, write_intermediate_files,
};
pub use identity::{
    CERT_BACKDATE, CertIdentityError, IdentityError, PeerIdentity, SpiffeId,
    identity_of_certificate, validate_namespace, validate_service_account, validate_trust_domain,
};
pub use pb::istio_certificate_service_client::IstioCertificateServiceClient;
pub use pb::istio_certificate_service_server::IstioCertificateServiceServer;
pub use pb::{IstioCertificateRequest, IstioCertificateResponse};
pub use revocation::Revocations;
pub use service::{CallerThrottle, CertificateService, IssuanceCheck, peer_identity};
pub use tls::{
    ServingCertificate, TlsError, client_tls_config, renewable_server_tls_config, root_hash,
    server_tls_config,
};
pub use token::{
    IssuedToken, TOKEN_AUDIENCE, TOKEN_ISSUER, TOKEN_KEY_FILE, TOKEN_LEEWAY, TokenClaims,
    TokenError, TokenIssuer,
};
