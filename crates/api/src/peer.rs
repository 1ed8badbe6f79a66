//! How workloads are named in Istio's metrics, and how those names travel:
//! to a sidecar's own Envoy, to its peers, and back out to Prometheus.
//!
//! A workload's seven attributes (workload, namespace, canonical service and
//! revision, app, version, cluster) travel as one string, [`encode`]d with
//! [`ATTRIBUTE_SEPARATOR`] as Istio's endpoint metadata does:
//! - the agent puts the proxy's own in Envoy's environment ([`WORKLOAD_ENV`]),
//!   which Envoy reads with `%ENVIRONMENT(…)%` for the header below, so that
//!   configuration shared by many proxies still names each one;
//! - client sidecars send theirs to server sidecars in the [`PEER_HEADER`]
//!   request header, which the server side moves into dynamic metadata
//!   ([`PEER_METADATA`]) and strips before the application sees it;
//! - a destination's are its endpoint's metadata ([`ENDPOINT_METADATA`]).
//!
//! Envoy reports Istio's metrics as lines of the metrics log
//! ([`METRICS_LOG_FILE`], a pipe the agent reads): one line per request
//! (or TCP connection event) and side, holding the values it measured and,
//! once per distinct label set, the metrics counted under it with their
//! labels in one short field (a label set), because
//! formatting is what costs Envoy most: Istio's standard labels by
//! position ([`POSITIONAL_LABELS`]), workloads and the service encoded,
//! the proxy's own workload and principal left to the agent
//! ([`OWN_VALUE`]), then `name=value` pairs for anything else. The agent
//! counts the lines and turns the labels into Istio's ([`expand_labels`]).
//!
//! This module owns the names and encodings; it does no I/O.

use std::collections::BTreeMap;

use crate::kinds::telemetry::IstioMetric;

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

/// Between two fields of a label set (what it holds: the module's
/// documentation).
pub const LABEL_SEPARATOR: char = '|';
/// Istio's standard labels that a label set holds by position,
/// in this order, before any `name=value` pair. `source` and `destination`
/// hold encoded workload attributes, `destination_service` an encoded
/// service ([`SERVICE_KEY`]).
pub const POSITIONAL_LABELS: [&str; 11] = [
    "reporter",
    "source",
    "source_principal",
    "destination",
    "destination_principal",
    "destination_service",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];
/// The value of a `source`/`destination` position (or its `_principal`)
/// that stands for the reporting proxy itself: the agent knows its own
/// workload and principal ([`OwnWorkload`]), so Envoy need not copy them
/// into every request's tag.
pub const OWN_VALUE: &str = "@";
/// A pair naming, comma-separated, labels a Telemetry override removes (or
/// a metric does not have).
pub const REMOVED_LABELS: &str = "removed";
/// The cluster metadata key (in [`ENDPOINT_METADATA`]) of the service a
/// cluster is for, encoded as `host;name;namespace`.
pub const SERVICE_KEY: &str = "service";
/// The labels an encoded service expands into, in its order.
pub const SERVICE_LABELS: [&str; 3] = [
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
];
/// The metrics log: a pipe in the agent's socket directory, which is
/// Envoy's working directory, so that listeners shared by many proxies name
/// it alike. A line is `duration␟received␟sent` (`%DURATION%`,
/// `%BYTES_RECEIVED%`, `%BYTES_SENT%`; empty where no metric of the line
/// uses it) then, per distinct label set, `␟codes=labels`: the
/// [`StandardMetric::code`]s of the metrics counted under those labels.
pub const METRICS_LOG_FILE: &str = "istio-metrics.pipe";
/// Between the fields of a metrics log line (␟, which no header value,
/// and so no label Envoy formats, can hold).
pub const METRICS_LOG_SEPARATOR: char = '\u{1f}';

/// A value a metrics log line carries, by its position in the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoggedValue {
    /// The request's duration in milliseconds (`%DURATION%`).
    Duration = 0,
    /// Bytes from the downstream (`%BYTES_RECEIVED%`).
    Received = 1,
    /// Bytes to the downstream (`%BYTES_SENT%`).
    Sent = 2,
}

impl LoggedValue {
    pub const ALL: [LoggedValue; 3] = [Self::Duration, Self::Received, Self::Sent];

