//! Observability end to end, with real Envoy sidecars, a real Prometheus
//! and a real Zipkin: the guide's Telemetry resources and Istio's metrics.
//!
//! Each test builds its own mesh of network namespaces joined by veth pairs:
//! `pay` runs `vmesh server` and the payment VM (the demo application on
//! 127.0.0.1:8080 behind its sidecar, inbound 8080 captured), `fe` the
//! frontend VM (traffic to the service range captured), and where a test
//! needs one, `p2` a second payment VM (v2) that joins later.
//!
//! Needs root, `ip`, `iptables`, `curl`, Envoy, `prometheus` and Java with
//! Zipkin's server (`scripts/install-deps.sh` installs them); without them
//! it fails, it never skips.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vmesh_api::testing::seed_dir;
use vmesh_testkit::mesh::{capture_inbound, capture_service_range};
use vmesh_testkit::netns::link;
use vmesh_testkit::poll;
use vmesh_testkit::testing::{envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
const PAYMENT_HOST: &str = "payment-service.vm-workloads.svc.cluster.local";

/// A TCP service: a second application on the payment VM, port 9001.
const PAYMENT_TCP: &str = "\
apiVersion: v1
kind: Service
metadata: {name: payment-tcp, namespace: vm-workloads}
spec:
  selector: {app: payment-service}
  ports: [{name: tcp, port: 9000, targetPort: 9001}]
";

/// The guide's policy allows HTTP only: the frontend may also reach the TCP service.
const TCP_ALLOWED: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-tcp, namespace: vm-workloads}
spec:
  selector: {matchLabels: {app: payment-service}}
  rules:
  - from: [{source: {namespaces: [frontend]}}]
    to: [{operation: {ports: ['9001']}}]
";

/// The server and payment VM in `pay` (10.46.0.2), the frontend VM in `fe`
/// (10.46.0.1), the guide's mesh applied.
struct TestMesh {
    dir: tempfile::TempDir,
    pay: Namespace,
    fe: Namespace,
    mesh: Mesh,
    vip: String,
}

impl TestMesh {
    /// `tag` keeps namespaces and Envoys' base ids apart from other tests'.
    fn start(tag: &str, base_id: u32, extra: &str) -> TestMesh {
        let mut dir = tempfile::Builder::new()
            .prefix(&format!("vmesh-telemetry-{tag}-"))
            .tempdir()
            .unwrap();
        // VMESH_KEEP_LOGS=1 keeps the servers', agents' and Envoys' logs.
        dir.disable_cleanup(std::env::var_os("VMESH_KEEP_LOGS").is_some());
        let id = std::process::id();
        let pay = Namespace::new(&format!("vmesh-{tag}p-{id}"));
        let fe = Namespace::new(&format!("vmesh-{tag}f-{id}"));
        link(&fe, "10.46.0.1", &pay, "10.46.0.2", &format!("{tag}{id}")).unwrap();
        let mesh = Mesh::new(VMESH, &pay, dir.path()).with_envoy(&envoy_binary());
        mesh.start_server(&pay, &["--xds-addr", "0.0.0.0:15012"])
            .unwrap();
        for port in [8080, 9001] {
            pay.spawn(
                &[
                    VMESH,
                    "demo-app",
                    "--addr",
                    &format!("127.0.0.1:{port}"),
                    "--name",
                    "payment-vm",
                ],
                &dir.path().join(format!("app-{port}.log")),
            )
            .unwrap();
        }
        let seed = seed_dir();
        mesh.apply_file(&seed.join("complete-vm-integration.yaml"))
            .unwrap();
        mesh.cli(&["create", "namespace", "frontend"]).unwrap();
        let entry = std::fs::read_to_string(seed.join("workload-entry-payment-vm1.yaml"))
            .unwrap()
            .replace("address: 192.168.1.100", "address: 10.46.0.2");
        mesh.apply("vm.yaml", &entry).unwrap();
        mesh.apply("tcp.yaml", PAYMENT_TCP).unwrap();
        if !extra.is_empty() {
            mesh.apply("extra.yaml", extra).unwrap();
        }
        capture_inbound(&pay, &[8080, 9001]).unwrap();
        mesh.start_agent(
            &pay,
            "127.0.0.1:15012",
            "vm-workloads",
            "payment-service-sa",
            "10.46.0.2",
            &[
                "--label",
                "app=payment-service",
                "--label",
                "version=v1",
                "--label",
                "class=vm",
            ],
            base_id,
        )
        .unwrap();
        capture_service_range(&fe, "10.46.0.1").unwrap();
        mesh.start_agent(
            &fe,
            "10.46.0.2:15012",
            "frontend",
            "frontend-sa",
            "10.46.0.1",
            &["--label", "app=frontend", "--label", "version=v7"],
            base_id + 1,
        )
        .unwrap();
        let vip = mesh.vip_of(PAYMENT_HOST).unwrap();
        let test = TestMesh {
            dir,
            pay,
            fe,
            mesh,
            vip,
        };
        eventually("frontend → payment", || {
            (test.get("/api/payments/0") == Some(200)).then_some(())
        });
        test
    }

