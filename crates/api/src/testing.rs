//! Test support shared by the workspace's tests (feature `testing`).

use std::path::PathBuf;

/// The guide's manifests: `examples/guide/` in this repository, all of them
/// (the one copy tests, benchmarks, the demo and the README use). Panics
/// (failing the test, never skipping it) when it is missing.
pub fn seed_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/guide");
    assert!(
        dir.is_dir(),
        "the guide's manifests are missing: {} is not a directory",
        dir.display()
    );
    dir
}

/// Files in the guide's directory that are not Kubernetes objects.
pub const NOT_KUBERNETES: &[&str] = &["cloud-init-istio-vm.yaml", "troubleshooting-reference.yaml"];
