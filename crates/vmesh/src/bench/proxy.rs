//! Simulated Envoys: each subscribes on its own ADS stream exactly as Envoy
//! does (clusters and listeners by wildcard, then the load assignments of
//! its EDS clusters and the route configurations its listeners name),
//! ACKs every response the way Envoy does for its flavour, and says when it
//! has ACKed a response carrying the change the benchmark is waiting for.
//!
//! Many streams share one HTTP/2 connection, and identical resources are
//! decoded once for all proxies (see [`Decoded`]), so that the proxies do
//! not dominate the machine they measure.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster::ClusterDiscoveryType};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use super::mesh::{CLUSTER_TYPE, ENDPOINT_TYPE, Expect, LISTENER_TYPE, NAMESPACE, ROUTE_TYPE};

const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// The change the proxies are waiting for: its number and how to see it.
pub type Awaited = Option<(u64, Arc<Expect>)>;

/// What a proxy tells the benchmark.
#[derive(Debug)]
pub enum Report {
    /// It has clusters, load assignments, listeners and routes.
    Ready,
    /// It ACKed a response carrying change `change` at `at`.
    Saw { change: u64, at: Instant },
    /// It got a response (of any type).
    Response,
    /// Its stream failed and it opens it again.
    Reconnected,
    /// Its stream failed again and again.
    Failed(String),
    /// What it holds, as asked for with [`Identity::track`]: a fingerprint
    /// of every resource's bytes, by type.
    Holds {
        index: usize,
        fresh: bool,
        fingerprint: u64,
    },
}

/// What Envoy takes from a resource to subscribe further: its name, whether
/// it is a cluster fed by EDS, the route configurations a listener names.
#[derive(Debug, Default)]
pub struct Resource {
    name: Arc<str>,
    eds: bool,
    routes: Vec<Arc<str>>,
}

/// Resources decoded once for every proxy, by their bytes.
#[derive(Default)]
pub struct Decoded(Mutex<HashMap<u64, Arc<Resource>>>);

/// A resource's bytes, fingerprinted.
fn content(any: &Any) -> u64 {
    let mut hasher = DefaultHasher::new();
    any.type_url.hash(&mut hasher);
    any.value.hash(&mut hasher);
    hasher.finish()
}

impl Decoded {
    fn get(&self, any: &Any) -> Arc<Resource> {
        let key = content(any);
        if let Some(found) = self.0.lock().get(&key) {
            return found.clone();
        }
        let decoded = Arc::new(decode(any));
        self.0.lock().insert(key, decoded.clone());
        decoded
    }
}

fn decode(any: &Any) -> Resource {
    match any.type_url.as_str() {
        CLUSTER_TYPE => {
            let cluster = Cluster::decode(any.value.as_slice()).unwrap_or_default();
            let eds = matches!(
                cluster.cluster_discovery_type,
                Some(ClusterDiscoveryType::Type(t)) if t == envoy_types::pb::envoy::config::cluster::v3::cluster::DiscoveryType::Eds as i32
            );
            let name = cluster
                .eds_cluster_config
                .as_ref()
                .map(|c| c.service_name.clone())
                .filter(|n| !n.is_empty() && eds)
                .unwrap_or(cluster.name);
            Resource {
                name: name.into(),
                eds,
                routes: Vec::new(),
            }
        }
        LISTENER_TYPE => {
            let listener = Listener::decode(any.value.as_slice()).unwrap_or_default();
            let routes = listener
                .filter_chains
                .iter()
                .chain(listener.default_filter_chain.iter())
                .flat_map(|chain| &chain.filters)
                .filter_map(|filter| match &filter.config_type {
                    Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(typed))
                        if typed.type_url == HCM_TYPE =>
                    {
                        match HttpConnectionManager::decode(typed.value.as_slice()).ok()?.route_specifier? {
                            RouteSpecifier::Rds(rds) => Some(Arc::from(rds.route_config_name)),
                            _ => None,
                        }
                    }
                    _ => None,
                })
                .collect();
            Resource {
                name: listener.name.into(),
                eds: false,
                routes,
            }
        }
        _ => Resource::default(),
    }
}

