//! The Aggregated Discovery Service, state of the world and delta: one gRPC
//! stream per proxy carrying clusters, endpoints, listeners and routes.
//!
//! Per stream and type it tracks what was sent (version, nonce), what the
//! proxy accepted, and what it refused: a NACKed set of resources is not sent
//! again until the configuration changes. Pushes happen only when the
//! resources a proxy would get differ from what it last got. Computing those
//! resources is the [`ConfigSource`]'s job, not this module's.
//!
//! Istio's agents also send health reports on the stream: requests of type
//! [`HEALTH_INFORMATION_TYPE`]. They are handed to the [`ProxyLifecycle`]
//! and, once it has recorded one, answered with a response of that type
//! whose nonce is the request's `response_nonce`, so the agent can stop
//! repeating it.
//!
//! Both flavours share everything but their bookkeeping per type: the stream
//! loop (`serve`), who the proxy is, its health reports, its resources and
//! its status (the `Session`) are written once here; `sotw` and `delta`
//! keep what each flavour tracks of a subscription, and `grpc` frames the
//! bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, OnceLock, Weak};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::metrics::{XdsMetrics, type_label};
use crate::node::Proxy;

mod delta;
mod grpc;
mod sotw;
mod wire;

pub use grpc::AdsServer;
use wire::Encoded;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// A workload's health report (Istio's agent): healthy without
/// `error_detail`, unhealthy with it.
pub use vmesh_proto::HEALTH_INFORMATION_TYPE;

pub use vmesh_proto::NAME_TABLE_TYPE;

/// Push order on a change: clusters before endpoints, listeners before
/// routes; the agent's name table last.
const PUSH_ORDER: [&str; 5] = [
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    NAME_TABLE_TYPE,
];

/// What Envoy warms a (re)sent resource of `type_url` with: a cluster
/// waits for its load assignment, a listener for its route configuration,
/// until they arrive or Envoy's initial-fetch timeout (15 s) passes. They
/// are sent again after it even when they did not change, as Istio does;
/// `true` when every resource of that type must be (a listener's routes
/// are not named after it), `false` for those named alike (a cluster's load
/// assignment is).
fn warmed_with(type_url: &str) -> Option<(&'static str, bool)> {
    match type_url {
        CLUSTER_TYPE => Some((ENDPOINT_TYPE, false)),
        LISTENER_TYPE => Some((ROUTE_TYPE, true)),
        _ => None,
    }
}

/// Types whose subscription means every resource of the type.
fn wildcard_type(type_url: &str) -> bool {
    matches!(type_url, CLUSTER_TYPE | LISTENER_TYPE | NAME_TABLE_TYPE)
}

/// One resource, with its version and its wire encoding computed once when
/// it is built.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub any: Any,
    /// A fingerprint of the bytes: the resource's version. Never
    /// `UNKNOWN_VERSION`.
    pub version: u64,
    wire: wire::Entries,
}

/// Stands for a version this server did not write (one Envoy remembers from
/// an earlier server): it matches no resource.
const UNKNOWN_VERSION: u64 = 0;

impl Versioned {
    /// Resource `name`.
    pub fn new(name: &str, any: Any) -> Versioned {
        let mut hasher = DefaultHasher::new();
        any.type_url.hash(&mut hasher);
        any.value.hash(&mut hasher);
        let version = hasher.finish().max(UNKNOWN_VERSION + 1);
        Versioned {
            wire: wire::Entries::new(name, &version_of(version), &any),
            any,
            version,
        }
    }
}

/// A set of resources: type URL → resource name → resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceSet {
    resources: BTreeMap<&'static str, BTreeMap<Arc<str>, Versioned>>,
    /// Each type's [`fingerprint`], computed once: thousands of proxies
    /// share a set, and most changes leave most types alone.
    fingerprints: OnceLock<BTreeMap<&'static str, u64>>,
    /// Each type's resources encoded one after another, per flavour, with
    /// their count: a response carrying them all shares these bytes.
    segments: OnceLock<BTreeMap<&'static str, [(usize, bytes::Bytes); 2]>>,
    /// What changed since earlier sets, as proxies moving from them asked.
    changes: ChangeCache,
}

/// The names of one type's resources that a set holds and an earlier set
/// did not (or at another version), remembered per earlier set and type:
/// every proxy moving from the same earlier set asks the same question.
#[derive(Default)]
struct ChangeCache(Mutex<Vec<ChangeEntry>>);

