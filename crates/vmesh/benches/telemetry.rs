//! What Istio's metrics cost, measured in one run with real Envoy: HTTP
//! requests from a client through its sidecar to a VM's sidecar and
//! application over mutual TLS, through two such pairs side by side, one
//! with Istio's standard metrics on (the default: both sidecars count every
//! request into `istio_*` stats with their 25 labels) and one with them off
//! (a root-namespace Telemetry disabling ALL_METRICS), in rounds of
//! on-off-off-on (12 rounds of 4 s each) so that drift on this shared
//! machine falls on both alike; halfway the pairs swap roles, so that each
//! pair's own luck falls on both sides too. Reported:
//! requests per second, mean and p99 latency, the CPU per request of the
//! two Envoys and of the two agents (which count the metrics Envoy logs),
//! and the median over the rounds of each round's throughput loss.
//! Target: under 5 % fewer requests per second with metrics on.
//!
//! Needs root (network namespaces), like the end-to-end tests.
//! Run with `cargo bench -p vmesh --bench telemetry`.

// A benchmark measures wall-clock time, across processes.
#![allow(clippy::disallowed_types)]

use std::time::Duration;

use vmesh_testkit::pair::SidecarPair;
use vmesh_testkit::testing::{envoy_binary, eventually};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
const HOST: &str = "payment-service.vm-workloads.svc.cluster.local";
const ROUNDS: usize = 12;
/// Each measurement: this long, at this many requests in flight.
const SECONDS: &str = "4s";
const CONCURRENCY: &str = "8";

