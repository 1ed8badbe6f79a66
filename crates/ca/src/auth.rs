//! Who is calling: a bearer token, or the caller's verified mesh
//! certificate.

use tonic::metadata::MetadataMap;

use crate::identity::{PeerIdentity, SpiffeId};
use crate::revocation::Revocations;
use crate::token::{TokenError, TokenIssuer};

/// Why a caller is not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no credentials: send 'authorization: Bearer <token>' or connect with a mesh client certificate"
    )]
    NoCredentials,
    #[error("authorization header is not 'Bearer <token>'")]
    NotBearer,
    #[error("bearer token refused: {0}")]
    Token(#[from] TokenError),
    #[error("client certificate identity {id} is outside trust domain {trust_domain:?}")]
    ForeignPeer { id: SpiffeId, trust_domain: String },
    #[error("client certificate of {id} was issued before its account was revoked")]
    PeerRevoked { id: SpiffeId },
    #[error("client certificate of {id} descends from revoked token {lineage}")]
    LineageRevoked { id: SpiffeId, lineage: String },
}

/// An authenticated caller: who it is, and the lineage of the credential it
/// proved it with (the token's id, or the certificate's lineage), which
/// every certificate issued to it carries on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub id: SpiffeId,
    pub lineage: Option<String>,
}

impl AuthError {
    /// Whether the caller presented a credential that was never one of
    /// ours (a guess or a forgery), as opposed to one that was ours and is
    /// no longer good (expired, revoked). Throttles count only these.
    pub fn is_forgery(&self) -> bool {
        match self {
            AuthError::NotBearer | AuthError::ForeignPeer { .. } => true,
            AuthError::Token(e) => matches!(
                e,
                TokenError::Malformed(_)
                    | TokenError::WrongAlgorithm
                    | TokenError::BadSignature
                    | TokenError::WrongAudience
                    | TokenError::WrongIssuer
                    | TokenError::MissingClaim(_)
                    | TokenError::BadSubject(_)
            ),
            AuthError::NoCredentials
            | AuthError::PeerRevoked { .. }
            | AuthError::LineageRevoked { .. } => false,
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        tonic::Status::unauthenticated(e.to_string())
    }
}

/// The bearer token in `authorization`, if the header is there.
/// `Err(NotBearer)` when it is present but is not a bearer token.
pub fn bearer_token(metadata: &MetadataMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| AuthError::NotBearer)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::NotBearer)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::NotBearer);
    }
    Ok(Some(token))
}

