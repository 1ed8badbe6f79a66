//! Which access logs, tracer and metric settings apply to a workload: the
//! Telemetry API's selection and merge, with Istio's semantics, over the
//! mesh's defaults (`meshConfig.accessLogFile`, `defaultProviders`,
//! `extensionProviders`, `enableTracing`, `defaultConfig.tracing.sampling`).
//!
//! Selection: the root namespace's Telemetry without a selector, then the
//! workload namespace's without a selector (the first by name, where Istio
//! takes the oldest), then every one of that namespace whose selector matches
//! the workload's labels. Later ones override earlier ones:
//! - access logging, per provider: an entry without providers speaks for the
//!   providers the level before named; `disabled` turns them off; a filter
//!   is kept per provider;
//! - tracing: each field the later level sets (custom tags as a whole);
//! - metrics: overrides apply in order, root first.
//!
//! With no Telemetry or default provider saying anything about access logs,
//! `accessLogFile` (if set) logs everything, as Istio's legacy mesh setting
//! does. The built-in provider `envoy` writes to standard output in the
//! mesh's format.
//!
//! This module resolves names to providers; what Envoy gets is the `xds`
//! crate's (`translate/telemetry.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use vmesh_api::kinds::istio_operator::{ExtensionProvider, LogFormat};
use vmesh_api::kinds::telemetry::{
    IstioMetric, TagOperation, TelemetrySpec, TracingSelector, WorkloadMode,
};
use vmesh_api::mesh::MeshTelemetry;

use crate::model::{Scoped, Snapshot};
use crate::selector::{Labels, Selector};

/// The built-in access log provider: Envoy's file logger on standard output
/// in the mesh's format (`accessLogEncoding`, `accessLogFormat`).
pub const ENVOY_PROVIDER: &str = "envoy";
/// The built-in metrics provider.
pub const PROMETHEUS_PROVIDER: &str = "prometheus";
/// Where the built-in provider writes.
const STDOUT: &str = "/dev/stdout";

/// Which side of a sidecar's traffic a setting is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// Outbound: the workload is the client (Istio's `CLIENT`, `reporter=source`).
    Client,
    /// Inbound: the workload is the server (`SERVER`, `reporter=destination`).
    Server,
}

impl Side {
    fn matches(self, mode: Option<WorkloadMode>) -> bool {
        match mode {
            None | Some(WorkloadMode::ClientAndServer) => true,
            Some(WorkloadMode::Client) => self == Side::Client,
            Some(WorkloadMode::Server) => self == Side::Server,
        }
    }

    fn of(selector: Option<&TracingSelector>, side: Side) -> bool {
        side.matches(selector.and_then(|s| s.mode))
    }
}

/// The telemetry of one workload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadTelemetry {
    pub client: SideTelemetry,
    pub server: SideTelemetry,
}

/// The telemetry of one side of a workload's traffic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SideTelemetry {
    pub access_logs: Vec<AccessLog>,
    pub tracing: Option<Tracing>,
    /// Istio's metrics that differ from the default (on, standard labels).
    pub metrics: BTreeMap<IstioMetric, MetricRule>,
}

impl SideTelemetry {
    /// How `metric` is reported: on with the standard labels unless a rule says otherwise.
    pub fn metric(&self, metric: IstioMetric) -> MetricRule {
        self.metrics.get(&metric).cloned().unwrap_or_default()
    }
}

/// An access log: where lines go, their shape, and which requests they cover.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    pub provider: String,
    pub path: String,
    pub format: AccessLogFormat,
    /// A CEL expression: only requests for which it is true are logged.
    pub filter: Option<String>,
}

/// The shape of an access log line.
#[derive(Debug, Clone, PartialEq)]
pub enum AccessLogFormat {
    /// Istio's default text line.
    IstioText,
    /// Istio's default JSON labels.
    IstioJson,
    /// A text format of command operators.
    Text(String),
    /// JSON with these labels, each a command operator.
    Json(BTreeMap<String, String>),
}

