//! The Kubernetes-shaped REST API over the store.
//!
//! Paths follow Kubernetes: `/api/v1/namespaces/{ns}/services/{name}`,
//! `/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}`, collections for
//! list and create, `?watch=true` for a stream of newline-delimited events.
//! Errors are Kubernetes `Status` objects. Every write is decoded and validated
//! here: the server never trusts that a client did it. Two extensions:
//! `POST /apis/vmesh.io/v1/apply` applies a list of objects atomically, and
//! `GET /v1/mesh?revision=NAME` answers the mesh settings of a revision
//! ([`MeshSettings`], resolved from the stored IstioOperators by the rule
//! the registry follows), so clients do not work them out again.
//!
//! What Kubernetes computes rather than stores is computed from the mesh
//! ([`crate::views`]): a Service read with `GET` shows its `type` and the
//! cluster IP the mesh gave it, and Endpoints are served read-only at
//! `/api/v1/[namespaces/{ns}/]endpoints[/{name}]`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vmesh_api::mesh::MeshSettings;
use vmesh_api::{KindInfo, Object, ObjectKey, Problem};
use vmesh_store::{BatchError, Op, Outcome, Selection, Store, StoreError};
use vmesh_xds::ads::ConfigSource;

mod kube_discovery;
mod kube_protobuf;
mod openapi;
mod patch;
mod tables;

use patch::PatchKind;

/// The mesh settings, `?revision=NAME` for a revision's.
pub const MESH_PATH: &str = "/v1/mesh";

/// The mesh the controller last published.
pub type MeshWatch = tokio::sync::watch::Receiver<Arc<dyn ConfigSource>>;

#[derive(Clone)]
struct AppState {
    store: Arc<Store>,
    /// Watches end when this turns true, so graceful shutdown can finish.
    shutdown: tokio::sync::watch::Receiver<bool>,
    mesh: MeshWatch,
}

/// The API router over `store` and the published `mesh`, with `extra`
/// routes served alongside; with `token`, every request must carry
/// `Authorization: Bearer <token>`.
pub fn router(
    store: Arc<Store>,
    mesh: MeshWatch,
    token: Option<String>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    extra: Router,
) -> Router {
    let state = AppState {
        store,
        shutdown,
        mesh,
    };
    Router::new()
        .route(
            "/apis/vmesh.io/v1/apply",
            post(apply).layer(axum::extract::DefaultBodyLimit::max(MAX_APPLY_BYTES)),
        )
        .route(MESH_PATH, get(mesh_settings))
        .route(SNAPSHOT_PATH, get(snapshot))
        .route("/api/v1/endpoints", any(view))
        .route("/api/v1/namespaces/{namespace}/endpoints", any(view))
        .route("/api/v1/namespaces/{namespace}/endpoints/{name}", any(view))
        .route("/apis/discovery.k8s.io/v1/endpointslices", any(view))
        .route(
            "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            any(view),
        )
        .route(
            "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}",
            any(view),
        )
        .route("/version", get(|| async { kube_discovery::version() }))
        .route("/openapi/v3", get(|| async { openapi::index() }))
        .route(
            "/openapi/v3/{*path}",
            get(|Path(path): Path<String>| async move { openapi::document_at(&path) }),
        )
        .route("/api", any(resource))
        .route("/apis", any(resource))
        .route("/api/{*rest}", any(resource))
        .route("/apis/{*rest}", any(resource))
        .route("/healthz", any(|| async { "ok" }))
        .fallback(|| async {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "no such path".into(),
                None,
            )
        })
        .with_state(state)
        .merge(extra)
        .layer(middleware::from_fn_with_state(token, authenticate))
}

async fn authenticate(
    State(token): State<Option<String>>,
    request: Request,
    next: Next,
) -> Response {
    use subtle::ConstantTimeEq;
    if let Some(token) = token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
            return status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "a valid bearer token is required".into(),
                None,
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// A request refused with a Kubernetes `Status` body.
#[derive(Debug)]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let ApiError {
            code,
            reason,
            message,
            details,
        } = self;
        let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
        });
        if let Some(details) = details {
            body["details"] = details;
        }
        (code, Json(body)).into_response()
    }
}

fn status(
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Option<Value>,
) -> ApiError {
    ApiError {
        code,
        reason,
        message,
        details,
    }
}

fn store_error(error: StoreError) -> ApiError {
    let message = error.to_string();
    store_error_with_message(&error, message)
}

