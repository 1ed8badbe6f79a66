//! Istio `WorkloadEntry`: one non-Kubernetes workload (a VM) with its address,
//! ports, labels and identity.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{NETWORKING_VERSIONS, SpecValidate, WithSpec};
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
/// A workload outside Kubernetes (a VM or a bare-metal host) as a member
/// of the mesh: where it is reached and who it is.
pub struct WorkloadEntrySpec {
    /// The IP address (or DNS name, or `unix://` socket) the workload is
    /// reached at, without a port.
    pub address: Option<String>,
    /// The workload's port for each service port name, when it differs from
    /// the service's port.
    pub ports: Option<BTreeMap<String, u32>>,
    /// The workload's labels: Services and ServiceEntries select it by them.
    pub labels: Option<BTreeMap<String, String>>,
    /// The network the workload is on; endpoints on another network are
    /// reached through that network's gateway.
    pub network: Option<String>,
    /// Where the workload runs, as `region/zone/subzone`, for
    /// locality-aware load balancing and failover.
    pub locality: Option<String>,
    /// The workload's share of its services' traffic, relative to the
    /// other endpoints.
    pub weight: Option<u32>,
    /// The Kubernetes service account the workload runs as: its SPIFFE
    /// identity is `spiffe://<trust domain>/ns/<namespace>/sa/<account>`.
    pub service_account: Option<String>,
}

impl WorkloadEntrySpec {
    /// Checks an entry; `needs_address` is false inside a WorkloadGroup template
    /// and for ServiceEntry endpoints on networks reached through a gateway.
    pub fn check(&self, c: &mut Checker, path: &Path, needs_address: bool) {
        let has_ports = self.ports.as_ref().is_some_and(|p| !p.is_empty());
        match self.address.as_deref() {
            Some(address) if address.starts_with("unix://") && has_ports => {
                c.error(&path.f("ports"), "a unix:// address cannot have ports");
            }
            Some(address) if address.starts_with("unix://") => {}
            Some(address) if address.parse::<std::net::IpAddr>().is_err() => {
                c.hostname(&path.f("address"), address);
            }
            Some(_) => {}
            None if needs_address && self.network.is_none() => c.error(
                &path.f("address"),
                "address is required unless network is set",
            ),
            None => {}
        }
        for (name, port) in self.ports.iter().flatten() {
            c.port(&path.f("ports").f(name), *port);
        }
        if let Some(labels) = &self.labels {
            c.labels(&path.f("labels"), labels);
        }
        if let Some(sa) = &self.service_account {
            c.dns1123_subdomain(&path.f("serviceAccount"), sa);
        }
        if let Some(locality) = &self.locality {
            check_locality(c, &path.f("locality"), locality);
        }
        if self.weight.is_some_and(|w| w > 1 << 24) {
            c.error(&path.f("weight"), "weight must be at most 16777216");
        }
    }
}

/// `region/zone/subzone`, each part optional from the right, no wildcards.
pub fn check_locality(c: &mut Checker, path: &Path, locality: &str) {
    let parts: Vec<&str> = locality.split('/').collect();
    if parts.len() > 3 || parts.iter().any(|p| p.is_empty() || p.contains('*')) {
        c.error(
            path,
            format!("locality {locality:?} must be region[/zone[/subzone]] without empty parts or wildcards"),
        );
    }
}

impl SpecValidate for WorkloadEntrySpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        self.check(c, path, true);
    }
}

pub type WorkloadEntry = WithSpec<WorkloadEntrySpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "WorkloadEntry",
    group: "networking.istio.io",
    versions: NETWORKING_VERSIONS,
    plural: "workloadentries",
    short_names: &["we"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[
        ("AGE", "/metadata/creationTimestamp"),
        ("ADDRESS", "/spec/address"),
    ],
    decode: decode_body::<WorkloadEntry>,
    schema: body_schema::<WorkloadEntry>,
};
