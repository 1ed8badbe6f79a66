//! The objects the registry reads, decoded into their typed bodies and sorted
//! by namespace and name. Objects of other kinds are ignored; bodies that do
//! not decode are skipped with a warning.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;
use vmesh_api::kinds::authorization_policy::{self, AuthorizationPolicy, AuthorizationPolicySpec};
use vmesh_api::kinds::destination_rule::{self, DestinationRule, DestinationRuleSpec};
use vmesh_api::kinds::istio_operator::{self, IstioOperator, IstioOperatorSpec};
use vmesh_api::kinds::peer_authentication::{self, PeerAuthentication, PeerAuthenticationSpec};
use vmesh_api::kinds::service::{self, Service, ServiceSpec};
use vmesh_api::kinds::service_entry::{self, ServiceEntry, ServiceEntrySpec};
use vmesh_api::kinds::virtual_service::{self, VirtualService, VirtualServiceSpec};
use vmesh_api::kinds::workload_entry::{self, WorkloadEntry, WorkloadEntrySpec};
use vmesh_api::mesh::OperatorRef;
use vmesh_api::{KindInfo, Object};

use crate::model::{EndpointAddress, MeshSettings, Scoped};

/// Set on WorkloadEntries whose group has a readiness probe: such an entry is
/// healthy only once a `Healthy=True` condition says so.
pub const HEALTH_CHECKS_ANNOTATION: &str = "proxy.istio.io/health-checks-enabled";

#[derive(Default)]
pub(crate) struct Inputs {
    pub services: Vec<Scoped<ServiceSpec>>,
    pub service_entries: Vec<Scoped<ServiceEntrySpec>>,
    pub workloads: Vec<Workload>,
    pub destination_rules: Vec<Scoped<DestinationRuleSpec>>,
    pub virtual_services: Vec<Scoped<VirtualServiceSpec>>,
    pub peer_authentications: Vec<Scoped<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Scoped<AuthorizationPolicySpec>>,
    pub mesh: MeshSettings,
}

/// A WorkloadEntry, or an endpoint written inside a ServiceEntry.
#[derive(Clone)]
pub(crate) struct Workload {
    pub namespace: String,
    pub name: String,
    pub spec: WorkloadEntrySpec,
    /// The labels selectors match: Istio merges `metadata.labels` over `spec.labels`.
    pub labels: BTreeMap<String, String>,
    pub healthy: bool,
    /// `None` for an entry with neither an address nor a network: it serves nothing.
    pub address: Option<EndpointAddress>,
}

impl Inputs {
    pub fn decode(objects: &[Object]) -> Inputs {
        let mut inputs = Inputs::default();
        let mut operators = Vec::new();
        for object in objects {
            let Some(info) = object.info() else { continue };
            let is = |kind: &KindInfo| std::ptr::eq(info, kind);
            if is(&service::KIND) {
                push(&mut inputs.services, object, |b: Service| b.spec);
            } else if is(&service_entry::KIND) {
                push(&mut inputs.service_entries, object, |b: ServiceEntry| {
                    b.spec
                });
            } else if is(&destination_rule::KIND) {
                push(
                    &mut inputs.destination_rules,
                    object,
                    |b: DestinationRule| b.spec,
                );
            } else if is(&virtual_service::KIND) {
                push(&mut inputs.virtual_services, object, |b: VirtualService| {
                    b.spec
                });
            } else if is(&peer_authentication::KIND) {
                push(
                    &mut inputs.peer_authentications,
                    object,
                    |b: PeerAuthentication| b.spec,
                );
            } else if is(&authorization_policy::KIND) {
                push(
                    &mut inputs.authorization_policies,
                    object,
                    |b: AuthorizationPolicy| b.spec,
                );
            } else if is(&istio_operator::KIND) {
                push(&mut operators, object, |b: IstioOperator| b.spec);
            } else if is(&workload_entry::KIND)
                && let Some(entry) = typed::<WorkloadEntry>(object)
            {
                inputs.workloads.push(Workload::from_entry(object, entry));
            }
        }
        sort(&mut inputs.services);
        sort(&mut inputs.service_entries);
        sort(&mut inputs.destination_rules);
        sort(&mut inputs.virtual_services);
        sort(&mut inputs.peer_authentications);
        sort(&mut inputs.authorization_policies);
        sort(&mut operators);
        inputs
            .workloads
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        inputs.mesh = mesh_settings(&operators);
        inputs
    }
}

impl Workload {
    fn from_entry(object: &Object, entry: WorkloadEntry) -> Workload {
        let meta = &object.metadata;
        let mut labels = entry.spec.labels.clone().unwrap_or_default();
        labels.extend(meta.labels.clone().unwrap_or_default());
        let checked = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(HEALTH_CHECKS_ANNOTATION))
            .is_some_and(|v| v == "true");
        let healthy = match healthy_condition(entry.status.as_ref()) {
            Some(status) => status == "True",
            None => !checked,
        };
        Workload::new(
            namespace(object),
            meta.name().to_string(),
            entry.spec,
            labels,
            healthy,
        )
    }

    /// An endpoint written inside a ServiceEntry or Service: always healthy.
    pub fn written(namespace: &str, name: &str, spec: WorkloadEntrySpec) -> Workload {
        let labels = spec.labels.clone().unwrap_or_default();
        Workload::new(namespace.to_string(), name.to_string(), spec, labels, true)
    }

    fn new(
        namespace: String,
        name: String,
        spec: WorkloadEntrySpec,
        labels: BTreeMap<String, String>,
        healthy: bool,
    ) -> Workload {
        let address = EndpointAddress::parse(spec.address.as_deref(), spec.network.as_deref());
        if address.is_none() {
            tracing::warn!(workload = %format!("{namespace}/{name}"), "a workload without address or network serves nothing");
        }
        Workload {
            namespace,
            name,
            spec,
            labels,
            healthy,
            address,
        }
    }
}

/// The `status` of the `Healthy` condition in an entry's status, if any.
fn healthy_condition(status: Option<&Value>) -> Option<&str> {
    status?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Healthy"))?
        .get("status")?
        .as_str()
}

fn typed<B: DeserializeOwned>(object: &Object) -> Option<B> {
    object
        .typed()
        .inspect_err(|error| {
            tracing::warn!(object = %object.display_name(), %error, "skipping object with an invalid body");
        })
        .ok()
}

fn push<B: DeserializeOwned, T>(out: &mut Vec<Scoped<T>>, object: &Object, spec: impl Fn(B) -> T) {
    if let Some(body) = typed(object) {
        out.push(Scoped {
            namespace: namespace(object),
            name: object.metadata.name().to_string(),
            spec: spec(body),
        });
    }
}

fn namespace(object: &Object) -> String {
    object.metadata.namespace().unwrap_or("default").to_string()
}

fn sort<T>(items: &mut [Scoped<T>]) {
    items.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
}

fn mesh_settings(operators: &[Scoped<IstioOperatorSpec>]) -> MeshSettings {
    let operators: Vec<OperatorRef<'_>> = operators
        .iter()
        .map(|o| OperatorRef {
            namespace: &o.namespace,
            name: &o.name,
            spec: &o.spec,
        })
        .collect();
    MeshSettings::resolve(&operators, None)
}