fn store_error_with_message(error: &StoreError, message: String) -> ApiError {
    let (code, reason) = match error {
        StoreError::NotFound(_) | StoreError::NamespaceNotFound(_) => {
            (StatusCode::NOT_FOUND, "NotFound")
        }
        StoreError::AlreadyExists(_) => (StatusCode::CONFLICT, "AlreadyExists"),
        StoreError::Conflict { .. } => (StatusCode::CONFLICT, "Conflict"),
        StoreError::ProtectedNamespace(_) | StoreError::NamespaceTerminating(_) => {
            (StatusCode::FORBIDDEN, "Forbidden")
        }
        StoreError::Gone(_) => (StatusCode::GONE, "Expired"),
        StoreError::BadResourceVersion(_)
        | StoreError::UnknownKind(_)
        | StoreError::Unsupported(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
        StoreError::Immutable { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid"),
        StoreError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge"),
        StoreError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        StoreError::Backend { .. }
        | StoreError::Damaged { .. }
        | StoreError::InUse(_)
        | StoreError::NoBackup { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
    };
    let details = match error {
        StoreError::NotFound(k)
        | StoreError::AlreadyExists(k)
        | StoreError::Conflict { key: k, .. } => {
            Some(json!({"name": k.name, "group": k.group, "kind": k.plural}))
        }
        _ => None,
    };
    status(code, reason, message, details)
}

/// A store error as the config API answers it, for the server's other
/// HTTP handlers.
pub(crate) fn store_problem(error: &StoreError) -> Response {
    store_error_with_message(error, error.to_string()).into_response()
}

fn invalid(problems: &[Problem]) -> ApiError {
    let errors: Vec<&Problem> = problems.iter().filter(|p| p.is_error()).collect();
    let message = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let causes: Vec<Value> = errors
        .iter()
        .map(|p| json!({"reason": "FieldValueInvalid", "field": p.field, "message": p.message, "object": p.object, "location": format!("{}:{}:{}", p.file, p.line, p.column)}))
        .collect();
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        message,
        Some(json!({"causes": causes})),
    )
}

/// One object refused by validation, as Kubernetes says it (kubectl
/// prints `The WorkloadEntry "vm" is invalid: spec.address: …`).
fn invalid_object(problems: &[Problem], info: &KindInfo, name: &str) -> ApiError {
    let mut error = invalid(problems);
    let qualified = match info.group {
        "" => info.kind.to_string(),
        group => format!("{}.{group}", info.kind),
    };
    error.message = format!("{qualified} {name:?} is invalid: {}", error.message);
    if let Some(details) = error.details.as_mut() {
        details["name"] = name.into();
        details["group"] = info.group.into();
        details["kind"] = info.kind.into();
    }
    error
}

fn bad_request(message: String) -> ApiError {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

/// What a resource path names.
struct Target {
    info: &'static KindInfo,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    /// `…/{name}/status`: the status subresource.
    status: bool,
}

impl Target {
    fn parse(path: &str) -> Result<Target, ApiError> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return Err(not_found_path(path)),
        };
        let (namespace, plural, name, subresource) = match rest {
            [plural] => (None, *plural, None, false),
            [plural, name] => (None, *plural, Some(*name), false),
            [plural, name, "status"] => (None, *plural, Some(*name), true),
            ["namespaces", ns, plural] => (Some(*ns), *plural, None, false),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), false),
            ["namespaces", ns, plural, name, "status"] => (Some(*ns), *plural, Some(*name), true),
            _ => return Err(not_found_path(path)),
        };
        let info = vmesh_api::kinds()
            .iter()
            .copied()
            .find(|k| k.group == group && k.plural == plural && k.versions.contains(&version))
            .ok_or_else(|| {
                status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("the server does not serve {plural} in {group}/{version}"),
                    None,
                )
            })?;
        if subresource && !kube_discovery::has_status(info) {
            return Err(not_found_path(path));
        }
        if !info.namespaced && namespace.is_some() {
            return Err(bad_request(format!("{} is cluster-scoped", info.kind)));
        }
        if info.namespaced && namespace.is_none() && name.is_some() {
            return Err(bad_request(format!(
                "{} is namespaced: use /namespaces/{{ns}}/{plural}/{{name}}",
                info.kind
            )));
        }
        Ok(Target {
            info,
            version: version.to_string(),
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            status: subresource,
        })
    }

    fn key(&self, name: &str) -> ObjectKey {
        ObjectKey {
            group: self.info.group.to_string(),
            plural: self.info.plural.to_string(),
            namespace: self.namespace.clone().unwrap_or_default(),
            name: name.to_string(),
        }
    }

    fn selection(&self) -> Selection {
        let key = self.key("");
        Selection {
            collection: key.collection_prefix(),
            namespace: self.namespace.clone(),
        }
    }
}

fn not_found_path(path: &str) -> ApiError {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("no such path {path}"),
        None,
    )
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    #[serde(default)]
    watch: Option<String>,
    resource_version: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    /// `All`: every check of a write, nothing written.
    dry_run: Option<String>,
    field_manager: Option<String>,
    /// Server-side apply takes fields other managers own.
    force: Option<bool>,
    /// What a Table row carries: `None`, `Metadata` (the default) or `Object`.
    include_object: Option<String>,
    /// A watch sends `BOOKMARK` events with the resourceVersion it has
    /// reached while nothing else happens.
    allow_watch_bookmarks: Option<bool>,
}

/// How the objects of one path are shown: in the path's apiVersion, and
/// Services with the cluster IP the mesh gave them.
#[derive(Clone)]
struct Presenter {
    info: &'static KindInfo,
    version: String,
    mesh: Arc<dyn ConfigSource>,
}

