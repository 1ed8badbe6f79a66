//! Workload identities: SPIFFE ids of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, and how to
//! read one out of a verified mesh certificate.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;

const SCHEME: &str = "spiffe://";

/// Why a SPIFFE id or one of its parts was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{uri:?} is not a SPIFFE id (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    NotSpiffe { uri: String },
    #[error("invalid trust domain {value:?}: {reason}")]
    TrustDomain { value: String, reason: &'static str },
    #[error("invalid namespace {value:?}: {reason}")]
    Namespace { value: String, reason: &'static str },
    #[error("invalid service account {value:?}: {reason}")]
    ServiceAccount { value: String, reason: &'static str },
}

/// A workload identity in the mesh.
///
/// The fields are public for matching and construction in tests; values
/// built by hand should go through [`SpiffeId::new`] (or be checked with
/// [`SpiffeId::validate`]) — everything in this crate that issues or
/// accepts an identity validates it again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// A validated identity.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        id.validate()?;
        Ok(id)
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`. Nothing else is accepted: no
    /// port, user, query, fragment, trailing slash or extra path segment.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let not_spiffe = || IdentityError::NotSpiffe {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix(SCHEME).ok_or_else(not_spiffe)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(not_spiffe());
        };
        SpiffeId::new(td, ns, sa)
    }

    /// Checks every part against the rules [`SpiffeId::new`] enforces.
    pub fn validate(&self) -> Result<(), IdentityError> {
        validate_trust_domain(&self.trust_domain)?;
        validate_namespace(&self.namespace)?;
        validate_service_account(&self.service_account)
    }

    /// The URI form, as written into certificates.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// The Kubernetes service-account subject of this identity,
    /// `system:serviceaccount:<ns>:<sa>`.
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        SpiffeId::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

/// A SPIFFE trust domain: lowercase letters, digits, `.`, `-` and `_`.
pub fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    let bad = |reason| IdentityError::TrustDomain {
        value: td.to_owned(),
        reason,
    };
    if td.is_empty() {
        return Err(bad("must not be empty"));
    }
    if td.len() > 255 {
        return Err(bad("longer than 255 characters"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(bad(
            "only lowercase letters, digits, '.', '-' and '_' are allowed",
        ));
    }
    Ok(())
}

/// A namespace: a DNS-1123 label (lowercase alphanumerics and `-`, at most
/// 63 characters, starting and ending with an alphanumeric).
pub fn validate_namespace(ns: &str) -> Result<(), IdentityError> {
    dns1123(ns, 63, false).map_err(|reason| IdentityError::Namespace {
        value: ns.to_owned(),
        reason,
    })
}

/// A service account: a DNS-1123 subdomain (like a label, but `.` is also
/// allowed and the limit is 253 characters).
pub fn validate_service_account(sa: &str) -> Result<(), IdentityError> {
    dns1123(sa, 253, true).map_err(|reason| IdentityError::ServiceAccount {
        value: sa.to_owned(),
        reason,
    })
}

fn dns1123(s: &str, max: usize, dots: bool) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > max {
        return Err(if max == 63 {
            "longer than 63 characters"
        } else {
            "longer than 253 characters"
        });
    }
    let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !s.bytes().all(|b| ok(b) || b == b'-' || (dots && b == b'.')) {
        return Err(if dots {
            "only lowercase letters, digits, '-' and '.' are allowed"
        } else {
            "only lowercase letters, digits and '-' are allowed"
        });
    }
    let bytes = s.as_bytes();
    if !ok(bytes[0]) || !ok(bytes[bytes.len() - 1]) {
        return Err("must start and end with a lowercase letter or digit");
    }
    if dots
        && s.split('.').any(|label| {
            label.is_empty() || !ok(label.as_bytes()[0]) || !ok(label.as_bytes()[label.len() - 1])
        })
    {
        return Err("each '.'-separated part must start and end with a lowercase letter or digit");
    }
    Ok(())
}

/// Why no identity could be read from a peer certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertIdentityError {
    #[error("peer certificate does not parse: {0}")]
    Parse(String),
    #[error("peer certificate is a CA certificate, not a workload certificate")]
    IsCa,
    #[error("peer certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("peer certificate has more than one SPIFFE URI SAN")]
    SeveralSpiffeIds,
    #[error("peer certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error("peer certificate belongs to trust domain {found:?}, not {expected:?}")]
    ForeignTrustDomain { found: String, expected: String },
}

/// The identity in a mesh leaf certificate (DER): its single SPIFFE URI SAN,
/// which must be in `trust_domain`.
///
/// This reads the certificate; it does **not** verify it. Only call it on a
/// certificate whose chain was verified against the mesh root, e.g. the peer
/// certificate of a TLS session set up with [`crate::server_tls_config`].
pub fn identity_of_certificate(
    der: &[u8],
    trust_domain: &str,
) -> Result<SpiffeId, CertIdentityError> {
    PeerIdentity::from_certificate(der, trust_domain).map(|peer| peer.id)
}

/// How far certificates are backdated against clock skew. Part of the
/// contract between [`crate::Authority`] (which backdates `notBefore` by
/// this much) and [`crate::Revocations`] (which recovers the issue time from
/// `notBefore`).
pub const CERT_BACKDATE: Duration = Duration::from_secs(60);

/// The authenticated identity of a caller that presented a verified mesh
/// certificate, and when that certificate was issued (so revoking the
/// account can also refuse certificates issued before the revocation).
///
/// The CA service finds it in the request in one of two ways (see
/// [`crate::CertificateService`]): a layer of the server inserts it as a
/// request extension, or tonic's `TlsConnectInfo` (the server serves
/// `tokio_rustls::server::TlsStream<TcpStream>` connections) carries the
/// peer certificates, from which it is derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    /// When the certificate was issued: its `notBefore` plus
    /// [`CERT_BACKDATE`].
    pub issued_at: SystemTime,
    /// The id of the token this certificate descends from, through any
    /// number of renewals: revoking that token refuses its renewals. Kept
    /// in the subject's `serialNumber` attribute as `vmesh-lineage:<id>`
    /// (the enrolment the subject came from); `None` for certificates from
    /// elsewhere.
    pub lineage: Option<String>,
}

/// The subject attribute that carries a certificate's lineage:
/// `serialNumber` (2.5.4.5).
pub const LINEAGE_ATTRIBUTE: &[u64] = &[2, 5, 4, 5];
/// What a lineage's value starts with.
pub const LINEAGE_PREFIX: &str = "vmesh-lineage:";

impl PeerIdentity {
    /// Reads identity and issue time from a verified leaf certificate (see
    /// [`identity_of_certificate`] for the caveat).
    pub fn from_certificate(der: &[u8], trust_domain: &str) -> Result<Self, CertIdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertIdentityError::Parse(e.to_string()))?;
        if cert.is_ca() {
            return Err(CertIdentityError::IsCa);
        }
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertIdentityError::Parse(e.to_string()))?
            .ok_or(CertIdentityError::NoSpiffeId)?;
        let mut uris = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri)
                    if uri.len() >= SCHEME.len()
                        && uri[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) =>
                {
                    Some(*uri)
                }
                _ => None,
            });
        let uri = uris.next().ok_or(CertIdentityError::NoSpiffeId)?;
        if uris.next().is_some() {
            return Err(CertIdentityError::SeveralSpiffeIds);
        }
        let id = SpiffeId::parse(uri)?;
        if id.trust_domain != trust_domain {
            return Err(CertIdentityError::ForeignTrustDomain {
                found: id.trust_domain,
                expected: trust_domain.to_owned(),
            });
        }
        let not_before = cert.validity().not_before.timestamp();
        let issued_at = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(not_before).unwrap_or(0))
            + CERT_BACKDATE;
        let lineage = cert
            .subject()
            .iter_by_oid(&x509_parser::oid_registry::OID_X509_SERIALNUMBER)
            .filter_map(|attribute| attribute.as_str().ok())
            .find_map(|value| value.strip_prefix(LINEAGE_PREFIX))
            .map(str::to_string);
        Ok(PeerIdentity {
            id,
            issued_at,
            lineage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/vm-ns/sa/payment.sa").unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "vm-ns");
        assert_eq!(id.service_account, "payment.sa");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/vm-ns/sa/payment.sa"
        );
        assert_eq!(id.subject(), "system:serviceaccount:vm-ns:payment.sa");
        assert_eq!(
            "spiffe://cluster.local/ns/vm-ns/sa/payment.sa"
                .parse::<SpiffeId>()
                .unwrap(),
            id
        );
    }

    #[test]
    fn serde_is_the_uri() {
        let id = SpiffeId::new("cluster.local", "a", "b").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/a/sa/b\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://x/ns/a\"").is_err());
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local:443/ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a.b/sa/b",
            "spiffe://cluster.local/ns/-a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=y",
            "spiffe://cluster.local/ns/a/sa/b..c",
            "spiffe://user@cluster.local/ns/a/sa/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let long = "a".repeat(64);
        assert!(matches!(
            SpiffeId::new("cluster.local", long, "b"),
            Err(IdentityError::Namespace { .. })
        ));
    }

    #[test]
    fn reads_the_single_spiffe_san_of_a_leaf() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![
            rcgen::SanType::DnsName("x.example".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()),
        ];
        let cert = params.self_signed(&key).unwrap();
        let id = identity_of_certificate(cert.der(), "cluster.local").unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "a", "b").unwrap());
        assert!(matches!(
            identity_of_certificate(cert.der(), "other.domain"),
            Err(CertIdentityError::ForeignTrustDomain { .. })
        ));

        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/c/sa/d".try_into().unwrap(),
        ));
        let two = params.self_signed(&key).unwrap();
        assert_eq!(
            identity_of_certificate(two.der(), "cluster.local"),
            Err(CertIdentityError::SeveralSpiffeIds)
        );

        params.subject_alt_names.truncate(1);
        let none = params.self_signed(&key).unwrap();
        assert_eq!(
            identity_of_certificate(none.der(), "cluster.local"),
            Err(CertIdentityError::NoSpiffeId)
        );

        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        )];
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        assert_eq!(
            identity_of_certificate(ca.der(), "cluster.local"),
            Err(CertIdentityError::IsCa)
        );
        assert!(matches!(
            identity_of_certificate(b"garbage", "cluster.local"),
            Err(CertIdentityError::Parse(_))
        ));
    }
}
