//! The agent's status port (15020, as Istio's): `GET /healthz/ready` says
//! whether the sidecar is ready to carry traffic (the agent holds a
//! certificate and Envoy reports itself initialised), and
//! `GET /stats/prometheus` serves the agent's own metrics, Envoy's, then
//! Istio's standard metrics as the agent counted them
//! ([`crate::istio_metrics`]), so one scrape covers all. `GET /debug/dns` dumps the DNS
//! proxy's names and upstreams as JSON.
//!
//! [`wait_ready`] is the other side, for `vmesh agent wait`: it polls the
//! readiness path until the sidecar is ready.
//!
//! This module reads Envoy's admin port; it does not start or watch Envoy
//! ([`crate::envoy`] does, and counts restarts in [`Metrics`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agent::{AgentHandle, RunningDns};
use crate::health::HealthReport;
use crate::identity::IdentityHandle;
use vmesh_api::peer::OwnWorkload;

use crate::istio_metrics::IstioMetrics;

/// Where `vmesh agent wait` and an application's unit look.
pub const READY_PATH: &str = "/healthz/ready";
/// Istio's path for the merged metrics.
pub const METRICS_PATH: &str = "/stats/prometheus";
/// The DNS proxy's names and upstreams.
pub const DNS_DUMP_PATH: &str = "/debug/dns";
/// How long a question to Envoy's admin port may take.
const ENVOY_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the status port could not be served.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("binding the status port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the status port: {0}")]
    Serve(#[source] std::io::Error),
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Why [`wait_ready`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("the sidecar was not ready within {timeout:?}: {last}")]
    NotReady {
        timeout: Duration,
        /// The last answer (or failure to answer).
        last: String,
    },
}

/// Polls the status port at `status_addr` (loopback when it listens on
/// every address) until its readiness answers 200, or `timeout` passes.
pub async fn wait_ready(status_addr: SocketAddr, timeout: Duration) -> Result<(), WaitError> {
    let host = if status_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], status_addr.port()))
    } else {
        status_addr
    };
    let url = format!("http://{host}{READY_PATH}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .map_err(WaitError::Client)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while tokio::time::Instant::now() < deadline {
        match client.get(&url).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => last = response.text().await.unwrap_or_default().trim().to_string(),
            Err(e) => last = format!("{url}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(WaitError::NotReady { timeout, last })
}

/// The agent's own metrics. Counters are the caller's to increment; gauges
/// are read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Times Envoy died and was started again.
    pub envoy_restarts: Counter,
    certificate_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    workload_healthy: Gauge,
    scrapes: Counter,
}

struct Inner {
    envoy_admin: SocketAddr,
    identity: IdentityHandle,
    health: Option<watch::Receiver<Option<HealthReport>>>,
    dns: Option<RunningDns>,
    metrics: Metrics,
    registry: Registry,
    client: reqwest::Client,
    istio_metrics: Arc<IstioMetrics>,
    /// Filled into Istio's metrics where Envoy leaves the proxy's own.
    own: OwnWorkload,
}

/// The status port's state.
#[derive(Clone)]
pub struct StatusServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StatusServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusServer")
            .field("envoy_admin", &self.inner.envoy_admin)
            .finish_non_exhaustive()
    }
}

impl StatusServer {
    /// Reports on `agent` and the Envoy whose admin port is `envoy_admin`,
    /// a proxy of workload `own`.
    pub fn new(
        envoy_admin: SocketAddr,
        agent: &AgentHandle,
        metrics: Metrics,
        own: OwnWorkload,
    ) -> Result<StatusServer, StatusError> {
        let identity = agent.identity().clone();
        let health = agent.health();
        let dns = agent.dns().cloned();
        let mut registry = Registry::with_prefix("vmesh_agent");
        registry.register(
            "envoy_restarts",
            "Times Envoy died and the agent started it again",
            metrics.envoy_restarts.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the workload certificate expires (Unix time); 0 before the first",
            metrics.certificate_expiry.clone(),
        );
        if health.is_some() {
            registry.register(
                "workload_healthy",
                "1 when the readiness probe last found the workload healthy, else 0",
                metrics.workload_healthy.clone(),
            );
        }
        registry.register(
            "scrapes",
            "Scrapes of the merged metrics",
            metrics.scrapes.clone(),
        );
        if let Some(dns) = &dns {
            dns.metrics.register(&mut registry);
        }
        let client = reqwest::Client::builder().timeout(ENVOY_TIMEOUT).build()?;
        Ok(StatusServer {
            inner: Arc::new(Inner {
                envoy_admin,
                identity,
                health,
                dns,
                metrics,
                registry,
                client,
                istio_metrics: agent.istio_metrics(),
                own,
            }),
        })
    }