/// An earlier set (held weakly: its address cannot be reused while this
/// lives), a type, and the names changed since.
type ChangeEntry = (Weak<ResourceSet>, &'static str, Arc<BTreeSet<Arc<str>>>);

/// How many earlier sets a set remembers its changes from: proxies are one
/// or two configurations behind, not more.
const REMEMBERED_CHANGES: usize = 8;

impl Clone for ChangeCache {
    fn clone(&self) -> ChangeCache {
        ChangeCache::default()
    }
}

impl PartialEq for ChangeCache {
    fn eq(&self, _: &ChangeCache) -> bool {
        true
    }
}

impl std::fmt::Debug for ChangeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeCache")
    }
}

impl ResourceSet {
    pub fn insert(&mut self, type_url: &'static str, name: impl Into<Arc<str>>, any: Any) {
        self.fingerprints = OnceLock::new();
        self.segments = OnceLock::new();
        self.changes = ChangeCache::default();
        let name = name.into();
        let resource = Versioned::new(&name, any);
        self.resources
            .entry(type_url)
            .or_default()
            .insert(name, resource);
    }

    pub fn of_type(&self, type_url: &str) -> impl Iterator<Item = (&Arc<str>, &Versioned)> {
        self.resources.get(type_url).into_iter().flatten()
    }

    /// This set, each resource that means what it meant in `before` taken
    /// from `before` (its bytes and version). prost encodes protobuf maps
    /// (metadata, `Struct` fields) in hash order, which differs from one
    /// build to the next: without this, a resource rebuilt unchanged would
    /// count as changed and be sent to every proxy again.
    pub fn stabilized(mut self, before: &ResourceSet) -> ResourceSet {
        let mut replaced = false;
        for (type_url, resources) in &mut self.resources {
            let Some(earlier) = before.resources.get(type_url) else {
                continue;
            };
            for (name, resource) in resources.iter_mut() {
                let Some(earlier) = earlier.get(name) else {
                    continue;
                };
                // Reordered maps keep the length; anything else changed.
                if earlier.version != resource.version
                    && earlier.any.value.len() == resource.any.value.len()
                    && same_meaning(type_url, &earlier.any.value, &resource.any.value)
                {
                    *resource = earlier.clone();
                    replaced = true;
                }
            }
        }
        if replaced {
            self.fingerprints = OnceLock::new();
            self.segments = OnceLock::new();
        }
        self
    }

    /// All resources of `type_url` encoded for `flavour`, and their count.
    fn segment(&self, type_url: &str, flavour: wire::Flavour) -> Option<(usize, bytes::Bytes)> {
        let segments = self.segments.get_or_init(|| {
            self.resources
                .iter()
                .map(|(type_url, resources)| {
                    let segment = |flavour| {
                        let mut segment = bytes::BytesMut::new();
                        for resource in resources.values() {
                            segment.extend_from_slice(resource.wire.of(flavour));
                        }
                        (resources.len(), segment.freeze())
                    };
                    (
                        *type_url,
                        [
                            segment(wire::Flavour::StateOfTheWorld),
                            segment(wire::Flavour::Delta),
                        ],
                    )
                })
                .collect()
        });
        let [state_of_the_world, delta] = segments.get(type_url)?;
        Some(match flavour {
            wire::Flavour::StateOfTheWorld => state_of_the_world.clone(),
            wire::Flavour::Delta => delta.clone(),
        })
    }

    /// The names of `type_url` resources here that `before` lacks or holds
    /// at another version, and those `before` holds and this set does not.
    fn changed_since(&self, before: &Arc<ResourceSet>, type_url: &str) -> Arc<BTreeSet<Arc<str>>> {
        let Some((&type_url, resources)) = self.resources.get_key_value(type_url) else {
            return Arc::default();
        };
        let mut cache = self.changes.0.lock();
        if let Some((_, _, names)) = cache
            .iter()
            .find(|(set, t, _)| *t == type_url && std::ptr::eq(set.as_ptr(), Arc::as_ptr(before)))
        {
            return names.clone();
        }
        let earlier = before.resources.get(type_url);
        let changed = resources
            .iter()
            .filter(|(name, resource)| {
                earlier.and_then(|e| e.get(*name)).map(|e| e.version) != Some(resource.version)
            })
            .map(|(name, _)| name.clone());
        let gone = earlier
            .into_iter()
            .flatten()
            .filter(|(name, _)| !resources.contains_key(*name))
            .map(|(name, _)| name.clone());
        let names: Arc<BTreeSet<Arc<str>>> = Arc::new(changed.chain(gone).collect());
        if cache.len() == REMEMBERED_CHANGES {
            cache.remove(0);
        }
        cache.push((Arc::downgrade(before), type_url, names.clone()));
        names
    }

    fn fingerprint(&self, type_url: &str) -> u64 {
        let fingerprints = self.fingerprints.get_or_init(|| {
            self.resources
                .iter()
                .map(|(type_url, resources)| (*type_url, fingerprint(resources)))
                .collect()
        });
        fingerprints.get(type_url).copied().unwrap_or_default()
    }
}

