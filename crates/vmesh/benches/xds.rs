//! xDS push benchmark, measured in one run against the real `vmesh server`
//! binary: 1,000 Services × 3 WorkloadEntries, 1,000 simulated proxies on
//! delta ADS (the envoy-types client, subscribing as Envoy does: CDS and LDS
//! wildcard, then EDS for every cluster and RDS for the route it needs).
//!
//! One WorkloadEntry's address is changed with `vmesh apply`, several times;
//! for each change every proxy's ACK of the load assignment carrying the new
//! address is timed from the moment the apply started. Targets: p99 under
//! 1 s, the server under 300 MB resident.
//!
//! Run with `cargo bench -p vmesh --bench xds`.

// A benchmark measures wall-clock time, across processes.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use vmesh_testkit::LocalServer;

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
const SERVICES: usize = 1000;
const ENDPOINTS_PER_SERVICE: usize = 3;
const PROXIES: usize = 1000;
const CHANGES: usize = 5;
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// The endpoint the benchmark moves: the first of service 0.
const MOVED_CLUSTER: &str = "outbound|8080||svc-0.bench.svc.cluster.local";

fn endpoint_address(service: usize, endpoint: usize) -> String {
    let n = service * ENDPOINTS_PER_SERVICE + endpoint;
    format!("10.20.{}.{}", n / 250, n % 250 + 1)
}

fn workload_entry(service: usize, endpoint: usize, address: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: svc-{service}-{endpoint}\n  namespace: bench\nspec:\n  address: {address}\n  labels: {{app: svc-{service}}}\n  serviceAccount: svc-{service}\n"
    )
}

fn manifests() -> String {
    let mut text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n".to_string();
    for service in 0..SERVICES {
        text += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{service}\n  namespace: bench\nspec:\n  selector: {{app: svc-{service}}}\n  ports:\n  - name: http\n    port: 8080\n"
        );
        for endpoint in 0..ENDPOINTS_PER_SERVICE {
            text += &workload_entry(service, endpoint, &endpoint_address(service, endpoint));
        }
    }
    text
}

fn start_server(dir: &Path) -> LocalServer {
    LocalServer::start(
        Path::new(VMESH),
        &dir.join("data"),
        &["--xds-plaintext-addr", "127.0.0.1:0"],
        &[("VMESH_LOG", "warn")],
    )
    .expect("start server")
}

fn vmesh_apply(server: &LocalServer, path: &Path) {
    let output = server
        .command(&["apply", "-f"])
        .arg(path)
        .output()
        .expect("run vmesh apply");
    assert!(
        output.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A kernel figure for the server process, in MB (`VmRSS`, `VmHWM`).
fn memory_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: f64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .split_whitespace()
                .next()
        })
        .and_then(|v| v.parse().ok())
        .expect("memory field");
    kb / 1024.0
}

fn node(i: usize) -> Node {
    let service = i % SERVICES;
    let ip = endpoint_address(service, 1);
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    Node {
        id: format!("sidecar~{ip}~svc-{service}-1.bench~bench.svc.cluster.local"),
        metadata: Some(Struct {
            fields: HashMap::from([
                ("NAMESPACE".to_string(), string("bench")),
                (
                    "SERVICE_ACCOUNT".to_string(),
                    string(&format!("svc-{service}")),
                ),
            ]),
        }),
        ..Default::default()
    }
}

/// The address the moved endpoint has in a response, if the response carries its cluster.
fn moved_address(response: &DeltaDiscoveryResponse) -> Option<String> {
    let resource = response
        .resources
        .iter()
        .find(|r| r.name == MOVED_CLUSTER)?;
    let cla = ClusterLoadAssignment::decode(resource.resource.as_ref()?.value.as_slice()).ok()?;
    let addresses: Vec<String> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(e)) => {
                match e.address.as_ref()?.address.as_ref()? {
                    envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                        s,
                    ) => Some(s.address.clone()),
                    _ => None,
                }
            }
            _ => None,
        })
        .collect();
    addresses
        .iter()
        .find(|a| a.starts_with("10.30."))
        .or(addresses.first())
        .cloned()
}

/// What a simulated proxy reports: it is synced, or it ACKed the moved address.
enum Event {
    Synced,
    Reconnect(String),
    Acked { address: String, at: Instant },
}

