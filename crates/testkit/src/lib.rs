//! What vmesh's tests, benchmarks and `vmesh demo` share to run the real
//! binaries together on one machine: hosts are network namespaces.
//!
//! Always built (the demo uses it, so everything here returns errors and
//! never panics):
//!
//! - [`netns`]: a network namespace that owns the processes started in it
//!   and, when dropped, ends them (SIGTERM, then SIGKILL after a short
//!   grace), ends anything else still running inside, and deletes the
//!   namespace and the `/etc/netns/<name>` it wrote; veth links.
//! - [`process`]: signals and the stop sequence used for every process.
//! - [`poll`]: waiting for a condition.
//! - [`mesh`]: `vmesh server`, the CLI, onboarding and `vmesh agent` in
//!   namespaces; `vmesh load`.
//! - [`http`]: one request with curl from inside a namespace.
//! - [`local`]: `vmesh server` on free loopback ports, outside any namespace.
//! - [`etcd`]: a real etcd cluster on loopback whose members can be killed
//!   and restarted.
//!
//! Feature `testing` (tests and benchmarks only; the demo never sees it):
//! `testing`, helpers that fail the test by panicking (polling with a
//! deadline, finding Envoy, commands that must succeed, fixtures),
//! `sidecar`, a bare Envoy fed by the server's plaintext xDS, and `tls`,
//! the gRPC client and accept loop over the mesh's TLS.
//!
//! Not here: fixtures of one test file, assertions about what vmesh does,
//! and anything the product itself runs (the agent finds its own Envoy).

#![forbid(unsafe_code)]

pub mod etcd;
pub mod http;
pub mod local;
pub mod mesh;
pub mod netns;
pub mod pair;
pub mod poll;
pub mod process;
#[cfg(feature = "testing")]
pub mod sidecar;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "testing")]
pub mod tls;

pub use local::LocalServer;
pub use mesh::Mesh;
pub use netns::Namespace;
