//! A namespace leaves nothing behind, even when the test using it panics:
//! its children (one ignoring SIGTERM), a process inside that is nobody's
//! child here (as an Envoy is when its agent is gone), the namespace and
//! its `/etc/netns` directory. Needs root; fails without it.

use std::path::Path;

use parking_lot::Mutex;
use vmesh_testkit::netns::{self, Namespace};
use vmesh_testkit::process::alive;

/// Starts, in `ns`, a child that ignores SIGTERM (and keeps starting
/// `sleep`s) and a `sleep` that is not our child; returns every pid inside.
fn populate(ns: &Namespace, log: &Path) -> Vec<u32> {
    ns.resolv_conf("nameserver 192.0.2.1\n").unwrap();
    ns.spawn(
        &["sh", "-c", "trap '' TERM; while :; do sleep 1; done"],
        log,
    )
    .unwrap();
    ns.run(&["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"]);
    let pids = vmesh_testkit::poll::wait_for(std::time::Duration::from_secs(5), || {
        let pids = netns::pids(ns.name());
        (pids.len() >= 3).then_some(pids)
    });
    pids.expect("the shell, its sleep and the orphan inside")
}

fn assert_nothing_left(name: &str, pids: &[u32]) {
    let running: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(running.is_empty(), "still running: {running:?}");
    assert!(netns::list(name).unwrap().is_empty(), "{name} still exists");
    assert!(
        !Path::new("/etc/netns").join(name).exists(),
        "/etc/netns/{name} left"
    );
}

#[test]
fn a_panicking_test_leaves_no_process_namespace_or_resolv_conf() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("vmesh-kit-p{}", std::process::id());
    let seen = Mutex::new(Vec::new());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = Namespace::new(&name);
        seen.lock()
            .extend(populate(&ns, &dir.path().join("stubborn.log")));
        panic!("the test fails here");
    }));
    assert!(outcome.is_err());
    let pids = seen.into_inner();
    assert!(pids.len() >= 3, "{pids:?}");
    assert_nothing_left(&name, &pids);
}

#[test]
fn a_kept_namespace_runs_on_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("vmesh-kit-k{}", std::process::id());
    let ns = Namespace::new(&name);
    let pids = populate(&ns, &dir.path().join("stubborn.log"));
    ns.keep();
    assert!(pids.iter().all(|p| alive(*p)), "kept running");
    assert_eq!(netns::list(&name).unwrap(), std::slice::from_ref(&name));
    netns::remove(std::slice::from_ref(&name));
    assert_nothing_left(&name, &pids);
}
