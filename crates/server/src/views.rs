//! What Kubernetes fills in and vmesh computes from the mesh instead of
//! storing: a Service's `type` and cluster IP as `GET` shows them
//! ([`present_service`]), a Namespace's phase ([`present_namespace`]), and
//! the Endpoints and EndpointSlices of every Service ([`computed`], served
//! read-only at `/api/v1/[namespaces/{ns}/]endpoints[/{name}]` and
//! `/apis/discovery.k8s.io/v1/[namespaces/{ns}/]endpointslices[/{name}]`).
//!
//! Both come from the registry snapshot the mesh controller last published
//! (`vmesh_registry::kube_view`), so they show what the proxies are sent;
//! right after a change they lag it by the controller's debounce (at most a
//! second). Nothing here is written to the store: a Service reads back as
//! applied plus these fields, as Kubernetes shows allocated addresses.

use serde_json::Value;
use vmesh_api::kinds::endpoint_slice::{self, EndpointSlice};
use vmesh_api::kinds::endpoints::{self, Endpoints};
use vmesh_api::kinds::service;
use vmesh_api::{KindInfo, Object, ObjectMeta};
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

/// The objects of a computed kind (`view`: Endpoints or EndpointSlice)
/// in `namespace` (every namespace when `None`): one Endpoints per Service
/// with a selector, as Kubernetes' endpoints controller keeps them, with
/// the Service's labels and creation time; its EndpointSlices, one per
/// address family and port set, labelled with the Service's name.
pub fn computed(
    view: &KindInfo,
    store: &Store,
    snapshot: Option<&Snapshot>,
    namespace: Option<&str>,
) -> Result<Vec<Object>, StoreError> {
    let (services, _) = store.list(&Selection::of_kind(
        &service::KIND,
        namespace.map(str::to_string),
    ))?;
    let selecting = services.iter().filter(|s| {
        s.body["spec"]["selector"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
    });
    let mut objects = Vec::new();
    for service in selecting {
        let namespace = service.metadata.namespace().unwrap_or_default();
        let subsets = snapshot
            .and_then(|s| s.kubernetes_service(namespace, service.metadata.name()))
            .map(endpoint_subsets)
            .unwrap_or_default();
        if std::ptr::eq(view, &endpoints::KIND) {
            let subsets = (!subsets.is_empty()).then_some(subsets);
            objects.push(view_object(
                view,
                service,
                service.metadata.name().to_string(),
                service.metadata.labels.clone(),
                &Endpoints { subsets },
            ));
            continue;
        }
        let mut labels = service.metadata.labels.clone().unwrap_or_default();
        labels.insert(
            endpoint_slice::SERVICE_NAME_LABEL.into(),
            service.metadata.name().into(),
        );
        labels.insert(endpoint_slice::MANAGED_BY_LABEL.into(), "vmesh".into());
        let mut taken: Vec<String> = Vec::new();
        for slice in EndpointSlice::from_subsets(&subsets) {
            let base = format!(
                "{}-{}",
                service.metadata.name(),
                slice.address_type.to_ascii_lowercase()
            );
            let name = match taken.iter().filter(|n| n.starts_with(&base)).count() {
                0 => base,
                n => format!("{base}-{n}"),
            };
            taken.push(name.clone());
            objects.push(view_object(
                view,
                service,
                name,
                Some(labels.clone()),
                &slice,
            ));
        }
    }
    Ok(objects)
}

/// An object of a computed kind for `service`, named `name`.
fn view_object(
    view: &KindInfo,
    service: &Object,
    name: String,
    labels: Option<std::collections::BTreeMap<String, String>>,
    body: &impl serde::Serialize,
) -> Object {
    let body = serde_json::to_value(body).unwrap_or_default();
    Object {
        api_version: view.preferred_api_version(),
        kind: view.kind.into(),
        metadata: ObjectMeta {
            name: Some(name),
            namespace: service.metadata.namespace.clone(),
            labels,
            creation_timestamp: service.metadata.creation_timestamp.clone(),
            ..ObjectMeta::default()
        },
        body: match body {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        },
    }
}
