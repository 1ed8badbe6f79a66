//! The objects the registry reads, decoded into their typed bodies and sorted
//! by namespace and name. Objects of other kinds are ignored; bodies that do
//! not decode are skipped with a warning.
//!
//! Decoding is most of a rebuild's work, and few objects change between two
//! rebuilds: a [`DecodeCache`], which the caller keeps across rebuilds (the
//! registry itself keeps no state and does no I/O), holds each object's typed
//! body for the `resourceVersion` it was decoded from, as kube-rs' reflector
//! store keeps typed objects. An object is decoded once per version; entries
//! of objects that are gone are dropped at each build.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;
use vmesh_api::kinds::authorization_policy::{self, AuthorizationPolicy, AuthorizationPolicySpec};
use vmesh_api::kinds::destination_rule::{self, DestinationRule, DestinationRuleSpec};
use vmesh_api::kinds::istio_operator::{self, IstioOperator, IstioOperatorSpec};
use vmesh_api::kinds::peer_authentication::{self, PeerAuthentication, PeerAuthenticationSpec};
use vmesh_api::kinds::service::{self, Service, ServiceSpec};
use vmesh_api::kinds::service_entry::{self, ServiceEntry, ServiceEntrySpec};
use vmesh_api::kinds::telemetry::{self, Telemetry, TelemetrySpec};
use vmesh_api::kinds::virtual_service::{self, VirtualService, VirtualServiceSpec};
use vmesh_api::kinds::workload_entry::{self, WorkloadEntry, WorkloadEntrySpec};
use vmesh_api::mesh::OperatorRef;
use vmesh_api::{KindInfo, Object, ObjectKey};

use crate::model::{EndpointAddress, MeshSettings, Scoped};

/// Set on WorkloadEntries whose group has a readiness probe: such an entry is
/// healthy only once a `Healthy=True` condition says so.
pub const HEALTH_CHECKS_ANNOTATION: &str = "proxy.istio.io/health-checks-enabled";
/// Set on WorkloadEntries that auto-registration made: the WorkloadGroup
/// they came from, which is also their workload's name in metrics.
pub const GROUP_ANNOTATION: &str = "istio.io/autoRegistrationGroup";

/// The typed objects of one build, shared with the cache they came from.
#[derive(Clone, Default)]
pub(crate) struct Inputs {
    pub services: Vec<Arc<Scoped<ServiceSpec>>>,
    pub service_entries: Vec<Arc<Scoped<ServiceEntrySpec>>>,
    pub workloads: Vec<Arc<Workload>>,
    pub destination_rules: Vec<Arc<Scoped<DestinationRuleSpec>>>,
    pub virtual_services: Vec<Arc<Scoped<VirtualServiceSpec>>>,
    pub peer_authentications: Vec<Arc<Scoped<PeerAuthenticationSpec>>>,
    pub authorization_policies: Vec<Arc<Scoped<AuthorizationPolicySpec>>>,
    pub telemetries: Vec<Arc<Scoped<TelemetrySpec>>>,
    pub mesh: MeshSettings,
}

/// A WorkloadEntry, or an endpoint written inside a ServiceEntry.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    pub namespace: String,
    pub name: String,
    pub spec: WorkloadEntrySpec,
    /// The labels selectors match: Istio merges `metadata.labels` over `spec.labels`.
    pub labels: BTreeMap<String, String>,
    pub healthy: bool,
    /// The workload's name in metrics: its WorkloadGroup's for auto-registered
    /// entries (as the VM's agent names itself), else the entry's.
    pub workload_name: String,
    /// `None` for an entry with neither an address nor a network: it serves nothing.
    pub address: Option<EndpointAddress>,
}

/// Typed bodies by object, each for the `resourceVersion` it was decoded
/// from: what a caller keeps across [`Snapshot::build`](crate::Snapshot::build)s
/// so that an object is decoded once per version. Objects without a
/// `resourceVersion` (read from files rather than a store) are decoded every
/// time.
#[derive(Debug, Default)]
pub struct DecodeCache {
    entries: HashMap<ObjectKey, Cached>,
    /// Counts builds: an entry not seen in the latest is an object that is gone.
    build: u64,
}

#[derive(Debug)]
struct Cached {
    resource_version: String,
    /// `None`: the body does not decode.
    typed: Option<Typed>,
    /// The build that last saw the object.
    seen: u64,
}

/// An object's typed body.
#[derive(Debug, Clone)]
enum Typed {
    Service(Arc<Scoped<ServiceSpec>>),
    ServiceEntry(Arc<Scoped<ServiceEntrySpec>>),
    Workload(Arc<Workload>),
    DestinationRule(Arc<Scoped<DestinationRuleSpec>>),
    VirtualService(Arc<Scoped<VirtualServiceSpec>>),
    PeerAuthentication(Arc<Scoped<PeerAuthenticationSpec>>),
    AuthorizationPolicy(Arc<Scoped<AuthorizationPolicySpec>>),
    Telemetry(Arc<Scoped<TelemetrySpec>>),
    Operator(Arc<Scoped<IstioOperatorSpec>>),
}

