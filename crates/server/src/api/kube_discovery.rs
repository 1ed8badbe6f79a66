//! Kubernetes API discovery, so that kubectl, client-go and kube-rs find
//! what this API serves: `/version`, the legacy documents (`/api`,
//! `/api/v1`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}`) and the
//! aggregated form (`apidiscovery.k8s.io/v2`) that kubectl asks for first.
//! What each kind is called (plural, singular, short names, categories) and
//! which verbs it takes comes from the kind registry (`vmesh_api::kinds`,
//! `views`); this module only writes it down in Kubernetes' shapes.
//!
//! Not here: the OpenAPI documents ([`super::openapi`]) and the resources
//! themselves.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use vmesh_api::KindInfo;

/// The Kubernetes release whose API this one follows, as `/version` tells
/// clients (kubectl warns when it is far from its own).
const KUBERNETES_MAJOR: &str = "1";
const KUBERNETES_MINOR: &str = "32";

/// The media type of aggregated discovery, as clients ask for it and as
/// the answer must be labelled for them to take it.
const AGGREGATED_V2: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Verbs of a stored kind, in the order Kubernetes lists them.
const STORED_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
/// Verbs of a kind computed from the mesh (Endpoints).
const VIEW_VERBS: &[&str] = &["get", "list"];
/// Verbs of a `status` subresource.
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

/// `GET /version`.
pub fn version() -> Response {
    axum::Json(json!({
        "major": KUBERNETES_MAJOR,
        "minor": KUBERNETES_MINOR,
        "gitVersion": format!("v{KUBERNETES_MAJOR}.{KUBERNETES_MINOR}.0-vmesh.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }),
    }))
    .into_response()
}

/// A served kind with what discovery says of it.
#[derive(Clone, Copy)]
struct Served {
    info: &'static KindInfo,
    /// Computed from the mesh, read-only.
    view: bool,
}

impl Served {
    fn all() -> impl Iterator<Item = Served> {
        vmesh_api::kinds()
            .iter()
            .map(|&info| Served { info, view: false })
            .chain(
                vmesh_api::views()
                    .iter()
                    .map(|&info| Served { info, view: true }),
            )
    }

    fn verbs(&self) -> &'static [&'static str] {
        if self.view { VIEW_VERBS } else { STORED_VERBS }
    }

    fn singular(&self) -> String {
        self.info.kind.to_ascii_lowercase()
    }
}

/// Whether a stored kind has a `status` subresource, as it has in Istio's
/// CRDs (every Istio kind but IstioOperator's, whose status the operator
/// writes).
pub fn has_status(info: &KindInfo) -> bool {
    info.group.ends_with(".istio.io") && info.group != "install.istio.io"
}

/// The groups served, each with its versions (preferred first).
fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut groups: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for served in Served::all() {
        let info = served.info;
        let entry = match groups.iter_mut().find(|(g, _)| *g == info.group) {
            Some(entry) => entry,
            None => {
                groups.push((info.group, Vec::new()));
                groups.last_mut().expect("just pushed")
            }
        };
        for version in info.versions {
            if !entry.1.contains(version) {
                entry.1.push(version);
            }
        }
    }
    groups
}

fn kinds_in(group: &str, version: &str) -> impl Iterator<Item = Served> {
    Served::all().filter(move |s| s.info.group == group && s.info.versions.contains(&version))
}

fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// A discovery path's answer: `rest` is the path's segments after the
/// leading `api` or `apis` (so `[]` for `/apis`, `[group]`, `[group,
/// version]`, or `[version]` under `/api`). `None` when the path is not
/// one of discovery's.
pub fn answer(core: bool, rest: &[&str], headers: &HeaderMap) -> Option<Response> {
    let aggregated = wants_aggregated(headers);
    match (core, rest) {
        (true, []) if aggregated => Some(aggregated_list(true)),
        (false, []) if aggregated => Some(aggregated_list(false)),
        (true, []) => Some(
            axum::Json(json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [],
            }))
            .into_response(),
        ),
        (false, []) => Some(
            axum::Json(json!({
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": groups()
                    .into_iter()
                    .filter(|(g, _)| !g.is_empty())
                    .map(|(g, versions)| api_group(g, &versions))
                    .collect::<Vec<_>>(),
            }))
            .into_response(),
        ),
        (true, [version]) => resource_list("", version),
        (false, [group]) => {
            let (group, versions) = groups().into_iter().find(|(g, _)| g == group)?;
            let mut body = api_group(group, &versions);
            body["kind"] = "APIGroup".into();
            body["apiVersion"] = "v1".into();
            Some(axum::Json(body).into_response())
        }
        (false, [group, version]) => resource_list(group, version),
        _ => None,
    }
}

/// Whether the client takes aggregated discovery (kubectl and client-go
/// ask for it first, with plain JSON as the fallback).
fn wants_aggregated(headers: &HeaderMap) -> bool {
    super::accepted(headers).iter().any(|parts| {
        let has = |part: &str| parts.iter().any(|p| p == part);
        has("g=apidiscovery.k8s.io") && has("v=v2") && has("as=APIGroupDiscoveryList")
    })
}

