//! Turning manifest text into validated [`Object`]s, or into [`Problem`]s that
//! point at file, line, column, object and field.
//!
//! Decoding never stops at the first problem of a stream: every document is
//! checked so the user sees everything wrong in one go. Callers that apply
//! must apply nothing when [`Decoded::has_errors`] is true.

use std::collections::HashMap;

use serde_json::Value;

use crate::check::{Checker, Path};
use crate::object::{Object, ObjectKey, ObjectMeta};
use crate::problem::{Problem, Severity};
use crate::registry::{self, KindInfo, closest, kinds};
use crate::yaml::{self, Document, Pos};

/// How a document that is no object at all is reported.
const NOT_AN_OBJECT: &str = "not a Kubernetes object";
/// How an object defined again in a later source is reported.
const REDEFINED: &str = "also defined at";

impl Problem {
    /// Whether the document is not a Kubernetes object at all (cloud-init,
    /// Helm values, a list), rather than an object with a problem.
    pub fn is_not_an_object(&self) -> bool {
        self.object.is_empty() && self.message.starts_with(NOT_AN_OBJECT)
    }

    /// Whether the problem is only that a later source defines the object
    /// again (a warning: the later definition wins).
    pub fn is_redefinition(&self) -> bool {
        self.severity == Severity::Warning && self.message.starts_with(REDEFINED)
    }
}

/// The line of the field at `path` (as problems name fields:
/// `spec.http[0].route`), or of its nearest ancestor, in document
/// `document` (1-based, as [`Located::document`]) of `text`.
pub fn field_line(text: &str, document: usize, path: &str) -> Option<usize> {
    let documents = yaml::parse_documents(text).ok()?;
    Some(documents.get(document.checked_sub(1)?)?.position(path).line)
}

/// An object and where it came from.
#[derive(Debug, Clone)]
pub struct Located {
    pub object: Object,
    pub file: String,
    /// 1-based index of the document within its file.
    pub document: usize,
    pub line: usize,
}

/// The result of decoding one or more manifest sources.
#[derive(Debug, Default)]
pub struct Decoded {
    pub objects: Vec<Located>,
    pub problems: Vec<Problem>,
}

impl Decoded {
    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(Problem::is_error)
    }
}

/// Decodes one manifest source (YAML, multi-document, or JSON).
pub fn decode_manifests(file: &str, text: &str) -> Decoded {
    decode_sources([(file, text)], "default")
}

/// Decodes several sources as one set: an object defined twice in one source
/// is an error, across sources a warning (the later wins, as with kubectl). Namespaced objects without a namespace get `default_namespace`.
pub fn decode_sources<'a>(
    sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    default_namespace: &str,
) -> Decoded {
    let mut decoded = Decoded::default();
    for (file, text) in sources {
        decode_source(file, text, default_namespace, &mut decoded);
    }
    mark_duplicates(&mut decoded);
    decoded
}

/// An object defined twice in one source is refused (the first kept); across
/// sources it is a warning and both stay, so that the later wins.
fn mark_duplicates(decoded: &mut Decoded) {
    let mut first_seen: HashMap<ObjectKey, (String, usize)> = HashMap::new();
    let mut duplicates = Vec::new();
    decoded.objects.retain(|located| {
        let Some(key) = located.object.key() else {
            return true;
        };
        match first_seen.get(&key) {
            // Twice in one file is a mistake: refused, the first definition kept.
            Some((file, line)) if *file == located.file => {
                duplicates.push(Problem {
                    severity: Severity::Error,
                    file: located.file.clone(),
                    line: located.line,
                    column: 1,
                    object: located.object.display_name(),
                    field: String::new(),
                    message: format!("duplicate object: already defined at {file}:{line}"),
                });
                false
            }
            // Across files it is how kubectl behaves: the later file wins.
            Some((file, line)) => {
                duplicates.push(Problem {
                    severity: Severity::Warning,
                    file: located.file.clone(),
                    line: located.line,
                    column: 1,
                    object: located.object.display_name(),
                    field: String::new(),
                    message: format!("{REDEFINED} {file}:{line}; this later definition wins"),
                });
                first_seen.insert(key, (located.file.clone(), located.line));
                true
            }
            None => {
                first_seen.insert(key, (located.file.clone(), located.line));
                true
            }
        }
    });
    decoded.problems.extend(duplicates);
}