/// Every kind the registry reads; objects of other kinds (ConfigMaps,
/// Secrets, Namespaces, …) never change the mesh, so a rebuild need not
/// read them.
pub const INPUT_KINDS: [&KindInfo; 9] = [
    &service::KIND,
    &service_entry::KIND,
    &destination_rule::KIND,
    &virtual_service::KIND,
    &peer_authentication::KIND,
    &authorization_policy::KIND,
    &telemetry::KIND,
    &istio_operator::KIND,
    &workload_entry::KIND,
];

impl Typed {
    /// The typed body of an object of a kind the registry reads: `None` for
    /// other kinds, `Some(None)` for a body that does not decode.
    fn decode(object: &Object) -> Option<Option<Typed>> {
        let info = object.info()?;
        let is = |kind: &KindInfo| std::ptr::eq(info, kind);
        Some(if is(&service::KIND) {
            scoped(object, |b: Service| b.spec).map(Typed::Service)
        } else if is(&service_entry::KIND) {
            scoped(object, |b: ServiceEntry| b.spec).map(Typed::ServiceEntry)
        } else if is(&destination_rule::KIND) {
            scoped(object, |b: DestinationRule| b.spec).map(Typed::DestinationRule)
        } else if is(&virtual_service::KIND) {
            scoped(object, |b: VirtualService| b.spec).map(Typed::VirtualService)
        } else if is(&peer_authentication::KIND) {
            scoped(object, |b: PeerAuthentication| b.spec).map(Typed::PeerAuthentication)
        } else if is(&authorization_policy::KIND) {
            scoped(object, |b: AuthorizationPolicy| b.spec).map(Typed::AuthorizationPolicy)
        } else if is(&telemetry::KIND) {
            scoped(object, |b: Telemetry| b.spec).map(Typed::Telemetry)
        } else if is(&istio_operator::KIND) {
            scoped(object, |b: IstioOperator| b.spec).map(Typed::Operator)
        } else if is(&workload_entry::KIND) {
            typed::<WorkloadEntry>(object)
                .map(|entry| Typed::Workload(Arc::new(Workload::from_entry(object, entry))))
        } else {
            return None;
        })
    }
}

impl DecodeCache {
    /// The typed body of `object` (`None` for other kinds and bodies that do
    /// not decode), from the cache when it holds this version.
    fn typed(&mut self, object: &Object) -> Option<Typed> {
        let version = object.metadata.resource_version.as_deref();
        let key = version.and_then(|_| object.key());
        if let (Some(key), Some(version)) = (&key, version)
            && let Some(cached) = self.entries.get_mut(key)
            && cached.resource_version == version
        {
            cached.seen = self.build;
            return cached.typed.clone();
        }
        let typed = Typed::decode(object)?;
        if let (Some(key), Some(version)) = (key, version) {
            let cached = Cached {
                resource_version: version.to_string(),
                typed: typed.clone(),
                seen: self.build,
            };
            self.entries.insert(key, cached);
        }
        typed
    }
}

impl Inputs {
    /// The objects of the kinds the registry reads, typed through `cache`,
    /// which then forgets the objects that are not among them.
    pub fn decode(objects: &[Object], cache: &mut DecodeCache) -> Inputs {
        cache.build += 1;
        let mut inputs = Inputs::default();
        let mut operators = Vec::new();
        for object in objects {
            match cache.typed(object) {
                Some(Typed::Service(s)) => inputs.services.push(s),
                Some(Typed::ServiceEntry(s)) => inputs.service_entries.push(s),
                Some(Typed::Workload(w)) => inputs.workloads.push(w),
                Some(Typed::DestinationRule(s)) => inputs.destination_rules.push(s),
                Some(Typed::VirtualService(s)) => inputs.virtual_services.push(s),
                Some(Typed::PeerAuthentication(s)) => inputs.peer_authentications.push(s),
                Some(Typed::AuthorizationPolicy(s)) => inputs.authorization_policies.push(s),
                Some(Typed::Telemetry(s)) => inputs.telemetries.push(s),
                Some(Typed::Operator(s)) => operators.push(s),
                None => {}
            }
        }
        let build = cache.build;
        cache.entries.retain(|_, cached| cached.seen == build);
        sort(&mut inputs.services);
        sort(&mut inputs.service_entries);
        sort(&mut inputs.destination_rules);
        sort(&mut inputs.virtual_services);
        sort(&mut inputs.peer_authentications);
        sort(&mut inputs.authorization_policies);
        sort(&mut inputs.telemetries);
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
        let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key));
        let checked = annotation(HEALTH_CHECKS_ANNOTATION).is_some_and(|v| v == "true");
        let group = annotation(GROUP_ANNOTATION).cloned();
        let healthy = match healthy_condition(entry.status.as_ref()) {
            Some(status) => status == "True",
            None => !checked,
        };
        let mut workload = Workload::new(
            namespace(object),
            meta.name().to_string(),
            entry.spec,
            labels,
            healthy,
        );
        if let Some(group) = group {
            workload.workload_name = group;
        }
        workload
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
            workload_name: name.clone(),
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

