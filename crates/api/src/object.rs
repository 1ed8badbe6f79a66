//! The Kubernetes object envelope shared by every kind: `apiVersion`, `kind`,
//! `metadata` and the kind-specific body (`spec`, `status`, `data`, …).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use serde_with::skip_serializing_none;

use crate::registry::KindInfo;

/// Standard object's metadata: its name, namespace, labels and
/// annotations, and what the server keeps of it (uid, resourceVersion,
/// generation, creationTimestamp, managedFields).
#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: Option<String>,
    pub generate_name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub generation: Option<i64>,
    pub creation_timestamp: Option<String>,
    pub deletion_timestamp: Option<String>,
    pub finalizers: Option<Vec<String>>,
    pub owner_references: Option<Vec<Value>>,
    pub managed_fields: Option<Vec<Value>>,
}

impl ObjectMeta {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
}

/// A decoded, validated object of any registered kind. The body holds the
/// kind-specific top-level fields in canonical form (as the typed body
/// re-serialises them), so two objects equal in meaning compare equal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(flatten)]
    pub body: Map<String, Value>,
}

impl Object {
    /// The registered kind of this object.
    pub fn info(&self) -> Option<&'static KindInfo> {
        crate::registry::find_kind(&self.api_version, &self.kind)
    }

    /// The storage identity of this object.
    pub fn key(&self) -> Option<ObjectKey> {
        let info = self.info()?;
        Some(ObjectKey {
            group: info.group.to_string(),
            plural: info.plural.to_string(),
            namespace: if info.namespaced {
                self.metadata.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name: self.metadata.name().to_string(),
        })
    }

    /// `Kind namespace/name` or `Kind name`, as problems and logs name objects.
    pub fn display_name(&self) -> String {
        display_name(&self.kind, self.metadata.namespace(), self.metadata.name())
    }

    /// The body decoded as a kind's typed body (for consumers such as the registry).
    pub fn typed<B: serde::de::DeserializeOwned>(&self) -> Result<B, serde_json::Error> {
        serde_json::from_value(Value::Object(self.body.clone()))
    }

    /// Whether two objects say the same thing: labels, annotations,
    /// finalizers, owner references, field ownership and body, ignoring
    /// server-managed metadata and status.
    pub fn same_content(&self, other: &Object) -> bool {
        let strip = |o: &Object| {
            let mut body = o.body.clone();
            body.remove("status");
            (
                o.metadata.labels.clone().unwrap_or_default(),
                o.metadata.annotations.clone().unwrap_or_default(),
                o.metadata.finalizers.clone().unwrap_or_default(),
                o.metadata.owner_references.clone().unwrap_or_default(),
                o.metadata.managed_fields.clone().unwrap_or_default(),
                body,
            )
        };
        strip(self) == strip(other)
    }
}

/// `Kind namespace/name`, `Kind name` for cluster-scoped kinds, `(unnamed)` for a missing name.
pub fn display_name(kind: &str, namespace: Option<&str>, name: &str) -> String {
    let name = if name.is_empty() { "(unnamed)" } else { name };
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Where an object lives: group, plural resource name, namespace (empty for
/// cluster-scoped kinds) and name. Versions share one identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// The store's key: `group/plural/namespace/name` (core group written as `core`).
    pub fn storage_key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.collection_prefix(),
            self.namespace,
            self.name
        )
    }

    /// The resource as Kubernetes names it in messages:
    /// `workloadentries.networking.istio.io`, `services`.
    pub fn resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Prefix shared by every object of this key's kind.
    pub fn collection_prefix(&self) -> String {
        collection(&self.group, &self.plural)
    }
}

/// The store's name for the objects of one kind: `group/plural`, with
/// `core` for the core group (`core/services`).
pub fn collection(group: &str, plural: &str) -> String {
    let group = if group.is_empty() { "core" } else { group };
    format!("{group}/{plural}")
}
