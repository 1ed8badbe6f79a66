//! Analyzers of Telemetry resources: a provider name the mesh does not
//! define (Istio skips it without a word: no log, no trace), a provider of
//! a kind that cannot do what it is named for, and a tracing collector that
//! is not a service of the mesh (Envoy would have nowhere to send spans).

use vmesh_api::kinds::istio_operator::ExtensionProvider;
use vmesh_api::kinds::telemetry::TelemetrySpec;

use super::{Mesh, Message, Resource, TELEMETRY_PROVIDER_NOT_APPLIED};
use crate::model::Scoped;
use crate::telemetry::{ENVOY_PROVIDER, PROMETHEUS_PROVIDER};

pub(super) fn analyze(mesh: &Mesh, out: &mut Vec<Message>) {
    for telemetry in &mesh.snapshot.telemetries {
        providers(mesh, telemetry, out);
    }
}

/// What a provider is named for.
#[derive(Clone, Copy)]
enum Use {
    AccessLogging,
    Tracing,
    Metrics,
}

impl Use {
    fn field(self) -> &'static str {
        match self {
            Use::AccessLogging => "accessLogging",
            Use::Tracing => "tracing",
            Use::Metrics => "metrics",
        }
    }
}

fn providers(mesh: &Mesh, telemetry: &Scoped<TelemetrySpec>, out: &mut Vec<Message>) {
    let spec = &telemetry.spec;
    let named = |entries: Vec<Option<&Vec<vmesh_api::kinds::telemetry::ProviderRef>>>,
                 what: Use| {
        entries
            .into_iter()
            .enumerate()
            .flat_map(move |(i, providers)| {
                providers
                    .into_iter()
                    .flatten()
                    .enumerate()
                    .map(move |(j, p)| (what, i, j, p.name.clone()))
            })
            .collect::<Vec<_>>()
    };
    let mut all = named(
        spec.access_logging
            .iter()
            .flatten()
            .map(|e| e.providers.as_ref())
            .collect(),
        Use::AccessLogging,
    );
    all.extend(named(
        spec.tracing
            .iter()
            .flatten()
            .map(|e| e.providers.as_ref())
            .collect(),
        Use::Tracing,
    ));
    all.extend(named(
        spec.metrics
            .iter()
            .flatten()
            .map(|e| e.providers.as_ref())
            .collect(),
        Use::Metrics,
    ));
    let resource = Resource::new("Telemetry", &telemetry.namespace, &telemetry.name);
    for (what, i, j, name) in all {
        let field = format!("spec.{}[{i}].providers[{j}].name", what.field());
        if let Some(problem) = problem(mesh, what, &name) {
            out.push(Message::new(
                &TELEMETRY_PROVIDER_NOT_APPLIED,
                resource.clone(),
                field,
                problem,
            ));
        }
    }
}

/// Why provider `name` does nothing where it is named, if it does nothing.
fn problem(mesh: &Mesh, what: Use, name: &str) -> Option<String> {
    let defined = mesh
        .snapshot
        .mesh
        .telemetry
        .extension_providers
        .iter()
        .find(|p| p.name == name);
    let Some(provider) = defined else {
        return match (what, name) {
            (Use::AccessLogging, ENVOY_PROVIDER) | (Use::Metrics, PROMETHEUS_PROVIDER) => None,
            _ => Some(format!(
                "provider {name:?} is not defined in meshConfig.extensionProviders: {}",
                consequence(what)
            )),
        };
    };
    let fits = match what {
        Use::AccessLogging => provider.envoy_file_access_log.is_some(),
        Use::Tracing => provider.zipkin.is_some() || provider.opentelemetry.is_some(),
        Use::Metrics => provider.prometheus.is_some(),
    };
    if !fits {
        return Some(format!(
            "provider {name:?} is not of a kind vmesh applies to {}: {}",
            what.field(),
            consequence(what)
        ));
    }
    if let Use::Tracing = what {
        return collector_problem(mesh, provider);
    }
    None
}

fn consequence(what: Use) -> &'static str {
    match what {
        Use::AccessLogging => "nothing is logged to it",
        Use::Tracing => "the workloads it selects are not traced",
        Use::Metrics => "no metrics are sent to it",
    }
}

/// A tracer's collector must be a service of the mesh with that port.
fn collector_problem(mesh: &Mesh, provider: &ExtensionProvider) -> Option<String> {
    let (service, port) = match (&provider.zipkin, &provider.opentelemetry) {
        (Some(z), _) => (&z.service, z.port),
        (_, Some(o)) => (&o.service, o.port),
        _ => return None,
    };
    let host = service.split_once('/').map_or(service.as_str(), |(_, h)| h);
    let found = mesh
        .snapshot
        .service(host)
        .is_some_and(|s| s.ports.iter().any(|p| u32::from(p.port) == port));
    (!found).then(|| {
        format!(
            "provider {:?} sends spans to {host}:{port}, which is not a service of the mesh: the workloads it selects are not traced",
            provider.name
        )
    })
}
