//! Istio `WorkloadGroup`: the template VMs of one kind are onboarded from, with
//! their labels, identity and health probe.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{NETWORKING_VERSIONS, SpecValidate, WithSpec};
use super::workload_entry::WorkloadEntrySpec;
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
/// The template of the WorkloadEntries of VMs that join as one kind of
/// workload, and how their health is probed.
pub struct WorkloadGroupSpec {
    /// Labels and annotations every WorkloadEntry made from this group gets.
    pub metadata: Option<GroupMetadata>,
    /// The WorkloadEntry fields each joining VM starts from (its address
    /// comes from the VM itself).
    pub template: WorkloadEntrySpec,
    /// The health check the agent runs on each VM; its result is the
    /// entry's `Healthy` condition.
    pub probe: Option<ReadinessProbe>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
/// Metadata given to the entries of a group.
pub struct GroupMetadata {
    /// Labels for each entry.
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations for each entry.
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Kubernetes-style readiness probe the agent runs on the VM.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadinessProbe {
    /// Seconds after the agent starts before the first probe.
    pub initial_delay_seconds: Option<u32>,
    /// Seconds after which one probe counts as failed.
    pub timeout_seconds: Option<u32>,
    /// Seconds between probes.
    pub period_seconds: Option<u32>,
    /// Successes in a row after a failure before the VM is healthy again.
    pub success_threshold: Option<u32>,
    /// Failures in a row before the VM is unhealthy.
    pub failure_threshold: Option<u32>,
    /// Probe with an HTTP GET: any status from 200 to 399 is healthy.
    pub http_get: Option<HttpHealthCheck>,
    /// Probe by opening a TCP connection.
    pub tcp_socket: Option<TcpHealthCheck>,
    /// Probe by running a command on the VM: exit status 0 is healthy.
    pub exec: Option<ExecHealthCheck>,
    /// Probe with the gRPC health checking protocol.
    pub grpc: Option<GrpcHealthCheck>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHealthCheck {
    pub path: Option<String>,
    pub port: u32,
    pub host: Option<String>,
    pub scheme: Option<String>,
    pub http_headers: Option<Vec<HttpHeader>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpHealthCheck {
    pub host: Option<String>,
    pub port: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecHealthCheck {
    pub command: Vec<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcHealthCheck {
    pub port: u32,
    pub service: Option<String>,
}

impl ReadinessProbe {
    fn validate(&self, c: &mut Checker, path: &Path) {
        c.one_of(
            path,
            &[
                ("httpGet", self.http_get.is_some()),
                ("tcpSocket", self.tcp_socket.is_some()),
                ("exec", self.exec.is_some()),
                ("grpc", self.grpc.is_some()),
            ],
            true,
        );
        if let Some(http) = &self.http_get {
            c.port(&path.f("httpGet").f("port"), http.port);
            if let Some(scheme) = &http.scheme
                && !matches!(scheme.as_str(), "HTTP" | "HTTPS")
            {
                c.error(
                    &path.f("httpGet").f("scheme"),
                    format!("scheme {scheme:?} must be HTTP or HTTPS"),
                );
            }
            if let Some(p) = &http.path
                && !p.starts_with('/')
            {
                c.error(&path.f("httpGet").f("path"), "path must start with '/'");
            }
        }
        if let Some(tcp) = &self.tcp_socket {
            c.port(&path.f("tcpSocket").f("port"), tcp.port);
        }
        if let Some(grpc) = &self.grpc {
            c.port(&path.f("grpc").f("port"), grpc.port);
        }
        if let Some(exec) = &self.exec
            && exec.command.is_empty()
        {
            c.error(&path.f("exec").f("command"), "command must not be empty");
        }
        for (field, value) in [
            ("periodSeconds", self.period_seconds),
            ("timeoutSeconds", self.timeout_seconds),
            ("successThreshold", self.success_threshold),
            ("failureThreshold", self.failure_threshold),
        ] {
            if value == Some(0) {
                c.error(&path.f(field), format!("{field} must be at least 1"));
            }
        }
    }
}

impl SpecValidate for WorkloadGroupSpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        if let Some(meta) = &self.metadata {
            if let Some(labels) = &meta.labels {
                c.labels(&path.f("metadata").f("labels"), labels);
            }
            if let Some(annotations) = &meta.annotations {
                c.annotation_keys(&path.f("metadata").f("annotations"), annotations);
            }
        }
        let template = path.f("template");
        self.template.check(c, &template, false);
        if self.template.address.is_some() {
            c.error(
                &template.f("address"),
                "a WorkloadGroup template cannot set address: each VM has its own",
            );
        }
        if let Some(probe) = &self.probe {
            probe.validate(c, &path.f("probe"));
        }
    }
}

pub type WorkloadGroup = WithSpec<WorkloadGroupSpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "WorkloadGroup",
    group: "networking.istio.io",
    versions: NETWORKING_VERSIONS,
    plural: "workloadgroups",
    short_names: &["wg"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[],
    decode: decode_body::<WorkloadGroup>,
    schema: body_schema::<WorkloadGroup>,
};
