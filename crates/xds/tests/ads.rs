//! The ADS protocol over a real gRPC connection: a tonic server on a loopback
//! port serving [`Ads`], and tonic clients speaking state-of-the-world xDS to
//! it the way Envoy does (first request, ACK, NACK, stale nonces, EDS name
//! subscriptions), delta xDS (wildcard, ACK, NACK, removals), and health
//! reports on both.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use envoy_types::util::pack_any;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::Streaming;
use vmesh_xds::ads::{
    Ads, CLUSTER_TYPE, ConfigSource, ENDPOINT_TYPE, HEALTH_INFORMATION_TYPE, ProxyStatus,
    ResourceSet, Resources, StatusTable, TypeStatus,
};
use vmesh_xds::node::Proxy;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

const NODE_1: &str = "sidecar~10.0.0.1~vm1.ns1~ns1.svc.cluster.local";
const NODE_2: &str = "sidecar~10.0.0.2~vm2.ns2~ns2.svc.cluster.local";

// --- resources -------------------------------------------------------------

fn cluster(name: &str, stat: &str) -> Any {
    pack_any(Cluster {
        name: name.to_string(),
        alt_stat_name: stat.to_string(),
        ..Default::default()
    })
}

fn endpoints(name: &str, priority: u32) -> Any {
    pack_any(ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            priority,
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// Clusters named as given (with `stat` as a content knob) and, for each name
/// in `eds`, a load assignment with the given priority.
fn resources(clusters: &[(&str, &str)], eds: &[(&str, u32)]) -> Resources {
    let mut set = ResourceSet::default();
    for (name, stat) in clusters {
        set.insert(CLUSTER_TYPE, *name, cluster(name, stat));
    }
    for (name, priority) in eds {
        set.insert(ENDPOINT_TYPE, *name, endpoints(name, *priority));
    }
    Resources::from(set)
}

/// The resource names in a response, in the order sent.
fn names(response: &DiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| match any.type_url.as_str() {
            CLUSTER_TYPE => Cluster::decode(any.value.as_slice()).unwrap().name,
            ENDPOINT_TYPE => {
                ClusterLoadAssignment::decode(any.value.as_slice())
                    .unwrap()
                    .cluster_name
            }
            other => panic!("unexpected resource type {other}"),
        })
        .collect()
}

// --- config sources --------------------------------------------------------

/// The same resources for every proxy.
struct Fixed(Resources);

impl ConfigSource for Fixed {
    fn resources(&self, _proxy: &Proxy) -> Resources {
        self.0.clone()
    }
}

/// Resources by the proxy's namespace.
struct ByNamespace(BTreeMap<&'static str, Resources>);

impl ConfigSource for ByNamespace {
    fn resources(&self, proxy: &Proxy) -> Resources {
        self.0
            .get(proxy.namespace.as_str())
            .cloned()
            .unwrap_or_default()
    }
}

/// Fixed resources, but the first computation for proxy `id` says it has
/// started and then waits for the test's go-ahead, so a test can line things
/// up behind it.
struct Gated {
    id: String,
    resources: Resources,
    entered: Arc<Notify>,
    gate: parking_lot::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl ConfigSource for Gated {
    fn resources(&self, proxy: &Proxy) -> Resources {
        let gate = if proxy.id == self.id {
            self.gate.lock().take()
        } else {
            None
        };
        if let Some(gate) = gate {
            self.entered.notify_one();
            let _ = gate.recv_timeout(WAIT);
        }
        self.resources.clone()
    }
}

// --- server and clients ----------------------------------------------------

struct Harness {
    addr: SocketAddr,
    status: Arc<StatusTable>,
    config: watch::Sender<Arc<dyn ConfigSource>>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Harness {
    async fn start(source: impl ConfigSource) -> Harness {
        let (config, rx) = watch::channel(Arc::new(source) as Arc<dyn ConfigSource>);
        let status = Arc::new(StatusTable::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = watch::channel(false);
        let mut server_stop = stop.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(Ads::new(rx, status.clone(), stop).into_service())
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = server_stop.wait_for(|stop| *stop).await;
                }),
        );
        Harness {
            addr,
            status,
            config,
            shutdown,
            server,
        }
    }

    fn set(&self, source: impl ConfigSource) {
        self.config.send_replace(Arc::new(source));
    }

    /// Opens an ADS stream without sending anything on it.
    async fn open(
        &self,
    ) -> (
        mpsc::UnboundedSender<DiscoveryRequest>,
        Result<Streaming<DiscoveryResponse>, tonic::Status>,
    ) {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let responses = client
            .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner);
        (tx, responses)
    }

    /// Opens a delta ADS stream.
    async fn open_delta(
        &self,
    ) -> (
        mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        Streaming<DeltaDiscoveryResponse>,
    ) {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let responses = client
            .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, responses)
    }

    async fn connect(&self, node_id: &str) -> Client {
        let (requests, responses) = self.open().await;
        Client {
            node: Node {
                id: node_id.to_string(),
                ..Default::default()
            },
            requests,
            responses: responses.unwrap(),
        }
    }

    fn status_of(&self, id: &str) -> Option<ProxyStatus> {
        self.status.snapshot().into_iter().find(|p| p.id == id)
    }

    fn type_status(&self, id: &str, type_url: &str) -> TypeStatus {
        self.status_of(id)
            .and_then(|p| p.types.get(type_url).cloned())
            .unwrap_or_default()
    }

    /// Waits until the status table satisfies `check`.
    async fn eventually(&self, what: &str, check: impl Fn(&StatusTable) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check(&self.status) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}; status: {:?}",
                self.status.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server; every client must have been dropped.
    async fn stop(self) {
        let _ = self.shutdown.send(true);
        tokio::time::timeout(WAIT, self.server)
            .await
            .expect("server stops once clients are gone")
            .unwrap()
            .unwrap();
    }
}

