//! Every `kubectl`, `istioctl` (and `systemctl`/`journalctl … istio`) command
//! line of the guide, and how vmesh answers it: run against a real `vmesh
//! server` with only the program name changed, in the guide's order, from a
//! directory holding the guide's files; on the VM's side against what
//! `install.sh` installs, with systemd's offline tools (`systemctl --root`,
//! `systemd-analyze --root verify`: no systemd runs in a test); or not at
//! all, with why. README.md's "The guide's commands" is the same list, and
//! this test keeps the two equal.
//!
//! Needs Envoy, `systemctl` and `systemd-analyze` (Debian's systemd
//! package; `scripts/install-deps.sh` installs both); without them it
//! fails, it never skips.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vmesh_api::testing::seed_dir;
use vmesh_testkit::LocalServer;
use vmesh_testkit::testing::{assert_ok, eventually, text};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

/// How vmesh answers one of the guide's command lines.
#[derive(Debug)]
enum Answer {
    /// Runs as written with `vmesh` for the program.
    Runs,
    /// Runs with the guide's `$(…)` replaced by what it prints here.
    Substituted(&'static str),
    /// On the VM: checked against the installed files, as said.
    OnVm(&'static str),
    /// No vmesh counterpart, and why.
    Outside(&'static str),
}

use Answer::{OnVm, Outside, Runs, Substituted};

/// The guide's command lines in its order (a line continued over several
/// lines with comments between is joined; `sudo` kept as written).
const GUIDE: &[(&str, Answer)] = &[
    (
        "istioctl install -f istio-operator-vm.yaml -y",
        Outside(
            "vmesh installs nothing into a cluster: `vmesh server` is the control plane, and \
             `vmesh apply -f istio-operator-vm.yaml` gives it the operator's mesh settings \
             (mesh ID, cluster name, holdApplicationUntilProxyStarts)",
        ),
    ),
    ("kubectl apply -f expose-istiod.yaml", Runs),
    ("kubectl create namespace vm-workloads", Runs),
    (
        "kubectl label namespace vm-workloads istio-injection=enabled",
        Runs,
    ),
    (
        "kubectl create serviceaccount payment-service-sa -n vm-workloads",
        Runs,
    ),
    ("kubectl apply -f workload-group-payment-service.yaml", Runs),
    ("kubectl apply -f service-payment.yaml", Runs),
    (
        "istioctl x workload entry configure --name payment-service --namespace vm-workloads \
         --serviceAccount payment-service-sa --clusterID cluster1 --network network1 \
         --ingressIP $(kubectl get svc istio-eastwestgateway -n istio-system -o jsonpath='{.status.loadBalancer.ingress[0].ip}') \
         --output vm-files/",
        Substituted(
            "the `$(…)` is the server's address; with `--ingressIP` left out or empty, \
             `--ingressService` (default istio-eastwestgateway) names the Service whose address goes into `hosts`",
        ),
    ),
    (
        "kubectl get svc istio-eastwestgateway -n istio-system -o jsonpath='{.status.loadBalancer.ingress[0].ip}'",
        Outside(
            "no `-o jsonpath`, and vmesh keeps no load-balancer status: configure reads the \
             gateway Service's address itself (`--ingressService`)",
        ),
    ),
    (
        "sudo systemctl enable istio",
        OnVm("`systemctl --root enable istio` enables vmesh-agent.service through its alias"),
    ),
    (
        "sudo systemctl start istio",
        OnVm("`systemd-analyze --root verify istio.service` loads the agent's unit by that name"),
    ),
    (
        "sudo systemctl status istio",
        OnVm("the alias resolves to vmesh-agent.service, as for start"),
    ),
    ("kubectl get workloadentries -n vm-workloads", Runs),
    (
        "kubectl get endpoints payment-service -n vm-workloads -o yaml",
        Runs,
    ),
    ("istioctl proxy-status", Runs),
    (
        "sudo systemctl restart systemd-resolved",
        Outside(
            "the VM's own resolver (the guide's DNS option 2); `vmesh agent --dns-addr` gives it an address to forward cluster.local to",
        ),
    ),
    (
        "sudo systemctl enable istio-token-refresh.timer",
        Outside(
            "the guide's own timer: the agent renews its certificate with the certificate itself, so the token need not be refreshed",
        ),
    ),
    (
        "sudo systemctl start istio-token-refresh.timer",
        Outside("as the line before"),
    ),
    (
        "systemctl enable istio",
        OnVm("cloud-init's: as `sudo systemctl enable istio`"),
    ),
    (
        "systemctl start istio",
        OnVm("cloud-init's: as `sudo systemctl start istio`"),
    ),
    (
        "systemctl is-active --quiet istio",
        OnVm("the alias resolves to vmesh-agent.service, as for start"),
    ),
    (
        "systemctl status istio",
        OnVm("as `sudo systemctl status istio`"),
    ),
    (
        "journalctl -u istio --since \"10 minutes ago\"",
        OnVm(
            "the unit's `LogExtraFields=OBJECT_SYSTEMD_UNIT=istio.service`: `journalctl -u istio` \
             matches root's entries carrying that field (checked on the unit, not in a journal)",
        ),
    ),
    (
        "kubectl get svc istio-eastwestgateway -n istio-system",
        Runs,
    ),
    (
        "istioctl pc secret <pod> -n <namespace>",
        Substituted(
            "`<pod>` and `<namespace>` name a connected proxy (here an Envoy connected as \
             frontend.vm-workloads); the server sends no secrets, so on the VM `vmesh pc secret --local` \
             shows the certificates its Envoy holds",
        ),
    ),
    ("kubectl get workloadgroup -n vm-workloads -o yaml", Runs),
    ("kubectl get workloadentry -n vm-workloads", Runs),
    ("kubectl apply -f complete-vm-integration.yaml", Runs),
];

impl Answer {
    /// Its row in README.md's table.
    fn row(&self, line: &str) -> String {
        let how = match self {
            Runs => "runs as written".to_string(),
            Substituted(how) => format!("runs: {how}"),
            OnVm(how) => format!("on the VM: {how}"),
            Outside(why) => format!("no counterpart: {why}"),
        };
        format!("| `{line}` | {how} |")
    }
}

fn answer(line: &str) -> &'static Answer {
    &GUIDE
        .iter()
        .find(|(l, _)| *l == line)
        .unwrap_or_else(|| panic!("{line:?} is not in the list of the guide's commands"))
        .1
}

/// Runs guide lines from `dir`, with `vmesh` for the program.
struct Guide<'a> {
    server: &'a LocalServer,
    dir: &'a Path,
    ran: RefCell<BTreeSet<&'static str>>,
}

impl Guide<'_> {
    /// Runs `line` as written but for the program; its standard output.
    fn run(&self, line: &'static str) -> String {
        assert!(
            matches!(answer(line), Runs),
            "{line:?} does not run as written"
        );
        let args: Vec<&str> = line.split_whitespace().collect();
        assert!(matches!(args[0], "kubectl" | "istioctl"), "{line}");
        self.run_args(line, &args[1..])
    }

