//! State-of-the-world ADS: a response carries the whole set of a type the
//! proxy subscribes to, except for load assignments and route
//! configurations, which Envoy subscribes to by name and keeps when a
//! response leaves them out (as Istio's incremental EDS relies on): those
//! carry only what changed since the proxy's last push. A request's nonce
//! and `error_detail` say whether the last response was accepted.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::wire::Flavour;
use super::{Encoded, Protocol, Resources, Session, version_of, wildcard_type};

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
    /// The resources at the last push (what the proxy has once it accepts
    /// it): the base for sending only what changed. `None`: send all.
    sent: Option<Resources>,
    /// Names to send again on the next push although they did not change.
    resend: BTreeSet<Arc<str>>,
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
            // Envoy kept what it had before: which that was is not tracked.
            subscription.sent = None;
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
        if !force && subscription.resend.is_empty() && subscription.basis == Some(basis) {
            // The type did not change: the current sets hold what the proxy
            // has of it, and the older ones it was pushed from can go.
            if subscription.sent.is_some() {
                subscription.sent = Some(resources.clone());
            }
            return None;
        }
        subscription.basis = Some(basis);
        let names = &subscription.names;
        // What may have changed since the last push, when it is known.
        let changed = match (&subscription.sent, &subscription.sent_hash, force) {
            (Some(sent), Some(_), false) => resources.changed_names(sent, type_url),
            _ => None,
        }
        .map(|mut changed| {
            changed.extend(subscription.resend.iter().cloned());
            changed
        });
        // The type's fingerprint is the version, with no pass over every
        // resource for each proxy.
        let hash = {
            let mut hasher = DefaultHasher::new();
            basis.0.hash(&mut hasher);
            hasher.finish()
        };
        let sending = match (names, &changed) {
            // A wildcard subscription gets every resource of the type.
            (None, _) => resources.select(type_url, |_, _| true),
            // Load assignments and routes by name: only what changed.
            (Some(names), Some(changed)) => {
                resources.select_names(type_url, changed, |name, _| names.contains(name))
            }
            // Everything asked for.
            (Some(names), None) => resources.select(type_url, |name, _| names.contains(name)),
        };
        let unchanged = match (names, &changed) {
            (Some(_), Some(_)) => sending.is_empty(),
            _ => subscription.sent_hash == Some(hash) && subscription.resend.is_empty(),
        };
        if (unchanged && !force) || subscription.refused_hash == Some(hash) {
            if subscription.sent.is_some() {
                subscription.sent = Some(resources.clone());
            }
            subscription.resend.clear();
            return None;
        }
        // What Envoy will warm: the clusters that are new or changed.
        let warmed: Vec<Arc<str>> = match (super::warmed_with(type_url), &changed) {
            (Some((_, false)), Some(changed)) => changed
                .iter()
                .filter(|name| resources.get(type_url, name).is_some())
                .cloned()
                .collect(),
            (Some((_, false)), None) => sending.iter().map(|(name, _)| name.clone()).collect(),
            _ => Vec::new(),
        };
        let nonce = session.nonces.next();
        subscription.sent_hash = Some(hash);
        subscription.sent_nonce = Some(nonce.clone());
        subscription.sent = Some(resources.clone());
        subscription.resend.clear();
        session.sent(type_url, version_of(hash));
        let fields = DiscoveryResponse {
            version_info: version_of(hash),
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        let mut encoded = Encoded::new(Flavour::StateOfTheWorld, type_url, &fields, &sending);
        encoded.names = warmed;
        Some(encoded)
    }

    fn resend(&mut self, type_url: &str, sent: &Encoded, every: bool) {
        if let Some(subscription) = self.subscriptions.get_mut(type_url) {
            subscription.basis = None;
            if every {
                subscription.sent_hash = None;
                subscription.sent = None;
            } else {
                subscription.resend.extend(sent.names.iter().cloned());
            }
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