/// Whether two encodings of a resource of `type_url` decode to equal
/// messages (maps compare regardless of order).
fn same_meaning(type_url: &str, a: &[u8], b: &[u8]) -> bool {
    fn equal<M: prost::Message + Default + PartialEq>(a: &[u8], b: &[u8]) -> bool {
        match (M::decode(a), M::decode(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
    use envoy_types::pb::envoy::config;
    match type_url {
        CLUSTER_TYPE => equal::<config::cluster::v3::Cluster>(a, b),
        ENDPOINT_TYPE => equal::<config::endpoint::v3::ClusterLoadAssignment>(a, b),
        LISTENER_TYPE => equal::<config::listener::v3::Listener>(a, b),
        ROUTE_TYPE => equal::<config::route::v3::RouteConfiguration>(a, b),
        NAME_TABLE_TYPE => equal::<vmesh_proto::nds::NameTable>(a, b),
        _ => false,
    }
}

/// What one proxy should have: sets shared with other proxies (computed once
/// per change for all of them) and its own, with distinct resource names.
#[derive(Debug, Clone, Default)]
pub struct Resources(Vec<Arc<ResourceSet>>);

impl Resources {
    pub fn layered(sets: Vec<Arc<ResourceSet>>) -> Resources {
        Resources(sets)
    }

    pub fn of_type(&self, type_url: &str) -> impl Iterator<Item = (&Arc<str>, &Versioned)> {
        self.0.iter().flat_map(move |set| set.of_type(type_url))
    }

    /// These resources, each layer this proxy alone holds (its own, built
    /// for it) stabilized against the layer at its place in `before`
    /// (see [`ResourceSet::stabilized`]); shared layers are stabilized once,
    /// where they are built.
    fn stabilized_against(self, before: &Resources) -> Resources {
        let layers = self
            .0
            .into_iter()
            .enumerate()
            .map(
                |(index, set)| match (Arc::try_unwrap(set), before.0.get(index)) {
                    (Ok(own), Some(earlier)) => Arc::new(own.stabilized(earlier)),
                    (Ok(own), None) => Arc::new(own),
                    (Err(shared), _) => shared,
                },
            )
            .collect();
        Resources(layers)
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<(&Arc<str>, &Versioned)> {
        self.0
            .iter()
            .find_map(|set| set.resources.get(type_url)?.get_key_value(name))
    }

    /// The resources of `type_url` that `keep` keeps, layer by layer.
    fn select<'a>(
        &'a self,
        type_url: &str,
        keep: impl Fn(&str, &Versioned) -> bool,
    ) -> wire::Selected<'a> {
        wire::Selected {
            layers: self
                .0
                .iter()
                .map(|set| wire::Layer {
                    set,
                    entries: set
                        .of_type(type_url)
                        .filter(|(name, resource)| keep(name, resource))
                        .collect(),
                })
                .collect(),
        }
    }

    /// The names of `type_url` resources that may differ from a push made
    /// from `before`: new, changed or gone in any layer that is not the very
    /// same set. Layers are positional (shared ones first, the proxy's own
    /// last), so a layer is compared with the one at its place before;
    /// `None` when one has nothing to compare with.
    fn changed_names(&self, before: &Resources, type_url: &str) -> Option<BTreeSet<Arc<str>>> {
        let mut names = BTreeSet::new();
        for (index, set) in self.0.iter().enumerate() {
            if before.0.iter().any(|b| Arc::ptr_eq(b, set)) {
                continue;
            }
            let earlier = before
                .0
                .get(index)
                .filter(|_| before.0.len() == self.0.len())?;
            names.extend(set.changed_since(earlier, type_url).iter().cloned());
        }
        Some(names)
    }

    /// The resources of `type_url` among `names` that `keep` keeps.
    fn select_names<'a>(
        &'a self,
        type_url: &str,
        names: &'a BTreeSet<Arc<str>>,
        keep: impl Fn(&str, &Versioned) -> bool,
    ) -> wire::Selected<'a> {
        wire::Selected {
            layers: self
                .0
                .iter()
                .map(|set| {
                    let of_type = set.resources.get(type_url);
                    wire::Layer {
                        set,
                        entries: names
                            .iter()
                            .filter_map(|name| of_type?.get_key_value(name))
                            .filter(|(name, resource)| keep(name, resource))
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    /// A fingerprint of every resource of `type_url`: when it is the same
    /// as at a proxy's last push and its subscription did not change, the
    /// proxy lacks nothing of the type.
    fn type_fingerprint(&self, type_url: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        for set in &self.0 {
            set.fingerprint(type_url).hash(&mut hasher);
        }
        hasher.finish()
    }

    /// The shared copy of a name the proxy sent, so that thousands of
    /// subscriptions to the same resource do not each keep its name.
    fn intern(&self, type_url: &str, name: &str) -> Arc<str> {
        self.get(type_url, name)
            .map_or_else(|| Arc::from(name), |(shared, _)| shared.clone())
    }
}

impl From<ResourceSet> for Resources {
    fn from(set: ResourceSet) -> Resources {
        Resources(vec![Arc::new(set)])
    }
}

/// Computes what a proxy should have from the current mesh.
pub trait ConfigSource: Send + Sync + 'static {
    fn resources(&self, proxy: &Proxy) -> Resources;
    /// When the first change this configuration carries was seen: a push
    /// of it has converged on a proxy when its last response is written.
    fn changed_at(&self) -> Option<Instant> {
        None
    }
    /// The mesh this configuration was translated from, when it was (the
    /// server answers Kubernetes views such as Endpoints from it).
    fn snapshot(&self) -> Option<&vmesh_registry::Snapshot> {
        None
    }
}

/// What one proxy has been sent and has said about one type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    /// The last refusal: version and Envoy's message.
    pub nack: Option<(String, String)>,
}

/// A connected proxy, as `proxy-status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    pub id: String,
    pub namespace: String,
    pub connected_at: String,
    pub types: BTreeMap<String, TypeStatus>,
}

/// What the server holds of one connected proxy: its status, the node it
/// announced, and the resources computed for it at its last configuration
/// change (shared sets: keeping them costs reference counts).
#[derive(Debug, Clone)]
pub struct ConnectedProxy {
    pub status: ProxyStatus,
    pub node: Node,
    pub resources: Resources,
}

/// Why no single proxy answers to a name.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FindError {
    #[error("proxy {0:?} is not connected to this server")]
    NotConnected(String),
    #[error("{query:?} names several proxies: {}", .matches.join(", "))]
    Ambiguous { query: String, matches: Vec<String> },
}

/// Every connected proxy's status and configuration.
#[derive(Debug, Default)]
pub struct StatusTable {
    proxies: Mutex<BTreeMap<u64, ConnectedProxy>>,
}

impl StatusTable {
    /// The node each connected proxy announced.
    pub fn nodes(&self) -> Vec<Node> {
        self.proxies
            .lock()
            .values()
            .map(|p| p.node.clone())
            .collect()
    }

    pub fn snapshot(&self) -> Vec<ProxyStatus> {
        self.proxies
            .lock()
            .values()
            .map(|p| p.status.clone())
            .collect()
    }

    /// The proxy `query` names: its node id, its `name.namespace` (as
    /// istioctl names a pod), or a part of one node id (as Istio's
    /// `proxyID=`), in that order of preference.
    pub fn find(&self, query: &str) -> Result<ConnectedProxy, FindError> {
        let proxies = self.proxies.lock();
        let name_namespace = |id: &str| id.split('~').nth(2).map(str::to_string);
        let tiers: [&dyn Fn(&ConnectedProxy) -> bool; 3] = [
            &|p| p.status.id == query,
            &|p| name_namespace(&p.status.id).as_deref() == Some(query),
            &|p| p.status.id.contains(query),
        ];
        for tier in tiers {
            let found: Vec<&ConnectedProxy> = proxies.values().filter(|p| tier(p)).collect();
            match found.as_slice() {
                [] => continue,
                [one] => return Ok((*one).clone()),
                many => {
                    return Err(FindError::Ambiguous {
                        query: query.to_string(),
                        matches: many.iter().map(|p| p.status.id.clone()).collect(),
                    });
                }
            }
        }
        Err(FindError::NotConnected(query.to_string()))
    }

    fn update(&self, connection: u64, type_url: &str, change: impl FnOnce(&mut TypeStatus)) {
        if let Some(proxy) = self.proxies.lock().get_mut(&connection) {
            change(proxy.status.types.entry(type_url.to_string()).or_default());
        }
    }

    fn set_resources(&self, connection: u64, resources: &Resources) {
        if let Some(proxy) = self.proxies.lock().get_mut(&connection) {
            proxy.resources = resources.clone();
        }
    }
}

/// Who the caller of a stream proved to be, by certificate or token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerIdentity {
    pub namespace: String,
    pub service_account: String,
}