/// Decodes the objects of a JSON or YAML list held in `text` under `field`
/// (a request body `{"items": [...]}`), each named `field[i]` and its
/// problems placed in `text` itself, as the client wrote it. A body that is
/// not such a list is one problem naming `source`.
pub fn decode_list(source: &str, text: &str, field: &str, default_namespace: &str) -> Decoded {
    let mut decoded = Decoded::default();
    let document = match yaml::parse_documents(text).map(|mut docs| (docs.len(), docs.pop())) {
        Ok((1, Some(document))) => document,
        Ok(_) => {
            decoded.problems.push(Problem {
                severity: Severity::Error,
                file: source.into(),
                line: 1,
                column: 1,
                object: String::new(),
                field: String::new(),
                message: "must be one document".into(),
            });
            return decoded;
        }
        Err(e) => {
            decoded.problems.push(syntax_problem(source, &e));
            return decoded;
        }
    };
    if !document.value.get(field).is_some_and(Value::is_array) {
        let pos = document.position("");
        decoded.problems.push(Problem {
            severity: Severity::Error,
            file: source.into(),
            line: pos.line,
            column: pos.column,
            object: String::new(),
            field: field.into(),
            message: "must be a list of objects".into(),
        });
        return decoded;
    }
    for (index, element) in document.list_elements(field).iter().enumerate() {
        let name = format!("{field}[{index}]");
        decode_document(&name, element, index, default_namespace, &mut decoded);
    }
    mark_duplicates(&mut decoded);
    decoded
}

/// A YAML (or JSON) syntax error as a problem of `file`.
pub fn syntax_problem(file: &str, e: &yaml::SyntaxError) -> Problem {
    Problem {
        severity: Severity::Error,
        file: file.into(),
        line: e.pos.line,
        column: e.pos.column,
        object: String::new(),
        field: String::new(),
        message: format!("YAML syntax error: {}", e.message),
    }
}

fn decode_source(file: &str, text: &str, default_namespace: &str, out: &mut Decoded) {
    let documents = match yaml::parse_documents(text) {
        Ok(docs) => docs,
        Err(e) => {
            out.problems.push(syntax_problem(file, &e));
            return;
        }
    };
    for (index, doc) in documents.iter().enumerate() {
        if !doc.value.is_null() {
            decode_document(file, doc, index, default_namespace, out);
        }
    }
}

fn decode_document(
    file: &str,
    doc: &Document,
    index: usize,
    default_namespace: &str,
    out: &mut Decoded,
) {
    let mut ctx = DocContext {
        file,
        doc,
        object: String::new(),
        problems: Vec::new(),
    };
    if let Some(object) = ctx.decode(default_namespace) {
        let pos = doc.position("");
        out.objects.push(Located {
            object,
            file: file.into(),
            document: index + 1,
            line: pos.line,
        });
    }
    out.problems.append(&mut ctx.problems);
}

struct DocContext<'a> {
    file: &'a str,
    doc: &'a Document,
    object: String,
    problems: Vec<Problem>,
}

