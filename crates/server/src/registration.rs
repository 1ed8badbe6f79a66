//! WorkloadEntry auto-registration, as Istio does it: a proxy that connects
//! with `AUTO_REGISTER_GROUP` metadata gets a WorkloadEntry made from that
//! WorkloadGroup, provided its proven identity is the group's namespace and
//! service account. When its last stream ends the entry is marked
//! disconnected and deleted after a grace period, unless it reconnects; a
//! refusal is written on the group's status for the operator to see.
//!
//! Health reports land here too: they become the `Healthy` condition of the
//! proxy's entry — the one it registered, or the one its
//! `ISTIO_META_WORKLOAD_ENTRY` names, provided that entry runs as the
//! proxy's proven service account.
//!
//! This module decides what entries exist; xDS tells it who connects, and the
//! registry turns entries into endpoints.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde_json::{Value, json};
use tonic::Status;
use vmesh_api::kinds::workload_group::WorkloadGroup;
use vmesh_api::{Object, ObjectKey, ObjectMeta};
use vmesh_store::{Op, Selection, Store};
use vmesh_xds::ads::{CallerIdentity, HealthReport, ProxyLifecycle};
use vmesh_xds::node::Proxy;

pub use vmesh_registry::GROUP_ANNOTATION;
pub const CONTROLLER_ANNOTATION: &str = "istio.io/workloadController";
pub const CONNECTED_AT_ANNOTATION: &str = "istio.io/connectedAt";
pub const DISCONNECTED_AT_ANNOTATION: &str = "istio.io/disconnectedAt";
/// The metadata key naming the group a proxy registers into.
const GROUP_METADATA: &str = "AUTO_REGISTER_GROUP";
/// The metadata key naming a manually made entry a proxy reports health for.
const ENTRY_METADATA: &str = "WORKLOAD_ENTRY";
/// Kubernetes' limit on a name.
const MAX_NAME: usize = 253;

