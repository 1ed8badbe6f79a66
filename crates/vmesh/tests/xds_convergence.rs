//! Every kind of change reaches a real Envoy, and takes effect, within a
//! second of `vmesh apply`: an endpoint moves, a DestinationRule changes a
//! cluster, a VirtualService changes a route, a Service appears (cluster,
//! listener, route) and a Service goes. Each is observed with real
//! requests, and `vmesh proxy-status` must say SYNCED within the same
//! second, on state-of-the-world and delta ADS alike.
//!
//! A changed cluster sits warming in Envoy until it gets its load
//! assignment: the server must send the assignment again even when it has
//! not changed, or the change waits for Envoy's 15 s initial-fetch timeout.
//! The test fails if any of Envoy's `init_fetch_timeout` counters moved.
//!
//! Needs root, `ip`, `iptables`, `curl` and Envoy; without them it fails,
//! it never skips.

// The test measures wall-clock time across processes.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use vmesh_testkit::mesh::capture_service_range;
use vmesh_testkit::sidecar::{self, demo_app_name};
use vmesh_testkit::testing::eventually;
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
/// How soon after `vmesh apply` starts a change must be in effect.
const LIMIT: Duration = Duration::from_secs(1);

const BASE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: vm-workloads}
---
apiVersion: v1
kind: Service
metadata: {name: ledger, namespace: vm-workloads}
spec:
  selector: {app: ledger}
  ports: [{name: http, port: 8080}]
";

fn ledger_entry(address: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: ledger-1, namespace: vm-workloads}}\n\
         spec: {{address: {address}, labels: {{app: ledger}}}}\n"
    )
}

fn ledger_rule(tls_mode: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: ledger, namespace: vm-workloads}}\n\
         spec:\n  host: ledger\n  trafficPolicy:\n    tls: {{mode: {tls_mode}}}\n    outlierDetection: {{consecutive5xxErrors: 7}}\n"
    )
}

const LEDGER_FAULT: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ledger, namespace: vm-workloads}
spec:
  hosts: [ledger]
  http:
  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: ledger}}]
";

const AUDIT: &str = "\
apiVersion: v1
kind: Service
metadata: {name: audit, namespace: vm-workloads}
spec:
  selector: {app: audit}
  ports: [{name: http, port: 9090}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: audit-1, namespace: vm-workloads}
spec: {address: 127.0.0.4, labels: {app: audit}}
";

/// One change under test, in the sidecar's namespace.
struct Sidecar<'a> {
    ns: &'a Namespace,
    dir: &'a std::path::Path,
}

