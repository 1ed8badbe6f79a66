//! The signing authority: the mesh root (self-signed and kept in the data
//! directory, or plugged in by the operator as an intermediate with its chain)
//! and the certificates it issues.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber, SignatureAlgorithm,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::files;
use crate::identity::{CERT_BACKDATE, IdentityError, SpiffeId, validate_trust_domain};

/// File name of the self-signed root certificate in the CA directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the root's private key (mode 0600) in the CA directory.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// The name istio-agent expects on the control plane's serving certificate.
pub const ISTIOD_SERVICE_NAME: &str = "istiod.istio-system.svc";

/// Largest CSR (PEM text) accepted.
const MAX_CSR_LEN: usize = 16 * 1024;

/// The cause of a [`CaError`], kept for the error's chain.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the authority could not load, create or sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("only a root CA issues intermediates; this one is itself an intermediate")]
    NotARoot,
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "CA directory {dir} has {present} but not {missing}; restore the missing file or remove both to start a new root (every workload must then be re-issued)"
    )]
    Incomplete {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("CA material {what}: {reason}")]
    BadCaMaterial {
        what: String,
        reason: String,
        #[source]
        source: Option<BoxError>,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("identity {id} is not in this CA's trust domain {trust_domain:?}")]
    ForeignTrustDomain { id: String, trust_domain: String },
    #[error("invalid CSR: {reason}")]
    InvalidCsr {
        reason: String,
        #[source]
        source: Option<BoxError>,
    },
    #[error("CSR signature does not verify with its own public key")]
    CsrSignature,
    #[error("unsupported key in CSR: {0}")]
    UnsupportedKey(String),
    #[error("invalid serving certificate name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("the CA certificate expired at {0:?}; plug in or create a new one")]
    CaExpired(SystemTime),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("lineage {0:?} cannot be written into a certificate")]
    Lineage(String),
}

/// Lifetimes the authority works with. The defaults are Istio's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityOptions {
    /// Life of a workload certificate when the caller asks for none (24 h).
    pub default_workload_ttl: Duration,
    /// Longest workload certificate issued; longer requests are shortened
    /// to this (90 days).
    pub max_workload_ttl: Duration,
    /// Life of a newly created self-signed root (10 years).
    pub root_ttl: Duration,
    /// Life of the control plane's serving certificate (90 days).
    pub serving_ttl: Duration,
}

