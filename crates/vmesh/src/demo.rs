//! `vmesh demo`: the guide's payment-service example, end to end, on this
//! machine. Network namespaces are the hosts: a control plane running
//! `vmesh server`, two payment VMs (v1) and a canary (v2) with the demo
//! application, a `frontend` and an `orders` workload. Each VM is onboarded
//! as the guide says (`vmesh workload entry configure --autoregister`, the
//! generated install.sh, `vmesh agent --capture`), the guide's manifests are
//! applied unchanged, and then every claim in the printed table is measured
//! in the run that prints it.
//!
//! Everything it makes is named `vmesh-demo-*` (namespaces, their
//! resolv.conf under /etc/netns), runs inside those namespaces, or lives in
//! its state directory (`$TMPDIR/vmesh-demo`, 0711: data, onboarding files,
//! logs), so `--down` (and every new run, first) removes it all, even after
//! a crash: the processes it kills are those `ip netns pids` finds in its
//! namespaces, never a list someone could have written. Without `--keep`,
//! or when interrupted, it removes it all at the end.
//!
//! The namespaces, links, processes, onboarding and requests are
//! `vmesh-testkit`'s, the same the end-to-end tests use; this module owns
//! the topology, the guide's scenario and the checks.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::time::Instant;
use vmesh_testkit::poll::wait_for;
use vmesh_testkit::{Mesh, Namespace, http, netns};

/// The guide's manifests, in the guide's order.
const GUIDE: &[(&str, &str)] = &[
    (
        "complete-vm-integration.yaml",
        include_str!("../../../examples/guide/complete-vm-integration.yaml"),
    ),
    (
        "destination-rule-payment.yaml",
        include_str!("../../../examples/guide/destination-rule-payment.yaml"),
    ),
    (
        "virtual-service-payment.yaml",
        include_str!("../../../examples/guide/virtual-service-payment.yaml"),
    ),
    (
        "peer-authentication-strict.yaml",
        include_str!("../../../examples/guide/peer-authentication-strict.yaml"),
    ),
    (
        "authorization-policy-payment.yaml",
        include_str!("../../../examples/guide/authorization-policy-payment.yaml"),
    ),
    (
        "service-entry-vm-database.yaml",
        include_str!("../../../examples/guide/service-entry-vm-database.yaml"),
    ),
    (
        "mesh-config-dns.yaml",
        include_str!("../../../examples/guide/mesh-config-dns.yaml"),
    ),
];

/// The frontend's and orders' groups, as `vmesh workload group create` prints them.
const CLIENT_GROUPS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: frontend}
---
apiVersion: v1
kind: Namespace
metadata: {name: orders}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: frontend, namespace: frontend}
spec:
  metadata:
    labels: {app: frontend}
  template:
    serviceAccount: frontend-sa
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: orders, namespace: orders}
spec:
  metadata:
    labels: {app: orders}
  template:
    serviceAccount: order-service-sa
";

const PREFIX: &str = "vmesh-demo";
const HOST: &str = "payment-service.vm-workloads.svc.cluster.local";
/// How long a stopped VM's entry outlives it here (the server's default is 10 s).
const GRACE: &str = "3s";
const SPLIT_REQUESTS: usize = 200;
/// Where the demo's Prometheus listens, in the control plane's namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";
/// The canary split as Prometheus sees it: requests the payment VMs
/// received, by the version that answered.
const SPLIT_QUERY: &str = r#"sum by (destination_version) (istio_requests_total{destination_service_name="payment-service",reporter="destination"})"#;

/// One machine of the demo: a network namespace linked to the control plane's.
struct Host {
    /// Short name: `payment-v1-a`, …
    name: &'static str,
    /// Its address; the control plane's side of the link is `.2`.
    ip: String,
    gateway: String,
    /// (WorkloadGroup, namespace) it is onboarded into; the control plane has none.
    group: Option<(&'static str, &'static str)>,
    /// The demo application's version, for the payment VMs.
    app_version: Option<&'static str>,
}

