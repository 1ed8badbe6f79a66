//! The one-line join end to end: an operator makes a join token for a
//! WorkloadGroup (`vmesh workload entry configure --join`), and a VM in a
//! network namespace of the test's own runs the printed `vmesh agent join`
//! line: the files are fetched over TLS pinned to the mesh root, installed,
//! and the agent registers the VM. Refused: a wrong pin (before the token is
//! sent), a made-up token, a spent single-use token, a revoked token and an
//! expired one.
//!
//! Needs root, `ip`, `iptables` and Envoy; without them it fails, it never
//! skips.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use vmesh_testkit::netns::link;
use vmesh_testkit::testing::{envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

const GROUP: &str = "payment-vms";
const SERVER: &str = "10.52.0.2:15012";

/// `configure --join` with `flags`: the token and the CA pin it printed.
fn join_token(mesh: &Mesh, flags: &[&str]) -> (String, String) {
    let mut args = vec![
        "workload",
        "entry",
        "configure",
        "--name",
        GROUP,
        "-n",
        "vm-workloads",
        "--autoregister",
        "--ingressHost",
        "10.52.0.2",
        "--join",
    ];
    args.extend(flags);
    let printed = mesh.cli(&args).unwrap();
    let line = printed
        .lines()
        .find(|l| l.trim_start().starts_with("vmesh agent join"))
        .unwrap_or_else(|| panic!("no join line in:\n{printed}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| {
        let at = words.iter().position(|w| *w == flag).unwrap();
        words[at + 1].to_string()
    };
    assert_eq!(after("--server"), SERVER);
    (after("--token"), after("--ca-hash"))
}

/// `vmesh agent join` installing only, under `root`.
fn join_only(vm: &Namespace, root: &Path, token: &str, pin: &str) -> Output {
    vm.command(&[
        VMESH,
        "agent",
        "--root",
        root.to_str().unwrap(),
        "join",
        "--server",
        SERVER,
        "--token",
        token,
        "--ca-hash",
        pin,
        "--no-start",
    ])
    .output()
    .unwrap()
}

fn refused(output: &Output, why: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "refused ({why}): {stderr}");
    assert!(stderr.contains(why), "{why:?} in: {stderr}");
}

#[test]
fn a_vm_joins_with_one_line_and_spent_revoked_or_expired_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let id = std::process::id();
    let server = Namespace::new(&format!("vmesh-js-{id}"));
    let vm = Namespace::new(&format!("vmesh-jv-{id}"));
    link(&vm, "10.52.0.1", &server, "10.52.0.2", &format!("j{id}")).unwrap();
    let mesh = Mesh::new(VMESH, &server, dir).with_envoy(&envoy_binary());
    mesh.start_server(&server, &["--xds-addr", "0.0.0.0:15012"])
        .unwrap();
    mesh.cli(&["create", "namespace", "vm-workloads"]).unwrap();
    let group = dir.join("group.yaml");
    std::fs::write(
        &group,
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {{name: {GROUP}, namespace: vm-workloads}}\n\
             spec:\n  metadata:\n    labels: {{app: payment-service}}\n  template:\n    serviceAccount: payment-service-sa\n"
        ),
    )
    .unwrap();
    mesh.apply_file(&group).unwrap();

    let (token, pin) = join_token(&mesh, &[]);
    assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64, "{pin}");

    // A server whose root does not match the pin never sees the token: the
    // token still works afterwards.
    let wrong_pin = format!("sha256:{}", "0".repeat(64));
    refused(
        &join_only(&vm, &dir.join("never"), &token, &wrong_pin),
        "refusing to send it the join token",
    );
    assert!(!dir.join("never").exists(), "nothing installed");
    refused(
        &join_only(&vm, &dir.join("never"), "0123456789abcdef.guess", &pin),
        "unknown join token",
    );

    // The printed line, run on the VM: installed, started, registered.
    let root = dir.join("vm-root");
    mesh.start_onboarded_agent(
        &vm,
        &root,
        vm.name(),
        "10.52.0.1",
        91,
        &[
            "join",
            "--server",
            SERVER,
            "--token",
            &token,
            "--ca-hash",
            &pin,
        ],
    )
    .unwrap();
    eventually("the joined VM's WorkloadEntry", || {
        mesh.cli(&[
            "get",
            "we",
            &format!("{GROUP}-10.52.0.1"),
            "-n",
            "vm-workloads",
        ])
        .ok()
    });
    let token_file = root.join("var/lib/istio/tokens/istio-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", token_file.display());
    assert!(
        root.join("var/lib/istio/envoy/cluster.env").is_file(),
        "installed at Istio's paths"
    );

    // Single use: spent.
    refused(&join_only(&vm, &dir.join("again"), &token, &pin), "used up");

    // Revoking the group's join tokens refuses new joins at once.
    let (many, _) = join_token(&mesh, &["--join-uses", "5"]);
    assert!(
        join_only(&vm, &dir.join("first"), &many, &pin)
            .status
            .success(),
        "a 5-use token joins"
    );
    let revoked = mesh
        .cli(&[
            "workload",
            "join-token",
            "revoke",
            "--name",
            GROUP,
            "-n",
            "vm-workloads",
        ])
        .unwrap();
    assert!(revoked.contains("revoked"), "{revoked}");
    refused(&join_only(&vm, &dir.join("second"), &many, &pin), "revoked");

    // Expired.
    let (short, _) = join_token(&mesh, &["--join-duration", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    refused(&join_only(&vm, &dir.join("late"), &short, &pin), "expired");

    // Guessing: after ten failures in a minute the VM's address is turned
    // away without its guesses being checked, and a good token waits too.
    let guesses = (0..12)
        .map(|_| join_only(&vm, &dir.join("never"), "0123456789abcdef.guess", &pin))
        .collect::<Vec<_>>();
    refused(guesses.last().unwrap(), "too many failed joins");
    let (fresh, _) = join_token(&mesh, &[]);
    refused(
        &join_only(&vm, &dir.join("fresh"), &fresh, &pin),
        "429 Too Many Requests",
    );
}