impl CallerIdentity {
    /// Refuses a proxy that claims to be someone else; a proxy that does not
    /// say its service account gets the caller's.
    fn admit(&self, proxy: &mut Proxy) -> Result<(), Status> {
        let claimed_account = proxy
            .service_account
            .get_or_insert_with(|| self.service_account.clone());
        if proxy.namespace == self.namespace && *claimed_account == self.service_account {
            return Ok(());
        }
        let message = format!(
            "proxy {} claims namespace {:?} and service account {:?}, but its credentials are for {}/{}",
            proxy.id, proxy.namespace, claimed_account, self.namespace, self.service_account
        );
        tracing::warn!("refused: {message}");
        Err(Status::permission_denied(message))
    }
}

/// Authenticates the caller of an ADS stream from its HTTP/2 request (TLS
/// client certificate in the extensions, or a bearer token in the headers).
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<CallerIdentity, Status>;
}

/// Told when proxies come and go, so that registration can follow them.
pub trait ProxyLifecycle: Send + Sync + 'static {
    /// A proxy said who it is on stream `connection`; an error refuses the stream.
    fn connected(
        &self,
        connection: u64,
        proxy: &Proxy,
        caller: Option<&CallerIdentity>,
    ) -> Result<(), Status>;
    /// The stream of a proxy that `connected` ended.
    fn disconnected(&self, connection: u64, proxy: &Proxy);
    /// The proxy on stream `connection` reported its workload's health. `Ok`
    /// means recorded (or nothing to record): the report is acknowledged.
    fn health(
        &self,
        connection: u64,
        proxy: &Proxy,
        caller: Option<&CallerIdentity>,
        report: &HealthReport,
    ) -> Result<(), Status>;
}

