//! The real `vmesh` binary: a server process and the CLI commands against it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vmesh_api::decode_manifests;
use vmesh_api::testing::{NOT_KUBERNETES, seed_dir};
use vmesh_testkit::LocalServer;

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

/// A `vmesh server` on free loopback ports, stopped when dropped.
fn start(data_dir: &Path, extra: &[&str]) -> LocalServer {
    LocalServer::start(Path::new(VMESH), data_dir, extra, &[]).unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_ok(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn seed_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(seed_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !NOT_KUBERNETES.contains(&p.file_name().unwrap().to_str().unwrap()))
        .collect();
    files.sort();
    // The guide applies the complete manifest first.
    files.sort_by_key(|p| !p.ends_with("complete-vm-integration.yaml"));
    files
}

/// Every seed object, read back with `get -o yaml`, equals the manifest in meaning.
fn assert_seed_objects_served(server: &LocalServer) {
    for file in seed_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for located in decode_manifests("seed", &text).objects {
            let object = located.object;
            let info = object.info().unwrap();
            let mut args = vec!["get", info.plural, object.metadata.name(), "-o", "yaml"];
            if let Some(ns) = object.metadata.namespace() {
                args.extend(["-n", ns]);
            }
            let output = server.vmesh(&args);
            assert_ok(&output, &format!("get {}", object.display_name()));
            let served = decode_manifests("served", &stdout(&output));
            assert!(!served.has_errors(), "{:?}", served.problems);
            let mut served = served.objects[0].object.clone();
            // The guide's files overlap; the object must equal the last file's definition.
            let last = seed_files()
                .iter()
                .rev()
                .flat_map(|f| {
                    decode_manifests("seed", &std::fs::read_to_string(f).unwrap()).objects
                })
                .find(|l| l.object.key() == object.key())
                .unwrap()
                .object;
            // What the server fills in, as Kubernetes does: a Service's
            // type and the cluster IP the mesh gave it.
            if served.kind == "Service"
                && let Some(serde_json::Value::Object(spec)) = served.body.get_mut("spec")
            {
                for field in ["type", "clusterIP", "clusterIPs"] {
                    if last.body["spec"].get(field).is_none() {
                        spec.remove(field);
                    }
                }
            }
            assert!(
                served.same_content(&last),
                "{} differs:\n{}",
                object.display_name(),
                stdout(&output)
            );
        }
    }
}