/// One simulated Envoy: subscribes like Envoy, ACKs every response, and
/// reconnects after a short pause when its stream fails, as Envoy does.
async fn proxy(i: usize, endpoint: String, events: mpsc::UnboundedSender<Event>) {
    loop {
        match stream(i, &endpoint, &events).await {
            Ok(()) => return,
            Err(e) => {
                let _ = events.send(Event::Reconnect(format!("{e}")));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn stream(
    i: usize,
    endpoint: &str,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect()
        .await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (requests, rx) = mpsc::channel(16);
    let subscribe = |type_url: &str, names: Vec<String>| DeltaDiscoveryRequest {
        node: Some(node(i)),
        type_url: type_url.to_string(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    requests.send(subscribe(CLUSTER, vec![])).await?;
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut subscribed_eds = std::collections::BTreeSet::new();
    let mut listeners = false;
    let mut synced = false;
    while let Some(response) = responses.message().await? {
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        let moved = (response.type_url == ENDPOINT)
            .then(|| moved_address(&response))
            .flatten();
        requests.send(ack).await?;
        let at = Instant::now();
        match response.type_url.as_str() {
            // Like Envoy: EDS for every new cluster, then listeners once.
            CLUSTER => {
                let new: Vec<String> = response
                    .resources
                    .iter()
                    .filter(|r| subscribed_eds.insert(r.name.clone()))
                    .map(|r| r.name.clone())
                    .collect();
                if !new.is_empty() {
                    requests.send(subscribe(ENDPOINT, new)).await?;
                }
                if !listeners {
                    listeners = true;
                    requests.send(subscribe(LISTENER, vec![])).await?;
                }
            }
            LISTENER if response.resources.iter().any(|r| r.name == "0.0.0.0_8080") => {
                requests.send(subscribe(ROUTE, vec!["8080".into()])).await?;
            }
            _ => {}
        }
        // Synced once the moved endpoint's cluster has its endpoints.
        if !synced && moved.is_some() {
            synced = true;
            let _ = events.send(Event::Synced);
        }
        if let Some(address) = moved {
            let _ = events.send(Event::Acked { address, at });
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(dir.path());
    let all = dir.path().join("mesh.yaml");
    std::fs::write(&all, manifests()).expect("write manifests");
    let started = Instant::now();
    vmesh_apply(&server, &all);
    println!(
        "applied {SERVICES} Services and {} WorkloadEntries in {:.0} ms",
        SERVICES * ENDPOINTS_PER_SERVICE,
        ms(started.elapsed())
    );

    std::thread::sleep(Duration::from_millis(1500));
    let rss_applied = memory_mb(server.pid(), "VmRSS");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (events, mut received) = mpsc::unbounded_channel();
    let (_stop, stopped) = watch::channel(());
    let connect = Instant::now();
    let endpoint = format!("http://{}", server.xds_plaintext().expect("plaintext xDS"));
    for i in 0..PROXIES {
        let events = events.clone();
        let endpoint = endpoint.clone();
        let mut stopped = stopped.clone();
        runtime.spawn(async move {
            tokio::select! {
                () = proxy(i, endpoint, events) => {}
                _ = stopped.changed() => {}
            }
        });
    }
    let mut synced = 0;
    let mut reconnects = 0;
    let mut last_error = String::new();
    while synced < PROXIES {
        match runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(120), received.recv()).await
        }) {
            Ok(Some(Event::Synced)) => synced += 1,
            Ok(Some(Event::Reconnect(e))) => {
                reconnects += 1;
                last_error = e;
            }
            Ok(Some(Event::Acked { .. })) => {}
            _ => panic!("only {synced} of {PROXIES} proxies synced"),
        }
    }
    println!(
        "{PROXIES} proxies connected and synced in {:.0} ms ({reconnects} reconnects{})",
        ms(connect.elapsed()),
        if reconnects > 0 {
            format!(", last error: {last_error}")
        } else {
            String::new()
        }
    );
    let rss_synced = memory_mb(server.pid(), "VmRSS");

    let mut latencies = Vec::new();
    let mut slowest_change = Duration::ZERO;
    for change in 0..CHANGES {
        let address = format!("10.30.0.{}", change + 1);
        let path = dir.path().join(format!("change-{change}.yaml"));
        std::fs::write(&path, workload_entry(0, 0, &address)).expect("write change");
        // Let the previous change's debounce window close first.
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        vmesh_apply(&server, &path);
        let mut acked = 0;
        while acked < PROXIES {
            match runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), received.recv()).await
            }) {
                Ok(Some(Event::Acked { address: got, at })) if got == address => {
                    acked += 1;
                    let latency = at.duration_since(start);
                    slowest_change = slowest_change.max(latency);
                    latencies.push(latency);
                }
                Ok(Some(_)) => {}
                _ => {
                    panic!("change {change}: only {acked} of {PROXIES} proxies ACKed {address}")
                }
            }
        }
    }
    let rss = memory_mb(server.pid(), "VmRSS");
    let peak = memory_mb(server.pid(), "VmHWM");

    // The server's own view agrees: every proxy has ACKed what it was sent
    // (the last ACKs may still be in flight when the clients report).
    let server_synced = || -> usize {
        let syncz: Vec<serde_json::Value> = runtime.block_on(async {
            reqwest::get(format!("{}/debug/syncz", server.monitoring()))
                .await
                .expect("syncz")
                .json()
                .await
                .expect("syncz json")
        });
        syncz
            .iter()
            .filter(|p| {
                ["CDS", "EDS", "LDS", "RDS"]
                    .iter()
                    .all(|t| p["sync"][t] == "SYNCED")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut synced = server_synced();
    while synced < PROXIES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        synced = server_synced();
    }
    assert_eq!(
        synced, PROXIES,
        "proxies SYNCED on every type per the server"
    );

    latencies.sort();
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let target = Duration::from_secs(1);
    println!(
        "endpoint change → ACKed by all {PROXIES} proxies, {} samples over {CHANGES} changes:",
        latencies.len()
    );
    println!(
        "  p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms   target p99 < {:.0} ms   ratio {:.3}",
        ms(p50),
        ms(p99),
        ms(slowest_change),
        ms(target),
        p99.as_secs_f64() / target.as_secs_f64()
    );
    println!(
        "  server memory: {rss_applied:.0} MB resident before proxies connect, {rss_synced:.0} MB when synced, {rss:.0} MB after the changes, peak {peak:.0} MB   target < 300 MB   ratio {:.3}",
        peak / 300.0
    );
    let _ = std::io::stdout().flush();
    runtime.shutdown_background();
}
