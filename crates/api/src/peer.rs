//! How a sidecar's own workload is named for Istio's metrics, to its Envoy
//! and to its peers. The agent puts [`PeerField::env`] variables in Envoy's
//! environment ([`env_for`]); the xDS translation reads them with Envoy's
//! `%ENVIRONMENT(…)%`, so that configuration shared by many proxies still
//! labels each one's metrics with its own workload; client sidecars send them
//! to server sidecars as [`PeerField::header`] request headers, which the
//! server side moves into dynamic metadata under [`PEER_METADATA`] (and
//! strips) before the application sees the request.
//!
//! This module owns the names; it does no I/O.

use std::collections::BTreeMap;

/// One attribute of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerField {
    /// The key in the [`PEER_METADATA`] namespace and in endpoint metadata.
    pub key: &'static str,
    /// The variable in Envoy's environment holding the proxy's own value.
    pub env: &'static str,
    /// The request header carrying it to the server side (`None`: the server
    /// side learns it otherwise, as the principal from the TLS handshake).
    pub header: Option<&'static str>,
}

const fn field(key: &'static str, env: &'static str, header: &'static str) -> PeerField {
    PeerField {
        key,
        env,
        header: Some(header),
    }
}

pub const WORKLOAD: PeerField = field("workload", "VMESH_WORKLOAD_NAME", "x-vmesh-peer-workload");
pub const NAMESPACE: PeerField = field(
    "namespace",
    "VMESH_WORKLOAD_NAMESPACE",
    "x-vmesh-peer-namespace",
);
pub const CANONICAL_SERVICE: PeerField = field(
    "canonical_service",
    "VMESH_CANONICAL_SERVICE",
    "x-vmesh-peer-canonical-service",
);
pub const CANONICAL_REVISION: PeerField = field(
    "canonical_revision",
    "VMESH_CANONICAL_REVISION",
    "x-vmesh-peer-canonical-revision",
);
pub const APP: PeerField = field("app", "VMESH_WORKLOAD_APP", "x-vmesh-peer-app");
pub const VERSION: PeerField = field("version", "VMESH_WORKLOAD_VERSION", "x-vmesh-peer-version");
pub const CLUSTER: PeerField = field("cluster", "VMESH_CLUSTER_ID", "x-vmesh-peer-cluster");
pub const PRINCIPAL: PeerField = PeerField {
    key: "principal",
    env: "VMESH_WORKLOAD_PRINCIPAL",
    header: None,
};

/// Every attribute, in the order of Istio's labels.
pub const FIELDS: [PeerField; 8] = [
    WORKLOAD,
    NAMESPACE,
    CANONICAL_SERVICE,
    CANONICAL_REVISION,
    APP,
    VERSION,
    CLUSTER,
    PRINCIPAL,
];

/// The dynamic metadata namespace the server side keeps a client's attributes in.
pub const PEER_METADATA: &str = "vmesh.peer";
/// The metadata namespace of endpoints and clusters (the destination's attributes).
pub const ENDPOINT_METADATA: &str = "vmesh";

/// The node metadata key under which an agent announces its status port
/// (merged metrics), when other hosts can reach it: the server lists it for
/// Prometheus' service discovery.
pub const STATUS_PORT_METADATA: &str = "STATUS_PORT";

/// Istio's metrics leave Envoy with all their labels in this one tag, as
/// `name=value` pairs joined by [`LABEL_SEPARATOR`]: Envoy then formats one
/// string and finds one stat per request, not one per label (a fifth of the
/// cost). The agent's merged endpoint expands it into Prometheus labels.
pub const METRIC_LABELS_TAG: &str = "labels";
/// Between two `name=value` pairs of [`METRIC_LABELS_TAG`].
pub const LABEL_SEPARATOR: char = '|';

/// What Istio reports for an attribute nobody knows.
pub const UNKNOWN: &str = "unknown";

/// A workload as its metrics name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadAttributes {
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub cluster: String,
    pub principal: String,
}

impl WorkloadAttributes {
    /// Istio's canonical service: the `service.istio.io/canonical-name`
    /// label, else `app.kubernetes.io/name`, else `app`, else the workload name.
    pub fn canonical_service(&self) -> String {
        [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|l| self.labels.get(*l))
        .cloned()
        .unwrap_or_else(|| self.workload.clone())
    }

    /// Istio's canonical revision: `service.istio.io/canonical-revision`,
    /// else `app.kubernetes.io/version`, else `version`, else `latest`.
    pub fn canonical_revision(&self) -> String {
        [
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]
        .iter()
        .find_map(|l| self.labels.get(*l))
        .cloned()
        .unwrap_or_else(|| "latest".into())
    }

    /// The value of each field, `unknown` where there is none.
    pub fn values(&self) -> Vec<(PeerField, String)> {
        let label = |name: &str| self.labels.get(name).cloned();
        let or_unknown = |v: Option<String>| {
            v.filter(|v| !v.is_empty())
                .unwrap_or_else(|| UNKNOWN.to_string())
        };
        vec![
            (WORKLOAD, or_unknown(Some(self.workload.clone()))),
            (NAMESPACE, or_unknown(Some(self.namespace.clone()))),
            (
                CANONICAL_SERVICE,
                or_unknown(Some(self.canonical_service())),
            ),
            (CANONICAL_REVISION, self.canonical_revision()),
            (APP, or_unknown(label("app"))),
            (VERSION, or_unknown(label("version"))),
            (CLUSTER, or_unknown(Some(self.cluster.clone()))),
            (PRINCIPAL, or_unknown(Some(self.principal.clone()))),
        ]
    }
}

/// The environment variables naming a proxy's own workload to its Envoy.
pub fn env_for(workload: &WorkloadAttributes) -> Vec<(&'static str, String)> {
    workload
        .values()
        .into_iter()
        .map(|(field, value)| (field.env, value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_and_unknowns_as_istio_reports_them() {
        let w = WorkloadAttributes {
            workload: "payment-vm".into(),
            namespace: "vm-workloads".into(),
            labels: [("app".to_string(), "payment".to_string())].into(),
            cluster: String::new(),
            principal: "spiffe://cluster.local/ns/vm-workloads/sa/payment".into(),
        };
        let env: BTreeMap<_, _> = env_for(&w).into_iter().collect();
        assert_eq!(env["VMESH_CANONICAL_SERVICE"], "payment");
        assert_eq!(env["VMESH_CANONICAL_REVISION"], "latest");
        assert_eq!(env["VMESH_WORKLOAD_VERSION"], "unknown");
        assert_eq!(env["VMESH_CLUSTER_ID"], "unknown");
        assert_eq!(env.len(), FIELDS.len());
    }
}
