//! Istio `Telemetry`: access logging, tracing and metrics settings for workloads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use super::common::{Duration, MatchLabelsSelector, PolicyTargetReference, SpecValidate, WithSpec};
use crate::check::{Checker, Path};
use crate::registry::{KindInfo, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySpec {
    pub selector: Option<MatchLabelsSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    pub tracing: Option<Vec<Tracing>>,
    pub metrics: Option<Vec<Metrics>>,
    pub access_logging: Option<Vec<AccessLogging>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderRef {
    pub name: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSelector {
    pub mode: Option<WorkloadMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkloadMode {
    ClientAndServer,
    Client,
    Server,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomTag {
    pub literal: Option<Literal>,
    pub environment: Option<EnvironmentTag>,
    pub header: Option<HeaderTag>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Literal {
    pub value: String,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvironmentTag {
    pub name: String,
    pub default_value: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderTag {
    pub name: String,
    pub default_value: Option<String>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metrics {
    pub providers: Option<Vec<ProviderRef>>,
    pub overrides: Option<Vec<serde_json::Value>>,
    pub reporting_interval: Option<Duration>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    #[serde(rename = "match")]
    pub match_: Option<TracingSelector>,
    pub providers: Option<Vec<ProviderRef>>,
    pub disabled: Option<bool>,
    pub filter: Option<Filter>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    pub expression: String,
}

impl SpecValidate for TelemetrySpec {
    fn validate(&self, c: &mut Checker, path: &Path) {
        c.warn(
            path,
            "Telemetry resources are accepted but not applied by vmesh yet: no access log, trace or metric is configured from them",
        );
        if let Some(selector) = &self.selector {
            selector.validate(c, &path.f("selector"));
        }
        for (i, tracing) in self.tracing.iter().flatten().enumerate() {
            let p = path.f("tracing").i(i);
            if let Some(pct) = tracing.random_sampling_percentage {
                c.percentage(&p.f("randomSamplingPercentage"), pct);
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
            if let Some(interval) = &metrics.reporting_interval {
                interval.check_at_least_ms(c, &path.f("metrics").i(i).f("reportingInterval"));
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
};