    /// A request from the frontend VM through both sidecars.
    fn get(&self, path: &str) -> Option<u16> {
        vmesh_testkit::http::status(
            &self.fe,
            "GET",
            &format!("http://{}:8080{path}", self.vip),
            Duration::from_secs(3),
        )
    }

    /// The access log lines (Istio's default format) in an agent's log
    /// (Envoy writes them to its standard output, the agent's).
    fn access_lines(&self, ns: &Namespace) -> Vec<String> {
        let log = self.mesh.log(&format!("agent-{}.log", ns.name()));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = regex::Regex::new(
            r#"^\[\d{4}-\d\d-\d\dT[^\]]+\] "GET \S+ HTTP/[12](\.1)?" \d{3} \S+ \S+ \S+ "[^"]*" \d+ \d+ \d+ \S+ "[^"]*" "[^"]*" "[^"]*" "[^"]*" "[^"]*" \S+ \S+ \S+ \S+ \S+ \S+$"#,
        )
        .unwrap();
        text.lines()
            .filter(|l| line.is_match(l))
            .map(str::to_string)
            .collect()
    }

    /// Waits until the access logs of `ns` hold `count` more lines than
    /// `before`, and a moment more to see that no others come.
    fn lines_after(&self, ns: &Namespace, before: usize, count: usize) -> Vec<String> {
        let lines = poll::until("access log lines", Duration::from_secs(10), || {
            let lines = self.access_lines(ns);
            (lines.len() >= before + count).then_some(lines)
        })
        .unwrap_or_else(|_| {
            panic!(
                "{}: wanted {count} new access log lines, have {:?}",
                ns.name(),
                &self.access_lines(ns)[before..]
            )
        });
        std::thread::sleep(Duration::from_millis(1500));
        let settled = self.access_lines(ns);
        assert_eq!(
            settled.len(),
            lines.len(),
            "{}: more lines than requests",
            ns.name()
        );
        settled[before..].to_vec()
    }

    /// After a change of access logging: until eight requests in a row are
    /// logged by `ns` (or, when `logged` is false, not logged). A connection
    /// made before the change keeps its old chain until Envoy's drain asks
    /// its client to leave, after the next response on it, as in Istio; the
    /// client's Envoy keeps one such connection per worker, and requests
    /// land on workers at random, so three in a row can all miss one.
    fn settle(&self, ns: &Namespace, prefix: &str, logged: bool) {
        let mut in_a_row = 0;
        for i in 0..40 {
            let path = format!("/api/payments{prefix}/settle/{}/{i}", ns.name());
            assert!(self.get(&path).is_some());
            let seen = poll::until("the line", Duration::from_millis(1500), || {
                self.access_lines(ns)
                    .iter()
                    .any(|l| l.contains(&format!("{path} ")))
                    .then_some(())
            })
            .is_ok();
            in_a_row = if seen == logged { in_a_row + 1 } else { 0 };
            if in_a_row == 8 {
                return;
            }
        }
        panic!(
            "{}: access logging did not settle to logged={logged}",
            ns.name()
        );
    }