/// One proxy's ADS stream, as Envoy would drive it.
struct Client {
    node: Node,
    requests: mpsc::UnboundedSender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
}

impl Client {
    fn send(&self, request: DiscoveryRequest) {
        self.requests
            .send(DiscoveryRequest {
                node: Some(self.node.clone()),
                ..request
            })
            .unwrap();
    }

    /// A first request for a type: no version, no nonce.
    fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        });
    }

    /// Accepts `response`, asking for `names` from now on.
    fn ack(&self, response: &DiscoveryResponse, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        });
    }

    /// Refuses `response`; like Envoy, reports the last version it accepted.
    fn nack(&self, response: &DiscoveryResponse, accepted: &str, message: &str) {
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: accepted.to_string(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message: message.to_string(),
                details: Vec::new(),
            }),
            ..Default::default()
        });
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.responses.message())
            .await
            .expect("a response within the deadline")
            .expect("no stream error")
            .expect("the stream is still open")
    }

    /// Asserts that nothing arrives for a while.
    async fn assert_silent(&mut self) {
        if let Ok(message) = tokio::time::timeout(QUIET, self.responses.message()).await {
            panic!("expected no response, got {message:?}");
        }
    }
}

// --- tests -----------------------------------------------------------------

#[tokio::test]
async fn first_request_gets_every_cluster_and_bad_node_ids_are_refused() {
    let h = Harness::start(Fixed(resources(&[("a", ""), ("b", "")], &[("a", 1)]))).await;

    let mut proxy = h.connect(NODE_1).await;
    proxy.subscribe(CLUSTER_TYPE, &[]);
    let response = proxy.recv().await;
    assert_eq!(response.type_url, CLUSTER_TYPE);
    assert_eq!(names(&response), ["a", "b"]);
    assert!(!response.version_info.is_empty());
    assert!(!response.nonce.is_empty());
    let status = h
        .status_of(NODE_1)
        .expect("the proxy is in the status table");
    assert_eq!(status.namespace, "ns1");
    assert_eq!(
        status.types[CLUSTER_TYPE].sent_version.as_deref(),
        Some(response.version_info.as_str())
    );
    assert_eq!(status.types[CLUSTER_TYPE].acked_version, None);

    let (requests, responses) = h.open().await;
    requests
        .send(DiscoveryRequest {
            node: Some(Node {
                id: "hello".to_string(),
                ..Default::default()
            }),
            type_url: CLUSTER_TYPE.to_string(),
            ..Default::default()
        })
        .unwrap();
    let error = match responses {
        Err(status) => status,
        Ok(mut responses) => tokio::time::timeout(WAIT, responses.message())
            .await
            .expect("an answer within the deadline")
            .expect_err("a malformed node id is an error"),
    };
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("hello"), "{error:?}");
    assert_eq!(
        h.status.snapshot().len(),
        1,
        "only the good proxy is listed"
    );

    drop((proxy, requests));
    h.stop().await;
}

