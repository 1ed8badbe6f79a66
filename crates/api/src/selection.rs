//! Kubernetes' list and watch selectors: `labelSelector` and
//! `fieldSelector` query parameters, parsed and matched against objects
//! with Kubernetes' semantics.
//!
//! This module owns the selector languages. Which objects a request covers
//! (kind, namespace) and paging belong to the store and the API.
//!
//! Label selectors: comma-separated requirements, all of which must hold:
//! `key=value`, `key==value`, `key!=value` (also true when the label is
//! absent), `key in (a,b)`, `key notin (a,b)` (also true when absent), `key`
//! (present), `!key` (absent). Field selectors: `metadata.name` and
//! `metadata.namespace` with `=`, `==` or `!=`, the fields every kind
//! supports.

use std::collections::BTreeMap;

use crate::Object;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("labelSelector {selector:?}: {reason}")]
    Label { selector: String, reason: String },
    #[error(
        "fieldSelector {selector:?}: {reason} (the fields that can be selected are metadata.name and metadata.namespace)"
    )]
    Field { selector: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(key, value) => labels.get(key) == Some(value),
            Requirement::NotEquals(key, value) => labels.get(key) != Some(value),
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

/// A parsed `labelSelector`. The empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits at commas outside parentheses.
fn requirements(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A label key or value as Kubernetes allows them: at most 63 characters of
/// alphanumerics, `-`, `_`, `.` (and one `/` after a DNS prefix in a key).
fn valid_name(text: &str, key: bool) -> bool {
    let name = if key {
        text.rsplit_once('/').map_or(text, |(prefix, name)| {
            if prefix.is_empty() || prefix.len() > 253 {
                ""
            } else {
                name
            }
        })
    } else {
        text
    };
    let fits = name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if key { fits && !name.is_empty() } else { fits }
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<LabelSelector, SelectorError> {
        let fail = |reason: String| SelectorError::Label {
            selector: selector.to_string(),
            reason,
        };
        let mut parsed = Vec::new();
        for part in requirements(selector) {
            let part = part.trim();
            if part.is_empty() {
                if selector.trim().is_empty() {
                    continue;
                }
                return Err(fail("an empty requirement".into()));
            }
            let key_of = |key: &str| -> Result<String, SelectorError> {
                let key = key.trim();
                if valid_name(key, true) {
                    Ok(key.to_string())
                } else {
                    Err(fail(format!("{key:?} is not a valid label key")))
                }
            };
            let value_of = |value: &str| -> Result<String, SelectorError> {
                let value = value.trim();
                if valid_name(value, false) {
                    Ok(value.to_string())
                } else {
                    Err(fail(format!("{value:?} is not a valid label value")))
                }
            };
            let set_of = |rest: &str| -> Result<Vec<String>, SelectorError> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| fail(format!("{part:?}: the values go in parentheses")))?;
                inner.split(',').map(value_of).collect()
            };
            let requirement = if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key_of(key)?, value_of(value)?)
            } else if let Some((key, value)) = part.split_once("==") {
                Requirement::Equals(key_of(key)?, value_of(value)?)
            } else if let Some((key, value)) = part.split_once('=') {
                Requirement::Equals(key_of(key)?, value_of(value)?)
            } else if let Some((key, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(key_of(key)?, set_of(rest)?)
            } else if let Some((key, rest)) = part.split_once(" in ") {
                Requirement::In(key_of(key)?, set_of(rest)?)
            } else if let Some(key) = part.strip_prefix('!') {
                Requirement::DoesNotExist(key_of(key)?)
            } else {
                Requirement::Exists(key_of(part)?)
            };
            parsed.push(requirement);
        }
        Ok(LabelSelector(parsed))
    }

    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let empty = BTreeMap::new();
        let labels = labels.unwrap_or(&empty);
        self.0.iter().all(|r| r.matches(labels))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
}

/// A parsed `fieldSelector`. The empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(Field, bool, String)>);

impl FieldSelector {
    pub fn parse(selector: &str) -> Result<FieldSelector, SelectorError> {
        let fail = |reason: String| SelectorError::Field {
            selector: selector.to_string(),
            reason,
        };
        let mut parsed = Vec::new();
        for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(fail(format!("{part:?} is not field=value or field!=value")));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(fail(format!("{other:?} cannot be selected on"))),
            };
            parsed.push((field, equal, value.trim().to_string()));
        }
        Ok(FieldSelector(parsed))
    }

    pub fn matches(&self, object: &Object) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = match field {
                Field::Name => object.metadata.name(),
                Field::Namespace => object.metadata.namespace().unwrap_or_default(),
            };
            (actual == value) == *equal
        })
    }
}

/// Both selectors of a list or watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Selectors, SelectorError> {
        Ok(Selectors {
            labels: LabelSelector::parse(labels.unwrap_or_default())?,
            fields: FieldSelector::parse(fields.unwrap_or_default())?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.labels.0.is_empty() && self.fields.0.is_empty()
    }

    pub fn matches(&self, object: &Object) -> bool {
        self.labels.matches(object.metadata.labels.as_ref()) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors_as_kubernetes_reads_them() {
        let web = labels(&[("app", "web"), ("tier", "front"), ("example.com/team", "a")]);
        let db = labels(&[("app", "db")]);
        let cases = [
            ("", true, true),
            ("app=web", true, false),
            ("app==web", true, false),
            ("app!=web", false, true),
            ("tier!=back", true, true),
            ("app in (web, db)", true, true),
            ("app notin (db)", true, false),
            ("tier notin (front)", false, true),
            ("tier", true, false),
            ("!tier", false, true),
            ("app=web,tier=front", true, false),
            ("app in (web,db),!tier", false, true),
            ("example.com/team=a", true, false),
        ];
        for (selector, on_web, on_db) in cases {
            let parsed = LabelSelector::parse(selector).unwrap();
            assert_eq!(parsed.matches(Some(&web)), on_web, "{selector} on web");
            assert_eq!(parsed.matches(Some(&db)), on_db, "{selector} on db");
        }
        assert!(LabelSelector::parse("app!=web").unwrap().matches(None));
    }

    #[test]
    fn bad_selectors_say_what_is_wrong() {
        for (selector, reason) in [
            ("app=we b", "not a valid label value"),
            ("=web", "not a valid label key"),
            ("app in web", "parentheses"),
            ("app=web,,tier", "an empty requirement"),
        ] {
            let error = LabelSelector::parse(selector).unwrap_err().to_string();
            assert!(error.contains(reason), "{selector}: {error}");
        }
        let error = FieldSelector::parse("spec.address=1.2.3.4")
            .unwrap_err()
            .to_string();
        assert!(error.contains("cannot be selected on"), "{error}");
        assert!(FieldSelector::parse("metadata.name").is_err());
    }

    #[test]
    fn field_selectors_on_name_and_namespace() {
        let object: Object = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a", "namespace": "ns"},
        }))
        .unwrap();
        for (selector, expected) in [
            ("metadata.name=a", true),
            ("metadata.name==a,metadata.namespace=ns", true),
            ("metadata.name!=a", false),
            ("metadata.namespace!=other", true),
            ("metadata.namespace=other", false),
        ] {
            assert_eq!(
                FieldSelector::parse(selector).unwrap().matches(&object),
                expected,
                "{selector}"
            );
        }
    }
}