    /// Applies `yaml` and waits until both sidecars have it.
    fn apply(&self, yaml: &str) {
        self.mesh.apply("telemetry.yaml", yaml).unwrap();
        eventually("both sidecars synced", || {
            let status = self.mesh.cli(&["proxy-status"]).ok()?;
            let rows: Vec<&str> = status.lines().skip(1).collect();
            (rows.len() == 2
                && rows
                    .iter()
                    .all(|r| !r.contains("STALE") && r.matches("SYNCED").count() >= 4))
            .then_some(())
        });
        // A listener that changed drains its old connections: give it a moment.
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_guides_access_logging_telemetry_logs_the_selected_vms_only() {
    let seed = seed_dir();
    let t = TestMesh::start("al", 61, "");
    // The guide's vm-access-logging, as it is: workloads labelled class=vm
    // in vm-workloads (the payment VM), provider `envoy`.
    t.mesh
        .apply_file(&seed.join("telemetry-access-log.yaml"))
        .unwrap();
    t.apply("");
    t.settle(&t.pay, "", true);
    let (pay_before, fe_before) = (t.access_lines(&t.pay).len(), t.access_lines(&t.fe).len());
    for i in 0..5 {
        assert_eq!(t.get(&format!("/api/payments/{i}")), Some(200));
    }
    let lines = t.lines_after(&t.pay, pay_before, 5);
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.contains(&format!(
                "\"GET /api/payments/{i} HTTP/2\" 200 - via_upstream"
            )) && line.contains("inbound|8080||"),
            "an inbound line in Istio's format: {line}"
        );
    }
    assert_eq!(
        t.access_lines(&t.fe).len(),
        fe_before,
        "the frontend VM is not selected: it logs nothing"
    );

    // Mesh-wide logging from the root namespace, turned off for one
    // namespace by `disabled: true` there.
    t.mesh
        .cli(&[
            "delete",
            "telemetry",
            "vm-access-logging",
            "-n",
            "vm-workloads",
        ])
        .unwrap();
    t.apply(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\n\
         spec:\n  accessLogging:\n  - providers: [{name: envoy}]\n---\n\
         apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: quiet, namespace: vm-workloads}\n\
         spec:\n  accessLogging:\n  - disabled: true\n",
    );
    t.settle(&t.pay, "", false);
    t.settle(&t.fe, "", true);
    let (pay_before, fe_before) = (t.access_lines(&t.pay).len(), t.access_lines(&t.fe).len());
    for i in 0..3 {
        assert_eq!(t.get(&format!("/api/payments/refund/{i}")), Some(200));
    }
    let lines = t.lines_after(&t.fe, fe_before, 3);
    assert!(
        lines
            .iter()
            .all(|l| l.contains("outbound|8080||payment-service")),
        "{lines:?}"
    );
    assert_eq!(
        t.access_lines(&t.pay).len(),
        pay_before,
        "disabled: true in vm-workloads turns the payment VM's log off"
    );

    // A CEL filter: only errors.
    t.apply(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: quiet, namespace: vm-workloads}\n\
         spec:\n  accessLogging:\n  - providers: [{name: envoy}]\n    filter: {expression: 'response.code >= 400'}\n",
    );
    // Errors only: a 500 is logged once the new chain serves every request.
    t.settle(&t.pay, "/status/500", true);
    let pay_before = t.access_lines(&t.pay).len();
    for path in [
        "/api/payments/1",
        "/api/payments/status/503",
        "/api/payments/2",
        "/api/payments/status/404",
        "/api/payments/3",
    ] {
        assert!(t.get(path).is_some());
    }
    let lines = t.lines_after(&t.pay, pay_before, 2);
    assert!(
        lines[0].contains("\"GET /api/payments/status/503 HTTP/2\" 503"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("\"GET /api/payments/status/404 HTTP/2\" 404"),
        "{}",
        lines[1]
    );
    drop(t.dir);
}

