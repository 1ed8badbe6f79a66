//! Onboarding with the real binary against a real `vmesh server`:
//! `workload group create` → `apply` → `workload entry configure`, every
//! file's content and mode, and `install.sh` run under a `ROOT` prefix.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use vmesh_api::testing::seed_dir;
use vmesh_testkit::LocalServer;
use vmesh_testkit::testing::{assert_ok, text};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
const NS: &str = "vm-workloads";
const GROUP: &str = "billing";
const SA: &str = "billing-sa";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `cluster.env` as a map, after checking every line is `KEY='value'` and the lines are sorted.
fn cluster_env(dir: &Path) -> BTreeMap<String, String> {
    let env = read(&dir.join("cluster.env"));
    let lines: Vec<&str> = env.lines().collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "cluster.env is not sorted");
    lines
        .iter()
        .map(|line| {
            let (key, value) = line.split_once('=').unwrap();
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or_else(|| panic!("{line:?} is not KEY='value'"));
            (key.to_string(), value.to_string())
        })
        .collect()
}

fn mesh_yaml(dir: &Path) -> Value {
    serde_saphyr::from_str(&read(&dir.join("mesh.yaml"))).unwrap()
}

fn base64url_decode(input: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => panic!("not base64url: {c}"),
        }
    };
    let mut out = Vec::new();
    let (mut bits, mut count) = (0u32, 0);
    for c in input.bytes().filter(|c| *c != b'=') {
        bits = (bits << 6) | value(c);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    out
}

/// The claims of the JWT in `istio-token`.
fn token_claims(dir: &Path) -> Value {
    let token = read(&dir.join("istio-token"));
    let parts: Vec<&str> = token.trim().split('.').collect();
    assert_eq!(parts.len(), 3, "istio-token is not a JWT: {token}");
    serde_json::from_slice(&base64url_decode(parts[1])).unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const FILES: [(&str, u32); 7] = [
    ("cluster.env", 0o644),
    ("mesh.yaml", 0o644),
    ("istio-token", 0o600),
    ("root-cert.pem", 0o644),
    ("hosts", 0o644),
    ("vmesh-agent.service", 0o644),
    ("install.sh", 0o755),
];

fn assert_files_and_modes(dir: &Path) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected: Vec<String> = FILES.iter().map(|(n, _)| n.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected, "files in {}", dir.display());
    for (name, expected) in FILES {
        assert_eq!(
            mode(&dir.join(name)),
            expected,
            "{name} has mode {:o}",
            mode(&dir.join(name))
        );
    }
}

/// The keys `mesh.yaml`'s proxyMetadata and `cluster.env` share.
const METADATA_KEYS: [&str; 11] = [
    "CANONICAL_SERVICE",
    "CANONICAL_REVISION",
    "POD_NAMESPACE",
    "SERVICE_ACCOUNT",
    "TRUST_DOMAIN",
    "ISTIO_META_CLUSTER_ID",
    "ISTIO_META_MESH_ID",
    "ISTIO_META_NETWORK",
    "ISTIO_META_WORKLOAD_NAME",
    "ISTIO_METAJSON_LABELS",
    "ISTIO_META_DNS_CAPTURE",
];

fn run_install(files: &Path, root: &Path) -> Output {
    Command::new("sh")
        .arg(files.join("install.sh"))
        .env("ROOT", root)
        .output()
        .unwrap()
}

fn is_root() -> bool {
    let output = Command::new("id").arg("-u").output().unwrap();
    text(&output.stdout).trim() == "0"
}