impl DocContext<'_> {
    fn report(&mut self, severity: Severity, path: &str, message: String) {
        let Pos { line, column } = self.doc.position(path);
        self.problems.push(Problem {
            severity,
            file: self.file.into(),
            line,
            column,
            object: self.object.clone(),
            field: path.into(),
            message,
        });
    }

    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.report(Severity::Error, path, message.into());
    }

    fn decode(&mut self, default_namespace: &str) -> Option<Object> {
        let mut map = match self.doc.value.clone() {
            Value::Object(map) => map,
            Value::Array(_) => {
                self.error(
                    "",
                    format!("{NOT_AN_OBJECT}: the document is a list; write each object as its own document, separated by ---"),
                );
                return None;
            }
            _ => {
                self.error(
                    "",
                    format!(
                        "{NOT_AN_OBJECT}: the document is not a mapping with apiVersion and kind"
                    ),
                );
                return None;
            }
        };
        // shift_remove keeps the remaining fields in source order, so that the first
        // problem serde reports is the first one in the document.
        let api_version = map.shift_remove("apiVersion");
        let kind = map.shift_remove("kind");
        let (api_version, kind) = match (api_version, kind) {
            (Some(Value::String(a)), Some(Value::String(k))) => (a, k),
            (None, None) => {
                self.error(
                    "",
                    format!("{NOT_AN_OBJECT}: no apiVersion and kind (cloud-init, Helm values or other YAML cannot be applied)"),
                );
                return None;
            }
            (a, k) => {
                let known = match &k {
                    Some(Value::String(k)) => kinds().iter().find(|info| info.kind == k),
                    _ => None,
                };
                let example = match known {
                    Some(info) => format!("{} uses {}", info.kind, info.preferred_api_version()),
                    None => "such as networking.istio.io/v1".to_string(),
                };
                match a {
                    Some(Value::String(_)) => {}
                    None => self.error("apiVersion", format!("is required ({example})")),
                    Some(_) => self.error("apiVersion", format!("must be a string ({example})")),
                }
                match k {
                    Some(Value::String(_)) => {}
                    None => self.error("kind", "is required (such as WorkloadEntry)"),
                    Some(_) => self.error("kind", "must be a string such as WorkloadEntry"),
                }
                return None;
            }
        };
        let info = self.find_info(&api_version, &kind)?;
        let metadata =
            self.decode_metadata(info, map.shift_remove("metadata"), default_namespace)?;
        let namespace = metadata.namespace().filter(|_| info.namespaced);
        self.object = crate::object::display_name(&kind, namespace, metadata.name());
        if !self.problems.is_empty() {
            // Metadata problems were reported before the object had a name.
            let object = self.object.clone();
            self.problems
                .iter_mut()
                .for_each(|p| p.object = object.clone());
        }
        let body = match (info.decode)(Value::Object(map)) {
            Ok((body, checker)) => {
                for (severity, path, message) in checker.found {
                    self.report(severity, &path, message);
                }
                body
            }
            Err(e) => {
                let (path, message) = explain(e.path, &e.message);
                self.error(&path, message);
                return None;
            }
        };
        if self.problems.iter().any(Problem::is_error) {
            return None;
        }
        let Value::Object(body) = body else {
            return None;
        };
        Some(Object {
            api_version,
            kind,
            metadata,
            body,
        })
    }

    fn find_info(&mut self, api_version: &str, kind: &str) -> Option<&'static KindInfo> {
        if let Some(info) = registry::find_kind(api_version, kind) {
            return Some(info);
        }
        self.object = kind.to_string();
        let known_kind = kinds().iter().find(|k| k.kind == kind);
        match known_kind {
            Some(info) => {
                let served: Vec<String> =
                    info.versions.iter().map(|v| info.api_version(v)).collect();
                self.error(
                    "apiVersion",
                    format!(
                        "{api_version:?} does not serve {kind}; use one of {}",
                        served.join(", ")
                    ),
                );
            }
            None if registry::views().iter().any(|v| v.kind == kind) => {
                self.error(
                    "kind",
                    format!(
                        "{kind} are computed by the server from the workloads each Service \
                         selects (vmesh get {}); they cannot be written",
                        kind.to_ascii_lowercase()
                    ),
                );
            }
            None => {
                let hint = closest(kinds().iter().map(|k| k.kind), kind)
                    .map(|k| format!(" (did you mean {k}?)"))
                    .unwrap_or_default();
                self.error("kind", format!("unknown kind {kind:?}{hint}"));
            }
        }
        None
    }

    fn decode_metadata(
        &mut self,
        info: &KindInfo,
        raw: Option<Value>,
        default_namespace: &str,
    ) -> Option<ObjectMeta> {
        let raw = raw.unwrap_or_else(|| Value::Object(Default::default()));
        let mut metadata: ObjectMeta = match serde_path_to_error::deserialize(raw) {
            Ok(m) => m,
            Err(e) => {
                let path = Path::root("metadata");
                let sub = registry::render_path(e.path());
                let path = if sub.is_empty() { path } else { path.f(&sub) };
                let (path, message) =
                    explain(path.as_str().to_string(), &e.into_inner().to_string());
                self.error(&path, message);
                return None;
            }
        };
        if metadata.name.is_none() {
            metadata.name = info.default_name.map(str::to_string);
        }
        if info.namespaced {
            if metadata.namespace.is_none() {
                metadata.namespace = Some(
                    info.default_namespace
                        .unwrap_or(default_namespace)
                        .to_string(),
                );
            }
        } else if let Some(ns) = &metadata.namespace {
            self.error(
                "metadata.namespace",
                format!(
                    "{} is cluster-scoped and cannot have a namespace (got {ns:?})",
                    info.kind
                ),
            );
        }
        let mut checker = Checker::default();
        let meta = Path::root("metadata");
        match metadata.name.as_deref() {
            None | Some("") => checker.error(&meta.f("name"), "is required"),
            Some(name) if matches!(info.kind, "Namespace" | "Service") => {
                checker.dns1123_label(&meta.f("name"), name)
            }
            Some(name) => checker.dns1123_subdomain(&meta.f("name"), name),
        }
        if let Some(ns) = metadata.namespace.as_deref() {
            checker.dns1123_label(&meta.f("namespace"), ns);
        }
        if let Some(labels) = &metadata.labels {
            checker.labels(&meta.f("labels"), labels);
        }
        if let Some(annotations) = &metadata.annotations {
            checker.annotation_keys(&meta.f("annotations"), annotations);
        }
        for (severity, path, message) in checker.found {
            self.report(severity, &path, message);
        }
        Some(metadata)
    }
}

