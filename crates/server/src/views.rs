//! What Kubernetes fills in and vmesh computes from the mesh instead of
//! storing: a Service's `type` and cluster IP as `GET` shows them
//! ([`present_service`]), and the Endpoints of every Service
//! ([`endpoints`], served read-only at `/api/v1/[namespaces/{ns}/]endpoints[/{name}]`).
//!
//! Both come from the registry snapshot the mesh controller last published
//! (`vmesh_registry::kube_view`), so they show what the proxies are sent;
//! right after a change they lag it by the controller's debounce (at most a
//! second). Nothing here is written to the store: a Service reads back as
//! applied plus these fields, as Kubernetes shows allocated addresses.

use serde_json::Value;
use vmesh_api::kinds::endpoints::{self, Endpoints};
use vmesh_api::kinds::service;
use vmesh_api::{Object, ObjectMeta};
use vmesh_registry::Snapshot;
use vmesh_registry::kube_view::endpoint_subsets;
use vmesh_store::{Selection, Store, StoreError};

/// A Service as `GET` shows it: `spec.type` defaults to `ClusterIP`, and a
/// Service that writes no `clusterIP` shows the virtual IP the mesh gave it
/// (`clusterIP` and `clusterIPs`), once the mesh has one.
pub fn present_service(object: &mut Object, snapshot: Option<&Snapshot>) {
    let Some(Value::Object(spec)) = object.body.get_mut("spec") else {
        return;
    };
    let type_ = spec
        .entry("type")
        .or_insert_with(|| Value::String("ClusterIP".into()))
        .clone();
    if type_ == "ExternalName" || spec.contains_key("clusterIP") {
        return;
    }
    let namespace = object.metadata.namespace().unwrap_or_default();
    let Some(mesh) = snapshot.and_then(|s| s.kubernetes_service(namespace, object.metadata.name()))
    else {
        return;
    };
    if let Some(first) = mesh.addresses.first() {
        spec.insert("clusterIP".into(), Value::String(first.to_string()));
        spec.insert(
            "clusterIPs".into(),
            mesh.addresses.iter().map(|ip| ip.to_string()).collect(),
        );
    }
}

/// A Namespace as `GET` shows it: `status.phase` is `Active`, or
/// `Terminating` while objects with finalizers hold its deletion.
pub fn present_namespace(object: &mut Object) {
    let phase = match object.metadata.deletion_timestamp {
        Some(_) => "Terminating",
        None => "Active",
    };
    object
        .body
        .entry("status")
        .or_insert_with(|| serde_json::json!({"phase": phase}));
}

/// The Endpoints of the Services in `namespace` (every namespace when
/// `None`), or of the one called `name`: one per Service with a selector,
/// as Kubernetes' endpoints controller keeps them, with the Service's
/// labels and creation time.
pub fn endpoints(
    store: &Store,
    snapshot: Option<&Snapshot>,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Result<Vec<Object>, StoreError> {
    let (services, _) = store.list(&Selection::of_kind(
        &service::KIND,
        namespace.map(str::to_string),
    ))?;
    Ok(services
        .iter()
        .filter(|s| name.is_none_or(|n| s.metadata.name() == n))
        .filter(|s| {
            s.body["spec"]["selector"]
                .as_object()
                .is_some_and(|m| !m.is_empty())
        })
        .map(|s| endpoints_of(s, snapshot))
        .collect())
}

fn endpoints_of(service: &Object, snapshot: Option<&Snapshot>) -> Object {
    let namespace = service.metadata.namespace().unwrap_or_default();
    let subsets = snapshot
        .and_then(|s| s.kubernetes_service(namespace, service.metadata.name()))
        .map(endpoint_subsets)
        .filter(|subsets| !subsets.is_empty());
    let body = serde_json::to_value(Endpoints { subsets }).unwrap_or_default();
    Object {
        api_version: endpoints::KIND.preferred_api_version(),
        kind: endpoints::KIND.kind.into(),
        metadata: ObjectMeta {
            name: service.metadata.name.clone(),
            namespace: service.metadata.namespace.clone(),
            labels: service.metadata.labels.clone(),
            creation_timestamp: service.metadata.creation_timestamp.clone(),
            ..ObjectMeta::default()
        },
        body: match body {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        },
    }
}
