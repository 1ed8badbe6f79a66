//! Core `v1` ConfigMap: string data (the CA publishes `istio-ca-root-cert` as one).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use crate::check::{Checker, Path};
use crate::registry::{KindInfo, Validate, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMap {
    pub data: Option<BTreeMap<String, String>>,
    pub binary_data: Option<BTreeMap<String, String>>,
    pub immutable: Option<bool>,
}

impl Validate for ConfigMap {
    fn validate(&self, c: &mut Checker) {
        let keys = self
            .data
            .iter()
            .flatten()
            .chain(self.binary_data.iter().flatten());
        for (key, _) in keys {
            let valid = !key.is_empty()
                && key.len() <= 253
                && key
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-._".contains(ch));
            if !valid {
                c.error(
                    &Path::root("data").f(key),
                    format!(
                        "invalid key {key:?}: must be alphanumeric characters, '-', '_' or '.'"
                    ),
                );
            }
        }
    }
}

pub static KIND: KindInfo = KindInfo {
    kind: "ConfigMap",
    group: "",
    versions: &["v1"],
    plural: "configmaps",
    short_names: &["cm"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[],
    decode: decode_body::<ConfigMap>,
    schema: body_schema::<ConfigMap>,
};
