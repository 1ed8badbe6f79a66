//! Kubernetes' PATCH and field ownership: JSON merge patch (RFC 7386),
//! JSON patch (RFC 6902), strategic merge patch (for the Kubernetes kinds
//! kubectl sends it for), and server-side apply with `managedFields`, its
//! field managers and their conflicts. Each works on the object as JSON and
//! returns the object to write; the caller validates and commits it like
//! any other write.
//!
//! Not here: decoding, validation and the store (the API handler).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// How a PATCH body is to be read, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(content_type: &str) -> Option<PatchKind> {
        match content_type.split(';').next()?.trim() {
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the patch is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("the JSON patch cannot be applied: {0}")]
    JsonPatch(#[from] json_patch::PatchError),
    #[error("the JSON patch is malformed: {0}")]
    BadJsonPatch(serde_json::Error),
    #[error("a merge patch must be a JSON object")]
    NotAnObject,
    #[error("unknown strategic merge patch directive {0:?}")]
    Directive(String),
}

/// `live` changed by a merge, JSON or strategic merge patch.
pub fn patch(kind: PatchKind, live: &Value, body: &[u8]) -> Result<Value, PatchError> {
    let mut object = live.clone();
    match kind {
        PatchKind::Json => {
            let operations: json_patch::Patch =
                serde_json::from_slice(body).map_err(PatchError::BadJsonPatch)?;
            json_patch::patch(&mut object, &operations)?;
        }
        PatchKind::Merge | PatchKind::Strategic => {
            let patch: Value = serde_json::from_slice(body).map_err(PatchError::NotJson)?;
            if !patch.is_object() {
                return Err(PatchError::NotAnObject);
            }
            if kind == PatchKind::Merge {
                json_patch::merge(&mut object, &patch);
            } else {
                strategic_merge(&mut object, &patch)?;
            }
        }
        PatchKind::Apply => unreachable!("server-side apply is `apply`'s"),
    }
    Ok(object)
}

/// Kubernetes' strategic merge patch. The schema this API publishes marks
/// no list as merged, so a list in a patch replaces the stored one, as
/// clients that read that schema (kubectl) expect; clients that work from
/// Kubernetes' own types instead send the directives of a merged list,
/// which say how to merge it: `$setElementOrder/<list>` (its elements name
/// the merge key, and give the order), `$patch: delete` elements, and
/// `$deleteFromPrimitiveList/<list>`. Maps merge, `null` deletes,
/// `$patch: replace|delete` on a map, and `$retainKeys`.
fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return Ok(());
    };
    if let Some(directive) = patch.get("$patch").and_then(Value::as_str) {
        match directive {
            "replace" => {
                let mut replaced = patch.clone();
                replaced.remove("$patch");
                *target = Value::Object(replaced);
                return Ok(());
            }
            "delete" => {
                *target = Value::Null;
                return Ok(());
            }
            "merge" => {}
            other => return Err(PatchError::Directive(other.to_string())),
        }
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let map = target.as_object_mut().expect("made an object");
    if let Some(retained) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: BTreeSet<&str> = retained.iter().filter_map(Value::as_str).collect();
        map.retain(|k, _| keep.contains(k.as_str()));
    }
    // Lists the patch merges rather than replaces, with their order.
    let mut merged_lists: Map<String, Value> = Map::new();
    for (key, value) in patch {
        if let Some(list) = key
            .strip_prefix("$setElementOrder/")
            .or_else(|| key.strip_prefix("$deleteFromPrimitiveList/"))
        {
            if key.starts_with("$setElementOrder/") {
                merged_lists.insert(list.to_string(), value.clone());
            } else {
                merged_lists.entry(list.to_string()).or_insert(Value::Null);
            }
        } else if let Some(items) = value.as_array()
            && items.iter().any(|i| i.get("$patch").is_some())
        {
            merged_lists.entry(key.clone()).or_insert(Value::Null);
        }
    }
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let gone: Vec<&Value> = value.as_array().into_iter().flatten().collect();
            if let Some(items) = map.get_mut(list).and_then(Value::as_array_mut) {
                items.retain(|item| !gone.contains(&item));
            }
            continue;
        }
        if key.starts_with('$') {
            return Err(PatchError::Directive(key.clone()));
        }
        if value.is_null() {
            map.remove(key);
            continue;
        }
        match (value, merged_lists.get(key)) {
            (Value::Array(items), Some(order)) => {
                let current = map.entry(key.clone()).or_insert_with(|| json!([]));
                merge_list(current, items, order)?;
            }
            (Value::Object(_), _) => {
                let current = map.entry(key.clone()).or_insert(Value::Null);
                strategic_merge(current, value)?;
                if current.is_null() {
                    map.remove(key);
                }
            }
            _ => {
                map.insert(key.clone(), value.clone());
            }
        }
    }
    // A list whose only change is its order.
    for (key, order) in &merged_lists {
        if !patch.contains_key(key)
            && let Some(current) = map.get_mut(key)
        {
            merge_list(current, &[], order)?;
        }
    }
    Ok(())
}