#[test]
fn guide_manifests_apply_read_back_and_survive_restart() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), &[]);
    let first = server.vmesh(&[
        "apply",
        "-f",
        seed_dir()
            .join("complete-vm-integration.yaml")
            .to_str()
            .unwrap(),
    ]);
    assert_ok(&first, "apply complete-vm-integration.yaml");
    assert_eq!(
        stdout(&first),
        "namespace/vm-workloads created\n\
         serviceaccount/payment-service-sa created\n\
         workloadgroup.networking.istio.io/payment-service created\n\
         service/payment-service created\n\
         destinationrule.networking.istio.io/payment-service created\n\
         peerauthentication.security.istio.io/payment-service-mtls created\n\
         authorizationpolicy.security.istio.io/payment-service-authz created\n"
    );
    // The Prometheus ConfigMap lives in `monitoring`, which the guide assumes exists.
    let refused = server.vmesh(&[
        "apply",
        "-f",
        seed_dir()
            .join("prometheus-vm-scrape.yaml")
            .to_str()
            .unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("namespace \"monitoring\" not found")
    );
    assert_ok(
        &server.vmesh(&["create", "namespace", "monitoring"]),
        "create namespace",
    );
    for file in seed_files() {
        let output = server.vmesh(&["apply", "-f", file.to_str().unwrap()]);
        assert_ok(&output, &format!("apply {}", file.display()));
        if file.ends_with("complete-vm-integration.yaml") {
            assert!(
                stdout(&output).contains("namespace/vm-workloads unchanged"),
                "{}",
                stdout(&output)
            );
        }
    }
    assert_seed_objects_served(&server);

    for short in [
        "we",
        "wg",
        "se",
        "dr",
        "vs",
        "pa",
        "ap",
        "svc",
        "sa",
        "cm",
        "iop",
        "gw",
        "telemetry",
    ] {
        let output = server.vmesh(&["get", short, "-A"]);
        assert_ok(&output, &format!("get {short} -A"));
        assert!(
            stdout(&output).starts_with("NAMESPACE"),
            "get {short}: {}",
            stdout(&output)
        );
    }
    let names = server.vmesh(&["get", "we", "-n", "vm-workloads", "-o", "name"]);
    assert_eq!(
        stdout(&names),
        "workloadentry.networking.istio.io/payment-service-vm1\n"
    );
    let wide = server.vmesh(&["get", "workloadentries", "-n", "vm-workloads", "-o", "wide"]);
    assert!(
        stdout(&wide).contains("192.168.1.100") && stdout(&wide).contains("app=payment-service"),
        "{}",
        stdout(&wide)
    );
    drop(server);

    let server = start(data.path(), &[]);
    assert_seed_objects_served(&server);

    let deleted = server.vmesh(&["delete", "se", "vm-database", "-n", "vm-workloads"]);
    assert_eq!(
        stdout(&deleted),
        "serviceentry.networking.istio.io/vm-database deleted\n"
    );
    let gone = server.vmesh(&["get", "se", "vm-database", "-n", "vm-workloads"]);
    assert!(!gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    let by_file = server.vmesh(&[
        "delete",
        "-f",
        seed_dir()
            .join("complete-vm-integration.yaml")
            .to_str()
            .unwrap(),
    ]);
    assert_ok(&by_file, "delete -f");
    assert!(
        stdout(&by_file).ends_with("namespace/vm-workloads deleted\n"),
        "namespaces go last: {}",
        stdout(&by_file)
    );
}

#[test]
fn a_broken_document_applies_nothing_and_says_which() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), &[]);
    let manifest = data.path().join("mixed.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: vm1\n  namespace: shop\nspec:\n  address: 10.0.0.1\n  ports:\n    http: \"8080\"\n",
    )
    .unwrap();
    let output = server.vmesh(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(!output.status.success());
    let file = manifest.display().to_string();
    assert_eq!(
        stdout(&output),
        format!(
            "{file}:14:5: WorkloadEntry shop/vm1: spec.ports.http: expected a non-negative integer, got string \"8080\" (remove the quotes)\n"
        )
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("nothing was applied"));
    let namespaces = server.vmesh(&["get", "ns"]);
    assert!(
        !stdout(&namespaces).contains("shop"),
        "the valid document was not applied either"
    );
}

/// A "billion laughs" of YAML aliases (a few hundred bytes) is refused at
/// the line where it grows too large, in bounded memory, not expanded.
#[test]
fn validate_refuses_an_alias_bomb() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bomb}\ndata:\n");
    text.push_str("  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for level in 1..12 {
        let items = vec![format!("*a{}", level - 1); 9].join(", ");
        text.push_str(&format!("  a{level}: &a{level} [{items}]\n"));
    }
    let file = dir.path().join("bomb.yaml");
    std::fs::write(&file, &text).unwrap();
    let output = Command::new("/usr/bin/time")
        .args(["-f", "peak %M KB"])
        .arg(VMESH)
        .args(["validate", "-f"])
        .arg(&file)
        .output()
        .expect("GNU time (Debian's time package)");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stdout(&output).contains("bomb.yaml:11:")
            && stdout(&output).contains("aliases are expanded"),
        "{}",
        stdout(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let peak_kb: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak ")?.strip_suffix(" KB")?.parse().ok())
        .unwrap_or_else(|| panic!("no peak in {stderr}"));
    assert!(peak_kb < 300 * 1024, "validate peaked at {peak_kb} KB");
}

