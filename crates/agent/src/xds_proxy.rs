//! The xDS proxy: Envoy speaks ADS to the agent on a local Unix socket, in
//! plaintext; the agent opens the same stream to the control plane's port
//! 15012 over mutual TLS with the workload certificate, and relays every
//! message both ways, unchanged — state of the world
//! (`StreamAggregatedResources`) and delta (`DeltaAggregatedResources`).
//!
//! One upstream stream, on a connection of its own, per Envoy stream. The
//! connection is made with the certificate current at that moment, so
//! streams opened after a rotation present the new one. Until the agent
//! has a certificate, and while the control plane cannot be reached, Envoy's
//! stream is held open and the connection retried with backoff. When the
//! upstream stream ends, Envoy's stream is ended with `UNAVAILABLE`: Envoy
//! reconnects and sends its full state again (an error status from the
//! control plane is passed on as it is) (resource names, and in delta
//! the versions it has), which a relay cannot replay faithfully on its own;
//! the next connection waits out the backoff if the last ones failed.
//!
//! The relay adds two things of its own to each stream, as Istio's agent
//! does, both after Envoy's first request (which tells the control plane
//! who is talking), so a reconnect repeats them:
//! - the workload's health reports (from [`crate::health`]): requests of
//!   type [`HEALTH_INFORMATION_TYPE`], healthy with no `error_detail`,
//!   unhealthy with `error_detail { code: 500, message }`, repeated with
//!   backoff until the control plane answers with a response of that type
//!   whose nonce is the report's;
//! - a subscription to the DNS name table ([`NAME_TABLE_TYPE`]), whose
//!   pushes are acknowledged here and published on a `watch` channel for
//!   the DNS proxy.
//!
//! Responses of those two types are not passed to Envoy.
//!
//! Otherwise this module does not interpret xDS (no ACK bookkeeping) and
//! does not authenticate Envoy: the socket's file mode is the access control.

use std::future::Future;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
pub use vmesh_proto::NAME_TABLE_TYPE;
use vmesh_proto::nds::NameTable;

use crate::backoff::BackoffPolicy;
use crate::health::HealthReport;
use crate::identity::Credentials;
use crate::upstream::Upstream;

/// Largest message relayed either way: a full push for a large mesh.
pub const MAX_MESSAGE: usize = 256 << 20;

/// Istio's type URL for a workload's health report.
pub use vmesh_proto::HEALTH_INFORMATION_TYPE;

/// How an unacknowledged health report is repeated.
const HEALTH_RETRY: BackoffPolicy = BackoffPolicy {
    initial: std::time::Duration::from_secs(1),
    max: std::time::Duration::from_secs(30),
    jitter: 0.2,
};

struct Inner {
    upstream: Upstream,
    credentials: watch::Receiver<Option<Arc<Credentials>>>,
    backoff: BackoffPolicy,
    /// Failed upstream attempts in a row, across Envoy's streams.
    failures: Mutex<u32>,
    shutdown: watch::Receiver<bool>,
    health: Option<watch::Receiver<Option<HealthReport>>>,
    names: Option<watch::Sender<Option<Arc<NameTable>>>>,
}

/// The ADS relay. Cloning is cheap.
#[derive(Clone)]
pub struct XdsProxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for XdsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsProxy")
            .field("upstream", &self.inner.upstream)
            .finish_non_exhaustive()
    }
}

impl XdsProxy {
    /// Relays to `upstream`, presenting the latest of `credentials`;
    /// streams end when `shutdown` turns true.
    pub fn new(
        upstream: Upstream,
        credentials: watch::Receiver<Option<Arc<Credentials>>>,
        backoff: BackoffPolicy,
        shutdown: watch::Receiver<bool>,
    ) -> XdsProxy {
        XdsProxy {
            inner: Arc::new(Inner {
                upstream,
                credentials,
                backoff,
                failures: Mutex::new(0),
                shutdown,
                health: None,
                names: None,
            }),
        }
    }

    /// The same relay, also subscribing to the DNS name table and
    /// publishing each one the control plane pushes on `tables`. Must be
    /// called before the relay is cloned or served.
    pub fn with_name_table(mut self, tables: watch::Sender<Option<Arc<NameTable>>>) -> XdsProxy {
        Arc::get_mut(&mut self.inner)
            .expect("with_name_table before the relay is shared")
            .names = Some(tables);
        self
    }

