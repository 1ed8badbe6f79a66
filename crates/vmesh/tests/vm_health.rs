//! Two payment VMs and a client VM, each a network namespace onboarded the
//! guide's way (configure --autoregister, install.sh, `vmesh agent --root
//! --capture`), with the control plane in a fourth namespace that routes
//! between them:
//! - the client's plain HTTP request to the service name reaches both VMs,
//!   through capture on both ends, over mTLS (STRICT);
//! - SSH-port traffic is never redirected;
//! - each agent answers /healthz/ready and serves merged metrics on 15020,
//!   and `vmesh agent wait` returns once the sidecar is ready;
//! - a VM whose application fails the group's probe leaves the client's
//!   endpoints within periodSeconds × failureThreshold + 1 s, with the
//!   reason on its WorkloadEntry, and comes back when it passes again;
//! - a VM whose agent stops is deleted after the grace period, and once
//!   EDS has caught up no request fails; started again after its bootstrap
//!   token expired, it rejoins on the certificate it kept on disk.
//!
//! Names resolve with curl's `--resolve` until the DNS proxy exists.
//! Needs root, `ip`, `iptables`, `curl` and Envoy; without them it fails, it
//! never skips.

// Deadlines here are wall-clock time across processes.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use vmesh_testkit::netns::link;
use vmesh_testkit::testing::{PAYMENT_MESH, envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

const HOST: &str = "payment-service.vm-workloads.svc.cluster.local";
const PERIOD_SECONDS: u64 = 1;
const FAILURE_THRESHOLD: u64 = 2;

struct Vm {
    ns: Namespace,
    ip: String,
    agent: usize,
}

/// A VM on its own link to the control plane's namespace, which routes.
fn vm(server: &Namespace, index: u8, tag: &str) -> (Namespace, String) {
    let ns = Namespace::new(&format!("vmesh-h{tag}-{}", std::process::id()));
    let (ip, gateway) = (format!("10.50.{index}.1"), format!("10.50.{index}.2"));
    link(
        &ns,
        &ip,
        server,
        &gateway,
        &format!("h{tag}{}", std::process::id()),
    )
    .unwrap();
    ns.run(&["ip", "route", "add", "default", "via", &gateway]);
    (ns, ip)
}

/// `curl` in `ns` with its output and status; never panics on failure.
fn curl(ns: &Namespace, args: &[&str]) -> (bool, String) {
    let output = ns
        .command(&["curl", "-sS", "--max-time", "5"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// One request from the client to the service by name; who answered.
fn call(client: &Namespace, vip: &str) -> Result<String, String> {
    let resolve = format!("{HOST}:8080:{vip}");
    let (ok, text) = curl(
        client,
        &[
            "-f",
            "--resolve",
            &resolve,
            &format!("http://{HOST}:8080/api/payments/1"),
        ],
    );
    if !ok {
        return Err(text);
    }
    text.split_whitespace()
        .find_map(|word| word.strip_prefix("name="))
        .map(str::to_string)
        .ok_or(text)
}

/// The payment endpoints the client's Envoy has, by address.
fn client_endpoints(client: &Namespace) -> Vec<String> {
    let (_, clusters) = curl(client, &["http://127.0.0.1:15000/clusters"]);
    let prefix = format!("outbound|8080||{HOST}::");
    let mut hosts: Vec<String> = clusters
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| rest.split("::").next())
        .filter(|host| host.parse::<std::net::SocketAddr>().is_ok())
        .map(str::to_string)
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

fn healthy_condition(entry: &serde_json::Value) -> serde_json::Value {
    entry["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Healthy")
        .cloned()
        .unwrap_or_default()
}

#[test]
fn vms_serve_through_capture_and_leave_when_unhealthy_or_gone() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Namespace::new(&format!("vmesh-hs-{}", std::process::id()));
    let (vm1, ip1) = vm(&server, 1, "a");
    let (vm2, ip2) = vm(&server, 2, "b");
    let (client, client_ip) = vm(&server, 3, "c");
    server.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let mesh = Mesh::new(VMESH, &server, dir).with_envoy(&envoy_binary());
    mesh.start_server(
        &server,
        &[
            "--xds-addr",
            "0.0.0.0:15012",
            "--auto-registration-grace",
            "2s",
        ],
    )
    .unwrap();
    mesh.cli(&["create", "namespace", "vm-workloads"]).unwrap();
    mesh.apply("mesh.yaml", PAYMENT_MESH).unwrap();
    let payment_root = mesh
        .onboard("payment-vms", "vm-workloads", "10.50.1.2")
        .unwrap();
    let client_root = mesh
        .onboard("client-vms", "vm-workloads", "10.50.1.2")
        .unwrap();

    let mut vms = Vec::new();
    for (ns, ip, base_id) in [(vm1, ip1, 81), (vm2, ip2, 82)] {
        let name = ns.name().to_string();
        let unhealthy = dir.join(format!("{name}.unhealthy"));
        // The application answers on 8080 and, as an SSH server would, on 22.
        for port in [8080, 22] {
            ns.spawn(
                &[
                    VMESH,
                    "demo-app",
                    "--addr",
                    &format!("0.0.0.0:{port}"),
                    "--name",
                    &name,
                    "--unhealthy-file",
                    unhealthy.to_str().unwrap(),
                ],
                &dir.join(format!("app-{name}-{port}.log")),
            )
            .unwrap();
        }
        let agent = mesh
            .start_onboarded_agent(&ns, &payment_root, &name, &ip, base_id, &[])
            .unwrap();
        vms.push(Vm { ns, ip, agent });
    }
    mesh.start_onboarded_agent(&client, &client_root, client.name(), &client_ip, 83, &[])
        .unwrap();

    // Both register; their probes pass, so both join the client's endpoints.
    for vm in &vms {
        let name = format!("payment-vms-{}", vm.ip);
        eventually("a healthy entry", || {
            let entry = mesh.entry("vm-workloads", &name)?;
            assert_eq!(
                entry["metadata"]["annotations"]["proxy.istio.io/health-checks-enabled"], "true",
                "the group has a probe"
            );
            (healthy_condition(&entry)["status"] == "True").then_some(())
        });
    }
    let both: Vec<String> = vms.iter().map(|vm| format!("{}:8080", vm.ip)).collect();
    eventually("both VMs in the client's endpoints", || {
        (client_endpoints(&client) == both).then_some(())
    });

    // The client's plain request, by name, reaches both through capture.
    let vip = mesh.vip_of(HOST).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(call(&client, &vip).expect("request through the mesh"));
    }
    let names: std::collections::BTreeSet<String> =
        vms.iter().map(|vm| vm.ns.name().to_string()).collect();
    assert_eq!(seen, names, "both VMs answer");
    // Over mTLS: the client's sidecar made TLS handshakes to them, and STRICT
    // refuses plaintext on the VMs' port.
    let (_, stats) = curl(
        &client,
        &["http://127.0.0.1:15000/stats?filter=ssl.handshake"],
    );
    let handshakes: u64 = stats
        .lines()
        .filter(|l| l.starts_with(&format!("cluster.outbound|8080||{HOST}.ssl.handshake:")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(handshakes > 0, "mTLS to the VMs:\n{stats}");
    let (ok, text) = curl(
        &server,
        &["-f", &format!("http://{}:8080/api/payments/1", vms[1].ip)],
    );
    assert!(!ok, "plaintext to a VM refused under STRICT: {text}");

    // SSH-port traffic reaches the application itself, not Envoy (whose
    // inbound would refuse a port no service names).
    let (ok, text) = curl(&client, &["-i", &format!("http://{}:22/ssh", vms[0].ip)]);
    assert!(ok, "port 22 reached: {text}");
    assert!(
        !text.to_ascii_lowercase().contains("x-envoy"),
        "port 22 not proxied:\n{text}"
    );

    // The status port: readiness, merged metrics, and `vmesh agent wait`.
    let (ok, text) = curl(&vms[0].ns, &["-f", "http://127.0.0.1:15020/healthz/ready"]);
    assert!(ok, "ready: {text}");
    let (_, metrics) = curl(&vms[0].ns, &["http://127.0.0.1:15020/stats/prometheus"]);
    for metric in [
        "vmesh_agent_certificate_expiry_timestamp_seconds",
        "vmesh_agent_workload_healthy 1",
        "envoy_server_live",
    ] {
        assert!(metrics.contains(metric), "{metric} in the merged metrics");
    }
    let wait = vms[0]
        .ns
        .command(&[VMESH, "agent", "wait", "--timeout", "5s"])
        .output()
        .unwrap();
    assert!(wait.status.success(), "vmesh agent wait: {wait:?}");

    // VM 2's application fails its probe: out of the client's endpoints
    // within periodSeconds × failureThreshold + 1 s, the reason on its entry.
    let limit = Duration::from_secs(PERIOD_SECONDS * FAILURE_THRESHOLD + 1);
    let unhealthy = dir.join(format!("{}.unhealthy", vms[1].ns.name()));
    let failing_since = Instant::now();
    std::fs::write(&unhealthy, "").unwrap();
    let only_first = vec![both[0].clone()];
    eventually("VM 2 out of the client's endpoints", || {
        (client_endpoints(&client) == only_first).then_some(())
    });
    let took = failing_since.elapsed();
    eprintln!("unhealthy VM out of the client's endpoints after {took:?}");
    assert!(
        took <= limit,
        "unhealthy VM left EDS after {took:?} (limit {limit:?})"
    );
    let condition = healthy_condition(
        &mesh
            .entry("vm-workloads", &format!("payment-vms-{}", vms[1].ip))
            .unwrap(),
    );
    assert_eq!(condition["status"], "False");
    assert!(
        condition["message"]
            .as_str()
            .unwrap_or_default()
            .contains("503"),
        "the probe's reason: {condition}"
    );
    for _ in 0..10 {
        assert_eq!(
            call(&client, &vip).unwrap(),
            vms[0].ns.name(),
            "only VM 1 serves"
        );
    }
    let (_, metrics) = curl(&vms[1].ns, &["http://127.0.0.1:15020/stats/prometheus"]);
    assert!(
        metrics.contains("vmesh_agent_workload_healthy 0"),
        "{metrics}"
    );
    // Healthy again: back in.
    std::fs::remove_file(&unhealthy).unwrap();
    eventually("VM 2 back in the client's endpoints", || {
        (client_endpoints(&client) == both).then_some(())
    });

    // VM 2's agent stops: its entry goes after the 2 s grace period, the
    // client's endpoints follow, and from then on no request fails.
    vms[1].ns.stop(vms[1].agent).unwrap();
    let name = format!("payment-vms-{}", vms[1].ip);
    eventually("VM 2's entry deleted", || {
        mesh.entry("vm-workloads", &name).is_none().then_some(())
    });
    eventually("VM 2 out of the client's endpoints", || {
        (client_endpoints(&client) == only_first).then_some(())
    });
    for _ in 0..30 {
        assert_eq!(
            call(&client, &vip).expect("no request fails once EDS caught up"),
            vms[0].ns.name()
        );
    }

    // VM 2's bootstrap token has expired by the time its agent starts again:
    // it comes back on the certificate it keeps on disk.
    let expired = mesh
        .cli(&[
            "token",
            "create",
            "-n",
            "vm-workloads",
            "--service-account",
            "payment-service-sa",
            "--duration",
            "1s",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(
        payment_root.join("var/lib/istio/tokens/istio-token"),
        expired.trim(),
    )
    .unwrap();
    let back = &mut vms[1];
    back.agent = mesh
        .start_onboarded_agent(&back.ns, &payment_root, back.ns.name(), &back.ip, 82, &[])
        .unwrap();
    eventually("VM 2 back after a restart with an expired token", || {
        (client_endpoints(&client) == both).then_some(())
    });
    let log = std::fs::read_to_string(dir.join(format!("agent-{}.log", vms[1].ns.name()))).unwrap();
    assert!(
        log.contains("using the stored workload certificate")
            && !log.contains("workload certificate issued"),
        "the stored certificate, no new one:\n{log}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(call(&client, &vip).expect("both serve again"));
    }
    assert_eq!(seen, names, "both VMs answer again");
}