    /// Binds `addr`; serve the result with [`BoundStatus::serve`].
    pub async fn bind(self, addr: SocketAddr) -> Result<BoundStatus, StatusError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StatusError::Bind { addr, source })?;
        Ok(BoundStatus {
            server: self,
            listener,
        })
    }

    fn router(self) -> Router {
        Router::new()
            .route(READY_PATH, get(ready))
            .route(METRICS_PATH, get(metrics))
            .route(DNS_DUMP_PATH, get(dns_dump))
            .with_state(self)
    }

    /// Why the sidecar is not ready, if it is not.
    async fn not_ready(&self) -> Option<String> {
        if self.inner.identity.current().is_none() {
            return Some("no workload certificate yet".into());
        }
        let url = format!("http://{}/ready", self.inner.envoy_admin);
        match self.inner.client.get(&url).send().await {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => {
                let state = response.text().await.unwrap_or_default();
                Some(format!("Envoy is {}", state.trim()))
            }
            Err(e) => Some(format!(
                "Envoy's admin port {} does not answer: {}",
                self.inner.envoy_admin,
                crate::error_chain(&e)
            )),
        }
    }
}

/// A status port ready to serve.
#[derive(Debug)]
pub struct BoundStatus {
    server: StatusServer,
    listener: TcpListener,
}

impl BoundStatus {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) -> Result<(), StatusError> {
        axum::serve(
            self.listener,
            self.server
                .router()
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { crate::stopped(&mut shutdown).await })
        .await
        .map_err(StatusError::Serve)
    }
}

async fn ready(State(server): State<StatusServer>) -> Response {
    match server.not_ready().await {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// The DNS proxy's names are for the VM's own operator: loopback callers only.
async fn dns_dump(
    State(server): State<StatusServer>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
) -> Response {
    if !caller.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "the DNS dump answers loopback callers only\n",
        )
            .into_response();
    }
    let Some(dns) = &server.inner.dns else {
        return (StatusCode::NOT_FOUND, "the DNS proxy is off\n").into_response();
    };
    let index = dns.index.borrow().clone();
    let names: serde_json::Map<String, serde_json::Value> = index
        .entries()
        .into_iter()
        .map(|(name, addresses)| {
            let ips: Vec<String> = addresses
                .v4
                .iter()
                .map(ToString::to_string)
                .chain(addresses.v6.iter().map(ToString::to_string))
                .collect();
            (name.to_string(), serde_json::json!(ips))
        })
        .collect();
    axum::Json(serde_json::json!({
        "listen": dns.addrs,
        "upstreams": dns.upstreams,
        "search": dns.search,
        "names": names,
    }))
    .into_response()
}

async fn metrics(State(server): State<StatusServer>) -> Response {
    let inner = &server.inner;
    inner.metrics.scrapes.inc();
    let expiry = inner
        .identity
        .current()
        .and_then(|c| c.not_after().duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    inner.metrics.certificate_expiry.set(expiry);
    if let Some(health) = &inner.health {
        let healthy = health.borrow().as_ref().is_some_and(|r| r.healthy);
        inner.metrics.workload_healthy.set(i64::from(healthy));
    }
    let mut body = String::new();
    if let Err(e) = encode(&mut body, &inner.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    // OpenMetrics' end marker would end the scrape before Envoy's part.
    if let Some(kept) = body.strip_suffix("# EOF\n") {
        body.truncate(kept.len());
    }
    // Envoy's part: missing (and said so) while Envoy is down, so the
    // agent's own metrics still get through.
    let url = format!("http://{}/stats/prometheus", inner.envoy_admin);
    match inner.client.get(&url).send().await {
        Ok(response) if response.status().is_success() => {
            body.push_str(&response.text().await.unwrap_or_default());
        }
        Ok(response) => {
            body.push_str(&format!("# Envoy's metrics: HTTP {}\n", response.status()));
        }
        Err(e) => {
            body.push_str(&format!(
                "# Envoy's metrics unavailable: {}\n",
                crate::error_chain(&e)
            ));
        }
    }
    body.push_str(&inner.istio_metrics.render(&inner.own));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