/// Where spans go and which requests are traced.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    pub provider: TracingProvider,
    /// Percentage of requests without a sampling decision that are traced.
    pub sampling: f64,
    /// Spans are made (trace context propagated) but not sent.
    pub span_reporting_disabled: bool,
    pub custom_tags: BTreeMap<String, CustomTag>,
}

/// A collector of spans, at a mesh service host and port.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingProvider {
    pub name: String,
    pub kind: TracerKind,
    pub service: String,
    pub port: u16,
    pub max_tag_length: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TracerKind {
    /// Zipkin's JSON v2 API at `path` (default `/api/v2/spans`).
    Zipkin { path: String, trace_id_128bit: bool },
    /// OTLP over gRPC, or over HTTP at this path.
    OpenTelemetry { http_path: Option<String> },
}

/// The value of a span tag.
#[derive(Debug, Clone, PartialEq)]
pub enum CustomTag {
    Literal(String),
    Environment { name: String, default: String },
    Header { name: String, default: String },
}

/// How one of Istio's metrics is reported on one side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricRule {
    pub disabled: bool,
    /// Labels set to a CEL expression (added, or replacing the standard value).
    pub upserts: BTreeMap<String, String>,
    /// Standard labels dropped.
    pub removed: Vec<String>,
}

/// The metrics a `metric` selector names.
fn metrics_named(metric: Option<IstioMetric>) -> &'static [IstioMetric] {
    use IstioMetric::*;
    const ALL: &[IstioMetric] = &[
        RequestCount,
        RequestDuration,
        RequestSize,
        ResponseSize,
        TcpOpenedConnections,
        TcpClosedConnections,
        TcpSentBytes,
        TcpReceivedBytes,
    ];
    match metric {
        None | Some(AllMetrics) => ALL,
        Some(m) => {
            let index = ALL.iter().position(|x| *x == m);
            index.map_or(&[], |i| &ALL[i..=i])
        }
    }
}

impl Snapshot {
    /// The Telemetry resources that apply to a workload in `namespace` with
    /// `labels`, least specific first: the root namespace's, the
    /// namespace's, the workload's.
    pub fn telemetries_for<'a>(
        &'a self,
        namespace: &str,
        labels: &Labels,
    ) -> Vec<&'a Scoped<TelemetrySpec>> {
        let in_namespace = |ns: &str| {
            self.telemetries
                .iter()
                .map(Arc::as_ref)
                .filter(move |t| t.namespace == ns)
                .filter(|t| t.spec.target_ref.is_none() && t.spec.target_refs.is_none())
                .collect::<Vec<_>>()
        };
        fn selector(t: &Scoped<TelemetrySpec>) -> Selector<'_> {
            Selector::new(
                t.spec
                    .selector
                    .as_ref()
                    .and_then(|s| s.match_labels.as_ref()),
            )
        }
        let root = &self.mesh.root_namespace;
        let mut chosen = Vec::new();
        if namespace != root {
            chosen.extend(
                in_namespace(root)
                    .into_iter()
                    .find(|t| selector(t).is_empty()),
            );
        }
        let own = in_namespace(namespace);
        chosen.extend(own.iter().find(|t| selector(t).is_empty()).copied());
        chosen.extend(own.iter().filter(|t| {
            let s = selector(t);
            !s.is_empty() && s.matches(labels)
        }));
        chosen
    }

    /// The telemetry of a workload in `namespace` with `labels`.
    pub fn telemetry_for(&self, namespace: &str, labels: &Labels) -> WorkloadTelemetry {
        let applied = self.telemetries_for(namespace, labels);
        let mesh = &self.mesh.telemetry;
        let side = |side| SideTelemetry {
            access_logs: access_logs(mesh, &applied, side),
            tracing: tracing(mesh, &applied, side),
            metrics: metric_rules(&applied, side),
        };
        WorkloadTelemetry {
            client: side(Side::Client),
            server: side(Side::Server),
        }
    }
}

fn provider<'a>(mesh: &'a MeshTelemetry, name: &str) -> Option<&'a ExtensionProvider> {
    mesh.extension_providers.iter().find(|p| p.name == name)
}

