//! A workload's key and certificate chain, checked before use: the chain
//! verifies against the mesh root as a client certificate, the key is the
//! certificate's, and its one identity is read out of it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use vmesh_ca::SpiffeId;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::IdentityError;

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// Splits PEM text into one string per certificate (each ending in a
/// newline); anything between certificates is dropped.
pub fn split_pem_certificates(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        out.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    out
}

/// The mesh trust anchors (`root-cert.pem`): what every workload chain,
/// and the control plane's serving chain, must lead to.
#[derive(Clone)]
pub struct TrustAnchors {
    pem: Arc<str>,
    ders: Arc<[CertificateDer<'static>]>,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("certificates", &self.ders.len())
            .finish_non_exhaustive()
    }
}

impl TrustAnchors {
    /// One or more PEM root certificates.
    pub fn from_pem(pem: &str) -> Result<TrustAnchors, IdentityError> {
        let bad = |reason: String| IdentityError::BadTrustAnchors(reason);
        let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if ders.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        let mut store = rustls::RootCertStore::empty();
        for der in &ders {
            store.add(der.clone()).map_err(|e| bad(e.to_string()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| bad(e.to_string()))?;
        Ok(TrustAnchors {
            pem: pem.into(),
            ders: ders.into(),
            verifier,
        })
    }

    /// The roots as given.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Checks `chain` (leaf first; a trailing copy of a root is allowed) as
    /// a client certificate valid at `now`.
    fn verify(&self, chain: &[CertificateDer<'static>], now: SystemTime) -> Result<(), String> {
        let (leaf, rest) = chain.split_first().ok_or("empty chain")?;
        let intermediates: Vec<_> = rest
            .iter()
            .filter(|der| !self.ders.contains(der))
            .cloned()
            .collect();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.verifier
            .verify_client_cert(leaf, &intermediates, UnixTime::since_unix_epoch(secs))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A workload certificate chain (leaf first) and its private key, as
/// served to Envoy over SDS and presented to the control plane.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    chain: Vec<String>,
    key: String,
    identity: SpiffeId,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Checks and takes `chain` (PEM, leaf first; entries may hold several
    /// certificates) and `key_pem`: the chain must verify against `anchors`
    /// at `now` as a client certificate, the key must be the leaf's, and
    /// the leaf must name exactly one SPIFFE identity in `trust_domain`.
    pub fn new(
        chain: &[String],
        key_pem: String,
        anchors: &TrustAnchors,
        trust_domain: &str,
        now: SystemTime,
    ) -> Result<Credentials, IdentityError> {
        let bad = |reason: String| IdentityError::BadCertificate(reason);
        let chain: Vec<String> = chain
            .iter()
            .flat_map(|pem| split_pem_certificates(pem))
            .collect();
        let ders = chain
            .iter()
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("chain is not PEM: {e}")))?;
        let leaf_der = ders.first().ok_or_else(|| bad("empty chain".into()))?;
        let (_, leaf) =
            X509Certificate::from_der(leaf_der).map_err(|e| bad(format!("leaf: {e}")))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(format!("private key: {e}")))?;
        if leaf.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(IdentityError::KeyMismatch);
        }
        let identity = vmesh_ca::identity_of_certificate(leaf_der, trust_domain)?;
        anchors
            .verify(&ders, now)
            .map_err(IdentityError::Untrusted)?;
        let time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(Credentials {
            serial: serial_hex(leaf.raw_serial()),
            not_before: time(leaf.validity().not_before),
            not_after: time(leaf.validity().not_after),
            identity,
            chain,
            key: key_pem,
        })
    }

    /// PEM certificates, leaf first, one per entry.
    pub fn chain(&self) -> &[String] {
        &self.chain
    }

    /// The chain as one PEM text.
    pub fn chain_pem(&self) -> String {
        self.chain.concat()
    }

    /// The private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        &self.key
    }

    /// The identity the certificate names.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The leaf's serial number in lowercase hex without leading zero
    /// bytes, as Envoy's `/certs` prints it.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether the leaf is still valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let hex: String = raw[start..].iter().map(|b| format!("{b:02x}")).collect();
    if hex.is_empty() { "0".into() } else { hex }
}

