//! rustls configurations for port 15012 (server) and for its callers
//! (agents, tests), on the `ring` provider.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} is not valid PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("{0} holds no certificate")]
    NoCertificate(&'static str),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pems: &[String], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut out = Vec::new();
    for pem in pems {
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            out.push(der.map_err(|e| TlsError::Pem {
                what,
                reason: e.to_string(),
            })?);
        }
    }
    if out.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(out)
}

/// How a joining VM pins the mesh root, as `kubeadm join` pins its CA:
/// `sha256:<hex>` of the root certificate's SubjectPublicKeyInfo. The PEM
/// must hold exactly that one certificate, so nothing unpinned rides along.
pub fn root_hash(root_pem: &str) -> Result<String, TlsError> {
    use sha2::Digest;
    let what = "root certificate";
    let mut all = certs(&[root_pem.to_owned()], what)?;
    // One certificate only: a pin must cover everything that will be trusted.
    if all.len() != 1 {
        return Err(TlsError::Pem {
            what,
            reason: format!("{} certificates where one root was expected", all.len()),
        });
    }
    let der = all.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| TlsError::Pem {
        what,
        reason: e.to_string(),
    })?;
    let digest = sha2::Sha256::digest(cert.tbs_certificate.subject_pki.raw);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        reason: e.to_string(),
    })
}

fn roots(root_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for der in certs(&[root_pem.to_owned()], "root certificate")? {
        store.add(der)?;
    }
    Ok(store)
}

/// The server side of 15012: presents `chain` (leaf first, e.g. from
/// [`crate::Authority::serving_certificate`]) with `key_pem`; client
/// certificates are optional, but when presented must chain to `root_pem`
/// (the handshake fails otherwise); ALPN `h2`.
///
/// Serve tonic over `tokio_rustls::server::TlsStream<TcpStream>` from this
/// config and the verified client certificates reach
/// [`crate::CertificateService`] through tonic's `TlsConnectInfo`.
pub fn server_tls_config(
    chain: &[String],
    key_pem: &str,
    root_pem: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    renewable_server_tls_config(Arc::new(ServingCertificate::new(chain, key_pem)?), root_pem)
}

/// [`server_tls_config`] presenting whatever `serving` holds at each
/// handshake, so that its certificate can be renewed while the port serves.
pub fn renewable_server_tls_config(
    serving: Arc<ServingCertificate>,
    root_pem: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(root_pem)?), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A serving certificate and key that can be replaced while a port
/// serves: each TLS handshake takes the one current then, and connections
/// made before a replacement keep theirs.
#[derive(Debug)]
pub struct ServingCertificate {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ServingCertificate {
    pub fn new(chain: &[String], key_pem: &str) -> Result<ServingCertificate, TlsError> {
        Ok(ServingCertificate {
            current: std::sync::RwLock::new(Arc::new(certified(chain, key_pem)?)),
        })
    }

    /// Presents `chain` and `key_pem` from the next handshake on.
    pub fn replace(&self, chain: &[String], key_pem: &str) -> Result<(), TlsError> {
        let renewed = Arc::new(certified(chain, key_pem)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = renewed;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServingCertificate {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn certified(chain: &[String], key_pem: &str) -> Result<rustls::sign::CertifiedKey, TlsError> {
    Ok(rustls::sign::CertifiedKey::from_der(
        certs(chain, "serving certificate chain")?,
        key(key_pem, "serving key")?,
        &provider(),
    )?)
}

/// The client side: trusts only `root_pem`; presents `client` (PEM chain
/// leaf first, PEM key) when given; ALPN `h2`. Connect with server name
/// [`crate::ISTIOD_SERVICE_NAME`] (or another name the serving certificate
/// carries).
pub fn client_tls_config(
    root_pem: &str,
    client: Option<(&[String], &str)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(root_pem)?);
    let mut config = match client {
        Some((chain, key_pem)) => builder.with_client_auth_cert(
            certs(chain, "client certificate chain")?,
            key(key_pem, "client key")?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Authority, AuthorityOptions};

    #[test]
    fn builds_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
                .unwrap();
        let (chain, key) = ca.serving_certificate(&[]).unwrap();
        let server = server_tls_config(&chain, &key, ca.root_pem()).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
        let client = client_tls_config(ca.root_pem(), Some((&chain, &key))).unwrap();
        assert!(client.client_auth_cert_resolver.has_certs());
        let anon = client_tls_config(ca.root_pem(), None).unwrap();
        assert!(!anon.client_auth_cert_resolver.has_certs());
        assert!(matches!(
            server_tls_config(&[], &key, ca.root_pem()),
            Err(TlsError::NoCertificate(_))
        ));
        assert!(server_tls_config(&chain, "nope", ca.root_pem()).is_err());
    }

    #[test]
    fn root_hash_pins_one_certificate_only() {
        let roots: Vec<Authority> = (0..2)
            .map(|_| {
                let dir = tempfile::tempdir().unwrap();
                Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
                    .unwrap()
            })
            .collect();
        let (one, two) = (roots[0].root_pem(), roots[1].root_pem());
        let hash = root_hash(one).unwrap();
        assert!(
            hash.starts_with("sha256:") && hash.len() == 7 + 64,
            "{hash}"
        );
        assert_eq!(root_hash(one).unwrap(), hash, "stable");
        assert_ne!(root_hash(two).unwrap(), hash);
        // A second certificate riding along would be trusted unpinned: refused.
        assert!(root_hash(&format!("{one}{two}")).is_err());
        assert!(root_hash("not a certificate").is_err());
    }
}