/// Turns a serde error at `path` into the path and message a user should see:
/// a missing field is reported at its own path, type names are said in YAML's
/// words rather than Rust's, and near misses get a hint.
fn explain(path: String, message: &str) -> (String, String) {
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return (
            Path::root(&path).f(field).as_str().to_string(),
            "is required".into(),
        );
    }
    let wrong_type = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    if let Some((got, expected)) = wrong_type.and_then(|rest| rest.rsplit_once(", expected ")) {
        return (path, plain_type_error(got, expected));
    }
    (path, with_hint(message))
}

/// `expected an integer, got string "8080" (remove the quotes)` for serde's
/// `invalid type: string "8080", expected u32`.
fn plain_type_error(got: &str, expected: &str) -> String {
    let numeric = matches!(
        expected,
        "u8" | "u16" | "u32" | "u64" | "i8" | "i16" | "i32" | "i64" | "f32" | "f64"
    );
    let expected = match expected {
        "u8" | "u16" | "u32" | "u64" => "a non-negative integer",
        "i8" | "i16" | "i32" | "i64" => "an integer",
        "f32" | "f64" => "a number",
        "a sequence" => "a list",
        "a map" => "a mapping",
        e if e.starts_with("struct ") => "a mapping",
        e => e,
    };
    let quoted = got
        .strip_prefix("string ")
        .and_then(|s| serde_json::from_str::<String>(s).ok());
    let empty = matches!(got, "null" | "unit value");
    let hint = match &quoted {
        Some(text) if numeric && text.trim().parse::<f64>().is_ok() => " (remove the quotes)",
        _ if empty && matches!(expected, "a mapping" | "a list") => {
            " (is what belongs to it indented below it?)"
        }
        _ => "",
    };
    let got = match got {
        "null" | "unit value" => "an empty value".to_string(),
        "sequence" => "a list".to_string(),
        "map" => "a mapping".to_string(),
        g => g.replace('`', ""),
    };
    format!("expected {expected}, got {got}{hint}")
}