impl Presenter {
    fn present(&self, mut object: Object) -> Object {
        object.api_version = self.info.api_version(&self.version);
        if std::ptr::eq(self.info, &vmesh_api::kinds::service::KIND) {
            crate::views::present_service(&mut object, self.mesh.snapshot());
        } else if std::ptr::eq(self.info, &vmesh_api::kinds::namespace::KIND) {
            crate::views::present_namespace(&mut object);
        }
        object
    }
}

/// Where a list page ends, as Kubernetes writes it: base64 of
/// `{"v":"meta.k8s.io/v1","rv":N,"start":"<key>"}`. The next page starts
/// after `start` in the current state (there is no reading at an old
/// revision here), so an object changed between pages shows at its new
/// version, and none is listed twice.
#[derive(Debug, Serialize, Deserialize)]
struct Continue {
    v: String,
    rv: u64,
    start: String,
}

impl Continue {
    fn encode(revision: u64, key: &str) -> String {
        use base64::Engine;
        let token = Continue {
            v: "meta.k8s.io/v1".into(),
            rv: revision,
            start: key.to_string(),
        };
        base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&token).expect("a continue token serialises"))
    }

    /// The storage key to continue after, if `token` is one of this list's.
    fn decode(token: &str, selection: &Selection) -> Result<String, ApiError> {
        use base64::Engine;
        let invalid = || {
            bad_request(format!(
                "continue {token:?} is not a continue token of this list"
            ))
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|_| invalid())?;
        let decoded: Continue = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if decoded.v != "meta.k8s.io/v1" || !selection.holds_key(&decoded.start) {
            return Err(invalid());
        }
        Ok(decoded.start)
    }
}

/// How many encoded items go out in one chunk of a list body.
const LIST_CHUNK_BYTES: usize = 256 << 10;

/// The largest request body of a single-object write: room for the
/// largest object the store keeps (`vmesh_store::MAX_OBJECT_BYTES`) in JSON
/// however it is laid out; larger bodies are refused before they are read.
const MAX_BODY_BYTES: usize = 3 << 20;
/// The largest apply list.
const MAX_APPLY_BYTES: usize = 8 << 20;

/// A request body that could not be read: 413 when it is too large.
fn body_error(error: axum::Error) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                None,
            );
        }
        source = e.source();
    }
    bad_request(format!("cannot read the request body: {error}"))
}

async fn resource(
    State(state): State<AppState>,
    method: Method,
    Query(params): Query<Params>,
    request: Request,
) -> Result<Response, ApiError> {
    let path = request.uri().path().to_string();
    if method == Method::GET
        && let Some(response) = discovery(&path, request.headers())
    {
        return Ok(response);
    }
    let target = Target::parse(&path)?;
    let headers = request.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(body_error)?;
    let store = state.store;
    let shutdown = state.shutdown;
    let watching = params
        .watch
        .as_deref()
        .is_some_and(|w| w == "true" || w == "1");
    let presenter = Presenter {
        info: target.info,
        version: target.version.clone(),
        mesh: state.mesh.borrow().clone(),
    };
    let table = tables::wants_table(&headers);
    let write = WriteOptions {
        dry_run: match params.dry_run.as_deref() {
            None | Some("") => false,
            Some("All") => true,
            Some(other) => {
                return Err(bad_request(format!(
                    "dryRun {other:?} is not supported: only All"
                )));
            }
        },
        manager: patch::manager_of(
            params.field_manager.as_deref(),
            headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok()),
        ),
        api_version: target.info.api_version(&target.version),
    };
    match (method, target.name.clone()) {
        (Method::GET, None) if watching => watch(
            store,
            target.selection(),
            presenter.clone(),
            &params,
            table,
            shutdown,
        ),
        (Method::GET, None) if table => {
            tables::list(store, &target, presenter.clone(), &params).await
        }
        (Method::GET, None) => list(store, &target, presenter.clone(), &params).await,
        (Method::GET, Some(name)) => match store.get(&target.key(&name))? {
            Some(object) if table => Ok(tables::one(
                target.info,
                &presenter.present(object),
                params.include_object.as_deref(),
            )),
            Some(object) => Ok(Json(presenter.present(object)).into_response()),
            None => Err(StoreError::NotFound(Box::new(target.key(&name))).into()),
        },
        (Method::POST, None) => {
            let value = request_object(&content_type, &body)?;
            write_value(&store, &target, value, None, &write, &presenter)
        }
        (Method::PUT, Some(name)) => {
            let value = request_object(&content_type, &body)?;
            write_value(&store, &target, value, Some(name), &write, &presenter)
        }
        (Method::PATCH, Some(name)) => {
            let kind = PatchKind::from_content_type(&content_type).ok_or_else(|| {
                status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!(
                        "the patch must be application/merge-patch+json, application/json-patch+json, \
                         application/strategic-merge-patch+json or application/apply-patch+yaml, not {content_type:?}"
                    ),
                    None,
                )
            })?;
            patch_object(
                &store, &target, &name, kind, &body, &params, &write, &presenter,
            )
        }
        (Method::DELETE, Some(name)) => {
            let expected = params.resource_version.clone().filter(|rv| !rv.is_empty());
            let op = Op::Delete {
                key: target.key(&name),
                expected,
            };
            let outcomes = write.commit(&store, op)?;
            Ok(Json(presenter.present(outcomes.object().clone())).into_response())
        }
        (Method::DELETE, None) => delete_collection(&store, &target, &params, &write, &presenter),
        (method, _) => Err(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not allowed on {path}"),
            None,
        )),
    }
}