#[test]
fn group_create_apply_configure_and_install() {
    let data = tempfile::tempdir().unwrap();
    let server = LocalServer::start(Path::new(VMESH), data.path(), &[], &[]).unwrap();
    assert_ok(
        &server.vmesh(&["create", "namespace", NS]),
        "create namespace",
    );

    // `workload group create` prints a group `vmesh apply -f -` takes.
    let created = server.vmesh(&[
        "workload",
        "group",
        "create",
        "--name",
        GROUP,
        "-n",
        NS,
        "--labels",
        "app=billing,version=v2",
        "--labels",
        "class=vm",
        "--annotations",
        "team=payments",
        "--serviceAccount",
        SA,
        "--ports",
        "http=8080,grpc=9090",
    ]);
    assert_ok(&created, "workload group create");
    let yaml = text(&created.stdout);
    let decoded = vmesh_api::decode_manifests("created", &yaml);
    assert!(decoded.problems.is_empty(), "{:?}", decoded.problems);
    assert_eq!(decoded.objects.len(), 1);
    let object = serde_json::to_value(&decoded.objects[0].object).unwrap();
    assert_eq!(object["kind"], "WorkloadGroup");
    assert_eq!(object["metadata"], json!({"name": GROUP, "namespace": NS}));
    assert_eq!(
        object["spec"],
        json!({
            "metadata": {
                "labels": {"app": "billing", "class": "vm", "version": "v2"},
                "annotations": {"team": "payments"},
            },
            "template": {"serviceAccount": SA, "ports": {"grpc": 9090, "http": 8080}},
        })
    );
    let applied = server.vmesh_with_input(&["apply", "-f", "-"], &yaml);
    assert_ok(&applied, "apply -f -");
    assert_eq!(
        text(&applied.stdout),
        format!("workloadgroup.networking.istio.io/{GROUP} created\n")
    );

    // Without --autoregister, through the gateway's IP.
    let work = tempfile::tempdir().unwrap();
    let files = work.path().join("vm-files");
    let started = now();
    let configured = server.vmesh(&[
        "workload",
        "entry",
        "configure",
        "--name",
        GROUP,
        "-n",
        NS,
        "-o",
        files.to_str().unwrap(),
        "--clusterID",
        "cluster1",
        "--network",
        "network1",
        "--ingressIP",
        "192.0.2.10",
        "--tokenDuration",
        "2h",
    ]);
    assert_ok(&configured, "workload entry configure");
    assert_files_and_modes(&files);

    let env = cluster_env(&files);
    let labels = r#"{"app":"billing","class":"vm","version":"v2"}"#;
    let expected: BTreeMap<&str, &str> = BTreeMap::from([
        ("CANONICAL_SERVICE", "billing"),
        ("CANONICAL_REVISION", "v2"),
        ("POD_NAMESPACE", NS),
        ("SERVICE_ACCOUNT", SA),
        ("TRUST_DOMAIN", "cluster.local"),
        ("ISTIO_META_CLUSTER_ID", "cluster1"),
        ("ISTIO_META_MESH_ID", "cluster.local"),
        ("ISTIO_META_NETWORK", "network1"),
        ("ISTIO_META_WORKLOAD_NAME", GROUP),
        ("ISTIO_METAJSON_LABELS", labels),
        ("ISTIO_META_DNS_CAPTURE", "true"),
        ("ISTIO_INBOUND_PORTS", "8080,9090"),
        ("ISTIO_NAMESPACE", NS),
        ("ISTIO_SERVICE", "billing.vm-workloads"),
        ("ISTIO_SERVICE_CIDR", "*"),
        ("ISTIO_LOCAL_EXCLUDE_PORTS", "22,15090,15021,15020"),
        ("PILOT_ADDRESS", "istiod.istio-system.svc:15012"),
        ("CA_ADDR", "istiod.istio-system.svc:15012"),
    ]);
    assert_eq!(
        env.iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<BTreeMap<_, _>>(),
        expected
    );

    let mesh = mesh_yaml(&files);
    let config = &mesh["defaultConfig"];
    assert_eq!(mesh.as_object().unwrap().len(), 1, "{mesh}");
    assert_eq!(config["discoveryAddress"], "istiod.istio-system.svc:15012");
    assert!(config.get("readinessProbe").is_none(), "{config}");
    let metadata = config["proxyMetadata"].as_object().unwrap();
    assert_eq!(
        metadata
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .len(),
        METADATA_KEYS.len(),
        "{metadata:?}"
    );
    for key in METADATA_KEYS {
        assert_eq!(metadata[key], env[key].as_str(), "{key}");
    }

    assert_eq!(
        read(&files.join("hosts")),
        "192.0.2.10 istiod.istio-system.svc\n"
    );

    let claims = token_claims(&files);
    assert_eq!(claims["sub"], format!("system:serviceaccount:{NS}:{SA}"));
    let aud = &claims["aud"];
    assert!(
        aud == "istio-ca"
            || aud
                .as_array()
                .is_some_and(|a| a.contains(&json!("istio-ca"))),
        "{claims}"
    );
    let exp = claims["exp"].as_i64().unwrap();
    assert!(
        (exp - (started + 7200)).abs() < 60,
        "exp {exp} is not about two hours after {started}"
    );

    let config_map = server.vmesh(&[
        "get",
        "configmap",
        "istio-ca-root-cert",
        "-n",
        NS,
        "-o",
        "json",
    ]);
    assert_ok(&config_map, "get configmap");
    let config_map: Value = serde_json::from_slice(&config_map.stdout).unwrap();
    let root = config_map["data"]["root-cert.pem"].as_str().unwrap();
    assert!(root.contains("BEGIN CERTIFICATE"));
    assert_eq!(read(&files.join("root-cert.pem")), root);

    let unit = read(&files.join("vmesh-agent.service"));
    assert!(
        unit.contains("\nExecStart=/usr/local/bin/vmesh agent --root / --capture\n"),
        "{unit}"
    );
    assert!(unit.contains("\n[Install]\nWantedBy=multi-user.target\n"));
    assert!(unit.contains("\nLogExtraFields=OBJECT_SYSTEMD_UNIT=istio.service\n"));
    assert!(
        !unit.contains("ExecStartPost"),
        "no holdApplicationUntilProxyStarts, no wait"
    );

    // install.sh: valid POSIX sh, places the files, and is idempotent.
    let syntax = Command::new("sh")
        .arg("-n")
        .arg(files.join("install.sh"))
        .output()
        .unwrap();
    assert_ok(&syntax, "sh -n install.sh");
    let root_dir = work.path().join("root");
    std::fs::create_dir_all(root_dir.join("etc")).unwrap();
    std::fs::write(root_dir.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    for run in 1..=2 {
        assert_ok(
            &run_install(&files, &root_dir),
            &format!("install.sh, run {run}"),
        );
        assert_installed(&files, &root_dir);
        let hosts = read(&root_dir.join("etc/hosts"));
        assert!(hosts.starts_with("127.0.0.1 localhost\n"), "{hosts}");
        assert_eq!(
            hosts
                .lines()
                .filter(|l| l.starts_with("192.0.2.10 istiod.istio-system.svc"))
                .count(),
            1,
            "run {run}:\n{hosts}"
        );
        let passwd = read(&root_dir.join("etc/passwd"));
        assert_eq!(
            passwd
                .lines()
                .filter(|l| l.starts_with("istio-proxy:x:1337:1337:"))
                .count(),
            1,
            "{passwd}"
        );
    }

    // With --autoregister, by the gateway's host name, DNS capture off, into
    // the same directory: every file is replaced.
    let configured = server.vmesh(&[
        "workload",
        "entry",
        "configure",
        "--name",
        GROUP,
        "--namespace",
        NS,
        "--output",
        files.to_str().unwrap(),
        "--autoregister",
        "--ingressHost",
        "gw.mesh.test",
        "--capture-dns=false",
    ]);
    assert_ok(&configured, "workload entry configure --autoregister");
    assert_files_and_modes(&files);
    let env = cluster_env(&files);
    assert_eq!(env["ISTIO_META_AUTO_REGISTER_GROUP"], GROUP);
    assert_eq!(env["ISTIO_META_CLUSTER_ID"], "Kubernetes");
    assert_eq!(env["ISTIO_META_NETWORK"], "");
    assert_eq!(env["ISTIO_META_DNS_CAPTURE"], "false");
    assert_eq!(env["PILOT_ADDRESS"], "gw.mesh.test:15012");
    assert_eq!(env["CA_ADDR"], "gw.mesh.test:15012");
    let mesh = mesh_yaml(&files);
    assert_eq!(
        mesh["defaultConfig"]["discoveryAddress"],
        "gw.mesh.test:15012"
    );
    assert_eq!(
        mesh["defaultConfig"]["proxyMetadata"]["ISTIO_META_AUTO_REGISTER_GROUP"],
        GROUP
    );
    assert_eq!(read(&files.join("hosts")), "");
    let exp = token_claims(&files)["exp"].as_i64().unwrap();
    assert!(
        (exp - (now() + 3600)).abs() < 60,
        "default life is one hour"
    );

    // Installing again drops the old gateway line and keeps the rest.
    assert_ok(&run_install(&files, &root_dir), "install.sh, third run");
    assert_installed(&files, &root_dir);
    assert_eq!(read(&root_dir.join("etc/hosts")), "127.0.0.1 localhost\n");
}

/// What install.sh must have left under `root`.
fn assert_installed(files: &Path, root: &Path) {
    for (name, path, expected) in [
        ("cluster.env", "var/lib/istio/envoy/cluster.env", 0o644),
        ("mesh.yaml", "etc/istio/config/mesh", 0o644),
        ("root-cert.pem", "etc/certs/root-cert.pem", 0o644),
        ("istio-token", "var/lib/istio/tokens/istio-token", 0o600),
        ("istio-token", "var/run/secrets/tokens/istio-token", 0o600),
        (
            "vmesh-agent.service",
            "etc/systemd/system/vmesh-agent.service",
            0o644,
        ),
    ] {
        let placed = root.join(path);
        assert_eq!(read(&placed), read(&files.join(name)), "{path}");
        assert_eq!(mode(&placed), expected, "{path}");
    }
    // The guide's name for the unit, istio.service, links to it.
    assert_eq!(
        std::fs::read_link(root.join("usr/local/lib/systemd/system/istio.service")).unwrap(),
        Path::new("/etc/systemd/system/vmesh-agent.service")
    );
    // Istio's token path is a link to the copy that survives a reboot.
    let link = root.join("var/run/secrets/tokens/istio-token");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        root.join("var/lib/istio/tokens/istio-token")
    );
    let tmpfiles = read(&root.join("etc/tmpfiles.d/vmesh-agent.conf"));
    assert!(
        tmpfiles.contains(
            "L+ /run/secrets/tokens/istio-token - - - - /var/lib/istio/tokens/istio-token"
        ),
        "{tmpfiles}"
    );
    if is_root() {
        let token = std::fs::metadata(root.join("var/lib/istio/tokens/istio-token")).unwrap();
        assert_eq!((token.uid(), token.gid()), (1337, 1337));
    }
    // Nothing half-written is left behind.
    let leftovers = Command::new("find")
        .arg(root)
        .args(["-name", "*.vmesh-new"])
        .output()
        .unwrap();
    assert_eq!(text(&leftovers.stdout), "");
}