#[tokio::test]
async fn ack_is_recorded_and_answered_with_silence() {
    let h = Harness::start(Fixed(resources(&[("a", ""), ("b", "")], &[]))).await;
    let mut proxy = h.connect(NODE_1).await;
    proxy.subscribe(CLUSTER_TYPE, &[]);
    let response = proxy.recv().await;

    proxy.ack(&response, &[]);
    proxy.assert_silent().await;
    h.eventually("the ACK is recorded", |_| {
        h.type_status(NODE_1, CLUSTER_TYPE).acked_version.as_deref()
            == Some(response.version_info.as_str())
    })
    .await;
    let status = h.type_status(NODE_1, CLUSTER_TYPE);
    assert_eq!(status.sent_version, status.acked_version);
    assert_eq!(status.nack, None);

    drop(proxy);
    h.stop().await;
}

#[tokio::test]
async fn nack_is_recorded_and_not_resent_until_the_resources_change() {
    let h = Harness::start(Fixed(resources(&[("a", ""), ("b", "")], &[]))).await;
    let mut proxy = h.connect(NODE_1).await;
    proxy.subscribe(CLUSTER_TYPE, &[]);
    let refused = proxy.recv().await;

    // Envoy's NACK carries the last version it accepted: none yet.
    proxy.nack(&refused, "", "cluster b: bad config");
    proxy.assert_silent().await;
    h.eventually("the NACK is recorded", |_| {
        h.type_status(NODE_1, CLUSTER_TYPE).nack.is_some()
    })
    .await;
    let status = h.type_status(NODE_1, CLUSTER_TYPE);
    assert_eq!(
        status.nack,
        Some((
            refused.version_info.clone(),
            "cluster b: bad config".to_string()
        )),
        "the refused version is recorded, not the last accepted one"
    );
    assert_eq!(status.acked_version, None);

    // A new configuration that gives this proxy the same resources: nothing.
    h.set(Fixed(resources(&[("a", ""), ("b", "")], &[("a", 1)])));
    proxy.assert_silent().await;

    // Different resources: a new version.
    h.set(Fixed(resources(&[("a", ""), ("b", "fixed")], &[])));
    let fixed = proxy.recv().await;
    assert_eq!(fixed.type_url, CLUSTER_TYPE);
    assert_eq!(names(&fixed), ["a", "b"]);
    assert_ne!(fixed.version_info, refused.version_info);
    assert_ne!(fixed.nonce, refused.nonce);
    proxy.ack(&fixed, &[]);
    proxy.assert_silent().await;
    h.eventually("the new version is acked", |_| {
        h.type_status(NODE_1, CLUSTER_TYPE).acked_version.as_deref()
            == Some(fixed.version_info.as_str())
    })
    .await;

    drop(proxy);
    h.stop().await;
}

