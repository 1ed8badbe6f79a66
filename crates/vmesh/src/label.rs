//! `vmesh label KIND NAME key=value… key-…`, as `kubectl label` does it:
//! `key=value` sets a label, `key-` removes one, a label that already has
//! another value changes only with `--overwrite`, and the object is written
//! back with the resourceVersion it was read at, so a concurrent change is
//! refused rather than lost. The guide's `kubectl label namespace
//! vm-workloads istio-injection=enabled` is the case it was made for (vmesh
//! injects nothing: the label is kept, as Kubernetes keeps it).

use std::collections::BTreeMap;

use serde_json::Value;

/// What one command line asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    set: Vec<(String, String)>,
    remove: Vec<String>,
}

/// Why the labels were not changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("at least one label update is required")]
    Nothing,
    #[error("invalid label spec: {0:?} (key=value sets, key- removes)")]
    Invalid(String),
    #[error("can not both modify and remove a label in the same command: {0:?}")]
    SetAndRemoved(String),
    #[error("'{key}' already has a value ({value}), and --overwrite is false")]
    WouldOverwrite { key: String, value: String },
}

impl Changes {
    /// Parses `key=value` and `key-` arguments.
    pub fn parse(args: &[String]) -> Result<Changes, LabelError> {
        let mut changes = Changes {
            set: Vec::new(),
            remove: Vec::new(),
        };
        for arg in args {
            if let Some((key, value)) = arg.split_once('=') {
                if key.is_empty() {
                    return Err(LabelError::Invalid(arg.clone()));
                }
                changes.set.push((key.to_string(), value.to_string()));
            } else if let Some(key) = arg.strip_suffix('-').filter(|k| !k.is_empty()) {
                changes.remove.push(key.to_string());
            } else {
                return Err(LabelError::Invalid(arg.clone()));
            }
        }
        if changes.set.is_empty() && changes.remove.is_empty() {
            return Err(LabelError::Nothing);
        }
        if let Some(key) = changes
            .remove
            .iter()
            .find(|k| changes.set.iter().any(|(s, _)| s == *k))
        {
            return Err(LabelError::SetAndRemoved(key.clone()));
        }
        Ok(changes)
    }

    /// Applies the changes to `labels`; whether anything changed, and the
    /// keys asked to be removed that were not there (kubectl warns of them).
    pub fn apply(
        &self,
        labels: &mut BTreeMap<String, String>,
        overwrite: bool,
    ) -> Result<(bool, Vec<String>), LabelError> {
        for (key, value) in &self.set {
            if let Some(current) = labels.get(key)
                && current != value
                && !overwrite
            {
                return Err(LabelError::WouldOverwrite {
                    key: key.clone(),
                    value: current.clone(),
                });
            }
        }
        let before = labels.clone();
        labels.extend(self.set.iter().cloned());
        let missing = self
            .remove
            .iter()
            .filter(|key| labels.remove(*key).is_none())
            .cloned()
            .collect();
        Ok((*labels != before, missing))
    }
}

/// The object's `metadata.labels` (empty when it has none).
pub fn labels_of(object: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(object["metadata"]["labels"].clone()).unwrap_or_default()
}

/// Puts `labels` into the object's metadata (removing the field when empty).
pub fn set_labels(object: &mut Value, labels: BTreeMap<String, String>) {
    let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if labels.is_empty() {
        metadata.remove("labels");
    } else {
        metadata.insert("labels".into(), serde_json::json!(labels));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kubectls_rules() {
        let mut labels = BTreeMap::from([("team".to_string(), "payments".to_string())]);
        let inject = Changes::parse(&args(&["istio-injection=enabled"])).unwrap();
        assert_eq!(inject.apply(&mut labels, false), Ok((true, vec![])));
        assert_eq!(labels["istio-injection"], "enabled");
        // The same again changes nothing.
        assert_eq!(inject.apply(&mut labels, false), Ok((false, vec![])));

        let disable = Changes::parse(&args(&["istio-injection=disabled"])).unwrap();
        assert_eq!(
            disable.apply(&mut labels, false),
            Err(LabelError::WouldOverwrite {
                key: "istio-injection".into(),
                value: "enabled".into()
            })
        );
        assert_eq!(labels["istio-injection"], "enabled", "nothing changed");
        assert_eq!(disable.apply(&mut labels, true), Ok((true, vec![])));
        assert_eq!(labels["istio-injection"], "disabled");

        let remove = Changes::parse(&args(&["istio-injection-", "absent-"])).unwrap();
        assert_eq!(
            remove.apply(&mut labels, false),
            Ok((true, vec!["absent".to_string()]))
        );
        assert_eq!(labels.keys().collect::<Vec<_>>(), ["team"]);
    }

    #[test]
    fn refused_specs() {
        assert_eq!(Changes::parse(&[]), Err(LabelError::Nothing));
        assert_eq!(
            Changes::parse(&args(&["istio-injection"])),
            Err(LabelError::Invalid("istio-injection".into()))
        );
        assert_eq!(
            Changes::parse(&args(&["=x"])),
            Err(LabelError::Invalid("=x".into()))
        );
        assert_eq!(
            Changes::parse(&args(&["a=1", "a-"])),
            Err(LabelError::SetAndRemoved("a".into()))
        );
    }

    #[test]
    fn labels_round_trip_through_the_object() {
        let mut object = serde_json::json!({"metadata": {"name": "ns1"}});
        assert!(labels_of(&object).is_empty());
        set_labels(&mut object, BTreeMap::from([("a".into(), "1".into())]));
        assert_eq!(object["metadata"]["labels"], serde_json::json!({"a": "1"}));
        set_labels(&mut object, BTreeMap::new());
        assert!(object["metadata"].get("labels").is_none());
    }
}