/// Follows proxies that register themselves.
pub struct AutoRegistration {
    store: Arc<Store>,
    /// This server's name in `istio.io/workloadController`.
    controller: String,
    grace: Duration,
    /// Live streams per entry (namespace, name).
    streams: Mutex<HashMap<(String, String), HashSet<u64>>>,
    runtime: tokio::runtime::Handle,
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn key(plural: &str, group: &str, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        group: group.into(),
        plural: plural.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn entry_key(namespace: &str, name: &str) -> ObjectKey {
    key("workloadentries", "networking.istio.io", namespace, name)
}

fn missing(namespace: &str, name: &str) -> Status {
    Status::not_found(format!("WorkloadEntry {namespace}/{name} does not exist"))
}

/// Istio's entry name: `<group>-<ip, ':' → '-'>[-<network>]`, kept to 253 characters.
pub fn entry_name(group: &str, proxy: &Proxy) -> String {
    let mut name = format!("{group}-{}", proxy.ip.to_string().replace(':', "-"));
    if let Some(network) = &proxy.network {
        name = format!("{name}-{network}");
    }
    name.truncate(MAX_NAME);
    name
}

impl AutoRegistration {
    /// Must be made inside the runtime that runs the timers.
    pub fn new(store: Arc<Store>, grace: Duration) -> AutoRegistration {
        AutoRegistration {
            store,
            controller: format!("vmesh-{}", uuid::Uuid::new_v4()),
            grace,
            streams: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Deletes registered entries nobody holds: every entry whose
    /// controller is gone (a server that stopped, or on a shared store one
    /// whose heartbeat stopped), once its grace period has passed without a
    /// reconnect. This server takes each over first, with a write over the
    /// version it read, so that of several servers sweeping at once one
    /// does it.
    pub fn sweep_orphans(self: &Arc<Self>) {
        let entries = Selection::of_kind(&vmesh_api::kinds::workload_entry::KIND, None);
        let objects = match self.store.list(&entries) {
            Ok((objects, _)) => objects,
            Err(e) => {
                tracing::error!("auto-registration sweep cannot read the store: {e}");
                return;
            }
        };
        let alive = match self.live_controllers() {
            Ok(alive) => alive,
            Err(e) => {
                tracing::error!("auto-registration sweep cannot read the heartbeats: {e}");
                return;
            }
        };
        for entry in objects {
            let annotations = entry.metadata.annotations.clone().unwrap_or_default();
            let orphaned = annotations.contains_key(GROUP_ANNOTATION)
                && annotations
                    .get(CONTROLLER_ANNOTATION)
                    .is_none_or(|controller| !alive.contains(controller));
            if orphaned {
                let namespace = entry.metadata.namespace.clone().unwrap_or_default();
                let name = entry.metadata.name().to_string();
                tracing::info!(
                    controller = annotations.get(CONTROLLER_ANNOTATION).map(String::as_str),
                    "taking over {namespace}/{name} from a controller that is gone"
                );
                self.forget_later(namespace, name, Claim::TakeOver);
            }
        }
    }

    /// The controllers alive now: this one, and on a shared store each
    /// whose heartbeat is recent.
    fn live_controllers(&self) -> Result<HashSet<String>, vmesh_store::StoreError> {
        let mut alive = HashSet::from([self.controller.clone()]);
        if self.store.is_shared() {
            let now = unix_now();
            for (name, beat) in self.store.records(HEARTBEAT_RECORDS)? {
                if fresh(&beat, now)
                    && let Some(controller) = name.strip_prefix(HEARTBEAT_RECORDS)
                {
                    alive.insert(controller.to_string());
                }
            }
        }
        Ok(alive)
    }

    /// Until shutdown: on a shared store, this server's heartbeat every
    /// [`HEARTBEAT`], and a sweep for the entries of controllers that
    /// stopped, once each time a heartbeat goes stale (not at every beat: a
    /// sweep reads every WorkloadEntry).
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        if !self.store.is_shared() {
            return;
        }
        let mut every = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            let this = self.clone();
            let beaten = tokio::task::spawn_blocking(move || {
                this.beat(unix_now())?;
                this.sweep_after_stale_heartbeats()
            })
            .await;
            if let Ok(Err(e)) = beaten {
                tracing::warn!("auto-registration heartbeat: {e}");
            }
        }
        // Stopping on purpose: a heartbeat of long ago, so that the others
        // take over at their next beat rather than after it ages.
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.beat(0)).await;
    }

    fn beat(&self, at: u64) -> Result<(), vmesh_store::StoreError> {
        self.store.write_records(vec![(
            format!("{HEARTBEAT_RECORDS}{}", self.controller),
            Some(at.to_string().into_bytes()),
        )])
    }

    /// Sweeps if any other controller's heartbeat is stale, then forgets
    /// those heartbeats (only as read: one that beat again meanwhile stays).
    fn sweep_after_stale_heartbeats(self: &Arc<Self>) -> Result<(), vmesh_store::StoreError> {
        let now = unix_now();
        let stale: Vec<(String, Vec<u8>)> = self
            .store
            .records(HEARTBEAT_RECORDS)?
            .into_iter()
            .filter(|(_, beat)| !fresh(beat, now))
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        self.sweep_orphans();
        for (name, beat) in stale {
            self.store.swap_record(&name, Some(&beat), None)?;
        }
        Ok(())
    }

    fn refuse(&self, proxy: &Proxy, group: &str, message: String) -> Status {
        tracing::warn!(proxy = %proxy.id, group, "auto-registration refused: {message}");
        let group_key = key(
            "workloadgroups",
            "networking.istio.io",
            &proxy.namespace,
            group,
        );
        if let Ok(Some(mut object)) = self.store.get(&group_key) {
            object.body.insert(
                "status".into(),
                json!({"conditions": [{
                    "type": "AutoRegistration",
                    "status": "False",
                    "reason": "Refused",
                    "message": format!("{}: {message}", proxy.id),
                    "lastTransitionTime": now(),
                }]}),
            );
            if let Err(e) = self.store.commit(vec![Op::SetStatus(object)]) {
                tracing::error!("cannot record the refusal on WorkloadGroup {group}: {e}");
            }
        }
        Status::permission_denied(format!("auto-registration into {group}: {message}"))
    }

    /// The entry a proxy registers as, from its group.
    fn entry_for(
        &self,
        proxy: &Proxy,
        group_name: &str,
        caller: Option<&CallerIdentity>,
    ) -> Result<Object, Status> {
        let group_key = key(
            "workloadgroups",
            "networking.istio.io",
            &proxy.namespace,
            group_name,
        );
        let object = self
            .store
            .get(&group_key)
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "WorkloadGroup {}/{group_name} does not exist",
                    proxy.namespace
                ))
            })?;
        let group: WorkloadGroup = serde_json::from_value(Value::Object(object.body.clone()))
            .map_err(|e| Status::internal(format!("WorkloadGroup {group_name}: {e}")))?;
        let account = group
            .spec
            .template
            .service_account
            .clone()
            .unwrap_or_else(|| "default".into());
        if let Some(caller) = caller
            && (caller.namespace != proxy.namespace || caller.service_account != account)
        {
            return Err(self.refuse(
                proxy,
                group_name,
                format!(
                    "its identity is {}/{} but group {}/{group_name} runs as {}/{account}",
                    caller.namespace, caller.service_account, proxy.namespace, proxy.namespace
                ),
            ));
        }
        // Labels: template, then the group's metadata, then what the proxy says.
        let mut labels: BTreeMap<String, String> =
            group.spec.template.labels.clone().unwrap_or_default();
        let metadata = group.spec.metadata.clone().unwrap_or_default();
        labels.extend(metadata.labels.unwrap_or_default());
        labels.extend(proxy.labels.clone());
        // It registered through its sidecar: it speaks mesh mTLS.
        labels
            .entry(vmesh_xds::mtls::TLS_MODE_LABEL.into())
            .or_insert_with(|| "istio".into());
        let mut annotations = metadata.annotations.unwrap_or_default();
        if group.spec.probe.is_some() {
            // Out of EDS until the agent's probe says it is healthy.
            annotations.insert(
                vmesh_registry::HEALTH_CHECKS_ANNOTATION.into(),
                "true".into(),
            );
        }
        annotations.insert(GROUP_ANNOTATION.into(), group_name.into());
        annotations.insert(CONTROLLER_ANNOTATION.into(), self.controller.clone());
        annotations.insert(CONNECTED_AT_ANNOTATION.into(), now());
        let mut spec = group.spec.template.clone();
        spec.address = Some(proxy.ip.to_string());
        spec.labels = Some(labels.clone());
        spec.service_account = Some(account);
        if proxy.network.is_some() {
            spec.network = proxy.network.clone();
        }
        if proxy.locality.is_some() {
            spec.locality = proxy.locality.clone();
        }
        let mut body = serde_json::Map::new();
        body.insert(
            "spec".into(),
            serde_json::to_value(&spec).map_err(|e| Status::internal(e.to_string()))?,
        );
        Ok(Object {
            api_version: "networking.istio.io/v1".into(),
            kind: "WorkloadEntry".into(),
            metadata: ObjectMeta {
                name: Some(entry_name(group_name, proxy)),
                namespace: Some(proxy.namespace.clone()),
                labels: Some(labels),
                annotations: Some(annotations),
                ..Default::default()
            },
            body,
        })
    }

    /// Marks an entry disconnected (and, with [`Claim::TakeOver`], this
    /// server its controller) and deletes it after the grace period, unless
    /// a stream for it comes back (here or at another server) or it was
    /// marked again since. The mark is written over the version read, and
    /// only while the entry is this server's (or, taking over, still the
    /// gone controller's): a server never marks an entry another has.
    fn forget_later(self: &Arc<Self>, namespace: String, name: String, claim: Claim) {
        let marked = now();
        let key = entry_key(&namespace, &name);
        let mut marked_ok = false;
        for _ in 0..STATUS_ATTEMPTS {
            let mut entry = match self.store.get(&key) {
                Ok(Some(entry)) => entry,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!("cannot read {namespace}/{name}: {e}");
                    return;
                }
            };
            let annotations = entry
                .metadata
                .annotations
                .get_or_insert_with(Default::default);
            let controller = annotations.get(CONTROLLER_ANNOTATION).cloned();
            match claim {
                Claim::Own if controller.as_ref() != Some(&self.controller) => return,
                Claim::TakeOver => {
                    let alive = self.live_controllers().unwrap_or_default();
                    if controller.as_ref().is_some_and(|c| alive.contains(c)) {
                        return;
                    }
                    annotations.insert(CONTROLLER_ANNOTATION.into(), self.controller.clone());
                }
                Claim::Own => {}
            }
            annotations.insert(DISCONNECTED_AT_ANNOTATION.into(), marked.clone());
            match self.store.commit(vec![Op::Update(entry)]) {
                Ok(_) => {
                    marked_ok = true;
                    break;
                }
                Err(e) if matches!(e.error, vmesh_store::StoreError::Conflict { .. }) => continue,
                Err(e) => {
                    tracing::error!("cannot mark {namespace}/{name} disconnected: {e}");
                    return;
                }
            }
        }
        if !marked_ok {
            return;
        }
        let this = self.clone();
        self.runtime.spawn(async move {
            tokio::time::sleep(this.grace).await;
            let held = this
                .streams
                .lock()
                .get(&(namespace.clone(), name.clone()))
                .is_some_and(|s| !s.is_empty());
            // The version read here is the one deleted: a reconnect in between wins.
            let marked_version = this.store.get(&key).ok().flatten().and_then(|entry| {
                let annotations = entry.metadata.annotations.as_ref()?;
                (annotations.get(DISCONNECTED_AT_ANNOTATION) == Some(&marked))
                    .then(|| entry.metadata.resource_version.clone())
                    .flatten()
            });
            if let (false, Some(version)) = (held, marked_version) {
                tracing::info!(
                    "auto-registered {namespace}/{name} gone for {:?}: deleting it",
                    this.grace
                );
                let delete = Op::Delete {
                    key,
                    expected: Some(version),
                };
                if let Err(e) = this.store.commit(vec![delete]) {
                    tracing::info!("{namespace}/{name} not deleted: {e}");
                }
            }
        });
    }
}