/// The merge key of a merged list's elements: the one field of its
/// `$setElementOrder` entries or of its `$patch` elements.
fn merge_key_of(items: &[Value], order: &Value) -> Option<String> {
    let from_order = order
        .as_array()
        .and_then(|o| o.first())
        .and_then(Value::as_object)
        .filter(|o| o.len() == 1)
        .and_then(|o| o.keys().next().cloned());
    from_order.or_else(|| {
        items
            .iter()
            .filter_map(Value::as_object)
            .find(|i| i.contains_key("$patch"))
            .and_then(|i| i.keys().find(|k| *k != "$patch").cloned())
    })
}

fn merge_list(current: &mut Value, items: &[Value], order: &Value) -> Result<(), PatchError> {
    if !current.is_array() {
        *current = json!([]);
    }
    let list = current.as_array_mut().expect("made a list");
    match merge_key_of(items, order) {
        Some(key) => {
            for item in items {
                let id = item.get(&key);
                let position = id.and_then(|id| list.iter().position(|e| e.get(&key) == Some(id)));
                let deleting = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (position, deleting) {
                    (Some(i), true) => {
                        list.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => strategic_merge(&mut list[i], item)?,
                    (None, false) => {
                        let mut added = Value::Null;
                        strategic_merge(&mut added, item)?;
                        list.push(added);
                    }
                }
            }
            if let Some(order) = order.as_array() {
                let rank = |e: &Value| {
                    order
                        .iter()
                        .position(|o| o.get(&key) == e.get(&key))
                        .unwrap_or(usize::MAX)
                };
                list.sort_by_key(rank);
            }
        }
        // A list of plain values: a set.
        None => {
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
            if let Some(order) = order.as_array() {
                let rank = |e: &Value| order.iter().position(|o| o == e).unwrap_or(usize::MAX);
                list.sort_by_key(rank);
            }
        }
    }
    Ok(())
}

/// The metadata fields the server sets, which no manager owns.
const SERVER_SET: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "managedFields",
];

/// The leaves of an object a manager can own, as paths of field names:
/// every scalar, list (lists are atomic) and empty map, but not
/// `apiVersion`, `kind`, `status` or what the server sets in `metadata`.
fn leaves(object: &Value) -> BTreeSet<Vec<String>> {
    fn walk(value: &Value, path: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    if path.len() == 1
                        && path[0] == "metadata"
                        && SERVER_SET.contains(&key.as_str())
                    {
                        continue;
                    }
                    path.push(key.clone());
                    walk(child, path, out);
                    path.pop();
                }
            }
            _ => {
                out.insert(path.clone());
            }
        }
    }
    let mut out = BTreeSet::new();
    for (key, child) in object.as_object().into_iter().flatten() {
        if matches!(key.as_str(), "apiVersion" | "kind" | "status") {
            continue;
        }
        let mut path = vec![key.clone()];
        walk(child, &mut path, &mut out);
    }
    out
}

fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(object, |v, key| v.get(key))
}

fn remove_at(object: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    if let Some(map) = value_at_mut(object, parents).and_then(Value::as_object_mut) {
        map.remove(last);
    }
    // Maps left empty by the removal go too, as Kubernetes prunes them.
    for depth in (0..parents.len()).rev() {
        let Some(parent) = value_at_mut(object, &parents[..depth]).and_then(Value::as_object_mut)
        else {
            return;
        };
        if parent
            .get(&parents[depth])
            .and_then(Value::as_object)
            .is_some_and(Map::is_empty)
        {
            parent.remove(&parents[depth]);
        } else {
            return;
        }
    }
}

fn value_at_mut<'a>(object: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(object, |v, key| v.get_mut(key))
}

fn set_at(object: &mut Value, path: &[String], value: Value) {
    let mut node = object;
    for key in path {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        node = node
            .as_object_mut()
            .expect("made an object")
            .entry(key.clone())
            .or_insert(Value::Null);
    }
    *node = value;
}

