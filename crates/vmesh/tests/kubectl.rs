//! The real `kubectl` against a real `vmesh server`, with nothing but the
//! kubeconfig `vmesh kubeconfig` writes: the guide's kubectl command lines
//! with `--kubeconfig` added, the manifests applied client-side and
//! server-side, diff, watch, explain, api-resources, deletes, and the
//! refusals kubectl renders as it does for a cluster.
//!
//! kubectl sends a token only over TLS: the server takes TLS and plain
//! HTTP on its loopback API port, and `vmesh kubeconfig --token` points
//! kubectl at the TLS side, trusting the mesh root the server publishes.
//!
//! kubectl must be on PATH (`.ci/run` installs it when the machine has none).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use vmesh_api::testing::seed_dir;
use vmesh_testkit::LocalServer;
use vmesh_testkit::testing::{assert_ok, eventually, text};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
const TOKEN: &str = "kubectl-test-token-0123456789";

/// The guide's manifests that are Kubernetes objects (the cloud-init file
/// and the troubleshooting notes are not), in an order that creates each
/// namespace before what is in it. `mesh-config-dns.yaml` is left out: its
/// IstioOperator has no name, which `istioctl install` (and `vmesh apply`)
/// take and kubectl, against any server, does not.
const MANIFESTS: &[&str] = &[
    "service-payment.yaml",
    "workload-group-payment-service.yaml",
    "complete-vm-integration.yaml",
    "expose-istiod.yaml",
    "istio-operator-vm.yaml",
    "workload-group-auto-register.yaml",
    "workload-entry-payment-vm1.yaml",
    "destination-rule-payment.yaml",
    "virtual-service-payment.yaml",
    "peer-authentication-strict.yaml",
    "authorization-policy-payment.yaml",
    "service-entry-vm-database.yaml",
    "telemetry-access-log.yaml",
    "telemetry-tracing.yaml",
    "prometheus-vm-scrape.yaml",
];

fn kubectl_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("kubectl"))
        .find(|path| path.is_file())
        .expect("kubectl is not on PATH (.ci/run installs it)")
}

/// kubectl with one kubeconfig.
struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            // kubectl's cache of discovery and OpenAPI lives here: one per test.
            .env("HOME", self.kubeconfig.parent().unwrap());
        command
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running kubectl")
    }

    /// Runs a command line as the guide writes it (`kubectl …`), split on spaces.
    #[track_caller]
    fn ok(&self, line: &str) -> String {
        let args: Vec<&str> = line.strip_prefix("kubectl ").unwrap().split(' ').collect();
        let output = self.output(&args);
        assert_ok(&output, line);
        text(&output.stdout)
    }

    #[track_caller]
    fn refused(&self, args: &[&str]) -> String {
        let output = self.output(args);
        assert!(
            !output.status.success(),
            "kubectl {args:?} should have failed: {}",
            text(&output.stdout)
        );
        text(&output.stderr)
    }
}

/// A server with a token, and kubectl configured by `vmesh kubeconfig`.
fn setup(dir: &Path) -> (LocalServer, Kubectl) {
    let (server, config) =
        LocalServer::start_for_kubernetes(Path::new(VMESH), dir, TOKEN, false).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, config).unwrap();
    let kubectl = Kubectl {
        binary: kubectl_binary(),
        kubeconfig,
    };
    (server, kubectl)
}

