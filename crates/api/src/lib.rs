//! The vmesh resource model: typed Istio and Kubernetes objects, decoding from
//! YAML or JSON with source positions, and validation beyond types.
//!
//! This crate owns what an object *is* and whether it is valid. It does no I/O:
//! reading files, storing objects and serving them belong to other crates.
//!
//! Adding a kind is one file under `kinds/` (its body type, validation and
//! [`KindInfo`]) and one line in [`registry::KINDS`].
//!
//! ```
//! let text = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: vm1\n  namespace: ns\nspec:\n  address: 10.0.0.1\n  ports:\n    http: 70000\n";
//! let decoded = vmesh_api::decode_manifests("we.yaml", text);
//! assert_eq!(
//!     decoded.problems[0].to_string(),
//!     "we.yaml:9:5: WorkloadEntry ns/vm1: spec.ports.http: port 70000 is out of range 1-65535"
//! );
//! ```
#![forbid(unsafe_code)]

pub mod check;
pub mod decode;
pub mod kinds;
pub mod mesh;
pub mod object;
pub mod onboarding;
pub mod peer;
pub mod problem;
pub mod registry;
pub mod selection;
pub mod table;
#[cfg(feature = "testing")]
pub mod testing;
pub mod yaml;

pub use decode::{Decoded, decode_list, decode_manifests};
pub use object::{Object, ObjectKey, ObjectMeta};
pub use problem::{Problem, Severity};
pub use registry::{KindInfo, find_kind, kind_for, kinds, view_for, views};
