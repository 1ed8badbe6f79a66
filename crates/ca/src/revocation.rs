//! Revoked bootstrap tokens and accounts: plain data that the server
//! persists in its store and hands to the CA service at every call.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::token::TokenClaims;

/// What has been revoked.
///
/// Timestamps have one-second resolution, like a JWT's `iat`: revoking an
/// account at time T refuses tokens (and mesh certificates, for renewal)
/// issued at or before T's second, so a token issued in that same second
/// after the revocation is refused too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocations {
    /// Ids (`jti`) of single revoked tokens.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub tokens: BTreeSet<String>,
    /// `"<namespace>/<service-account>"` → Unix time (seconds): every token
    /// and certificate of that account issued at or before it is revoked.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accounts: BTreeMap<String, u64>,
}

impl Revocations {
    /// Nothing revoked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Revokes the token whose id (`jti`) is `id`.
    pub fn revoke_token(&mut self, id: impl Into<String>) {
        self.tokens.insert(id.into());
    }

    /// Revokes every token and certificate of `namespace/service_account`
    /// issued at or before `now`. A later call only moves the time forward.
    pub fn revoke_account(&mut self, namespace: &str, service_account: &str, now: SystemTime) {
        let secs = unix_secs(now);
        let entry = self
            .accounts
            .entry(account_key(namespace, service_account))
            .or_insert(secs);
        *entry = (*entry).max(secs);
    }

    /// When the account was last revoked, if ever.
    pub fn account_revoked_at(&self, namespace: &str, service_account: &str) -> Option<SystemTime> {
        self.accounts
            .get(&account_key(namespace, service_account))
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(*secs))
    }

    /// Whether a token is revoked, by its id or through its account. A
    /// token whose subject is not a service account is treated as revoked.
    pub fn is_revoked(&self, claims: &TokenClaims) -> bool {
        if self.tokens.contains(&claims.jti) {
            return true;
        }
        match claims.account() {
            Ok((ns, sa)) => self.is_account_revoked(ns, sa, claims.iat),
            Err(_) => true,
        }
    }

    /// Whether a credential of `namespace/service_account` issued at
    /// `issued_at` (a mesh certificate presented for renewal) is revoked.
    pub fn is_identity_revoked(
        &self,
        namespace: &str,
        service_account: &str,
        issued_at: SystemTime,
    ) -> bool {
        self.is_account_revoked(namespace, service_account, unix_secs(issued_at))
    }

    fn is_account_revoked(&self, namespace: &str, service_account: &str, issued_at: u64) -> bool {
        self.accounts
            .get(&account_key(namespace, service_account))
            .is_some_and(|revoked| issued_at <= *revoked)
    }
}

fn account_key(namespace: &str, service_account: &str) -> String {
    format!("{namespace}/{service_account}")
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(jti: &str, sub: &str, iat: u64) -> TokenClaims {
        TokenClaims {
            iss: "vmesh".into(),
            aud: vec!["istio-ca".into()],
            sub: sub.into(),
            iat,
            exp: iat + 3600,
            nbf: None,
            jti: jti.into(),
        }
    }

    #[test]
    fn by_id_and_by_account() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut r = Revocations::new();
        let a = claims("a", "system:serviceaccount:ns:sa", 999_000);
        let b = claims("b", "system:serviceaccount:ns:sa", 1_000_000);
        let c = claims("c", "system:serviceaccount:ns:sa", 1_000_001);
        let other = claims("d", "system:serviceaccount:ns:other", 999_000);
        assert!(![&a, &b, &c, &other].iter().any(|c| r.is_revoked(c)));

        r.revoke_token("a");
        assert!(r.is_revoked(&a));
        assert!(!r.is_revoked(&b));

        r.revoke_account("ns", "sa", t0);
        assert!(r.is_revoked(&b), "issued at the revocation time");
        assert!(!r.is_revoked(&c), "issued after");
        assert!(!r.is_revoked(&other), "another account");
        assert_eq!(r.account_revoked_at("ns", "sa"), Some(t0));
        assert!(r.is_identity_revoked("ns", "sa", t0 - Duration::from_secs(10)));
        assert!(!r.is_identity_revoked("ns", "sa", t0 + Duration::from_secs(1)));

        // An earlier revocation never un-revokes.
        r.revoke_account("ns", "sa", t0 - Duration::from_secs(500));
        assert!(r.is_revoked(&b));

        assert!(r.is_revoked(&claims("e", "not-a-subject", 5)));
    }

    #[test]
    fn serde_round_trip() {
        let mut r = Revocations::new();
        r.revoke_token("abc");
        r.revoke_account("ns", "sa", SystemTime::UNIX_EPOCH + Duration::from_secs(42));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"{"tokens":["abc"],"accounts":{"ns/sa":42}}"#);
        assert_eq!(serde_json::from_str::<Revocations>(&json).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Revocations>("{}").unwrap(),
            Revocations::new()
        );
    }
}