/// The discovery document a `GET` path asks for, if it is one
/// (`/api`, `/api/v1`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}`).
fn discovery(path: &str, headers: &axum::http::HeaderMap) -> Option<Response> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        ["api", rest @ ..] if rest.len() <= 1 => kube_discovery::answer(true, rest, headers),
        ["apis", rest @ ..] if rest.len() <= 2 => kube_discovery::answer(false, rest, headers),
        _ => None,
    }
}

/// How a write is made: for real or as a dry run, and by which field manager.
struct WriteOptions {
    dry_run: bool,
    manager: String,
    api_version: String,
}

impl WriteOptions {
    fn commit(&self, store: &Store, op: Op) -> Result<Outcome, ApiError> {
        let mut outcomes = if self.dry_run {
            store.dry_run(vec![op])?
        } else {
            store.commit(vec![op])?
        };
        Ok(outcomes.remove(0))
    }
}

/// The object a POST or PUT body holds: JSON, or Kubernetes' protobuf
/// (what kubectl sends the core kinds in).
fn request_object(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    if content_type.split(';').next().map(str::trim) == Some(kube_protobuf::MEDIA_TYPE) {
        return kube_protobuf::to_json(body).map_err(|e| bad_request(e.to_string()));
    }
    require_json(content_type)?;
    serde_json::from_slice::<serde_json::Map<String, Value>>(body)
        .map_err(|e| bad_request(format!("the request body is not a JSON object: {e}")))?;
    // Read again by the manifest parser, which refuses what JSON parsers
    // let pass (a key given twice), saying where.
    // serde_json skips the fields it ignores unchecked: the body may still not be UTF-8.
    let text = std::str::from_utf8(body)
        .map_err(|e| bad_request(format!("the request body is not UTF-8: {e}")))?;
    let mut documents = vmesh_api::yaml::parse_documents(text)
        .map_err(|e| invalid(&[vmesh_api::decode::syntax_problem("request body", &e)]))?;
    Ok(documents.remove(0).value)
}

/// Deletes every object of a collection that the selectors match, in one
/// batch; answers the list of what was deleted.
fn delete_collection(
    store: &Store,
    target: &Target,
    params: &Params,
    write: &WriteOptions,
    presenter: &Presenter,
) -> Result<Response, ApiError> {
    let selectors = parse_selectors(params)?;
    let (objects, _) = store.list(&target.selection())?;
    let ops: Vec<Op> = objects
        .iter()
        .filter(|o| selectors.matches(o))
        .filter_map(|o| o.key())
        .map(|key| Op::Delete {
            key,
            expected: None,
        })
        .collect();
    let outcomes = if ops.is_empty() {
        Vec::new()
    } else if write.dry_run {
        store.dry_run(ops)?
    } else {
        store.commit(ops)?
    };
    let items: Vec<Object> = outcomes
        .iter()
        .map(|o| presenter.present(o.object().clone()))
        .collect();
    Ok(Json(json!({
        "apiVersion": target.info.api_version(&target.version),
        "kind": format!("{}List", target.info.kind),
        "metadata": {},
        "items": items,
    }))
    .into_response())
}

/// How many times a patch is made again when the object changed between
/// reading it and writing the result, before the conflict is answered.
const PATCH_ATTEMPTS: usize = 5;