impl Sidecar<'_> {
    /// Applies `yaml` (or runs `vmesh args…` when it starts with `vmesh `),
    /// then waits up to [`LIMIT`] from the start for `effect` and for the
    /// proxy to be SYNCED; fails the test naming `change` otherwise.
    fn change(&self, change: &str, yaml: &str, mut effect: impl FnMut() -> bool) {
        let started = Instant::now();
        match yaml.strip_prefix("vmesh ") {
            Some(args) => {
                let mut full = vec![VMESH];
                full.extend(args.split_whitespace());
                self.ns.run(&full);
            }
            None => {
                let path = self.dir.join("change.yaml");
                std::fs::write(&path, yaml).unwrap();
                self.ns.run(&[VMESH, "apply", "-f", path.to_str().unwrap()]);
            }
        }
        let applied = started.elapsed();
        let within_limit = |mut check: Box<dyn FnMut() -> bool + '_>| {
            while started.elapsed() < LIMIT {
                if check() {
                    return Some(started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        };
        let seen = within_limit(Box::new(&mut effect));
        // Only a proxy SYNCED once the change is in effect counts: before
        // the push it was SYNCED on the previous version.
        let synced =
            seen.and_then(|_| within_limit(Box::new(|| sidecar::synced(self.ns, VMESH).is_some())));
        eprintln!(
            "{change}: applied in {applied:?}, in effect after {seen:?}, SYNCED after {synced:?}"
        );
        assert!(
            seen.is_some(),
            "{change}: not in effect {LIMIT:?} after vmesh apply started"
        );
        assert!(
            synced.is_some(),
            "{change}: proxy-status not SYNCED {LIMIT:?} after vmesh apply started:\n{}",
            self.ns.run(&[VMESH, "proxy-status"])
        );
    }

    /// The status of a GET through the sidecar (0: no HTTP answer).
    fn status(&self, url: &str) -> u16 {
        vmesh_testkit::http::status(self.ns, "GET", url, Duration::from_millis(500)).unwrap_or(0)
    }

    /// The demo app that answered a GET through the sidecar.
    fn answer(&self, url: &str) -> Option<String> {
        demo_app_name(self.ns, url, None)
    }
}

/// Envoy's counters that are not zero and whose name ends with `suffix`.
fn moved_counters(ns: &Namespace, suffix: &str) -> Vec<String> {
    ns.run(&["curl", "-s", "http://127.0.0.1:15000/stats"])
        .lines()
        .filter(|l| {
            l.split_once(": ")
                .is_some_and(|(name, value)| name.ends_with(suffix) && value.trim() != "0")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn every_change_kind_takes_effect_within_a_second_on_state_of_the_world_ads() {
    every_change_kind("GRPC", "52");
}

#[test]
fn every_change_kind_takes_effect_within_a_second_on_delta_ads() {
    every_change_kind("DELTA_GRPC", "53");
}

fn every_change_kind(api_type: &str, base_id: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ns = Namespace::new(&format!("vmesh-conv-{}-{base_id}", std::process::id()));
    let mesh = Mesh::new(VMESH, &ns, dir.path());
    for (listen, name) in [
        ("127.0.0.2:8080", "a"),
        ("127.0.0.3:8080", "b"),
        ("127.0.0.4:9090", "audit"),
    ] {
        ns.spawn(
            &[VMESH, "demo-app", "--addr", listen, "--name", name],
            &dir.path().join(format!("{name}.log")),
        )
        .unwrap();
    }
    mesh.start_server(&ns, &["--xds-plaintext-addr", "127.0.0.1:15010"])
        .unwrap();
    mesh.apply(
        "base.yaml",
        &format!("{BASE}---\n{}", ledger_entry("127.0.0.2")),
    )
    .unwrap();
    let ledger = format!(
        "http://{}:8080/",
        mesh.vip_of("ledger.vm-workloads.svc.cluster.local")
            .unwrap()
    );

    ns.run(&["ip", "addr", "add", "10.10.0.2/32", "dev", "lo"]);
    capture_service_range(&ns, "10.10.0.2").unwrap();
    sidecar::start(&ns, dir.path(), 15010, api_type, base_id);
    let sidecar = Sidecar {
        ns: &ns,
        dir: dir.path(),
    };
    eventually("Envoy to route to the ledger", || {
        (sidecar.answer(&ledger).as_deref() == Some("a")).then_some(())
    });
    eventually("the proxy to be SYNCED", || sidecar::synced(&ns, VMESH));

    sidecar.change("an endpoint moves", &ledger_entry("127.0.0.3"), || {
        sidecar.answer(&ledger).as_deref() == Some("b")
    });
    // TLS to a plaintext application fails: the cluster's new transport
    // socket is in use only once the changed cluster has warmed.
    sidecar.change(
        "a DestinationRule changes the cluster (TLS on)",
        &ledger_rule("SIMPLE"),
        || sidecar.status(&ledger) == 503,
    );
    sidecar.change(
        "a DestinationRule changes the cluster (TLS off)",
        &ledger_rule("DISABLE"),
        || sidecar.answer(&ledger).as_deref() == Some("b"),
    );
    sidecar.change("a VirtualService changes the route", LEDGER_FAULT, || {
        sidecar.status(&ledger) == 418
    });
    sidecar.change(
        "the VirtualService goes",
        "vmesh delete vs ledger -n vm-workloads",
        || sidecar.answer(&ledger).as_deref() == Some("b"),
    );

    // A Service on a new port: a new cluster, listener and route.
    let started = Instant::now();
    let mut audit = None;
    sidecar.change("a Service appears", AUDIT, || {
        let url = audit.get_or_insert_with(|| {
            let vip = mesh.vip_of("audit.vm-workloads.svc.cluster.local").unwrap();
            format!("http://{vip}:9090/")
        });
        sidecar.answer(url).as_deref() == Some("audit")
    });
    assert!(started.elapsed() < LIMIT * 2);
    let audit = audit.unwrap();
    sidecar.change(
        "a Service goes",
        "vmesh delete svc audit -n vm-workloads",
        || sidecar.answer(&audit).is_none(),
    );
    let clusters = ns.run(&["curl", "-s", "http://127.0.0.1:15000/clusters"]);
    assert!(
        !clusters.contains("audit.vm-workloads"),
        "the deleted Service's clusters are gone"
    );

    assert_eq!(
        moved_counters(&ns, "init_fetch_timeout"),
        Vec::<String>::new(),
        "no resource waited for Envoy's initial-fetch timeout"
    );
    assert_eq!(
        moved_counters(&ns, "update_rejected"),
        Vec::<String>::new(),
        "Envoy accepted every update"
    );
}