#[test]
fn validate_reports_and_exits() {
    for file in seed_files() {
        let output = Command::new(VMESH)
            .args(["validate", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert_ok(&output, &format!("validate {}", file.display()));
    }
    let cloud_init = seed_dir().join("cloud-init-istio-vm.yaml");
    let output = Command::new(VMESH)
        .args(["validate", "-f"])
        .arg(&cloud_init)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).contains("not a Kubernetes object"),
        "{}",
        stdout(&output)
    );

    let mut child = Command::new(VMESH)
        .args(["validate", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [a]\n  http:\n  - route:\n    - destination: {host: a, subset: x}\n      weight: 80\n    - destination: {host: a, subset: y}\n      weight: 10\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stdout(&output),
        "<stdin>:7:5: VirtualService default/vs: spec.http[0].route: route weights must sum to 100, but they sum to 90\n"
    );
}

#[test]
fn token_protected_server_refuses_the_anonymous() {
    let data = tempfile::tempdir().unwrap();
    let token_file = data.path().join("token");
    std::fs::write(&token_file, "t0ken-t0ken-t0ken\n").unwrap();
    let server = start(
        &data.path().join("store"),
        &["--api-token-file", token_file.to_str().unwrap()],
    );
    let refused = server.vmesh(&["get", "ns"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthorized"),
        "{refused:?}"
    );
    let allowed = Command::new(VMESH)
        .args(["get", "ns"])
        .env("VMESH_SERVER", server.api())
        .env("VMESH_TOKEN", "t0ken-t0ken-t0ken")
        .output()
        .unwrap();
    assert_ok(&allowed, "get ns with a token");
    assert!(stdout(&allowed).contains("istio-system"));

    let open = Command::new(VMESH)
        .args(["server", "--data-dir"])
        .arg(data.path().join("open"))
        .args([
            "--api-addr",
            "0.0.0.0:0",
            "--monitoring-addr",
            "127.0.0.1:0",
            "--xds-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!open.status.success());
    assert!(String::from_utf8_lossy(&open.stderr).contains("--api-token-file"));
}

/// The README's main job, as CI runs it: every check passes, again after a
/// run that left everything behind (as a crash would), and `--down` then
/// leaves nothing.
#[test]
fn demo_passes_every_check_again_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = |args: &[&str]| {
        Command::new(VMESH)
            .arg("demo")
            .args(args)
            .env("TMPDIR", tmp.path())
            .output()
            .unwrap()
    };
    let checks = 10;
    for args in [&["--keep"][..], &[]] {
        let output = demo(args);
        assert_ok(&output, "vmesh demo");
        let text = stdout(&output);
        assert_eq!(text.matches("  PASS  ").count(), checks, "{text}");
        assert!(!text.contains("FAIL"), "{text}");
        // The canary split as Prometheus counted it, query and totals.
        assert!(text.contains("Prometheus: sum by (destination_version) (istio_requests_total{destination_service_name=\"payment-service\",reporter=\"destination\"})"), "{text}");
        assert!(text.contains("  destination_version=v2  "), "{text}");
    }
    let output = demo(&["--keep"]);
    assert_ok(&output, "vmesh demo --keep");
    let text = stdout(&output);
    assert!(text.contains("vmesh demo --down"));
    assert!(
        text.contains("http://127.0.0.1:9090/api/v1/query"),
        "where Prometheus is: {text}"
    );
    assert_ok(&demo(&["--down"]), "vmesh demo --down");
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains("vmesh-demo"),
        "namespaces left: {}",
        String::from_utf8_lossy(&namespaces.stdout)
    );
    assert!(!tmp.path().join("vmesh-demo").exists(), "state left");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(VMESH)
        .args(["--log-format", "json", "server", "--data-dir"])
        .arg(dir.path())
        .args(["--api-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = server.stderr.take().unwrap();
    // Its first lines, up to the one saying it listens.
    let mut lines: Vec<String> = Vec::new();
    for line in BufReader::new(stderr).lines().take(10) {
        let line = line.unwrap();
        let listening = line.contains("config API listening");
        lines.push(line);
        if listening {
            break;
        }
    }
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(lines.len() >= 2, "{lines:?}");
    for line in &lines {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "message", "target"] {
            assert!(object.get(field).is_some(), "{field} missing: {line}");
        }
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"message\":\"config API listening\""))
    );
}

#[test]
fn get_selects_by_label_and_field_as_kubectl_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), &[]);
    let manifests = dir.path().join("entries.yaml");
    let entry = |name: &str, app: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\nspec: {{address: 10.0.0.1}}\n---\n"
        )
    };
    std::fs::write(
        &manifests,
        [
            entry("web-1", "web"),
            entry("web-2", "web"),
            entry("db-1", "db"),
        ]
        .concat(),
    )
    .unwrap();
    assert_ok(
        &server
            .command(&["apply", "-f", manifests.to_str().unwrap()])
            .output()
            .unwrap(),
        "apply",
    );
    let names = |args: &[&str]| -> Vec<String> {
        let mut command = vec!["get", "we", "-o", "name"];
        command.extend(args);
        let output = server.command(&command).output().unwrap();
        assert_ok(&output, &format!("get {args:?}"));
        stdout(&output).lines().map(str::to_string).collect()
    };
    assert_eq!(names(&["-l", "app=web"]).len(), 2);
    assert_eq!(names(&["-l", "app in (db)"]).len(), 1);
    assert_eq!(names(&["-l", "app!=web,app"]).len(), 1);
    assert_eq!(names(&["--field-selector", "metadata.name=web-2"]).len(), 1);
    let bad = server
        .command(&["get", "we", "-l", "app=not valid"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("labelSelector"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