/// Starts Prometheus in `ns`, scraping every second what the server's HTTP
/// service discovery lists.
fn start_prometheus(ns: &Namespace, dir: &Path) {
    let config = dir.join("prometheus.yml");
    let example = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/prometheus/prometheus.yml"),
    )
    .unwrap();
    // The example as shipped, but scraping every second and refreshing the
    // targets every second, for a test.
    let config_text = example
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("refresh_interval: 15s", "refresh_interval: 1s")
        .replace("SERVER:15080", "127.0.0.1:15080");
    assert_ne!(
        config_text, example,
        "the example sets the intervals this test shortens"
    );
    std::fs::write(&config, config_text).unwrap();
    let data = dir.join("prometheus-data");
    ns.spawn(
        &[
            "prometheus",
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            "--web.listen-address=127.0.0.1:9090",
        ],
        &dir.join("prometheus.log"),
    )
    .unwrap();
}

/// The result of a PromQL query: (labels, value) per series.
fn query(ns: &Namespace, promql: &str) -> Vec<(Value, f64)> {
    let out = ns
        .exec(&[
            "curl",
            "-sf",
            "http://127.0.0.1:9090/api/v1/query",
            "--data-urlencode",
            &format!("query={promql}"),
        ])
        .unwrap_or_default();
    let Ok(body) = serde_json::from_str::<Value>(&out) else {
        return Vec::new();
    };
    body["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|series| {
            let value = series["value"][1].as_str()?.parse().ok()?;
            Some((series["metric"].clone(), value))
        })
        .collect()
}

/// Waits until `promql` gives exactly these values by `label`.
fn wait_for_series(ns: &Namespace, promql: &str, label: &str, want: &[(&str, f64)]) {
    let mut last = Vec::new();
    let found = poll::until(promql, Duration::from_secs(30), || {
        last = query(ns, promql);
        let mut got: Vec<(String, f64)> = last
            .iter()
            .map(|(m, v)| (m[label].as_str().unwrap_or_default().to_string(), *v))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let wanted: Vec<(String, f64)> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        (got == wanted).then_some(())
    });
    assert!(
        found.is_ok(),
        "{promql}: wanted {want:?}, Prometheus says {last:?}"
    );
}

