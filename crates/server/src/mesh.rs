//! Keeps the mesh model current: after every burst of store changes it lists
//! the objects, assigns virtual IPs (persisted in the ConfigMap
//! [`VIP_CONFIG_MAP`] so they survive restarts), builds the registry snapshot
//! (decoding only the objects whose version changed, through the
//! [`DecodeCache`] it keeps) and hands it to the xDS server.
//!
//! Changes are debounced: a rebuild waits for a quiet period, but never longer
//! than a maximum delay after the first change, and is computed once for all
//! proxies.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use vmesh_api::kinds::istio_operator::{self, IstioOperator};
use vmesh_api::mesh::{MeshSettings, OperatorRef};
use vmesh_registry::{DecodeCache, Snapshot, VipAllocator};
use vmesh_store::{Op, Selection, Store};
use vmesh_xds::ads::ConfigSource;
use vmesh_xds::translate::MeshConfig;

/// ConfigMap in the root namespace holding hostname → virtual IP.
pub const VIP_CONFIG_MAP: &str = "vmesh-vip-allocations";
const ROOT_NAMESPACE: &str = vmesh_api::mesh::DEFAULT_ROOT_NAMESPACE;

/// How long changes must be quiet before a rebuild, and the longest a rebuild waits.
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Debounce {
        Debounce {
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        }
    }
}

pub struct MeshController {
    store: Arc<Store>,
    /// Typed objects kept from one rebuild to the next: only changed objects are decoded again.
    decoded: DecodeCache,
    debounce: Debounce,
    publish: watch::Sender<Arc<dyn ConfigSource>>,
    /// The configuration last published: the next one follows it
    /// (`MeshConfig::following`).
    published: Option<Arc<MeshConfig>>,
    /// The CA's trust domain, which the mesh's must equal.
    ca_trust_domain: String,
    /// The disagreeing trust domain last reported, so it is reported once.
    reported_trust_domain: Option<String>,
    metrics: crate::monitoring::Metrics,
}

/// How many times a rebuild starts again after another server wrote the
/// virtual IPs between its read and its write.
const VIP_ATTEMPTS: usize = 16;

/// Why a build did not publish.
enum Built {
    /// Another server wrote the allocations meanwhile.
    Raced,
    Failed(vmesh_store::StoreError),
}