/// An object's spec with its namespace and name, if its body decodes.
pub(crate) fn scoped<B: DeserializeOwned, T>(
    object: &Object,
    spec: impl Fn(B) -> T,
) -> Option<Arc<Scoped<T>>> {
    typed(object).map(|body| {
        Arc::new(Scoped {
            namespace: namespace(object),
            name: object.metadata.name().to_string(),
            spec: spec(body),
        })
    })
}

fn namespace(object: &Object) -> String {
    object.metadata.namespace().unwrap_or("default").to_string()
}

fn sort<T>(items: &mut [Arc<Scoped<T>>]) {
    items.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
}

fn mesh_settings(operators: &[Arc<Scoped<IstioOperatorSpec>>]) -> MeshSettings {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::decode;
    use crate::{Snapshot, VipAllocator};

    const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: shop}
spec: {selector: {app: pay}, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm1, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: pay}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pay, namespace: shop}
spec: {host: pay, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
"#;

    /// The objects as a store hands them out, at `version`.
    fn stored(text: &str, version: &str) -> Vec<Object> {
        let mut objects = decode("t.yaml", text);
        for object in &mut objects {
            object.metadata.resource_version = Some(version.into());
        }
        objects
    }

    fn cached_kinds(cache: &DecodeCache) -> Vec<String> {
        let mut kinds: Vec<String> = cache.entries.keys().map(|k| k.plural.clone()).collect();
        kinds.sort();
        kinds
    }

    #[test]
    fn objects_are_decoded_once_per_version_and_forgotten_when_gone() {
        let (mut cache, mut vips) = (DecodeCache::default(), VipAllocator::default());
        let v1 = stored(MESH, "1");
        let first = Snapshot::build(&v1, &mut cache, &mut vips);
        let again = Snapshot::build(&v1, &mut cache, &mut vips);
        assert_eq!(first, again);
        assert!(
            Arc::ptr_eq(&first.destination_rules[0], &again.destination_rules[0]),
            "the same version is not decoded again"
        );
        assert_eq!(
            cached_kinds(&cache),
            ["destinationrules", "services", "workloadentries"]
        );

        // A new version is decoded again.
        let mut v2 = v1.clone();
        v2[2].body["spec"]["host"] = "pay.shop".into();
        v2[2].metadata.resource_version = Some("2".into());
        let changed = Snapshot::build(&v2, &mut cache, &mut vips);
        assert!(!Arc::ptr_eq(
            &first.destination_rules[0],
            &changed.destination_rules[0]
        ));
        assert_eq!(changed.destination_rules[0].spec.host, "pay.shop");

        // An object that is gone leaves the cache.
        Snapshot::build(&v2[..2], &mut cache, &mut vips);
        assert_eq!(cached_kinds(&cache), ["services", "workloadentries"]);
    }

    #[test]
    fn bodies_that_do_not_decode_are_remembered_until_a_new_version() {
        let (mut cache, mut vips) = (DecodeCache::default(), VipAllocator::default());
        let mut objects = stored(MESH, "1");
        let good = objects[0].clone();
        objects[0].body["spec"] = serde_json::json!({"ports": "not a list"});
        let snapshot = Snapshot::build(&objects, &mut cache, &mut vips);
        assert!(snapshot.services.is_empty());
        assert_eq!(cache.entries.len(), 3, "the broken body's version is known");
        objects[0] = good;
        objects[0].metadata.resource_version = Some("2".into());
        let snapshot = Snapshot::build(&objects, &mut cache, &mut vips);
        assert_eq!(snapshot.services[0].hostname, "pay.shop.svc.cluster.local");
    }

    #[test]
    fn objects_without_a_version_are_decoded_every_time() {
        let (mut cache, mut vips) = (DecodeCache::default(), VipAllocator::default());
        let objects = decode("t.yaml", MESH);
        let first = Snapshot::build(&objects, &mut cache, &mut vips);
        let again = Snapshot::build(&objects, &mut cache, &mut vips);
        assert_eq!(first, again);
        assert!(!Arc::ptr_eq(
            &first.destination_rules[0],
            &again.destination_rules[0]
        ));
        assert!(cache.entries.is_empty());
    }
}
