//! Core `v1` ServiceAccount: the name a workload's SPIFFE identity is built from.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_with::skip_serializing_none;

use crate::check::Checker;
use crate::registry::{KindInfo, Validate, body_schema, decode_body};

#[skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccount {
    pub automount_service_account_token: Option<bool>,
    pub secrets: Option<Vec<Value>>,
    pub image_pull_secrets: Option<Vec<Value>>,
}

impl Validate for ServiceAccount {
    fn validate(&self, _: &mut Checker) {}
}

pub static KIND: KindInfo = KindInfo {
    kind: "ServiceAccount",
    group: "",
    versions: &["v1"],
    plural: "serviceaccounts",
    short_names: &["sa"],
    namespaced: true,
    default_name: None,
    default_namespace: None,
    columns: &[],
    decode: decode_body::<ServiceAccount>,
    schema: body_schema::<ServiceAccount>,
};
