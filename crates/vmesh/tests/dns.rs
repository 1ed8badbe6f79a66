//! DNS for VMs end to end. A payment VM and a client VM, each a network
//! namespace onboarded the guide's way (DNS capture on, as the onboarding
//! files say by default), a control plane in a third namespace that routes
//! between them, and the VMs' upstream DNS server: dnsmasq, in the control
//! plane's namespace, logging every query it gets.
//!
//! On the client, with no configuration of its own: `getent` and `dig`
//! answer mesh names (the Service by full and short names, the guide's
//! ServiceEntry) from the name table, and those names never reach the
//! upstream; other names are answered by the upstream; `curl` by name
//! reaches the payment VM through Envoy with mTLS. With the control plane
//! stopped, mesh names still resolve and other names still forward. With
//! the agent stopped, resolution is exactly what it was before.
//!
//! Needs root, `ip`, `iptables`, `curl`, `dig`, `dnsmasq` and Envoy; without
//! them it fails, it never skips.

use vmesh_testkit::netns::link;
use vmesh_testkit::testing::{PAYMENT_MESH, envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

const HOST: &str = "payment-service.vm-workloads.svc.cluster.local";
const DATABASE: &str = "vm-database.vm-workloads.svc.cluster.local";
/// The upstream answers every name under example.test with this address.
const EXTERNAL_IP: &str = "10.99.0.7";

/// `dig +short` in `ns`, one line per answer.
fn dig(ns: &Namespace, args: &[&str]) -> Vec<String> {
    let output = ns
        .command(&["dig", "+short", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `dig`'s status line fields for a query in `ns`: (status, answer count).
fn dig_status(ns: &Namespace, args: &[&str]) -> (String, String) {
    let output = ns
        .command(&["dig", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_default()
        .to_string();
    let answers = text
        .split("ANSWER: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_default()
        .to_string();
    (status, answers)
}

fn getent(ns: &Namespace, name: &str) -> Option<String> {
    let output = ns.command(&["getent", "hosts", name]).output().unwrap();
    output.status.success().then(|| {
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

#[test]
fn mesh_names_resolve_on_vms_and_nothing_else_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let id = std::process::id();
    let server = Namespace::new(&format!("vmesh-ds-{id}"));
    let vm = Namespace::new(&format!("vmesh-dv-{id}"));
    let client = Namespace::new(&format!("vmesh-dc-{id}"));
    link(&vm, "10.54.1.1", &server, "10.54.1.2", &format!("dv{id}")).unwrap();
    link(
        &client,
        "10.54.3.1",
        &server,
        "10.54.3.2",
        &format!("dc{id}"),
    )
    .unwrap();
    vm.run(&["ip", "route", "add", "default", "via", "10.54.1.2"]);
    client.run(&["ip", "route", "add", "default", "via", "10.54.3.2"]);
    server.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // Both VMs' resolver: the upstream in the control plane's namespace.
    let resolv = "nameserver 10.54.3.2\nsearch corp.example\n";
    vm.resolv_conf(resolv).unwrap();
    client.resolv_conf(resolv).unwrap();
    let upstream_log = dir.join("dnsmasq.log");
    server
        .spawn(
            &[
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=10.54.3.2",
                "--user=root",
                "--pid-file=",
                &format!("--address=/example.test/{EXTERNAL_IP}"),
                "--log-queries",
                "--log-facility=-",
            ],
            &upstream_log,
        )
        .unwrap();
    let before_external = eventually("the upstream answering", || {
        getent(&client, "example.test").filter(|ip| ip == EXTERNAL_IP)
    });
    assert_eq!(
        getent(&client, HOST),
        None,
        "no mesh names before the agent"
    );

    let mesh = Mesh::new(VMESH, &server, dir).with_envoy(&envoy_binary());
    let server_process = mesh
        .start_server(&server, &["--xds-addr", "0.0.0.0:15012"])
        .unwrap();
    mesh.cli(&["create", "namespace", "vm-workloads"]).unwrap();
    mesh.apply("mesh.yaml", PAYMENT_MESH).unwrap();
    let database = vmesh_api::testing::seed_dir().join("service-entry-vm-database.yaml");
    mesh.apply_file(&database).unwrap();
    let vip = mesh.vip_of(HOST).unwrap();
    let database_vip = mesh.vip_of(DATABASE).unwrap();

    let payment_root = mesh
        .onboard("payment-vms", "vm-workloads", "10.54.1.2")
        .unwrap();
    let client_root = mesh
        .onboard("client-vms", "vm-workloads", "10.54.1.2")
        .unwrap();
    let cluster_env =
        std::fs::read_to_string(client_root.join("var/lib/istio/envoy/cluster.env")).unwrap();
    assert!(
        cluster_env.contains("ISTIO_META_DNS_CAPTURE='true'"),
        "DNS capture is on in the onboarding files: {cluster_env}"
    );
    vm.spawn(
        &[
            VMESH,
            "demo-app",
            "--addr",
            "0.0.0.0:8080",
            "--name",
            "payment-vm",
        ],
        &dir.join("app.log"),
    )
    .unwrap();
    // From here on, the upstream's log shows what the agents let through.
    let logged_before = std::fs::read_to_string(&upstream_log).unwrap().len();
    mesh.start_onboarded_agent(&vm, &payment_root, vm.name(), "10.54.1.1", 95, &[])
        .unwrap();
    let client_agent = mesh
        .start_onboarded_agent(&client, &client_root, client.name(), "10.54.3.1", 96, &[])
        .unwrap();

    // The name table reaches the client's agent.
    eventually("the client's name table", || {
        let output = client
            .command(&[VMESH, "proxy-config", "dns", "--json"])
            .output()
            .unwrap();
        let dump: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        (dump["names"][HOST][0] == vip.as_str()).then_some(())
    });
    let table = client.run(&[VMESH, "proxy-config", "dns"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("payment-service.vm-workloads ") && l.ends_with(vip.as_str())),
        "{table}"
    );

    // A Service that appears later is in the name table, and resolves on
    // the VM, within a second of `vmesh apply`.
    let applied = tokio::time::Instant::now();
    mesh.apply(
        "ledger.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ledger, namespace: vm-workloads}\n\
         spec:\n  selector: {app: ledger}\n  ports: [{name: http, port: 8080}]\n",
    )
    .unwrap();
    let ledger_vip = mesh
        .vip_of("ledger.vm-workloads.svc.cluster.local")
        .unwrap();
    let resolved = vmesh_testkit::poll::wait_for(std::time::Duration::from_secs(1), || {
        (dig(&client, &["ledger.vm-workloads.svc.cluster.local"]) == [ledger_vip.as_str()])
            .then_some(())
    });
    assert!(
        resolved.is_some(),
        "the new Service resolved {:?} after vmesh apply (limit 1 s)",
        applied.elapsed()
    );

    // Mesh names, from the table, through capture of the resolver's own DNS.
    assert_eq!(getent(&client, HOST).as_deref(), Some(vip.as_str()));
    assert_eq!(
        dig(&client, &["payment-service.vm-workloads"]),
        [vip.as_str()]
    );
    assert_eq!(
        dig(&client, &["payment-service"]),
        [vip.as_str()],
        "short name in its own namespace"
    );
    assert_eq!(
        dig(&client, &["+tcp", HOST]),
        [vip.as_str()],
        "over TCP too"
    );
    assert_eq!(dig(&client, &[DATABASE]), [database_vip.as_str()]);
    assert!(database_vip.starts_with("240.240."), "{database_vip}");
    // A search-domain expansion of a mesh name is answered here too.
    assert_eq!(
        dig(&client, &[&format!("{HOST}.corp.example")]),
        [vip.as_str()]
    );
    // IPv4 only: AAAA is an empty NOERROR, not NXDOMAIN.
    assert_eq!(
        dig_status(&client, &["AAAA", HOST]),
        ("NOERROR".into(), "0".into())
    );
    // Everything else: the upstream's answer.
    assert_eq!(dig(&client, &["example.test"]), [EXTERNAL_IP]);
    assert_eq!(
        getent(&client, "www.example.test").as_deref(),
        Some(EXTERNAL_IP)
    );

    // The application calls the service by name, nothing else configured.
    let answer = eventually("the payment VM through the mesh", || {
        let output = client
            .command(&[
                "curl",
                "-sf",
                "--max-time",
                "5",
                "http://payment-service.vm-workloads:8080/api/payments/1",
            ])
            .output()
            .unwrap();
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).to_string())
    });
    assert!(answer.contains("name=payment-vm"), "{answer}");
    let stats = client.run(&[
        "curl",
        "-s",
        "http://127.0.0.1:15000/stats?filter=ssl.handshake",
    ]);
    assert!(
        stats.lines().any(|l| l
            .starts_with(&format!("cluster.outbound|8080||{HOST}.ssl.handshake: "))
            && !l.ends_with(" 0")),
        "over mTLS:\n{stats}"
    );

    // Mesh names never reached the upstream; the others did.
    let log = std::fs::read_to_string(&upstream_log).unwrap()[logged_before..].to_string();
    assert!(log.contains("example.test"), "{log}");
    for name in ["payment-service", "vm-database"] {
        assert!(!log.contains(name), "{name} leaked upstream:\n{log}");
    }

    // The metrics count it.
    let metrics = client.run(&["curl", "-s", "http://127.0.0.1:15020/stats/prometheus"]);
    for metric in [
        "vmesh_agent_dns_answered_locally_total",
        "vmesh_agent_dns_forwarded_total",
    ] {
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{metric} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{metric} in\n{metrics}"));
        assert!(value > 0.0, "{metric} = {value}");
    }

    // The control plane goes away: the last table still answers.
    server.stop(server_process).unwrap();
    assert_eq!(
        dig(&client, &["payment-service.vm-workloads"]),
        [vip.as_str()]
    );
    assert_eq!(getent(&client, HOST).as_deref(), Some(vip.as_str()));
    assert_eq!(dig(&client, &["example.test"]), [EXTERNAL_IP]);

    // The agent stops: its capture goes, and resolution is as it was.
    client.stop(client_agent).unwrap();
    let nat = client.run(&["iptables-save", "-t", "nat"]);
    assert!(!nat.contains("ISTIO"), "capture removed:\n{nat}");
    assert_eq!(getent(&client, HOST), None);
    assert_eq!(getent(&client, "example.test"), Some(before_external));
}
