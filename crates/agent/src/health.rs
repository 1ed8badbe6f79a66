//! The workload's readiness probe, as Kubernetes runs one: the
//! WorkloadGroup's `probe` (`httpGet`, `tcpSocket`, `exec`, `grpc`) every
//! `periodSeconds` after `initialDelaySeconds`, each try bounded by
//! `timeoutSeconds`; the workload turns healthy after `successThreshold`
//! passes in a row and unhealthy after `failureThreshold` failures in a row.
//!
//! Only transitions are published, on a `watch` channel of
//! [`HealthReport`]s ([`HealthPublisher`]); the xDS relay carries them to the
//! control plane. When the agent shuts down it publishes a last, unhealthy
//! report ([`HealthPublisher::drain`]), so the workload leaves every
//! client's endpoints before its sidecar goes; the probe is silent after it.
//! This module does not talk to the control plane and does not decide what
//! an unhealthy workload means for traffic.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vmesh_api::kinds::workload_group::ReadinessProbe;

/// Kubernetes' defaults for the probe's timing fields.
const DEFAULT_PERIOD: u32 = 10;
const DEFAULT_TIMEOUT: u32 = 1;
const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Where probes go when the probe names no host: the workload on this machine.
const DEFAULT_HOST: &str = "127.0.0.1";

/// The workload's health, as last decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// Counts transitions, so that an acknowledgement names the report it answers.
    pub sequence: u64,
    pub healthy: bool,
    /// Why the last failing try failed; empty when healthy.
    pub message: String,
}

/// Why a probe is not runnable.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the probe has no httpGet, tcpSocket, exec or grpc")]
    Empty,
    #[error("the probe's exec command is empty")]
    EmptyCommand,
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// One try of the probe.
enum Check {
    Http {
        client: reqwest::Client,
        url: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: String,
        port: u16,
    },
    Exec {
        command: Vec<String>,
        /// The user the command runs as (the proxy user, not the agent's root).
        user: Option<u32>,
    },
    Grpc {
        endpoint: String,
        service: String,
    },
}