#[test]
fn istio_metrics_reach_a_real_prometheus_through_service_discovery() {
    let t = TestMesh::start("pm", 64, TCP_ALLOWED);
    start_prometheus(&t.pay, t.dir.path());
    for i in 0..20 {
        assert_eq!(t.get(&format!("/api/payments/{i}")), Some(200));
    }
    // Both sidecars report each request: the client as source, the payment VM as destination.
    wait_for_series(
        &t.pay,
        r#"sum by (reporter) (istio_requests_total{destination_service_name="payment-service",destination_version="v1",response_code="200"})"#,
        "reporter",
        &[("destination", 21.0), ("source", 21.0)],
    );
    let series = query(
        &t.pay,
        r#"istio_requests_total{reporter="destination",destination_service_name="payment-service",response_code="200"}"#,
    );
    let labels = &series[0].0;
    for (label, value) in [
        ("source_workload", "vmesh-pmf"),
        ("source_workload_namespace", "frontend"),
        ("source_app", "frontend"),
        ("source_version", "v7"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/frontend/sa/frontend-sa",
        ),
        ("destination_workload_namespace", "vm-workloads"),
        ("destination_app", "payment-service"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/vm-workloads/sa/payment-service-sa",
        ),
        ("destination_service", PAYMENT_HOST),
        ("destination_service_namespace", "vm-workloads"),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
    ] {
        let got = labels[label].as_str().unwrap_or_default();
        assert!(
            got.starts_with(value),
            "{label}={got:?}, wanted {value:?}: {labels}"
        );
    }
    let source = query(
        &t.pay,
        // Answered: a request that never reached the VM has no peer certificate.
        r#"istio_requests_total{reporter="source",destination_service_name="payment-service",response_code="200"}"#,
    );
    let labels = &source[0].0;
    assert_eq!(
        labels["destination_workload"], "payment-service-vm1",
        "{labels}"
    );
    assert_eq!(
        labels["destination_principal"],
        "spiffe://cluster.local/ns/vm-workloads/sa/payment-service-sa"
    );
    assert_eq!(labels["connection_security_policy"], "unknown");
    eventually("the duration histogram", || {
        let buckets = query(
            &t.pay,
            r#"sum by (le) (istio_request_duration_milliseconds_bucket{reporter="destination",destination_service_name="payment-service"})"#,
        );
        buckets
            .iter()
            .any(|(m, v)| m["le"] == "+Inf" && *v == 21.0)
            .then_some(())
    });

    // TCP: three connections through the TCP service, counted on both sides.
    let tcp_vip = t
        .mesh
        .vip_of("payment-tcp.vm-workloads.svc.cluster.local")
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            vmesh_testkit::http::status(
                &t.fe,
                "GET",
                &format!("http://{tcp_vip}:9000/over/tcp"),
                Duration::from_secs(3)
            ),
            Some(200)
        );
    }
    for metric in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
    ] {
        wait_for_series(
            &t.pay,
            &format!(r#"sum by (reporter) ({metric}{{destination_service_name="payment-tcp"}})"#),
            "reporter",
            &[("destination", 3.0), ("source", 3.0)],
        );
    }
    for metric in [
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ] {
        let bytes = query(
            &t.pay,
            &format!(
                r#"sum({metric}{{destination_service_name="payment-tcp",reporter="destination"}})"#
            ),
        );
        assert!(
            bytes.first().is_some_and(|(_, v)| *v > 100.0),
            "{metric}: {bytes:?}"
        );
    }

    // A VM that joins later is scraped without restarting Prometheus.
    let id = std::process::id();
    let p2 = Namespace::new(&format!("vmesh-pm2-{id}"));
    link(&p2, "10.47.0.1", &t.pay, "10.47.0.2", &format!("q{id}")).unwrap();
    t.mesh
        .start_agent(
            &p2,
            "10.47.0.2:15012",
            "vm-workloads",
            "payment-service-sa",
            "10.47.0.1",
            &["--label", "app=payment-service", "--label", "version=v2"],
            66,
        )
        .unwrap();
    wait_for_series(
        &t.pay,
        r#"up{job="vmesh-sidecars"}"#,
        "instance",
        &[
            ("10.46.0.1:15020", 1.0),
            ("10.46.0.2:15020", 1.0),
            ("10.47.0.1:15020", 1.0),
        ],
    );
    let joined = query(&t.pay, r#"up{instance="10.47.0.1:15020"}"#);
    assert_eq!(joined[0].0["version"], "v2");
    assert_eq!(joined[0].0["namespace"], "vm-workloads");
}

/// Where `scripts/install-deps.sh` puts Zipkin's server.
const ZIPKIN_JAR: &str = "/var/cache/vmesh/zipkin-server-3.6.1-exec.jar";

/// The mesh's Zipkin provider, named as the guide's Telemetry names it, and
/// the collector as a service of the mesh (Zipkin on the control plane's
/// host, no sidecar).
const ZIPKIN: &str = "\
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: vm-mesh, namespace: istio-system}
spec:
  meshConfig:
    extensionProviders:
    - name: zipkin
      zipkin: {service: zipkin.tracing.svc.cluster.local, port: 9411}
---
apiVersion: v1
kind: Namespace
metadata: {name: tracing}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: zipkin, namespace: tracing}
spec:
  hosts: [zipkin.tracing.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{number: 9411, name: http-zipkin, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.46.0.2}]
";

/// Mesh-wide tracing at `percent`.
fn mesh_tracing(percent: u32) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\n\
         spec:\n  tracing:\n  - providers: [{{name: zipkin}}]\n    randomSamplingPercentage: {percent}\n"
    )
}

