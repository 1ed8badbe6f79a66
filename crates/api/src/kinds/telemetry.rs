//! Istio `Telemetry`: access logging, tracing and metrics settings for workloads.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{Duration, MatchLabelsSelector, PolicyTargetReference, SpecValidate, WithSpec};
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySpec {
    pub selector: Option<MatchLabelsSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    pub tracing: Option<Vec<Tracing>>,
    pub metrics: Option<Vec<Metrics>>,
    pub access_logging: Option<Vec<AccessLogging>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderRef {
    pub name: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    #[serde(rename = "match")]
    pub match_: Option<TracingSelector>,
    pub providers: Option<Vec<ProviderRef>>,
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: Option<BTreeMap<String, CustomTag>>,
    pub use_request_id_for_trace_sampling: Option<bool>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSelector {
    pub mode: Option<WorkloadMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkloadMode {
    ClientAndServer,
    Client,
    Server,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomTag {
    pub literal: Option<Literal>,
    pub environment: Option<EnvironmentTag>,
    pub header: Option<HeaderTag>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Literal {
    pub value: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvironmentTag {
    pub name: String,
    pub default_value: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderTag {
    pub name: String,
    pub default_value: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metrics {
    pub providers: Option<Vec<ProviderRef>>,
    pub overrides: Option<Vec<MetricsOverrides>>,
    pub reporting_interval: Option<Duration>,
}

/// One override of Istio's standard metrics: which metrics and side it
/// matches, whether they are off, and how their labels change.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsOverrides {
    #[serde(rename = "match")]
    pub match_: Option<MetricSelector>,
    pub disabled: Option<bool>,
    pub tag_overrides: Option<BTreeMap<String, TagOverride>>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricSelector {
    pub metric: Option<IstioMetric>,
    pub custom_metric: Option<String>,
    pub mode: Option<WorkloadMode>,
}

/// Istio's standard metrics, as `MetricSelector.metric` names them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IstioMetric {
    AllMetrics,
    RequestCount,
    RequestDuration,
    RequestSize,
    ResponseSize,
    TcpOpenedConnections,
    TcpClosedConnections,
    TcpSentBytes,
    TcpReceivedBytes,
    GrpcRequestMessages,
    GrpcResponseMessages,
}

/// A label's change: `REMOVE` drops it, `UPSERT` sets it to the CEL
/// expression `value`.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TagOverride {
    pub operation: Option<TagOperation>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TagOperation {
    #[default]
    Upsert,
    Remove,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    #[serde(rename = "match")]
    pub match_: Option<TracingSelector>,
    pub providers: Option<Vec<ProviderRef>>,
    pub disabled: Option<bool>,
    pub filter: Option<Filter>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    pub expression: String,
}

impl SpecValidate for TelemetrySpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        for (field, set) in [
            ("targetRef", self.target_ref.is_some()),
            ("targetRefs", self.target_refs.is_some()),
        ] {
            if set {
                c.warn(
                    &path.f(field),
                    "targets gateways and waypoints, which vmesh does not run yet: not applied to sidecars",
                );
            }
        }
        if let Some(selector) = &self.selector {
            selector.validate(c, &path.f("selector"));
        }
        for (i, tracing) in self.tracing.iter().flatten().enumerate() {
            let p = path.f("tracing").i(i);
            if let Some(pct) = tracing.random_sampling_percentage {
                c.percentage(&p.f("randomSamplingPercentage"), pct);
            }
            if tracing.use_request_id_for_trace_sampling.is_some() {
                c.warn(
                    &p.f("useRequestIdForTraceSampling"),
                    "accepted but not applied by vmesh yet",
                );
            }
            if tracing.providers.as_ref().is_some_and(|p| p.len() > 1) {
                c.warn(
                    &p.f("providers"),
                    "Envoy sends spans to one tracer: only the first provider is used",
                );
            }
            for (name, tag) in tracing.custom_tags.iter().flatten() {
                c.one_of(
                    &p.f("customTags").f(name),
                    &[
                        ("literal", tag.literal.is_some()),
                        ("environment", tag.environment.is_some()),
                        ("header", tag.header.is_some()),
                    ],
                    true,
                );
            }
        }
        for (i, log) in self.access_logging.iter().flatten().enumerate() {
            if let Some(filter) = &log.filter
                && filter.expression.trim().is_empty()
            {
                c.error(
                    &path.f("accessLogging").i(i).f("filter").f("expression"),
                    "expression must not be empty",
                );
            }
        }
        for (i, metrics) in self.metrics.iter().flatten().enumerate() {
            let p = path.f("metrics").i(i);
            if let Some(interval) = &metrics.reporting_interval {
                interval.check_at_least_ms(c, &p.f("reportingInterval"));
                c.warn(
                    &p.f("reportingInterval"),
                    "accepted but not applied by vmesh yet: TCP metrics are reported when a connection closes",
                );
            }
            for (j, provider) in metrics.providers.iter().flatten().enumerate() {
                if provider.name != "prometheus" {
                    c.warn(
                        &p.f("providers").i(j).f("name"),
                        format!("metrics provider {:?} is not applied: vmesh serves Istio's metrics to Prometheus only", provider.name),
                    );
                }
            }
            for (j, o) in metrics.overrides.iter().flatten().enumerate() {
                let op = p.f("overrides").i(j);
                let selector = o.match_.as_ref();
                if selector.is_some_and(|m| m.custom_metric.is_some()) {
                    c.warn(
                        &op.f("match").f("customMetric"),
                        "custom metrics are not applied by vmesh yet",
                    );
                }
                if let Some(
                    metric @ (IstioMetric::GrpcRequestMessages | IstioMetric::GrpcResponseMessages),
                ) = selector.and_then(|m| m.metric)
                {
                    c.warn(
                        &op.f("match").f("metric"),
                        format!("{metric:?} is not produced by vmesh's sidecars: not applied"),
                    );
                }
                for (tag, change) in o.tag_overrides.iter().flatten() {
                    let tp = op.f("tagOverrides").f(tag);
                    match (change.operation.unwrap_or_default(), &change.value) {
                        (TagOperation::Upsert, None) => {
                            c.error(&tp.f("value"), "UPSERT needs a value (a CEL expression)")
                        }
                        (TagOperation::Remove, Some(_)) => {
                            c.error(&tp.f("value"), "REMOVE takes no value")
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

pub type Telemetry = WithSpec<TelemetrySpec>;

pub static KIND: KindInfo = KindInfo {
    kind: "Telemetry",
    group: "telemetry.istio.io",
    versions: &["v1", "v1alpha1"],
    plural: "telemetries",
    short_names: &["telemetry"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[],
    decode: decode_body::<Telemetry>,
    schema: body_schema::<Telemetry>,
};
