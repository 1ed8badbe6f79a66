//! Validation beyond types: the checks Istio and Kubernetes apply to fields.
//!
//! Kinds call these from their `Validate` implementations, passing the field
//! path so that every problem can be located in the source.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::LazyLock;

use regex::Regex;

use crate::problem::Severity;

/// A field path under construction: `spec.ports[0].number`.
#[derive(Debug, Clone, Default)]
pub struct Path(String);

impl Path {
    pub fn root(name: &str) -> Path {
        Path(name.to_string())
    }

    /// A named field below this one.
    pub fn f(&self, name: &str) -> Path {
        if self.0.is_empty() {
            Path(name.to_string())
        } else {
            Path(format!("{}.{name}", self.0))
        }
    }

    /// An element of a list.
    pub fn i(&self, index: usize) -> Path {
        Path(format!("{}[{index}]", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Collects problems found while validating one object.
#[derive(Debug, Default)]
pub struct Checker {
    pub(crate) found: Vec<(Severity, String, String)>,
    /// The object's namespace, for checks that depend on it.
    pub namespace: Option<String>,
}

impl Checker {
    pub fn error(&mut self, path: &Path, message: impl Into<String>) {
        self.found
            .push((Severity::Error, path.0.clone(), message.into()));
    }

    pub fn warn(&mut self, path: &Path, message: impl Into<String>) {
        self.found
            .push((Severity::Warning, path.0.clone(), message.into()));
    }

    pub fn has_errors(&self) -> bool {
        self.found.iter().any(|(s, ..)| *s == Severity::Error)
    }

    /// A TCP/UDP port number: 1–65535.
    pub fn port(&mut self, path: &Path, port: u32) {
        if !(1..=65535).contains(&port) {
            self.error(path, format!("port {port} is out of range 1-65535"));
        }
    }

    /// A DNS-1123 label: lower-case alphanumerics and '-', at most 63 characters.
    pub fn dns1123_label(&mut self, path: &Path, value: &str) {
        if let Some(why) = dns1123_label_problem(value) {
            self.error(
                path,
                format!("{value:?} is not a valid DNS-1123 label: {why}"),
            );
        }
    }

    /// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
    pub fn dns1123_subdomain(&mut self, path: &Path, value: &str) {
        if let Some(why) = dns1123_subdomain_problem(value) {
            self.error(
                path,
                format!("{value:?} is not a valid DNS-1123 subdomain: {why}"),
            );
        }
    }

    /// A host name as Istio accepts it: a DNS name, optionally starting with `*.` or `*`.
    pub fn hostname(&mut self, path: &Path, host: &str) {
        let rest = if host == "*" {
            return;
        } else if let Some(rest) = host.strip_prefix("*.") {
            rest
        } else {
            host
        };
        if host.contains("://") || host.contains('/') {
            self.error(
                path,
                format!("{host:?} is not a host name (no scheme or path)"),
            );
            return;
        }
        if rest
            .split('.')
            .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()))
        {
            self.error(path, format!("{host:?} is not a valid IP address"));
            return;
        }
        if let Some(why) = dns_name_problem(rest) {
            self.error(path, format!("{host:?} is not a valid host name: {why}"));
        }
    }

    /// Label keys and values as Kubernetes accepts them.
    pub fn labels(&mut self, path: &Path, labels: &BTreeMap<String, String>) {
        for (key, value) in labels {
            let p = path.f(key);
            if let Some(why) = label_key_problem(key) {
                self.error(&p, format!("invalid label key {key:?}: {why}"));
            }
            if let Some(why) = label_value_problem(value) {
                self.error(&p, format!("invalid label value {value:?}: {why}"));
            }
        }
    }

    /// Annotation keys (values are free text).
    pub fn annotation_keys(&mut self, path: &Path, annotations: &BTreeMap<String, String>) {
        for key in annotations.keys() {
            if let Some(why) = label_key_problem(key) {
                self.error(
                    &path.f(key),
                    format!("invalid annotation key {key:?}: {why}"),
                );
            }
        }
    }

    /// An IP address (v4 or v6).
    pub fn ip(&mut self, path: &Path, value: &str) {
        if value.parse::<IpAddr>().is_err() {
            self.error(path, format!("{value:?} is not an IP address"));
        }
    }

    /// An IP address or CIDR block.
    pub fn ip_or_cidr(&mut self, path: &Path, value: &str) {
        let ok = match value.split_once('/') {
            None => value.parse::<IpAddr>().is_ok(),
            Some((ip, len)) => match (ip.parse::<IpAddr>(), len.parse::<u8>()) {
                (Ok(IpAddr::V4(_)), Ok(l)) => l <= 32,
                (Ok(IpAddr::V6(_)), Ok(l)) => l <= 128,
                _ => false,
            },
        };
        if !ok {
            self.error(
                path,
                format!("{value:?} is not an IP address or CIDR block"),
            );
        }
    }

    /// A regular expression (Envoy uses RE2; this checks the syntax they share).
    pub fn regex(&mut self, path: &Path, value: &str) {
        if let Err(e) = Regex::new(value) {
            self.error(path, format!("invalid regular expression: {e}"));
        }
    }

    /// At most one of several mutually exclusive fields is set.
    pub fn one_of(&mut self, path: &Path, set: &[(&str, bool)], required: bool) {
        let chosen: Vec<&str> = set.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
        let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
        if chosen.len() > 1 {
            self.error(
                path,
                format!(
                    "{} are mutually exclusive; set only one",
                    chosen.join(" and ")
                ),
            );
        } else if required && chosen.is_empty() {
            self.error(path, format!("one of {} is required", names.join(", ")));
        }
    }

    pub fn required_str(&mut self, path: &Path, value: &str) {
        if value.is_empty() {
            self.error(path, "is required");
        }
    }

    /// A percentage: 0–100.
    pub fn percentage(&mut self, path: &Path, value: f64) {
        if !(0.0..=100.0).contains(&value) {
            self.error(
                path,
                format!("{value} is not a percentage between 0 and 100"),
            );
        }
    }

    /// Names within one list must be unique. A duplicate is reported at `field`
    /// (a dotted path such as `name` or `port.number`) of the later element.
    pub fn unique_names<'a>(
        &mut self,
        path: &Path,
        field: &str,
        what: &str,
        names: impl IntoIterator<Item = (usize, &'a str)>,
    ) {
        let mut seen = BTreeMap::new();
        for (index, name) in names {
            if name.is_empty() {
                continue;
            }
            if let Some(first) = seen.insert(name, index) {
                self.error(
                    &path.i(index).f(field),
                    format!("duplicate {what} {name:?} (first used at index {first})"),
                );
            }
        }
    }
}

static DNS_LABEL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").expect("static regex"));
static DNS_NAME_LABEL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?$").expect("static regex")
});
static LABEL_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$").expect("static regex")
});

