//! The monitoring port (15014): readiness and the xDS sync status of every
//! connected proxy (`/debug/syncz`, what `vmesh proxy-status` prints).
//!
//! It listens on loopback only: it has no authentication of its own.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use vmesh_xds::ads::{ProxyStatus, StatusTable, TypeStatus};

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

pub fn router(proxies: Arc<StatusTable>) -> Router {
    Router::new()
        .route("/ready", get(|| async { "ok\n" }))
        .route("/debug/syncz", get(syncz))
        .with_state(proxies)
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
