//! Several `vmesh server`s on one real etcd cluster (Debian's etcd-server,
//! three members on loopback) are one control plane: each issues under one
//! offline root through its own intermediate (`vmesh ca intermediate`), a
//! write through any is seen through every other, concurrent writers
//! through all three lose nothing, services created at the same moment
//! through different servers get distinct virtual IPs, a one-use join
//! token joins one VM whichever servers it is shown to, and an etcd
//! without quorum is a 503 that names the cause until it comes back.
//!
//! A server given only the store enrolls with the one that holds the root.
//! A running redb mesh moves to etcd with `vmesh backup` and `vmesh restore`.
//!
//! And a VM keeps working when the server it is connected to is killed:
//! its agent moves to another within seconds, no request between VMs
//! fails, its auto-registered entry stays, and later changes reach it.
//!
//! Needs etcd, curl, and for the failover test root, `ip`, `iptables` and
//! Envoy; without them it fails, it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use vmesh_testkit::etcd::EtcdCluster;
use vmesh_testkit::netns::link;
use vmesh_testkit::testing::{PAYMENT_MESH, envoy_binary};
use vmesh_testkit::{LocalServer, Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

struct ControlPlane {
    etcd: EtcdCluster,
    servers: Vec<LocalServer>,
    dir: PathBuf,
}

/// `vmesh ca intermediate` under the root in `root_dir`, into `out`: the
/// server flags that use it (`--ca-cert`, `--ca-key`, `--ca-chain`).
fn intermediate(root_dir: &Path, out: &Path, name: &str) -> Vec<String> {
    let made = Command::new(VMESH)
        .args(["ca", "intermediate", "--root-dir"])
        .arg(root_dir)
        .arg("--out")
        .arg(out)
        .args(["--name", name])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let file = |name: &str| out.join(name).to_str().unwrap().to_string();
    [
        ("--ca-cert", "ca-cert.pem"),
        ("--ca-key", "ca-key.pem"),
        ("--ca-chain", "cert-chain.pem"),
    ]
    .into_iter()
    .flat_map(|(flag, name)| [flag.to_string(), file(name)])
    .collect()
}

/// `count` servers on a three-member etcd, each with an intermediate of one
/// offline root.
fn control_plane(dir: &Path, count: usize) -> ControlPlane {
    let etcd = EtcdCluster::start(3, &dir.join("etcd")).unwrap();
    let url = etcd.url("mesh");
    let servers = (0..count)
        .map(|i| {
            let ca_flags = intermediate(
                &dir.join("offline-root"),
                &dir.join(format!("ca-{i}")),
                &format!("server-{i}"),
            );
            let mut flags = vec!["--store", url.as_str()];
            flags.extend(ca_flags.iter().map(String::as_str));
            LocalServer::start(
                Path::new(VMESH),
                &dir.join(format!("data-{i}")),
                &flags,
                &[],
            )
            .unwrap()
        })
        .collect();
    ControlPlane {
        etcd,
        servers,
        dir: dir.to_path_buf(),
    }
}

/// One request with curl: the status and the body as JSON (Null if none).
fn request(method: &str, url: &str, body: Option<&Value>) -> (u16, Value) {
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--max-time",
        "20",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(body) = body {
        curl.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(body.to_string());
    }
    let output = curl.arg(url).output().expect("curl (Debian package curl)");
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn apply(server: &LocalServer, yaml: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = server
        .command(&["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Polls `check` every 200 ms until it holds, failing the test after `limit`.
#[track_caller]
fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const ENTRIES: &str = "apis/networking.istio.io/v1/namespaces/default/workloadentries";

#[test]
fn three_servers_on_etcd_are_one_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let plane = control_plane(dir.path(), 3);
    let servers = &plane.servers;

    // One root: every server publishes the same, issued through its own
    // intermediate.
    let roots: Vec<String> = servers
        .iter()
        .map(|s| {
            let (code, cm) = request(
                "GET",
                &format!(
                    "{}/api/v1/namespaces/istio-system/configmaps/istio-ca-root-cert",
                    s.api()
                ),
                None,
            );
            assert_eq!(code, 200, "{cm}");
            cm["data"]["root-cert.pem"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(roots.iter().all(|r| r == &roots[0]));
    let offline_root =
        std::fs::read_to_string(plane.dir.join("offline-root/root-cert.pem")).unwrap();
    assert_eq!(roots[0].trim(), offline_root.trim());

    // A write through one server is read through another.
    let applied = apply(
        &servers[0],
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: counter, namespace: default}\nspec: {address: 10.0.0.1}\n",
    );
    assert!(applied.status.success(), "{applied:?}");
    eventually(
        "the entry through the third server",
        Duration::from_secs(5),
        || {
            request(
                "GET",
                &format!("{}/{ENTRIES}/counter", servers[2].api()),
                None,
            )
            .0 == 200
        },
    );

    // 20 writers spread over the three servers: each creates its own entry
    // and increments a shared annotation read-modify-write with the
    // resourceVersion it read; a stale write is a 409 and is retried.
    const WRITERS: usize = 20;
    const INCREMENTS: u64 = 5;
    let apis: Arc<Vec<String>> = Arc::new(servers.iter().map(|s| s.api().to_string()).collect());
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let apis = apis.clone();
            std::thread::spawn(move || {
                let api = &apis[writer % apis.len()];
                let own = json!({
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "WorkloadEntry",
                    "metadata": {"name": format!("writer-{writer}"), "namespace": "default"},
                    "spec": {"address": format!("10.0.1.{writer}")},
                });
                let (code, body) = request("POST", &format!("{api}/{ENTRIES}"), Some(&own));
                assert_eq!(code, 201, "{body}");
                let (mut done, mut conflicts) = (0, 0);
                while done < INCREMENTS {
                    let (code, mut counter) =
                        request("GET", &format!("{api}/{ENTRIES}/counter"), None);
                    assert_eq!(code, 200, "{counter}");
                    let count: u64 = counter["metadata"]["annotations"]["count"]
                        .as_str()
                        .map_or(0, |c| c.parse().unwrap());
                    counter["metadata"]["annotations"] = json!({"count": (count + 1).to_string()});
                    let (code, body) =
                        request("PUT", &format!("{api}/{ENTRIES}/counter"), Some(&counter));
                    match code {
                        200 => done += 1,
                        409 => conflicts += 1,
                        other => panic!("PUT answered {other}: {body}"),
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(conflicts > 0, "the writers did race");
    for api in apis.iter() {
        let (_, counter) = request("GET", &format!("{api}/{ENTRIES}/counter"), None);
        assert_eq!(
            counter["metadata"]["annotations"]["count"],
            (WRITERS as u64 * INCREMENTS).to_string(),
            "no acknowledged increment lost, as {api} sees it"
        );
        let (_, list) = request("GET", &format!("{api}/{ENTRIES}"), None);
        assert_eq!(list["items"].as_array().unwrap().len(), WRITERS + 1);
    }

    // 50 ServiceEntries without addresses, created at the same moment
    // through all three servers: 50 distinct virtual IPs.
    const SERVICES: usize = 50;
    let creators: Vec<_> = (0..SERVICES)
        .map(|i| {
            let api = apis[i % apis.len()].clone();
            std::thread::spawn(move || {
                let entry = json!({
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "ServiceEntry",
                    "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
                    "spec": {
                        "hosts": [format!("svc-{i}.example.internal")],
                        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                        "resolution": "STATIC",
                    },
                });
                let (code, body) = request(
                    "POST",
                    &format!("{api}/apis/networking.istio.io/v1/namespaces/default/serviceentries"),
                    Some(&entry),
                );
                assert_eq!(code, 201, "{body}");
            })
        })
        .collect();
    for creator in creators {
        creator.join().unwrap();
    }
    let vips = |api: &str| -> Vec<String> {
        let (_, cm) = request(
            "GET",
            &format!("{api}/api/v1/namespaces/istio-system/configmaps/vmesh-vip-allocations"),
            None,
        );
        (0..SERVICES)
            .filter_map(|i| {
                cm["data"][format!("svc-{i}.example.internal")]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    };
    eventually(
        "a VIP for each of the 50 services",
        Duration::from_secs(20),
        || vips(&apis[0]).len() == SERVICES,
    );
    let mut allocated = vips(&apis[1]);
    allocated.sort();
    allocated.dedup();
    assert_eq!(allocated.len(), SERVICES, "no address given twice");

    // A one-use join token shown to two servers at once joins one VM.
    let group = "apiVersion: v1\nkind: Namespace\nmetadata: {name: vm-workloads}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: payment-vms, namespace: vm-workloads}\nspec:\n  metadata: {labels: {app: payment}}\n  template: {serviceAccount: payment-sa}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: payment-sa, namespace: vm-workloads}\n";
    let applied = apply(&servers[0], group);
    assert!(applied.status.success(), "{applied:?}");
    let configured = servers[1]
        .command(&[
            "workload",
            "entry",
            "configure",
            "--name",
            "payment-vms",
            "-n",
            "vm-workloads",
            "--autoregister",
            "--ingressHost",
            "127.0.0.1",
            "--join",
        ])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&configured.stdout);
    assert!(
        configured.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&configured.stderr)
    );
    let words: Vec<&str> = printed.split_whitespace().collect();
    let after = |flag: &str| words[words.iter().position(|w| *w == flag).unwrap() + 1].to_string();
    let (token, pin) = (after("--token"), after("--ca-hash"));
    let joins: Vec<_> = [0, 2]
        .into_iter()
        .map(|i| {
            let server = servers[i].xds().to_string();
            let root = plane.dir.join(format!("vm-root-{i}"));
            let (token, pin) = (token.clone(), pin.clone());
            std::thread::spawn(move || {
                Command::new(VMESH)
                    .args(["agent", "--root"])
                    .arg(&root)
                    .args(["join", "--server", &server, "--token", &token])
                    .args(["--ca-hash", &pin, "--no-start"])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    let outcomes: Vec<_> = joins.into_iter().map(|j| j.join().unwrap()).collect();
    let joined = outcomes.iter().filter(|o| o.status.success()).count();
    assert_eq!(joined, 1, "{outcomes:?}");
    let refused = outcomes.iter().find(|o| !o.status.success()).unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("used up"),
        "{refused:?}"
    );
}

#[test]
fn without_quorum_writes_are_a_clear_503_until_etcd_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut plane = control_plane(dir.path(), 1);
    let server = &plane.servers[0];
    let entry = |name: &str| {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"address": "10.0.0.1"},
        })
    };
    let create = |name: &str| {
        request(
            "POST",
            &format!("{}/{ENTRIES}", server.api()),
            Some(&entry(name)),
        )
    };
    assert_eq!(create("before").0, 201);
    plane.etcd.kill(0);
    assert_eq!(
        create("one-member-down").0,
        201,
        "two of three are a quorum"
    );

    plane.etcd.kill(1);
    let (code, body) = create("no-quorum");
    assert_eq!(code, 503, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("etcd") && message.contains("quorum"),
        "{message}"
    );
    eventually(
        "the server reports its store not ready",
        Duration::from_secs(10),
        || request("GET", &format!("{}/ready", server.monitoring()), None).0 == 503,
    );

    plane.etcd.restart(0).unwrap();
    plane.etcd.restart(1).unwrap();
    eventually("writes again", Duration::from_secs(30), || {
        create("after").0 == 201
    });
    let (_, list) = request("GET", &format!("{}/{ENTRIES}", server.api()), None);
    let mut names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["after", "before", "one-member-down"]);
    eventually("ready again", Duration::from_secs(10), || {
        request("GET", &format!("{}/ready", server.monitoring()), None).0 == 200
    });
}

/// `vmesh load` from `client` to `url` for `duration` (4 connections), in
/// a thread: its summary, when joined.
fn load_in_background(
    client: &Namespace,
    url: &str,
    duration: &str,
) -> std::thread::JoinHandle<Value> {
    let (client, url, duration) = (
        client.name().to_string(),
        url.to_string(),
        duration.to_string(),
    );
    std::thread::spawn(move || {
        let output = vmesh_testkit::netns::command_in(
            &client,
            &[
                VMESH,
                "load",
                "--url",
                &url,
                "--duration",
                &duration,
                "--concurrency",
                "4",
            ],
        )
        .output()
        .unwrap();
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    })
}

/// The xDS address of server `i` in the failover test: an address of the
/// control namespace every VM routes to.
fn failover_xds(i: usize) -> String {
    format!("10.63.100.{}:15012", i + 1)
}

/// A VM on its own link to the control namespace, which routes.
fn routed_vm(control: &Namespace, index: u8, tag: &str) -> (Namespace, String) {
    let ns = Namespace::new(&format!("vmesh-ha{tag}-{}", std::process::id()));
    let (ip, gateway) = (format!("10.63.{index}.1"), format!("10.63.{index}.2"));
    link(
        &ns,
        &ip,
        control,
        &gateway,
        &format!("ha{tag}{}", std::process::id()),
    )
    .unwrap();
    ns.run(&["ip", "route", "add", "default", "via", &gateway]);
    (ns, ip)
}

#[test]
fn killing_the_server_a_vm_uses_or_etcd_quorum_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let control = Namespace::new(&format!("vmesh-hacp-{}", std::process::id()));
    let (payment, payment_ip) = routed_vm(&control, 1, "p");
    let (client, client_ip) = routed_vm(&control, 2, "c");
    control.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    control.run(&["ip", "link", "set", "lo", "up"]);
    for i in 0..3 {
        let address = format!("10.63.100.{}/32", i + 1);
        control.run(&["ip", "addr", "add", &address, "dev", "lo"]);
    }
    // etcd and three servers in the control namespace, each server on an
    // address of its own, under one offline root.
    let etcd = EtcdCluster::start_in(Some(control.name()), 3, &dir.join("etcd")).unwrap();
    let mesh = Mesh::new(VMESH, &control, dir).with_envoy(&envoy_binary());
    let apis: Vec<String> = (0..3)
        .map(|i| format!("http://127.0.0.1:{}", 15080 + i))
        .collect();
    let mut servers = Vec::new();
    for i in 0..3 {
        let ca_flags = intermediate(
            &dir.join("offline-root"),
            &dir.join(format!("ca-{i}")),
            &format!("server-{i}"),
        );
        let data = dir.join(format!("data-{i}"));
        let (xds, api, monitoring) = (
            failover_xds(i),
            format!("127.0.0.1:{}", 15080 + i),
            format!("127.0.0.1:{}", 15014 + i),
        );
        let index = control
            .spawn(
                &[
                    VMESH,
                    "server",
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--store",
                    &etcd.url("mesh"),
                    &ca_flags[0],
                    &ca_flags[1],
                    &ca_flags[2],
                    &ca_flags[3],
                    &ca_flags[4],
                    &ca_flags[5],
                    "--xds-addr",
                    &xds,
                    "--api-addr",
                    &api,
                    "--monitoring-addr",
                    &monitoring,
                    "--auto-registration-grace",
                    "2s",
                ],
                &dir.join(format!("server-{i}.log")),
            )
            .unwrap();
        servers.push(index);
    }
    let cli = |server: usize, args: &[&str]| {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--server", apis[server].as_str()]);
        mesh.cli(&full)
    };
    for i in 0..3 {
        eventually(
            &format!("server {i}'s API"),
            Duration::from_secs(20),
            || cli(i, &["get", "ns"]).is_ok(),
        );
    }
    cli(0, &["create", "namespace", "vm-workloads"]).unwrap();
    mesh.apply("mesh.yaml", PAYMENT_MESH).unwrap();
    let payment_root = mesh
        .onboard("payment-vms", "vm-workloads", "10.63.100.1")
        .unwrap();
    let client_root = mesh
        .onboard("client-vms", "vm-workloads", "10.63.100.1")
        .unwrap();
    // Every agent knows all three servers; the first answers first.
    let all_servers = (0..3).map(failover_xds).collect::<Vec<_>>().join(",");
    payment
        .spawn(
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
    mesh.start_onboarded_agent(
        &payment,
        &payment_root,
        "payment-vm",
        &payment_ip,
        91,
        &["--server", &all_servers],
    )
    .unwrap();
    mesh.start_onboarded_agent(
        &client,
        &client_root,
        "client-vm",
        &client_ip,
        92,
        &["--server", &all_servers],
    )
    .unwrap();
    let entry = format!("payment-vms-{payment_ip}");
    let connected_to = |server: usize| {
        let monitoring = format!("http://127.0.0.1:{}", 15014 + server);
        cli(server, &["proxy-status", "--monitoring", &monitoring])
            .is_ok_and(|status| status.contains("payment-vm"))
    };
    eventually(
        "the payment VM registered and connected to server 0",
        Duration::from_secs(20),
        || connected_to(0) && cli(1, &["get", "we", &entry, "-n", "vm-workloads"]).is_ok(),
    );
    let vip = mesh
        .vip_of("payment-service.vm-workloads.svc.cluster.local")
        .unwrap();
    let url = format!("http://{vip}:8080/api/payments/1");
    eventually(
        "the client reaches the payment VM",
        Duration::from_secs(20),
        || {
            mesh.load(&client, &url, &["--requests", "1"])
                .is_ok_and(|summary| summary["codes"]["200"] == 1)
        },
    );

    // The VM's health as its probe reported it: the move must not reset it
    // (its endpoint would leave the client's EDS until the next report).
    let healthy_since = |server: usize| {
        let text = cli(
            server,
            &["get", "we", &entry, "-n", "vm-workloads", "-o", "json"],
        )
        .ok()?;
        let entry: Value = serde_json::from_str(&text).ok()?;
        entry["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Healthy" && c["status"] == "True")
            .map(|c| c["lastTransitionTime"].clone())
    };
    let mut before = None;
    eventually("the payment VM healthy", Duration::from_secs(10), || {
        before = healthy_since(0);
        before.is_some()
    });

    // Requests flow for 12 s; 2 s in, the server the VM uses is killed.
    let load = load_in_background(&client, &url, "12s");
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = tokio::time::Instant::now();
    vmesh_testkit::process::signal(control.pid(servers[0]), "KILL");
    eventually(
        "the payment VM on another server",
        Duration::from_secs(10),
        || connected_to(1) || connected_to(2),
    );
    let moved = killed_at.elapsed();
    assert_eq!(healthy_since(1), before, "the move kept the VM's health");
    assert!(
        moved < Duration::from_secs(5),
        "reconnected after {moved:?}"
    );

    // A change made afterwards, through another server, reaches the VM.
    let new_service = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: after-failover, namespace: vm-workloads}\nspec:\n  hosts: [after-failover.example.internal]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints: [{address: 10.63.9.9}]\n";
    std::fs::write(dir.join("after.yaml"), new_service).unwrap();
    cli(
        1,
        &["apply", "-f", dir.join("after.yaml").to_str().unwrap()],
    )
    .unwrap();
    eventually(
        "the change in the payment VM's Envoy",
        Duration::from_secs(10),
        || {
            payment
                .exec(&["curl", "-s", "http://127.0.0.1:15000/clusters"])
                .is_ok_and(|clusters| clusters.contains("after-failover.example.internal"))
        },
    );

    let summary = load.join().unwrap();
    let codes = summary["codes"].as_object().unwrap();
    assert_eq!(
        codes.keys().collect::<Vec<_>>(),
        ["200"],
        "no request failed: {summary}"
    );
    assert!(summary["requests"].as_u64().unwrap() > 100, "{summary}");
    // Past the grace period, the VM's entry is still there.
    std::thread::sleep(Duration::from_secs(3));
    assert!(cli(2, &["get", "we", &entry, "-n", "vm-workloads"]).is_ok());

    // Two of three etcd members lost: the API refuses writes with a 503
    // naming etcd, and traffic between the VMs goes on untouched.
    let mut etcd = etcd;
    etcd.kill(0);
    etcd.kill(1);
    let load = load_in_background(&client, &url, "6s");
    let refused = cli(1, &["create", "namespace", "during-the-outage"]).unwrap_err();
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("503") || refused.contains("ServiceUnavailable"),
        "{refused}"
    );
    assert!(
        refused.contains("etcd") && refused.contains("quorum"),
        "{refused}"
    );
    let summary = load.join().unwrap();
    let codes = summary["codes"].as_object().unwrap();
    assert_eq!(
        codes.keys().collect::<Vec<_>>(),
        ["200"],
        "traffic unaffected: {summary}"
    );

    // Quorum back: everything written before is there, and writes resume.
    etcd.restart(0).unwrap();
    etcd.restart(1).unwrap();
    eventually(
        "writes through server 2 again",
        Duration::from_secs(30),
        || cli(2, &["create", "namespace", "after-the-outage"]).is_ok(),
    );
    assert!(cli(2, &["get", "se", "after-failover", "-n", "vm-workloads"]).is_ok());
    assert!(cli(1, &["get", "we", &entry, "-n", "vm-workloads"]).is_ok());
}

#[test]
fn backup_and_restore_move_a_running_mesh_from_redb_to_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let old = LocalServer::start(Path::new(VMESH), &dir.path().join("old"), &[], &[]).unwrap();
    let applied = apply(
        &old,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: vm-workloads}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm1, namespace: vm-workloads}\nspec: {address: 10.0.0.1}\n",
    );
    assert!(applied.status.success(), "{applied:?}");
    // Taken while the server runs.
    let snapshot = dir.path().join("mesh.snapshot");
    let backup = old
        .command(&["backup", "-o", snapshot.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(backup.status.success(), "{backup:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&snapshot).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (_, entry_before) = request(
        "GET",
        &format!(
            "{}/apis/networking.istio.io/v1/namespaces/vm-workloads/workloadentries/vm1",
            old.api()
        ),
        None,
    );
    drop(old);

    let etcd = EtcdCluster::start(1, &dir.path().join("etcd")).unwrap();
    let restore = |from: &Path| {
        Command::new(VMESH)
            .args(["restore", "--from"])
            .arg(from)
            .args(["--store", &etcd.url("mesh")])
            .output()
            .unwrap()
    };
    let restored = restore(&snapshot);
    assert!(restored.status.success(), "{restored:?}");
    // Never over a store that holds something.
    let again = restore(&snapshot);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("empty"),
        "{again:?}"
    );

    // The old root, for the new server: an intermediate of it.
    let url = etcd.url("mesh");
    let mut flags = vec!["--store", url.as_str()];
    let ca_flags = intermediate(
        &dir.path().join("old/ca"),
        &dir.path().join("ca-new"),
        "new",
    );
    flags.extend(ca_flags.iter().map(String::as_str));
    let new = LocalServer::start(Path::new(VMESH), &dir.path().join("new"), &flags, &[]).unwrap();
    let (code, entry_after) = request(
        "GET",
        &format!(
            "{}/apis/networking.istio.io/v1/namespaces/vm-workloads/workloadentries/vm1",
            new.api()
        ),
        None,
    );
    assert_eq!(code, 200, "{entry_after}");
    assert_eq!(entry_after["spec"], entry_before["spec"]);
    assert_eq!(
        entry_after["metadata"]["resourceVersion"],
        entry_before["metadata"]["resourceVersion"]
    );
}

#[test]
fn servers_without_a_ca_of_their_own_enroll_with_the_one_holding_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(1, &dir.path().join("etcd")).unwrap();
    let url = etcd.url("mesh");
    let start = |name: &str| {
        LocalServer::start(
            Path::new(VMESH),
            &dir.path().join(name),
            &["--store", &url],
            &[],
        )
        .unwrap()
    };
    // The first server makes the root; the others, given nothing but the
    // store, each get an intermediate of it from the first.
    let first = start("first");
    let second = start("second");
    let third = start("third");
    let root_of = |server: &LocalServer| {
        let (code, cm) = request(
            "GET",
            &format!(
                "{}/api/v1/namespaces/istio-system/configmaps/istio-ca-root-cert",
                server.api()
            ),
            None,
        );
        assert_eq!(code, 200, "{cm}");
        cm["data"]["root-cert.pem"]
            .as_str()
            .unwrap()
            .trim()
            .to_string()
    };
    let root = std::fs::read_to_string(dir.path().join("first/ca/root-cert.pem")).unwrap();
    for server in [&first, &second, &third] {
        assert_eq!(root_of(server), root.trim());
    }
    use std::os::unix::fs::PermissionsExt;
    for name in ["second", "third"] {
        let enrolled = dir.path().join(name).join("ca/intermediate");
        let key = std::fs::metadata(enrolled.join("ca-key.pem")).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join(name).join("ca/root-key.pem").exists());
        let chain = std::fs::read_to_string(enrolled.join("cert-chain.pem")).unwrap();
        assert!(
            chain.trim_end().ends_with(root.trim()),
            "{name}'s chain ends at the root"
        );
    }
    // An enrolled server starts again without the root holder.
    drop(second);
    drop(first);
    let second = start("second");
    assert_eq!(root_of(&second), root.trim());
}

#[test]
fn an_entry_whose_server_is_gone_is_taken_over_and_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(1, &dir.path().join("etcd")).unwrap();
    let url = etcd.url("mesh");
    let flags = ["--store", url.as_str(), "--auto-registration-grace", "1s"];
    let first =
        LocalServer::start(Path::new(VMESH), &dir.path().join("first"), &flags, &[]).unwrap();
    // An auto-registered entry of a server that never beat (it is gone).
    let orphan = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": "orphan", "namespace": "default", "annotations": {
            "istio.io/autoRegistrationGroup": "vms",
            "istio.io/workloadController": "vmesh-gone",
        }},
        "spec": {"address": "10.0.0.9"},
    });
    let (code, body) = request("POST", &format!("{}/{ENTRIES}", first.api()), Some(&orphan));
    assert_eq!(code, 201, "{body}");
    // A server that starts sweeps: it takes the entry over (naming itself
    // its controller, marking it disconnected), then deletes it after the
    // grace period.
    let second =
        LocalServer::start(Path::new(VMESH), &dir.path().join("second"), &flags, &[]).unwrap();
    let orphan_url = format!("{}/{ENTRIES}/orphan", second.api());
    eventually("the entry deleted", Duration::from_secs(10), || {
        request("GET", &orphan_url, None).0 == 404
    });
}
