//! What the unit tests share: the mesh model of some manifests.

use vmesh_registry::{DecodeCache, Snapshot, VipAllocator};

/// The snapshot of `text`'s manifests, which must be valid.
pub(crate) fn snapshot(text: &str) -> Snapshot {
    let decoded = vmesh_api::decode_manifests("mesh.yaml", text);
    assert!(!decoded.has_errors(), "{:?}", decoded.problems);
    let objects: Vec<_> = decoded.objects.into_iter().map(|l| l.object).collect();
    Snapshot::build(
        &objects,
        &mut DecodeCache::default(),
        &mut VipAllocator::default(),
    )
}