/// A probe ready to run.
pub struct Prober {
    check: Check,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("period", &self.period)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn seconds(value: Option<u32>, default: u32) -> Duration {
    Duration::from_secs(value.filter(|v| *v > 0).unwrap_or(default).into())
}

/// `host:port` with brackets for IPv6.
fn authority(host: &str, port: u32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Prober {
    pub fn new(probe: &ReadinessProbe) -> Result<Prober, ProbeError> {
        let timeout = seconds(probe.timeout_seconds, DEFAULT_TIMEOUT);
        let check = if let Some(http) = &probe.http_get {
            let scheme = http
                .scheme
                .as_deref()
                .unwrap_or("HTTP")
                .to_ascii_lowercase();
            let host = http.host.as_deref().unwrap_or(DEFAULT_HOST);
            let path = http.path.as_deref().unwrap_or("/");
            // Kubernetes does not verify an HTTPS probe's certificate either:
            // the probe asks whether the application answers, not who it is.
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .danger_accept_invalid_certs(true)
                .redirect(reqwest::redirect::Policy::none())
                // Each try on a fresh connection, as Kubernetes probes: a
                // kept-alive one proves less about the application.
                .pool_max_idle_per_host(0)
                .build()?;
            Check::Http {
                client,
                url: format!("{scheme}://{}{path}", authority(host, http.port)),
                headers: http
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            Check::Tcp {
                host: tcp.host.clone().unwrap_or_else(|| DEFAULT_HOST.into()),
                port: u16::try_from(tcp.port).unwrap_or(0),
            }
        } else if let Some(exec) = &probe.exec {
            if exec.command.is_empty() {
                return Err(ProbeError::EmptyCommand);
            }
            Check::Exec {
                command: exec.command.clone(),
                user: None,
            }
        } else if let Some(grpc) = &probe.grpc {
            Check::Grpc {
                endpoint: format!("http://{}", authority(DEFAULT_HOST, grpc.port)),
                service: grpc.service.clone().unwrap_or_default(),
            }
        } else {
            return Err(ProbeError::Empty);
        };
        Ok(Prober {
            check,
            initial_delay: Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).into()),
            period: seconds(probe.period_seconds, DEFAULT_PERIOD),
            timeout,
            success_threshold: probe
                .success_threshold
                .filter(|v| *v > 0)
                .unwrap_or(DEFAULT_SUCCESS_THRESHOLD),
            failure_threshold: probe
                .failure_threshold
                .filter(|v| *v > 0)
                .unwrap_or(DEFAULT_FAILURE_THRESHOLD),
        })
    }

    /// Runs an `exec` probe's command as `uid` (and its group), as Istio
    /// runs it as the proxy user: the group's author does not get root.
    pub fn run_as(mut self, uid: u32) -> Prober {
        if let Check::Exec { user, .. } = &mut self.check {
            *user = Some(uid);
        }
        self
    }

    /// One try: `Ok` if the workload passed, else why not.
    pub async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.try_once()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    async fn try_once(&self) -> Result<(), String> {
        match &self.check {
            Check::Http {
                client,
                url,
                headers,
            } => {
                let mut request = client.get(url);
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| format!("GET {url}: {}", crate::error_chain(&e)))?;
                let status = response.status();
                // Kubernetes: 200 to 399 passes.
                if (200..400).contains(&status.as_u16()) {
                    Ok(())
                } else {
                    Err(format!("GET {url}: HTTP {status}"))
                }
            }
            Check::Tcp { host, port } => {
                let target = authority(host, u32::from(*port));
                tokio::net::TcpStream::connect(&target)
                    .await
                    .map(drop)
                    .map_err(|e| format!("connecting to {target}: {e}"))
            }
            Check::Exec { command, user } => {
                let mut run = crate::child::bound_to_agent(&command[0]);
                run.args(&command[1..])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true);
                if let Some(uid) = user {
                    run.uid(*uid).gid(*uid);
                }
                let output = run
                    .output()
                    .await
                    .map_err(|e| format!("running {}: {e}", command[0]))?;
                if output.status.success() {
                    Ok(())
                } else {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    Err(format!(
                        "{} exited with {}: {}",
                        command[0],
                        output.status,
                        stderr.trim()
                    ))
                }
            }
            Check::Grpc { endpoint, service } => grpc_check(endpoint, service).await,
        }
    }

    /// Runs the probe until `shutdown`, publishing each transition (the
    /// first decision included) through `publish`.
    pub fn spawn(self, publish: HealthPublisher, shutdown: watch::Receiver<bool>) {
        tokio::spawn(self.run(publish, shutdown));
    }

    async fn run(self, publish: HealthPublisher, mut shutdown: watch::Receiver<bool>) {
        let prober = Arc::new(self);
        tokio::select! {
            () = crate::stopped(&mut shutdown) => return,
            () = tokio::time::sleep(prober.initial_delay) => {}
        }
        let mut ticks = tokio::time::interval(prober.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tally = Tally::default();
        loop {
            tokio::select! {
                () = crate::stopped(&mut shutdown) => return,
                _ = ticks.tick() => {}
            }
            let result = prober.check().await;
            if let Some((healthy, message)) =
                tally.record(result, prober.success_threshold, prober.failure_threshold)
            {
                tracing::info!(healthy, %message, "workload health changed");
                publish.publish(healthy, message);
            }
        }
    }
}

/// Where health reports are published: the probe's verdicts, then the
/// agent's own at shutdown. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct HealthPublisher {
    reports: watch::Sender<Option<HealthReport>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for HealthPublisher {
    fn default() -> Self {
        HealthPublisher {
            reports: watch::channel(None).0,
            draining: Arc::default(),
        }
    }
}

impl HealthPublisher {
    /// The reports, as published.
    pub fn subscribe(&self) -> watch::Receiver<Option<HealthReport>> {
        self.reports.subscribe()
    }