impl AutoRegistration {
    /// The entry whose health this proxy may report: the one it registered
    /// on this stream, or the one named by its `WORKLOAD_ENTRY` metadata if
    /// that entry runs as the caller's service account.
    fn health_target(
        &self,
        connection: u64,
        proxy: &Proxy,
        caller: Option<&CallerIdentity>,
    ) -> Result<Option<String>, Status> {
        if let Some(group) = proxy.metadata.get(GROUP_METADATA).filter(|g| !g.is_empty()) {
            let name = entry_name(group, proxy);
            let registered = self
                .streams
                .lock()
                .get(&(proxy.namespace.clone(), name.clone()))
                .is_some_and(|streams| streams.contains(&connection));
            return Ok(registered.then_some(name));
        }
        let Some(name) = proxy.metadata.get(ENTRY_METADATA).filter(|n| !n.is_empty()) else {
            return Ok(None);
        };
        let Some(entry) = self.entry(&proxy.namespace, name)? else {
            return Err(missing(&proxy.namespace, name));
        };
        let account = entry
            .body
            .get("spec")
            .and_then(|spec| spec.get("serviceAccount"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if let Some(caller) = caller
            && caller.service_account != account
        {
            return Err(Status::permission_denied(format!(
                "WorkloadEntry {}/{name} runs as {account}, not {}",
                proxy.namespace, caller.service_account
            )));
        }
        Ok(Some(name.clone()))
    }

    /// The WorkloadEntry `namespace/name`, if it exists.
    fn entry(&self, namespace: &str, name: &str) -> Result<Option<Object>, Status> {
        self.store
            .get(&entry_key(namespace, name))
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// Forgets the entry's `Healthy` condition: a proxy that (re)connects
    /// reports afresh, and an entry without a probe must not stay out of
    /// service on its last run's shutdown report.
    fn clear_health(&self, namespace: &str, name: &str) -> Result<(), Status> {
        self.change_status(namespace, name, "resetting the health of", |entry| {
            let Some(conditions) = entry
                .body
                .get_mut("status")
                .and_then(|s| s.get_mut("conditions"))
                .and_then(Value::as_array_mut)
            else {
                return false;
            };
            let before = conditions.len();
            conditions.retain(|c| c.get("type").and_then(Value::as_str) != Some("Healthy"));
            conditions.len() != before
        })
        .map(drop)
    }

    /// Writes `report` as the entry's `Healthy` condition.
    fn record_health(
        &self,
        namespace: &str,
        name: &str,
        report: &HealthReport,
    ) -> Result<(), Status> {
        let found = self.change_status(namespace, name, "recording the health of", |entry| {
            set_health(entry, report);
            true
        })?;
        if !found {
            return Err(missing(namespace, name));
        }
        tracing::info!(
            healthy = report.healthy,
            message = %report.message,
            "WorkloadEntry {namespace}/{name} health recorded"
        );
        Ok(())
    }

    /// Changes the entry's status with `change` (false: nothing to write)
    /// and writes it over the version it was read at, reading again when
    /// another writer (another server, the API) got there first. False if
    /// there is no such entry.
    fn change_status(
        &self,
        namespace: &str,
        name: &str,
        doing: &str,
        change: impl Fn(&mut Object) -> bool,
    ) -> Result<bool, Status> {
        for _ in 0..STATUS_ATTEMPTS {
            let Some(mut entry) = self.entry(namespace, name)? else {
                return Ok(false);
            };
            if !change(&mut entry) {
                return Ok(true);
            }
            match self.store.commit(vec![Op::SetStatus(entry)]) {
                Ok(_) => return Ok(true),
                Err(e) if matches!(e.error, vmesh_store::StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(Status::unavailable(format!("{doing} {name}: {e}"))),
            }
        }
        Err(Status::unavailable(format!(
            "{doing} {name}: the entry kept changing; try again"
        )))
    }
}

/// How many times a status write (or a disconnection mark) reads the entry
/// again after losing a race.
const STATUS_ATTEMPTS: usize = 8;

/// Whose entry a disconnection mark may be written on.
#[derive(Clone, Copy)]
enum Claim {
    /// This server's own (its proxy's last stream ended).
    Own,
    /// One whose controller is gone, which this server takes over.
    TakeOver,
}

/// Where each server's heartbeat is kept on a shared store, by controller.
const HEARTBEAT_RECORDS: &str = "controllers/";
/// How often a server on a shared store beats and sweeps.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How old a heartbeat may be before its server counts as gone.
const HEARTBEAT_LIFE: Duration = Duration::from_secs(15);

/// Whether a heartbeat (Unix seconds) is younger than [`HEARTBEAT_LIFE`].
fn fresh(beat: &[u8], now: u64) -> bool {
    let last: u64 = String::from_utf8_lossy(beat).parse().unwrap_or(0);
    now.saturating_sub(last) <= HEARTBEAT_LIFE.as_secs()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sets the entry's `Healthy` condition from `report`, keeping its last
/// transition time while the verdict stays the same.
fn set_health(entry: &mut Object, report: &HealthReport) {
    let status = if report.healthy { "True" } else { "False" };
    let now = now();
    let mut state = entry.body.remove("status").unwrap_or_else(|| json!({}));
    if !state.is_object() {
        state = json!({});
    }
    let conditions = state
        .as_object_mut()
        .expect("made an object above")
        .entry("conditions")
        .or_insert_with(|| json!([]));
    if !conditions.is_array() {
        *conditions = json!([]);
    }
    let conditions = conditions.as_array_mut().expect("made an array above");
    let previous = conditions
        .iter()
        .position(|c| c.get("type").and_then(Value::as_str) == Some("Healthy"));
    let transition = previous
        .map(|i| &conditions[i])
        .filter(|c| c.get("status").and_then(Value::as_str) == Some(status))
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| Value::String(now.clone()));
    let mut condition = json!({
        "type": "Healthy",
        "status": status,
        "lastProbeTime": now,
        "lastTransitionTime": transition,
    });
    if !report.healthy {
        condition["reason"] = json!("HealthCheckFailed");
        condition["message"] = json!(report.message);
    }
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
    entry.body.insert("status".into(), state);
}

/// The lifecycle hook needs the `Arc` to schedule deletions.
pub struct Registrar(pub Arc<AutoRegistration>);

impl ProxyLifecycle for Registrar {
    fn connected(
        &self,
        connection: u64,
        proxy: &Proxy,
        caller: Option<&CallerIdentity>,
    ) -> Result<(), Status> {
        let Some(group) = proxy.metadata.get(GROUP_METADATA).filter(|g| !g.is_empty()) else {
            // A manually made entry it reports for starts afresh too.
            if let Ok(Some(name)) = self.0.health_target(connection, proxy, caller)
                && let Err(e) = self.0.clear_health(&proxy.namespace, &name)
            {
                tracing::warn!(proxy = %proxy.id, "{}", e.message());
            }
            return Ok(());
        };
        let entry = self.0.entry_for(proxy, group, caller)?;
        let name = entry.metadata.name().to_string();
        // A VM that moves here while another server still holds its entry
        // (that server died, or the VM's path to it broke) is the same VM
        // running on: its health stands, so that its endpoint stays in
        // service through the move. A VM that comes back after its stream
        // ended, or to the same server (its agent restarted), starts afresh.
        let moved_here = self
            .0
            .entry(&proxy.namespace, &name)?
            .is_some_and(|current| {
                let annotations = current.metadata.annotations.unwrap_or_default();
                annotations
                    .get(CONTROLLER_ANNOTATION)
                    .is_some_and(|controller| *controller != self.0.controller)
                    && !annotations.contains_key(DISCONNECTED_AT_ANNOTATION)
            });
        self.0
            .store
            .commit(vec![Op::Apply(entry)])
            .map_err(|e| Status::unavailable(format!("registering {name}: {e}")))?;
        tracing::info!(proxy = %proxy.id, "registered WorkloadEntry {}/{name}", proxy.namespace);
        self.0
            .streams
            .lock()
            .entry((proxy.namespace.clone(), name.clone()))
            .or_default()
            .insert(connection);
        // Registered and held now: a failure to reset health must not
        // refuse the stream (its disconnect would never be seen).
        if !moved_here && let Err(e) = self.0.clear_health(&proxy.namespace, &name) {
            tracing::warn!(proxy = %proxy.id, "{}", e.message());
        }
        Ok(())
    }

    fn disconnected(&self, connection: u64, proxy: &Proxy) {
        let Some(group) = proxy.metadata.get(GROUP_METADATA) else {
            return;
        };
        let id = (proxy.namespace.clone(), entry_name(group, proxy));
        let last = {
            let mut streams = self.0.streams.lock();
            let now_empty = streams.get_mut(&id).is_some_and(|s| {
                s.remove(&connection);
                s.is_empty()
            });
            if now_empty {
                streams.remove(&id);
            }
            now_empty
        };
        if last {
            self.0.forget_later(id.0, id.1, Claim::Own);
        }
    }

    fn health(
        &self,
        connection: u64,
        proxy: &Proxy,
        caller: Option<&CallerIdentity>,
        report: &HealthReport,
    ) -> Result<(), Status> {
        match self.0.health_target(connection, proxy, caller)? {
            Some(name) => self.0.record_health(&proxy.namespace, &name, report),
            None => Ok(()),
        }
    }
}