#[tokio::test]
async fn answers_to_superseded_responses_are_ignored() {
    let h = Harness::start(Fixed(resources(&[("a", "1")], &[]))).await;
    let mut proxy = h.connect(NODE_1).await;
    proxy.subscribe(CLUSTER_TYPE, &[]);
    let old = proxy.recv().await;
    h.set(Fixed(resources(&[("a", "2")], &[])));
    let new = proxy.recv().await;
    assert_ne!(old.nonce, new.nonce);
    assert_ne!(old.version_info, new.version_info);

    // Answers to the first response arrive after the second was sent.
    proxy.ack(&old, &[]);
    proxy.nack(&old, "", "stale refusal");
    // Requests are handled in order: once this ACK shows, the two before it
    // have been handled too.
    proxy.ack(&new, &[]);
    proxy.assert_silent().await;
    h.eventually("the current version is acked", |_| {
        h.type_status(NODE_1, CLUSTER_TYPE).acked_version.as_deref()
            == Some(new.version_info.as_str())
    })
    .await;
    let status = h.type_status(NODE_1, CLUSTER_TYPE);
    assert_eq!(status.nack, None, "a stale NACK is not recorded");
    assert_eq!(
        status.sent_version.as_deref(),
        Some(new.version_info.as_str())
    );

    // The stale NACK did not mark the current set as refused either: after a
    // change and a change back, the proxy gets it again.
    h.set(Fixed(resources(&[("a", "3")], &[])));
    let third = proxy.recv().await;
    proxy.ack(&third, &[]);
    h.set(Fixed(resources(&[("a", "2")], &[])));
    let again = proxy.recv().await;
    assert_eq!(again.version_info, new.version_info);

    drop(proxy);
    h.stop().await;
}

#[tokio::test]
async fn eds_sends_only_the_names_asked_for() {
    let eds = [("a", 1), ("b", 1), ("c", 1)];
    let h = Harness::start(Fixed(resources(&[("a", ""), ("b", ""), ("c", "")], &eds))).await;
    let mut proxy = h.connect(NODE_1).await;
    proxy.subscribe(CLUSTER_TYPE, &[]);
    let cds = proxy.recv().await;
    proxy.ack(&cds, &[]);

    proxy.subscribe(ENDPOINT_TYPE, &["a"]);
    let first = proxy.recv().await;
    assert_eq!(first.type_url, ENDPOINT_TYPE);
    assert_eq!(names(&first), ["a"]);
    proxy.ack(&first, &["a"]);
    proxy.assert_silent().await;

    // A change to an endpoint set the proxy did not ask for: nothing.
    h.set(Fixed(resources(
        &[("a", ""), ("b", ""), ("c", "")],
        &[("a", 1), ("b", 1), ("c", 2)],
    )));
    proxy.assert_silent().await;

    // New names (Envoy sends them with the last nonce and accepted version).
    proxy.ack(&first, &["b", "c", "missing"]);
    let second = proxy.recv().await;
    assert_eq!(second.type_url, ENDPOINT_TYPE);
    assert_eq!(names(&second), ["b", "c"]);
    assert_ne!(second.version_info, first.version_info);
    proxy.ack(&second, &["b", "c", "missing"]);
    proxy.assert_silent().await;
    h.eventually("the new endpoints are acked", |_| {
        h.type_status(NODE_1, ENDPOINT_TYPE)
            .acked_version
            .as_deref()
            == Some(second.version_info.as_str())
    })
    .await;

    // A change to one of them: pushed, alone (Envoy keeps the load
    // assignments a response leaves out), under the version of them all.
    h.set(Fixed(resources(
        &[("a", ""), ("b", ""), ("c", "")],
        &[("a", 1), ("b", 1), ("c", 3)],
    )));
    let third = proxy.recv().await;
    assert_eq!(third.type_url, ENDPOINT_TYPE);
    assert_eq!(names(&third), ["c"]);
    assert_ne!(third.version_info, second.version_info);
    proxy.ack(&third, &["b", "c", "missing"]);
    proxy.assert_silent().await;

    // Refused: the next change sends everything again, since what Envoy
    // kept is not known.
    h.set(Fixed(resources(
        &[("a", ""), ("b", ""), ("c", "")],
        &[("a", 1), ("b", 1), ("c", 4)],
    )));
    let fourth = proxy.recv().await;
    assert_eq!(names(&fourth), ["c"]);
    proxy.nack(&fourth, &third.version_info, "refused");
    h.eventually("the refusal is recorded", |_| {
        h.type_status(NODE_1, ENDPOINT_TYPE).nack.is_some()
    })
    .await;
    h.set(Fixed(resources(
        &[("a", ""), ("b", ""), ("c", "")],
        &[("a", 1), ("b", 1), ("c", 5)],
    )));
    let fifth = proxy.recv().await;
    assert_eq!(names(&fifth), ["b", "c"]);

    drop(proxy);
    h.stop().await;
}