/// What a health report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub healthy: bool,
    /// Why not, when unhealthy.
    pub message: String,
}

impl HealthReport {
    /// The report a request carries, if it is one.
    fn from_request(request: &impl Request) -> Option<HealthReport> {
        let error = request.error_detail();
        (request.type_url() == HEALTH_INFORMATION_TYPE).then(|| HealthReport {
            healthy: error.is_none(),
            message: error.map(|e| e.message.clone()).unwrap_or_default(),
        })
    }
}

/// The ADS gRPC service.
#[derive(Clone)]
pub struct Ads {
    config: watch::Receiver<Arc<dyn ConfigSource>>,
    status: Arc<StatusTable>,
    next_connection: Arc<std::sync::atomic::AtomicU64>,
    /// Streams end when this turns true, so the server's graceful shutdown can finish.
    shutdown: watch::Receiver<bool>,
    /// Every stream must authenticate; without one, the port is trusted (loopback only).
    authenticator: Option<Arc<dyn Authenticator>>,
    lifecycle: Option<Arc<dyn ProxyLifecycle>>,
    metrics: Arc<XdsMetrics>,
}

impl Ads {
    pub fn new(
        config: watch::Receiver<Arc<dyn ConfigSource>>,
        status: Arc<StatusTable>,
        shutdown: watch::Receiver<bool>,
    ) -> Ads {
        Ads {
            config,
            status,
            next_connection: Arc::default(),
            shutdown,
            authenticator: None,
            lifecycle: None,
            metrics: Arc::new(XdsMetrics::unregistered()),
        }
    }

    /// The same service, recording into `metrics`.
    pub fn with_metrics(self, metrics: Arc<XdsMetrics>) -> Ads {
        Ads { metrics, ..self }
    }

    /// The same service, telling `lifecycle` about every proxy that comes and goes.
    pub fn with_lifecycle(self, lifecycle: Arc<dyn ProxyLifecycle>) -> Ads {
        Ads {
            lifecycle: Some(lifecycle),
            ..self
        }
    }

    /// The same service, requiring every stream to authenticate and to
    /// claim only the identity it proved.
    pub fn authenticated(self, authenticator: Arc<dyn Authenticator>) -> Ads {
        Ads {
            authenticator: Some(authenticator),
            ..self
        }
    }

    pub fn into_service(self) -> AdsServer {
        AdsServer(self)
    }
}

/// What every stream knows, whichever protocol it speaks.
struct Session {
    connection: u64,
    /// Who the caller proved to be; `None` on the loopback-only plaintext port.
    caller: Option<CallerIdentity>,
    lifecycle: Option<Arc<dyn ProxyLifecycle>>,
    proxy: Option<Proxy>,
    resources: Resources,
    nonces: Nonces,
    status: Arc<StatusTable>,
    metrics: Arc<XdsMetrics>,
}

impl Session {
    /// Learns who the proxy is from its first request.
    fn identify(
        &mut self,
        node: Option<&Node>,
        config: &Arc<dyn ConfigSource>,
    ) -> Result<(), Status> {
        if self.proxy.is_some() {
            return Ok(());
        }
        let mut proxy =
            Proxy::from_node(node).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(caller) = &self.caller {
            caller.admit(&mut proxy)?;
        }
        if let Some(lifecycle) = &self.lifecycle {
            lifecycle.connected(self.connection, &proxy, self.caller.as_ref())?;
        }
        tracing::info!(proxy = %proxy.id, "proxy connected");
        self.metrics.connected.inc();
        let resources = config.resources(&proxy);
        self.status.proxies.lock().insert(
            self.connection,
            ConnectedProxy {
                status: ProxyStatus {
                    id: proxy.id.clone(),
                    namespace: proxy.namespace.clone(),
                    connected_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                    types: BTreeMap::new(),
                },
                node: node.cloned().unwrap_or_default(),
                resources: resources.clone(),
            },
        );
        self.resources = resources;
        self.proxy = Some(proxy);
        Ok(())
    }