/// Adds a "did you mean" hint to serde's unknown-field and unknown-variant errors,
/// and shortens its list of every expected name.
fn with_hint(message: &str) -> String {
    let (what, rest) = if let Some(rest) = message.strip_prefix("unknown field `") {
        ("field", rest)
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        ("value", rest)
    } else {
        return message.to_string();
    };
    let Some((wrong, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match closest(names.iter().copied(), wrong) {
        Some(near) => format!("unknown {what} {wrong:?} (did you mean {near:?}?)"),
        None if names.is_empty() => format!("unknown {what} {wrong:?}: no fields are allowed here"),
        None => format!(
            "unknown {what} {wrong:?}; expected one of: {}",
            names.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_in_yaml_words() {
        assert_eq!(
            explain(
                "spec.ports.http".into(),
                "invalid type: string \"8080\", expected u32"
            ),
            (
                "spec.ports.http".into(),
                "expected a non-negative integer, got string \"8080\" (remove the quotes)".into()
            )
        );
        assert_eq!(
            explain(
                "spec".into(),
                "invalid type: unit value, expected struct WorkloadEntrySpec"
            )
            .1,
            "expected a mapping, got an empty value (is what belongs to it indented below it?)"
        );
        assert_eq!(
            explain(
                "spec.hosts".into(),
                "invalid type: string \"a\", expected a sequence"
            )
            .1,
            "expected a list, got string \"a\""
        );
        assert_eq!(
            explain("spec".into(), "missing field `hosts`"),
            ("spec.hosts".into(), "is required".into())
        );
        assert_eq!(
            explain(String::new(), "missing field `spec`"),
            ("spec".into(), "is required".into())
        );
    }

    #[test]
    fn hints_for_near_misses() {
        assert_eq!(
            with_hint("unknown field `adress`, expected one of `address`, `ports`"),
            "unknown field \"adress\" (did you mean \"address\"?)"
        );
        assert_eq!(
            with_hint("unknown variant `ROUND_ROBINN`, expected one of `ROUND_ROBIN`, `RANDOM`"),
            "unknown value \"ROUND_ROBINN\" (did you mean \"ROUND_ROBIN\"?)"
        );
        assert_eq!(
            with_hint("unknown field `zzz`, expected `a` or `b`"),
            "unknown field \"zzz\"; expected one of: a, b"
        );
    }

    #[test]
    fn list_items_are_placed_in_the_text_sent() {
        let body = concat!(
            "{\"namespace\": \"ns\", \"items\": [\n",
            " {\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"ns\"}},\n",
            " {\"apiVersion\": \"networking.istio.io/v1\", \"kind\": \"WorkloadEntry\",\n",
            "  \"metadata\": {\"name\": \"vm1\"},\n",
            "  \"spec\": {\"address\": \"10.0.0.1\", \"weight\": \"heavy\"}}\n",
            "]}\n"
        );
        let decoded = decode_list("request body", body, "items", "ns");
        let problems: Vec<String> = decoded.problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("items[1]:5:35: WorkloadEntry ns/vm1: spec.weight: "),
            "{problems:?}"
        );
        assert_eq!(decoded.objects.len(), 1);

        let not_a_list = decode_list("request body", "{\"items\": 3}", "items", "ns");
        assert_eq!(
            not_a_list.problems[0].to_string(),
            "request body:1:1: items: must be a list of objects"
        );
    }
}
