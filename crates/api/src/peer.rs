//! How workloads are named in Istio's metrics, and how those names travel:
//! to a sidecar's own Envoy, to its peers, and back out to Prometheus.
//!
//! A workload's seven attributes (workload, namespace, canonical service and
//! revision, app, version, cluster) travel as one string, [`encode`]d with
//! [`ATTRIBUTE_SEPARATOR`] as Istio's endpoint metadata does:
//! - the agent puts the proxy's own in Envoy's environment ([`WORKLOAD_ENV`],
//!   its principal in [`PRINCIPAL_ENV`]); Envoy reads them with
//!   `%ENVIRONMENT(…)%`, so configuration shared by many proxies still
//!   labels each one's metrics with its own workload;
//! - client sidecars send theirs to server sidecars in the [`PEER_HEADER`]
//!   request header, which the server side moves into dynamic metadata
//!   ([`PEER_METADATA`]) and strips before the application sees it;
//! - a destination's are its endpoint's metadata ([`ENDPOINT_METADATA`]).
//!
//! Envoy reports a metric with all its labels in one tag
//! ([`METRIC_LABELS_TAG`]: `name=value|…`, the `source` and `destination`
//! pairs holding encoded attributes); the agent turns that into Istio's
//! labels ([`expand_labels`]).
//!
//! This module owns the names and encodings; it does no I/O.

use std::collections::BTreeMap;

/// The attributes, as the suffixes of Istio's `source_*` and
/// `destination_*` labels, in the order [`encode`] writes them.
pub const ATTRIBUTES: [&str; 7] = [
    "workload",
    "workload_namespace",
    "canonical_service",
    "canonical_revision",
    "app",
    "version",
    "cluster",
];

/// Between two attributes of an encoded workload.
pub const ATTRIBUTE_SEPARATOR: char = ';';

/// Envoy's environment: the proxy's own encoded attributes.
pub const WORKLOAD_ENV: &str = "VMESH_WORKLOAD";
/// Envoy's environment: the proxy's own SPIFFE identity.
pub const PRINCIPAL_ENV: &str = "VMESH_WORKLOAD_PRINCIPAL";
/// The request header carrying the client's encoded attributes.
pub const PEER_HEADER: &str = "x-vmesh-peer";
/// The dynamic metadata namespace the server side keeps the client's
/// attributes in, under [`ATTRIBUTES_KEY`].
pub const PEER_METADATA: &str = "vmesh.peer";
/// The metadata namespace of endpoints (their attributes, under
/// [`ATTRIBUTES_KEY`]) and clusters (the service they are for).
pub const ENDPOINT_METADATA: &str = "vmesh";
/// The key of encoded attributes in [`PEER_METADATA`] and [`ENDPOINT_METADATA`].
pub const ATTRIBUTES_KEY: &str = "workload";

/// Istio's metrics leave Envoy with all their labels in this one tag, as
/// `name=value` pairs joined by [`LABEL_SEPARATOR`]: Envoy then formats one
/// string and finds one stat per request, not one per label. The agent's
/// merged endpoint expands it ([`expand_labels`]).
pub const METRIC_LABELS_TAG: &str = "labels";
/// Between two `name=value` pairs of [`METRIC_LABELS_TAG`].
pub const LABEL_SEPARATOR: char = '|';
/// The pairs named `source` and `destination` hold encoded attributes.
pub const LABEL_GROUPS: [&str; 2] = ["source", "destination"];
/// A pair naming, comma-separated, labels a Telemetry override removes
/// from the expanded ones.
pub const REMOVED_LABELS: &str = "removed";

/// The node metadata key under which an agent announces its status port
/// (merged metrics), when other hosts can reach it: the server lists it for
/// Prometheus' service discovery.
pub const STATUS_PORT_METADATA: &str = "STATUS_PORT";

/// What Istio reports for an attribute nobody knows.
pub const UNKNOWN: &str = "unknown";