    /// The same relay, also reporting the workload's health from `reports`.
    /// Must be called before the relay is cloned or served.
    pub fn with_health(mut self, reports: watch::Receiver<Option<HealthReport>>) -> XdsProxy {
        Arc::get_mut(&mut self.inner)
            .expect("with_health before the relay is shared")
            .health = Some(reports);
        self
    }

    /// The tonic service, for a server of the caller's.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<XdsProxy> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a relay gave up before an upstream stream was open.
enum Gone {
    /// Envoy went away or the agent is shutting down.
    Quiet,
    /// Shutting down, and Envoy should hear it.
    ShuttingDown,
}

impl Inner {
    /// Waits for credentials and a connected channel, retrying with
    /// backoff; gives up only when Envoy leaves or the agent stops.
    async fn connect<T>(
        &self,
        out: &mpsc::Sender<Result<T, Status>>,
    ) -> Result<(Channel, Arc<Credentials>), Gone> {
        let mut shutdown = self.shutdown.clone();
        let mut credentials = self.credentials.clone();
        loop {
            let failures = *self.failures.lock();
            if failures > 0 {
                let delay = self.backoff.delay(failures - 1, fastrand::f64());
                tokio::select! {
                    () = crate::stopped(&mut shutdown) => return Err(Gone::ShuttingDown),
                    () = out.closed() => return Err(Gone::Quiet),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            let creds = tokio::select! {
                () = crate::stopped(&mut shutdown) => return Err(Gone::ShuttingDown),
                () = out.closed() => return Err(Gone::Quiet),
                creds = credentials.wait_for(Option::is_some) => match creds {
                    Ok(creds) => creds.clone().expect("waited for Some"),
                    Err(_) => return Err(Gone::ShuttingDown),
                },
            };
            let attempt = tokio::select! {
                () = crate::stopped(&mut shutdown) => return Err(Gone::ShuttingDown),
                () = out.closed() => return Err(Gone::Quiet),
                attempt = self.upstream.channel(Some(&creds), true) => attempt,
            };
            match attempt {
                Ok(channel) => return Ok((channel, creds)),
                Err(e) => {
                    let mut failures = self.failures.lock();
                    *failures = failures.saturating_add(1);
                    tracing::warn!(upstream = self.upstream.address(), failures = *failures, error = %crate::error_chain(&e), "cannot reach the control plane for xDS");
                }
            }
        }
    }
}

/// Relays one Envoy stream. `open` starts the upstream call on a client
/// with a stream of requests.
async fn relay<Req, Resp, F, Fut>(
    inner: Arc<Inner>,
    mut downstream: Streaming<Req>,
    out: mpsc::Sender<Result<Resp, Status>>,
    open: F,
) where
    Req: AgentRequest + Send + 'static,
    Resp: AgentResponse + Send + 'static,
    F: FnOnce(AggregatedDiscoveryServiceClient<Channel>, ReceiverStream<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Streaming<Resp>>, Status>>,
{
    let (channel, creds) = match inner.connect(&out).await {
        Ok(connected) => connected,
        Err(Gone::Quiet) => return,
        Err(Gone::ShuttingDown) => {
            let _ = out.try_send(Err(Status::unavailable("the agent is shutting down")));
            return;
        }
    };
    tracing::debug!(
        upstream = inner.upstream.address(),
        serial = creds.serial(),
        "xDS stream relayed upstream"
    );
    let (requests, upstream_requests) = mpsc::channel::<Req>(16);
    let (forwarded_first, first_forwarded) = watch::channel(false);
    let (health_acked, acked) = watch::channel(0u64);
    let _own_requests = AbortOnDrop(tokio::spawn(agent_requests(
        inner.clone(),
        requests.clone(),
        first_forwarded,
        acked,
    )));
    let acks = requests.clone();
    // Envoy → control plane. Ends (closing the upstream's request side)
    // when Envoy ends its side.
    let _pump = AbortOnDrop(tokio::spawn(async move {
        loop {
            match downstream.message().await {
                Ok(Some(request)) => {
                    if requests.send(request).await.is_err() {
                        return;
                    }
                    forwarded_first.send_replace(true);
                }
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(%status, "Envoy's xDS stream ended");
                    return;
                }
            }
        }
    }));
    let client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut shutdown = inner.shutdown.clone();
    let call = tokio::select! {
        () = crate::stopped(&mut shutdown) => {
            let _ = out.try_send(Err(Status::unavailable("the agent is shutting down")));
            return;
        }
        () = out.closed() => return,
        call = open(client, ReceiverStream::new(upstream_requests)) => call,
    };
    let mut responses = match call {
        Ok(responses) => responses.into_inner(),
        Err(status) => {
            *inner.failures.lock() += 1;
            tracing::warn!(%status, "the control plane refused the xDS stream");
            let _ = out.send(Err(status)).await;
            return;
        }
    };
    let mut relayed = false;
    loop {
        tokio::select! {
            () = crate::stopped(&mut shutdown) => {
                let _ = out.try_send(Err(Status::unavailable("the agent is shutting down")));
                return;
            }
            () = out.closed() => return,
            response = responses.message() => match response {
                Ok(Some(response)) => {
                    if !relayed {
                        relayed = true;
                        *inner.failures.lock() = 0;
                    }
                    if let Some(sequence) = response.health_sequence() {
                        health_acked.send_if_modified(|acked| {
                            let newer = sequence > *acked;
                            *acked = (*acked).max(sequence);
                            newer
                        });
                        continue;
                    }
                    if let Some(any) = response.name_table() {
                        let accepted = match NameTable::decode(any.value.as_slice()) {
                            Ok(table) => {
                                tracing::debug!(names = table.table.len(), "DNS name table received");
                                if let Some(tables) = &inner.names {
                                    tables.send_replace(Some(Arc::new(table)));
                                }
                                Ok(())
                            }
                            Err(e) => Err(format!("undecodable NameTable: {e}")),
                        };
                        let _ = acks.send(Req::from(response.name_table_ack(accepted.err()))).await;
                        continue;
                    }
                    if out.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    tracing::info!("the control plane ended the xDS stream; Envoy will reconnect");
                    let _ = out.send(Err(Status::unavailable("the control plane ended the stream"))).await;
                    return;
                }
                Err(status) => {
                    if !relayed {
                        *inner.failures.lock() += 1;
                    }
                    tracing::warn!(%status, "upstream xDS stream failed; Envoy will reconnect");
                    let _ = out.send(Err(status)).await;
                    return;
                }
            }
        }
    }
}

/// The nonce that names a health report, and its acknowledgement.
fn health_nonce(sequence: u64) -> String {
    format!("health-{sequence}")
}

fn sequence_of(type_url: &str, nonce: &str) -> Option<u64> {
    if type_url != HEALTH_INFORMATION_TYPE {
        return None;
    }
    nonce.strip_prefix("health-")?.parse().ok()
}

fn health_error(report: &HealthReport) -> Option<RpcStatus> {
    (!report.healthy).then(|| RpcStatus {
        code: 500,
        message: report.message.clone(),
        details: Vec::new(),
    })
}

/// The requests the agent adds, as each protocol carries them.
trait AgentRequest: Sized + From<TableAck> {
    fn health_request(report: &HealthReport) -> Self;
    /// Every name table the control plane has.
    fn name_table_subscription() -> Self;
}

/// How the agent recognises the responses meant for it, and answers them.
trait AgentResponse {
    /// The report this response acknowledges, if it is an acknowledgement.
    fn health_sequence(&self) -> Option<u64>;
    /// The name table this response carries, if it carries one.
    fn name_table(&self) -> Option<&Any>;
    /// The ACK (or NACK, with the reason) of this name table push.
    fn name_table_ack(&self, refused: Option<String>) -> TableAck;
}

/// An answer to a name table push, in protocol-neutral form.
struct TableAck {
    version: String,
    nonce: String,
    refused: Option<String>,
}

impl TableAck {
    fn error(&self) -> Option<RpcStatus> {
        self.refused.as_ref().map(|message| RpcStatus {
            code: 3,
            message: message.clone(),
            details: Vec::new(),
        })
    }
}

impl From<TableAck> for DiscoveryRequest {
    fn from(ack: TableAck) -> Self {
        DiscoveryRequest {
            type_url: NAME_TABLE_TYPE.into(),
            error_detail: ack.error(),
            version_info: ack.version,
            response_nonce: ack.nonce,
            ..Default::default()
        }
    }
}

impl From<TableAck> for DeltaDiscoveryRequest {
    fn from(ack: TableAck) -> Self {
        DeltaDiscoveryRequest {
            type_url: NAME_TABLE_TYPE.into(),
            error_detail: ack.error(),
            response_nonce: ack.nonce,
            ..Default::default()
        }
    }
}

impl AgentRequest for DiscoveryRequest {
    fn health_request(report: &HealthReport) -> Self {
        DiscoveryRequest {
            type_url: HEALTH_INFORMATION_TYPE.into(),
            response_nonce: health_nonce(report.sequence),
            error_detail: health_error(report),
            ..Default::default()
        }
    }
    fn name_table_subscription() -> Self {
        DiscoveryRequest {
            type_url: NAME_TABLE_TYPE.into(),
            ..Default::default()
        }
    }
}

impl AgentRequest for DeltaDiscoveryRequest {
    fn health_request(report: &HealthReport) -> Self {
        DeltaDiscoveryRequest {
            type_url: HEALTH_INFORMATION_TYPE.into(),
            response_nonce: health_nonce(report.sequence),
            error_detail: health_error(report),
            ..Default::default()
        }
    }
    fn name_table_subscription() -> Self {
        DeltaDiscoveryRequest {
            type_url: NAME_TABLE_TYPE.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        }
    }
}

impl AgentResponse for DiscoveryResponse {
    fn health_sequence(&self) -> Option<u64> {
        sequence_of(&self.type_url, &self.nonce)
    }
    fn name_table(&self) -> Option<&Any> {
        (self.type_url == NAME_TABLE_TYPE)
            .then(|| self.resources.first())
            .flatten()
    }
    fn name_table_ack(&self, refused: Option<String>) -> TableAck {
        TableAck {
            version: self.version_info.clone(),
            nonce: self.nonce.clone(),
            refused,
        }
    }
}

impl AgentResponse for DeltaDiscoveryResponse {
    fn health_sequence(&self) -> Option<u64> {
        sequence_of(&self.type_url, &self.nonce)
    }
    fn name_table(&self) -> Option<&Any> {
        (self.type_url == NAME_TABLE_TYPE)
            .then(|| self.resources.first()?.resource.as_ref())
            .flatten()
    }
    fn name_table_ack(&self, refused: Option<String>) -> TableAck {
        TableAck {
            version: self.system_version_info.clone(),
            nonce: self.nonce.clone(),
            refused,
        }
    }
}

/// The agent's own requests on a stream, once Envoy's first request has
/// gone: the name table subscription, then health reports.
async fn agent_requests<Req: AgentRequest>(
    inner: Arc<Inner>,
    requests: mpsc::Sender<Req>,
    mut first_forwarded: watch::Receiver<bool>,
    acked: watch::Receiver<u64>,
) {
    if first_forwarded.wait_for(|sent| *sent).await.is_err() {
        return;
    }
    if inner.names.is_some() && requests.send(Req::name_table_subscription()).await.is_err() {
        return;
    }
    if let Some(reports) = inner.health.clone() {
        report_health(reports, requests, acked).await;
    }
}

/// Sends the latest health report upstream and repeats it with backoff
/// until acknowledged; a newer report replaces it.
async fn report_health<Req: AgentRequest>(
    mut reports: watch::Receiver<Option<HealthReport>>,
    requests: mpsc::Sender<Req>,
    mut acked: watch::Receiver<u64>,
) {
    'reports: loop {
        let report = reports.borrow_and_update().clone();
        if let Some(report) = report {
            let mut attempt = 0;
            while *acked.borrow() < report.sequence {
                if requests.send(Req::health_request(&report)).await.is_err() {
                    return;
                }
                let delay = HEALTH_RETRY.delay(attempt, fastrand::f64());
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    done = acked.wait_for(|acked| *acked >= report.sequence) => {
                        if done.is_err() {
                            return;
                        }
                    }
                    changed = reports.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue 'reports;
                    }
                    () = tokio::time::sleep(delay) => {
                        tracing::debug!(sequence = report.sequence, "health report not acknowledged yet; sending it again");
                    }
                }
            }
        }
        if reports.changed().await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsProxy {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (out, rx) = mpsc::channel(16);
        tokio::spawn(relay(
            self.inner.clone(),
            request.into_inner(),
            out,
            |mut client, requests| async move { client.stream_aggregated_resources(requests).await },
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (out, rx) = mpsc::channel(16);
        tokio::spawn(relay(
            self.inner.clone(),
            request.into_inner(),
            out,
            |mut client, requests| async move { client.delta_aggregated_resources(requests).await },
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