/// The traces Zipkin holds.
fn traces(ns: &Namespace) -> Vec<Vec<Value>> {
    let out = ns
        .exec(&[
            "curl",
            "-sf",
            "http://127.0.0.1:9411/api/v2/traces?limit=1000",
        ])
        .unwrap_or_default();
    serde_json::from_str(&out).unwrap_or_default()
}

#[test]
fn one_request_through_two_sidecars_is_one_trace_in_a_real_zipkin() {
    let seed = seed_dir();
    let t = TestMesh::start("zk", 67, ZIPKIN);
    let jar = std::env::var("VMESH_ZIPKIN_JAR").unwrap_or_else(|_| ZIPKIN_JAR.into());
    assert!(
        Path::new(&jar).exists(),
        "Zipkin's server is not at {jar}: run scripts/install-deps.sh or set VMESH_ZIPKIN_JAR"
    );
    t.pay
        .spawn(
            &["env", "QUERY_PORT=9411", "java", "-Xmx256m", "-jar", &jar],
            &t.dir.path().join("zipkin.log"),
        )
        .unwrap();
    poll::until("Zipkin", Duration::from_secs(60), || {
        t.pay
            .exec(&["curl", "-sf", "http://127.0.0.1:9411/health"])
            .ok()
    })
    .unwrap();
    // Every sidecar traces every request; the guide's vm-tracing (10 %, two
    // custom tags) applies in vm-workloads, where the payment VM follows the
    // frontend's decision.
    t.apply(&mesh_tracing(100));
    t.mesh
        .apply_file(&seed.join("telemetry-tracing.yaml"))
        .unwrap();
    t.apply("");
    // A connection made before tracing was on keeps its old chain for one
    // more request (see `settle`): some requests, one trace each.
    for i in 0..4 {
        assert_eq!(t.get(&format!("/api/payments/traced/{i}")), Some(200));
    }
    let trace = poll::until("the trace in Zipkin", Duration::from_secs(20), || {
        traces(&t.pay).into_iter().find(|spans| {
            let services: Vec<&str> = spans
                .iter()
                .filter_map(|s| s["localEndpoint"]["serviceName"].as_str())
                .collect();
            let traced = spans.iter().any(|s| {
                s["tags"]["http.url"]
                    .as_str()
                    .is_some_and(|u| u.contains("/api/payments/traced/"))
            });
            traced && services.len() >= 2
        })
    })
    .unwrap_or_else(|_| panic!("no trace with both sidecars' spans: {:?}", traces(&t.pay)));
    let ids: std::collections::BTreeSet<&str> =
        trace.iter().filter_map(|s| s["traceId"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one trace id: {trace:?}");
    let by_service = |service: &str| {
        trace
            .iter()
            .find(|s| s["localEndpoint"]["serviceName"].as_str() == Some(service))
            .unwrap_or_else(|| panic!("no span of {service}: {trace:?}"))
    };
    let client = by_service("frontend.frontend");
    let server = by_service("payment-service.vm-workloads");
    assert_eq!(client["kind"], "CLIENT");
    assert_eq!(server["kind"], "SERVER");
    // The guide's custom tags, on the payment VM's span only.
    assert_eq!(server["tags"]["workload.class"], "vm");
    assert_eq!(server["tags"]["environment"], "production");
    assert!(client["tags"].get("workload.class").is_none());

    // randomSamplingPercentage: 0 starts no trace.
    t.apply(&mesh_tracing(0));
    let before = traces(&t.pay).len();
    for i in 0..5 {
        assert_eq!(t.get(&format!("/api/payments/untraced/{i}")), Some(200));
    }
    // Envoy sends spans every 5 s at most: wait longer than that.
    std::thread::sleep(Duration::from_secs(8));
    let after = traces(&t.pay);
    assert_eq!(after.len(), before, "no new trace at 0 %: {after:?}");
}