/// Envoy warms a changed cluster until its load assignment arrives, and
/// waits 15 s for it when it never does: a changed cluster's assignment is
/// sent again even though it did not change.
#[tokio::test]
async fn a_changed_cluster_gets_its_load_assignment_again() {
    let eds = [("a", 1), ("b", 1)];
    let h = Harness::start(Fixed(resources(&[("a", ""), ("b", "")], &eds))).await;
    let mut proxy = h.connect(NODE_1).await;
    proxy.subscribe(CLUSTER_TYPE, &[]);
    let cds = proxy.recv().await;
    proxy.ack(&cds, &[]);
    proxy.subscribe(ENDPOINT_TYPE, &["a", "b"]);
    let eds_first = proxy.recv().await;
    proxy.ack(&eds_first, &["a", "b"]);
    proxy.assert_silent().await;

    h.set(Fixed(resources(&[("a", "changed"), ("b", "")], &eds)));
    let cds_second = proxy.recv().await;
    assert_eq!(cds_second.type_url, CLUSTER_TYPE);
    let eds_again = proxy.recv().await;
    assert_eq!(eds_again.type_url, ENDPOINT_TYPE);
    assert_eq!(
        names(&eds_again),
        ["a"],
        "the changed cluster's: Envoy keeps the others"
    );
    assert_eq!(eds_again.version_info, eds_first.version_info, "unchanged");
    proxy.ack(&cds_second, &[]);
    proxy.ack(&eds_again, &["a", "b"]);
    proxy.assert_silent().await;
    drop(proxy);

    // Delta: the load assignment of the changed cluster only.
    let (requests, mut responses) = h.open_delta().await;
    let subscribe = |type_url: &str, names: &[&str], nonce: &str| DeltaDiscoveryRequest {
        node: Some(Node {
            id: NODE_2.to_string(),
            ..Default::default()
        }),
        type_url: type_url.to_string(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    };
    requests.send(subscribe(CLUSTER_TYPE, &[], "")).unwrap();
    let clusters = recv_delta(&mut responses).await;
    requests
        .send(subscribe(CLUSTER_TYPE, &[], &clusters.nonce))
        .unwrap();
    requests
        .send(subscribe(ENDPOINT_TYPE, &["a", "b"], ""))
        .unwrap();
    let assignments = recv_delta(&mut responses).await;
    assert_eq!(delta_names(&assignments), ["a", "b"]);
    requests
        .send(subscribe(ENDPOINT_TYPE, &[], &assignments.nonce))
        .unwrap();
    h.set(Fixed(resources(&[("a", "changed"), ("b", "again")], &eds)));
    let changed = recv_delta(&mut responses).await;
    assert_eq!(
        (changed.type_url.as_str(), delta_names(&changed)),
        (CLUSTER_TYPE, vec!["b"])
    );
    let again = recv_delta(&mut responses).await;
    assert_eq!(
        (again.type_url.as_str(), delta_names(&again)),
        (ENDPOINT_TYPE, vec!["b"])
    );

    drop(requests);
    h.stop().await;
}

#[tokio::test]
async fn only_proxies_whose_resources_changed_are_pushed() {
    let config = |ns1_stat: &str| {
        ByNamespace(BTreeMap::from([
            ("ns1", resources(&[("ns1-a", ns1_stat)], &[])),
            ("ns2", resources(&[("ns2-a", "")], &[])),
        ]))
    };
    let h = Harness::start(config("1")).await;
    let mut one = h.connect(NODE_1).await;
    let mut two = h.connect(NODE_2).await;
    one.subscribe(CLUSTER_TYPE, &[]);
    two.subscribe(CLUSTER_TYPE, &[]);
    let one_first = one.recv().await;
    let two_first = two.recv().await;
    assert_eq!(names(&one_first), ["ns1-a"]);
    assert_eq!(names(&two_first), ["ns2-a"]);
    one.ack(&one_first, &[]);
    two.ack(&two_first, &[]);
    one.assert_silent().await;
    two.assert_silent().await;

    h.set(config("2"));
    let one_second = one.recv().await;
    assert_eq!(names(&one_second), ["ns1-a"]);
    assert_ne!(one_second.version_info, one_first.version_info);
    two.assert_silent().await;
    assert_eq!(
        h.type_status(NODE_2, CLUSTER_TYPE).sent_version.as_deref(),
        Some(two_first.version_info.as_str())
    );

    drop((one, two));
    h.stop().await;
}

#[tokio::test]
async fn disconnected_proxies_leave_the_status_table() {
    let h = Harness::start(Fixed(resources(&[("a", "")], &[]))).await;
    let mut one = h.connect(NODE_1).await;
    let mut two = h.connect(NODE_2).await;
    one.subscribe(CLUSTER_TYPE, &[]);
    two.subscribe(CLUSTER_TYPE, &[]);
    one.recv().await;
    two.recv().await;
    assert_eq!(h.status.snapshot().len(), 2);

    drop(one);
    h.eventually("the first proxy is gone", |s| {
        s.snapshot().iter().map(|p| p.id.as_str()).eq([NODE_2])
    })
    .await;
    drop(two);
    h.eventually("every proxy is gone", |s| s.snapshot().is_empty())
        .await;
    h.stop().await;
}

/// Shutdown ends open streams instead of waiting for proxies to hang up.
#[tokio::test]
async fn shutdown_ends_connected_streams() {
    let h = Harness::start(Fixed(resources(&[("a", "")], &[]))).await;
    let mut proxy = h.connect(NODE_1).await;
    proxy.subscribe(CLUSTER_TYPE, &[]);
    proxy.recv().await;
    h.stop().await;
    drop(proxy);
}

/// A configuration change that lands while a request is waiting must not be
/// lost: whichever the stream handles first, the proxy ends up with the new
/// resources.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_arriving_with_a_request_is_not_lost() {
    let old = resources(&[("old", "")], &[("old", 1)]);
    let new = resources(&[("new", "")], &[("new", 1)]);
    let h = Harness::start(Fixed(old.clone())).await;
    // The stream picks at random between a ready request and a ready change,
    // so one round proves little; several rounds make a lost change certain
    // to show.
    for round in 0..8 {
        let id = format!("sidecar~10.0.0.{round}~vm{round}.ns1~ns1.svc.cluster.local");
        let entered = Arc::new(Notify::new());
        let (go, gate) = std::sync::mpsc::channel();
        h.set(Gated {
            id: id.clone(),
            resources: old.clone(),
            entered: entered.clone(),
            gate: parking_lot::Mutex::new(Some(gate)),
        });
        let mut proxy = h.connect(&id).await;
        // The stream computes this proxy's resources and blocks there...
        proxy.subscribe(CLUSTER_TYPE, &[]);
        tokio::time::timeout(WAIT, entered.notified())
            .await
            .expect("the stream computes the proxy's resources");
        // ...while a request and a configuration change queue up behind it.
        proxy.subscribe(ENDPOINT_TYPE, &["old", "new"]);
        h.set(Fixed(new.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        go.send(()).unwrap();

        let first = proxy.recv().await;
        assert_eq!(names(&first), ["old"], "round {round}");
        let mut latest: BTreeMap<String, Vec<String>> = BTreeMap::new();
        while latest.get(CLUSTER_TYPE).is_none_or(|n| n != &["new"])
            || latest.get(ENDPOINT_TYPE).is_none_or(|n| n != &["new"])
        {
            let Ok(Ok(Some(response))) =
                tokio::time::timeout(WAIT, proxy.responses.message()).await
            else {
                panic!("round {round}: the change was lost; last responses: {latest:?}");
            };
            latest.insert(response.type_url.clone(), names(&response));
        }
        drop(proxy);
    }
    h.stop().await;
}

async fn recv_delta(responses: &mut Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(WAIT, responses.message())
        .await
        .expect("a response within the deadline")
        .expect("no stream error")
        .expect("the stream is still open")
}

fn delta_names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn delta_sends_changes_and_removals_and_remembers_refusals() {
    let h = Harness::start(Fixed(resources(&[("a", ""), ("b", "")], &[]))).await;
    let (requests, mut responses) = h.open_delta().await;
    let node = Node {
        id: NODE_1.to_string(),
        ..Default::default()
    };
    // An empty first subscription to CDS is the wildcard.
    requests
        .send(DeltaDiscoveryRequest {
            node: Some(node),
            type_url: CLUSTER_TYPE.to_string(),
            ..Default::default()
        })
        .unwrap();
    let first = recv_delta(&mut responses).await;
    assert_eq!(first.type_url, CLUSTER_TYPE);
    assert_eq!(delta_names(&first), ["a", "b"]);
    assert!(first.removed_resources.is_empty());
    let answer = |response: &DeltaDiscoveryResponse, error: Option<&str>| DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        error_detail: error.map(|message| RpcStatus {
            code: tonic::Code::InvalidArgument as i32,
            message: message.to_string(),
            details: Vec::new(),
        }),
        ..Default::default()
    };
    requests.send(answer(&first, None)).unwrap();
    h.eventually("the ACK is recorded", |_| {
        h.type_status(NODE_1, CLUSTER_TYPE).acked_version.as_deref()
            == Some(first.system_version_info.as_str())
    })
    .await;

    // Only what changed, and what is gone.
    h.set(Fixed(resources(&[("a", "changed"), ("c", "")], &[])));
    let change = recv_delta(&mut responses).await;
    assert_eq!(delta_names(&change), ["a", "c"]);
    assert_eq!(change.removed_resources, ["b"]);
    requests
        .send(answer(&change, Some("cluster c: bad config")))
        .unwrap();
    h.eventually("the NACK is recorded", |_| {
        h.type_status(NODE_1, CLUSTER_TYPE).nack
            == Some((
                change.system_version_info.clone(),
                "cluster c: bad config".to_string(),
            ))
    })
    .await;
    tokio::time::timeout(QUIET, responses.message())
        .await
        .expect_err("a refused change is not sent again while nothing changes");
    // Envoy kept what it had: a fix is sent against that.
    h.set(Fixed(resources(&[("a", "changed"), ("c", "fixed")], &[])));
    let fixed = recv_delta(&mut responses).await;
    assert_eq!(delta_names(&fixed), ["a", "c"]);
    assert_eq!(fixed.removed_resources, ["b"]);

    drop(requests);
    h.stop().await;
}

#[tokio::test]
async fn health_reports_are_acknowledged_on_both_flavours() {
    let h = Harness::start(Fixed(resources(&[("a", "")], &[]))).await;
    let node = Node {
        id: NODE_1.to_string(),
        ..Default::default()
    };

    let mut proxy = h.connect(NODE_1).await;
    proxy.send(DiscoveryRequest {
        type_url: HEALTH_INFORMATION_TYPE.to_string(),
        response_nonce: "report-1".to_string(),
        ..Default::default()
    });
    let ack = proxy.recv().await;
    assert_eq!(
        (ack.type_url.as_str(), ack.nonce.as_str()),
        (HEALTH_INFORMATION_TYPE, "report-1")
    );
    assert!(ack.resources.is_empty());

    let (requests, mut responses) = h.open_delta().await;
    requests
        .send(DeltaDiscoveryRequest {
            node: Some(node),
            type_url: HEALTH_INFORMATION_TYPE.to_string(),
            response_nonce: "report-2".to_string(),
            error_detail: Some(RpcStatus {
                code: tonic::Code::Unavailable as i32,
                message: "probe failed".to_string(),
                details: Vec::new(),
            }),
            ..Default::default()
        })
        .unwrap();
    let ack = recv_delta(&mut responses).await;
    assert_eq!(
        (ack.type_url.as_str(), ack.nonce.as_str()),
        (HEALTH_INFORMATION_TYPE, "report-2")
    );
    assert!(ack.resources.is_empty());
    h.eventually("both proxies are listed", |status| {
        status.snapshot().len() == 2
    })
    .await;

    drop((proxy, requests));
    h.stop().await;
}