/// A PATCH of an object (or its status): the patch applied to the stored
/// object, the result validated and written like any write, with the
/// stored resourceVersion as the precondition (made again if another write
/// came between). Server-side apply creates the object when there is none.
#[allow(clippy::too_many_arguments)]
fn patch_object(
    store: &Store,
    target: &Target,
    name: &str,
    kind: PatchKind,
    body: &[u8],
    params: &Params,
    write: &WriteOptions,
    presenter: &Presenter,
) -> Result<Response, ApiError> {
    let applied = match kind {
        PatchKind::Apply => {
            if write.manager == "unknown" && params.field_manager.is_none() {
                return Err(bad_request(
                    "fieldManager is required for apply requests".into(),
                ));
            }
            Some(apply_config(body, target, name)?)
        }
        _ => None,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let live = store.get(&target.key(name))?;
        let live_value = live
            .as_ref()
            .map(|o| serde_json::to_value(o).map_err(internal))
            .transpose()?;
        let mut new = match (&applied, &live_value) {
            (Some(applied), live) => patch::server_side_apply(
                live.as_ref(),
                applied,
                &write.manager,
                &write.api_version,
                params.force.unwrap_or(false),
            )
            .map_err(|conflicts| {
                status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    patch::Conflict::message(&conflicts),
                    Some(json!({
                        "name": name,
                        "kind": target.info.plural,
                        "causes": conflicts.iter().map(|c| json!({
                            "reason": "FieldManagerConflict",
                            "message": format!("conflict with \"{}\"", c.manager),
                            "field": c.field,
                        })).collect::<Vec<_>>(),
                    })),
                )
            })?,
            (None, Some(live)) => {
                let mut new =
                    patch::patch(kind, live, body).map_err(|e| bad_request(e.to_string()))?;
                patch::drop_empty_metadata(&mut new);
                patch::record_update(Some(live), &mut new, &write.manager, &write.api_version);
                new
            }
            (None, None) => {
                return Err(StoreError::NotFound(Box::new(target.key(name))).into());
            }
        };
        // The patch's own resourceVersion is a precondition; else the one read.
        let pinned = new["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|rv| {
                Some(rv)
                    != live_value
                        .as_ref()
                        .and_then(|l| l["metadata"]["resourceVersion"].as_str())
            });
        if !pinned && let Some(live) = &live_value {
            new["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"].clone();
        }
        let name = live.as_ref().map(|_| name.to_string());
        match commit_value(store, target, new, name, write) {
            Err(WriteFailure::Store(StoreError::Conflict { .. }))
                if !pinned && attempt < PATCH_ATTEMPTS => {}
            Err(WriteFailure::Store(e)) => return Err(e.into()),
            Err(WriteFailure::Api(e)) => return Err(e),
            Ok(outcome) => return Ok(written(outcome, presenter)),
        }
    }
}

/// The object a server-side apply body holds (YAML or JSON), which must
/// be the object of the path.
fn apply_config(body: &[u8], target: &Target, name: &str) -> Result<Value, ApiError> {
    let text =
        std::str::from_utf8(body).map_err(|_| bad_request("the apply body is not UTF-8".into()))?;
    let mut documents = vmesh_api::yaml::parse_documents(text)
        .map_err(|e| bad_request(format!("the apply body is not YAML: {e}")))?;
    if documents.len() != 1 || !documents[0].value.is_object() {
        return Err(bad_request("the apply body must be one object".into()));
    }
    let applied = documents.remove(0).value;
    if applied["kind"] != target.info.kind
        || applied["apiVersion"] != target.info.api_version(&target.version)
    {
        return Err(bad_request(format!(
            "the apply body is a {} {}, not a {} of {}",
            applied["apiVersion"],
            applied["kind"],
            target.info.kind,
            target.info.api_version(&target.version)
        )));
    }
    if applied["metadata"]["name"] != name {
        return Err(bad_request(format!(
            "metadata.name {} does not match the name in the path {name:?}",
            applied["metadata"]["name"]
        )));
    }
    Ok(applied)
}

/// Why a write failed: the request (already answered) or the store.
enum WriteFailure {
    Api(ApiError),
    Store(StoreError),
}

impl From<ApiError> for WriteFailure {
    fn from(error: ApiError) -> WriteFailure {
        WriteFailure::Api(error)
    }
}

/// A POST or PUT of a whole object (or a PUT of its status): ownership
/// recorded, then decoded, validated and committed.
fn write_value(
    store: &Store,
    target: &Target,
    mut value: Value,
    name: Option<String>,
    write: &WriteOptions,
    presenter: &Presenter,
) -> Result<Response, ApiError> {
    let old = match &name {
        Some(name) => store
            .get(&target.key(name))?
            .map(|o| serde_json::to_value(o).map_err(internal))
            .transpose()?,
        None => None,
    };
    patch::drop_empty_metadata(&mut value);
    if !target.status {
        patch::record_update(old.as_ref(), &mut value, &write.manager, &write.api_version);
    }
    match commit_value(store, target, value, name, write) {
        Ok(outcome) => Ok(written(outcome, presenter)),
        Err(WriteFailure::Api(e)) => Err(e),
        Err(WriteFailure::Store(e)) => Err(e.into()),
    }
}

/// 201 for a new object, 200 otherwise, with the object as it now is.
fn written(outcome: Outcome, presenter: &Presenter) -> Response {
    let code = if matches!(outcome, Outcome::Created(_)) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (code, Json(presenter.present(outcome.object().clone()))).into_response()
}

