//! Incremental (delta) ADS: responses carry only the resources that changed
//! and the names removed; the server tracks which version of each resource
//! the proxy has, and puts it back when the proxy refuses a response.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};

use super::wire::Flavour;
use super::{
    Encoded, Protocol, Resources, Session, UNKNOWN_VERSION, fingerprint, version_of, wildcard_type,
};

/// A delta response waiting for its ACK or NACK.
struct Pending {
    nonce: String,
    system_version: String,
    diff_hash: u64,
    /// The versions the proxy had of the resources this response changes:
    /// restored if it refuses.
    undo: Vec<(Arc<str>, Option<u64>)>,
}

/// One type's subscription on a delta stream.
#[derive(Default)]
struct DeltaSubscription {
    wildcard: bool,
    names: BTreeSet<Arc<str>>,
    /// Resource name → version the proxy has (or has been sent).
    known: BTreeMap<Arc<str>, u64>,
    pending: Option<Pending>,
    refused_hash: Option<u64>,
    /// The system version the proxy last accepted.
    acked_version: Option<String>,
    /// Names to send again on the next push although the proxy has them,
    /// or all of them.
    resend: BTreeSet<Arc<str>>,
    resend_all: bool,
    /// Bumped whenever the names subscribed to change.
    generation: u64,
    /// The type's fingerprint and the generation when `known` was last made
    /// to match the resources: while both stay, there is nothing to send.
    basis: Option<(u64, u64)>,
    /// The resources and generation `known` was last made to match: a push
    /// looks only at the names that changed since (see
    /// `Resources::changed_names`). `None`: look at every one.
    sent: Option<(Resources, u64)>,
}

/// A delta stream's subscriptions, by type URL.
#[derive(Default)]
pub(super) struct Delta {
    subscriptions: BTreeMap<String, DeltaSubscription>,
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;

    fn on_request(
        &mut self,
        session: &mut Session,
        request: DeltaDiscoveryRequest,
    ) -> Vec<Encoded> {
        let type_url = request.type_url.clone();
        let first = !self.subscriptions.contains_key(&type_url);
        let subscription = self.subscriptions.entry(type_url.clone()).or_default();
        if first {
            // An empty first subscription is the legacy wildcard for CDS and LDS.
            subscription.wildcard =
                request.resource_names_subscribe.is_empty() && wildcard_type(&type_url);
            let resources = &session.resources;
            subscription.known = request
                .initial_resource_versions
                .iter()
                .map(|(name, version)| {
                    let version = u64::from_str_radix(version, 16).unwrap_or(UNKNOWN_VERSION);
                    (resources.intern(&type_url, name), version)
                })
                .collect();
        }
        if !request.response_nonce.is_empty() {
            match subscription.pending.take() {
                Some(pending) if pending.nonce == request.response_nonce => {
                    match &request.error_detail {
                        Some(error) => {
                            // Envoy keeps what it had: so does our view of it.
                            for (name, version) in pending.undo {
                                match version {
                                    Some(version) => subscription.known.insert(name, version),
                                    None => subscription.known.remove(&name),
                                };
                            }
                            subscription.refused_hash = Some(pending.diff_hash);
                            subscription.basis = None;
                            subscription.sent = None;
                            session.refused(&type_url, pending.system_version, &error.message);
                        }
                        None => {
                            subscription.acked_version = Some(pending.system_version.clone());
                            session.acked(&type_url, pending.system_version);
                        }
                    }
                }
                // An answer to an older response: superseded.
                other => subscription.pending = other,
            }
        }
        if !request.resource_names_subscribe.is_empty()
            || !request.resource_names_unsubscribe.is_empty()
        {
            subscription.generation += 1;
        }
        for name in &request.resource_names_subscribe {
            if name == "*" {
                subscription.wildcard = true;
            } else {
                let name = session.resources.intern(&type_url, name);
                subscription.names.insert(name);
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                subscription.wildcard = false;
            } else {
                subscription.names.remove(name.as_str());
                subscription.known.remove(name.as_str());
            }
        }
        self.respond(session, &type_url, first)
    }