fn manifest(name: &str) -> String {
    seed_dir().join(name).to_str().unwrap().to_string()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn kubectl_runs_the_guides_command_lines_against_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubectl) = setup(dir.path());

    // With another token, kubectl is refused as by a cluster.
    let anonymous = Kubectl {
        binary: kubectl.binary.clone(),
        kubeconfig: dir.path().join("anonymous"),
    };
    let root = dir.path().join("data/ca/root-cert.pem");
    let config = server
        .command(&[
            "kubeconfig",
            "--ca-file",
            root.to_str().unwrap(),
            "--token",
            "not-the-token-0123456789",
        ])
        .output()
        .unwrap();
    assert_ok(&config, "vmesh kubeconfig with another token");
    std::fs::write(&anonymous.kubeconfig, &config.stdout).unwrap();
    let refused = anonymous.refused(&["get", "ns"]);
    assert!(
        refused.contains("You must be logged in to the server"),
        "{refused}"
    );

    // The guide's command lines, with only --kubeconfig added.
    assert!(
        kubectl
            .ok("kubectl create namespace vm-workloads")
            .contains("namespace/vm-workloads created")
    );
    assert!(
        kubectl
            .ok("kubectl label namespace vm-workloads istio-injection=enabled")
            .contains("labeled")
    );
    assert!(
        kubectl
            .ok("kubectl create serviceaccount payment-service-sa -n vm-workloads")
            .contains("serviceaccount/payment-service-sa created")
    );
    kubectl.ok("kubectl create namespace monitoring");
    for name in MANIFESTS {
        let out = kubectl.ok(&format!("kubectl apply -f {}", manifest(name)));
        assert!(
            out.lines().all(|l| l.ends_with(" created")
                || l.ends_with(" configured")
                || l.ends_with(" unchanged")),
            "{name}: {out}"
        );
    }
    let namespaces = kubectl.ok("kubectl get ns --show-labels");
    assert!(
        namespaces.lines().any(|l| l.starts_with("vm-workloads ")
            && l.contains(" Active ")
            && l.contains("istio-injection=enabled")),
        "{namespaces}"
    );

    // Reads, in kubectl's formats, with Istio's printer columns.
    let entries = kubectl.ok("kubectl get workloadentries -n vm-workloads");
    let header: Vec<&str> = entries.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "AGE", "ADDRESS"], "{entries}");
    assert!(entries.contains("payment-service-vm1"), "{entries}");
    let all = kubectl.ok("kubectl get we -A");
    assert!(
        all.starts_with("NAMESPACE ")
            && all
                .lines()
                .any(|l| l.starts_with("vm-workloads ") && l.ends_with(" 192.168.1.100")),
        "{all}"
    );
    let group = kubectl.ok("kubectl get workloadgroup -n vm-workloads -o yaml");
    assert!(
        group.contains("kind: WorkloadGroup")
            && group.contains("serviceAccount: payment-service-sa"),
        "{group}"
    );
    let listed = json(&kubectl.ok("kubectl get workloadentry -n vm-workloads -o json"));
    assert_eq!(listed["items"][0]["spec"]["address"], "192.168.1.100");
    assert!(listed["items"][0]["metadata"]["uid"].is_string());
    let services = kubectl.ok("kubectl get svc -n vm-workloads -o wide");
    assert!(
        services.starts_with("NAME ")
            && services.contains("SELECTOR")
            && services.contains("8080/TCP"),
        "{services}"
    );
    let both = kubectl.ok("kubectl get vs,dr -n vm-workloads");
    assert!(
        both.contains("virtualservice.networking.istio.io/payment-service")
            && both.contains("destinationrule.networking.istio.io/payment-service"),
        "{both}"
    );
    let endpoints = eventually("the VM in the Service's endpoints", || {
        let yaml = kubectl.ok("kubectl get endpoints payment-service -n vm-workloads -o yaml");
        yaml.contains("192.168.1.100").then_some(yaml)
    });
    assert!(endpoints.contains("kind: Endpoints"), "{endpoints}");
    let table = kubectl.ok("kubectl get ep -n vm-workloads");
    assert!(
        table.starts_with("NAME ")
            && table.contains("ENDPOINTS")
            && table.contains("192.168.1.100:"),
        "{table}"
    );
    let slices = kubectl.ok(
        "kubectl get endpointslices -n vm-workloads -l kubernetes.io/service-name=payment-service",
    );
    let header: Vec<&str> = slices.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
        "{slices}"
    );
    assert!(
        slices.contains("payment-service-ipv4")
            && slices.contains("IPv4")
            && slices.contains("192.168.1.100"),
        "{slices}"
    );
    let slice =
        json(&kubectl.ok("kubectl get endpointslice payment-service-ipv4 -n vm-workloads -o json"));
    assert_eq!(
        slice["endpoints"][0]["conditions"]["ready"], true,
        "{slice}"
    );
    assert_eq!(
        slice["endpoints"][0]["targetRef"]["kind"], "WorkloadEntry",
        "{slice}"
    );
    let write = kubectl.refused(&[
        "delete",
        "endpointslice",
        "payment-service-ipv4",
        "-n",
        "vm-workloads",
    ]);
    assert!(write.contains("MethodNotAllowed"), "{write}");

    // Discovery and the schemas.
    let resources = kubectl.ok("kubectl api-resources");
    for info in vmesh_api::kinds().iter().chain(vmesh_api::views()) {
        let line = resources
            .lines()
            .find(|l| l.split_whitespace().next() == Some(info.plural))
            .unwrap_or_else(|| panic!("{} missing from api-resources:\n{resources}", info.plural));
        if !info.short_names.is_empty() {
            assert!(line.contains(&info.short_names.join(",")), "{line}");
        }
    }
    // Istio's categories: every Istio object at once.
    let istio = kubectl.ok("kubectl get istio-io -A");
    for kind in [
        "workloadentry.networking.istio.io/payment-service-vm1",
        "destinationrule.networking.istio.io/payment-service",
        "peerauthentication.security.istio.io/",
        "telemetry.telemetry.istio.io/",
    ] {
        assert!(istio.contains(kind), "{kind}: {istio}");
    }
    let explained = kubectl.ok("kubectl explain workloadentry.spec");
    for field in ["address", "serviceAccount", "network", "locality"] {
        assert!(explained.contains(field), "{field}: {explained}");
    }
    let explained = kubectl.ok("kubectl explain workloadgroup.spec.template");
    assert!(explained.contains("serviceAccount"), "{explained}");

    // The CLI reads what kubectl wrote.
    let cli = server
        .command(&["get", "we", "-n", "vm-workloads", "--token", TOKEN])
        .env("VMESH_CA_FILE", &root)
        .output()
        .unwrap();
    assert_ok(&cli, "vmesh get we");
    assert!(text(&cli.stdout).contains("payment-service-vm1"));
}