#[test]
fn configure_reads_a_group_file_with_its_probe() {
    let data = tempfile::tempdir().unwrap();
    let server = LocalServer::start(Path::new(VMESH), data.path(), &[], &[]).unwrap();
    assert_ok(
        &server.vmesh(&["create", "namespace", NS]),
        "create namespace",
    );
    let work = tempfile::tempdir().unwrap();
    let files = work.path().join("out");
    let group = seed_dir().join("workload-group-payment-service.yaml");
    let configured = server.vmesh(&[
        "workload",
        "entry",
        "configure",
        "-f",
        group.to_str().unwrap(),
        "-o",
        files.to_str().unwrap(),
        "--autoregister",
    ]);
    assert_ok(&configured, "configure -f");
    assert_files_and_modes(&files);
    // No --ingressIP, no Service istio-system/istio-eastwestgateway: said loudly.
    assert_eq!(read(&files.join("hosts")), "");
    let stderr = text(&configured.stderr);
    assert!(
        stderr.contains(
            "WARNING: hosts is empty: nothing maps istiod.istio-system.svc to an address, \
             so the VM cannot find the control plane"
        ) && stderr.contains(
            "Service istio-system/istio-eastwestgateway (--ingressService's default) does not exist"
        ),
        "{stderr}"
    );
    let env = cluster_env(&files);
    assert_eq!(env["ISTIO_META_WORKLOAD_NAME"], "payment-service");
    assert_eq!(env["ISTIO_META_AUTO_REGISTER_GROUP"], "payment-service");
    assert_eq!(env["ISTIO_META_NETWORK"], "network1");
    assert_eq!(env["SERVICE_ACCOUNT"], "payment-service-sa");
    assert_eq!(env["ISTIO_INBOUND_PORTS"], "*");
    let mesh = mesh_yaml(&files);
    assert_eq!(
        mesh["defaultConfig"]["readinessProbe"],
        json!({
            "periodSeconds": 5,
            "failureThreshold": 3,
            "initialDelaySeconds": 10,
            "httpGet": {"path": "/health", "port": 8080},
        })
    );
    let claims = token_claims(&files);
    assert_eq!(
        claims["sub"],
        "system:serviceaccount:vm-workloads:payment-service-sa"
    );
}