const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: payment-service, namespace: vm-workloads}
spec: {selector: {app: payment-service}, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: payment-vm, namespace: vm-workloads}
spec: {address: 10.46.0.2, serviceAccount: payment-service-sa, labels: {app: payment-service, version: v1}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

/// Istio's metrics off for the whole mesh.
const METRICS_OFF: &str = "\
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - overrides:
    - match: {metric: ALL_METRICS}
      disabled: true
";

/// The client sidecar's count of Istio's requests metric (0 when off).
fn counted(pair: &SidecarPair) -> u64 {
    let stats = pair
        .client
        .run(&["curl", "-s", "http://127.0.0.1:15020/stats/prometheus"]);
    stats
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

struct Run {
    per_second: f64,
    mean_us: f64,
    p99_us: f64,
    envoy_cpu_us_per_request: f64,
    agent_cpu_us_per_request: f64,
}

fn measure(pair: &SidecarPair, url: &str) -> Run {
    let cpu = pair.envoy_cpu_seconds();
    let agent_cpu = pair.agent_cpu_seconds();
    let report = pair
        .mesh
        .load(
            &pair.client,
            url,
            &["--duration", SECONDS, "--concurrency", CONCURRENCY],
        )
        .unwrap();
    let cpu = pair.envoy_cpu_seconds() - cpu;
    let agent_cpu = pair.agent_cpu_seconds() - agent_cpu;
    let requests = report["requests"].as_f64().unwrap();
    assert_eq!(
        report["codes"]["200"].as_f64(),
        Some(requests),
        "every request answered: {report}"
    );
    Run {
        per_second: report["per_second"].as_f64().unwrap(),
        mean_us: report["latency_us"]["mean"].as_f64().unwrap(),
        p99_us: report["latency_us"]["p99"].as_f64().unwrap(),
        envoy_cpu_us_per_request: cpu * 1e6 / requests,
        agent_cpu_us_per_request: agent_cpu * 1e6 / requests,
    }
}

fn mean(runs: &[Run], field: impl Fn(&Run) -> f64) -> f64 {
    runs.iter().map(field).sum::<f64>() / runs.len() as f64
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let start = |tag: &str, base_id: u32, objects: &str| {
        let work = dir.path().join(tag);
        std::fs::create_dir_all(&work).unwrap();
        let pair = SidecarPair::start(
            VMESH,
            &envoy_binary(),
            &work,
            tag,
            base_id,
            &[8080],
            objects,
        )
        .unwrap();
        let url = format!(
            "http://{}:8080/api/payments/1",
            pair.mesh.vip_of(HOST).unwrap()
        );
        eventually("mTLS between the sidecars", || {
            let status =
                vmesh_testkit::http::status(&pair.client, "GET", &url, Duration::from_secs(10));
            (status == Some(200)).then_some(())
        });
        // Connections made, pools filled.
        pair.mesh
            .load(
                &pair.client,
                &url,
                &["--requests", "1000", "--concurrency", CONCURRENCY],
            )
            .unwrap();
        (pair, url)
    };
    let first = start("ta", 71, MESH);
    let second = start("tb", 73, &format!("{MESH}{METRICS_OFF}"));
    let (mut on, mut off) = (Vec::new(), Vec::new());
    // What the clients counted while their metrics were on and off.
    let (mut counted_on, mut counted_off) = (0, 0);
    for half in 0..2 {
        if half == 1 {
            // The pairs swap roles, so that neither pair's own luck on this
            // machine counts for one side only.
            first.0.mesh.apply("metrics.yaml", METRICS_OFF).unwrap();
            second
                .0
                .mesh
                .cli(&["delete", "telemetry", "mesh-default", "-n", "istio-system"])
                .unwrap();
            // Longer than Envoy's log flush (1 s), after which the
            // metrics of what came before are all counted.
            std::thread::sleep(Duration::from_secs(3));
            for (pair, url) in [&first, &second] {
                pair.mesh
                    .load(
                        &pair.client,
                        url,
                        &["--requests", "1000", "--concurrency", CONCURRENCY],
                    )
                    .unwrap();
            }
        }
        let (with, without) = if half == 0 {
            (&first, &second)
        } else {
            (&second, &first)
        };
        for _ in 0..ROUNDS / 2 {
            for metrics_on in [true, false, false, true] {
                let (pair, url) = if metrics_on { with } else { without };
                let before = counted(pair);
                let run = measure(pair, url);
                let delta = counted(pair) - before;
                if metrics_on {
                    counted_on += delta;
                    on.push(run);
                } else {
                    counted_off += delta;
                    off.push(run);
                }
            }
        }
    }
    assert!(counted_on > 0, "metrics on: the clients counted requests");
    assert_eq!(counted_off, 0, "metrics off: nothing counted");
    for (name, runs) in [("metrics on", &on), ("metrics off", &off)] {
        println!(
            "{name:<12} {:>8.0} requests/s   mean {:>6.0} µs   p99 {:>6.0} µs   CPU per request (both sidecars): Envoy {:>5.1} µs, agent {:>4.2} µs",
            mean(runs, |r| r.per_second),
            mean(runs, |r| r.mean_us),
            mean(runs, |r| r.p99_us),
            mean(runs, |r| r.envoy_cpu_us_per_request),
            mean(runs, |r| r.agent_cpu_us_per_request),
        );
    }
    // Each round's loss (its two runs on against its two off), then the median.
    let mut losses: Vec<f64> = on
        .chunks(2)
        .zip(off.chunks(2))
        .map(|(on, off)| 1.0 - mean(on, |r| r.per_second) / mean(off, |r| r.per_second))
        .collect();
    losses.sort_by(f64::total_cmp);
    let median = (losses[(losses.len() - 1) / 2] + losses[losses.len() / 2]) / 2.0;
    println!(
        "rounds' throughput loss: {}",
        losses
            .iter()
            .map(|l| format!("{:.1} %", l * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "throughput lost to metrics: {:.1} % (median of rounds)   added latency: {:+.0} µs mean   added CPU per request: Envoy {:+.1} µs, agent {:+.2} µs   target < 5 %",
        median * 100.0,
        mean(&on, |r| r.mean_us) - mean(&off, |r| r.mean_us),
        mean(&on, |r| r.envoy_cpu_us_per_request) - mean(&off, |r| r.envoy_cpu_us_per_request),
        mean(&on, |r| r.agent_cpu_us_per_request) - mean(&off, |r| r.agent_cpu_us_per_request),
    );
}
