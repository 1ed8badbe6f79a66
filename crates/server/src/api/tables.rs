//! Kubernetes' Table format (`meta.k8s.io/v1` `Table`), which `kubectl get`
//! asks for: the columns of each kind (`vmesh_api::table`) with a row per
//! object, each row carrying the object's metadata (or the object, or
//! nothing, as `includeObject` says) so that kubectl can add its own
//! columns.
//!
//! Not here: which columns a kind has and how a cell reads (vmesh_api).

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use vmesh_api::{KindInfo, Object, table};
use vmesh_store::Store;

use super::{ApiError, Continue, Page, Params, Presenter, Target, accepted, internal};

/// Whether the client asked for a Table (`application/json;as=Table;g=meta.k8s.io;v=v1`).
pub(super) fn wants_table(headers: &HeaderMap) -> bool {
    accepted(headers).iter().any(|parts| {
        let has = |part: &str| parts.iter().any(|p| p == part);
        has("as=Table") && has("g=meta.k8s.io") && (has("v=v1") || has("v=v1beta1"))
    })
}

fn column_definitions(columns: &[table::Column]) -> Vec<Value> {
    let mut definitions = vec![json!({
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "Name must be unique within a namespace.",
        "priority": 0,
    })];
    definitions.extend(columns.iter().map(|c| {
        json!({
            "name": c.name,
            "type": c.kind,
            "format": "",
            "description": "",
            "priority": c.priority,
        })
    }));
    definitions
}

fn row(columns: &[table::Column], object: &Value, include: Option<&str>, now: SystemTime) -> Value {
    let cells = table::row(columns, object, now);
    let mut row = json!({"cells": cells});
    match include.unwrap_or("Metadata") {
        "None" => {}
        "Object" => row["object"] = object.clone(),
        _ => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": object["metadata"],
            })
        }
    }
    row
}

fn envelope(info: &KindInfo, rows: Vec<Value>, metadata: Value) -> Value {
    let columns = table::columns(info);
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": column_definitions(&columns),
        "rows": rows,
    })
}

/// One object as a Table.
pub(super) fn one_value(info: &KindInfo, object: &Object, include: Option<&str>) -> Value {
    let value = serde_json::to_value(object).expect("an object serialises");
    let columns = table::columns(info);
    let metadata = json!({"resourceVersion": value["metadata"]["resourceVersion"]});
    envelope(
        info,
        vec![row(&columns, &value, include, SystemTime::now())],
        metadata,
    )
}

/// One object as a Table, answered.
pub(super) fn one(info: &KindInfo, object: &Object, include: Option<&str>) -> Response {
    Json(one_value(info, object, include)).into_response()
}

/// Objects already at hand (a computed kind's) as a Table.
pub(super) fn many(info: &KindInfo, objects: &[Object], include: Option<&str>) -> Response {
    let columns = table::columns(info);
    let now = SystemTime::now();
    let rows = objects
        .iter()
        .map(|o| {
            let value = serde_json::to_value(o).expect("an object serialises");
            row(&columns, &value, include, now)
        })
        .collect();
    Json(envelope(info, rows, json!({}))).into_response()
}

/// A list as a Table: selectors, `limit` and `continue` as for a list.
/// The page is built in memory (kubectl asks for 500 rows at a time).
pub(super) async fn list(
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
    let include = params.include_object.clone();
    let info = target.info;
    let page = tokio::task::spawn_blocking(move || {
        let columns = table::columns(info);
        let now = SystemTime::now();
        let (mut rows, mut last_key, mut more) = (Vec::new(), String::new(), false);
        let revision = store.scan(&selection, after.as_deref(), |key, object| {
            if limit.is_some_and(|limit| rows.len() == limit) {
                more = true;
                return false;
            }
            if selectors.matches(&object) {
                let value =
                    serde_json::to_value(presenter.present(object)).expect("an object serialises");
                rows.push(row(&columns, &value, include.as_deref(), now));
                last_key = key.to_string();
            }
            true
        })?;
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if more {
            metadata["continue"] = Value::String(Continue::encode(revision, &last_key));
        }
        Ok::<_, vmesh_store::StoreError>((rows, metadata))
    })
    .await
    .map_err(internal)??;
    Ok(Json(envelope(info, page.0, page.1)).into_response())
}