pub fn dns1123_label_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".into());
    }
    if value.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    if !DNS_LABEL.is_match(value) {
        return Some("must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character".into());
    }
    None
}

pub fn dns1123_subdomain_problem(value: &str) -> Option<String> {
    if value.len() > 253 {
        return Some("must be no more than 253 characters".into());
    }
    if value.split('.').any(|l| dns1123_label_problem(l).is_some()) {
        return Some("must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character".into());
    }
    None
}

fn dns_name_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".into());
    }
    if value.len() > 255 {
        return Some("must be no more than 255 characters".into());
    }
    let value = value.strip_suffix('.').unwrap_or(value);
    for label in value.split('.') {
        if label.len() > 63 || !DNS_NAME_LABEL.is_match(label) {
            return Some(format!("label {label:?} is not a DNS label"));
        }
    }
    None
}

fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && let Some(why) = dns1123_subdomain_problem(prefix)
    {
        return Some(format!("prefix {why}"));
    }
    if name.is_empty() || name.len() > 63 || !LABEL_NAME.is_match(name) {
        return Some("name part must be 1-63 alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character".into());
    }
    None
}

fn label_value_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    if value.len() > 63 || !LABEL_NAME.is_match(value) {
        return Some("must be at most 63 alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_rules() {
        assert!(label_key_problem("app").is_none());
        assert!(label_key_problem("topology.istio.io/network").is_none());
        assert!(label_key_problem("Bad Key").is_some());
        assert!(label_key_problem("a/b/c").is_some());
        assert!(label_value_problem("v1").is_none());
        assert!(label_value_problem("has space").is_some());
    }

    #[test]
    fn names() {
        assert!(dns1123_label_problem("payment-service").is_none());
        assert!(dns1123_label_problem("Payment").is_some());
        assert!(dns1123_subdomain_problem("a.b-c").is_none());
        let mut c = Checker::default();
        c.hostname(&Path::root("h"), "*.example.com");
        c.hostname(
            &Path::root("h"),
            "payment-service.vm-workloads.svc.cluster.local",
        );
        assert!(!c.has_errors());
        c.hostname(&Path::root("h"), "http://x");
        assert!(c.has_errors());
    }
}