/// The access logs of one side: per provider, the last level that speaks
/// for it decides.
fn access_logs(
    mesh: &MeshTelemetry,
    applied: &[&Scoped<TelemetrySpec>],
    side: Side,
) -> Vec<AccessLog> {
    let defaults = mesh
        .default_providers
        .access_logging
        .clone()
        .unwrap_or_default();
    let configured = applied.iter().any(|t| t.spec.access_logging.is_some());
    if !configured {
        if defaults.is_empty() {
            return legacy(mesh);
        }
        return defaults
            .iter()
            .filter_map(|name| access_log(mesh, name, None))
            .collect();
    }
    // Per provider, the last entry that speaks for it decides; an entry
    // without providers speaks for those the one before named. Only the
    // providers of the last entry naming any stay in scope.
    let mut state: BTreeMap<String, (bool, Option<String>)> = BTreeMap::new();
    let mut in_scope = defaults.clone();
    let mut parent = defaults;
    for telemetry in applied {
        for entry in telemetry.spec.access_logging.iter().flatten() {
            let named: Vec<String> = entry
                .providers
                .iter()
                .flatten()
                .map(|p| p.name.clone())
                .collect();
            let names = if named.is_empty() {
                parent.clone()
            } else {
                named.clone()
            };
            parent.clone_from(&names);
            if !Side::of(entry.match_.as_ref(), side) {
                continue;
            }
            if !named.is_empty() {
                in_scope = named;
            }
            for name in names {
                let slot = state.entry(name).or_insert((true, None));
                slot.0 = !entry.disabled.unwrap_or(false);
                if let Some(filter) = &entry.filter {
                    slot.1 = Some(filter.expression.clone());
                }
            }
        }
    }
    state.retain(|name, _| in_scope.contains(name));
    if state.is_empty() {
        return legacy(mesh);
    }
    state
        .into_iter()
        .filter(|(_, (enabled, _))| *enabled)
        .filter_map(|(name, (_, filter))| access_log(mesh, &name, filter))
        .collect()
}

/// Istio's legacy setting: everything logged to `accessLogFile`.
fn legacy(mesh: &MeshTelemetry) -> Vec<AccessLog> {
    mesh.access_log_file
        .iter()
        .filter(|path| !path.is_empty())
        .map(|path| AccessLog {
            provider: ENVOY_PROVIDER.into(),
            path: path.clone(),
            format: mesh_format(mesh),
            filter: None,
        })
        .collect()
}

/// The access log of provider `name`; `None` when no such provider exists
/// (`vmesh analyze` reports it).
fn access_log(mesh: &MeshTelemetry, name: &str, filter: Option<String>) -> Option<AccessLog> {
    let (path, format) = match provider(mesh, name) {
        Some(p) => {
            let file = p.envoy_file_access_log.as_ref()?;
            let path = file.path.clone().unwrap_or_else(|| STDOUT.into());
            let format = match &file.log_format {
                None if name == ENVOY_PROVIDER => mesh_format(mesh),
                Some(LogFormat {
                    text: Some(text), ..
                }) => AccessLogFormat::Text(text.clone()),
                Some(LogFormat {
                    labels: Some(labels),
                    ..
                }) => AccessLogFormat::Json(
                    labels
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect(),
                ),
                _ => AccessLogFormat::IstioText,
            };
            (path, format)
        }
        None if name == ENVOY_PROVIDER => (STDOUT.to_string(), mesh_format(mesh)),
        None => return None,
    };
    Some(AccessLog {
        provider: name.to_string(),
        path,
        format,
        filter: filter.filter(|f| f.trim() != "true"),
    })
}

/// The mesh's own format: `accessLogFormat` in `accessLogEncoding`.
fn mesh_format(mesh: &MeshTelemetry) -> AccessLogFormat {
    match (&mesh.access_log_format, mesh.access_log_json) {
        (None, false) => AccessLogFormat::IstioText,
        (None, true) => AccessLogFormat::IstioJson,
        (Some(text), false) => AccessLogFormat::Text(text.clone()),
        (Some(json), true) => match serde_json::from_str::<BTreeMap<String, String>>(json) {
            Ok(labels) => AccessLogFormat::Json(labels),
            Err(_) => AccessLogFormat::IstioJson,
        },
    }
}