/// Decodes and validates `value` as the object of `target`, then creates
/// it (no `name`), replaces it, or sets its status.
fn commit_value(
    store: &Store,
    target: &Target,
    value: Value,
    name: Option<String>,
    write: &WriteOptions,
) -> Result<Outcome, WriteFailure> {
    let text = value.to_string();
    let default_ns = target.namespace.as_deref().unwrap_or("default");
    let decoded = vmesh_api::decode::decode_sources([("request body", text.as_str())], default_ns);
    if decoded.has_errors() {
        let name = value["metadata"]["name"].as_str().unwrap_or_default();
        return Err(invalid_object(&decoded.problems, target.info, name).into());
    }
    let object = decoded
        .objects
        .into_iter()
        .next()
        .ok_or_else(|| bad_request("the request body holds no object".into()))?
        .object;
    if object.info().map(|i| i.plural) != Some(target.info.plural) {
        return Err(bad_request(format!(
            "a {} cannot be written to {}",
            object.kind, target.info.plural
        ))
        .into());
    }
    if object.metadata.namespace != target.namespace {
        return Err(bad_request(format!(
            "metadata.namespace {:?} does not match the namespace in the path {:?}",
            object.metadata.namespace, target.namespace
        ))
        .into());
    }
    if let Some(name) = &name
        && object.metadata.name() != name
    {
        return Err(bad_request(format!(
            "metadata.name {:?} does not match the name in the path {name:?}",
            object.metadata.name()
        ))
        .into());
    }
    let op = match (name.is_some(), target.status) {
        (_, true) => Op::SetStatus(object),
        (true, false) => Op::Update(object),
        (false, false) => Op::Create(object),
    };
    let result = if write.dry_run {
        store.dry_run(vec![op])
    } else {
        store.commit(vec![op])
    };
    result
        .map(|mut outcomes| outcomes.remove(0))
        .map_err(|e| WriteFailure::Store(e.error))
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        store_error(error)
    }
}

impl From<BatchError> for ApiError {
    fn from(error: BatchError) -> ApiError {
        store_error(error.error)
    }
}

/// What one page of a list holds: the objects of the path that the
/// selectors match, after the `continue` point, at most `limit`.
struct Page {
    selectors: vmesh_api::selection::Selectors,
    selection: Selection,
    after: Option<String>,
    limit: Option<usize>,
}

impl Page {
    fn of(target: &Target, params: &Params) -> Result<Page, ApiError> {
        let selection = target.selection();
        let after = params
            .continue_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(|token| Continue::decode(token, &selection))
            .transpose()?;
        Ok(Page {
            selectors: parse_selectors(params)?,
            selection,
            after,
            limit: params.limit.filter(|l| *l > 0),
        })
    }
}

/// The media types an `Accept` header lists, each as its `;`-separated
/// parts, trimmed.
fn accepted(headers: &axum::http::HeaderMap) -> Vec<Vec<String>> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|media| media.split(';').map(|p| p.trim().to_string()).collect())
        .collect()
}

/// A list, Kubernetes' way: label and field selectors, `limit` with a
/// `continue` token for the next page. The body is written as the store is
/// read, from one snapshot on a blocking thread, so a list of any size
/// holds about one chunk in memory; its `metadata` comes last, once the
/// continue point is known.
async fn list(
    store: Arc<Store>,
    target: &Target,
    presenter: Presenter,
    params: &Params,
) -> Result<Response, ApiError> {
    let Page {
        selectors,
        selection,
        after,
        limit,
    } = Page::of(target, params)?;
    let head = format!(
        "{{\"apiVersion\":{},\"kind\":{},\"items\":[",
        Value::String(target.info.api_version(&target.version)),
        Value::String(format!("{}List", target.info.kind)),
    );
    let (chunks, mut body) = tokio::sync::mpsc::channel::<Result<Bytes, StoreError>>(4);
    tokio::task::spawn_blocking(move || {
        let mut chunk = head.into_bytes();
        let (mut count, mut last_key, mut more) = (0usize, String::new(), false);
        let mut gone = false;
        let scanned = store.scan(&selection, after.as_deref(), |key, object| {
            if limit.is_some_and(|limit| count == limit) {
                more = true;
                return false;
            }
            if !selectors.matches(&object) {
                return true;
            }
            if count > 0 {
                chunk.push(b',');
            }
            serde_json::to_writer(&mut chunk, &presenter.present(object))
                .expect("an object serialises");
            count += 1;
            last_key = key.to_string();
            if chunk.len() >= LIST_CHUNK_BYTES {
                let full = std::mem::take(&mut chunk);
                gone = !send_from_blocking(&chunks, Ok(Bytes::from(full)));
            }
            !gone
        });
        let revision = match scanned {
            Ok(revision) => revision,
            Err(e) => {
                let _ = send_from_blocking(&chunks, Err(e));
                return;
            }
        };
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if more {
            metadata["continue"] = Value::String(Continue::encode(revision, &last_key));
        }
        chunk.extend_from_slice(format!("],\"metadata\":{metadata}}}").as_bytes());
        let _ = send_from_blocking(&chunks, Ok(Bytes::from(chunk)));
    });
    // The first chunk tells whether the store could be read at all.
    let first = match body.recv().await {
        Some(Ok(bytes)) => bytes,
        Some(Err(e)) => return Err(e.into()),
        None => return Err(bad_request("the list ended before it began".into())),
    };
    let rest = tokio_stream::wrappers::ReceiverStream::new(body)
        .map(|next| next.map_err(std::io::Error::other));
    streamed_json(futures::stream::once(async move { Ok(first) }).chain(rest))
}

/// A JSON response whose body is written as `stream` yields it.
fn streamed_json(
    stream: impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Result<Response, ApiError> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .map_err(internal)
}

/// A failure of the server's own, not the request's.
fn internal(error: impl std::fmt::Display) -> ApiError {
    status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        error.to_string(),
        None,
    )
}