/// The allocations in the stored ConfigMap.
fn allocations_of(stored: Option<&vmesh_api::Object>) -> BTreeMap<String, IpAddr> {
    stored
        .and_then(|cm| cm.body.get("data").cloned())
        .and_then(|data| serde_json::from_value::<BTreeMap<String, String>>(data).ok())
        .map(|data| {
            data.into_iter()
                .filter_map(|(host, ip)| Some((host, ip.parse().ok()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes the allocations over `stored` (the ConfigMap they were built
/// from), only if it is still what the store holds.
fn persist_vips(
    store: &Store,
    vips: &VipAllocator,
    stored: Option<vmesh_api::Object>,
) -> Result<(), Built> {
    let data: BTreeMap<String, String> = vips
        .allocations()
        .iter()
        .map(|(h, ip)| (h.clone(), ip.to_string()))
        .collect();
    let mut config_map = vmesh_api::mesh::config_map(ROOT_NAMESPACE, VIP_CONFIG_MAP, data);
    let write = match stored {
        Some(stored) => {
            config_map.metadata.resource_version = stored.metadata.resource_version;
            Op::Update(config_map)
        }
        None => Op::Create(config_map),
    };
    match store.commit(vec![write]) {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.error,
                vmesh_store::StoreError::Conflict { .. }
                    | vmesh_store::StoreError::AlreadyExists(_)
                    | vmesh_store::StoreError::NotFound(_)
            ) =>
        {
            Err(Built::Raced)
        }
        Err(e) => {
            // The mesh is still built: these addresses are what every
            // server derives from the same objects, and the next rebuild
            // tries the write again.
            tracing::error!("cannot persist virtual IPs: {e}");
            Ok(())
        }
    }
}

fn vip_key() -> vmesh_api::ObjectKey {
    vmesh_api::ObjectKey {
        group: String::new(),
        plural: "configmaps".into(),
        namespace: ROOT_NAMESPACE.into(),
        name: VIP_CONFIG_MAP.into(),
    }
}

impl MeshController {
    /// Loads persisted VIPs and builds the first snapshot.
    pub fn new(
        store: Arc<Store>,
        debounce: Debounce,
        ca_trust_domain: &str,
        metrics: crate::monitoring::Metrics,
    ) -> Result<(MeshController, watch::Receiver<Arc<dyn ConfigSource>>), vmesh_store::StoreError>
    {
        let empty: Arc<dyn ConfigSource> = Arc::new(MeshConfig::new(Snapshot::default()));
        let (publish, subscribe) = watch::channel(empty);
        let mut controller = MeshController {
            store,
            decoded: DecodeCache::default(),
            debounce,
            publish,
            published: None,
            ca_trust_domain: ca_trust_domain.to_string(),
            reported_trust_domain: None,
            metrics,
        };
        controller.rebuild(None);
        Ok((controller, subscribe))
    }

    /// Builds the mesh from the store and publishes it, as changed at
    /// `changed_at` (when its first change was seen).
    fn rebuild(&mut self, changed_at: Option<Instant>) {
        // Several servers may allocate at once (on one etcd): each builds
        // from the allocations as stored and writes new ones only over
        // what it read, so that no two services ever get one address; the
        // loser of a race builds again from the winner's.
        for _ in 0..VIP_ATTEMPTS {
            match self.build_once(changed_at) {
                Ok(()) => return,
                Err(Built::Raced) => continue,
                Err(Built::Failed(e)) => {
                    tracing::error!("cannot read the store to rebuild the mesh: {e}");
                    return;
                }
            }
        }
        tracing::error!("virtual IPs kept changing under this server: the mesh was not rebuilt");
    }

    fn build_once(&mut self, changed_at: Option<Instant>) -> Result<(), Built> {
        // Read before the objects, so that allocations written after this
        // read make the write below fail rather than be overwritten.
        let stored = self.store.get(&vip_key()).map_err(Built::Failed)?;
        let mut vips = VipAllocator::new(
            vmesh_registry::DEFAULT_SERVICE_CIDR,
            vmesh_registry::DEFAULT_SERVICE_ENTRY_CIDR,
            allocations_of(stored.as_ref()),
        )
        .unwrap_or_default();
        // Only the kinds the registry reads: a store full of ConfigMaps
        // costs a rebuild nothing.
        let mut objects = Vec::new();
        for kind in vmesh_registry::INPUT_KINDS {
            let (of_kind, _) = self
                .store
                .list(&Selection::of_kind(kind, None))
                .map_err(Built::Failed)?;
            objects.extend(of_kind);
        }
        let before = vips.clone();
        let snapshot = Snapshot::build(&objects, &mut self.decoded, &mut vips);
        if vips != before {
            persist_vips(&self.store, &vips, stored)?;
        }
        self.check_trust_domain(&snapshot.mesh);
        tracing::debug!(services = snapshot.services.len(), "mesh rebuilt");
        self.metrics.services.set(snapshot.services.len() as i64);
        self.metrics
            .virtual_services
            .set(snapshot.virtual_services.len() as i64);
        let mut config = MeshConfig::new(snapshot);
        if let Some(earlier) = &self.published {
            config = config.following(earlier);
        }
        let config = match changed_at {
            Some(at) => config.changed_at(at),
            None => config,
        };
        let config = Arc::new(config);
        self.published = Some(config.clone());
        self.publish.send_replace(config);
        Ok(())
    }

    /// An IstioOperator applied while the server runs can still name another
    /// trust domain than the CA's (at start the server refuses it): say so
    /// loudly, once per value, since mTLS between workloads breaks.
    fn check_trust_domain(&mut self, mesh: &MeshSettings) {
        let disagreeing = (mesh.trust_domain_set && mesh.trust_domain != self.ca_trust_domain)
            .then(|| mesh.trust_domain.clone());
        if disagreeing.is_some() && disagreeing != self.reported_trust_domain {
            tracing::error!(
                mesh = %mesh.trust_domain,
                ca = %self.ca_trust_domain,
                operators = %mesh.sources.join(", "),
                "meshConfig.trustDomain is not the CA's trust domain: clients will refuse the certificates the CA issues; restart the server with --trust-domain {} or change the IstioOperator",
                mesh.trust_domain
            );
        }
        self.reported_trust_domain = disagreeing;
    }

    /// Rebuilds after each debounced burst of changes until shutdown.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.store.changes();
        loop {
            // Any change, or changes missed, calls for a rebuild: it reads
            // everything anew.
            tokio::select! {
                _ = changes.next() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let first = Instant::now();
            loop {
                let deadline =
                    (first + self.debounce.max_delay).min(Instant::now() + self.debounce.quiet);
                if tokio::time::timeout_at(deadline, changes.next())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            // A rebuild reads every object and builds the whole model: on a
            // blocking thread, so that the async workers keep answering
            // (`/healthz`, xDS, the API) however big the store is.
            self = match tokio::task::spawn_blocking(move || {
                self.rebuild(Some(first));
                self
            })
            .await
            {
                Ok(controller) => controller,
                Err(e) => {
                    tracing::error!("the mesh rebuild failed: {e}");
                    return;
                }
            };
        }
    }
}

/// The mesh settings of `revision` (`None`: the default one), resolved with
/// [`MeshSettings::resolve`] over the stored IstioOperators; those whose body
/// does not decode are skipped, as the registry skips them.
pub fn stored_settings(
    store: &Store,
    revision: Option<&str>,
) -> Result<MeshSettings, vmesh_store::StoreError> {
    let (objects, _) = store.list(&Selection::of_kind(&istio_operator::KIND, None))?;
    let operators: Vec<(&vmesh_api::Object, IstioOperator)> = objects
        .iter()
        .filter_map(|object| match object.typed() {
            Ok(operator) => Some((object, operator)),
            Err(error) => {
                tracing::warn!(object = %object.display_name(), %error, "skipping an IstioOperator with an invalid body");
                None
            }
        })
        .collect();
    let refs: Vec<OperatorRef<'_>> = operators
        .iter()
        .map(|(object, operator)| OperatorRef {
            namespace: object.metadata.namespace().unwrap_or("default"),
            name: object.metadata.name(),
            spec: &operator.spec,
        })
        .collect();
    Ok(MeshSettings::resolve(&refs, revision))
}