#[test]
fn configure_names_what_is_missing() {
    let data = tempfile::tempdir().unwrap();
    let server = LocalServer::start(Path::new(VMESH), data.path(), &[], &[]).unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let out = out.to_str().unwrap();

    let refused = server.vmesh(&[
        "workload",
        "entry",
        "configure",
        "--name",
        "g",
        "-n",
        "ghost",
        "-o",
        out,
    ]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("namespace ghost does not exist"),
        "{stderr}"
    );

    assert_ok(
        &server.vmesh(&["create", "namespace", NS]),
        "create namespace",
    );
    let refused = server.vmesh(&[
        "workload",
        "entry",
        "configure",
        "--name",
        "nope",
        "-n",
        NS,
        "-o",
        out,
    ]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains(&format!("WorkloadGroup {NS}/nope not found")),
        "{stderr}"
    );

    let unreachable = Command::new(VMESH)
        .args([
            "workload",
            "entry",
            "configure",
            "--name",
            "nope",
            "-n",
            NS,
            "-o",
            out,
        ])
        .env("VMESH_SERVER", "http://127.0.0.1:9")
        .env_remove("VMESH_TOKEN")
        .output()
        .unwrap();
    assert!(!unreachable.status.success());
    let stderr = text(&unreachable.stderr);
    assert!(
        stderr.contains("cannot reach the vmesh server at http://127.0.0.1:9"),
        "{stderr}"
    );
    assert!(!Path::new(out).exists(), "nothing is written on failure");

    let bad_port = server.vmesh(&[
        "workload",
        "group",
        "create",
        "--name",
        "g",
        "--ports",
        "http=70000",
    ]);
    assert!(!bad_port.status.success());
    assert!(
        text(&bad_port.stderr).contains("1 to 65535"),
        "{}",
        text(&bad_port.stderr)
    );
}

