//! The OpenAPI v3 documents of the API, as Kubernetes serves them:
//! `/openapi/v3` lists a document per group-version, and each document
//! holds the paths of its kinds (with the `x-kubernetes-group-version-kind`
//! and the query parameters kubectl looks for before it leaves validation
//! to the server: `fieldValidation`, `dryRun`, `fieldManager`) and the
//! schemas of its kinds, generated from the types the server decodes with
//! (`vmesh_api::KindInfo::body_schema`), so `kubectl explain` shows what
//! the server accepts.
//!
//! Not here: discovery ([`super::kube_discovery`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use vmesh_api::KindInfo;

/// The documents by group-version path (`api/v1`, `apis/{group}/{version}`).
fn documents() -> &'static BTreeMap<String, Value> {
    static DOCUMENTS: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    DOCUMENTS.get_or_init(|| {
        let mut by_group_version: BTreeMap<String, Vec<(&'static KindInfo, &'static str, bool)>> =
            BTreeMap::new();
        let kinds = vmesh_api::kinds().iter().map(|&k| (k, false));
        let views = vmesh_api::views().iter().map(|&k| (k, true));
        for (info, view) in kinds.chain(views) {
            for version in info.versions {
                by_group_version
                    .entry(group_version_path(info.group, version))
                    .or_default()
                    .push((info, version, view));
            }
        }
        by_group_version
            .into_iter()
            .map(|(path, kinds)| {
                let document = document(&kinds);
                (path, document)
            })
            .collect()
    })
}

fn group_version_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `GET /openapi/v3`: where each group-version's document is.
pub fn index() -> Response {
    let paths: Map<String, Value> = documents()
        .iter()
        .map(|(path, document)| {
            let hash = hex(&Sha256::digest(document.to_string().as_bytes()));
            (
                path.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", &hash[..32])}),
            )
        })
        .collect();
    Json(json!({"paths": paths})).into_response()
}