/// The tracer of one side: each field from the last level that sets it.
fn tracing(
    mesh: &MeshTelemetry,
    applied: &[&Scoped<TelemetrySpec>],
    side: Side,
) -> Option<Tracing> {
    if !mesh.enable_tracing {
        return None;
    }
    let default = mesh
        .default_providers
        .tracing
        .iter()
        .flatten()
        .next()
        .cloned();
    let mut sampling = None;
    let mut disabled = false;
    let mut tags = BTreeMap::new();
    let name = resolve_tracing_fields(
        applied,
        side,
        default,
        &mut sampling,
        &mut disabled,
        &mut tags,
    );
    tracer(mesh, name?, sampling, disabled, tags)
}

fn resolve_tracing_fields(
    applied: &[&Scoped<TelemetrySpec>],
    side: Side,
    mut provider_name: Option<String>,
    sampling: &mut Option<f64>,
    disabled: &mut bool,
    tags: &mut BTreeMap<String, CustomTag>,
) -> Option<String> {
    for telemetry in applied {
        for entry in telemetry.spec.tracing.iter().flatten() {
            if !Side::of(entry.match_.as_ref(), side) {
                continue;
            }
            if let Some(first) = entry.providers.iter().flatten().next() {
                provider_name = Some(first.name.clone());
            }
            if let Some(pct) = entry.random_sampling_percentage {
                *sampling = Some(pct);
            }
            if let Some(off) = entry.disable_span_reporting {
                *disabled = off;
            }
            if entry.custom_tags.is_some() {
                tags.clear();
            }
            for (name, tag) in entry.custom_tags.iter().flatten() {
                let value = if let Some(l) = &tag.literal {
                    CustomTag::Literal(l.value.clone())
                } else if let Some(e) = &tag.environment {
                    CustomTag::Environment {
                        name: e.name.clone(),
                        default: e.default_value.clone().unwrap_or_default(),
                    }
                } else if let Some(h) = &tag.header {
                    CustomTag::Header {
                        name: h.name.clone(),
                        default: h.default_value.clone().unwrap_or_default(),
                    }
                } else {
                    continue;
                };
                tags.insert(name.clone(), value);
            }
        }
    }
    provider_name
}

fn tracer(
    mesh: &MeshTelemetry,
    name: String,
    sampling: Option<f64>,
    span_reporting_disabled: bool,
    custom_tags: BTreeMap<String, CustomTag>,
) -> Option<Tracing> {
    let p = provider(mesh, &name)?;
    let (kind, service, port, max_tag_length) = if let Some(z) = &p.zipkin {
        (
            TracerKind::Zipkin {
                path: z.path.clone().unwrap_or_else(|| "/api/v2/spans".into()),
                trace_id_128bit: !z.enable_64bit_trace_id.unwrap_or(false),
            },
            &z.service,
            z.port,
            z.max_tag_length,
        )
    } else if let Some(o) = &p.opentelemetry {
        (
            TracerKind::OpenTelemetry {
                http_path: o
                    .http
                    .as_ref()
                    .map(|h| h.path.clone().unwrap_or_else(|| "/v1/traces".into())),
            },
            &o.service,
            o.port,
            o.max_tag_length,
        )
    } else {
        return None;
    };
    Some(Tracing {
        provider: TracingProvider {
            name,
            kind,
            service: service.clone(),
            port: u16::try_from(port).ok()?,
            max_tag_length,
        },
        sampling: sampling.unwrap_or(mesh.default_sampling),
        span_reporting_disabled,
        custom_tags,
    })
}