/// Kubernetes' `fieldsV1`: `{"f:spec":{"f:address":{}}}`, with `"."` on
/// maps that are themselves owned.
fn fields_v1(fields: &BTreeSet<Vec<String>>) -> Value {
    let mut root = Value::Object(Map::new());
    for path in fields {
        let mut node = &mut root;
        for key in path {
            node = node
                .as_object_mut()
                .expect("fieldsV1 nodes are objects")
                .entry(format!("f:{key}"))
                .or_insert_with(|| Value::Object(Map::new()));
        }
    }
    root
}

fn from_fields_v1(value: &Value) -> BTreeSet<Vec<String>> {
    fn walk(value: &Value, path: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
        let children: Vec<(&String, &Value)> = value
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("f:"))
            .collect();
        if children.is_empty() && !path.is_empty() {
            out.insert(path.clone());
        }
        for (key, child) in children {
            path.push(key["f:".len()..].to_string());
            walk(child, path, out);
            path.pop();
        }
    }
    let mut out = BTreeSet::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

/// One `managedFields` entry.
#[derive(Debug, Clone)]
struct Managed {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    fields: BTreeSet<Vec<String>>,
}

fn managed_entries(object: &Value) -> Vec<Managed> {
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| Managed {
            manager: entry["manager"].as_str().unwrap_or_default().to_string(),
            operation: entry["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: entry["apiVersion"].as_str().unwrap_or_default().to_string(),
            time: entry["time"].as_str().unwrap_or_default().to_string(),
            fields: from_fields_v1(&entry["fieldsV1"]),
        })
        .collect()
}

fn set_managed_entries(object: &mut Value, entries: Vec<Managed>) {
    let entries: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields_v1(&e.fields),
            })
        })
        .collect();
    let metadata = object
        .as_object_mut()
        .expect("an object")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if entries.is_empty() {
        if let Some(m) = metadata.as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        metadata["managedFields"] = Value::Array(entries);
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A field another manager owns with another value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub field: String,
}

impl Conflict {
    /// Kubernetes' message for a set of conflicts.
    pub fn message(conflicts: &[Conflict]) -> String {
        let lines: Vec<String> = conflicts
            .iter()
            .map(|c| format!("- conflict with \"{}\": {}", c.manager, c.field))
            .collect();
        format!(
            "Apply failed with {} conflict{}: {}",
            conflicts.len(),
            if conflicts.len() == 1 { "" } else { "s" },
            if conflicts.len() == 1 {
                lines[0].trim_start_matches("- ").to_string()
            } else {
                format!("\n{}", lines.join("\n"))
            }
        )
    }
}

fn dotted(path: &[String]) -> String {
    path.iter().map(|p| format!(".{p}")).collect()
}