fn hosts() -> Vec<Host> {
    let host = |i: u8, name, group, app_version| Host {
        name,
        ip: format!("10.77.{i}.1"),
        gateway: format!("10.77.{i}.2"),
        group,
        app_version,
    };
    vec![
        host(
            1,
            "payment-v1-a",
            Some(("payment-service", "vm-workloads")),
            Some("v1"),
        ),
        host(
            2,
            "payment-v1-b",
            Some(("payment-service", "vm-workloads")),
            Some("v1"),
        ),
        host(
            3,
            "payment-v2",
            Some(("payment-service", "vm-workloads")),
            Some("v2"),
        ),
        host(4, "frontend", Some(("frontend", "frontend")), None),
        host(5, "orders", Some(("orders", "orders")), None),
    ]
}

fn ns(name: &str) -> String {
    format!("{PREFIX}-{name}")
}

const CONTROL: &str = "cp";
/// The control plane's address every VM dials (its side of the first link).
const SERVER_IP: &str = "10.77.1.2";

fn state_dir() -> PathBuf {
    std::env::temp_dir().join(PREFIX)
}

/// This binary, for running inside the namespaces.
fn vmesh() -> Result<String> {
    Ok(std::env::current_exe()?.display().to_string())
}

/// Removes everything a run made: processes (SIGTERM, then SIGKILL),
/// namespaces (and with them their links and capture rules), their
/// resolv.conf, the state directory.
fn down(state: &Path) -> Result<()> {
    netns::remove(&netns::list(&format!("{PREFIX}-"))?);
    match std::fs::remove_dir_all(state) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", state.display()))
        }
        _ => Ok(()),
    }
}

struct Check {
    name: &'static str,
    passed: bool,
    detail: String,
}