    /// Envoy's command operator for it.
    pub fn operator(self) -> &'static str {
        match self {
            Self::Duration => "%DURATION%",
            Self::Received => "%BYTES_RECEIVED%",
            Self::Sent => "%BYTES_SENT%",
        }
    }
}

/// How a metric counts a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// One per line: a counter.
    Count,
    /// A counter of a value.
    Sum(LoggedValue),
    /// A histogram of a value.
    Histogram(LoggedValue),
}

/// One of Istio's standard metrics as the metrics log carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandardMetric {
    pub metric: IstioMetric,
    /// Its Prometheus name.
    pub name: &'static str,
    /// Its mark in a line's label sets.
    pub code: char,
    pub measure: Measure,
    /// Counted from TCP proxies (else from HTTP connection managers).
    pub tcp: bool,
}

/// Istio's standard metrics, in the order the agent serves them.
pub const STANDARD_METRICS: [StandardMetric; 8] = {
    use LoggedValue::{Duration, Received, Sent};
    const fn metric(
        metric: IstioMetric,
        name: &'static str,
        code: char,
        measure: Measure,
        tcp: bool,
    ) -> StandardMetric {
        StandardMetric {
            metric,
            name,
            code,
            measure,
            tcp,
        }
    }
    [
        metric(
            IstioMetric::RequestCount,
            "istio_requests_total",
            'r',
            Measure::Count,
            false,
        ),
        metric(
            IstioMetric::RequestDuration,
            "istio_request_duration_milliseconds",
            'd',
            Measure::Histogram(Duration),
            false,
        ),
        metric(
            IstioMetric::RequestSize,
            "istio_request_bytes",
            'q',
            Measure::Histogram(Received),
            false,
        ),
        metric(
            IstioMetric::ResponseSize,
            "istio_response_bytes",
            's',
            Measure::Histogram(Sent),
            false,
        ),
        metric(
            IstioMetric::TcpOpenedConnections,
            "istio_tcp_connections_opened_total",
            'o',
            Measure::Count,
            true,
        ),
        metric(
            IstioMetric::TcpClosedConnections,
            "istio_tcp_connections_closed_total",
            'c',
            Measure::Count,
            true,
        ),
        metric(
            IstioMetric::TcpSentBytes,
            "istio_tcp_sent_bytes_total",
            't',
            Measure::Sum(Sent),
            true,
        ),
        metric(
            IstioMetric::TcpReceivedBytes,
            "istio_tcp_received_bytes_total",
            'v',
            Measure::Sum(Received),
            true,
        ),
    ]
};

/// The standard metric a label set's code names.
pub fn standard_metric(code: char) -> Option<&'static StandardMetric> {
    STANDARD_METRICS.iter().find(|m| m.code == code)
}

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

/// Envoy's environment for a proxy of `workload`.
pub fn env_for(workload: &WorkloadAttributes) -> Vec<(&'static str, String)> {
    vec![(WORKLOAD_ENV, workload.encode())]
}

/// What the agent knows of its own proxy, for the [`OWN_VALUE`] positions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnWorkload {
    /// Encoded attributes ([`WorkloadAttributes::encode`]).
    pub attributes: String,
    /// SPIFFE identity.
    pub principal: String,
}