#[test]
fn kubectl_diffs_applies_server_side_watches_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, kubectl) = setup(dir.path());
    kubectl.ok("kubectl create namespace vm-workloads");
    let entry = manifest("workload-entry-payment-vm1.yaml");

    // Server-side apply, twice: the second changes nothing.
    let first = kubectl.ok(&format!("kubectl apply --server-side -f {entry}"));
    assert!(first.contains("serverside-applied"), "{first}");
    let version = |kubectl: &Kubectl| {
        json(&kubectl.ok("kubectl get we payment-service-vm1 -n vm-workloads -o json"))["metadata"]
            ["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = version(&kubectl);
    kubectl.ok(&format!("kubectl apply --server-side -f {entry}"));
    assert_eq!(
        version(&kubectl),
        before,
        "an unchanged apply writes nothing"
    );
    let managed = json(
        &kubectl
            .ok("kubectl get we payment-service-vm1 -n vm-workloads -o json --show-managed-fields"),
    );
    let managers = managed["metadata"]["managedFields"].as_array().unwrap();
    assert_eq!(managers[0]["manager"], "kubectl");
    assert_eq!(managers[0]["operation"], "Apply");
    assert!(managers[0]["fieldsV1"]["f:spec"]["f:address"].is_object());

    // Another manager changes a field the apply owns: a conflict, then force.
    kubectl.ok(
        "kubectl patch we payment-service-vm1 -n vm-workloads --type merge -p {\"spec\":{\"address\":\"192.168.1.200\"}}",
    );
    let conflict = kubectl.refused(&["apply", "--server-side", "-f", &entry]);
    assert!(
        conflict.contains("conflict") && conflict.contains(".spec.address"),
        "{conflict}"
    );
    kubectl.ok(&format!(
        "kubectl apply --server-side --force-conflicts -f {entry}"
    ));

    // diff: nothing to show, then the change a file would make, written nowhere.
    let unchanged = kubectl.output(&["diff", "-f", &entry]);
    assert_eq!(
        unchanged.status.code(),
        Some(0),
        "{}",
        text(&unchanged.stderr)
    );
    let changed_file = dir.path().join("changed.yaml");
    let changed = std::fs::read_to_string(&entry)
        .unwrap()
        .replace("192.168.1.100", "192.168.1.150");
    std::fs::write(&changed_file, changed).unwrap();
    let diff = kubectl.output(&["diff", "-f", changed_file.to_str().unwrap()]);
    assert_eq!(diff.status.code(), Some(1), "{}", text(&diff.stderr));
    let diff = text(&diff.stdout);
    assert!(
        diff.contains("-  address: 192.168.1.100") && diff.contains("+  address: 192.168.1.150"),
        "{diff}"
    );
    let live = json(&kubectl.ok("kubectl get we payment-service-vm1 -n vm-workloads -o json"));
    assert_eq!(
        live["spec"]["address"], "192.168.1.100",
        "diff wrote nothing"
    );

    // get -w sees a change as it happens.
    let mut watch = kubectl
        .command(&[
            "get",
            "we",
            "-n",
            "vm-workloads",
            "-w",
            "--output-watch-events",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines, seen) = mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let first_line = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(first_line.starts_with("EVENT"), "{first_line}");
    let listed = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        listed.starts_with("ADDED") && listed.contains("payment-service-vm1"),
        "{listed}"
    );
    kubectl.ok("kubectl label we payment-service-vm1 -n vm-workloads seen=yes");
    let modified = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        modified.starts_with("MODIFIED") && modified.contains("192.168.1.100"),
        "{modified}"
    );

    // The status subresource: written on its own, untouched by writes of
    // the object; generation counts spec changes only.
    let before = json(&kubectl.ok("kubectl get we payment-service-vm1 -n vm-workloads -o json"));
    kubectl.ok(
        "kubectl patch we payment-service-vm1 -n vm-workloads --subresource=status --type merge -p {\"status\":{\"conditions\":[{\"type\":\"Healthy\",\"status\":\"True\"}]}}",
    );
    let with_status =
        json(&kubectl.ok("kubectl get we payment-service-vm1 -n vm-workloads -o json"));
    assert_eq!(with_status["status"]["conditions"][0]["type"], "Healthy");
    assert_eq!(
        with_status["metadata"]["generation"],
        before["metadata"]["generation"]
    );
    kubectl.ok(
        "kubectl patch we payment-service-vm1 -n vm-workloads --type merge -p {\"status\":{\"conditions\":null},\"spec\":{\"weight\":7}}",
    );
    let after = json(&kubectl.ok("kubectl get we payment-service-vm1 -n vm-workloads -o json"));
    assert_eq!(
        after["status"]["conditions"][0]["type"], "Healthy",
        "{after}"
    );
    assert_eq!(after["spec"]["weight"], 7);
    assert_eq!(
        after["metadata"]["generation"].as_i64().unwrap(),
        before["metadata"]["generation"].as_i64().unwrap() + 1
    );

    // delete -f, and the object is gone as kubectl says it.
    let deleted = kubectl.ok(&format!("kubectl delete -f {entry}"));
    assert!(deleted.contains("deleted"), "{deleted}");
    // The status and spec changes above come first, each a MODIFIED.
    let mut later = Vec::new();
    let gone = loop {
        let line = seen.recv_timeout(Duration::from_secs(10)).unwrap();
        if !line.starts_with("MODIFIED") {
            break line;
        }
        later.push(line);
    };
    assert!(gone.starts_with("DELETED"), "{gone} after {later:?}");
    assert_eq!(later.len(), 2, "{later:?}");
    let _ = watch.kill();
    let _ = watch.wait();
    let missing = kubectl.refused(&["get", "we", "payment-service-vm1", "-n", "vm-workloads"]);
    assert!(
        missing.contains(
            "Error from server (NotFound): workloadentries.networking.istio.io \"payment-service-vm1\" not found"
        ),
        "{missing}"
    );
}