/// Who a simulated proxy is.
pub struct Identity {
    pub index: usize,
    pub delta: bool,
    /// Istio's version to claim (istiod wants one it supports).
    pub istio_version: String,
    /// Keep what it holds, and report it ([`Report::Holds`]) whenever this
    /// changes; `fresh` says it is the from-scratch twin of proxy `index`.
    pub track: Option<(watch::Receiver<u64>, bool)>,
}

impl Identity {
    fn node(&self) -> Node {
        let ip = format!("10.200.{}.{}", self.index / 250 % 250, self.index % 250 + 1);
        let string = |s: &str| Value {
            kind: Some(Kind::StringValue(s.to_string())),
        };
        let name = format!("bench-{}", self.index);
        Node {
            id: format!("sidecar~{ip}~{name}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"),
            cluster: format!("{name}.{NAMESPACE}"),
            metadata: Some(Struct {
                fields: [
                    ("NAMESPACE", string(NAMESPACE)),
                    ("SERVICE_ACCOUNT", string("bench")),
                    ("ISTIO_VERSION", string(&self.istio_version)),
                    ("CLUSTER_ID", string("Kubernetes")),
                    ("NAME", string(&name)),
                    ("INSTANCE_IPS", string(&ip)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            }),
            ..Default::default()
        }
    }
}

/// What one proxy has subscribed to.
#[derive(Default)]
struct Subscriptions {
    clusters: BTreeSet<Arc<str>>,
    routes: BTreeSet<Arc<str>>,
    listeners: bool,
    has: [bool; 4],
    ready: bool,
    /// When tracked: type → resource (its name, or under state of the
    /// world its fingerprint) → its fingerprint.
    held: Option<HashMap<String, HashMap<Arc<str>, u64>>>,
}

/// A response, flavour aside.
struct Received<'a> {
    type_url: &'a str,
    /// The resources with their names where the flavour says them (delta).
    named: Vec<(Option<Arc<str>>, &'a Any)>,
    /// State of the world: the response is the whole set of its type.
    full_state: bool,
    removed: &'a [String],
}

impl Received<'_> {
    fn resources(&self) -> impl Iterator<Item = &Any> {
        self.named.iter().map(|(_, any)| *any)
    }

    fn shows(&self, expect: &Expect) -> bool {
        match expect {
            Expect::Contains(type_url, marker) => {
                let finder = memchr::memmem::Finder::new(marker);
                self.type_url == *type_url
                    && self.resources().any(|r| finder.find(&r.value).is_some())
            }
            Expect::ClusterGone(host) => {
                let finder = memchr::memmem::Finder::new(host);
                self.type_url == CLUSTER_TYPE
                    && if self.full_state {
                        !self.resources().any(|r| finder.find(&r.value).is_some())
                    } else {
                        self.removed.iter().any(|name| name.contains(host.as_str()))
                    }
            }
        }
    }
}

/// The name of a load assignment or route configuration.
fn name_of(any: &Any) -> Arc<str> {
    let name = match any.type_url.as_str() {
        ENDPOINT_TYPE => ClusterLoadAssignment::decode(any.value.as_slice())
            .map(|c| c.cluster_name)
            .unwrap_or_default(),
        _ => RouteConfiguration::decode(any.value.as_slice())
            .map(|r| r.name)
            .unwrap_or_default(),
    };
    name.into()
}

/// How often a proxy opens its stream again after it failed, as Envoy
/// does, before the benchmark gives up on it.
const ATTEMPTS: usize = 20;

/// Runs one proxy until its stream ends; reports what it sees. A failed
/// stream is opened again after a pause, as Envoy does.
pub async fn run(
    identity: Identity,
    channel: Channel,
    decoded: Arc<Decoded>,
    mut awaited: watch::Receiver<Awaited>,
    reports: mpsc::UnboundedSender<Report>,
) {
    for attempt in 1..=ATTEMPTS {
        let result = if identity.delta {
            delta(&identity, channel.clone(), &decoded, &mut awaited, &reports).await
        } else {
            state_of_the_world(&identity, channel.clone(), &decoded, &mut awaited, &reports).await
        };
        match result {
            Ok(()) => return,
            Err(e) if attempt == ATTEMPTS => {
                let _ = reports.send(Report::Failed(format!(
                    "proxy {} failed {ATTEMPTS} times, last: {e}",
                    identity.index
                )));
            }
            Err(_) => {
                let _ = reports.send(Report::Reconnected);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// What follows a response: the names to subscribe to and to drop.
struct Follow {
    type_url: &'static str,
    subscribe: Vec<Arc<str>>,
    unsubscribe: Vec<Arc<str>>,
}

impl Subscriptions {
    /// Takes in a response as Envoy would; what it must ask for next.
    fn take(&mut self, received: &Received<'_>, decoded: &Decoded) -> Vec<Follow> {
        if let Some(held) = &mut self.held {
            let of_type = held.entry(received.type_url.to_string()).or_default();
            if received.full_state {
                of_type.clear();
            }
            for name in received.removed {
                of_type.remove(name.as_str());
            }
            for (name, any) in &received.named {
                let fingerprint = content(any);
                let key = name
                    .clone()
                    .unwrap_or_else(|| fingerprint.to_string().into());
                of_type.insert(key, fingerprint);
            }
        }
        let mut follow = Vec::new();
        let slot = match received.type_url {
            CLUSTER_TYPE => 0,
            ENDPOINT_TYPE => 1,
            LISTENER_TYPE => 2,
            ROUTE_TYPE => 3,
            _ => return follow,
        };
        self.has[slot] = true;
        let full_state = received.full_state;
        match received.type_url {
            CLUSTER_TYPE => {
                let eds: BTreeSet<Arc<str>> = received
                    .resources()
                    .map(|any| decoded.get(any))
                    .filter(|r| r.eds)
                    .map(|r| r.name.clone())
                    .collect();
                let gone: Vec<Arc<str>> = if full_state {
                    self.clusters.difference(&eds).cloned().collect()
                } else {
                    received
                        .removed
                        .iter()
                        .filter_map(|n| self.clusters.get(n.as_str()).cloned())
                        .collect()
                };
                let new: Vec<Arc<str>> = eds.difference(&self.clusters).cloned().collect();
                for name in &gone {
                    self.clusters.remove(name);
                }
                // Envoy drops a removed cluster's load assignment with it.
                if let Some(assignments) = self
                    .held
                    .as_mut()
                    .and_then(|held| held.get_mut(ENDPOINT_TYPE))
                {
                    for name in &gone {
                        assignments.remove(name);
                    }
                }
                self.clusters.extend(new.iter().cloned());
                if !new.is_empty() || !gone.is_empty() {
                    follow.push(Follow {
                        type_url: ENDPOINT_TYPE,
                        subscribe: new,
                        unsubscribe: gone,
                    });
                }
                if !self.listeners {
                    self.listeners = true;
                    follow.push(Follow {
                        type_url: LISTENER_TYPE,
                        subscribe: Vec::new(),
                        unsubscribe: Vec::new(),
                    });
                }
            }
            LISTENER_TYPE => {
                let named: BTreeSet<Arc<str>> = received
                    .resources()
                    .flat_map(|any| decoded.get(any).routes.clone())
                    .collect();
                // Delta sends only changed listeners: keep what others named.
                let new: Vec<Arc<str>> = named.difference(&self.routes).cloned().collect();
                if !new.is_empty() {
                    self.routes.extend(new.iter().cloned());
                    follow.push(Follow {
                        type_url: ROUTE_TYPE,
                        subscribe: new,
                        unsubscribe: Vec::new(),
                    });
                }
            }
            _ => {}
        }
        follow
    }

    /// Ready once it has every type it needs (routes only if it names any).
    fn now_ready(&mut self) -> bool {
        let ready = self.has[0]
            && (self.has[1] || self.clusters.is_empty())
            && self.has[2]
            && (self.has[3] || self.routes.is_empty());
        let first = ready && !self.ready;
        self.ready |= ready;
        first
    }

    fn tracking(identity: &Identity) -> Subscriptions {
        Subscriptions {
            held: identity.track.is_some().then(HashMap::new),
            ..Subscriptions::default()
        }
    }

    fn report(&self, index: usize, fresh: bool, reports: &mpsc::UnboundedSender<Report>) {
        let _ = reports.send(Report::Holds {
            index,
            fresh,
            fingerprint: self.fingerprint(),
        });
    }

    /// A fingerprint of everything held: the same for two proxies that
    /// hold the same resources, whichever flavour brought them.
    fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        let mut types: Vec<_> = self.held.iter().flatten().collect();
        types.sort_by(|a, b| a.0.cmp(b.0));
        for (type_url, resources) in types {
            let mut fingerprints: Vec<u64> = resources.values().copied().collect();
            fingerprints.sort_unstable();
            (type_url, fingerprints).hash(&mut hasher);
        }
        hasher.finish()
    }

    fn names(&self, type_url: &str) -> Vec<String> {
        let set = match type_url {
            ENDPOINT_TYPE => &self.clusters,
            ROUTE_TYPE => &self.routes,
            _ => return Vec::new(),
        };
        set.iter().map(|n| n.to_string()).collect()
    }
}

/// Resolves when the benchmark asks a tracked proxy what it holds (with
/// whether the proxy is a fresh twin); never for an untracked one.
async fn asked(track: &mut Option<(watch::Receiver<u64>, bool)>) -> Option<bool> {
    match track {
        Some((asks, fresh)) => asks.changed().await.ok().map(|()| *fresh),
        None => std::future::pending().await,
    }
}

/// The next response on the stream (`None` once it ends), telling the
/// benchmark what the proxy holds whenever it asks meanwhile.
async fn next_response<M: prost::Message + Default>(
    responses: &mut tonic::Streaming<M>,
    track: &mut Option<(watch::Receiver<u64>, bool)>,
    subscriptions: &Subscriptions,
    index: usize,
    reports: &mpsc::UnboundedSender<Report>,
) -> Result<Option<M>, Failure> {
    loop {
        tokio::select! {
            response = responses.message() => return Ok(response?),
            Some(fresh) = asked(track) => subscriptions.report(index, fresh, reports),
        }
    }
}

/// After taking in a response: says whether it carried the awaited change.
fn check(
    received: &Received<'_>,
    awaited: &mut watch::Receiver<Awaited>,
    seen: &mut u64,
    reports: &mpsc::UnboundedSender<Report>,
    at: Instant,
) {
    let _ = reports.send(Report::Response);
    if let Some((change, expect)) = awaited.borrow_and_update().as_ref()
        && *change > *seen
        && received.shows(expect)
    {
        *seen = *change;
        let _ = reports.send(Report::Saw {
            change: *change,
            at,
        });
    }
}

async fn state_of_the_world(
    identity: &Identity,
    channel: Channel,
    decoded: &Decoded,
    awaited: &mut watch::Receiver<Awaited>,
    reports: &mpsc::UnboundedSender<Report>,
) -> Result<(), Failure> {
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (requests, rx) = mpsc::unbounded_channel();
    let node = identity.node();
    requests.send(DiscoveryRequest {
        node: Some(node.clone()),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })?;
    let mut responses = client
        .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut subscriptions = Subscriptions::tracking(identity);
    let mut track = identity.track.clone();
    // The version and nonce last accepted, per type, for the next request.
    let mut accepted: HashMap<String, (String, String)> = HashMap::new();
    let mut seen = 0;
    while let Some(response) = next_response(
        &mut responses,
        &mut track,
        &subscriptions,
        identity.index,
        reports,
    )
    .await?
    {
        // Envoy keeps load assignments and routes a response leaves out.
        let full_state = matches!(response.type_url.as_str(), CLUSTER_TYPE | LISTENER_TYPE);
        let tracking = subscriptions.held.is_some();
        let received = Received {
            type_url: &response.type_url,
            named: response
                .resources
                .iter()
                .map(|any| ((!full_state && tracking).then(|| name_of(any)), any))
                .collect(),
            full_state,
            removed: &[],
        };
        let follow = subscriptions.take(&received, decoded);
        accepted.insert(
            response.type_url.clone(),
            (response.version_info.clone(), response.nonce.clone()),
        );
        for follow in follow {
            let (version_info, response_nonce) =
                accepted.get(follow.type_url).cloned().unwrap_or_default();
            requests.send(DiscoveryRequest {
                node: Some(node.clone()),
                type_url: follow.type_url.into(),
                version_info,
                response_nonce,
                resource_names: subscriptions.names(follow.type_url),
                ..Default::default()
            })?;
        }
        requests.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            resource_names: subscriptions.names(&response.type_url),
            ..Default::default()
        })?;
        let at = Instant::now();
        if subscriptions.now_ready() {
            let _ = reports.send(Report::Ready);
        }
        check(&received, awaited, &mut seen, reports, at);
    }
    Ok(())
}

async fn delta(
    identity: &Identity,
    channel: Channel,
    decoded: &Decoded,
    awaited: &mut watch::Receiver<Awaited>,
    reports: &mpsc::UnboundedSender<Report>,
) -> Result<(), Failure> {
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (requests, rx) = mpsc::unbounded_channel();
    let node = identity.node();
    requests.send(DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })?;
    let mut responses = client
        .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut subscriptions = Subscriptions::tracking(identity);
    let mut track = identity.track.clone();
    let mut seen = 0;
    while let Some(response) = next_response(
        &mut responses,
        &mut track,
        &subscriptions,
        identity.index,
        reports,
    )
    .await?
    {
        let named = response
            .resources
            .iter()
            .filter_map(|r| Some((Some(Arc::from(r.name.as_str())), r.resource.as_ref()?)))
            .collect();
        let received = Received {
            type_url: &response.type_url,
            named,
            full_state: false,
            removed: &response.removed_resources,
        };
        for follow in subscriptions.take(&received, decoded) {
            requests.send(DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: follow.type_url.into(),
                resource_names_subscribe: follow.subscribe.iter().map(|n| n.to_string()).collect(),
                resource_names_unsubscribe: follow
                    .unsubscribe
                    .iter()
                    .map(|n| n.to_string())
                    .collect(),
                ..Default::default()
            })?;
        }
        requests.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })?;
        let at = Instant::now();
        if subscriptions.now_ready() {
            let _ = reports.send(Report::Ready);
        }
        check(&received, awaited, &mut seen, reports, at);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(value: &[u8]) -> Any {
        Any {
            type_url: ROUTE_TYPE.into(),
            value: value.to_vec(),
        }
    }

    fn tracked() -> Subscriptions {
        Subscriptions {
            held: Some(HashMap::new()),
            ..Subscriptions::default()
        }
    }

    /// The soak's check compares fingerprints: proxies holding the same
    /// resources must agree whichever flavour brought them, and a missed
    /// removal must show.
    #[test]
    fn fingerprints_agree_across_flavours_and_see_a_missed_removal() {
        let decoded = Decoded::default();
        let (a, b) = (any(b"route a"), any(b"route b"));
        let mut sotw = tracked();
        sotw.take(
            &Received {
                type_url: ROUTE_TYPE,
                named: vec![(None, &a), (None, &b)],
                full_state: true,
                removed: &[],
            },
            &decoded,
        );
        let mut delta = tracked();
        delta.take(
            &Received {
                type_url: ROUTE_TYPE,
                named: vec![(Some("a".into()), &a), (Some("b".into()), &b)],
                full_state: false,
                removed: &[],
            },
            &decoded,
        );
        assert_eq!(sotw.fingerprint(), delta.fingerprint());

        // State of the world drops b; delta misses the removal of b.
        sotw.take(
            &Received {
                type_url: ROUTE_TYPE,
                named: vec![(None, &a)],
                full_state: true,
                removed: &[],
            },
            &decoded,
        );
        assert_ne!(sotw.fingerprint(), delta.fingerprint());
        delta.take(
            &Received {
                type_url: ROUTE_TYPE,
                named: Vec::new(),
                full_state: false,
                removed: &["b".to_string()],
            },
            &decoded,
        );
        assert_eq!(sotw.fingerprint(), delta.fingerprint());
    }
}
