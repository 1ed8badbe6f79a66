//! Envoy never outlives its agent (issue 20), with the real binary and Envoy
//! in network namespaces of the test's own: an agent killed with SIGKILL
//! takes its Envoy with it within 2 s, also when it is killed while Envoy
//! is still starting, and an agent started again in the same work directory
//! gets a ready sidecar with no port left taken; an agent asked to stop
//! drains, and its Envoy exits promptly on SIGTERM.
//!
//! Needs root, `ip`, `iptables`, `curl` and Envoy; without them it fails, it
//! never skips.

// Deadlines here are wall-clock time across processes.
#![allow(clippy::disallowed_types)]

use std::path::Path;
use std::time::{Duration, Instant};

use vmesh_testkit::netns::link;
use vmesh_testkit::process;
use vmesh_testkit::testing::{envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace, http};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
const GROUP: &str = "lifetime";
const VM_IP: &str = "10.61.0.1";

/// The pid in Envoy's pid file, once it names a process other than `not`.
fn envoy_pid(work: &Path, not: Option<u32>) -> u32 {
    eventually("Envoy's pid file", || {
        let pid: u32 = std::fs::read_to_string(work.join("envoy.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (Some(pid) != not && process::alive(pid)).then_some(pid)
    })
}

fn assert_gone_within(pid: u32, limit: Duration, what: &str) {
    let killed = Instant::now();
    while process::alive(pid) {
        assert!(
            killed.elapsed() < limit,
            "{what}: Envoy (pid {pid}) still runs {limit:?} after its agent was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ready(vm: &Namespace) -> bool {
    http::status(
        vm,
        "GET",
        "http://127.0.0.1:15020/healthz/ready",
        Duration::from_secs(1),
    ) == Some(200)
}

fn assert_no_port_taken(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap().to_lowercase();
    assert!(
        !text.contains("address in use") && !text.contains("address already in use"),
        "the restarted agent's Envoy found a port taken:\n{text}"
    );
}

#[test]
fn envoy_dies_with_its_agent() {
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let control = Namespace::new(&format!("vmesh-life-cp-{id}"));
    let vm = Namespace::new(&format!("vmesh-life-vm-{id}"));
    link(&vm, VM_IP, &control, "10.61.0.2", &format!("l{id}")).unwrap();
    let mesh = Mesh::new(VMESH, &control, dir.path()).with_envoy(&envoy_binary());
    mesh.start_server(&control, &["--xds-addr", "0.0.0.0:15012"])
        .unwrap();
    mesh.cli(&["create", "namespace", "vm-workloads"]).unwrap();
    mesh.apply(
        "group.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {{name: {GROUP}, namespace: vm-workloads}}\n\
             spec:\n  metadata:\n    labels: {{app: lifetime}}\n  template:\n    serviceAccount: lifetime-sa\n    ports: {{http: 8080}}\n"
        ),
    )
    .unwrap();
    let root = mesh.onboard(GROUP, "vm-workloads", "10.61.0.2").unwrap();
    let name = "lifetime-vm";
    let work = dir.path().join(format!("work-{name}"));
    let log = mesh.log(&format!("agent-{name}.log"));
    let start = || {
        mesh.start_onboarded_agent(&vm, &root, name, VM_IP, 81, &[])
            .unwrap()
    };

    // A running sidecar: its agent is killed, its Envoy goes with it.
    let agent = start();
    eventually("the sidecar ready", || ready(&vm).then_some(()));
    let envoy = envoy_pid(&work, None);
    process::signal(vm.pid(agent), "KILL");
    assert_gone_within(envoy, Duration::from_secs(2), "a running sidecar");

    // Started again in the same work directory: ready, no port taken.
    let agent = start();
    let second = envoy_pid(&work, Some(envoy));
    eventually("the restarted sidecar ready", || ready(&vm).then_some(()));
    assert_no_port_taken(&log);

    // Killed while its new Envoy is starting (the pid file is written as
    // soon as Envoy is spawned, long before it is ready).
    process::signal(vm.pid(agent), "KILL");
    assert_gone_within(second, Duration::from_secs(2), "a ready sidecar");
    let agent = start();
    let third = envoy_pid(&work, Some(second));
    process::signal(vm.pid(agent), "KILL");
    assert_gone_within(third, Duration::from_secs(2), "a starting sidecar");

    let agent = start();
    envoy_pid(&work, Some(third));
    eventually("the sidecar ready after a kill while starting", || {
        ready(&vm).then_some(())
    });
    assert_no_port_taken(&log);

    // Asked to stop (SIGTERM), the agent drains (2 s by default), then Envoy
    // exits on SIGTERM at once, and the agent with it.
    let envoy = envoy_pid(&work, None);
    let stopping = Instant::now();
    vm.stop(agent).unwrap();
    let stopped = stopping.elapsed();
    assert!(
        stopped < Duration::from_secs(4),
        "the agent took {stopped:?} to stop after a 2 s drain"
    );
    assert!(
        !process::alive(envoy),
        "Envoy outlived an agent that stopped"
    );
    assert!(
        !work.join("envoy.pid").exists(),
        "the pid file of a stopped Envoy was left"
    );
}