#[test]
fn kubectl_renders_the_servers_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubectl) = setup(dir.path());
    kubectl.ok("kubectl create namespace vm-workloads");
    let exists = kubectl.refused(&["create", "namespace", "vm-workloads"]);
    assert!(
        exists.contains(
            "Error from server (AlreadyExists): namespaces \"vm-workloads\" already exists"
        ),
        "{exists}"
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: bad, namespace: vm-workloads}\nspec: {address: \"not an address!\"}\n",
    )
    .unwrap();
    let invalid = kubectl.refused(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(
        invalid.contains("The WorkloadEntry \"bad\" is invalid")
            && invalid.contains("spec.address"),
        "{invalid}"
    );
    let unknown = dir.path().join("unknown.yaml");
    std::fs::write(
        &unknown,
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: odd, namespace: vm-workloads}\nspec: {address: 10.0.0.1, adress: 10.0.0.2}\n",
    )
    .unwrap();
    let strict = kubectl.refused(&["apply", "-f", unknown.to_str().unwrap()]);
    assert!(strict.contains("adress"), "{strict}");
    let nowhere = kubectl.refused(&["create", "serviceaccount", "x", "-n", "nowhere"]);
    assert!(
        nowhere.contains("namespace \"nowhere\" not found"),
        "{nowhere}"
    );
    let protected = kubectl.refused(&["delete", "namespace", "default"]);
    assert!(protected.contains("Forbidden"), "{protected}");
    // 400: a field selector the server cannot read.
    let selector = kubectl.refused(&[
        "get",
        "we",
        "-n",
        "vm-workloads",
        "--field-selector",
        "spec.address=10.0.0.1",
    ]);
    assert!(
        selector.contains("Error from server (BadRequest)"),
        "{selector}"
    );
    // 410: a watch from a version older than the server keeps (from
    // before a restart).
    let listed = json(&kubectl.ok("kubectl get --raw /api/v1/namespaces"));
    let version = listed["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!version.is_empty(), "{listed}");
    kubectl.ok("kubectl create namespace later");
    drop(server);
    let (_server, kubectl) = setup(dir.path());
    let gone = kubectl.refused(&[
        "--request-timeout",
        "20s",
        "get",
        "--raw",
        &format!("/api/v1/namespaces?watch=1&resourceVersion={version}"),
    ]);
    assert!(gone.contains("Error from server (Expired)"), "{gone}");
}

