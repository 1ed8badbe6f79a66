//! Objects for unit tests: from YAML text, or from the guide's manifests.

use vmesh_api::testing::seed_dir;
use vmesh_api::{Object, decode_manifests};

use crate::{DecodeCache, Snapshot, VipAllocator};

/// Decodes manifests, failing the test on any problem.
pub fn decode(file: &str, text: &str) -> Vec<Object> {
    let decoded = decode_manifests(file, text);
    assert!(!decoded.has_errors(), "{file}: {:?}", decoded.problems);
    decoded.objects.into_iter().map(|l| l.object).collect()
}

/// The objects of some of the guide's manifests.
pub fn seed(files: &[&str]) -> Vec<Object> {
    files
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(seed_dir().join(file)).unwrap();
            decode(file, &text)
        })
        .collect()
}

/// Builds the snapshot with a fresh cache and VIP allocator.
pub fn snapshot(objects: &[Object]) -> Snapshot {
    Snapshot::build(
        objects,
        &mut DecodeCache::default(),
        &mut VipAllocator::default(),
    )
}