impl Default for AuthorityOptions {
    fn default() -> Self {
        AuthorityOptions {
            default_workload_ttl: Duration::from_secs(24 * 3600),
            max_workload_ttl: Duration::from_secs(90 * 24 * 3600),
            root_ttl: Duration::from_secs(10 * 365 * 24 * 3600),
            serving_ttl: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// What an I/O failure on `path` while `action` becomes.
fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_owned();
    move |source| CaError::Io {
        action,
        path,
        source,
    }
}

/// The files `vmesh ca intermediate` writes for one server, named as
/// Istio's plug-in CA names them.
pub const INTERMEDIATE_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    ROOT_CERT_FILE,
];

/// Makes an intermediate CA for one server under the root in `root_dir`
/// (created there on first use; keep it offline afterwards) and writes it
/// into `out` ([`INTERMEDIATE_FILES`]; the key mode 0600), for that
/// server's `--ca-cert`, `--ca-key` and `--ca-chain`. Every server given
/// one issues under the same root, and the root's key never leaves
/// `root_dir`.
pub fn write_intermediate(
    root_dir: &Path,
    out: &Path,
    trust_domain: &str,
    name: &str,
    ttl: Duration,
) -> Result<(), CaError> {
    let root = Authority::load_or_create(root_dir, trust_domain, AuthorityOptions::default())?;
    let (cert, chain, key) = root.issue_intermediate(name, ttl)?;
    write_intermediate_files(out, &cert, &chain, &key, root.root_pem())
}

/// A fresh P-256 key and a certificate request for it, naming `name` in
/// `trust_domain`: what a server sends to be signed an intermediate.
/// Returns (request PEM, PKCS#8 key PEM).
pub fn intermediate_request(name: &str, trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params.distinguished_name.push(DnType::CommonName, name);
    let request = params.serialize_request(&key)?.pem()?;
    Ok((request, key.serialize_pem()))
}

/// Writes an intermediate CA's files ([`INTERMEDIATE_FILES`]) into `out`
/// (created 0700; the key 0600).
pub fn write_intermediate_files(
    out: &Path,
    cert: &str,
    chain: &str,
    key: &str,
    root_pem: &str,
) -> Result<(), CaError> {
    files::ensure_private_dir(out).map_err(io_err("creating", out))?;
    let [cert_file, key_file, chain_file, root_file] = INTERMEDIATE_FILES.map(|f| out.join(f));
    files::write_secret(&key_file, key).map_err(io_err("writing", &key_file))?;
    files::write_public(&cert_file, cert).map_err(io_err("writing", &cert_file))?;
    files::write_public(&chain_file, chain).map_err(io_err("writing", &chain_file))?;
    files::write_public(&root_file, root_pem).map_err(io_err("writing", &root_file))?;
    Ok(())
}

/// The mesh certificate authority.
pub struct Authority {
    trust_domain: String,
    options: AuthorityOptions,
    issuer: Issuer<'static, KeyPair>,
    /// `notAfter` of the signing certificate: nothing issued outlives it.
    issuer_not_after: SystemTime,
    /// PEM certificates that follow a leaf: the signing certificate, any
    /// intermediates, and the root last.
    chain: Vec<String>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("options", &self.options)
            .field("issuer_not_after", &self.issuer_not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// The self-signed case: loads the root from `dir/root-cert.pem` and
    /// `dir/root-key.pem`, or creates them on first start (ECDSA P-256,
    /// `options.root_ttl`, CA with keyCertSign; key file mode 0600, directory
    /// 0700).
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        options: AuthorityOptions,
    ) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)?;
        files::ensure_private_dir(dir).map_err(io_err("creating", dir))?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let (has_cert, has_key) = (files::exists(&cert_path), files::exists(&key_path));
        if has_cert && !has_key {
            return Err(CaError::Incomplete {
                dir: dir.to_owned(),
                present: ROOT_CERT_FILE,
                missing: ROOT_KEY_FILE,
            });
        }
        let key = if has_key {
            let pem = files::read_secret(&key_path).map_err(io_err("reading", &key_path))?;
            KeyPair::from_pem(&pem).map_err(|e| CaError::BadCaMaterial {
                what: key_path.display().to_string(),
                reason: "not a usable private key".into(),
                source: Some(Box::new(e)),
            })?
        } else {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            // The key goes first: a crash before the certificate is written
            // leaves a key that no workload trusts yet, and the next start
            // makes its certificate (below).
            files::write_secret(&key_path, &key.serialize_pem())
                .map_err(io_err("writing", &key_path))?;
            key
        };
        if !has_cert {
            let cert = self_signed_root(&key, trust_domain, options.root_ttl)?;
            files::write_public(&cert_path, &cert).map_err(io_err("writing", &cert_path))?;
            tracing::info!(dir = %dir.display(), trust_domain, "created a new mesh root CA");
        }
        let cert_pem =
            std::fs::read_to_string(&cert_path).map_err(io_err("reading", &cert_path))?;
        Self::from_pems(&cert_pem, key, &[], trust_domain, options, &cert_path)
    }

    /// The plug-in case: the operator's CA certificate (an intermediate, or
    /// a root), its key, and `chain`, the certificates from the one that
    /// signed `cert` up to the root (Istio's `cert-chain.pem`; the CA
    /// certificate itself may lead it and is then skipped). Without `chain`,
    /// `cert` must be a self-signed root. Every link is checked.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        chain: Option<&Path>,
        trust_domain: &str,
        options: AuthorityOptions,
    ) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)?;
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Io {
                action: "reading",
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let key_pem = files::read_secret(key).map_err(|source| CaError::Io {
            action: "reading",
            path: key.to_owned(),
            source,
        })?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadCaMaterial {
            what: key.display().to_string(),
            reason: "not a usable private key".into(),
            source: Some(Box::new(e)),
        })?;
        let chain_pems = match chain {
            Some(path) => split_pem_certs(&read(path)?, path)?,
            None => Vec::new(),
        };
        Self::from_pems(
            &cert_pem,
            key_pair,
            &chain_pems,
            trust_domain,
            options,
            cert,
        )
    }

    fn from_pems(
        cert_pem: &str,
        key: KeyPair,
        chain_pems: &[(CertificateDer<'static>, String)],
        trust_domain: &str,
        options: AuthorityOptions,
        cert_path: &Path,
    ) -> Result<Self, CaError> {
        let bad = |reason: String| CaError::BadCaMaterial {
            what: cert_path.display().to_string(),
            reason,
            source: None,
        };
        let mut ca = split_pem_certs(cert_pem, cert_path)?;
        if ca.len() != 1 {
            return Err(bad(format!(
                "expected exactly one certificate, found {}",
                ca.len()
            )));
        }
        let (ca_der, ca_pem) = ca.remove(0);
        let ca_cert = parse_cert(&ca_der).map_err(bad)?;
        if !ca_cert.is_ca() {
            return Err(bad(
                "is not a CA certificate (basicConstraints CA:false)".into()
            ));
        }
        if let Ok(Some(ku)) = ca_cert.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(bad("key usage does not allow keyCertSign".into()));
        }
        if ca_cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad("does not match its private key".into()));
        }
        let issuer_not_after = system_time(ca_cert.validity().not_after.timestamp());
        if issuer_not_after <= SystemTime::now() {
            return Err(CaError::CaExpired(issuer_not_after));
        }

        // Chain: the certificates above `ca`, ending in a self-signed root.
        let mut chain = vec![ca_pem];
        let above: Vec<_> = chain_pems
            .iter()
            .filter(|(der, _)| der.as_ref() != ca_der.as_ref())
            .collect();
        let mut child = ca_cert;
        let mut child_label = cert_path.display().to_string();
        for (i, (der, pem)) in above.iter().enumerate() {
            let parent =
                parse_cert(der).map_err(|r| bad(format!("chain certificate {}: {r}", i + 1)))?;
            if !parent.is_ca() {
                return Err(bad(format!("chain certificate {} is not a CA", i + 1)));
            }
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|_| {
                    bad(format!(
                        "{child_label} is not signed by chain certificate {}",
                        i + 1
                    ))
                })?;
            chain.push(pem.clone());
            child = parent;
            child_label = format!("chain certificate {}", i + 1);
        }
        if child.verify_signature(None).is_err() {
            return Err(bad(if above.is_empty() {
                "is not a self-signed root; give the chain up to the root".into()
            } else {
                "the chain does not end in a self-signed root".into()
            }));
        }

        let issuer = Issuer::from_ca_cert_der(&ca_der, key)?;
        Ok(Authority {
            trust_domain: trust_domain.to_owned(),
            options,
            issuer,
            issuer_not_after,
            chain,
        })
    }

    /// The trust domain identities are issued in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The lifetimes in force.
    pub fn options(&self) -> &AuthorityOptions {
        &self.options
    }

    /// The mesh trust anchor (PEM): the root, which for a plugged-in
    /// intermediate is the last certificate of its chain.
    pub fn root_pem(&self) -> &str {
        self.chain
            .last()
            .expect("chain holds at least the CA certificate")
    }

    /// The certificates that follow an issued leaf: signing CA first, root
    /// last.
    pub fn ca_chain(&self) -> &[String] {
        &self.chain
    }

    /// The lifetime a request for `requested` gets: the default when none
    /// (or zero) is asked, never more than the maximum.
    pub fn effective_ttl(&self, requested: Option<Duration>) -> Duration {
        requested
            .filter(|d| !d.is_zero())
            .unwrap_or(self.options.default_workload_ttl)
            .min(self.options.max_workload_ttl)
    }

    /// Signs a workload certificate for `identity` with the public key of
    /// `csr_pem`.
    ///
    /// The CSR's signature is verified (proof of possession), and nothing
    /// else of it is used: whatever subject, SANs or extensions it asks for,
    /// the certificate's only name is `identity`'s URI. It is a leaf
    /// (CA:false) for clientAuth and serverAuth, with digitalSignature and
    /// keyEncipherment, valid from one minute ago for
    /// [`Authority::effective_ttl`] (never past the CA's own expiry).
    /// Returns PEM certificates, leaf first and root last.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        requested: Option<Duration>,
    ) -> Result<Vec<String>, CaError> {
        self.sign_workload_in_lineage(csr_pem, identity, requested, None)
    }

    /// [`Authority::sign_workload`], the certificate carrying `lineage`
    /// (the id of the token it descends from; see
    /// [`crate::PeerIdentity::lineage`]).
    pub fn sign_workload_in_lineage(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        requested: Option<Duration>,
        lineage: Option<&str>,
    ) -> Result<Vec<String>, CaError> {
        identity.validate()?;
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let public_key = public_key_of_csr(csr_pem)?;
        let mut params = self.leaf_params(self.effective_ttl(requested))?;
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if let Some(lineage) = lineage {
            params.distinguished_name.push(
                DnType::CustomDnType(crate::identity::LINEAGE_ATTRIBUTE.to_vec()),
                DnValue::PrintableString(
                    format!("{}{lineage}", crate::identity::LINEAGE_PREFIX)
                        .try_into()
                        .map_err(|_| CaError::Lineage(lineage.to_string()))?,
                ),
            );
        }
        let leaf = params.signed_by(&public_key, &self.issuer)?;
        let mut out = Vec::with_capacity(self.chain.len() + 1);
        out.push(leaf.pem());
        out.extend(self.chain.iter().cloned());
        Ok(out)
    }

    /// A fresh key and certificate for the control plane's own TLS (port
    /// 15012): DNS name `istiod.istio-system.svc` plus each of `sans` (IP
    /// addresses become IP SANs), serverAuth, `options.serving_ttl`.
    /// Returns (PEM chain leaf first and root last, PKCS#8 PEM key).
    pub fn serving_certificate(&self, sans: &[String]) -> Result<(Vec<String>, String), CaError> {
        let mut names: Vec<SanType> = vec![SanType::DnsName(ISTIOD_SERVICE_NAME.try_into()?)];
        for name in sans {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    if name.is_empty() || name.contains(['/', ':', ' ']) {
                        return Err(CaError::InvalidName {
                            name: name.clone(),
                            reason: "not a DNS name or IP address".into(),
                        });
                    }
                    SanType::DnsName(name.as_str().try_into().map_err(|e: rcgen::Error| {
                        CaError::InvalidName {
                            name: name.clone(),
                            reason: e.to_string(),
                        }
                    })?)
                }
            };
            if !names.contains(&san) {
                names.push(san);
            }
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = self.leaf_params(self.options.serving_ttl)?;
        params.subject_alt_names = names;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = Vec::with_capacity(self.chain.len() + 1);
        chain.push(cert.pem());
        chain.extend(self.chain.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }

    /// An intermediate CA for one server of a replicated control plane,
    /// signed by this authority (the offline root): a fresh key, `name` in
    /// its subject, at most `ttl` (and never past this authority's own
    /// end). Returns (certificate PEM, its chain up to the root as Istio's
    /// `cert-chain.pem` has it: the intermediate first, PKCS#8 key PEM).
    pub fn issue_intermediate(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<(String, String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let (cert, chain) = self.intermediate_for(&key, name, ttl)?;
        Ok((cert, chain, key.serialize_pem()))
    }

    /// [`Authority::issue_intermediate`] for the key of `csr_pem`: a server
    /// that asks for its intermediate keeps its key to itself.
    pub fn sign_intermediate(
        &self,
        csr_pem: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let public_key = public_key_of_csr(csr_pem)?;
        self.intermediate_for(&public_key, name, ttl)
    }

    /// Whether this authority is a root (self-signed): only a root issues
    /// intermediates.
    pub fn is_root(&self) -> bool {
        self.chain.len() == 1
    }

    fn intermediate_for(
        &self,
        key: &impl PublicKeyData,
        name: &str,
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        if !self.is_root() {
            return Err(CaError::NotARoot);
        }
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(CaError::InvalidName {
                name: name.to_string(),
                reason: "an intermediate's name is 1 to 64 letters, digits, '-', '.' or '_'".into(),
            });
        }
        let mut params = self.leaf_params(ttl)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        dn.push(DnType::CommonName, format!("vmesh intermediate CA {name}"));
        params.distinguished_name = dn;
        // One level: the intermediate signs workloads and serving
        // certificates, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.signed_by(key, &self.issuer)?.pem();
        let mut chain = cert.clone();
        for link in &self.chain {
            chain.push_str(link);
        }
        Ok((cert, chain))
    }

    /// Parameters shared by every leaf: empty subject (the SAN is then
    /// critical), random serial, backdated start, authority key id.
    fn leaf_params(&self, ttl: Duration) -> Result<CertificateParams, CaError> {
        let now = SystemTime::now();
        if now >= self.issuer_not_after {
            return Err(CaError::CaExpired(self.issuer_not_after));
        }
        let not_after = (now + ttl).min(self.issuer_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::from(now - CERT_BACKDATE);
        params.not_after = OffsetDateTime::from(not_after);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

fn self_signed_root(key: &KeyPair, trust_domain: &str, ttl: Duration) -> Result<String, CaError> {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "vmesh root CA");
    params.distinguished_name = dn;
    params.serial_number = Some(random_serial());
    params.not_before = OffsetDateTime::from(now - CERT_BACKDATE);
    params.not_after = OffsetDateTime::from(now + ttl);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params.self_signed(key)?.pem())
}

