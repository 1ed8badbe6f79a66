//! The monitoring port (15014): readiness, the xDS sync status of every
//! connected proxy (`/debug/syncz`, what `vmesh proxy-status` prints), what
//! one proxy was sent as Envoy's admin would dump it
//! (`/debug/config_dump?proxyID=ID[&include_eds]`, Istio's, what `vmesh
//! proxy-config` reads), and `/metrics` in the Prometheus text format: the
//! control plane's figures under Istio's names (see [`Metrics`]) and the
//! process's own.
//!
//! It listens on loopback only: it has no authentication of its own.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{IntGauge, Registry, TextEncoder};
use serde::Serialize;
use vmesh_ca::metrics::CaMetrics;
use vmesh_xds::ads::{FindError, ProxyStatus, StatusTable, TypeStatus};
use vmesh_xds::metrics::XdsMetrics;

/// Every metric the server exports, in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub xds: Arc<XdsMetrics>,
    pub ca: CaMetrics,
    /// `pilot_services`: services in the mesh (Services and ServiceEntry hosts).
    pub services: IntGauge,
    /// `pilot_virt_services`: VirtualServices known.
    pub virtual_services: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let services = IntGauge::new("pilot_services", "Total services known to pilot.")?;
        let virtual_services = IntGauge::new(
            "pilot_virt_services",
            "Total virtual services known to pilot.",
        )?;
        registry.register(Box::new(services.clone()))?;
        registry.register(Box::new(virtual_services.clone()))?;
        Ok(Metrics {
            xds: Arc::new(XdsMetrics::register(&registry)?),
            ca: CaMetrics::register(&registry)?,
            services,
            virtual_services,
            registry,
        })
    }
}

async fn metrics(State(metrics): State<Metrics>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    match encoder.encode_to_string(&metrics.registry.gather()) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

/// Where a proxy stands on one resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SyncState {
    /// The proxy accepted the latest version it was sent.
    Synced,
    /// A version was sent and not answered yet.
    Stale,
    /// The proxy refused the latest version it was sent.
    Nacked,
    /// Never asked for.
    NotSent,
}

pub fn sync_state(status: &TypeStatus) -> SyncState {
    match (&status.sent_version, &status.acked_version, &status.nack) {
        (None, ..) => SyncState::NotSent,
        (Some(sent), _, Some((refused, _))) if sent == refused => SyncState::Nacked,
        (Some(sent), Some(acked), _) if sent == acked => SyncState::Synced,
        _ => SyncState::Stale,
    }
}

#[derive(Serialize)]
struct ProxySync {
    #[serde(flatten)]
    status: ProxyStatus,
    /// Short type name (`CDS`, `EDS`, `LDS`, `RDS`) → state.
    sync: std::collections::BTreeMap<&'static str, SyncState>,
}

fn short_name(type_url: &str) -> Option<&'static str> {
    match type_url {
        vmesh_xds::ads::CLUSTER_TYPE => Some("CDS"),
        vmesh_xds::ads::ENDPOINT_TYPE => Some("EDS"),
        vmesh_xds::ads::LISTENER_TYPE => Some("LDS"),
        vmesh_xds::ads::ROUTE_TYPE => Some("RDS"),
        _ => None,
    }
}

async fn syncz(State(proxies): State<Arc<StatusTable>>) -> Json<Vec<serde_json::Value>> {
    let rows = proxies
        .snapshot()
        .into_iter()
        .map(|status| {
            let sync = status
                .types
                .iter()
                .filter_map(|(url, s)| Some((short_name(url)?, sync_state(s))))
                .collect();
            serde_json::to_value(ProxySync { status, sync }).unwrap_or_default()
        })
        .collect();
    Json(rows)
}

/// Where one proxy's configuration is dumped.
pub const CONFIG_DUMP_PATH: &str = "/debug/config_dump";

#[derive(serde::Deserialize)]
struct DumpQuery {
    #[serde(rename = "proxyID")]
    proxy_id: Option<String>,
    include_eds: Option<String>,
}

async fn config_dump(
    State(proxies): State<Arc<StatusTable>>,
    Query(query): Query<DumpQuery>,
) -> axum::response::Response {
    let Some(proxy_id) = query.proxy_id.filter(|id| !id.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "You must provide a proxyID in the query string\n",
        )
            .into_response();
    };
    let proxy = match proxies.find(&proxy_id) {
        Ok(proxy) => proxy,
        Err(e) => {
            let code = match e {
                FindError::NotConnected(_) => StatusCode::NOT_FOUND,
                FindError::Ambiguous { .. } => StatusCode::BAD_REQUEST,
            };
            return (code, format!("{e}\n")).into_response();
        }
    };
    let dump = vmesh_xds::config_dump::config_dump(&proxy, query.include_eds.is_some());
    match vmesh_xds::config_dump::to_json(&dump) {
        Ok(json) => Json(json).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("dumping {}: {e}\n", proxy.status.id),
        )
            .into_response(),
    }
}

/// `/ready`: ok, or 503 with the reason while the store cannot be written
/// (a full disk, an etcd without quorum): the server is up and its proxies
/// keep their configuration, but it cannot take changes.
pub async fn ready(store: Arc<vmesh_store::Store>) -> Response {
    match store.fault() {
        None => "ok\n".into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the store cannot be written: {why}\n"),
        )
            .into_response(),
    }
}

pub fn router(
    proxies: Arc<StatusTable>,
    exported: Metrics,
    store: Arc<vmesh_store::Store>,
) -> Router {
    Router::new()
        .route("/ready", get(move || ready(store)))
        .route("/debug/syncz", get(syncz))
        .route(CONFIG_DUMP_PATH, get(config_dump))
        .with_state(proxies)
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .with_state(exported),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        let status = |sent: Option<&str>, acked: Option<&str>, nack: Option<&str>| TypeStatus {
            sent_version: sent.map(Into::into),
            acked_version: acked.map(Into::into),
            nack: nack.map(|v| (v.to_string(), "bad".to_string())),
        };
        assert_eq!(sync_state(&status(None, None, None)), SyncState::NotSent);
        assert_eq!(
            sync_state(&status(Some("2"), Some("2"), None)),
            SyncState::Synced
        );
        assert_eq!(
            sync_state(&status(Some("3"), Some("2"), None)),
            SyncState::Stale
        );
        assert_eq!(
            sync_state(&status(Some("3"), Some("2"), Some("3"))),
            SyncState::Nacked
        );
        assert_eq!(
            sync_state(&status(Some("4"), Some("2"), Some("3"))),
            SyncState::Stale
        );
    }
}
