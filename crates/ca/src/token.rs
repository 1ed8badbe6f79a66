//! Bootstrap tokens: ES256 JWTs that let a VM obtain its first certificate
//! (Istio's `istio-token`, audience `istio-ca`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::KeyPair;
use serde::{Deserialize, Deserializer, Serialize};

use crate::files;
use crate::identity::{
    IdentityError, SpiffeId, validate_namespace, validate_service_account, validate_trust_domain,
};
use crate::revocation::{Revocations, unix_secs};

/// File name of the token signing key (mode 0600) in the CA directory.
pub const TOKEN_KEY_FILE: &str = "token-key.pem";
/// `iss` of every token.
pub const TOKEN_ISSUER: &str = "vmesh";
/// The audience the CA accepts, as in Istio.
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// Clock skew tolerated on `exp`.
pub const TOKEN_LEEWAY: Duration = Duration::from_secs(5);

const SUBJECT_PREFIX: &str = "system:serviceaccount:";

/// Why a token could not be issued or was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token signing key {path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("key generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot issue a token: {0}")]
    Identity(#[from] IdentityError),
    #[error("token lifetime must be positive")]
    ZeroTtl,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token algorithm is not ES256")]
    WrongAlgorithm,
    #[error("token signature does not verify: forged, or signed by another key")]
    BadSignature,
    #[error("token expired at {expired_at} (Unix time)")]
    Expired { expired_at: u64 },
    #[error("token is not valid before {valid_from} (Unix time)")]
    NotYetValid { valid_from: u64 },
    #[error("token audience is not {TOKEN_AUDIENCE:?}")]
    WrongAudience,
    #[error("token issuer is not {TOKEN_ISSUER:?}")]
    WrongIssuer,
    #[error("token lacks the {0:?} claim")]
    MissingClaim(String),
    #[error("token subject {0:?} is not system:serviceaccount:<namespace>:<service-account>")]
    BadSubject(String),
    #[error("token {id} has been revoked")]
    Revoked { id: String },
    #[error("signing the token failed: {0}")]
    Sign(String),
}

/// The claims of a vmesh token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub iss: String,
    /// Always written as an array; a single string is accepted too.
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// `system:serviceaccount:<namespace>:<service-account>`.
    pub sub: String,
    /// Issue time, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Not valid before, Unix seconds (RFC 7519 `nbf`; vmesh never sets it,
    /// but honours it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Token id (UUID v4), the handle for revoking one token.
    pub jti: String,
}

impl TokenClaims {
    /// Namespace and service account named by `sub`.
    pub fn account(&self) -> Result<(&str, &str), TokenError> {
        let bad = || TokenError::BadSubject(self.sub.clone());
        let rest = self.sub.strip_prefix(SUBJECT_PREFIX).ok_or_else(bad)?;
        let (ns, sa) = rest.split_once(':').ok_or_else(bad)?;
        validate_namespace(ns).map_err(|_| bad())?;
        validate_service_account(sa).map_err(|_| bad())?;
        Ok((ns, sa))
    }

    /// The identity the token stands for, in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, TokenError> {
        let (ns, sa) = self.account()?;
        Ok(SpiffeId::new(trust_domain, ns, sa)?)
    }

    pub fn issued_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.iat)
    }

    pub fn expires(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.exp)
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// A token just issued.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The compact JWT. A secret: not shown by `Debug`.
    pub token: String,
    /// Its `jti`, for revocation.
    pub id: String,
    pub expires: SystemTime,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &"<redacted>")
            .field("id", &self.id)
            .field("expires", &self.expires)
            .finish()
    }
}