/// `GET` of a computed kind (Endpoints, EndpointSlices), one or a list
/// (with label and field selectors, as a Table when asked), computed from
/// the mesh; anything else is refused: they are not stored.
async fn view(
    State(state): State<AppState>,
    method: Method,
    Path(path): Path<std::collections::HashMap<String, String>>,
    Query(params): Query<Params>,
    request: Request,
) -> Result<Response, ApiError> {
    let plural = request
        .uri()
        .path()
        .trim_end_matches('/')
        .rsplit('/')
        .nth(usize::from(path.contains_key("name")))
        .unwrap_or_default()
        .to_string();
    let info = vmesh_api::views()
        .iter()
        .copied()
        .find(|v| v.plural == plural)
        .ok_or_else(|| not_found_path(request.uri().path()))?;
    if method != Method::GET {
        return Err(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!(
                "{} are computed from the workloads each Service selects; they cannot be written",
                info.plural
            ),
            None,
        ));
    }
    let table = tables::wants_table(request.headers());
    let (namespace, name) = (path.get("namespace"), path.get("name"));
    let selectors = parse_selectors(&params)?;
    let mesh = state.mesh.borrow().clone();
    let objects: Vec<Object> = crate::views::computed(
        info,
        &state.store,
        mesh.snapshot(),
        namespace.map(String::as_str),
    )?
    .into_iter()
    .filter(|o| name.is_none_or(|n| o.metadata.name() == n))
    .filter(|o| selectors.matches(o))
    .collect();
    let include = params.include_object.as_deref();
    match name {
        Some(name) => match objects.into_iter().next() {
            Some(object) if table => Ok(tables::one(info, &object, include)),
            Some(object) => Ok(Json(object).into_response()),
            None => Err(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", info.plural),
                Some(json!({"name": name, "group": info.group, "kind": info.plural})),
            )),
        },
        None if table => Ok(tables::many(info, &objects, include)),
        None => Ok(Json(json!({
            "apiVersion": info.preferred_api_version(),
            "kind": format!("{}List", info.kind),
            "metadata": {},
            "items": objects,
        }))
        .into_response()),
    }
}

