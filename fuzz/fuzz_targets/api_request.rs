//! Any request to the config API: the first byte picks the method, the
//! Content-Type (JSON, YAML, the patch types, Kubernetes' protobuf) and
//! whether a Table is asked for, the first line is the path and query
//! (appended to a resource path when it does not start with `/`), the
//! rest is the body.
//! One server's router and store serve every input, so state builds up as
//! it would. Nothing may panic, and no request may get a 500.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Server {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _dir: tempfile::TempDir,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(vmesh_store::Store::open(dir.path()).unwrap());
        let (shutdown, stopped) = tokio::sync::watch::channel(false);
        let router = runtime.block_on(async {
            let (_, mesh) = vmesh_server::mesh::MeshController::new(
                store.clone(),
                vmesh_server::mesh::Debounce::default(),
                "cluster.local",
                vmesh_server::monitoring::Metrics::new().unwrap(),
            )
            .unwrap();
            vmesh_server::api::router(store, mesh, None, stopped, axum::Router::new())
        });
        Server {
            runtime,
            router,
            _dir: dir,
            _shutdown: shutdown,
        }
    })
}

const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
];
const CONTENT_TYPES: [&str; 8] = [
    "application/json",
    "application/yaml",
    "text/plain",
    "application/merge-patch+json",
    "application/json-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
    "application/vnd.kubernetes.protobuf",
];
/// What `kubectl get` asks for; sent when bit 3 of the first byte is set.
const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // The body stays bytes: protobuf bodies are not text.
    let (line, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let path = String::from_utf8_lossy(line);
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/api/v1/namespaces/default/configmaps{path}")
    };
    let Ok(request) = Request::builder()
        .method(METHODS[usize::from(first) % METHODS.len()].clone())
        .uri(&path)
        .header("content-type", CONTENT_TYPES[usize::from(first >> 4) % CONTENT_TYPES.len()])
        .header("accept", if first & 8 != 0 { TABLE } else { "application/json" })
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    let server = server();
    server.runtime.block_on(async {
        let response = server.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        assert_ne!(status.as_u16(), 500, "{path}: a 500");
        // A watch streams until its client leaves: read a little, then leave.
        let _ = tokio::time::timeout(Duration::from_millis(20), response.into_body().collect()).await;
    });
});
