//! `vmesh analyze`: what is wrong with a set of objects, said as `istioctl
//! analyze` says it — a level, a message code, the object, a message.
//!
//! This module owns the analyzers and their messages: the codes, levels and
//! wording (Istio's `IST0…` where Istio has a message for the case, vmesh's
//! own `VM0…` where it has none), and the order messages are listed in.
//! Analyzers read the same join and lookups the xDS translation reads (the
//! [`Snapshot`], its [`Selector`]); none decides anew which rule applies
//! where. It does not read files or ask a server for objects, does not
//! validate objects (the `api` crate does: its problems become
//! [`Message::schema`] messages here), and does not print.
//!
//! | code | level | what |
//! |---|---|---|
//! | IST0101 | Error | a route's destination host (`host`, `mirror host`, `host:port`) or subset (`host+subset in destinationrule`), an AuthorizationPolicy's namespace, a Gateway's selector that names nothing |
//! | IST0106 | Error | the object is invalid (`vmesh validate`'s errors) |
//! | IST0118 | Info | a Service port name without a protocol prefix |
//! | IST0133 | Warning | `vmesh validate`'s warnings, among them what vmesh accepts but does not apply (parts of the Telemetry API, some mesh settings) |
//! | IST0150 | Warning | an ExternalName Service's port name without a protocol |
//! | IST0173 | Error | a DestinationRule subset that selects no workload of its host |
//! | IST0174 | Warning | a DestinationRule host that names no service |
//! | VM0001 | Warning | a DestinationRule whose traffic policy or subset is dropped by the merge with an earlier rule for the same host |
//! | VM0002 | Warning | a WorkloadGroup meant to serve that no Service selects |
//! | VM0003 | Error | a DestinationRule that disables TLS to a WorkloadEntry whose PeerAuthentication is STRICT |
//! | VM0004 | Warning | a Telemetry provider that does nothing: not defined in `extensionProviders`, of a kind that cannot do what it is named for, or a tracing collector that is not a service of the mesh |

mod routing;
mod security;
mod telemetry;
mod workloads;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use vmesh_api::Object;
use vmesh_api::kinds::gateway::{self, Gateway, GatewaySpec};
use vmesh_api::kinds::istio_operator::{self, IstioOperator, IstioOperatorSpec};
use vmesh_api::kinds::namespace;
use vmesh_api::kinds::workload_group::{self, WorkloadGroup, WorkloadGroupSpec};
use vmesh_api::mesh::DEFAULT_ROOT_NAMESPACE;

use crate::inputs::{DecodeCache, Inputs, scoped};
use crate::model::{MeshService, Scoped, Snapshot};
use crate::selector::{Labels, Selector};
use crate::vip::VipAllocator;