    /// The proxy's resources were recomputed.
    fn reconfigure(&mut self, resources: Resources) {
        self.status.set_resources(self.connection, &resources);
        self.resources = resources;
    }

    fn sent(&self, type_url: &str, version: String) {
        self.status.update(self.connection, type_url, |s| {
            s.sent_version = Some(version)
        });
    }

    fn acked(&self, type_url: &str, version: String) {
        self.status.update(self.connection, type_url, |s| {
            s.acked_version = Some(version)
        });
    }

    /// Passes a health report on; `true` if it should be acknowledged.
    fn health(&self, report: &HealthReport) -> bool {
        let (Some(proxy), Some(lifecycle)) = (&self.proxy, &self.lifecycle) else {
            return true;
        };
        match lifecycle.health(self.connection, proxy, self.caller.as_ref(), report) {
            Ok(()) => true,
            Err(status) => {
                tracing::warn!(proxy = %proxy.id, "health report not recorded: {}", status.message());
                false
            }
        }
    }

    /// The stream ended: the proxy leaves the lifecycle and the status table.
    fn end(self) {
        if let Some(proxy) = &self.proxy {
            tracing::info!(proxy = %proxy.id, "proxy disconnected");
            self.metrics.connected.dec();
            if let Some(lifecycle) = &self.lifecycle {
                lifecycle.disconnected(self.connection, proxy);
            }
        }
        self.status.proxies.lock().remove(&self.connection);
    }

    fn refused(&self, type_url: &str, version: String, message: &str) {
        tracing::warn!(proxy = ?self.proxy.as_ref().map(|p| &p.id), %type_url, "proxy refused config: {message}");
        self.metrics
            .rejects
            .with_label_values(&[type_label(type_url)])
            .inc();
        let message = message.to_string();
        self.status.update(self.connection, type_url, |s| {
            s.nack = Some((version, message))
        });
    }
}

/// The nonces of a stream's responses.
#[derive(Default)]
struct Nonces(u64);

impl Nonces {
    fn next(&mut self) -> String {
        self.0 += 1;
        self.0.to_string()
    }
}

/// The version of a set of resources, from their names and versions.
fn fingerprint<'a>(resources: impl IntoIterator<Item = (&'a Arc<str>, &'a Versioned)>) -> u64 {
    let mut hasher = DefaultHasher::new();
    for (name, resource) in resources {
        name.hash(&mut hasher);
        resource.version.hash(&mut hasher);
    }
    hasher.finish()
}

/// The version Envoy is told for a set of resources: its fingerprint.
pub(crate) fn version_of(hash: u64) -> String {
    format!("{hash:016x}")
}

/// What [`serve`] reads in the requests of both flavours.
trait Request: prost::Message + Default + Send + 'static {
    fn node(&self) -> Option<&Node>;
    fn type_url(&self) -> &str;
    fn response_nonce(&self) -> &str;
    fn error_detail(&self) -> Option<&RpcStatus>;
}

/// Both flavours' messages have these fields under the same names.
macro_rules! discovery_messages {
    ($($request:ty),*) => {$(
        impl Request for $request {
            fn node(&self) -> Option<&Node> {
                self.node.as_ref()
            }
            fn type_url(&self) -> &str {
                &self.type_url
            }
            fn response_nonce(&self) -> &str {
                &self.response_nonce
            }
            fn error_detail(&self) -> Option<&RpcStatus> {
                self.error_detail.as_ref()
            }
        }
    )*};
}

discovery_messages!(DiscoveryRequest, DeltaDiscoveryRequest);

