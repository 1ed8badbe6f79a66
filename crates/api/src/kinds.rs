//! One module per kind: its body type (with Istio's or Kubernetes' field names),
//! its validation, and its [`KindInfo`](crate::KindInfo).

pub mod common;

pub mod authorization_policy;
pub mod config_map;
pub mod destination_rule;
pub mod endpoint_slice;
pub mod endpoints;
pub mod gateway;
pub mod istio_operator;
pub mod namespace;
pub mod peer_authentication;
pub mod service;
pub mod service_account;
pub mod service_entry;
pub mod sidecar;
pub mod telemetry;
pub mod virtual_service;
pub mod workload_entry;
pub mod workload_group;
