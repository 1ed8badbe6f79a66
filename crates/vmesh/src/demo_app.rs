//! The demo's workload: a small HTTP application that answers with its own
//! name and version, as the guide's payment VMs do. It speaks HTTP/1.1 and
//! HTTP/2 (prior knowledge), so a proxy may upgrade connections to it.
//! `/slow/{ms}/…` answers after a delay, to show timeouts at work.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{OriginalUri, State};
use axum::routing::get;

#[derive(Clone)]
struct Identity {
    name: String,
    version: String,
}

/// Serves until the process is stopped.
pub async fn run(addr: SocketAddr, name: String, version: String) -> Result<()> {
    let identity = Identity { name, version };
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .fallback(
            |State(id): State<Identity>, OriginalUri(uri): OriginalUri| async move {
                let delay = uri
                    .path()
                    .strip_prefix("/slow/")
                    .and_then(|rest| rest.split('/').next()?.parse::<u64>().ok());
                if let Some(ms) = delay {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                format!(
                    "name={} version={} path={}\n",
                    id.name,
                    id.version,
                    uri.path()
                )
            },
        )
        .with_state(identity);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    axum::serve(listener, app).await.context("serving")
}
