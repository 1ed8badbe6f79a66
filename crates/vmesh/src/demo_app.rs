//! The demo's workload: a small HTTP application that answers with its own
//! name and version, as the guide's payment VMs do. It speaks HTTP/1.1 and
//! HTTP/2 (prior knowledge), so a proxy may upgrade connections to it.
//! `/slow/{ms}/…` answers after a delay, to show timeouts at work, and
//! `…/status/{code}/…` with that status, to show what the mesh does with errors.
//! `/health` answers 503 while the `--unhealthy-file` exists, so a test or
//! the demo can fail the readiness probe without stopping the application.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{OriginalUri, State};
use axum::http::StatusCode;
use axum::routing::get;

#[derive(Clone)]
struct Identity {
    name: String,
    version: String,
    unhealthy_file: Option<PathBuf>,
}

/// Serves until the process is stopped.
pub async fn run(
    addr: SocketAddr,
    name: String,
    version: String,
    unhealthy_file: Option<PathBuf>,
) -> Result<()> {
    let identity = Identity {
        name,
        version,
        unhealthy_file,
    };
    let app = Router::new()
        .route(
            "/health",
            get(|State(id): State<Identity>| async move {
                match &id.unhealthy_file {
                    Some(file) if file.exists() => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n"),
                    _ => (StatusCode::OK, "ok\n"),
                }
            }),
        )
        .fallback(
            |State(id): State<Identity>, OriginalUri(uri): OriginalUri| async move {
                let delay = uri
                    .path()
                    .strip_prefix("/slow/")
                    .and_then(|rest| rest.split('/').next()?.parse::<u64>().ok());
                if let Some(ms) = delay {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                // `/status/503` answers 503, for trying what a mesh does with errors.
                let code = uri
                    .path()
                    .split_once("/status/")
                    .and_then(|(_, rest)| rest.split('/').next())
                    .and_then(|code| StatusCode::from_u16(code.parse().ok()?).ok())
                    .unwrap_or(StatusCode::OK);
                let body = format!(
                    "name={} version={} path={}\n",
                    id.name,
                    id.version,
                    uri.path()
                );
                (code, body)
            },
        )
        .with_state(identity);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    axum::serve(listener, app).await.context("serving")
}
