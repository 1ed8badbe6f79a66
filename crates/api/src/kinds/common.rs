//! Types shared by several kinds: durations, selectors, ports, string matches.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_with::skip_serializing_none;

use crate::check::{Checker, Path};

/// Networking API versions Istio serves for its networking kinds.
pub const NETWORKING_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];
/// Security API versions.
pub const SECURITY_VERSIONS: &[&str] = &["v1", "v1beta1"];

/// A duration as Istio writes it: Go syntax (`30s`, `1m30s`, `500ms`, `1.5h`).
/// Keeps the text it was written with so objects read back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

impl Duration {
    pub fn get(&self) -> std::time::Duration {
        self.value
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        let bad = |why: &str| {
            Err(format!(
                "invalid duration {text:?}: {why} (write e.g. 30s, 500ms, 1m30s)"
            ))
        };
        let mut rest = text.trim();
        if rest.is_empty() {
            return bad("empty");
        }
        let mut total = 0f64;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            if number_len == 0 {
                return bad("expected a number");
            }
            let Ok(number) = rest[..number_len].parse::<f64>() else {
                return bad("malformed number");
            };
            rest = &rest[number_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let seconds = match &rest[..unit_len] {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 1e-3,
                "us" | "µs" => 1e-6,
                "ns" => 1e-9,
                "" => return bad("missing unit"),
                unit => return bad(&format!("unknown unit {unit:?}")),
            };
            rest = &rest[unit_len..];
            total += number * seconds;
        }
        Ok(Duration {
            text: text.to_string(),
            value: std::time::Duration::from_secs_f64(total),
        })
    }

    /// Istio refuses durations shorter than a millisecond for timeouts and intervals.
    pub fn check_at_least_ms(&self, checker: &mut Checker, path: &Path) {
        if self.value < std::time::Duration::from_millis(1) {
            checker.error(
                path,
                format!("duration {:?} must be at least 1ms", self.text),
            );
        }
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 30s")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                Duration::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "invalid duration {v}: missing unit (write e.g. {v}s)"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                self.visit_u64(v.unsigned_abs())
            }
        }
        d.deserialize_any(V)
    }
}

/// An integer or a string (Kubernetes `IntOrString`), e.g. a Service's `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration with its unit, such as 30s, 1m or 1h30m.",
        })
    }
}

impl JsonSchema for IntOrString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrString".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "description": "An integer or a string.",
        })
    }
}

impl Serialize for IntOrString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrString::Int(i) => s.serialize_i64(*i),
            IntOrString::String(v) => s.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom("integer too large"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Istio's `istio.type.v1beta1.WorkloadSelector` (`selector:` in security and telemetry kinds).
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchLabelsSelector {
    pub match_labels: Option<BTreeMap<String, String>>,
}

impl MatchLabelsSelector {
    pub fn validate(&self, c: &mut Checker, path: &Path) {
        if let Some(labels) = &self.match_labels {
            check_selector_labels(c, &path.f("matchLabels"), labels);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
    }
}

/// Istio's networking `WorkloadSelector` (`workloadSelector: {labels: …}`).
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelsSelector {
    pub labels: Option<BTreeMap<String, String>>,
}

impl LabelsSelector {
    pub fn validate(&self, c: &mut Checker, path: &Path) {
        if let Some(labels) = &self.labels {
            check_selector_labels(c, &path.f("labels"), labels);
        }
    }
}

/// Selector labels follow label syntax, and Istio forbids wildcards in them.
/// A label with a wildcard gets that one error rather than a syntax error too.
pub fn check_selector_labels(c: &mut Checker, path: &Path, labels: &BTreeMap<String, String>) {
    let mut plain = BTreeMap::new();
    for (key, value) in labels {
        if key.contains('*') || value.contains('*') {
            c.error(
                &path.f(key),
                "wildcards are not allowed in label selectors: they match exact values",
            );
        } else {
            plain.insert(key.clone(), value.clone());
        }
    }
    c.labels(path, &plain);
}

/// A reference to a policy target (`targetRef`), Gateway API style.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

/// Istio's `PortSelector`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    pub number: u32,
}

/// Istio's `Percent`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Percent {
    pub value: f64,
}

/// Istio's `StringMatch`: exactly one of exact, prefix or regex.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

impl StringMatch {
    pub fn validate(&self, c: &mut Checker, path: &Path) {
        c.one_of(
            path,
            &[
                ("exact", self.exact.is_some()),
                ("prefix", self.prefix.is_some()),
                ("regex", self.regex.is_some()),
            ],
            true,
        );
        if let Some(re) = &self.regex {
            c.regex(&path.f("regex"), re);
        }
    }
}

/// A mesh-wide name for a port's protocol, as Istio spells them.
pub const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "REDIS", "MYSQL", "TCP", "TLS", "UDP",
];

/// Checks an Istio port `protocol` value (case-insensitive, as Istio accepts it).
pub fn check_protocol(c: &mut Checker, path: &Path, protocol: &str) {
    if !PROTOCOLS.iter().any(|p| p.eq_ignore_ascii_case(protocol)) {
        let hint = crate::registry::closest(PROTOCOLS.iter().copied(), protocol)
            .map(|p| format!(" (did you mean {p:?}?)"))
            .unwrap_or_default();
        c.error(
            path,
            format!(
                "unknown protocol {protocol:?}{hint}; expected one of {}",
                PROTOCOLS.join(", ")
            ),
        );
    }
}

/// Validates `exportTo` entries: `.`, `*`, `~` or a namespace name.
pub fn check_export_to(c: &mut Checker, path: &Path, export_to: &[String]) {
    for (i, ns) in export_to.iter().enumerate() {
        if !matches!(ns.as_str(), "." | "*" | "~") {
            c.dns1123_label(&path.i(i), ns);
        }
    }
    if export_to.iter().any(|ns| ns != "*") {
        c.warn(
            path,
            "vmesh does not restrict visibility yet: every namespace sees this object",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_go_syntax() {
        assert_eq!(Duration::parse("30s").unwrap().get().as_secs(), 30);
        assert_eq!(Duration::parse("1m30s").unwrap().get().as_secs(), 90);
        assert_eq!(Duration::parse("500ms").unwrap().get().as_millis(), 500);
        assert_eq!(Duration::parse("1.5h").unwrap().get().as_secs(), 5400);
        assert!(Duration::parse("30").unwrap_err().contains("missing unit"));
        assert!(Duration::parse("30 seconds").is_err());
        assert!(Duration::parse("s").is_err());
        let d: Duration = serde_json::from_value(serde_json::json!("10s")).unwrap();
        assert_eq!(serde_json::to_value(&d).unwrap(), "10s");
        assert!(serde_json::from_value::<Duration>(serde_json::json!(10)).is_err());
    }
}

/// The body of an Istio kind: a `spec` and a server-written `status`.
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WithSpec<S> {
    pub spec: S,
    pub status: Option<serde_json::Value>,
}

/// A spec checks itself below the path it is given (`spec`).
pub trait SpecValidate {
    fn validate(&self, c: &mut Checker, path: &Path);
}

impl<S: SpecValidate> crate::registry::Validate for WithSpec<S> {
    fn validate(&self, c: &mut Checker) {
        self.spec.validate(c, &Path::root("spec"));
    }
}