/// Istio's labels from a label set: the positional
/// fields named, [`OWN_VALUE`]s filled in from `own`, workloads and the
/// service expanded into `source_workload`… (missing attributes
/// `unknown`), `name=value` pairs winning over expanded labels, removed
/// labels dropped.
pub fn expand_labels(tag: &str, own: &OwnWorkload) -> Vec<(String, String)> {
    let mut fields = tag.split(LABEL_SEPARATOR);
    let positional: Vec<&str> = fields.by_ref().take(POSITIONAL_LABELS.len()).collect();
    let pairs: Vec<(&str, &str)> = fields
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let removed: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| *k == REMOVED_LABELS)
        .flat_map(|(_, v)| v.split(','))
        .collect();
    let mut labels: Vec<(String, String)> = Vec::new();
    for (name, value) in POSITIONAL_LABELS.into_iter().zip(positional) {
        let value = match (name, value) {
            ("source" | "destination", OWN_VALUE) => own.attributes.as_str(),
            ("source_principal" | "destination_principal", OWN_VALUE) => own.principal.as_str(),
            _ => value,
        };
        let names: Vec<String> = match name {
            "source" | "destination" => ATTRIBUTES.iter().map(|a| format!("{name}_{a}")).collect(),
            "destination_service" => SERVICE_LABELS.iter().map(|l| l.to_string()).collect(),
            _ => {
                labels.push((name.to_string(), value.to_string()));
                continue;
            }
        };
        // An encoded value: missing parts are unknown.
        let mut values = value.split(ATTRIBUTE_SEPARATOR);
        for name in names {
            let value = values.next().filter(|v| !v.is_empty()).unwrap_or(UNKNOWN);
            labels.push((name, value.to_string()));
        }
    }
    labels.retain(|(name, _)| !pairs.iter().any(|(k, _)| k == name));
    labels.extend(
        pairs
            .iter()
            .filter(|(k, _)| *k != REMOVED_LABELS)
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
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
        let env: BTreeMap<_, _> = env_for(&w).into_iter().collect();
        assert_eq!(env[WORKLOAD_ENV], w.encode());
    }

    fn own() -> OwnWorkload {
        OwnWorkload {
            attributes: "pay;vm-workloads;pay;v1;pay;v1;".into(),
            principal: "spiffe://td/ns/vm-workloads/sa/pay".into(),
        }
    }

    fn get<'a>(labels: &'a [(String, String)], name: &str) -> Option<&'a str> {
        labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn positions_expand_into_istios_labels_with_the_proxys_own_filled_in() {
        let labels = expand_labels(
            "destination|web;shop;web;v2;web;v2;c1|spiffe://td/ns/shop/sa/web|@|@\
             |pay.vm-workloads.svc.cluster.local;pay;vm-workloads|http|200|-|-|mutual_tls",
            &own(),
        );
        assert_eq!(get(&labels, "reporter"), Some("destination"));
        assert_eq!(get(&labels, "source_workload"), Some("web"));
        assert_eq!(get(&labels, "source_workload_namespace"), Some("shop"));
        assert_eq!(get(&labels, "source_cluster"), Some("c1"));
        assert_eq!(
            get(&labels, "source_principal"),
            Some("spiffe://td/ns/shop/sa/web")
        );
        assert_eq!(get(&labels, "destination_workload"), Some("pay"));
        assert_eq!(get(&labels, "destination_cluster"), Some("unknown"));
        assert_eq!(
            get(&labels, "destination_principal"),
            Some("spiffe://td/ns/vm-workloads/sa/pay")
        );
        assert_eq!(
            get(&labels, "destination_service"),
            Some("pay.vm-workloads.svc.cluster.local")
        );
        assert_eq!(get(&labels, "destination_service_name"), Some("pay"));
        assert_eq!(
            get(&labels, "destination_service_namespace"),
            Some("vm-workloads")
        );
        assert_eq!(get(&labels, "response_code"), Some("200"));
        assert_eq!(
            get(&labels, "connection_security_policy"),
            Some("mutual_tls")
        );
        // Istio's 25 standard labels.
        assert_eq!(labels.len(), 25);
    }

    #[test]
    fn pairs_override_and_removals_drop() {
        let labels = expand_labels(
            "source|@|@|unknown|-|unknown|tcp|||-|unknown\
             |source_app=upserted|custom=x|removed=source_version,response_code,grpc_response_status",
            &own(),
        );
        assert_eq!(get(&labels, "reporter"), Some("source"));
        assert_eq!(get(&labels, "source_workload"), Some("pay"));
        assert_eq!(get(&labels, "source_app"), Some("upserted"));
        assert_eq!(get(&labels, "custom"), Some("x"));
        assert_eq!(get(&labels, "source_version"), None);
        assert_eq!(get(&labels, "response_code"), None);
        assert_eq!(get(&labels, "destination_workload"), Some("unknown"));
        assert_eq!(get(&labels, "destination_service_name"), Some("unknown"));
        assert_eq!(get(&labels, "removed"), None);
        assert_eq!(labels.len(), 25 - 3 + 1);
    }
}