/// The metric rules of one side, overrides applied root first.
fn metric_rules(
    applied: &[&Scoped<TelemetrySpec>],
    side: Side,
) -> BTreeMap<IstioMetric, MetricRule> {
    let mut rules: BTreeMap<IstioMetric, MetricRule> = BTreeMap::new();
    for telemetry in applied {
        for metrics in telemetry.spec.metrics.iter().flatten() {
            let to_prometheus = metrics
                .providers
                .as_ref()
                .is_none_or(|ps| ps.is_empty() || ps.iter().any(|p| p.name == PROMETHEUS_PROVIDER));
            if !to_prometheus {
                continue;
            }
            for o in metrics.overrides.iter().flatten() {
                let selector = o.match_.as_ref();
                if selector.is_some_and(|m| m.custom_metric.is_some())
                    || !side.matches(selector.and_then(|m| m.mode))
                {
                    continue;
                }
                for &metric in metrics_named(selector.and_then(|m| m.metric)) {
                    let rule = rules.entry(metric).or_default();
                    if let Some(disabled) = o.disabled {
                        rule.disabled = disabled;
                    }
                    for (tag, change) in o.tag_overrides.iter().flatten() {
                        match (change.operation.unwrap_or_default(), &change.value) {
                            (TagOperation::Upsert, Some(value)) => {
                                rule.removed.retain(|t| t != tag);
                                rule.upserts.insert(tag.clone(), value.clone());
                            }
                            (TagOperation::Remove, _) => {
                                rule.upserts.remove(tag);
                                if !rule.removed.contains(tag) {
                                    rule.removed.push(tag.clone());
                                }
                            }
                            (TagOperation::Upsert, None) => {}
                        }
                    }
                }
            }
        }
    }
    rules.retain(|_, rule| *rule != MetricRule::default());
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{decode, labels, seed, snapshot};

    fn telemetry(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}\n"
        )
    }

    fn providers(side: &SideTelemetry) -> Vec<(&str, Option<&str>)> {
        side.access_logs
            .iter()
            .map(|l| (l.provider.as_str(), l.filter.as_deref()))
            .collect()
    }

    #[test]
    fn the_guides_access_logging_selects_class_vm_in_its_namespace() {
        let snapshot = snapshot(&seed(&["telemetry-access-log.yaml"]));
        let vm = labels(&[("app", "payment-service"), ("class", "vm")]);
        let selected = snapshot.telemetry_for("vm-workloads", &vm);
        assert_eq!(providers(&selected.server), [("envoy", None)]);
        assert_eq!(providers(&selected.client), [("envoy", None)]);
        let log = &selected.server.access_logs[0];
        assert_eq!(log.path, "/dev/stdout");
        assert_eq!(log.format, AccessLogFormat::IstioText);
        let other = snapshot.telemetry_for("vm-workloads", &labels(&[("app", "x")]));
        assert!(other.server.access_logs.is_empty());
        assert!(
            snapshot
                .telemetry_for("frontend", &vm)
                .server
                .access_logs
                .is_empty()
        );
    }

    #[test]
    fn a_namespace_disables_what_the_root_enables_and_a_workload_filters() {
        let text = [
            telemetry("istio-system", "mesh", "  accessLogging: [{providers: [{name: envoy}]}]"),
            telemetry("shop", "quiet", "  accessLogging: [{disabled: true}]"),
            telemetry(
                "shop",
                "errors",
                "  selector: {matchLabels: {app: pay}}\n  accessLogging: [{filter: {expression: 'response.code >= 400'}}]",
            ),
        ]
        .concat();
        let snapshot = snapshot(&decode("t.yaml", &text));
        let none = labels(&[]);
        assert_eq!(
            providers(&snapshot.telemetry_for("web", &none).server),
            [("envoy", None)]
        );
        assert!(
            snapshot
                .telemetry_for("shop", &none)
                .server
                .access_logs
                .is_empty()
        );
        // No providers named: the entry speaks for the inherited ones, enabled again.
        assert_eq!(
            providers(
                &snapshot
                    .telemetry_for("shop", &labels(&[("app", "pay")]))
                    .server
            ),
            [("envoy", Some("response.code >= 400"))]
        );
    }

    #[test]
    fn legacy_access_log_file_and_json_encoding() {
        let text = "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: vm, namespace: istio-system}\n\
                    spec:\n  meshConfig: {accessLogFile: /dev/stdout, accessLogEncoding: JSON}\n";
        let snapshot = snapshot(&decode("iop.yaml", text));
        let side = snapshot.telemetry_for("shop", &labels(&[])).client;
        assert_eq!(side.access_logs.len(), 1);
        assert_eq!(side.access_logs[0].format, AccessLogFormat::IstioJson);
    }

    #[test]
    fn tracing_from_the_mesh_provider_with_the_most_specific_settings() {
        let text = [
            "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata: {name: vm, namespace: istio-system}\n\
             spec:\n  meshConfig:\n    extensionProviders:\n    - name: zipkin\n      zipkin: {service: zipkin.tracing.svc.cluster.local, port: 9411}\n".to_string(),
            telemetry("istio-system", "mesh", "  tracing: [{providers: [{name: zipkin}], randomSamplingPercentage: 100, customTags: {a: {literal: {value: x}}}}]"),
            telemetry("shop", "ns", "  tracing: [{randomSamplingPercentage: 0, customTags: {b: {header: {name: x-b}}}}]"),
            telemetry("shop", "client-only", "  selector: {matchLabels: {app: pay}}\n  tracing: [{match: {mode: SERVER}, disableSpanReporting: true}]"),
        ]
        .concat();
        let snapshot = snapshot(&decode("t.yaml", &text));
        let mesh = snapshot
            .telemetry_for("web", &labels(&[]))
            .server
            .tracing
            .unwrap();
        assert_eq!(mesh.sampling, 100.0);
        assert_eq!(mesh.provider.port, 9411);
        assert!(matches!(
            mesh.provider.kind,
            TracerKind::Zipkin {
                trace_id_128bit: true,
                ..
            }
        ));
        let shop = snapshot
            .telemetry_for("shop", &labels(&[]))
            .client
            .tracing
            .unwrap();
        assert_eq!(shop.sampling, 0.0);
        // Custom tags are replaced as a whole, not merged.
        assert_eq!(shop.custom_tags.keys().collect::<Vec<_>>(), ["b"]);
        let pay = snapshot.telemetry_for("shop", &labels(&[("app", "pay")]));
        assert!(pay.server.tracing.unwrap().span_reporting_disabled);
        assert!(!pay.client.tracing.unwrap().span_reporting_disabled);
        // An unknown provider traces nothing.
        let unknown = snapshot_with_unknown_provider();
        assert!(
            unknown
                .telemetry_for("web", &labels(&[]))
                .client
                .tracing
                .is_none()
        );
    }

    fn snapshot_with_unknown_provider() -> Snapshot {
        snapshot(&decode(
            "t.yaml",
            &telemetry(
                "istio-system",
                "mesh",
                "  tracing: [{providers: [{name: nope}]}]",
            ),
        ))
    }

    #[test]
    fn metric_overrides_apply_root_first_per_side() {
        let text = [
            telemetry(
                "istio-system",
                "mesh",
                "  metrics:\n  - overrides:\n    - match: {metric: REQUEST_COUNT}\n      tagOverrides: {request_protocol: {operation: REMOVE}, path: {value: request.path}}",
            ),
            telemetry(
                "shop",
                "ns",
                "  metrics:\n  - overrides:\n    - match: {metric: ALL_METRICS, mode: CLIENT}\n      disabled: true\n    - match: {metric: REQUEST_COUNT}\n      tagOverrides: {request_protocol: {value: \"'h'\"}}",
            ),
        ]
        .concat();
        let snapshot = snapshot(&decode("t.yaml", &text));
        let web = snapshot.telemetry_for("web", &labels(&[]));
        let count = web.server.metric(IstioMetric::RequestCount);
        assert_eq!(count.removed, ["request_protocol"]);
        assert_eq!(count.upserts["path"], "request.path");
        assert!(!web.server.metric(IstioMetric::RequestDuration).disabled);
        let shop = snapshot.telemetry_for("shop", &labels(&[]));
        assert!(shop.client.metric(IstioMetric::TcpSentBytes).disabled);
        assert!(!shop.server.metric(IstioMetric::TcpSentBytes).disabled);
        let count = shop.server.metric(IstioMetric::RequestCount);
        assert!(count.removed.is_empty());
        assert_eq!(count.upserts["request_protocol"], "'h'");
    }
}