/// A fresh ECDSA P-256 key and a CSR (PEM) for it naming `identity` as its
/// only subject alternative name, with an empty subject. (The CA decides
/// the certificate's name from who is asking; the CSR says what the agent
/// expects.)
pub fn new_key_and_csr(identity: &SpiffeId) -> Result<(KeyPair, String), IdentityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_ca::{Authority, AuthorityOptions};
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::public_key::PublicKey;

    fn id() -> SpiffeId {
        SpiffeId::new("cluster.local", "vm-ns", "payment").unwrap()
    }

    #[test]
    fn csr_names_the_spiffe_id_with_a_p256_key_and_verifies() {
        let (key, csr) = new_key_and_csr(&id()).unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap();
        let (_, req) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
        req.verify_signature().expect("proof of possession");
        let info = &req.certification_request_info;
        assert_eq!(info.subject.iter().count(), 0, "empty subject");
        assert_eq!(
            info.subject_pki.raw,
            key.subject_public_key_info().as_slice()
        );
        match info.subject_pki.parsed().unwrap() {
            PublicKey::EC(point) => assert_eq!(point.key_size(), 256),
            other => panic!("not an EC key: {other:?}"),
        }
        assert_eq!(
            info.subject_pki
                .algorithm
                .parameters
                .as_ref()
                .map(|p| p.as_oid().unwrap().to_id_string()),
            Some("1.2.840.10045.3.1.7".to_string()),
            "curve P-256"
        );
        let sans: Vec<String> = req
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|ext| match ext {
                ParsedExtension::SubjectAlternativeName(san) => Some(san),
                _ => None,
            })
            .flat_map(|san| san.general_names.iter())
            .map(|name| match name {
                GeneralName::URI(uri) => uri.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, ["spiffe://cluster.local/ns/vm-ns/sa/payment"]);
        assert!(
            key.serialize_pem()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
    }

    #[test]
    fn credentials_are_checked_against_key_root_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            Authority::load_or_create(dir.path(), "cluster.local", AuthorityOptions::default())
                .unwrap();
        let anchors = TrustAnchors::from_pem(ca.root_pem()).unwrap();
        let (key, csr) = new_key_and_csr(&id()).unwrap();
        let chain = ca
            .sign_workload(&csr, &id(), Some(Duration::from_secs(3600)))
            .unwrap();
        let now = SystemTime::now();
        let creds =
            Credentials::new(&chain, key.serialize_pem(), &anchors, "cluster.local", now).unwrap();
        assert_eq!(creds.identity(), &id());
        assert_eq!(creds.chain().len(), 2);
        assert_eq!(creds.chain_pem(), chain.concat());
        assert!(creds.is_valid_at(now));
        let life = creds
            .not_after()
            .duration_since(creds.not_before())
            .unwrap();
        assert_eq!(life.as_secs(), 3600 + 60, "one hour, backdated a minute");
        assert!(!creds.serial().starts_with("00") && !creds.serial().is_empty());
        assert!(
            !format!("{creds:?}").contains("PRIVATE KEY"),
            "Debug hides the key"
        );

        // One concatenated PEM text is the same chain.
        let again = Credentials::new(
            &[chain.concat()],
            key.serialize_pem(),
            &anchors,
            "cluster.local",
            now,
        )
        .unwrap();
        assert_eq!(again, creds);

        let (other_key, _) = new_key_and_csr(&id()).unwrap();
        assert!(matches!(
            Credentials::new(
                &chain,
                other_key.serialize_pem(),
                &anchors,
                "cluster.local",
                now
            ),
            Err(IdentityError::KeyMismatch)
        ));
        assert!(matches!(
            Credentials::new(
                &chain,
                key.serialize_pem(),
                &anchors,
                "cluster.local",
                creds.not_after() + Duration::from_secs(1)
            ),
            Err(IdentityError::Untrusted(_))
        ));
        let other_dir = tempfile::tempdir().unwrap();
        let stranger = Authority::load_or_create(
            other_dir.path(),
            "cluster.local",
            AuthorityOptions::default(),
        )
        .unwrap();
        let strangers = TrustAnchors::from_pem(stranger.root_pem()).unwrap();
        assert!(matches!(
            Credentials::new(
                &chain,
                key.serialize_pem(),
                &strangers,
                "cluster.local",
                now
            ),
            Err(IdentityError::Untrusted(_))
        ));
        assert!(matches!(
            Credentials::new(&chain, key.serialize_pem(), &anchors, "other.domain", now),
            Err(IdentityError::CertificateIdentity(_))
        ));
        assert!(TrustAnchors::from_pem("nothing here").is_err());
    }

    #[test]
    fn serials_print_like_envoy() {
        assert_eq!(serial_hex(&[0x00, 0x0a, 0xff]), "0aff");
        assert_eq!(serial_hex(&[0x7f]), "7f");
        assert_eq!(serial_hex(&[0x00]), "0");
        let pems = split_pem_certificates(&format!("junk\n{BEGIN}\nAA\n{END}\n{BEGIN}\nBB\n{END}"));
        assert_eq!(pems.len(), 2);
        assert!(pems[1].contains("BB") && pems[1].ends_with(&format!("{END}\n")));
    }
}