/// How bad a message is; the order is Istio's listing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Error,
    Warning,
    Info,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        }
    }

    /// `Error`, `Warning` or `Info`, in any case.
    pub fn parse(name: &str) -> Option<Level> {
        [Level::Error, Level::Warning, Level::Info]
            .into_iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(name))
    }

    /// Whether a message of this level is at least as bad as `threshold`.
    pub fn at_least(self, threshold: Level) -> bool {
        self <= threshold
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind of message: its code, name and level.
#[derive(Debug, PartialEq, Eq)]
pub struct Code {
    pub code: &'static str,
    pub name: &'static str,
    pub level: Level,
}

impl Code {
    const fn new(code: &'static str, name: &'static str, level: Level) -> Code {
        Code { code, name, level }
    }

    /// Istio's page for its own codes; vmesh's codes are described in the README.
    pub fn documentation_url(&self) -> Option<String> {
        self.code.starts_with("IST").then(|| {
            format!(
                "https://istio.io/latest/docs/reference/config/analysis/{}/",
                self.code.to_ascii_lowercase()
            )
        })
    }
}

pub static REFERENCED_RESOURCE_NOT_FOUND: Code =
    Code::new("IST0101", "ReferencedResourceNotFound", Level::Error);
pub static SCHEMA_VALIDATION_ERROR: Code =
    Code::new("IST0106", "SchemaValidationError", Level::Error);
pub static PORT_NAME_NOT_UNDER_NAMING_CONVENTION: Code =
    Code::new("IST0118", "PortNameIsNotUnderNamingConvention", Level::Info);
pub static SCHEMA_WARNING: Code = Code::new("IST0133", "SchemaWarning", Level::Warning);
pub static EXTERNAL_NAME_INVALID_PORT_NAME: Code = Code::new(
    "IST0150",
    "ExternalNameServiceTypeInvalidPortName",
    Level::Warning,
);
pub static SUBSET_SELECTS_NO_WORKLOAD: Code = Code::new(
    "IST0173",
    "DestinationRuleSubsetNotSelectPods",
    Level::Error,
);
pub static UNKNOWN_DESTINATION_RULE_HOST: Code =
    Code::new("IST0174", "UnknownDestinationRuleHost", Level::Warning);
pub static DESTINATION_RULE_NOT_MERGED: Code =
    Code::new("VM0001", "DestinationRuleNotMerged", Level::Warning);
pub static WORKLOAD_GROUP_NOT_SELECTED: Code =
    Code::new("VM0002", "WorkloadGroupNotSelected", Level::Warning);
pub static TLS_DISABLED_TO_STRICT_WORKLOAD: Code =
    Code::new("VM0003", "TlsDisabledToStrictWorkload", Level::Error);
pub static TELEMETRY_PROVIDER_NOT_APPLIED: Code =
    Code::new("VM0004", "TelemetryProviderNotApplied", Level::Warning);

/// Every code a message can have.
pub static CODES: &[&Code] = &[
    &REFERENCED_RESOURCE_NOT_FOUND,
    &SCHEMA_VALIDATION_ERROR,
    &PORT_NAME_NOT_UNDER_NAMING_CONVENTION,
    &SCHEMA_WARNING,
    &EXTERNAL_NAME_INVALID_PORT_NAME,
    &SUBSET_SELECTS_NO_WORKLOAD,
    &UNKNOWN_DESTINATION_RULE_HOST,
    &DESTINATION_RULE_NOT_MERGED,
    &WORKLOAD_GROUP_NOT_SELECTED,
    &TLS_DISABLED_TO_STRICT_WORKLOAD,
    &TELEMETRY_PROVIDER_NOT_APPLIED,
];

/// The object a message is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource {
    pub kind: String,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
}

impl Resource {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Resource {
        Resource {
            kind: kind.to_string(),
            namespace: Some(namespace.to_string()),
            name: name.to_string(),
        }
    }

    /// The resource named as `vmesh validate` names objects (`Kind ns/name`, `Kind name`).
    pub fn from_display_name(name: &str) -> Option<Resource> {
        let (kind, rest) = name.split_once(' ')?;
        let (namespace, name) = match rest.split_once('/') {
            Some((namespace, name)) => (Some(namespace.to_string()), name),
            None => (None, rest),
        };
        Some(Resource {
            kind: kind.to_string(),
            namespace,
            name: name.to_string(),
        })
    }

    /// `Kind namespace/name` (`Kind name` when cluster-scoped), as istioctl names resources.
    pub fn friendly_name(&self) -> String {
        vmesh_api::object::display_name(&self.kind, self.namespace.as_deref(), &self.name)
    }