/// Issues and verifies tokens with one ES256 key kept in the CA directory.
pub struct TokenIssuer {
    trust_domain: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// This issuer's key id (`kid` in the tokens it signs) and public key.
    key_id: String,
    public_pem: String,
    /// The public keys of the other servers of the same control plane, by
    /// key id: a token any of them signed verifies here too.
    peers: parking_lot::RwLock<std::collections::HashMap<String, DecodingKey>>,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// Loads the signing key from `dir/token-key.pem`, creating it (ECDSA
    /// P-256, mode 0600) on first start. `trust_domain` is the one verified
    /// tokens map their subject into.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, TokenError> {
        validate_trust_domain(trust_domain)?;
        files::ensure_private_dir(dir).map_err(|source| TokenError::Io {
            action: "creating",
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(TOKEN_KEY_FILE);
        let key = if files::exists(&path) {
            let pem = files::read_secret(&path).map_err(|source| TokenError::Io {
                action: "reading",
                path: path.clone(),
                source,
            })?;
            KeyPair::from_pem(&pem).map_err(|e| TokenError::BadKey {
                path: path.clone(),
                reason: e.to_string(),
            })?
        } else {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            files::write_secret(&path, &key.serialize_pem()).map_err(|source| TokenError::Io {
                action: "writing",
                path: path.clone(),
                source,
            })?;
            key
        };
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(TokenError::BadKey {
                path,
                reason: "not an ECDSA P-256 key".into(),
            });
        }
        let bad = |e: jsonwebtoken::errors::Error| TokenError::BadKey {
            path: path.clone(),
            reason: e.to_string(),
        };
        let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).map_err(bad)?;
        let public_pem = key.public_key_pem();
        let decoding = DecodingKey::from_ec_pem(public_pem.as_bytes()).map_err(bad)?;

        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[TOKEN_AUDIENCE]);
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "aud", "iss"]);
        // Expiry is checked by `verify_at` against its own clock, so that
        // tests and callers can pass the time.
        validation.validate_exp = false;
        validation.leeway = 0;
        Ok(TokenIssuer {
            trust_domain: trust_domain.to_owned(),
            encoding,
            decoding,
            validation,
            key_id: key_id(&public_pem),
            public_pem,
            peers: Default::default(),
        })
    }

    /// This issuer's key id and public key (PEM), for the other servers of
    /// the control plane to trust.
    pub fn public_key(&self) -> (&str, &str) {
        (&self.key_id, &self.public_pem)
    }

    /// Trusts tokens signed by another server's key. The key id must be the
    /// key's own (a record cannot pass one key off as another's).
    pub fn trust_peer(&self, public_pem: &str) -> Result<String, TokenError> {
        let decoding =
            DecodingKey::from_ec_pem(public_pem.as_bytes()).map_err(|e| TokenError::BadKey {
                path: "a peer server's public key".into(),
                reason: e.to_string(),
            })?;
        let id = key_id(public_pem);
        if id != self.key_id {
            self.peers.write().insert(id.clone(), decoding);
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A token for `namespace/service_account`, valid for `ttl` from now.
    pub fn issue(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
    ) -> Result<IssuedToken, TokenError> {
        self.issue_at(namespace, service_account, ttl, SystemTime::now())
    }

    /// A token minted from another credential (a join token): its id is
    /// `<parent>.<uuid>`, so revoking `parent` revokes it and every
    /// certificate of its lineage.
    pub fn issue_from(
        &self,
        parent: &str,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
    ) -> Result<IssuedToken, TokenError> {
        let id = format!("{parent}.{}", uuid::Uuid::new_v4().simple());
        self.sign(namespace, service_account, ttl, SystemTime::now(), id)
    }

    /// [`TokenIssuer::issue`] as if it were `now`.
    pub fn issue_at(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedToken, TokenError> {
        let id = uuid::Uuid::new_v4().to_string();
        self.sign(namespace, service_account, ttl, now, id)
    }

    fn sign(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
        now: SystemTime,
        jti: String,
    ) -> Result<IssuedToken, TokenError> {
        validate_namespace(namespace)?;
        validate_service_account(service_account)?;
        let ttl = ttl.as_secs();
        if ttl == 0 {
            return Err(TokenError::ZeroTtl);
        }
        let iat = unix_secs(now);
        let claims = TokenClaims {
            iss: TOKEN_ISSUER.to_owned(),
            aud: vec![TOKEN_AUDIENCE.to_owned()],
            sub: format!("{SUBJECT_PREFIX}{namespace}:{service_account}"),
            iat,
            exp: iat.saturating_add(ttl),
            nbf: None,
            jti,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| TokenError::Sign(e.to_string()))?;
        Ok(IssuedToken {
            token,
            id: claims.jti.clone(),
            expires: claims.expires(),
        })
    }

    /// Verifies a token: ES256 signature by this issuer's key, issuer
    /// `vmesh`, audience `istio-ca`, not expired (five seconds of leeway),
    /// subject `system:serviceaccount:<ns>:<sa>`, and not revoked.
    pub fn verify(
        &self,
        token: &str,
        revocations: &Revocations,
    ) -> Result<TokenClaims, TokenError> {
        self.verify_at(token, revocations, SystemTime::now())
    }

    /// [`TokenIssuer::verify`] as if it were `now`.
    pub fn verify_at(
        &self,
        token: &str,
        revocations: &Revocations,
        now: SystemTime,
    ) -> Result<TokenClaims, TokenError> {
        // The key the token names: this server's (or none: tokens from
        // before key ids), or a peer server's.
        let header = jsonwebtoken::decode_header(token).map_err(map_jwt_error)?;
        let peers = self.peers.read();
        let key = match header.kid.as_deref() {
            None => &self.decoding,
            Some(id) if id == self.key_id => &self.decoding,
            Some(id) => peers.get(id).ok_or(TokenError::BadSignature)?,
        };
        let data = jsonwebtoken::decode::<TokenClaims>(token, key, &self.validation)
            .map_err(map_jwt_error)?;
        drop(peers);
        let claims = data.claims;
        let now = unix_secs(now);
        if claims.exp.saturating_add(TOKEN_LEEWAY.as_secs()) <= now {
            return Err(TokenError::Expired {
                expired_at: claims.exp,
            });
        }
        // Issued (or valid) only in the future: someone's clock is wrong,
        // and the token is not good yet.
        let valid_from = claims.nbf.unwrap_or(0).max(claims.iat);
        if valid_from > now.saturating_add(TOKEN_LEEWAY.as_secs()) {
            return Err(TokenError::NotYetValid { valid_from });
        }
        claims.account()?;
        if revocations.is_revoked(&claims) {
            return Err(TokenError::Revoked {
                id: claims.jti.clone(),
            });
        }
        Ok(claims)
    }

    /// The identity a verified token stands for, in this issuer's trust
    /// domain.
    pub fn identity_of(&self, claims: &TokenClaims) -> Result<SpiffeId, TokenError> {
        claims.identity(&self.trust_domain)
    }
}

/// A public key's id: the start of its SHA-256.
fn key_id(public_pem: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(public_pem.trim().as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::WrongAlgorithm,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
        ErrorKind::ExpiredSignature => TokenError::Expired { expired_at: 0 },
        _ => TokenError::Malformed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn issuer() -> (tempfile::TempDir, TokenIssuer) {
        let dir = tempfile::tempdir().unwrap();
        let issuer = TokenIssuer::load_or_create(dir.path(), "cluster.local").unwrap();
        (dir, issuer)
    }

    #[test]
    fn issue_and_verify() {
        let (dir, issuer) = issuer();
        let mode = std::fs::metadata(dir.path().join(TOKEN_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let t = issuer
            .issue("vm", "payment", Duration::from_secs(3600))
            .unwrap();
        let claims = issuer.verify(&t.token, &Revocations::new()).unwrap();
        assert_eq!(claims.sub, "system:serviceaccount:vm:payment");
        assert_eq!(claims.aud, vec!["istio-ca".to_string()]);
        assert_eq!(claims.iss, "vmesh");
        assert_eq!(claims.jti, t.id);
        assert_eq!(claims.exp - claims.iat, 3600);
        assert_eq!(claims.expires(), t.expires);
        assert!(uuid::Uuid::parse_str(&claims.jti).is_ok());
        assert_eq!(
            issuer.identity_of(&claims).unwrap().to_string(),
            "spiffe://cluster.local/ns/vm/sa/payment"
        );
        assert!(!format!("{t:?}").contains(&t.token));

        // The reloaded key verifies the old token.
        let again = TokenIssuer::load_or_create(dir.path(), "cluster.local").unwrap();
        again.verify(&t.token, &Revocations::new()).unwrap();
    }

    #[test]
    fn expiry_has_only_a_few_seconds_of_leeway() {
        let (_dir, issuer) = issuer();
        let now = SystemTime::now();
        let t = issuer
            .issue_at("a", "b", Duration::from_secs(60), now)
            .unwrap();
        let none = Revocations::new();
        issuer
            .verify_at(&t.token, &none, now + Duration::from_secs(59))
            .unwrap();
        issuer
            .verify_at(&t.token, &none, now + Duration::from_secs(62))
            .unwrap();
        assert!(matches!(
            issuer.verify_at(&t.token, &none, now + Duration::from_secs(66)),
            Err(TokenError::Expired { .. })
        ));
        let old = issuer
            .issue_at(
                "a",
                "b",
                Duration::from_secs(3600),
                now - Duration::from_secs(7200),
            )
            .unwrap();
        assert!(matches!(
            issuer.verify(&old.token, &none),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn tokens_of_trusted_peer_servers_verify_and_others_do_not() {
        let (_dir, issuer) = issuer();
        let (_dir2, peer) = self::issuer();
        let (_dir3, stranger) = self::issuer();
        let none = Revocations::new();
        let from_peer = peer.issue("a", "b", Duration::from_secs(60)).unwrap();
        assert!(matches!(
            issuer.verify(&from_peer.token, &none),
            Err(TokenError::BadSignature)
        ));
        let (peer_id, peer_pem) = peer.public_key();
        assert_eq!(issuer.trust_peer(peer_pem).unwrap(), peer_id);
        let claims = issuer.verify(&from_peer.token, &none).unwrap();
        assert_eq!(claims.jti, from_peer.id);
        // A stranger's token naming the peer's key id is still refused.
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(peer_id.to_string());
        let claims = TokenClaims {
            iss: TOKEN_ISSUER.into(),
            aud: vec![TOKEN_AUDIENCE.into()],
            sub: format!("{SUBJECT_PREFIX}a:b"),
            iat: unix_secs(SystemTime::now()),
            exp: unix_secs(SystemTime::now()) + 60,
            nbf: None,
            jti: "forged".into(),
        };
        let forged = jsonwebtoken::encode(&header, &claims, &stranger.encoding).unwrap();
        assert!(matches!(
            issuer.verify(&forged, &none),
            Err(TokenError::BadSignature)
        ));
    }

    #[test]
    fn refuses_forged_garbage_and_revoked() {
        let (_dir, issuer) = issuer();
        let (_dir2, other) = self::issuer();
        let none = Revocations::new();
        let forged = other.issue("a", "b", Duration::from_secs(60)).unwrap();
        assert!(matches!(
            issuer.verify(&forged.token, &none),
            Err(TokenError::BadSignature)
        ));
        for garbage in ["", "x", "a.b.c", "eyJhbGciOiJub25lIn0.e30."] {
            assert!(issuer.verify(garbage, &none).is_err(), "{garbage:?}");
        }
        // An HS256 token is refused whatever its key.
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"iss":"vmesh","aud":["istio-ca"],"sub":"system:serviceaccount:a:b","iat":1,"exp":u64::MAX/2,"jti":"x"}),
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert!(matches!(
            issuer.verify(&hs, &none),
            Err(TokenError::WrongAlgorithm)
        ));

        let t = issuer.issue("a", "b", Duration::from_secs(60)).unwrap();
        let mut revoked = Revocations::new();
        revoked.revoke_token(&t.id);
        assert!(matches!(
            issuer.verify(&t.token, &revoked),
            Err(TokenError::Revoked { .. })
        ));
        let mut revoked = Revocations::new();
        revoked.revoke_account("a", "b", SystemTime::now());
        assert!(matches!(
            issuer.verify(&t.token, &revoked),
            Err(TokenError::Revoked { .. })
        ));
        revoked.revoke_account("x", "y", SystemTime::now());
        let mut only_other = Revocations::new();
        only_other.revoke_account("a", "c", SystemTime::now());
        issuer.verify(&t.token, &only_other).unwrap();
    }

    fn sign_raw(dir: &Path, claims: serde_json::Value) -> String {
        let pem = std::fs::read(dir.join(TOKEN_KEY_FILE)).unwrap();
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(&pem).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn refuses_wrong_audience_issuer_subject_and_missing_claims() {
        let (dir, issuer) = issuer();
        let none = Revocations::new();
        let now = unix_secs(SystemTime::now());
        let base = serde_json::json!({
            "iss": "vmesh", "aud": ["istio-ca"], "sub": "system:serviceaccount:a:b",
            "iat": now, "exp": now + 60, "jti": "id-1",
        });
        let with = |k: &str, v: serde_json::Value| {
            let mut c = base.clone();
            c[k] = v;
            sign_raw(dir.path(), c)
        };
        issuer
            .verify(&sign_raw(dir.path(), base.clone()), &none)
            .unwrap();
        // A single-string audience is fine when it is ours.
        issuer
            .verify(&with("aud", "istio-ca".into()), &none)
            .unwrap();
        assert!(matches!(
            issuer.verify(&with("aud", serde_json::json!(["kubernetes"])), &none),
            Err(TokenError::WrongAudience)
        ));
        assert!(matches!(
            issuer.verify(&with("iss", "someone".into()), &none),
            Err(TokenError::WrongIssuer)
        ));
        for sub in [
            "admin",
            "system:serviceaccount:a",
            "system:serviceaccount:A:b",
            "system:serviceaccount:a:b:c",
            "system:serviceaccount::b",
        ] {
            assert!(
                matches!(
                    issuer.verify(&with("sub", sub.into()), &none),
                    Err(TokenError::BadSubject(_))
                ),
                "{sub}"
            );
        }
        // Not valid yet: a future `nbf`, or issued in the future.
        assert!(matches!(
            issuer.verify(&with("nbf", (now + 600).into()), &none),
            Err(TokenError::NotYetValid { .. })
        ));
        assert!(matches!(
            issuer.verify(&with("iat", (now + 600).into()), &none),
            Err(TokenError::NotYetValid { .. })
        ));
        issuer
            .verify(&with("nbf", (now - 10).into()), &none)
            .unwrap();
        let mut no_exp = base.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        let err = issuer
            .verify(&sign_raw(dir.path(), no_exp), &none)
            .unwrap_err();
        assert!(
            matches!(&err, TokenError::MissingClaim(_)) || err.to_string().contains("`exp`"),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_bad_names_and_zero_ttl() {
        let (_dir, issuer) = issuer();
        assert!(matches!(
            issuer.issue("A", "b", Duration::from_secs(1)),
            Err(TokenError::Identity(_))
        ));
        assert!(matches!(
            issuer.issue("a", "b:c", Duration::from_secs(1)),
            Err(TokenError::Identity(_))
        ));
        assert!(matches!(
            issuer.issue("a", "b", Duration::ZERO),
            Err(TokenError::ZeroTtl)
        ));
    }
}
