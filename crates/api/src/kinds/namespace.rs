//! Core `v1` Namespace: cluster-scoped; objects can only live in one that exists.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_with::skip_serializing_none;

use crate::check::Checker;
use crate::registry::{KindInfo, Validate, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    pub spec: Option<NamespaceSpec>,
    pub status: Option<Value>,
}

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    pub finalizers: Option<Vec<String>>,
}

impl Validate for Namespace {
    fn validate(&self, _: &mut Checker) {}
}

pub static KIND: KindInfo = KindInfo {
    kind: "Namespace",
    group: "",
    versions: &["v1"],
    plural: "namespaces",
    short_names: &["ns"],
    namespaced: false,
    default_name: None,
    default_namespace: None,
    columns: &[],
    decode: decode_body::<Namespace>,
    schema: body_schema::<Namespace>,
};