/// 128 random bits (positive).
fn random_serial() -> SerialNumber {
    let mut bytes = *uuid::Uuid::new_v4().as_bytes();
    let more = uuid::Uuid::new_v4();
    // v4 UUIDs fix 6 bits; mix in a second one so all 128 bits are random.
    for (b, m) in bytes.iter_mut().zip(more.as_bytes().iter().rev()) {
        *b ^= m.rotate_left(3);
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

fn parse_cert<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err("trailing data after the certificate".into());
    }
    Ok(cert)
}

fn split_pem_certs(
    text: &str,
    path: &Path,
) -> Result<Vec<(CertificateDer<'static>, String)>, CaError> {
    let ders = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadCaMaterial {
            what: path.display().to_string(),
            reason: "not PEM certificates".into(),
            source: Some(Box::new(e)),
        })?;
    if ders.is_empty() {
        return Err(CaError::BadCaMaterial {
            what: path.display().to_string(),
            reason: "holds no PEM certificate".into(),
            source: None,
        });
    }
    Ok(ders
        .into_iter()
        .map(|der| {
            let pem = pem_encode("CERTIFICATE", &der);
            (der, pem)
        })
        .collect())
}

/// PEM with 64-column lines and `\n` line ends, as rcgen writes.
fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The public key of a CSR, after checking the CSR's signature with it.
struct CsrPublicKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