/// One xDS flavour's per-stream subscriptions: it turns requests and
/// configuration changes into responses. Who the proxy is, its health
/// reports and its resources are the [`Session`]'s, the same for both;
/// [`serve`] does the I/O.
trait Protocol: Default + Send + 'static {
    type Request: Request;
    /// A request that is not a health report, from an identified proxy.
    fn on_request(&mut self, session: &mut Session, request: Self::Request) -> Vec<Encoded>;
    /// The response for `type_url` if the proxy subscribes to it and lacks
    /// something of it, or always with `force`.
    fn push(&mut self, session: &mut Session, type_url: &str, force: bool) -> Option<Encoded>;
    /// Forgets what the proxy refused: after a configuration change it may
    /// be sent again.
    fn forget_refusals(&mut self);
    /// The next push of `type_url` sends again what the proxy has: the
    /// resources named as those in `sent`, or every one with `every`.
    fn resend(&mut self, type_url: &str, sent: &Encoded, every: bool);

    /// The response for `type_url` (as [`Protocol::push`]), followed by the
    /// resources Envoy warms it with (see [`warmed_with`]).
    fn respond(&mut self, session: &mut Session, type_url: &str, force: bool) -> Vec<Encoded> {
        let Some(response) = self.push(session, type_url, force) else {
            return Vec::new();
        };
        let mut responses = vec![];
        if let Some((dependent, every)) = warmed_with(type_url) {
            self.resend(dependent, &response, every);
            responses.push(response);
            responses.extend(self.push(session, dependent, false));
        } else {
            responses.push(response);
        }
        responses
    }

    /// The session's resources were recomputed: push what changed.
    fn on_config(&mut self, session: &mut Session) -> Vec<Encoded> {
        self.forget_refusals();
        PUSH_ORDER
            .iter()
            .flat_map(|type_url| self.respond(session, type_url, false))
            .collect()
    }
}

/// Runs one stream until the proxy hangs up, the server shuts down, or the
/// proxy's first request does not say who it is.
fn serve<P: Protocol>(
    mut session: Session,
    mut inbound: impl Stream<Item = Result<P::Request, Status>> + Send + Unpin + 'static,
    mut config: watch::Receiver<Arc<dyn ConfigSource>>,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<Encoded, Status>> {
    let (out, rx) = mpsc::channel(16);
    let mut protocol = P::default();
    tokio::spawn(async move {
        'stream: loop {
            let started = Instant::now();
            // When the configuration these responses carry changed, if
            // they are a push of it.
            let mut pushed_change = None;
            let responses = tokio::select! {
                message = inbound.next() => match message {
                    Some(Ok(request)) => {
                        // Not `borrow_and_update`: a change seen here must
                        // still reach `on_config` below.
                        let current = config.borrow().clone();
                        if let Err(status) = session.identify(request.node(), &current) {
                            let _ = out.send(Err(status)).await;
                            break;
                        }
                        match HealthReport::from_request(&request) {
                            Some(report) => session
                                .health(&report)
                                .then(|| Encoded::bare(HEALTH_INFORMATION_TYPE, request.response_nonce().to_string()))
                                .into_iter()
                                .collect(),
                            None => protocol.on_request(&mut session, request),
                        }
                    }
                    Some(Err(status)) => {
                        let _ = out.send(Err(status)).await;
                        break;
                    }
                    None => break,
                },
                // The guard `wait_for` returns is not Send: drop it inside.
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
                changed = config.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = config.borrow_and_update().clone();
                    let Some(proxy) = &session.proxy else { continue };
                    let resources = current.resources(proxy).stabilized_against(&session.resources);
                    session.reconfigure(resources);
                    pushed_change = current.changed_at();
                    protocol.on_config(&mut session)
                }
            };
            let pushed_any = !responses.is_empty();
            for response in responses {
                let metrics = &session.metrics;
                let type_url = type_label(&response.type_url);
                let sending = Instant::now();
                let size = response.len();
                if out.send(Ok(response)).await.is_err() {
                    break 'stream;
                }
                if type_url != "other" {
                    metrics.pushes.with_label_values(&[type_url]).inc();
                    metrics.send_time.observe(sending.elapsed().as_secs_f64());
                    metrics
                        .push_time
                        .with_label_values(&[type_url])
                        .observe(started.elapsed().as_secs_f64());
                    metrics
                        .config_size
                        .with_label_values(&[type_url])
                        .observe(size as f64);
                }
            }
            if let Some(changed_at) = pushed_change.filter(|_| pushed_any) {
                session
                    .metrics
                    .convergence
                    .observe(changed_at.elapsed().as_secs_f64());
            }
        }
        session.end();
    });
    ReceiverStream::new(rx)
}

