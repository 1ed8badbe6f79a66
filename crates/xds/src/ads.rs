//! The Aggregated Discovery Service (state of the world): one gRPC stream per
//! proxy carrying clusters, endpoints, listeners and routes.
//!
//! Per stream and type it tracks what was sent (version, nonce), what the
//! proxy accepted, and what it refused: a NACKed set of resources is not sent
//! again until the configuration changes. Pushes happen only when the
//! resources a proxy would get differ from what it last got. Computing those
//! resources is the [`ConfigSource`]'s job, not this module's.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::node::Proxy;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Push order on a change: clusters before endpoints, listeners before routes.
const PUSH_ORDER: [&str; 4] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

/// Resources for one proxy: type URL → resource name → resource.
pub type Resources = BTreeMap<&'static str, BTreeMap<String, Any>>;

/// Computes what a proxy should have from the current mesh.
pub trait ConfigSource: Send + Sync + 'static {
    fn resources(&self, proxy: &Proxy) -> Resources;
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

/// Every connected proxy's status.
#[derive(Debug, Default)]
pub struct StatusTable {
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
}

impl StatusTable {
    pub fn snapshot(&self) -> Vec<ProxyStatus> {
        self.proxies.lock().values().cloned().collect()
    }

    fn update(&self, connection: u64, type_url: &str, change: impl FnOnce(&mut TypeStatus)) {
        if let Some(status) = self.proxies.lock().get_mut(&connection) {
            change(status.types.entry(type_url.to_string()).or_default());
        }
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
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Ads> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(16 << 20)
    }
}

/// One type's subscription on one stream.
#[derive(Default)]
struct Subscription {
    /// `None`: every resource of the type (CDS, LDS); otherwise the names asked for.
    names: Option<BTreeSet<String>>,
    sent_nonce: Option<String>,
    /// Fingerprint of what was last sent, and of what was last refused.
    sent_hash: Option<u64>,
    refused_hash: Option<u64>,
}

struct Stream {
    connection: u64,
    proxy: Option<Proxy>,
    subscriptions: BTreeMap<String, Subscription>,
    resources: Resources,
    nonce: u64,
    status: Arc<StatusTable>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

fn fingerprint(resources: &[&Any]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for any in resources {
        any.type_url.hash(&mut hasher);
        any.value.hash(&mut hasher);
    }
    hasher.finish()
}

/// The version Envoy is told for a set of resources: its fingerprint.
fn version_of(hash: u64) -> String {
    format!("{hash:016x}")
}

impl Stream {
    /// Sends `type_url` if what the proxy should have differs from what it has.
    async fn push(&mut self, type_url: &str, force: bool) -> Result<(), ()> {
        let Some(subscription) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        let empty = BTreeMap::new();
        let all = self.resources.get(type_url).unwrap_or(&empty);
        let chosen: Vec<&Any> = match &subscription.names {
            None => all.values().collect(),
            Some(names) => names.iter().filter_map(|n| all.get(n)).collect(),
        };
        let hash = fingerprint(&chosen);
        let unchanged = subscription.sent_hash == Some(hash) && !force;
        if unchanged || subscription.refused_hash == Some(hash) {
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = version_of(hash);
        subscription.sent_hash = Some(hash);
        subscription.sent_nonce = Some(nonce.clone());
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources: chosen.into_iter().cloned().collect(),
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        self.status.update(self.connection, type_url, |s| {
            s.sent_version = Some(version)
        });
        self.out.send(Ok(response)).await.map_err(|_| ())
    }

    async fn on_request(
        &mut self,
        request: DiscoveryRequest,
        config: &Arc<dyn ConfigSource>,
    ) -> Result<(), Status> {
        if self.proxy.is_none() {
            let proxy = Proxy::from_node(request.node.as_ref())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            tracing::info!(proxy = %proxy.id, "proxy connected");
            self.status.proxies.lock().insert(
                self.connection,
                ProxyStatus {
                    id: proxy.id.clone(),
                    namespace: proxy.namespace.clone(),
                    connected_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                    types: BTreeMap::new(),
                },
            );
            self.resources = config.resources(&proxy);
            self.proxy = Some(proxy);
        }
        let type_url = request.type_url.clone();
        let wildcard = matches!(type_url.as_str(), CLUSTER_TYPE | LISTENER_TYPE);
        let subscription = self.subscriptions.entry(type_url.clone()).or_default();
        // An answer to an older response on this stream is superseded. (A
        // nonce before anything was sent here comes from an earlier stream.)
        if !request.response_nonce.is_empty()
            && subscription
                .sent_nonce
                .as_ref()
                .is_some_and(|sent| *sent != request.response_nonce)
        {
            return Ok(());
        }
        if let Some(error) = &request.error_detail {
            subscription.refused_hash = subscription.sent_hash;
            // Envoy's `version_info` here is the last version it accepted;
            // the refused one is what this nonce carried.
            let version = subscription.sent_hash.map(version_of).unwrap_or_default();
            tracing::warn!(proxy = ?self.proxy.as_ref().map(|p| &p.id), %type_url, "proxy refused config: {}", error.message);
            let message = error.message.clone();
            self.status.update(self.connection, &type_url, |s| {
                s.nack = Some((version, message))
            });
            return Ok(());
        }
        if !request.response_nonce.is_empty() {
            let version = request.version_info.clone();
            self.status.update(self.connection, &type_url, |s| {
                s.acked_version = Some(version)
            });
        }
        let names: Option<BTreeSet<String>> =
            (!wildcard).then(|| request.resource_names.iter().cloned().collect());
        let names_changed = subscription.names != names;
        subscription.names = names;
        let first = subscription.sent_nonce.is_none();
        self.push(&type_url, first || names_changed)
            .await
            .map_err(|_| Status::cancelled("stream closed"))
    }

    async fn on_config(&mut self, config: &Arc<dyn ConfigSource>) -> Result<(), ()> {
        let Some(proxy) = &self.proxy else {
            return Ok(());
        };
        self.resources = config.resources(proxy);
        for subscription in self.subscriptions.values_mut() {
            subscription.refused_hash = None;
        }
        for type_url in PUSH_ORDER {
            self.push(type_url, false).await?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (out, rx) = mpsc::channel(16);
        let mut config = self.config.clone();
        let mut shutdown = self.shutdown.clone();
        let mut stream = Stream {
            connection: self
                .next_connection
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            proxy: None,
            subscriptions: BTreeMap::new(),
            resources: Resources::new(),
            nonce: 0,
            status: self.status.clone(),
            out,
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(request)) => {
                            // Not `borrow_and_update`: a change seen here
                            // must still reach `on_config` below.
                            let current = config.borrow().clone();
                            if let Err(status) = stream.on_request(request, &current).await {
                                let _ = stream.out.send(Err(status)).await;
                                break;
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    // The guard `wait_for` returns is not Send: drop it inside.
                    () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
                    changed = config.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let current = config.borrow_and_update().clone();
                        if stream.on_config(&current).await.is_err() {
                            break;
                        }
                    }
                }
            }
            if let Some(proxy) = &stream.proxy {
                tracing::info!(proxy = %proxy.id, "proxy disconnected");
            }
            stream.status.proxies.lock().remove(&stream.connection);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "delta xDS is not served yet; use state-of-the-world ADS",
        ))
    }
}