    /// Runs `line` with its `$(…)` substituted: `args` are what the shell passes.
    fn run_substituted(&self, line: &'static str, args: &[&str]) -> String {
        assert!(matches!(answer(line), Substituted(_)), "{line:?}");
        self.run_args(line, args)
    }

    fn run_args(&self, line: &'static str, args: &[&str]) -> String {
        let output = self
            .server
            .command(args)
            .current_dir(self.dir)
            .env("VMESH_MONITORING", self.server.monitoring())
            .output()
            .unwrap();
        assert_ok(&output, &format!("vmesh for {line:?}"));
        self.ran.borrow_mut().insert(line);
        text(&output.stdout)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        full.extend(["-o", "json"]);
        let output = self.server.vmesh(&full);
        assert_ok(&output, &format!("get {args:?}"));
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

#[test]
fn the_guides_commands_work_with_vmesh_for_the_program() {
    let data = tempfile::tempdir().unwrap();
    let server = LocalServer::start(
        Path::new(VMESH),
        data.path(),
        &["--xds-plaintext-addr", "127.0.0.1:0"],
        &[],
    )
    .unwrap();
    // The guide's files, where its commands are run.
    let work = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(seed_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, work.path().join(path.file_name().unwrap())).unwrap();
    }
    let guide = Guide {
        server: &server,
        dir: work.path(),
        ran: RefCell::default(),
    };

    // Step 1, `istioctl install`, is the server itself; its settings come from the operator.
    assert_ok(
        &server.vmesh(&[
            "apply",
            "-f",
            seed_dir().join("istio-operator-vm.yaml").to_str().unwrap(),
        ]),
        "apply istio-operator-vm.yaml",
    );

    // Steps 2 and 3.
    assert!(
        guide
            .run("kubectl apply -f expose-istiod.yaml")
            .contains("gateway.networking.istio.io/istiod-gateway created")
    );
    assert_eq!(
        guide.run("kubectl create namespace vm-workloads"),
        "namespace/vm-workloads created\n"
    );
    assert_eq!(
        guide.run("kubectl label namespace vm-workloads istio-injection=enabled"),
        "namespace/vm-workloads labeled\n"
    );
    assert_eq!(
        guide.json(&["namespace", "vm-workloads"])["metadata"]["labels"]["istio-injection"],
        "enabled"
    );

    // Step 5.
    assert_eq!(
        guide.run("kubectl create serviceaccount payment-service-sa -n vm-workloads"),
        "serviceaccount/payment-service-sa created\n"
    );
    assert_eq!(
        guide.json(&["sa", "payment-service-sa", "-n", "vm-workloads"])["metadata"]["name"],
        "payment-service-sa"
    );
    guide.run("kubectl apply -f workload-group-payment-service.yaml");
    guide.run("kubectl apply -f service-payment.yaml");

    // Step 6: the files, the east-west gateway's address being the server's.
    let configure = answer_line(|l| l.starts_with("istioctl x workload entry configure"));
    let shell_args = configure
        .replace(
            "$(kubectl get svc istio-eastwestgateway -n istio-system -o jsonpath='{.status.loadBalancer.ingress[0].ip}')",
            "127.0.0.1",
        );
    let args: Vec<&str> = shell_args.split_whitespace().skip(1).collect();
    let printed = guide.run_substituted(configure, &args);
    assert!(
        printed.contains("onboarding files written to vm-files/"),
        "{printed}"
    );
    let files = work.path().join("vm-files");
    let read = |name: &str| std::fs::read_to_string(files.join(name)).unwrap();
    assert_eq!(read("hosts"), "127.0.0.1 istiod.istio-system.svc\n");
    let env = read("cluster.env");
    for line in [
        "ISTIO_META_CLUSTER_ID='cluster1'",
        "ISTIO_META_NETWORK='network1'",
        "SERVICE_ACCOUNT='payment-service-sa'",
        "ISTIO_META_MESH_ID='mesh1'",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing from\n{env}");
    }
    assert!(read("mesh.yaml").contains("holdApplicationUntilProxyStarts: true"));

    // On the VM: install.sh, then the guide's systemctl lines by the name istio.
    let root = work.path().join("vm");
    on_the_vm(&files, &root);
    for line in [
        "sudo systemctl enable istio",
        "sudo systemctl start istio",
        "sudo systemctl status istio",
        "systemctl enable istio",
        "systemctl start istio",
        "systemctl is-active --quiet istio",
        "systemctl status istio",
        "journalctl -u istio --since \"10 minutes ago\"",
    ] {
        assert!(matches!(answer(line), OnVm(_)), "{line}");
    }

    // Step 6's checks. The guide's hand-written entry stands for the VM.
    assert_ok(
        &server.vmesh(&[
            "apply",
            "-f",
            seed_dir()
                .join("workload-entry-payment-vm1.yaml")
                .to_str()
                .unwrap(),
        ]),
        "apply workload-entry-payment-vm1.yaml",
    );
    let entries = guide.run("kubectl get workloadentries -n vm-workloads");
    // Istio's printer columns for WorkloadEntries: AGE, then ADDRESS.
    let header: Vec<&str> = entries.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "AGE", "ADDRESS"], "{entries}");
    assert!(
        entries
            .lines()
            .any(|l| l.starts_with("payment-service-vm1 ") && l.ends_with(" 192.168.1.100")),
        "{entries}"
    );
    let line = "kubectl get endpoints payment-service -n vm-workloads -o yaml";
    let endpoints = eventually("the VM in the Service's endpoints", || {
        let yaml = guide.run(line);
        yaml.contains("- ip: \"192.168.1.100\"").then_some(yaml)
    });
    let endpoints: Value = serde_saphyr::from_str(&endpoints).unwrap();
    assert_eq!(endpoints["kind"], "Endpoints");
    assert_eq!(
        endpoints["subsets"][0]["addresses"][0]["targetRef"]["name"],
        "payment-service-vm1"
    );
    assert_eq!(
        endpoints["subsets"][0]["ports"],
        serde_json::json!([
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "grpc", "port": 9090, "protocol": "TCP"},
        ])
    );
    // A proxy connects (a bare Envoy standing for a VM's sidecar): it shows
    // in proxy-status, and proxy-config answers for it by name and namespace.
    let _envoy = Envoy::start(&server, work.path());
    // (Its CDS may stay STALE: a bare Envoy has no SDS for the mTLS clusters.)
    let status = eventually("the proxy in proxy-status", || {
        let status = guide.run("istioctl proxy-status");
        status
            .lines()
            .any(|l| l.contains("~frontend.vm-workloads~") && l.contains("   vm-workloads   "))
            .then_some(status)
    });
    assert!(status.starts_with("NAME"), "{status}");
    let secret = answer_line(|l| l.starts_with("istioctl pc secret"));
    let secrets =
        guide.run_substituted(secret, &["pc", "secret", "frontend", "-n", "vm-workloads"]);
    assert_eq!(secrets, "No active or warming secrets found.\n");

    // The services as kubectl shows them: type, the allocated cluster IP, ports.
    let vip = eventually("payment-service's cluster IP", || {
        let svc = guide.json(&["svc", "payment-service", "-n", "vm-workloads"]);
        svc["spec"]["clusterIP"].as_str().map(str::to_string)
    });
    let table = text(&server.vmesh(&["get", "svc", "-n", "vm-workloads"]).stdout);
    assert!(
        table.starts_with("NAME              TYPE        CLUSTER-IP")
            && table.contains(&format!("payment-service   ClusterIP   {vip}")),
        "{table}"
    );
    assert!(table.contains("8080/TCP,9090/TCP"), "{table}");
    assert_eq!(
        guide.json(&["cm", "vmesh-vip-allocations", "-n", "istio-system"])["data"]["payment-service.vm-workloads.svc.cluster.local"],
        vip.as_str()
    );

    // Troubleshooting: the east-west gateway's Service (here one the
    // operator writes for the server's address), and configure finding it
    // when --ingressIP is left empty, as istioctl does.
    std::fs::write(
        work.path().join("gateway.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: istio-eastwestgateway, namespace: istio-system}\n\
         spec:\n  type: LoadBalancer\n  externalIPs: [192.0.2.10]\n  selector: {istio: eastwestgateway}\n  \
         ports: [{name: tls-istiod, port: 15012}]\n",
    )
    .unwrap();
    assert_ok(
        &server
            .command(&["apply", "-f", "gateway.yaml"])
            .current_dir(work.path())
            .output()
            .unwrap(),
        "apply gateway.yaml",
    );
    let gateway = guide.run("kubectl get svc istio-eastwestgateway -n istio-system");
    assert!(
        gateway.contains("   LoadBalancer   ") && gateway.contains("   192.0.2.10    15012/TCP   "),
        "{gateway}"
    );
    // `--ingressIP "$(…)"` where the substitution prints nothing.
    let args: Vec<&str> = shell_args
        .split_whitespace()
        .skip(1)
        .map(|a| if a == "127.0.0.1" { "" } else { a })
        .collect();
    guide.run_substituted(configure, &args);
    assert_eq!(read("hosts"), "192.0.2.10 istiod.istio-system.svc\n");

    let groups = guide.run("kubectl get workloadgroup -n vm-workloads -o yaml");
    assert!(
        groups.contains("kind: WorkloadGroup") && groups.contains("name: payment-service"),
        "{groups}"
    );
    let entries = guide.run("kubectl get workloadentry -n vm-workloads");
    assert!(entries.contains("payment-service-vm1"), "{entries}");
    let applied = guide.run("kubectl apply -f complete-vm-integration.yaml");
    assert!(
        applied.contains("namespace/vm-workloads unchanged"),
        "{applied}"
    );

    // Every line that runs ran; every guide line in the repository's copies
    // of the guide's files is in the list; README says the same.
    let runnable: BTreeSet<&str> = GUIDE
        .iter()
        .filter(|(_, a)| matches!(a, Runs | Substituted(_)))
        .map(|(l, _)| *l)
        .collect();
    assert_eq!(*guide.ran.borrow(), runnable);
    for file in ["troubleshooting-reference.yaml", "cloud-init-istio-vm.yaml"] {
        let text = std::fs::read_to_string(seed_dir().join(file)).unwrap();
        for line in text.lines() {
            let line = line.trim().trim_start_matches("- ").trim_matches('"');
            if ["kubectl ", "istioctl ", "systemctl ", "journalctl "]
                .iter()
                .any(|p| line.starts_with(p))
            {
                answer(line);
            }
        }
    }
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let section = readme
        .split_once("## The guide's commands")
        .expect("README.md has a section \"The guide's commands\"")
        .1;
    let rows: Vec<String> = GUIDE.iter().map(|(line, a)| a.row(line)).collect();
    let missing: Vec<&String> = rows
        .iter()
        .filter(|r| !section.contains(r.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README's \"The guide's commands\" lacks these rows (the whole table:\n{})\n\nmissing:\n{}",
        rows.join("\n"),
        missing
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Envoy on this machine, connected to the server's plaintext xDS as the
/// proxy `frontend.vm-workloads`; stopped when dropped (and with the test,
/// by its parent-death signal).
struct Envoy(std::process::Child);

impl Envoy {
    fn start(server: &LocalServer, dir: &Path) -> Envoy {
        let xds_port: u16 = server
            .xds_plaintext()
            .and_then(|a| a.rsplit_once(':')?.1.parse().ok())
            .expect("the server's plaintext xDS port");
        // Admin on a port of the kernel's choosing: other Envoys may run here.
        let bootstrap = vmesh_testkit::sidecar::bootstrap(xds_port, "DELTA_GRPC")
            .replace("\"port_value\": 15000", "\"port_value\": 0");
        let config = dir.join("envoy.json");
        std::fs::write(&config, bootstrap).unwrap();
        let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(vmesh_testkit::testing::envoy_binary())
            .arg("-c")
            .arg(&config)
            .args(["--use-dynamic-base-id", "-l", "warning"])
            // Where the metrics log its listeners name relatively goes.
            .current_dir(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting Envoy");
        Envoy(child)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The one guide line that starts so.
fn answer_line(pick: impl Fn(&str) -> bool) -> &'static str {
    let found: Vec<&'static str> = GUIDE.iter().map(|(l, _)| *l).filter(|l| pick(l)).collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0]
}

/// install.sh under `root`, then the guide's `systemctl … istio` through
/// systemd's offline tools.
fn on_the_vm(files: &Path, root: &Path) {
    let installed = Command::new("sh")
        .arg(files.join("install.sh"))
        .env("ROOT", root)
        .env("APP_UNIT", "payment-app")
        .output()
        .unwrap();
    assert_ok(&installed, "install.sh");
    // What a VM has and a bare directory lacks: the binary the unit runs,
    // systemd's targets, the application's own unit.
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::write(root.join("usr/local/bin/vmesh"), "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("usr/local/bin/vmesh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let targets = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&targets).unwrap();
    for target in [
        "multi-user.target",
        "basic.target",
        "sysinit.target",
        "network-online.target",
        "network.target",
        "shutdown.target",
        "sockets.target",
        "paths.target",
        "timers.target",
        "slices.target",
        "local-fs.target",
        "swap.target",
    ] {
        let host = ["/usr/lib/systemd/system", "/lib/systemd/system"]
            .iter()
            .map(|d| Path::new(d).join(target))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("systemd's {target} is missing: install systemd"));
        std::fs::copy(host, targets.join(target)).unwrap();
    }
    std::fs::write(
        root.join("etc/systemd/system/payment-app.service"),
        "[Unit]\nDescription=the payment application\n[Service]\nExecStart=/usr/local/bin/vmesh\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();

    let tool = |program: &str, args: &[&str]| {
        let output = Command::new(program)
            .arg(format!("--root={}", root.display()))
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("{program}: {e} (install systemd: scripts/install-deps.sh)")
            });
        (
            output.status.success(),
            text(&output.stdout),
            text(&output.stderr),
        )
    };
    // `systemctl enable istio`, twice as the guide's install script and cloud-init do.
    for run in 1..=2 {
        let (ok, _, stderr) = tool("systemctl", &["enable", "istio"]);
        assert!(ok, "systemctl enable istio, run {run}: {stderr}");
    }
    assert!(
        root.join("etc/systemd/system/multi-user.target.wants/vmesh-agent.service")
            .is_symlink()
    );
    assert_eq!(tool("systemctl", &["is-enabled", "istio"]).1, "alias\n");
    assert_eq!(
        tool("systemctl", &["is-enabled", "vmesh-agent.service"]).1,
        "enabled\n"
    );
    // systemd loads the agent's unit by the guide's name, and finds nothing
    // to say about it, its readiness wait or the application's drop-in.
    for unit in [
        "istio.service",
        "vmesh-agent.service",
        "payment-app.service",
    ] {
        let (ok, stdout, stderr) = tool("systemd-analyze", &["verify", unit]);
        assert!(ok && stderr.is_empty(), "verify {unit}:\n{stdout}{stderr}");
    }
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/vmesh-agent.service")).unwrap();
    assert!(unit.contains("\nLogExtraFields=OBJECT_SYSTEMD_UNIT=istio.service\n"));
    assert!(unit.contains("\nExecStartPost=/usr/local/bin/vmesh agent wait --timeout 120s\n"));
    let dropin = std::fs::read_to_string(
        root.join("etc/systemd/system/payment-app.service.d/10-vmesh-sidecar.conf"),
    )
    .unwrap();
    assert!(dropin.contains("\nRequires=vmesh-agent.service\nAfter=vmesh-agent.service\n"));
    // `systemctl disable istio` undoes it.
    assert!(tool("systemctl", &["disable", "istio"]).0);
    assert_eq!(
        tool("systemctl", &["is-enabled", "vmesh-agent.service"]).1,
        "disabled\n"
    );
    assert!(tool("systemctl", &["enable", "istio"]).0);
}