/// A watch, Kubernetes' way: from a resourceVersion, every change after it
/// (410 Gone if those are no longer kept); from none, the current objects as
/// `ADDED`, streamed from one snapshot, then every change after it. Label and
/// field selectors filter both. A watcher that falls behind the store's
/// history gets a 410 `ERROR` event and the watch ends; one that stops
/// reading holds nothing but its place.
fn watch(
    store: Arc<Store>,
    selection: Selection,
    presenter: Presenter,
    params: &Params,
    table: bool,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<Response, ApiError> {
    let selectors = parse_selectors(params)?;
    let from = params.resource_version.clone();
    let listing = from.as_deref().is_none_or(|rv| rv.is_empty() || rv == "0");
    let mut changes = store.watch(selection.clone(), from.as_deref())?;
    let (info, include) = (presenter.info, params.include_object.clone());
    let bookmarks = params.allow_watch_bookmarks.unwrap_or(false);
    let (kind, api_version) = (info.kind, presenter.info.api_version(&presenter.version));
    // Each event's object, or (`kubectl get -w`) a Table of its one row.
    let line = move |event_type: &str, object: &Object| -> Bytes {
        let object = match table {
            true => tables::one_value(info, object, include.as_deref()),
            false => serde_json::to_value(object).expect("an object serialises"),
        };
        let mut bytes = serde_json::to_vec(&json!({"type": event_type, "object": object}))
            .expect("an event serialises");
        bytes.push(b'\n');
        Bytes::from(bytes)
    };
    let stream = async_stream(move |tx| async move {
        if listing {
            let (selectors, presenter, tx) = (selectors.clone(), presenter.clone(), tx.clone());
            let line = line.clone();
            let listed = tokio::task::spawn_blocking(move || {
                store.scan(&selection, None, |_, object| {
                    !selectors.matches(&object)
                        || send_from_blocking(&tx, Ok(line("ADDED", &presenter.present(object))))
                })
            })
            .await;
            match listed {
                Ok(Ok(revision)) => changes.skip_to(revision),
                _ => return,
            }
        }
        loop {
            let next = tokio::select! {
                event = changes.next() => Some(event),
                _ = shutdown.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(BOOKMARK_AFTER), if bookmarks => None,
            };
            let Some(event) = next else {
                // Every change up to here has been sent or filtered out: a
                // watch resumed from this version misses nothing.
                let bookmark = json!({"type": "BOOKMARK", "object": {
                    "kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": changes.revision().to_string()},
                }});
                if tx
                    .send(Ok(Bytes::from(format!("{bookmark}\n"))))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let bytes = match event {
                Ok(event) if !selectors.matches(&event.object) => continue,
                Ok(event) => line(
                    event.event_type.as_str(),
                    &presenter.present(Arc::unwrap_or_clone(event.object)),
                ),
                Err(missed) => {
                    let error = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": missed.to_string()}});
                    let _ = tx.send(Ok(Bytes::from(format!("{error}\n")))).await;
                    return;
                }
            };
            if tx.send(Ok(bytes)).await.is_err() {
                return;
            }
        }
    });
    streamed_json(stream)
}

/// How long a watch that asked for bookmarks is silent before it sends one.
const BOOKMARK_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a list or a watch's listing waits for its client to take the
/// next chunk while it holds a store snapshot and a blocking thread.
const SLOW_CLIENT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends from a blocking thread; false when the client went away or has
/// not read for [`SLOW_CLIENT`], which ends the list.
fn send_from_blocking<T>(tx: &tokio::sync::mpsc::Sender<T>, item: T) -> bool {
    tokio::runtime::Handle::current()
        .block_on(tokio::time::timeout(SLOW_CLIENT, tx.send(item)))
        .is_ok_and(|sent| sent.is_ok())
}

fn parse_selectors(params: &Params) -> Result<vmesh_api::selection::Selectors, ApiError> {
    vmesh_api::selection::Selectors::parse(
        params.label_selector.as_deref(),
        params.field_selector.as_deref(),
    )
    .map_err(|e| bad_request(e.to_string()))
}

/// A stream fed by a task through a channel: the task ends when the client goes away.
fn async_stream<F, Fut>(
    producer: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(producer(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Decodes and validates the objects of a JSON request body under `field` as
/// the CLI does, each named `field[i]`, problems placed in the body as sent.
fn decode_body(body: &[u8], field: &str, default_namespace: &str) -> Result<Vec<Object>, ApiError> {
    // serde_json skips the fields it ignores unchecked: the body may still not be UTF-8.
    let text = std::str::from_utf8(body)
        .map_err(|e| bad_request(format!("the request body is not UTF-8: {e}")))?;
    let decoded = vmesh_api::decode_list("request body", text, field, default_namespace);
    if decoded.has_errors() {
        return Err(invalid(&decoded.problems));
    }
    Ok(decoded.objects.into_iter().map(|l| l.object).collect())
}

/// An apply request's settings; its `items` are decoded by [`decode_body`].
#[derive(Debug, Deserialize)]
struct ApplyRequest {
    #[serde(default)]
    namespace: Option<String>,
}

/// Applies every item or none: validation of all first, then one store batch.
/// A body the server reads must say it is JSON (`application/json`, or a
/// `+json` type): anything else is 415, not a guess.
fn require_json(content_type: &str) -> Result<(), ApiError> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        return Ok(());
    }
    Err(status(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
        format!(
            "the body must be JSON (Content-Type: application/json), not {:?}",
            content_type
        ),
        None,
    ))
}

async fn apply(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_json(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
    )?;
    // Decoding and committing a few thousand objects is CPU work: off the
    // async workers, which keep answering everything else meanwhile.
    tokio::task::spawn_blocking(move || apply_now(&state.store, &body))
        .await
        .map_err(internal)?
}

fn apply_now(store: &Store, body: &[u8]) -> Result<Response, ApiError> {
    let request: ApplyRequest = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the request body is not an apply list: {e}")))?;
    let objects = decode_body(
        body,
        "items",
        request.namespace.as_deref().unwrap_or("default"),
    )?;
    let names: Vec<String> = objects.iter().map(Object::display_name).collect();
    match store.commit(objects.into_iter().map(Op::Apply).collect()) {
        Ok(outcomes) => {
            let results: Vec<Value> = outcomes
                .iter()
                .map(|o| json!({"outcome": o.verb(), "object": o.object()}))
                .collect();
            Ok(
                Json(json!({"kind": "ApplyResult", "apiVersion": "vmesh.io/v1", "items": results}))
                    .into_response(),
            )
        }
        Err(BatchError { index, error }) => {
            let name = names.get(index).cloned().unwrap_or_default();
            let message = format!("items[{index}] ({name}): {error}; nothing was applied");
            Err(store_error_with_message(&error, message))
        }
    }
}

#[derive(Debug, Deserialize)]
struct MeshQuery {
    revision: Option<String>,
}

/// `GET /v1/mesh`: [`MeshSettings::resolve`] over the stored IstioOperators
/// (those whose body does not decode are skipped, as the registry skips them).
/// Where `vmesh backup` takes a snapshot of the whole store.
pub const SNAPSHOT_PATH: &str = "/apis/vmesh.io/v1/snapshot";

/// A snapshot of the whole store, objects and the server's records, as of
/// one revision (`vmesh_store::snapshot`), taken while the server runs. It
/// holds what the store holds (Secrets, join records), so it is as
/// guarded as the rest of the API.
async fn snapshot(State(state): State<AppState>) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let taken = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        store.snapshot(&mut out).map(|revision| (revision, out))
    })
    .await
    .map_err(|e| {
        status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("the snapshot failed: {e}"),
            None,
        )
    })?;
    let (revision, bytes) = taken.map_err(store_error)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (
                header::HeaderName::from_static("x-vmesh-revision"),
                revision.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

async fn mesh_settings(
    State(state): State<AppState>,
    Query(query): Query<MeshQuery>,
) -> Result<Json<MeshSettings>, ApiError> {
    Ok(Json(crate::mesh::stored_settings(
        &state.store,
        query.revision.as_deref(),
    )?))
}