/// A workload as its metrics name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadAttributes {
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub cluster: String,
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

    /// The attributes in [`ATTRIBUTES`] order, `unknown` where there is none.
    pub fn encode(&self) -> String {
        let known = |v: Option<&String>| {
            v.filter(|v| !v.is_empty())
                .map_or(UNKNOWN.to_string(), |v| v.replace(ATTRIBUTE_SEPARATOR, "_"))
        };
        [
            known(Some(&self.workload)),
            known(Some(&self.namespace)),
            known(Some(&self.canonical_service())),
            self.canonical_revision(),
            known(self.labels.get("app")),
            known(self.labels.get("version")),
            known(Some(&self.cluster)),
        ]
        .join(&ATTRIBUTE_SEPARATOR.to_string())
    }
}

/// Envoy's environment for a proxy of `workload` whose identity is `principal`.
pub fn env_for(workload: &WorkloadAttributes, principal: &str) -> Vec<(&'static str, String)> {
    vec![
        (WORKLOAD_ENV, workload.encode()),
        (PRINCIPAL_ENV, principal.to_string()),
    ]
}

/// Istio's labels from the pairs of [`METRIC_LABELS_TAG`]: `source` and
/// `destination` expanded into `source_workload`… (missing attributes
/// `unknown`), explicit pairs winning over expanded ones, removed labels
/// dropped.
pub fn expand_labels(tag: &str) -> Vec<(String, String)> {
    let pairs: Vec<(&str, &str)> = tag
        .split(LABEL_SEPARATOR)
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let removed: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| *k == REMOVED_LABELS)
        .flat_map(|(_, v)| v.split(','))
        .collect();
    let explicit = |name: &str| pairs.iter().any(|(k, _)| *k == name);
    let mut labels = Vec::new();
    for (key, value) in &pairs {
        if *key == REMOVED_LABELS {
            continue;
        }
        if LABEL_GROUPS.contains(key) {
            let mut values = value.split(ATTRIBUTE_SEPARATOR);
            for attribute in ATTRIBUTES {
                let name = format!("{key}_{attribute}");
                let value = values.next().filter(|v| !v.is_empty()).unwrap_or(UNKNOWN);
                if !explicit(&name) {
                    labels.push((name, value.to_string()));
                }
            }
        } else {
            labels.push((key.to_string(), value.to_string()));
        }
    }
    labels.retain(|(name, _)| !removed.contains(&name.as_str()));
    labels
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
        };
        assert_eq!(
            w.encode(),
            "payment-vm;vm-workloads;payment;latest;payment;unknown;unknown"
        );
        let env: BTreeMap<_, _> = env_for(&w, "spiffe://td/ns/a/sa/b").into_iter().collect();
        assert_eq!(env[WORKLOAD_ENV], w.encode());
        assert_eq!(env[PRINCIPAL_ENV], "spiffe://td/ns/a/sa/b");
    }

    #[test]
    fn labels_expand_with_overrides_and_removals() {
        let labels = expand_labels(
            "reporter=destination|source=web;shop;web;v2;web;v2;c1|source_principal=spiffe://x\
             |destination=unknown|source_app=upserted|removed=source_version,destination_cluster",
        );
        let get = |name: &str| {
            labels
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("reporter"), Some("destination"));
        assert_eq!(get("source_workload"), Some("web"));
        assert_eq!(get("source_workload_namespace"), Some("shop"));
        assert_eq!(get("source_cluster"), Some("c1"));
        assert_eq!(get("source_app"), Some("upserted"));
        assert_eq!(get("source_version"), None);
        assert_eq!(get("destination_workload"), Some("unknown"));
        assert_eq!(get("destination_version"), Some("unknown"));
        assert_eq!(get("destination_cluster"), None);
        assert_eq!(get("source_principal"), Some("spiffe://x"));
        assert_eq!(get("removed"), None);
        assert_eq!(labels.len(), 1 + 6 + 1 + 6);
    }
}