    /// A verdict; ignored once draining.
    pub fn publish(&self, healthy: bool, message: String) {
        self.send(healthy, message, false);
    }

    /// The workload is going away: unhealthy from now on, whatever the probe says.
    pub fn drain(&self, why: &str) {
        self.send(false, why.to_string(), true);
    }

    /// Publishes under the channel's lock, so a verdict racing a drain
    /// cannot land after it.
    fn send(&self, healthy: bool, message: String, drain: bool) {
        use std::sync::atomic::Ordering;
        self.reports.send_if_modified(|report| {
            if drain {
                self.draining.store(true, Ordering::SeqCst);
            } else if self.draining.load(Ordering::SeqCst) {
                return false;
            }
            let sequence = report.as_ref().map_or(1, |r| r.sequence + 1);
            *report = Some(HealthReport {
                sequence,
                healthy,
                message,
            });
            true
        });
    }
}

/// `grpc.health.v1.Health/Check`: passes when the service is SERVING.
async fn grpc_check(endpoint: &str, service: &str) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| format!("{endpoint}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connecting to {endpoint}: {}", crate::error_chain(&e)))?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|status| format!("gRPC health check: {status}"))?;
    let status = response.into_inner().status();
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("gRPC health check: {}", status.as_str_name()))
    }
}

/// Consecutive passes and failures, and the last decision.
#[derive(Debug, Default)]
struct Tally {
    passes: u32,
    failures: u32,
    healthy: Option<bool>,
}

impl Tally {
    /// Counts one try; returns the new decision when it changes.
    fn record(
        &mut self,
        result: Result<(), String>,
        success_threshold: u32,
        failure_threshold: u32,
    ) -> Option<(bool, String)> {
        match result {
            Ok(()) => {
                self.failures = 0;
                self.passes = self.passes.saturating_add(1);
                (self.passes >= success_threshold && self.healthy != Some(true)).then(|| {
                    self.healthy = Some(true);
                    (true, String::new())
                })
            }
            Err(message) => {
                self.passes = 0;
                self.failures = self.failures.saturating_add(1);
                (self.failures >= failure_threshold && self.healthy != Some(false)).then(|| {
                    self.healthy = Some(false);
                    (false, message)
                })
            }
        }
    }
}

