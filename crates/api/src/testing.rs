//! Test support shared by the workspace's tests (feature `testing`).

use std::path::PathBuf;

/// The guide's manifests: `$VMESH_SEED_DIR`, else `shared/seed/manifests`
/// beside the checkout, else `/work/shared/seed/manifests`. Panics (failing
/// the test, never skipping it) when none exists.
pub fn seed_dir() -> PathBuf {
    let candidates = std::env::var_os("VMESH_SEED_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/seed/manifests"),
            PathBuf::from("/work/shared/seed/manifests"),
        ]);
    let tried: Vec<PathBuf> = candidates.collect();
    tried
        .iter()
        .find(|dir| dir.is_dir())
        .cloned()
        .unwrap_or_else(|| {
            panic!("the guide's manifests were not found (tried {tried:?}); set VMESH_SEED_DIR")
        })
}

/// Files in the seed directory that are not Kubernetes objects.
pub const NOT_KUBERNETES: &[&str] = &["cloud-init-istio-vm.yaml", "troubleshooting-reference.yaml"];