/// Server-side apply of `applied` (the manager's whole intent) onto `live`
/// (none when the object is new): fields the manager applied before and
/// leaves out now are removed unless another manager owns them; fields
/// another manager owns with another value are conflicts unless `force`,
/// which takes them over.
pub fn server_side_apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    api_version: &str,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let applied_fields = leaves(applied);
    let Some(live) = live else {
        let mut object = applied.clone();
        set_managed_entries(
            &mut object,
            vec![Managed {
                manager: manager.into(),
                operation: "Apply".into(),
                api_version: api_version.into(),
                time: now(),
                fields: applied_fields,
            }],
        );
        return Ok(object);
    };
    let mut entries = managed_entries(live);
    let is_mine = |e: &Managed| e.manager == manager && e.operation == "Apply";
    let mut conflicts = Vec::new();
    for entry in entries.iter().filter(|e| !is_mine(e)) {
        for field in applied_fields.intersection(&entry.fields) {
            if value_at(live, field) != value_at(applied, field) {
                conflicts.push(Conflict {
                    manager: entry.manager.clone(),
                    field: dotted(field),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let previous: BTreeSet<Vec<String>> = entries
        .iter()
        .filter(|e| is_mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut object = live.clone();
    for field in previous.difference(&applied_fields) {
        let owned_elsewhere = entries
            .iter()
            .any(|e| !is_mine(e) && e.fields.contains(field));
        if !owned_elsewhere {
            remove_at(&mut object, field);
        }
    }
    for field in &applied_fields {
        let value = value_at(applied, field).cloned().unwrap_or(Value::Null);
        set_at(&mut object, field, value);
    }
    if force {
        let taken: BTreeSet<Vec<String>> = conflicts
            .iter()
            .filter_map(|c| {
                applied_fields
                    .iter()
                    .find(|f| dotted(f) == c.field)
                    .cloned()
            })
            .collect();
        for entry in entries.iter_mut().filter(|e| !is_mine(e)) {
            entry.fields.retain(|f| !taken.contains(f));
        }
    }
    // An apply that changes nothing leaves the object as it is, its
    // entry's time included, as Kubernetes does.
    let unchanged = conflicts.is_empty() && previous == applied_fields && {
        let mut before = live.clone();
        set_managed_entries(&mut before, Vec::new());
        let mut after = object.clone();
        set_managed_entries(&mut after, Vec::new());
        before == after
    };
    if unchanged {
        return Ok(live.clone());
    }
    entries.retain(|e| !is_mine(e));
    entries.push(Managed {
        manager: manager.into(),
        operation: "Apply".into(),
        api_version: api_version.into(),
        time: now(),
        fields: applied_fields,
    });
    set_managed_entries(&mut object, entries);
    Ok(object)
}

/// Records an update (a create, replace or patch) by `manager` in `new`'s
/// `managedFields`: it owns the fields it changed, which other managers
/// no longer own.
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str, api_version: &str) {
    let changed: BTreeSet<Vec<String>> = leaves(new)
        .into_iter()
        .filter(|f| old.and_then(|o| value_at(o, f)) != value_at(new, f))
        .collect();
    let mut entries = old.map(managed_entries).unwrap_or_default();
    let remaining = leaves(new);
    for entry in &mut entries {
        entry.fields.retain(|f| remaining.contains(f));
        if !(entry.manager == manager && entry.operation == "Update") {
            entry.fields.retain(|f| !changed.contains(f));
        }
    }
    if !changed.is_empty() {
        match entries
            .iter_mut()
            .find(|e| e.manager == manager && e.operation == "Update")
        {
            Some(entry) => {
                entry.fields.extend(changed);
                entry.time = now();
                entry.api_version = api_version.into();
            }
            None => entries.push(Managed {
                manager: manager.into(),
                operation: "Update".into(),
                api_version: api_version.into(),
                time: now(),
                fields: changed,
            }),
        }
    }
    set_managed_entries(new, entries);
}

/// Drops the metadata maps and lists a write leaves empty (`annotations:
/// {}`), as Kubernetes' encoding does: an empty one and none are the same.
pub fn drop_empty_metadata(object: &mut Value) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["labels", "annotations", "finalizers", "ownerReferences"] {
            let empty = match metadata.get(field) {
                Some(Value::Object(map)) => map.is_empty(),
                Some(Value::Array(list)) => list.is_empty(),
                Some(Value::Null) => true,
                _ => false,
            };
            if empty {
                metadata.remove(field);
            }
        }
    }
}

/// The field manager of a request: `fieldManager`, else the user agent's
/// program name, as Kubernetes defaults it.
pub fn manager_of(field_manager: Option<&str>, user_agent: Option<&str>) -> String {
    field_manager
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .or_else(|| {
            user_agent
                .and_then(|ua| ua.split('/').next())
                .filter(|p| !p.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(object: &'a Value, manager: &str) -> &'a Value {
        object["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["manager"] == manager)
            .unwrap()
    }

    #[test]
    fn merge_and_json_patches_change_what_they_name() {
        let live = json!({"metadata": {"name": "a", "labels": {"x": "1", "y": "2"}}, "spec": {"address": "10.0.0.1"}});
        let merged = patch(
            PatchKind::Merge,
            &live,
            br#"{"metadata":{"labels":{"x":null,"z":"3"}}}"#,
        )
        .unwrap();
        assert_eq!(merged["metadata"]["labels"], json!({"y": "2", "z": "3"}));
        let patched = patch(
            PatchKind::Json,
            &live,
            br#"[{"op":"replace","path":"/spec/address","value":"10.0.0.2"}]"#,
        )
        .unwrap();
        assert_eq!(patched["spec"]["address"], "10.0.0.2");
        assert!(
            patch(
                PatchKind::Json,
                &live,
                br#"[{"op":"remove","path":"/nope"}]"#
            )
            .is_err()
        );
        assert!(patch(PatchKind::Merge, &live, b"[1]").is_err());
    }

    #[test]
    fn strategic_merge_replaces_lists_unless_the_patch_merges_them() {
        let live = json!({"spec": {"ports": [{"port": 80, "name": "http", "targetPort": 8080}, {"port": 443, "name": "https"}],
                                   "selector": {"app": "a"}},
                          "metadata": {"finalizers": ["a"]}});
        // As kubectl sends it from this API's schema: the list replaces.
        let replacing = json!({"spec": {"ports": [{"port": 8081, "name": "http"}]}});
        let out = patch(
            PatchKind::Strategic,
            &live,
            replacing.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 8081, "name": "http"}])
        );
        // As a client working from Kubernetes' types sends it: merged by key.
        let merging = json!({"spec": {"$setElementOrder/ports": [{"port": 443}, {"port": 80}],
                                      "ports": [{"port": 80, "targetPort": 9090}, {"port": 443, "$patch": "delete"}]},
                             "metadata": {"$setElementOrder/finalizers": ["b"], "finalizers": ["b"],
                                          "$deleteFromPrimitiveList/finalizers": ["a"]}});
        let out = patch(PatchKind::Strategic, &live, merging.to_string().as_bytes()).unwrap();
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "name": "http", "targetPort": 9090}])
        );
        assert_eq!(out["spec"]["selector"], json!({"app": "a"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        let reorder = json!({"spec": {"$setElementOrder/ports": [{"port": 443}, {"port": 80}]}});
        let out = patch(PatchKind::Strategic, &live, reorder.to_string().as_bytes()).unwrap();
        assert_eq!(out["spec"]["ports"][0]["port"], 443);
        assert!(patch(PatchKind::Strategic, &live, br#"{"$patch":"explode"}"#).is_err());
    }

    #[test]
    fn server_side_apply_owns_removes_and_conflicts_as_kubernetes_does() {
        let first = json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "vm", "namespace": "a", "labels": {"app": "x", "tier": "1"}},
            "spec": {"address": "10.0.0.1"}});
        let created =
            server_side_apply(None, &first, "kubectl", "networking.istio.io/v1", false).unwrap();
        assert_eq!(entry(&created, "kubectl")["operation"], "Apply");
        assert_eq!(
            entry(&created, "kubectl")["fieldsV1"]["f:spec"],
            json!({"f:address": {}})
        );
        // The same intent again changes nothing, not even the entry's time.
        let again = server_side_apply(
            Some(&created),
            &first,
            "kubectl",
            "networking.istio.io/v1",
            false,
        )
        .unwrap();
        assert_eq!(again, created);

        // Another manager changes the address: it owns it now.
        let mut updated = again.clone();
        updated["spec"]["address"] = "10.0.0.9".into();
        record_update(
            Some(&again),
            &mut updated,
            "editor",
            "networking.istio.io/v1",
        );
        assert_eq!(
            entry(&updated, "editor")["fieldsV1"],
            json!({"f:spec": {"f:address": {}}})
        );

        // Applying the old address conflicts with the editor; force takes it back.
        let conflicts = server_side_apply(
            Some(&updated),
            &first,
            "kubectl",
            "networking.istio.io/v1",
            false,
        )
        .unwrap_err();
        assert_eq!(
            conflicts,
            vec![Conflict {
                manager: "editor".into(),
                field: ".spec.address".into()
            }]
        );
        assert_eq!(
            Conflict::message(&conflicts),
            "Apply failed with 1 conflict: conflict with \"editor\": .spec.address"
        );
        let forced = server_side_apply(
            Some(&updated),
            &first,
            "kubectl",
            "networking.istio.io/v1",
            true,
        )
        .unwrap();
        assert_eq!(forced["spec"]["address"], "10.0.0.1");
        assert_eq!(
            forced["metadata"]["managedFields"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        // A label left out of the intent is removed; one another manager set stays.
        let mut labelled = forced.clone();
        labelled["metadata"]["labels"]["team"] = "z".into();
        record_update(
            Some(&forced),
            &mut labelled,
            "kubectl-label",
            "networking.istio.io/v1",
        );
        let mut fewer = first.clone();
        fewer["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("tier");
        let out = server_side_apply(
            Some(&labelled),
            &fewer,
            "kubectl",
            "networking.istio.io/v1",
            false,
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"app": "x", "team": "z"}));
    }

    #[test]
    fn the_field_manager_defaults_to_the_user_agents_program() {
        assert_eq!(
            manager_of(None, Some("kubectl/v1.32.4 (linux/amd64)")),
            "kubectl"
        );
        assert_eq!(manager_of(Some("flux"), Some("kubectl/v1")), "flux");
        assert_eq!(manager_of(None, None), "unknown");
    }
}
