//! The table of kinds vmesh knows: API group, versions, plural and short names,
//! scope, and the decoder/validator of each kind's body.

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::check::{Checker, Path};
use crate::kinds as k;

/// A kind's body (everything but `apiVersion`, `kind` and `metadata`) can check itself.
pub trait Validate {
    /// Report problems with paths rooted at the object (`spec.…`).
    fn validate(&self, checker: &mut Checker);
}

/// Everything vmesh needs to know about one kind.
#[derive(Debug)]
pub struct KindInfo {
    pub kind: &'static str,
    /// API group; empty for the core group.
    pub group: &'static str,
    /// Served versions, preferred first.
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    /// Name given to objects that come without one (Istio's `IstioOperator`).
    pub default_name: Option<&'static str>,
    /// Namespace given to objects of this kind that come without one, before the
    /// CLI's `-n` default applies.
    pub default_namespace: Option<&'static str>,
    /// The columns `kubectl get` shows after NAME (Istio's CRDs' printer
    /// columns): header and JSON pointer into the object; `AGE` where the
    /// CRD puts it, else last. [`crate::table`] adds kubectl's computed ones.
    pub columns: &'static [(&'static str, &'static str)],
    pub(crate) decode: fn(Value) -> Result<(Value, Checker), BodyError>,
    /// The JSON schema of the kind's body (its fields besides `apiVersion`,
    /// `kind` and `metadata`), for the OpenAPI documents.
    pub(crate) schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
}

/// Why a body failed typed decoding.
#[derive(Debug)]
pub(crate) struct BodyError {
    pub path: String,
    pub message: String,
}

impl KindInfo {
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    pub fn preferred_api_version(&self) -> String {
        self.api_version(self.versions[0])
    }

    /// The REST path of a collection (`name` = None) or an object, in the preferred version.
    pub fn path(&self, namespace: Option<&str>, name: Option<&str>) -> String {
        let mut path = if self.group.is_empty() {
            format!("/api/{}", self.versions[0])
        } else {
            format!("/apis/{}/{}", self.group, self.versions[0])
        };
        if let Some(ns) = namespace.filter(|_| self.namespaced) {
            path.push_str(&format!("/namespaces/{ns}"));
        }
        path.push('/');
        path.push_str(self.plural);
        if let Some(name) = name {
            path.push('/');
            path.push_str(name);
        }
        path
    }

    /// The JSON schema of the kind's body, its types' definitions added to
    /// `generator`.
    pub fn body_schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        (self.schema)(generator)
    }

    /// `workloadentry.networking.istio.io` style name, as kubectl prints it.
    pub fn qualified_name(&self) -> String {
        let singular = self.kind.to_ascii_lowercase();
        if self.group.is_empty() {
            singular
        } else {
            format!("{singular}.{}", self.group)
        }
    }
}

/// Typed decoding and validation of one kind's body, erased for the registry.
pub(crate) fn decode_body<B>(body: Value) -> Result<(Value, Checker), BodyError>
where
    B: DeserializeOwned + Serialize + Validate,
{
    let typed: B = serde_path_to_error::deserialize(body).map_err(|e| BodyError {
        path: render_path(e.path()),
        message: e.into_inner().to_string(),
    })?;
    let mut checker = Checker::default();
    typed.validate(&mut checker);
    let canonical = serde_json::to_value(&typed).map_err(|e| BodyError {
        path: String::new(),
        message: e.to_string(),
    })?;
    Ok((canonical, checker))
}

/// A body's schema, erased for the registry.
pub(crate) fn body_schema<B: schemars::JsonSchema>(
    generator: &mut schemars::SchemaGenerator,
) -> schemars::Schema {
    B::json_schema(generator)
}

/// serde_path_to_error's path in our `a.b[0].c` form.
pub(crate) fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = Path::default();
    for segment in path.iter() {
        out = match segment {
            Segment::Seq { index } => out.i(*index),
            Segment::Map { key } => out.f(key),
            Segment::Enum { variant } => out.f(variant),
            Segment::Unknown => out,
        };
    }
    out.as_str().to_string()
}

/// Every kind vmesh serves. Adding a kind: one file in `kinds/`, one line here.
static KINDS: &[&KindInfo] = &[
    &k::namespace::KIND,
    &k::service_account::KIND,
    &k::service::KIND,
    &k::config_map::KIND,
    &k::workload_group::KIND,
    &k::workload_entry::KIND,
    &k::service_entry::KIND,
    &k::destination_rule::KIND,
    &k::virtual_service::KIND,
    &k::gateway::KIND,
    &k::sidecar::KIND,
    &k::peer_authentication::KIND,
    &k::authorization_policy::KIND,
    &k::telemetry::KIND,
    &k::istio_operator::KIND,
];

pub fn kinds() -> &'static [&'static KindInfo] {
    KINDS
}

/// Kinds the server computes from the mesh and serves read-only (Endpoints):
/// `vmesh get` reads them, nothing writes them.
static VIEWS: &[&KindInfo] = &[&k::endpoints::KIND, &k::endpoint_slice::KIND];

pub fn views() -> &'static [&'static KindInfo] {
    VIEWS
}

/// The kind for an `apiVersion` and `kind` pair, if that version is served.
pub fn find_kind(api_version: &str, kind: &str) -> Option<&'static KindInfo> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    KINDS
        .iter()
        .copied()
        .find(|k| k.kind == kind && k.group == group && k.versions.contains(&version))
}

/// The kind a user means by a name on the command line: kind, plural, singular,
/// short name, or any of those qualified by group (`workloadentries.networking.istio.io`).
pub fn kind_for(name: &str) -> Option<&'static KindInfo> {
    KINDS.iter().copied().find(|k| names(k, name))
}

/// The read-only view ([`views`]) a user means by a name, as [`kind_for`] reads it.
pub fn view_for(name: &str) -> Option<&'static KindInfo> {
    VIEWS.iter().copied().find(|k| names(k, name))
}

/// Whether `name` (kind, plural, short name, maybe qualified by group) names `kind`.
fn names(kind: &KindInfo, name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let (base, group) = lower.split_once('.').unwrap_or((&lower, ""));
    let names_match = kind.kind.eq_ignore_ascii_case(base)
        || kind.plural == base
        || kind.short_names.contains(&base);
    names_match && (!lower.contains('.') || group == kind.group)
}

/// The closest known name to a misspelt one, for "did you mean" hints.
pub fn closest<'a>(candidates: impl IntoIterator<Item = &'a str>, wrong: &str) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&c.to_ascii_lowercase(), &wrong.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
