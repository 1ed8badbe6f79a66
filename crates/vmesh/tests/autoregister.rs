//! Onboarding and auto-registration end to end, with real agents and Envoy
//! in network namespaces of the test's own: a VM onboarded the guide's way
//! (`vmesh workload entry configure --autoregister`, the generated
//! `install.sh`, then `vmesh agent --root`) gets a WorkloadEntry from its
//! group within a second (and is in its Service's Endpoints, as the
//! guide checks with `kubectl get endpoints`), another VM whose token is for a
//! different service account is refused (and the refusal shows on the
//! group, in `vmesh doctor` and in that VM's agent log), and a stopped VM's entry is deleted after the grace period.
//!
//! Needs root, `ip`, `iptables`, `curl` and Envoy; without them it fails, it
//! never skips.

// Registration time is wall-clock time across processes.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use vmesh_testkit::netns::link;
use vmesh_testkit::testing::{envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

const GROUP: &str = "payment-vms";

#[test]
fn vms_register_themselves_and_leave_when_they_stop() {
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let server = Namespace::new(&format!("vmesh-reg-{id}"));
    let vm = Namespace::new(&format!("vmesh-vm1-{id}"));
    let intruder = Namespace::new(&format!("vmesh-vm2-{id}"));
    link(&vm, "10.47.0.1", &server, "10.47.0.2", &format!("r{id}")).unwrap();
    link(
        &intruder,
        "10.48.0.1",
        &server,
        "10.48.0.2",
        &format!("i{id}"),
    )
    .unwrap();
    let mesh = Mesh::new(VMESH, &server, dir.path()).with_envoy(&envoy_binary());
    mesh.start_server(
        &server,
        &[
            "--xds-addr",
            "0.0.0.0:15012",
            "--auto-registration-grace",
            "1s",
        ],
    )
    .unwrap();
    mesh.cli(&["create", "namespace", "vm-workloads"]).unwrap();
    let group = dir.path().join("group.yaml");
    std::fs::write(
        &group,
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {{name: {GROUP}, namespace: vm-workloads}}\n\
             spec:\n  metadata:\n    labels: {{app: payment-service, class: vm}}\n    annotations: {{team: payments}}\n  \
             template:\n    serviceAccount: payment-service-sa\n    ports: {{http: 8080}}\n"
        ),
    )
    .unwrap();
    mesh.apply_file(&group).unwrap();

    // A VM is onboarded: files from the server, installed under its root.
    let vm_root = mesh.onboard(GROUP, "vm-workloads", "10.47.0.2").unwrap();
    // Its agent starts from those files alone (and a name and address, as
    // the VM's host name and address are not the test machine's).
    let started = Instant::now();
    let agent = mesh
        .start_onboarded_agent(
            &vm,
            &vm_root,
            vm.name(),
            "10.47.0.1",
            71,
            &["--label", "version=v1"],
        )
        .unwrap();
    let name = format!("{GROUP}-10.47.0.1");
    let registered = eventually("the VM's WorkloadEntry", || {
        mesh.entry("vm-workloads", &name)
    });
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "registered after {took:?}");
    let spec = &registered["spec"];
    assert_eq!(spec["address"], "10.47.0.1");
    assert_eq!(spec["serviceAccount"], "payment-service-sa");
    assert_eq!(spec["ports"]["http"], 8080);
    let labels = &registered["metadata"]["labels"];
    assert_eq!(
        (&labels["app"], &labels["class"], &labels["version"]),
        (
            &serde_json::json!("payment-service"),
            &serde_json::json!("vm"),
            &serde_json::json!("v1")
        ),
        "labels from the group and from the VM"
    );
    assert_eq!(
        labels["security.istio.io/tlsMode"], "istio",
        "a registered VM runs a sidecar, so clients use mTLS"
    );
    let annotations = &registered["metadata"]["annotations"];
    assert_eq!(annotations["istio.io/autoRegistrationGroup"], GROUP);
    assert_eq!(annotations["team"], "payments");
    assert!(annotations["istio.io/connectedAt"].is_string());

    // The guide's check that its Service found the VM: `kubectl get
    // endpoints payment-service -n vm-workloads`, the registered address
    // on the group's port.
    mesh.apply(
        "service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: payment-service, namespace: vm-workloads}\n\
         spec:\n  selector: {app: payment-service}\n  ports:\n  - {name: http, port: 80, targetPort: http}\n",
    )
    .unwrap();
    let subsets = eventually("the VM in the Service's endpoints", || {
        let endpoints = mesh.get_json(&["endpoints", "payment-service", "-n", "vm-workloads"])?;
        endpoints.get("subsets").cloned()
    });
    assert_eq!(
        subsets,
        serde_json::json!([{
            "addresses": [{"ip": "10.47.0.1", "targetRef": {
                "kind": "WorkloadEntry", "namespace": "vm-workloads", "name": name,
                "apiVersion": "networking.istio.io/v1",
            }}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }])
    );

    // The VM's traffic is captured while the agent runs (SSH never), and
    // Envoy, as the proxy user, still reached the agent's sockets: it is
    // what registered.
    let nat = |vm: &Namespace| vm.run(&["iptables-save", "-t", "nat"]);
    let rules = nat(&vm);
    for rule in [
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A ISTIO_OUTPUT -d 10.47.0.2/32 -j RETURN",
    ] {
        assert!(rules.contains(rule), "missing {rule:?} in\n{rules}");
    }

    // A VM with a token for another service account may not join this group.
    mesh.start_agent(
        &intruder,
        "10.48.0.2:15012",
        "vm-workloads",
        "intruder-sa",
        "10.48.0.1",
        &["--auto-register-group", GROUP],
        72,
    )
    .unwrap();
    let refusal = eventually("the refusal on the group's status", || {
        let group = mesh.get_json(&["wg", GROUP, "-n", "vm-workloads"])?;
        let condition = group["status"]["conditions"][0].clone();
        (condition["reason"] == "Refused").then_some(condition)
    });
    let message = refusal["message"].as_str().unwrap();
    assert!(
        message.contains("vm-workloads/intruder-sa") && message.contains("payment-service-sa"),
        "{message}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        mesh.entry("vm-workloads", &format!("{GROUP}-10.48.0.1"))
            .is_none(),
        "no entry for the refused VM"
    );
    // The operator sees it in `vmesh doctor` (which fails), the VM in its log.
    let doctor = mesh.cli_output(&["doctor"]).unwrap();
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        !doctor.status.success(),
        "doctor fails on a refusal:\n{report}"
    );
    assert!(
        report.lines().any(|l| l.starts_with("FAIL")
            && l.contains(&format!("WorkloadGroup vm-workloads/{GROUP}"))
            && l.contains("intruder-sa")),
        "{report}"
    );
    let intruder_log =
        std::fs::read_to_string(dir.path().join(format!("agent-{}.log", intruder.name()))).unwrap();
    assert!(
        intruder_log.contains("auto-registration into payment-vms")
            && intruder_log.contains("payment-service-sa"),
        "the refusal in the VM's agent log:\n{intruder_log}"
    );

    // The VM stops: its entry is marked, then gone after the 1 s grace period.
    vm.stop(agent).unwrap();
    eventually("the entry marked disconnected", || {
        let entry = mesh.entry("vm-workloads", &name)?;
        entry["metadata"]["annotations"]["istio.io/disconnectedAt"]
            .is_string()
            .then_some(())
    });
    eventually("the entry deleted after the grace period", || {
        mesh.entry("vm-workloads", &name).is_none().then_some(())
    });
    eventually("the VM gone from the Service's endpoints", || {
        let endpoints = mesh.get_json(&["ep", "payment-service", "-n", "vm-workloads"])?;
        endpoints.get("subsets").is_none().then_some(())
    });
    let rules = nat(&vm);
    assert!(!rules.contains("ISTIO"), "capture cleaned up:\n{rules}");
}
