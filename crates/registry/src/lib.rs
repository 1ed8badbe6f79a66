//! The mesh model: Kubernetes Services, WorkloadEntries and ServiceEntries
//! joined into [`MeshService`]s with ports, virtual IPs and endpoints, with
//! Istio's semantics, together with the routing rules and mesh settings that
//! travel with them.
//!
//! This crate owns the join (which workloads back which service port, on which
//! port, with what weight, locality, identity and health), port protocols,
//! the allocation of virtual IPs ([`VipAllocator`]), and which rules apply
//! where: label selection (one `Selector`), the lookups the xDS translation
//! asks a [`Snapshot`] (the DestinationRule and VirtualServices of a host, the
//! PeerAuthentications and AuthorizationPolicies of a workload, the endpoints
//! of a subset) and hosts written in rules made fully qualified with the
//! mesh's domain suffix ([`Snapshot::qualify`]). It is pure logic: it does
//! no I/O and keeps no state between calls: what lasts from one build to the
//! next (the [`DecodeCache`] of typed objects, the [`VipAllocator`]) is the
//! caller's. It does not read, store or watch objects (the caller lists them
//! from the store and persists [`VipAllocator::allocations`]), does not
//! validate them (the `api` crate does; bodies that fail to decode are
//! skipped with a warning), and does not translate anything to Envoy (the
//! `xds` crate does).
//!
//! It also computes the Kubernetes view of a Service ([`kube_view`]: its
//! cluster IP and Endpoints) that `vmesh get svc` and `get endpoints` show.
//!
//! It decides which Telemetry resources apply to a workload and what they
//! resolve to over the mesh's providers ([`telemetry`]).
//!
//! It also owns [`analysis`], `vmesh analyze`'s analyzers: what is wrong
//! with a set of objects in Istio's terms (a subset no rule defines, a host
//! that names no service, …), found with the same join and lookups.
//!
//! ```
//! use vmesh_registry::{DecodeCache, Snapshot, VipAllocator};
//!
//! let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  selector:\n    app: web\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: vm1\n  namespace: shop\nspec:\n  address: 10.0.0.7\n  labels:\n    app: web\n";
//! let objects: Vec<_> = vmesh_api::decode_manifests("web.yaml", text)
//!     .objects
//!     .into_iter()
//!     .map(|located| located.object)
//!     .collect();
//!
//! // Both kept from one build to the next.
//! let (mut decoded, mut vips) = (DecodeCache::default(), VipAllocator::default());
//! let snapshot = Snapshot::build(&objects, &mut decoded, &mut vips); // then persist vips.allocations()
//!
//! let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
//! assert_eq!(web.addresses, [vips.get("web.shop.svc.cluster.local").unwrap()]);
//! assert_eq!(web.endpoints[0].address.to_string(), "10.0.0.7");
//! assert_eq!(web.endpoints[0].port, 8080);
//! ```
#![forbid(unsafe_code)]

pub mod analysis;
mod build;
mod inputs;
pub mod kube_view;
mod model;
mod policy;
mod selector;
pub mod telemetry;
mod vip;

pub use inputs::{DecodeCache, GROUP_ANNOTATION, HEALTH_CHECKS_ANNOTATION, INPUT_KINDS};
pub use model::{
    EndpointAddress, MeshEndpoint, MeshPort, MeshService, MeshSettings, Origin, OutboundPolicy,
    Protocol, Resolution, Scoped, Snapshot,
};
pub use policy::PeerMode;
pub use selector::Labels;
pub use vip::{DEFAULT_SERVICE_CIDR, DEFAULT_SERVICE_ENTRY_CIDR, Error, VipAllocator};

#[cfg(test)]
mod fixtures;