/// Authenticates a caller of the CA (or any service on 15012).
///
/// 1. A bearer token (`authorization: Bearer <jwt>`) verified by `issuer`
///    and not revoked: its subject `system:serviceaccount:<ns>:<sa>` is the
///    identity, in the issuer's trust domain.
/// 2. Otherwise the identity of the caller's verified mesh client
///    certificate (`peer`), unless its account was revoked after the
///    certificate was issued. This is how a workload renews after its
///    bootstrap token expired: a caller that still sends an expired or
///    revoked token along with a valid certificate is authenticated by the
///    certificate.
///
/// Neither: an error, with the token's reason when a token was sent.
pub fn authenticate(
    metadata: &MetadataMap,
    peer: Option<&PeerIdentity>,
    issuer: &TokenIssuer,
    revocations: &Revocations,
) -> Result<Caller, AuthError> {
    let token_result = match bearer_token(metadata) {
        Ok(Some(token)) => Some(
            issuer
                .verify(token, revocations)
                .and_then(|claims| {
                    Ok(Caller {
                        id: issuer.identity_of(&claims)?,
                        lineage: Some(claims.jti),
                    })
                })
                .map_err(AuthError::Token),
        ),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    };
    let token_error = match token_result {
        Some(Ok(id)) => return Ok(id),
        Some(Err(e)) => Some(e),
        None => None,
    };
    let peer_result = peer.map(|peer| {
        if peer.id.trust_domain != issuer.trust_domain() {
            return Err(AuthError::ForeignPeer {
                id: peer.id.clone(),
                trust_domain: issuer.trust_domain().to_owned(),
            });
        }
        peer.id
            .validate()
            .map_err(|e| AuthError::Token(TokenError::Identity(e)))?;
        if revocations.is_identity_revoked(
            &peer.id.namespace,
            &peer.id.service_account,
            peer.issued_at,
        ) {
            return Err(AuthError::PeerRevoked {
                id: peer.id.clone(),
            });
        }
        if let Some(lineage) = &peer.lineage
            && revocations.is_lineage_revoked(lineage)
        {
            return Err(AuthError::LineageRevoked {
                id: peer.id.clone(),
                lineage: lineage.clone(),
            });
        }
        Ok(Caller {
            id: peer.id.clone(),
            lineage: peer.lineage.clone(),
        })
    });
    match (peer_result, token_error) {
        (Some(Ok(caller)), token_error) => {
            if let Some(e) = token_error {
                tracing::debug!(identity = %caller.id, error = %e, "token refused; caller authenticated by its client certificate");
            }
            Ok(caller)
        }
        (_, Some(token_error)) => Err(token_error),
        (Some(Err(peer_error)), None) => Err(peer_error),
        (None, None) => Err(AuthError::NoCredentials),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};
    use tonic::metadata::MetadataValue;

    fn md(auth: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(a) = auth {
            m.insert("authorization", MetadataValue::try_from(a).unwrap());
        }
        m
    }

    #[test]
    fn token_then_certificate_then_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = TokenIssuer::load_or_create(dir.path(), "cluster.local").unwrap();
        let none = Revocations::new();
        let t = issuer.issue("vm", "pay", Duration::from_secs(60)).unwrap();
        let peer = PeerIdentity {
            id: SpiffeId::new("cluster.local", "vm", "cert").unwrap(),
            issued_at: SystemTime::now() - Duration::from_secs(100),
            lineage: Some("enrolment".into()),
        };

        let bearer = format!("Bearer {}", t.token);
        let id = authenticate(&md(Some(&bearer)), Some(&peer), &issuer, &none).unwrap();
        assert_eq!(id.id.service_account, "pay", "a valid token comes first");
        assert_eq!(
            id.lineage.as_deref(),
            Some(t.id.as_str()),
            "the token's id is the lineage"
        );
        let lower = format!("bearer {}", t.token);
        assert_eq!(
            authenticate(&md(Some(&lower)), None, &issuer, &none).unwrap(),
            id
        );

        let id = authenticate(&md(None), Some(&peer), &issuer, &none).unwrap();
        assert_eq!(id.id.service_account, "cert");
        assert_eq!(
            id.lineage.as_deref(),
            Some("enrolment"),
            "the certificate's lineage carries on"
        );
        let id = authenticate(&md(Some("Bearer garbage")), Some(&peer), &issuer, &none).unwrap();
        assert_eq!(
            id.id.service_account, "cert",
            "a bad token falls back to the certificate"
        );

        assert!(matches!(
            authenticate(&md(None), None, &issuer, &none),
            Err(AuthError::NoCredentials)
        ));
        assert!(matches!(
            authenticate(&md(Some("Basic abc")), None, &issuer, &none),
            Err(AuthError::NotBearer)
        ));
        assert!(matches!(
            authenticate(&md(Some("Bearer ")), None, &issuer, &none),
            Err(AuthError::NotBearer)
        ));
        assert!(matches!(
            authenticate(&md(Some("Bearer garbage")), None, &issuer, &none),
            Err(AuthError::Token(TokenError::Malformed(_)))
        ));
        let status: tonic::Status = AuthError::NoCredentials.into();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn certificate_refused_when_foreign_or_account_or_lineage_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = TokenIssuer::load_or_create(dir.path(), "cluster.local").unwrap();
        let foreign = PeerIdentity {
            id: SpiffeId::new("other.td", "vm", "cert").unwrap(),
            issued_at: SystemTime::now(),
            lineage: None,
        };
        assert!(matches!(
            authenticate(&md(None), Some(&foreign), &issuer, &Revocations::new()),
            Err(AuthError::ForeignPeer { .. })
        ));
        let now = SystemTime::now();
        let old = PeerIdentity {
            id: SpiffeId::new("cluster.local", "vm", "cert").unwrap(),
            issued_at: now - Duration::from_secs(10),
            lineage: Some("join1.abc".into()),
        };
        let newer = PeerIdentity {
            issued_at: now + Duration::from_secs(10),
            ..old.clone()
        };
        let mut revoked = Revocations::new();
        revoked.revoke_account("vm", "cert", now);
        assert!(matches!(
            authenticate(&md(None), Some(&old), &issuer, &revoked),
            Err(AuthError::PeerRevoked { .. })
        ));
        authenticate(&md(None), Some(&newer), &issuer, &revoked).unwrap();

        // Revoking the token a certificate descends from refuses it, however
        // recently it was issued.
        revoked.revoke_token("join1");
        assert!(matches!(
            authenticate(&md(None), Some(&newer), &issuer, &revoked),
            Err(AuthError::LineageRevoked { .. })
        ));
    }
}