    /// The namespace the resource is analyzed in: its own, or its name for a Namespace.
    pub fn scope(&self) -> &str {
        match &self.namespace {
            Some(namespace) => namespace,
            None if self.kind == namespace::KIND.kind => &self.name,
            None => "",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub code: &'static Code,
    pub resource: Option<Resource>,
    /// The field the message points at (`spec.http[0].route[1].destination.subset`),
    /// for locating it in the source; empty for the whole object.
    pub field: String,
    pub text: String,
}

impl Message {
    fn new(code: &'static Code, resource: Resource, field: String, text: String) -> Message {
        Message {
            code,
            resource: Some(resource),
            field,
            text,
        }
    }

    /// A problem `vmesh validate` found in an object (`object` as it names
    /// it), as istioctl reports schema problems: IST0106 for errors,
    /// IST0133 for warnings.
    pub fn schema(error: bool, object: &str, field: &str, problem: &str) -> Message {
        let (code, what) = if error {
            (&SCHEMA_VALIDATION_ERROR, "error")
        } else {
            (&SCHEMA_WARNING, "warning")
        };
        let problem = if field.is_empty() {
            problem.to_string()
        } else {
            format!("{field}: {problem}")
        };
        Message {
            code,
            resource: Resource::from_display_name(object),
            field: field.to_string(),
            text: format!("Schema validation {what}: {problem}"),
        }
    }

    pub fn level(&self) -> Level {
        self.code.level
    }

    /// istioctl's line: `Error [IST0101] (VirtualService ns/name file:12) Referenced …`,
    /// `reference` being where the object was read from, when known.
    pub fn line(&self, reference: Option<&str>) -> String {
        let origin = match (&self.resource, reference) {
            (Some(resource), Some(reference)) => {
                format!(" ({} {reference})", resource.friendly_name())
            }
            (Some(resource), None) => format!(" ({})", resource.friendly_name()),
            (None, _) => String::new(),
        };
        format!(
            "{} [{}]{origin} {}",
            self.level(),
            self.code.code,
            self.text
        )
    }
}

/// Where a message goes in istioctl's order: level, code, resource (kind,
/// name, namespace), then the line itself.
pub fn order(message: &Message) -> impl Ord + use<> {
    (
        message.level(),
        message.code.code,
        message
            .resource
            .as_ref()
            .map(|r| (r.kind.clone(), r.name.clone(), r.namespace.clone())),
        message.line(None),
    )
}

/// Puts messages in istioctl's [`order`] and drops repeats of the same line.
pub fn sort(messages: &mut Vec<Message>) {
    messages.sort_by_cached_key(order);
    messages.dedup_by(|a, b| a.line(None) == b.line(None));
}

/// Every analyzer's messages about `objects`, sorted (see [`sort`]).
pub fn analyze(objects: &[Object]) -> Vec<Message> {
    let mesh = Mesh::new(objects);
    let mut out = Vec::new();
    routing::analyze(&mesh, &mut out);
    workloads::analyze(&mesh, &mut out);
    security::analyze(&mesh, &mut out);
    telemetry::analyze(&mesh, &mut out);
    sort(&mut out);
    out
}

/// What the analyzers look at: the snapshot the xDS translation would be
/// made from, the typed objects it was joined from, and the kinds only
/// analysis reads.
pub(crate) struct Mesh {
    pub snapshot: Snapshot,
    pub inputs: Inputs,
    pub groups: Vec<Arc<Scoped<WorkloadGroupSpec>>>,
    pub gateways: Vec<Arc<Scoped<GatewaySpec>>>,
    /// Namespaces that exist: those declared, those objects live in, and the server's own.
    pub namespaces: BTreeSet<String>,
    /// What installing the mesh creates without an object saying so: the
    /// control plane's Service and the IstioOperators' gateways, by
    /// hostname, with the labels of their workloads (none for istiod).
    pub installed: BTreeMap<String, Labels>,
}

/// Where a host written in a rule leads.
pub(crate) enum Host<'a> {
    Service(&'a MeshService),
    /// Created by the installation (istiod, a gateway of an IstioOperator).
    Installed,
    Unknown,
}

fn of_kind<B, T>(
    objects: &[Object],
    kind: &vmesh_api::KindInfo,
    spec: impl Fn(B) -> T,
) -> Vec<Arc<Scoped<T>>>
where
    B: serde::de::DeserializeOwned,
{
    objects
        .iter()
        .filter(|o| o.info().is_some_and(|info| std::ptr::eq(info, kind)))
        .filter_map(|o| scoped(o, &spec))
        .collect()
}

impl Mesh {
    pub fn new(objects: &[Object]) -> Mesh {
        let inputs = Inputs::decode(objects, &mut DecodeCache::default());
        let snapshot = Snapshot::from_inputs(inputs.clone(), &mut VipAllocator::default());
        let groups = of_kind(objects, &workload_group::KIND, |g: WorkloadGroup| g.spec);
        let gateways = of_kind(objects, &gateway::KIND, |g: Gateway| g.spec);
        let operators = of_kind(objects, &istio_operator::KIND, |o: IstioOperator| o.spec);

        let mut namespaces: BTreeSet<String> = [DEFAULT_ROOT_NAMESPACE, "default"]
            .into_iter()
            .chain([snapshot.mesh.root_namespace.as_str()])
            .map(str::to_string)
            .collect();
        for object in objects {
            let declared = object.kind == namespace::KIND.kind;
            namespaces.extend(
                object
                    .metadata
                    .namespace()
                    .or(declared.then(|| object.metadata.name()))
                    .map(str::to_string),
            );
        }

        let suffix = &snapshot.mesh.domain_suffix;
        let mut installed = BTreeMap::new();
        installed.insert(
            format!("istiod.{DEFAULT_ROOT_NAMESPACE}.svc.{suffix}"),
            Labels::new(),
        );
        for operator in &operators {
            installed.extend(installed_gateways(operator, suffix));
        }
        Mesh {
            snapshot,
            inputs,
            groups,
            gateways,
            namespaces,
            installed,
        }
    }

    /// Where `host`, written in a rule in `namespace`, leads: a service of
    /// the mesh (a wildcard ServiceEntry host covers the names below it),
    /// something the installation creates, or nothing.
    pub fn host(&self, host: &str, namespace: &str) -> Host<'_> {
        let qualified = self.snapshot.qualify(host, namespace);
        if let Some(service) = self.snapshot.service(&qualified) {
            return Host::Service(service);
        }
        if self.installed.contains_key(&qualified) {
            return Host::Installed;
        }
        let below = |wildcard: &str, name: &str| {
            wildcard
                .strip_prefix('*')
                .is_some_and(|suffix| name.trim_start_matches('*').ends_with(suffix))
        };
        let covered = self
            .snapshot
            .services
            .iter()
            .find(|s| below(&s.hostname, &qualified) || below(&qualified, &s.hostname));
        match covered {
            Some(service) => Host::Service(service),
            None => Host::Unknown,
        }
    }

    /// The labels of every workload that is or will be in the mesh:
    /// WorkloadEntries (with the namespace they live in) and what a
    /// WorkloadGroup gives the entries of its VMs.
    pub fn workload_labels(&self) -> impl Iterator<Item = (&str, &Labels)> {
        let entries = self
            .inputs
            .workloads
            .iter()
            .map(|w| (w.namespace.as_str(), &w.labels));
        let groups = self
            .groups
            .iter()
            .map(|g| (g.namespace.as_str(), group_labels(&g.spec)));
        entries.chain(groups)
    }
}

static NO_LABELS: Labels = Labels::new();

/// The labels a WorkloadGroup gives its entries.
pub(crate) fn group_labels(spec: &WorkloadGroupSpec) -> &Labels {
    spec.metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .unwrap_or(&NO_LABELS)
}

/// The gateways an IstioOperator installs: each enabled one's Service
/// hostname and its workloads' labels (Istio's defaults when it names none).
fn installed_gateways(operator: &Scoped<IstioOperatorSpec>, suffix: &str) -> Vec<(String, Labels)> {
    let spec = &operator.spec;
    let components = spec.components.iter().flat_map(|c| {
        c.ingress_gateways
            .iter()
            .flatten()
            .chain(c.egress_gateways.iter().flatten())
    });
    components
        .filter(|gw| gw.enabled != Some(false))
        .map(|gw| {
            let namespace = gw
                .namespace
                .as_deref()
                .or(spec.namespace.as_deref())
                .unwrap_or(DEFAULT_ROOT_NAMESPACE);
            let labels = gw.label.clone().unwrap_or_else(|| {
                let istio = gw.name.strip_prefix("istio-").unwrap_or(&gw.name);
                [("app", gw.name.as_str()), ("istio", istio)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            });
            (format!("{}.{namespace}.svc.{suffix}", gw.name), labels)
        })
        .collect()
}

/// Labels as a Kubernetes selector string: `app=web,version=v1`.
pub(crate) fn selector_string(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a non-empty selector selects `labels` (an empty one selects nothing here).
pub(crate) fn selects(selector: Option<&Labels>, labels: &Labels) -> bool {
    let selector = Selector::new(selector);
    !selector.is_empty() && selector.matches(labels)
}