/// The demo's JSON objects from `vmesh get … -o json`.
fn items(mesh: &Mesh, args: &[&str]) -> Vec<Value> {
    mesh.get_json(args)
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

fn count(summary: &Value, path: &[&str]) -> u64 {
    let mut value = summary;
    for key in path {
        value = &value[*key];
    }
    value.as_u64().unwrap_or(0)
}

/// The HTTP status of one request from `ns` to `url`, as curl saw it (000: none).
fn status(ns: &Namespace, method: &str, url: &str) -> String {
    http::status(ns, method, url, Duration::from_secs(5))
        .map_or_else(|| "000".to_string(), |code| code.to_string())
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

pub async fn run(keep: bool, remove: bool) -> Result<ExitCode> {
    let state = state_dir();
    if !cfg!(target_os = "linux") || !is_root() {
        bail!(
            "vmesh demo builds network namespaces, links and iptables rules: run it as root on Linux (sudo vmesh demo)"
        );
    }
    down(&state)?;
    if remove {
        println!("vmesh demo: removed every namespace, process and file of earlier runs");
        return Ok(ExitCode::SUCCESS);
    }
    let work = tokio::task::spawn_blocking({
        let state = state.clone();
        move || {
            let mut hosts = Vec::new();
            let outcome = build_and_check(&state, keep, &mut hosts);
            (hosts, outcome)
        }
    });
    let (hosts, outcome) = tokio::select! {
        joined = work => joined.context("the demo stopped")?,
        _ = crate::commands::stop_signal() => {
            eprintln!("vmesh demo: interrupted; removing everything it made");
            down(&state)?;
            std::process::exit(130);
        }
    };
    let passed = match &outcome {
        Ok(checks) => checks.iter().all(|c| c.passed),
        Err(_) => false,
    };
    match outcome {
        Ok(checks) => print_table(&checks),
        Err(e) => eprintln!(
            "vmesh demo: {e:#}\n  logs: {}",
            state.join("logs").display()
        ),
    }
    if keep {
        hosts.into_iter().for_each(Namespace::keep);
        print_keep_instructions(&state)?;
    } else {
        drop(hosts);
        down(&state)?;
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_table(checks: &[Check]) {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    println!();
    for check in checks {
        println!(
            "  {}  {:<width$}  {}",
            if check.passed { "PASS" } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    println!();
}

fn print_keep_instructions(state: &Path) -> Result<()> {
    let exe = vmesh()?;
    println!("The demo is still running (vmesh demo --down removes it). Try:");
    println!("  sudo ip netns exec {} {exe} get we -A", ns(CONTROL));
    println!("  sudo ip netns exec {} {exe} proxy-status", ns(CONTROL));
    println!(
        "  sudo ip netns exec {} curl -s http://{HOST}:8080/api/payments/1",
        ns("frontend")
    );
    println!(
        "  sudo ip netns exec {} curl -s -H 'x-canary: true' http://payment-service.vm-workloads:8080/api/payments/1",
        ns("frontend")
    );
    println!(
        "  Prometheus (its UI and API on {PROMETHEUS} in the control plane's namespace, the sidecars found through the server's service discovery):"
    );
    println!(
        "  sudo ip netns exec {} curl -s http://{PROMETHEUS}/api/v1/query --data-urlencode 'query={SPLIT_QUERY}'",
        ns(CONTROL)
    );
    println!("  logs: {}", state.join("logs").display());
    Ok(())
}

/// Prometheus in the control plane's namespace, configured as
/// `examples/prometheus/prometheus.yml` says, scraping every second.
fn start_prometheus(control: &Namespace, state: &Path, logs: &Path) -> Result<()> {
    let example = include_str!("../../../examples/prometheus/prometheus.yml");
    let config = example
        .replace("SERVER:15080", "127.0.0.1:15080")
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("refresh_interval: 15s", "refresh_interval: 1s");
    let path = state.join("prometheus.yml");
    std::fs::write(&path, config)?;
    control
        .spawn(
            &[
                "prometheus",
                &format!("--config.file={}", path.display()),
                &format!("--storage.tsdb.path={}", state.join("prometheus").display()),
                &format!("--web.listen-address={PROMETHEUS}"),
            ],
            &logs.join("prometheus.log"),
        )
        .context("starting Prometheus (scripts/install-deps.sh installs it)")?;
    Ok(())
}

/// Requests the payment VMs received by version, as Prometheus says.
fn split_in_prometheus(control: &Namespace) -> Option<BTreeMap<String, u64>> {
    let out = control
        .exec(&[
            "curl",
            "-sf",
            &format!("http://{PROMETHEUS}/api/v1/query"),
            "--data-urlencode",
            &format!("query={SPLIT_QUERY}"),
        ])
        .ok()?;
    let body: Value = serde_json::from_str(&out).ok()?;
    body["data"]["result"]
        .as_array()?
        .iter()
        .map(|series| {
            let version = series["metric"]["destination_version"]
                .as_str()?
                .to_string();
            let value = series["value"][1].as_str()?.parse::<f64>().ok()? as u64;
            Some((version, value))
        })
        .collect()
}

/// Builds the topology, its namespaces in `made` (the control plane's
/// first, then each host's in [`hosts`] order), onboards everything and
/// runs the checks.
fn build_and_check(state: &Path, keep: bool, made: &mut Vec<Namespace>) -> Result<Vec<Check>> {
    let exe = vmesh()?;
    let envoy = vmesh_agent::envoy::find_envoy()?;
    {
        use std::os::unix::fs::DirBuilderExt;
        // Fresh (down() removed any) and not listable: it holds tokens and
        // keys (in 0600 files and 0700 directories); Envoy, as the proxy
        // user, must still pass through to its bootstrap and sockets.
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(state)
            .with_context(|| format!("creating {}", state.display()))?;
    }
    let logs = state.join("logs");
    std::fs::create_dir_all(&logs)?;
    let hosts = hosts();
    let begun = Instant::now();

    let say = |what: &str| eprintln!("vmesh demo: {what}");
    say("building 6 hosts (network namespaces): a control plane, 3 payment VMs, frontend, orders");
    // The hosts: a namespace each, linked to the control plane's, which
    // routes. Their processes get process groups of their own, so that an
    // interrupted demo removes them itself; they die with the demo, however
    // it dies, unless --keep asks them to outlive it.
    let create_host = |name: &str| -> Result<Namespace> {
        let namespace = Namespace::create(&ns(name))?.detached();
        Ok(if keep {
            namespace.outliving()
        } else {
            namespace
        })
    };
    made.push(create_host(CONTROL)?);
    for host in &hosts {
        made.push(create_host(host.name)?);
    }
    let made = &*made;
    let control = &made[0];
    let host_ns: BTreeMap<&str, &Namespace> = hosts
        .iter()
        .zip(&made[1..])
        .map(|(host, ns)| (host.name, ns))
        .collect();
    control.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    for (i, host) in hosts.iter().enumerate() {
        let vm = host_ns[host.name];
        netns::link(vm, &host.ip, control, &host.gateway, &i.to_string())?;
        vm.exec(&["ip", "route", "add", "default", "via", &host.gateway])?;
        // The VM's resolver: its gateway (no DNS server there; mesh names
        // are the agent's, and nothing else is looked up).
        vm.resolv_conf(&format!("nameserver {}\n", host.gateway))?;
    }
    let mesh = Mesh::new(&exe, control, state)
        .with_logs(&logs)
        .with_envoy(&envoy);

    say("starting the control plane (vmesh server)");
    mesh.start_server(
        control,
        &[
            "--xds-addr",
            "0.0.0.0:15012",
            "--auto-registration-grace",
            GRACE,
        ],
    )
    .context("the control plane did not start")?;
    start_prometheus(control, state, &logs)?;

    // The guide's manifests, unchanged, in the guide's order; the clients' groups.
    let manifests = state.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    for (name, text) in GUIDE
        .iter()
        .copied()
        .chain([("client-groups.yaml", CLIENT_GROUPS)])
    {
        let path = manifests.join(name);
        std::fs::write(&path, text)?;
        mesh.apply_file(&path)
            .with_context(|| format!("applying {name}"))?;
    }

    say(
        "applying the guide's manifests, onboarding each VM (configure --autoregister, install.sh)",
    );
    // Onboarding, as the guide does it: files per group, install.sh per VM.
    let mut roots = BTreeMap::new();
    for (group, namespace) in hosts.iter().filter_map(|h| h.group) {
        if !roots.contains_key(group) {
            roots.insert(group, mesh.onboard(group, namespace, SERVER_IP)?);
        }
    }

    say("starting the payment applications and the 5 agents (certificates, Envoy, capture, DNS)");
    // The applications, then the agents.
    for host in &hosts {
        if let Some(version) = host.app_version {
            host_ns[host.name].spawn(
                &[
                    &exe,
                    "demo-app",
                    "--addr",
                    "0.0.0.0:8080",
                    "--name",
                    host.name,
                    "--version",
                    version,
                ],
                &mesh.log(&format!("app-{}.log", host.name)),
            )?;
        }
    }
    let agents_started = Instant::now();
    let mut agents = BTreeMap::new();
    for (i, host) in hosts.iter().enumerate() {
        let Some((group, _)) = host.group else {
            continue;
        };
        let flags: &[&str] = if host.app_version == Some("v2") {
            &["--label", "version=v2"]
        } else {
            &[]
        };
        let base_id = 60 + u32::try_from(i)?;
        let agent = mesh.start_onboarded_agent(
            host_ns[host.name],
            &roots[group],
            host.name,
            &host.ip,
            base_id,
            flags,
        )?;
        agents.insert(host.name, agent);
    }

    let mut checks = Vec::new();

    // 1. Every VM registered itself.
    let expected = hosts.iter().filter(|h| h.group.is_some()).count();
    let registered = wait_for(Duration::from_secs(15), || {
        let entries = items(&mesh, &["we", "-A"]);
        (entries.len() >= expected).then(|| agents_started.elapsed())
    });
    checks.push(Check {
        name: "VMs registered themselves",
        passed: registered.is_some(),
        detail: match registered {
            Some(took) => format!(
                "{expected} WorkloadEntries, {:.1} s after the agents started",
                took.as_secs_f64()
            ),
            None => format!("fewer than {expected} WorkloadEntries after 15 s"),
        },
    });

    // 2. Every proxy took its configuration.
    let synced = wait_for(Duration::from_secs(15), || {
        let text = control
            .exec(&["curl", "-s", "http://127.0.0.1:15014/debug/syncz"])
            .ok()?;
        let proxies: Vec<Value> = serde_json::from_str(&text).ok()?;
        let all = proxies.len() == expected
            && proxies.iter().all(|p| {
                ["CDS", "LDS", "EDS", "RDS"]
                    .iter()
                    .all(|t| p["sync"][*t] == "SYNCED")
            });
        all.then_some(proxies.len())
    });
    checks.push(Check {
        name: "every proxy SYNCED",
        passed: synced.is_some(),
        detail: match synced {
            Some(n) => format!("{n} Envoys, CDS LDS EDS RDS acknowledged"),
            None => "not all SYNCED after 15 s (vmesh proxy-status)".into(),
        },
    });

    // Without registered, configured proxies the traffic checks mean nothing.
    if checks.iter().any(|c| !c.passed) {
        return Ok(checks);
    }

    say("waiting for the guide's readiness probe (initialDelaySeconds: 10)");
    // 3. The payment VMs pass the guide's probe (initialDelaySeconds 10).
    let payment = hosts.iter().filter(|h| h.app_version.is_some()).count();
    let healthy = wait_for(Duration::from_secs(30), || {
        let entries = items(&mesh, &["we", "-n", "vm-workloads"]);
        let up = entries
            .iter()
            .filter(|e| {
                e["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Healthy" && c["status"] == "True")
            })
            .count();
        (up == payment).then(|| agents_started.elapsed())
    });
    checks.push(Check {
        name: "payment VMs healthy",
        passed: healthy.is_some(),
        detail: match healthy {
            Some(took) => format!(
                "{payment} of {payment} pass GET /health, {:.1} s after start (guide: initialDelaySeconds 10)",
                took.as_secs_f64()
            ),
            None => "not every payment VM healthy after 30 s (vmesh doctor)".into(),
        },
    });

    if !checks.iter().all(|c| c.passed) {
        return Ok(checks);
    }
    say("sending traffic");
    // 4. frontend → payment by name, over mTLS, through capture.
    let frontend = host_ns["frontend"];
    let url = format!("http://{HOST}:8080/api/payments/1");
    let load = |args: &[&str]| mesh.load(frontend, &url, args);
    let first = wait_for(Duration::from_secs(10), || {
        let summary = load(&["--requests", "1"]).ok()?;
        (count(&summary, &["codes", "200"]) == 1).then_some(summary)
    });
    let handshakes: u64 = frontend
        .exec(&[
            "curl",
            "-s",
            "http://127.0.0.1:15000/stats?filter=ssl.handshake",
        ])
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("cluster.outbound|8080|")
                && l.contains(&format!("|{HOST}.ssl.handshake:"))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    checks.push(Check {
        name: "frontend → payment by DNS name, mTLS",
        passed: first.is_some() && handshakes > 0,
        detail: format!(
            "HTTP 200 via {HOST} (the agent's DNS), {handshakes} TLS handshake(s) by the frontend's sidecar"
        ),
    });

    // 5. The VirtualService's 90/10 split, and the same split in Prometheus.
    // What Prometheus has counted so far (the first requests), once two
    // scrapes further apart than Envoy's stats flush (5 s: histograms, and
    // the request counts taken from one, reach the merged metrics then)
    // agree: the split is what it counts on top.
    let before = wait_for(Duration::from_secs(30), || {
        let first = split_in_prometheus(control).filter(|s| !s.is_empty())?;
        std::thread::sleep(Duration::from_millis(6500));
        (split_in_prometheus(control)? == first).then_some(first)
    })
    .unwrap_or_default();
    let split = load(&[
        "--requests",
        &SPLIT_REQUESTS.to_string(),
        "--concurrency",
        "4",
    ])?;
    let canary = count(&split, &["answered_by", "payment-v2"]);
    let stable = count(&split, &["answered_by", "payment-v1-a"])
        + count(&split, &["answered_by", "payment-v1-b"]);
    let ok = count(&split, &["codes", "200"]);
    // 10 % of 200 is 20 ± 4.2: four standard deviations either side.
    checks.push(Check {
        name: "90/10 split (VirtualService)",
        passed: ok == SPLIT_REQUESTS as u64 && (4..=37).contains(&canary),
        detail: format!(
            "{SPLIT_REQUESTS} requests: {stable} v1, {canary} v2 ({:.1} % canary), {ok} OK",
            canary as f64 * 100.0 / SPLIT_REQUESTS as f64
        ),
    });

    let counted = |seen: &BTreeMap<String, u64>, version: &str| {
        seen.get(version).copied().unwrap_or(0) - before.get(version).copied().unwrap_or(0)
    };
    let seen = wait_for(Duration::from_secs(20), || {
        let seen = split_in_prometheus(control)?;
        (counted(&seen, "v1") == stable && counted(&seen, "v2") == canary).then_some(seen)
    });
    checks.push(Check {
        name: "the split in Prometheus",
        passed: seen.is_some(),
        detail: match &seen {
            Some(seen) => format!(
                "istio_requests_total by destination_version: v1 +{}, v2 +{}",
                counted(seen, "v1"),
                counted(seen, "v2")
            ),
            None => format!(
                "Prometheus did not count {stable} v1 and {canary} v2 within 20 s: {:?}",
                split_in_prometheus(control)
            ),
        },
    });
    if let Some(seen) = &seen {
        println!("Prometheus: {SPLIT_QUERY}");
        for (version, total) in seen {
            println!("  destination_version={version}  {total}");
        }
    }

    // 6. x-canary: true goes to v2 only.
    let header = load(&["--requests", "20", "--header", "x-canary: true"])?;
    let to_canary = count(&header, &["answered_by", "payment-v2"]);
    checks.push(Check {
        name: "x-canary: true → v2 only",
        passed: to_canary == 20,
        detail: format!("{to_canary} of 20 answered by payment-v2"),
    });

    // 7. The AuthorizationPolicy: orders may only POST /api/payments/process.
    let payments = format!("http://{HOST}:8080/api/payments");
    let orders = host_ns["orders"];
    let allowed = status(orders, "POST", &format!("{payments}/process"));
    let refused = status(orders, "GET", &format!("{payments}/1"));
    checks.push(Check {
        name: "orders: only POST /api/payments/process",
        passed: allowed == "200" && refused == "403",
        detail: format!("POST /api/payments/process {allowed}, GET /api/payments/1 {refused}"),
    });

    // 8. STRICT mTLS: plaintext from a host without a sidecar is refused.
    let code = status(control, "GET", "http://10.77.1.1:8080/api/payments/1");
    checks.push(Check {
        name: "plaintext refused (STRICT)",
        passed: code == "000",
        detail: format!(
            "control plane → payment-v1-a:8080 without a sidecar: {}",
            if code == "000" {
                "connection reset".to_string()
            } else {
                format!("HTTP {code}")
            }
        ),
    });

    // 9. A VM stops: its entry goes after the grace period, traffic goes on.
    let stopping = host_ns["payment-v1-b"];
    let (removed, traffic) = std::thread::scope(|scope| {
        let during = scope.spawn(|| load(&["--duration", "8s", "--concurrency", "2"]).ok());
        std::thread::sleep(Duration::from_millis(500));
        let stopped_at = Instant::now();
        // As systemd stops a VM: the agent first (it drains the VM out of
        // service, then stops Envoy), then the application.
        if let Err(e) = stopping.stop(agents["payment-v1-b"]) {
            say(&format!("stopping payment-v1-b's agent: {e:#}"));
        }
        stopping.stop_all();
        let removed = wait_for(Duration::from_secs(15), || {
            let entries = items(&mesh, &["we", "-n", "vm-workloads"]);
            (!entries.iter().any(|e| e["spec"]["address"] == "10.77.2.1"))
                .then(|| stopped_at.elapsed())
        });
        (removed, during.join().ok().flatten())
    });
    let (sent, failed) = traffic.as_ref().map_or((0, u64::MAX), |t| {
        let sent = count(t, &["requests"]);
        (sent, sent - count(t, &["codes", "200"]))
    });
    checks.push(Check {
        name: "a VM stopped: entry removed, no request lost",
        passed: removed.is_some() && failed == 0 && sent > 0,
        detail: format!(
            "payment-v1-b's entry gone {}; {sent} requests meanwhile, {} failed",
            removed.map_or("never".to_string(), |t| format!(
                "{:.1} s after it stopped (2 s drain, then the {GRACE} grace period)",
                t.as_secs_f64()
            )),
            if failed == u64::MAX {
                "?".to_string()
            } else {
                failed.to_string()
            }
        ),
    });

    println!(
        "vmesh demo: the guide's payment service on {} hosts (network namespaces) with real Envoy, checked in {:.1} s",
        hosts.len() + 1,
        begun.elapsed().as_secs_f64()
    );
    Ok(checks)
}