/// `GET /openapi/v3/{api/v1 | apis/group/version}`.
pub fn document_at(path: &str) -> Response {
    match documents().get(path.trim_matches('/')) {
        Some(document) => Json(document).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("no OpenAPI document for {path}"), "reason": "NotFound", "code": 404,
            })),
        )
            .into_response(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of a kind's schema, as Kubernetes names them: the group
/// reversed (`io.istio.networking`), or `io.k8s.api.core` for the core group.
fn schema_name(info: &KindInfo, version: &str) -> String {
    let group = if info.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        info.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{version}.{}", info.kind)
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

fn document(kinds: &[(&'static KindInfo, &'static str, bool)]) -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let mut schemas = Map::new();
    let mut meta = <vmesh_api::ObjectMeta as schemars::JsonSchema>::json_schema(&mut generator);
    for transform in generator.transforms_mut() {
        transform.transform(&mut meta);
    }
    let mut paths = Map::new();
    for &(info, version, view) in kinds {
        let name = schema_name(info, version);
        let gvk = json!({"group": info.group, "version": version, "kind": info.kind});
        let mut body = info.body_schema(&mut generator);
        for transform in generator.transforms_mut() {
            transform.transform(&mut body);
        }
        let mut properties = Map::new();
        properties.insert(
            "apiVersion".into(),
            json!({"type": "string", "description": "The versioned schema of this object."}),
        );
        properties.insert(
            "kind".into(),
            json!({"type": "string", "description": "The kind of this object."}),
        );
        properties.insert(
            "metadata".into(),
            json!({"$ref": format!("#/components/schemas/{OBJECT_META}"), "description": "Standard object's metadata."}),
        );
        if let Some(own) = body.get("properties").and_then(Value::as_object) {
            properties.extend(own.clone());
        }
        let schema = json!({
            "type": "object",
            "description": format!("{} ({}).", info.kind, info.api_version(version)),
            "properties": properties,
            "x-kubernetes-group-version-kind": [gvk],
        });
        schemas.insert(name.clone(), schema);
        add_paths(&mut paths, info, version, view, &name, &gvk);
    }
    schemas.extend(generator.take_definitions(true));
    schemas.insert(OBJECT_META.into(), meta.to_value());
    json!({
        "openapi": "3.0.0",
        "info": {"title": "vmesh", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

fn query(name: &str, description: &str, kind: &str) -> Value {
    json!({
        "name": name,
        "in": "query",
        "description": description,
        "schema": {"type": kind, "uniqueItems": true},
    })
}

fn write_parameters() -> Vec<Value> {
    vec![
        query(
            "dryRun",
            "All: every check of the write, nothing written.",
            "string",
        ),
        query(
            "fieldManager",
            "The name of the actor making the change.",
            "string",
        ),
        query(
            "fieldValidation",
            "Unknown or duplicate fields are always refused (Strict).",
            "string",
        ),
    ]
}

fn add_paths(
    paths: &mut Map<String, Value>,
    info: &KindInfo,
    version: &str,
    view: bool,
    schema: &str,
    gvk: &Value,
) {
    let base = format!("/{}", group_version_path(info.group, version));
    let scoped = if info.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", info.plural)
    } else {
        format!("{base}/{}", info.plural)
    };
    let object = json!({"$ref": format!("#/components/schemas/{schema}")});
    let operation = |action: &str, description: &str, parameters: Vec<Value>| {
        json!({
            "description": description,
            "operationId": format!("{action}{}", info.kind),
            "parameters": parameters,
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": object}}}},
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk,
        })
    };
    let path_parameter = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}});
    let mut shared = Vec::new();
    if info.namespaced {
        shared.push(path_parameter("namespace"));
    }
    let mut collection = json!({"parameters": shared.clone()});
    collection["get"] = operation("list", &format!("list or watch {}", info.plural), vec![]);
    let item_parameters = [shared.clone(), vec![path_parameter("name")]].concat();
    let mut item = json!({ "parameters": item_parameters });
    item["get"] = operation("get", &format!("read the specified {}", info.kind), vec![]);
    if !view {
        let mut create = operation(
            "post",
            &format!("create a {}", info.kind),
            write_parameters(),
        );
        create["requestBody"] = json!({"content": {"application/json": {"schema": object}}});
        collection["post"] = create;
        collection["delete"] = operation(
            "deletecollection",
            &format!("delete a collection of {}", info.plural),
            vec![query("dryRun", "All: nothing deleted.", "string")],
        );
        let mut replace = operation(
            "put",
            &format!("replace the specified {}", info.kind),
            write_parameters(),
        );
        replace["requestBody"] = json!({"content": {"application/json": {"schema": object}}});
        item["put"] = replace;
        let mut patch_parameters = write_parameters();
        patch_parameters.push(query(
            "force",
            "Server-side apply takes the fields other managers own.",
            "boolean",
        ));
        let mut patch = operation(
            "patch",
            &format!("partially update the specified {}", info.kind),
            patch_parameters,
        );
        let any_object = json!({"schema": {"type": "object"}});
        patch["requestBody"] = json!({"content": {
            "application/json-patch+json": any_object,
            "application/merge-patch+json": any_object,
            "application/strategic-merge-patch+json": any_object,
            "application/apply-patch+yaml": any_object,
        }});
        item["patch"] = patch;
        item["delete"] = operation(
            "delete",
            &format!("delete the specified {}", info.kind),
            vec![query("dryRun", "All: nothing deleted.", "string")],
        );
    }
    paths.insert(scoped.clone(), collection);
    paths.insert(format!("{scoped}/{{name}}"), item);
    if info.namespaced {
        let mut everywhere = json!({"parameters": []});
        everywhere["get"] = operation(
            "list",
            &format!("list or watch {} of every namespace", info.plural),
            vec![],
        );
        paths.insert(format!("{base}/{}", info.plural), everywhere);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_a_schema_and_a_patch_kubectl_can_validate_through() {
        let document = &documents()["apis/networking.istio.io/v1"];
        let schemas = document["components"]["schemas"].as_object().unwrap();
        let entry = &schemas["io.istio.networking.v1.WorkloadEntry"];
        assert_eq!(
            entry["x-kubernetes-group-version-kind"][0]["kind"],
            "WorkloadEntry"
        );
        // The spec's fields are the decoder's.
        let spec = entry["properties"]["spec"]["$ref"].as_str().unwrap();
        let spec = &schemas[spec.trim_start_matches("#/components/schemas/")];
        for field in ["address", "labels", "serviceAccount", "network"] {
            assert!(spec["properties"].get(field).is_some(), "{field}: {spec}");
        }
        assert!(schemas.contains_key(OBJECT_META));
        let patch = &document["paths"]["/apis/networking.istio.io/v1/namespaces/{namespace}/workloadentries/{name}"]
            ["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "WorkloadEntry"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation" && p["in"] == "query")
        );
        // Every $ref resolves within the document.
        let text = document.to_string();
        for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
    }

    #[test]
    fn the_index_points_at_every_group_version() {
        let response = index();
        let body =
            futures::executor::block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
                .unwrap();
        let index: Value = serde_json::from_slice(&body).unwrap();
        for path in [
            "api/v1",
            "apis/networking.istio.io/v1",
            "apis/security.istio.io/v1",
        ] {
            let url = index["paths"][path]["serverRelativeURL"].as_str().unwrap();
            assert!(
                url.starts_with(&format!("/openapi/v3/{path}?hash=")),
                "{url}"
            );
        }
    }
}
