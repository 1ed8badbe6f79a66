//! Mesh mTLS latency, measured in one run with real Envoy: requests from a
//! client through its sidecar to a VM's sidecar and application, with mutual
//! TLS between the two sidecars (port 8080, STRICT) and in plaintext between
//! the same two sidecars (port 8081: `portLevelMtls` DISABLE, DestinationRule
//! tls DISABLE), one after the other. Target: mTLS within 1.2× of plaintext.
//!
//! Needs root (network namespaces), like the end-to-end tests.
//! Run with `cargo bench -p vmesh --bench mtls`.

// A benchmark measures wall-clock time, across processes.
#![allow(clippy::disallowed_types)]

use std::time::Duration;

use vmesh_testkit::pair::SidecarPair;
use vmesh_testkit::testing::{envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

const REQUESTS: usize = 3000;
const HOST: &str = "payment-service.vm-workloads.svc.cluster.local";
const PLAIN_HOST: &str = "payment-plain.vm-workloads.svc.cluster.local";

/// The client sidecar's counter of TLS handshakes on one of its clusters.
fn client_handshakes(client: &Namespace, cluster: &str) -> u64 {
    let stats = client.run(&["curl", "-s", "http://127.0.0.1:15000/stats"]);
    let prefix = format!("cluster.{cluster}.ssl.handshake: ");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

/// `vmesh load` inside the client namespace, after a warm-up of 300 requests
/// (connections made, pools filled): latency in microseconds.
fn measure(mesh: &Mesh, client: &Namespace, url: &str) -> serde_json::Value {
    mesh.load(client, url, &["--requests", "300"]).unwrap();
    let requests = REQUESTS.to_string();
    let report = mesh.load(client, url, &["--requests", &requests]).unwrap();
    assert_eq!(
        report["codes"]["200"].as_u64(),
        Some(REQUESTS as u64),
        "every request answered: {report}"
    );
    report["latency_us"].clone()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let pair = SidecarPair::start(
        VMESH,
        &envoy_binary(),
        dir.path(),
        "b",
        61,
        &[8080, 8081],
        "apiVersion: v1\nkind: Service\nmetadata: {name: payment-service, namespace: vm-workloads}\n\
         spec: {selector: {app: payment-service}, ports: [{name: http, port: 8080}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: payment-plain, namespace: vm-workloads}\n\
         spec: {selector: {app: payment-service}, ports: [{name: http, port: 8081}]}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: payment-plain, namespace: vm-workloads}\n\
         spec: {host: payment-plain.vm-workloads.svc.cluster.local, trafficPolicy: {tls: {mode: DISABLE}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: payment-vm, namespace: vm-workloads}\n\
         spec: {address: 10.46.0.2, serviceAccount: payment-service-sa, labels: {app: payment-service, security.istio.io/tlsMode: istio}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: vm-workloads}\n\
         spec: {mtls: {mode: STRICT}, portLevelMtls: {8081: {mode: DISABLE}}}\n",
    )
    .unwrap();
    let (mesh, client) = (&pair.mesh, &pair.client);
    let mtls_url = format!("http://{}:8080/api/payments/1", mesh.vip_of(HOST).unwrap());
    let plain_url = format!(
        "http://{}:8081/api/payments/1",
        mesh.vip_of(PLAIN_HOST).unwrap()
    );
    let ok = |url: &str| {
        let status = vmesh_testkit::http::status(client, "GET", url, Duration::from_secs(10));
        (status == Some(200)).then_some(())
    };
    eventually("mTLS between the sidecars", || ok(&mtls_url));
    eventually("plaintext between the sidecars", || ok(&plain_url));

    let mtls_cluster = format!("outbound|8080||{HOST}");
    let plain_cluster = format!("outbound|8081||{PLAIN_HOST}");
    let mtls = measure(mesh, client, &mtls_url);
    assert!(
        client_handshakes(client, &mtls_cluster) > 0,
        "mTLS requests used TLS"
    );
    let plaintext = measure(mesh, client, &plain_url);
    assert_eq!(
        client_handshakes(client, &plain_cluster),
        0,
        "plaintext requests used no TLS"
    );

    let ratio = |field: &str| mtls[field].as_f64().unwrap() / plaintext[field].as_f64().unwrap();
    for (name, latency) in [("mTLS", &mtls), ("plaintext", &plaintext)] {
        println!(
            "{name:<10} {REQUESTS} requests through two sidecars: mean {:>6} µs  p50 {:>6} µs  p99 {:>6} µs",
            latency["mean"], latency["p50"], latency["p99"]
        );
    }
    println!(
        "mTLS / plaintext latency: mean {:.3}, p50 {:.3}, p99 {:.3}   target ≤ 1.2",
        ratio("mean"),
        ratio("p50"),
        ratio("p99")
    );
}