impl Ads {
    fn session(&self, caller: Option<CallerIdentity>) -> Session {
        Session {
            connection: self
                .next_connection
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            caller,
            lifecycle: self.lifecycle.clone(),
            proxy: None,
            resources: Resources::default(),
            nonces: Nonces::default(),
            status: self.status.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster whose metadata map has `first`'s entry encoded before
    /// `second`'s: protobuf merges the two messages, so either order decodes
    /// to the same cluster, as prost's hash-ordered maps encode it.
    fn cluster_with_map(first: &str, second: &str) -> Any {
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use envoy_types::pb::envoy::config::core::v3::Metadata;
        use prost::Message;
        let part = |key: &str, name: &str| Cluster {
            name: name.into(),
            metadata: Some(Metadata {
                filter_metadata: [(key.to_string(), Default::default())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut value = part(first, "c").encode_to_vec();
        value.extend(part(second, "c").encode_to_vec());
        Any {
            type_url: CLUSTER_TYPE.into(),
            value,
        }
    }

    #[test]
    fn a_resource_rebuilt_with_its_maps_reordered_keeps_its_version() {
        let mut before = ResourceSet::default();
        before.insert(CLUSTER_TYPE, "c", cluster_with_map("a", "b"));
        before.insert(CLUSTER_TYPE, "d", cluster_with_map("a", "b"));
        let mut after = ResourceSet::default();
        after.insert(CLUSTER_TYPE, "c", cluster_with_map("b", "a"));
        // Changed, at the same length.
        after.insert(CLUSTER_TYPE, "d", cluster_with_map("b", "z"));
        let version = |set: &ResourceSet, name: &str| {
            set.of_type(CLUSTER_TYPE)
                .find(|(n, _)| &***n == name)
                .map(|(_, r)| r.version)
                .unwrap()
        };
        assert_ne!(
            version(&before, "c"),
            version(&after, "c"),
            "the bytes differ"
        );
        let stable = after.stabilized(&before);
        assert_eq!(version(&stable, "c"), version(&before, "c"));
        assert_ne!(version(&stable, "d"), version(&before, "d"));
        assert_ne!(
            stable.fingerprint(CLUSTER_TYPE),
            before.fingerprint(CLUSTER_TYPE),
            "d changed"
        );
    }

    #[test]
    fn changed_names_are_worked_out_once_per_pair_of_sets() {
        let mut before = ResourceSet::default();
        before.insert(ENDPOINT_TYPE, "kept", cluster_with_map("a", "b"));
        before.insert(ENDPOINT_TYPE, "gone", cluster_with_map("a", "b"));
        before.insert(ENDPOINT_TYPE, "moved", cluster_with_map("a", "b"));
        let mut after = ResourceSet::default();
        after.insert(ENDPOINT_TYPE, "kept", cluster_with_map("a", "b"));
        after.insert(ENDPOINT_TYPE, "moved", cluster_with_map("a", "z"));
        after.insert(ENDPOINT_TYPE, "new", cluster_with_map("a", "b"));
        let own = Arc::new(ResourceSet::default());
        let before = Resources::layered(vec![Arc::new(before), own.clone()]);
        let after = Resources::layered(vec![Arc::new(after), own]);
        let names = |changed: Option<BTreeSet<Arc<str>>>| {
            changed
                .unwrap()
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(after.changed_names(&before, ENDPOINT_TYPE)),
            ["gone", "moved", "new"]
        );
        // Asked again (another proxy): the same answer, from the cache.
        let cached = after.0[0].changes.0.lock().len();
        assert_eq!(
            names(after.changed_names(&before, ENDPOINT_TYPE)),
            ["gone", "moved", "new"]
        );
        assert_eq!(after.0[0].changes.0.lock().len(), cached);
        // A layer with nothing at its place before: everything counts.
        let fewer = Resources::layered(vec![before.0[0].clone()]);
        assert!(after.changed_names(&fewer, ENDPOINT_TYPE).is_none());
    }

    #[test]
    fn find_by_id_name_namespace_or_a_unique_part() {
        let table = StatusTable::default();
        for (connection, id) in [
            "sidecar~10.0.0.1~pay-1.vm~vm.svc.cluster.local",
            "sidecar~10.0.0.2~pay-12.vm~vm.svc.cluster.local",
        ]
        .into_iter()
        .enumerate()
        {
            let status = ProxyStatus {
                id: id.into(),
                namespace: "vm".into(),
                connected_at: String::new(),
                types: BTreeMap::new(),
            };
            let proxy = ConnectedProxy {
                status,
                node: Node::default(),
                resources: Resources::default(),
            };
            table.proxies.lock().insert(connection as u64, proxy);
        }
        let found = |query: &str| table.find(query).map(|p| p.status.id);
        assert_eq!(
            found("sidecar~10.0.0.2~pay-12.vm~vm.svc.cluster.local").unwrap(),
            "sidecar~10.0.0.2~pay-12.vm~vm.svc.cluster.local"
        );
        // pay-1.vm is also part of pay-12's id: the name wins.
        assert_eq!(
            found("pay-1.vm").unwrap(),
            "sidecar~10.0.0.1~pay-1.vm~vm.svc.cluster.local"
        );
        assert_eq!(
            found("10.0.0.2").unwrap(),
            "sidecar~10.0.0.2~pay-12.vm~vm.svc.cluster.local"
        );
        assert!(matches!(found("pay"), Err(FindError::Ambiguous { .. })));
        assert_eq!(
            found("nobody.vm"),
            Err(FindError::NotConnected("nobody.vm".into()))
        );
    }
}
