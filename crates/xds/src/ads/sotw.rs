//! State-of-the-world ADS: every response carries the whole set of a type
//! the proxy subscribes to; a request's nonce and `error_detail` say whether
//! the last response was accepted.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::wire::Flavour;
use super::{Encoded, Protocol, Session, fingerprint, version_of, wildcard_type};

/// One type's subscription on a state-of-the-world stream.
#[derive(Default)]
struct Subscription {
    /// `None`: every resource of the type (CDS, LDS); otherwise the names asked for.
    names: Option<BTreeSet<Arc<str>>>,
    sent_nonce: Option<String>,
    /// Fingerprint of what was last sent, and of what was last refused.
    sent_hash: Option<u64>,
    refused_hash: Option<u64>,
    /// Bumped whenever the names subscribed to change.
    generation: u64,
    /// The type's fingerprint and the generation at the last push: while
    /// both stay, the proxy has what it should.
    basis: Option<(u64, u64)>,
}

/// A state-of-the-world stream's subscriptions, by type URL.
#[derive(Default)]
pub(super) struct StateOfTheWorld {
    subscriptions: BTreeMap<String, Subscription>,
}

impl Protocol for StateOfTheWorld {
    type Request = DiscoveryRequest;

    fn on_request(&mut self, session: &mut Session, request: DiscoveryRequest) -> Vec<Encoded> {
        let type_url = request.type_url.clone();
        let wildcard = wildcard_type(&type_url);
        let subscription = self.subscriptions.entry(type_url.clone()).or_default();
        // An answer to an older response on this stream is superseded. (A
        // nonce before anything was sent here comes from an earlier stream.)
        if !request.response_nonce.is_empty()
            && subscription
                .sent_nonce
                .as_ref()
                .is_some_and(|sent| *sent != request.response_nonce)
        {
            return Vec::new();
        }
        if let Some(error) = &request.error_detail {
            subscription.refused_hash = subscription.sent_hash;
            subscription.basis = None;
            // Envoy's `version_info` here is the last version it accepted;
            // the refused one is what this nonce carried.
            let version = subscription.sent_hash.map(version_of).unwrap_or_default();
            session.refused(&type_url, version, &error.message);
            return Vec::new();
        }
        if !request.response_nonce.is_empty() {
            session.acked(&type_url, request.version_info.clone());
        }
        let resources = &session.resources;
        let names: Option<BTreeSet<Arc<str>>> = (!wildcard).then(|| {
            request
                .resource_names
                .iter()
                .map(|n| resources.intern(&type_url, n))
                .collect()
        });
        let names_changed = subscription.names != names;
        if names_changed {
            subscription.generation += 1;
        }
        subscription.names = names;
        let first = subscription.sent_nonce.is_none();
        self.respond(session, &type_url, first || names_changed)
    }

    fn push(&mut self, session: &mut Session, type_url: &str, force: bool) -> Option<Encoded> {
        let subscription = self.subscriptions.get_mut(type_url)?;
        let resources = &session.resources;
        let basis = (
            resources.type_fingerprint(type_url),
            subscription.generation,
        );
        if !force && subscription.basis == Some(basis) {
            return None;
        }
        subscription.basis = Some(basis);
        let names = &subscription.names;
        let chosen = resources.select(type_url, |name, _| {
            names.as_ref().is_none_or(|names| names.contains(name))
        });
        // A wildcard subscription gets every resource of the type: the
        // type's fingerprint is the version, with no pass over them all for
        // each proxy. Named ones get a version of what they asked for only.
        let hash = match names {
            None => {
                let mut hasher = DefaultHasher::new();
                basis.0.hash(&mut hasher);
                hasher.finish()
            }
            Some(_) => fingerprint(chosen.iter()),
        };
        let unchanged = subscription.sent_hash == Some(hash) && !force;
        if unchanged || subscription.refused_hash == Some(hash) {
            return None;
        }
        let nonce = session.nonces.next();
        subscription.sent_hash = Some(hash);
        subscription.sent_nonce = Some(nonce.clone());
        session.sent(type_url, version_of(hash));
        let fields = DiscoveryResponse {
            version_info: version_of(hash),
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        Some(Encoded::new(
            Flavour::StateOfTheWorld,
            type_url,
            &fields,
            &chosen,
        ))
    }

    fn resend(&mut self, type_url: &str, _sent: &Encoded, _every: bool) {
        // Every response carries the whole set: forgetting what was sent
        // sends it all again.
        if let Some(subscription) = self.subscriptions.get_mut(type_url) {
            subscription.sent_hash = None;
            subscription.basis = None;
        }
    }

    fn forget_refusals(&mut self) {
        for subscription in self.subscriptions.values_mut() {
            if subscription.refused_hash.take().is_some() {
                subscription.basis = None;
            }
        }
    }
}