fn public_key_of_csr(csr_pem: &str) -> Result<CsrPublicKey, CaError> {
    use rustls::pki_types::CertificateSigningRequestDer;
    if csr_pem.len() > MAX_CSR_LEN {
        return Err(CaError::InvalidCsr {
            reason: format!("longer than {MAX_CSR_LEN} bytes"),
            source: None,
        });
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
        CaError::InvalidCsr {
            reason: "no PEM CERTIFICATE REQUEST block".into(),
            source: Some(Box::new(e)),
        }
    })?;
    let (rest, csr) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|e| CaError::InvalidCsr {
            reason: "not a PKCS#10 request".into(),
            source: Some(Box::new(e)),
        })?;
    if !rest.is_empty() {
        return Err(CaError::InvalidCsr {
            reason: "trailing data after the request".into(),
            source: None,
        });
    }
    csr.verify_signature().map_err(|_| CaError::CsrSignature)?;
    let spki = &csr.certification_request_info.subject_pki;
    let alg = match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => &rcgen::PKCS_ECDSA_P256_SHA256,
                Some("1.3.132.0.34") => &rcgen::PKCS_ECDSA_P384_SHA384,
                other => {
                    return Err(CaError::UnsupportedKey(format!(
                        "elliptic curve {}",
                        other.unwrap_or("(none)")
                    )));
                }
            }
        }
        Ok(PublicKey::RSA(rsa)) => {
            let bits = rsa.key_size();
            if bits < 2048 {
                return Err(CaError::UnsupportedKey(format!(
                    "RSA key of {bits} bits (at least 2048 needed)"
                )));
            }
            &rcgen::PKCS_RSA_SHA256
        }
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => &rcgen::PKCS_ED25519,
        Ok(other) => {
            return Err(CaError::UnsupportedKey(format!(
                "{} (use ECDSA P-256/P-384, Ed25519 or RSA)",
                key_kind(&other)
            )));
        }
        Err(e) => return Err(CaError::UnsupportedKey(e.to_string())),
    };
    Ok(CsrPublicKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg,
    })
}

fn key_kind(key: &PublicKey<'_>) -> &'static str {
    match key {
        PublicKey::RSA(_) => "RSA",
        PublicKey::EC(_) => "EC",
        PublicKey::DSA(_) => "DSA",
        PublicKey::GostR3410(_) | PublicKey::GostR3410_2012(_) => "GOST",
        PublicKey::Unknown(_) => "unknown algorithm",
    }
}

#[cfg(test)]
mod tests;
