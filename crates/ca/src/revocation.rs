//! Revoked bootstrap tokens and accounts: plain data that the server
//! persists in its store and hands to the CA service at every call.
//!
//! A token's id is also the lineage of every certificate issued with it and
//! of every renewal of those (see [`crate::PeerIdentity::lineage`]); ids are
//! dot-separated, a token minted from a join token being `<join id>.<uuid>`.
//! Revoking an id revokes every lineage below it.

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
    /// Ids (`jti`) of revoked tokens and lineages → Unix time (seconds) of
    /// the revocation.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "tokens_of_either_form"
    )]
    pub tokens: BTreeMap<String, u64>,
    /// `"<namespace>/<service-account>"` → Unix time (seconds): every token
    /// and certificate of that account issued at or before it is revoked.
    /// `"<namespace>/*"` stands for every account of a namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accounts: BTreeMap<String, u64>,
    /// Accounts (`"<namespace>/<service-account>"`) and namespaces
    /// (`"<namespace>/*"`) deleted and not created again: nothing is issued
    /// to them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub deleted: BTreeSet<String>,
}

impl Revocations {
    /// Nothing revoked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Revokes the token whose id (`jti`) is `id`, and the lineage of
    /// certificates issued with it.
    pub fn revoke_token(&mut self, id: impl Into<String>) {
        self.tokens
            .entry(id.into())
            .or_insert_with(|| unix_secs(SystemTime::now()));
    }

    /// Whether a lineage (a token id, or a certificate's lineage) is revoked,
    /// itself or through an ancestor.
    pub fn is_lineage_revoked(&self, lineage: &str) -> bool {
        lineage
            .match_indices('.')
            .map(|(end, _)| &lineage[..end])
            .chain(std::iter::once(lineage))
            .any(|ancestor| self.tokens.contains_key(ancestor))
    }

    /// Forgets token revocations older than `keep_for`: by then every token
    /// of the lineage has expired and, its renewals having been refused,
    /// every certificate too. Returns how many were forgotten.
    pub fn expire(&mut self, now: SystemTime, keep_for: Duration) -> usize {
        let horizon = unix_secs(now).saturating_sub(keep_for.as_secs());
        let before = self.tokens.len();
        self.tokens.retain(|_, revoked| *revoked >= horizon);
        before - self.tokens.len()
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

    /// Records that an account (or with `None`, a whole namespace) was
    /// deleted, which revokes everything issued to it so far, or created
    /// again, which lets issuance resume.
    pub fn set_deleted(
        &mut self,
        namespace: &str,
        service_account: Option<&str>,
        deleted: bool,
        now: SystemTime,
    ) {
        let account = service_account.unwrap_or(ALL_ACCOUNTS);
        let key = account_key(namespace, account);
        if deleted {
            self.revoke_account(namespace, account, now);
            self.deleted.insert(key);
        } else {
            self.deleted.remove(&key);
        }
    }

    /// Whether the account or its namespace was deleted (and not created again).
    pub fn is_deleted(&self, namespace: &str, service_account: &str) -> bool {
        self.deleted
            .contains(&account_key(namespace, service_account))
            || self.deleted.contains(&account_key(namespace, ALL_ACCOUNTS))
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
        if self.is_lineage_revoked(&claims.jti) {
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
        [service_account, ALL_ACCOUNTS].iter().any(|account| {
            self.accounts
                .get(&account_key(namespace, account))
                .is_some_and(|revoked| issued_at <= *revoked)
        })
    }
}

/// Token revocations as a list of ids (the form before they had times) or
/// as ids with times.
fn tokens_of_either_form<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Tokens {
        Ids(BTreeSet<String>),
        Timed(BTreeMap<String, u64>),
    }
    Ok(match Tokens::deserialize(d)? {
        Tokens::Ids(ids) => {
            let now = unix_secs(SystemTime::now());
            ids.into_iter().map(|id| (id, now)).collect()
        }
        Tokens::Timed(timed) => timed,
    })
}

/// The account name that stands for all of a namespace's.
const ALL_ACCOUNTS: &str = "*";

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
    fn deleted_accounts_and_namespaces_are_revoked_until_created_again() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let before = claims("a", "system:serviceaccount:ns:sa", 999_000);
        let after = claims("b", "system:serviceaccount:ns:sa", 1_000_100);
        let mut r = Revocations::new();
        r.set_deleted("ns", Some("sa"), true, t0);
        assert!(r.is_deleted("ns", "sa") && !r.is_deleted("ns", "other"));
        assert!(r.is_revoked(&before) && !r.is_revoked(&after));
        r.set_deleted("ns", Some("sa"), false, t0);
        assert!(!r.is_deleted("ns", "sa"));
        assert!(
            r.is_revoked(&before),
            "created again: the old credentials stay revoked"
        );

        r.set_deleted("ns", None, true, t0);
        assert!(r.is_deleted("ns", "other"));
        assert!(r.is_identity_revoked("ns", "other", t0));
        assert!(!r.is_identity_revoked("elsewhere", "other", t0));
        r.set_deleted("ns", None, false, t0);
        assert!(!r.is_deleted("ns", "other"));
    }

    #[test]
    fn lineages_are_revoked_with_their_ancestors_and_expire() {
        let mut r = Revocations::new();
        r.revoke_token("join1");
        assert!(r.is_lineage_revoked("join1"));
        assert!(r.is_lineage_revoked("join1.0c1d"));
        assert!(r.is_lineage_revoked("join1.0c1d.more"));
        assert!(
            !r.is_lineage_revoked("join10.0c1d"),
            "a prefix that is not an ancestor"
        );
        assert!(!r.is_lineage_revoked("join"));
        assert!(r.is_revoked(&claims("join1.77", "system:serviceaccount:ns:sa", 5)));

        let now = SystemTime::now();
        assert_eq!(r.expire(now, Duration::from_secs(3600)), 0);
        assert_eq!(
            r.expire(now + Duration::from_secs(7200), Duration::from_secs(3600)),
            1
        );
        assert!(!r.is_lineage_revoked("join1.0c1d"));
    }

    #[test]
    fn serde_round_trip() {
        let mut r = Revocations::new();
        r.tokens.insert("abc".into(), 7);
        r.revoke_account("ns", "sa", SystemTime::UNIX_EPOCH + Duration::from_secs(42));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"{"tokens":{"abc":7},"accounts":{"ns/sa":42}}"#);
        let legacy: Revocations = serde_json::from_str(r#"{"tokens":["abc"]}"#).unwrap();
        assert!(legacy.is_lineage_revoked("abc"));
        assert_eq!(serde_json::from_str::<Revocations>(&json).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Revocations>("{}").unwrap(),
            Revocations::new()
        );
    }
}
