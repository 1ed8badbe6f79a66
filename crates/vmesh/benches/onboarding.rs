//! Onboarding time, measured in one run with real Envoy: from `vmesh agent`
//! starting on a freshly onboarded VM (files from `vmesh workload entry
//! configure --autoregister`, placed by the generated `install.sh`, traffic
//! captured) to the first request a client's sidecar gets answered by that VM
//! over mTLS. Then the same after a restart, with the certificate on disk.
//! Target: under 1 s, Envoy's start included.
//!
//! Needs root (network namespaces), like the end-to-end tests.
//! Run with `cargo bench -p vmesh --bench onboarding`.

// A benchmark measures wall-clock time, across processes.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use vmesh_testkit::mesh::capture_service_range;
use vmesh_testkit::netns::link;
use vmesh_testkit::testing::{envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

const HOST: &str = "payment-service.vm-workloads.svc.cluster.local";

/// Polls through the client's sidecar every 10 ms until the VM answers.
fn until_served(client: &Namespace, url: &str, started: Instant) -> Duration {
    loop {
        if vmesh_testkit::http::status(client, "GET", url, Duration::from_secs(1)) == Some(200) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the VM never answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let server = Namespace::new(&format!("vmesh-ocp-{id}"));
    let client = Namespace::new(&format!("vmesh-ocl-{id}"));
    let vm = Namespace::new(&format!("vmesh-ovm-{id}"));
    link(
        &client,
        "10.49.1.1",
        &server,
        "10.49.1.2",
        &format!("c{id}"),
    )
    .unwrap();
    link(&vm, "10.49.0.2", &server, "10.49.0.1", &format!("v{id}")).unwrap();
    client.run(&["ip", "route", "add", "10.49.0.0/24", "via", "10.49.1.2"]);
    vm.run(&["ip", "route", "add", "10.49.1.0/24", "via", "10.49.0.1"]);
    server.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let mesh = Mesh::new(VMESH, &server, dir.path()).with_envoy(&envoy_binary());
    mesh.start_server(
        &server,
        &[
            "--xds-addr",
            "0.0.0.0:15012",
            "--auto-registration-grace",
            "1s",
        ],
    )
    .unwrap();
    mesh.cli(&["create", "namespace", "vm-workloads"]).unwrap();
    mesh.cli(&["create", "namespace", "frontend"]).unwrap();
    mesh.apply(
        "mesh.yaml",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: payment-vms, namespace: vm-workloads}\n\
         spec: {metadata: {labels: {app: payment-service}}, template: {serviceAccount: payment-service-sa, ports: {http: 8080}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: payment-service, namespace: vm-workloads}\n\
         spec: {selector: {app: payment-service}, ports: [{name: http, port: 8080}]}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: vm-workloads}\n\
         spec: {mtls: {mode: STRICT}}\n",
    )
    .unwrap();

    // The client: its sidecar, with the service range captured.
    capture_service_range(&client, "10.49.1.1").unwrap();
    mesh.start_agent(
        &client,
        "10.49.1.2:15012",
        "frontend",
        "frontend-sa",
        "10.49.1.1",
        &["--label", "app=frontend"],
        81,
    )
    .unwrap();
    let vip = mesh.vip_of(HOST).unwrap();
    let url = format!("http://{vip}:8080/api/payments/1");

    // The VM: its application, and its onboarding files installed.
    vm.spawn(
        &[
            VMESH,
            "demo-app",
            "--addr",
            "127.0.0.1:8080",
            "--name",
            "vm1",
        ],
        &dir.path().join("app.log"),
    )
    .unwrap();
    let root = mesh
        .onboard("payment-vms", "vm-workloads", "10.49.0.1")
        .unwrap();

    let started = Instant::now();
    let agent = mesh
        .start_onboarded_agent(&vm, &root, vm.name(), "10.49.0.2", 0, &[])
        .unwrap();
    let first = until_served(&client, &url, started);

    // A restart: the certificate is on disk, the entry comes back.
    vm.stop(agent).unwrap();
    eventually("the entry gone", || {
        let output = mesh
            .cli_output(&["get", "we", "-n", "vm-workloads", "-o", "name"])
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .is_empty()
            .then_some(())
    });
    let started = Instant::now();
    mesh.start_onboarded_agent(&vm, &root, vm.name(), "10.49.0.2", 0, &[])
        .unwrap();
    let again = until_served(&client, &url, started);

    let target = Duration::from_secs(1);
    for (what, took) in [("first join", first), ("restart", again)] {
        println!(
            "agent start → first mTLS request served by the VM, {what:<10} {:>6.0} ms   target < {:.0} ms   ratio {:.3}",
            took.as_secs_f64() * 1e3,
            target.as_secs_f64() * 1e3,
            took.as_secs_f64() / target.as_secs_f64()
        );
    }
}