#[test]
fn finalizers_hold_a_kubectl_delete_until_they_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, kubectl) = setup(dir.path());
    kubectl.ok("kubectl create namespace vm-workloads");
    kubectl.ok(&format!(
        "kubectl apply -f {}",
        manifest("workload-entry-payment-vm1.yaml")
    ));
    let get = |kubectl: &Kubectl| {
        kubectl.output(&[
            "get",
            "we",
            "payment-service-vm1",
            "-n",
            "vm-workloads",
            "-o",
            "json",
        ])
    };
    kubectl.ok(
        "kubectl patch we payment-service-vm1 -n vm-workloads --type merge -p {\"metadata\":{\"finalizers\":[\"example.com/hold\"]}}",
    );
    let deleted = kubectl.ok("kubectl delete we payment-service-vm1 -n vm-workloads --wait=false");
    assert!(deleted.contains("deleted"), "{deleted}");
    let held = json(&text(&get(&kubectl).stdout));
    assert!(held["metadata"]["deletionTimestamp"].is_string(), "{held}");
    // The namespace waits too, Terminating, and takes nothing new.
    kubectl.ok("kubectl delete namespace vm-workloads --wait=false");
    let namespaces = kubectl.ok("kubectl get ns vm-workloads");
    assert!(namespaces.contains("Terminating"), "{namespaces}");
    let refused = kubectl.refused(&["create", "serviceaccount", "late", "-n", "vm-workloads"]);
    assert!(refused.contains("being deleted"), "{refused}");
    kubectl.ok(
        "kubectl patch we payment-service-vm1 -n vm-workloads --type merge -p {\"metadata\":{\"finalizers\":null}}",
    );
    let gone = get(&kubectl);
    assert!(!gone.status.success() && text(&gone.stderr).contains("NotFound"));
    let namespace = kubectl.output(&["get", "ns", "vm-workloads"]);
    assert!(!namespace.status.success(), "the namespace went with it");
}