fn api_group(group: &str, versions: &[&str]) -> Value {
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": group_version(group, v), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": entries,
        "preferredVersion": entries[0],
    })
}

fn resource_list(group: &str, version: &str) -> Option<Response> {
    let mut resources = Vec::new();
    for served in kinds_in(group, version) {
        let info = served.info;
        resources.push(json!({
            "name": info.plural,
            "singularName": served.singular(),
            "namespaced": info.namespaced,
            "kind": info.kind,
            "verbs": served.verbs(),
            "shortNames": info.short_names,
            "categories": categories(info),
        }));
        if !served.view && has_status(info) {
            resources.push(json!({
                "name": format!("{}/status", info.plural),
                "singularName": "",
                "namespaced": info.namespaced,
                "kind": info.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    Some(
        axum::Json(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version(group, version),
            "resources": resources,
        }))
        .into_response(),
    )
}

/// The categories a kind belongs to (`kubectl get istio-io`, `kubectl get all`),
/// as Istio's CRDs and Kubernetes give them.
pub fn categories(info: &KindInfo) -> Vec<String> {
    if has_status(info) {
        vec!["istio-io".into(), info.group.replace('.', "-")]
    } else if info.group.is_empty() && info.kind == "Service" {
        vec!["all".into()]
    } else {
        Vec::new()
    }
}

fn aggregated_list(core: bool) -> Response {
    let items: Vec<Value> = groups()
        .into_iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|version| {
                    let resources: Vec<Value> = kinds_in(group, version)
                        .map(|served| aggregated_resource(served, group, version))
                        .collect();
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            let mut metadata = json!({"creationTimestamp": null});
            if !core {
                metadata["name"] = group.into();
            }
            json!({"metadata": metadata, "versions": versions})
        })
        .collect();
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, AGGREGATED_V2)],
        body.to_string(),
    )
        .into_response()
}

fn aggregated_resource(served: Served, group: &str, version: &str) -> Value {
    let info = served.info;
    let response_kind = json!({"group": group, "version": version, "kind": info.kind});
    let mut resource = json!({
        "resource": info.plural,
        "responseKind": response_kind,
        "scope": if info.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": served.singular(),
        "verbs": served.verbs(),
    });
    if !info.short_names.is_empty() {
        resource["shortNames"] = json!(info.short_names);
    }
    let categories = categories(info);
    if !categories.is_empty() {
        resource["categories"] = json!(categories);
    }
    if !served.view && has_status(info) {
        resource["subresources"] = json!([{
            "subresource": "status",
            "responseKind": response_kind,
            "verbs": STATUS_VERBS,
        }]);
    }
    resource
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(response: Response) -> (String, Value) {
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes =
            futures::executor::block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
                .unwrap();
        (content_type, serde_json::from_slice(&bytes).unwrap())
    }

    fn aggregated_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
                .parse()
                .unwrap(),
        );
        headers
    }

    #[test]
    fn aggregated_discovery_names_every_kind_with_its_short_names() {
        let (content_type, apis) = body(answer(false, &[], &aggregated_headers()).unwrap());
        assert_eq!(content_type, AGGREGATED_V2);
        let networking = apis["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["metadata"]["name"] == "networking.istio.io")
            .unwrap();
        assert_eq!(networking["versions"][0]["version"], "v1");
        let entries = networking["versions"][0]["resources"].as_array().unwrap();
        let we = entries
            .iter()
            .find(|r| r["resource"] == "workloadentries")
            .unwrap();
        assert_eq!(we["shortNames"], json!(["we"]));
        assert_eq!(we["scope"], "Namespaced");
        assert_eq!(we["categories"], json!(["istio-io", "networking-istio-io"]));
        assert_eq!(we["subresources"][0]["subresource"], "status");

        let (_, core) = body(answer(true, &[], &aggregated_headers()).unwrap());
        let resources = core["items"][0]["versions"][0]["resources"]
            .as_array()
            .unwrap();
        let ns = resources
            .iter()
            .find(|r| r["resource"] == "namespaces")
            .unwrap();
        assert_eq!(ns["scope"], "Cluster");
        let ep = resources
            .iter()
            .find(|r| r["resource"] == "endpoints")
            .unwrap();
        assert_eq!(ep["verbs"], json!(["get", "list"]));
    }

    #[test]
    fn legacy_discovery_lists_groups_and_resources() {
        let plain = HeaderMap::new();
        let (_, apis) = body(answer(false, &[], &plain).unwrap());
        assert_eq!(apis["kind"], "APIGroupList");
        let names: Vec<&str> = apis["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        for group in [
            "networking.istio.io",
            "security.istio.io",
            "telemetry.istio.io",
        ] {
            assert!(names.contains(&group), "{names:?}");
        }
        let (_, v1) = body(answer(true, &["v1"], &plain).unwrap());
        assert_eq!(v1["groupVersion"], "v1");
        let svc = v1["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "services")
            .unwrap();
        assert_eq!(svc["shortNames"], json!(["svc"]));
        assert!(answer(false, &["nothing.example.com", "v1"], &plain).is_none());
    }
}