/// What the probe checks, in a few words (for logs).
pub fn describe(probe: &ReadinessProbe) -> String {
    if let Some(http) = &probe.http_get {
        format!(
            "GET {}{}",
            authority(http.host.as_deref().unwrap_or(DEFAULT_HOST), http.port),
            http.path.as_deref().unwrap_or("/")
        )
    } else if let Some(tcp) = &probe.tcp_socket {
        format!(
            "TCP {}",
            authority(tcp.host.as_deref().unwrap_or(DEFAULT_HOST), tcp.port)
        )
    } else if let Some(exec) = &probe.exec {
        format!("exec {}", exec.command.join(" "))
    } else if let Some(grpc) = &probe.grpc {
        format!("gRPC {}", authority(DEFAULT_HOST, grpc.port))
    } else {
        "nothing".into()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use vmesh_api::kinds::workload_group::{ExecHealthCheck, HttpHealthCheck, TcpHealthCheck};

    #[test]
    fn thresholds_decide_transitions_only() {
        let mut tally = Tally::default();
        let fail = || Err("down".to_string());
        assert_eq!(tally.record(fail(), 2, 3), None);
        assert_eq!(tally.record(fail(), 2, 3), None);
        assert_eq!(tally.record(fail(), 2, 3), Some((false, "down".into())));
        assert_eq!(tally.record(fail(), 2, 3), None, "no repeat");
        assert_eq!(tally.record(Ok(()), 2, 3), None);
        assert_eq!(tally.record(fail(), 2, 3), None, "a failure resets passes");
        assert_eq!(tally.record(Ok(()), 2, 3), None);
        assert_eq!(tally.record(Ok(()), 2, 3), Some((true, String::new())));
        assert_eq!(tally.record(Ok(()), 2, 3), None);
    }

    fn probe() -> ReadinessProbe {
        ReadinessProbe {
            timeout_seconds: Some(1),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn tcp_probe_passes_only_while_something_listens() {
        let tcp_probe = |port: u16| {
            Prober::new(&ReadinessProbe {
                tcp_socket: Some(TcpHealthCheck {
                    host: None,
                    port: port.into(),
                }),
                ..probe()
            })
            .unwrap()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tcp_probe(listener.local_addr().unwrap().port())
            .check()
            .await
            .unwrap();
        // A port bound but not listening refuses connections, and stays
        // ours: no other test can start listening there meanwhile.
        let closed = tokio::net::TcpSocket::new_v4().unwrap();
        closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = closed.local_addr().unwrap().port();
        let error = tcp_probe(port).check().await.unwrap_err();
        assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    }

    #[tokio::test]
    async fn http_probe_judges_the_status_code() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let answer = status.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let code = answer.load(std::sync::atomic::Ordering::SeqCst);
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let n = socket.read(&mut buf).await.unwrap();
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(request.starts_with("GET /ready "), "{request}");
                assert!(request.contains("x-probe: yes"), "{request}");
                let reply =
                    format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                socket.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let prober = Prober::new(&ReadinessProbe {
            http_get: Some(HttpHealthCheck {
                path: Some("/ready".into()),
                port: addr.port().into(),
                http_headers: Some(vec![vmesh_api::kinds::workload_group::HttpHeader {
                    name: "x-probe".into(),
                    value: "yes".into(),
                }]),
                ..Default::default()
            }),
            ..probe()
        })
        .unwrap();
        prober.check().await.unwrap();
        status.store(503, std::sync::atomic::Ordering::SeqCst);
        let error = prober.check().await.unwrap_err();
        assert!(error.contains("503"), "{error}");
    }

    #[tokio::test]
    async fn exec_probe_uses_the_exit_status_and_its_timeout() {
        let run = |command: &[&str]| {
            Prober::new(&ReadinessProbe {
                exec: Some(ExecHealthCheck {
                    command: command.iter().map(|s| s.to_string()).collect(),
                }),
                ..probe()
            })
            .unwrap()
        };
        run(&["true"]).check().await.unwrap();
        let error = run(&["sh", "-c", "echo broken >&2; exit 3"])
            .check()
            .await
            .unwrap_err();
        assert!(error.contains("broken"), "{error}");
        let error = run(&["sleep", "5"]).check().await.unwrap_err();
        assert!(error.contains("within"), "{error}");
        // As the proxy user, not the agent's root (needs root, as CI runs).
        let as_user = run(&[
            "sh",
            "-c",
            "test \"$(id -u)\" = 1337 || { id -u >&2; exit 1; }",
        ]);
        as_user.run_as(1337).check().await.unwrap();
    }

    #[tokio::test]
    async fn transitions_are_published_after_the_thresholds() {
        let prober = Prober::new(&ReadinessProbe {
            exec: Some(ExecHealthCheck {
                command: vec!["true".into()],
            }),
            period_seconds: Some(1),
            ..probe()
        })
        .unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let publisher = HealthPublisher::default();
        let mut reports = publisher.subscribe();
        prober.spawn(publisher.clone(), shutdown);
        reports.changed().await.unwrap();
        let report = reports.borrow_and_update().clone().unwrap();
        assert_eq!((report.sequence, report.healthy), (1, true));
        // Draining: unhealthy, and the probe's next verdicts are not published.
        publisher.drain("shutting down");
        let report = reports.borrow_and_update().clone().unwrap();
        assert_eq!((report.sequence, report.healthy), (2, false));
        publisher.publish(true, String::new());
        assert_eq!(reports.borrow().as_ref().unwrap().sequence, 2);
    }
}