    fn push(&mut self, session: &mut Session, type_url: &str, force: bool) -> Option<Encoded> {
        let subscription = self.subscriptions.get_mut(type_url)?;
        let resources = &session.resources;
        let basis = (
            resources.type_fingerprint(type_url),
            subscription.generation,
        );
        let resending = subscription.resend_all || !subscription.resend.is_empty();
        if !force && !resending && subscription.basis == Some(basis) {
            // The type did not change: the current sets hold what the proxy
            // has of it, and the older ones it was pushed from can go.
            if subscription.sent.is_some() {
                subscription.sent = Some((resources.clone(), subscription.generation));
            }
            if subscription.pending.is_none()
                && let Some(accepted) = subscription.acked_version.clone()
            {
                session.sent(type_url, accepted);
            }
            return None;
        }
        subscription.basis = Some(basis);
        let wanted = |name: &str| subscription.wildcard || subscription.names.contains(name);
        let differs = |name: &str, r: &super::Versioned| {
            wanted(name)
                && (subscription.resend_all
                    || subscription.resend.contains(name)
                    || subscription.known.get(name) != Some(&r.version))
        };
        // Only the names that changed since `known` last matched, when the
        // subscription is as it was then; else every resource of the type.
        let candidates = match &subscription.sent {
            Some((sent, generation))
                if !force && !subscription.resend_all && *generation == subscription.generation =>
            {
                resources.changed_names(sent, type_url).map(|mut names| {
                    names.extend(subscription.resend.iter().cloned());
                    names
                })
            }
            _ => None,
        };
        let gone = |name: &str| !wanted(name) || resources.get(type_url, name).is_none();
        let (changed, removed): (_, Vec<Arc<str>>) = match &candidates {
            Some(names) => (
                resources.select_names(type_url, names, differs),
                names
                    .iter()
                    .filter(|name| subscription.known.contains_key(*name) && gone(name))
                    .cloned()
                    .collect(),
            ),
            None => (
                resources.select(type_url, differs),
                subscription
                    .known
                    .keys()
                    .filter(|name| gone(name))
                    .cloned()
                    .collect(),
            ),
        };
        subscription.resend_all = false;
        subscription.resend.clear();
        if changed.is_empty() && removed.is_empty() && !force {
            subscription.sent = Some((resources.clone(), subscription.generation));
            // The proxy already has what it should: after a refusal, that is
            // the version it last accepted.
            if subscription.pending.is_none()
                && let Some(accepted) = subscription.acked_version.clone()
            {
                session.sent(type_url, accepted);
            }
            return None;
        }
        let mut hasher = DefaultHasher::new();
        fingerprint(changed.iter()).hash(&mut hasher);
        removed.hash(&mut hasher);
        let diff_hash = hasher.finish();
        if subscription.refused_hash == Some(diff_hash) && !force {
            subscription.sent = None;
            return None;
        }
        // The type's resources and the subscription decide what the proxy
        // should have: their fingerprints make the version.
        let system_version = {
            let mut hasher = DefaultHasher::new();
            basis.hash(&mut hasher);
            version_of(hasher.finish())
        };
        let mut undo = Vec::with_capacity(removed.len());
        for (name, resource) in changed.iter() {
            let before = subscription.known.insert(name.clone(), resource.version);
            undo.push((name.clone(), before));
        }
        for name in &removed {
            undo.push((name.clone(), subscription.known.remove(name)));
        }
        subscription.sent = Some((resources.clone(), subscription.generation));
        let removed: Vec<String> = removed.iter().map(|name| name.to_string()).collect();
        let nonce = session.nonces.next();
        subscription.pending = Some(Pending {
            nonce: nonce.clone(),
            system_version: system_version.clone(),
            diff_hash,
            undo,
        });
        session.sent(type_url, system_version.clone());
        let fields = DeltaDiscoveryResponse {
            system_version_info: system_version,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        Some(Encoded::new(Flavour::Delta, type_url, &fields, &changed))
    }

    fn resend(&mut self, type_url: &str, sent: &Encoded, every: bool) {
        let Some(subscription) = self.subscriptions.get_mut(type_url) else {
            return;
        };
        subscription.resend_all |= every;
        for name in &sent.names {
            if let Some((name, _)) = subscription.known.get_key_value(name) {
                subscription.resend.insert(name.clone());
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