/// `configure` in the guide's terms: istioctl's address flags
/// (`--ingressService`, `--internalIP`, `--externalIP`), a revision with no
/// IstioOperator of its own said out loud, and the guide's
/// `holdApplicationUntilProxyStarts` carried into the agent's unit.
#[test]
fn configure_takes_istioctls_flags_and_the_operators_settings() {
    let data = tempfile::tempdir().unwrap();
    let server = LocalServer::start(Path::new(VMESH), data.path(), &[], &[]).unwrap();
    let guide = |file: &str| seed_dir().join(file).to_str().unwrap().to_string();
    assert_ok(
        &server.vmesh(&["apply", "-f", &guide("complete-vm-integration.yaml")]),
        "apply the complete example",
    );
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let configure = |extra: &[&str]| {
        let mut args = vec![
            "x",
            "workload",
            "entry",
            "configure",
            "--name",
            "payment-service",
            "-n",
            NS,
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        server.vmesh(&args)
    };

    // --ingressService: the Service's externalIPs, when --ingressIP gives no address.
    assert_ok(
        &server.vmesh_with_input(
            &["apply", "-f", "-"],
            "apiVersion: v1\nkind: Service\nmetadata: {name: vm-gateway, namespace: vm-workloads}\n\
             spec:\n  type: LoadBalancer\n  externalIPs: [192.0.2.44]\n  selector: {istio: eastwestgateway}\n  \
             ports: [{name: tls-istiod, port: 15012}]\n",
        ),
        "apply the gateway Service",
    );
    let configured = configure(&[
        "--ingressIP",
        "",
        "--ingressService",
        "vm-gateway.vm-workloads",
        "--internalIP",
        "10.1.2.3",
    ]);
    assert_ok(&configured, "configure --ingressService --internalIP");
    assert_eq!(
        read(&out.join("hosts")),
        "192.0.2.44 istiod.istio-system.svc\n"
    );
    let env = cluster_env(&out);
    assert_eq!(env["ISTIO_SVC_IP"], "10.1.2.3");
    assert!(!env.contains_key("REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"));
    assert!(!text(&configured.stderr).contains("WARNING"));

    // A Service without an external address: nothing for hosts, said loudly.
    let configured = configure(&[
        "--ingressService",
        "payment-service.vm-workloads",
        "--externalIP",
        "203.0.113.7",
    ]);
    assert_ok(&configured, "configure --externalIP");
    let stderr = text(&configured.stderr);
    assert!(
        stderr.contains("WARNING: hosts is empty")
            && stderr.contains(
                "Service vm-workloads/payment-service (--ingressService) has no load balancer address and no externalIPs"
            ),
        "{stderr}"
    );
    let env = cluster_env(&out);
    assert_eq!(env["ISTIO_SVC_IP"], "203.0.113.7");
    assert_eq!(env["REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"], "true");
    let refused = configure(&["--internalIP", "10.1.2.3", "--externalIP", "203.0.113.7"]);
    assert!(
        !refused.status.success(),
        "the two addresses exclude each other"
    );
    let refused = configure(&["--ingressIP", "gw.example.com"]);
    assert!(
        text(&refused.stderr).contains("--ingressIP \"gw.example.com\" is not an IP address"),
        "{}",
        text(&refused.stderr)
    );

    // A misspelt flag is answered with istioctl's spelling, not an alias.
    let misspelt = configure(&["--ingressip", "10.0.0.1"]);
    let stderr = text(&misspelt.stderr);
    assert!(
        stderr.contains("tip: a similar argument exists: '--ingressIP'"),
        "{stderr}"
    );

    // The guide's IstioOperator: its holdApplicationUntilProxyStarts makes
    // the agent's unit wait for the sidecar before it counts as started.
    assert_ok(
        &server.vmesh(&["apply", "-f", &guide("istio-operator-vm.yaml")]),
        "apply the IstioOperator",
    );
    let configured = configure(&["--ingressIP", "192.0.2.10"]);
    assert_ok(&configured, "configure with the operator");
    assert_eq!(
        mesh_yaml(&out)["defaultConfig"]["holdApplicationUntilProxyStarts"],
        true
    );
    let unit = read(&out.join("vmesh-agent.service"));
    assert!(
        unit.contains(
            "\nExecStart=/usr/local/bin/vmesh agent --root / --capture\n\
             # holdApplicationUntilProxyStarts: started (and the units ordered After= it\n\
             # may start) only once the sidecar is ready on the status port.\n\
             ExecStartPost=/usr/local/bin/vmesh agent wait --timeout 120s\n\
             TimeoutStartSec=150\n"
        ),
        "{unit}"
    );
    assert!(
        text(&configured.stdout).contains("sudo APP_UNIT=<app>.service sh install.sh"),
        "{}",
        text(&configured.stdout)
    );
    // install.sh's APP_UNIT orders the application's unit after the sidecar.
    let root = work.path().join("root");
    let installed = Command::new("sh")
        .arg(out.join("install.sh"))
        .env("ROOT", &root)
        .env("APP_UNIT", "payment-app")
        .output()
        .unwrap();
    assert_ok(&installed, "install.sh with APP_UNIT");
    assert_eq!(
        read(&root.join("etc/systemd/system/payment-app.service.d/10-vmesh-sidecar.conf")),
        "# Written by vmesh install.sh (APP_UNIT): payment-app.service starts after its sidecar,\n\
         # and not without it (after it is ready when the mesh holds applications\n\
         # until the proxy starts).\n\
         [Unit]\nRequires=vmesh-agent.service\nAfter=vmesh-agent.service\n"
    );

    // --revision without an IstioOperator of that revision: the defaults, named.
    let configured = configure(&["--ingressIP", "192.0.2.10", "--revision", "canary"]);
    assert_ok(&configured, "configure --revision canary");
    let stderr = text(&configured.stderr);
    assert!(
        stderr.contains(
            "WARNING: no IstioOperator has revision \"canary\" (spec.revision): its mesh settings \
             are the defaults: trust domain cluster.local, cluster ID Kubernetes (give --clusterID), \
             mesh ID cluster.local"
        ) && stderr.contains(
            "WARNING: the default revision's IstioOperator istio-system/istio-vm-enabled is not used \
             (cluster ID cluster1; mesh ID mesh1; trust domain cluster.local; \
             meshConfig.defaultConfig holdApplicationUntilProxyStarts)."
        ),
        "{stderr}"
    );
    let env = cluster_env(&out);
    assert_eq!(
        (
            env["ISTIO_META_CLUSTER_ID"].as_str(),
            env["CA_ADDR"].as_str()
        ),
        ("Kubernetes", "istiod-canary.istio-system.svc:15012")
    );
    assert!(!read(&out.join("vmesh-agent.service")).contains("ExecStartPost"));
    // With the default revision, or one that has an operator, no such warning.
    let configured = configure(&["--ingressIP", "192.0.2.10", "--revision", "default"]);
    assert!(
        !text(&configured.stderr).contains("WARNING"),
        "{}",
        text(&configured.stderr)
    );
}
