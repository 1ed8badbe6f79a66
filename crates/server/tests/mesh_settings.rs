//! The server and the mesh's settings: an IstioOperator whose trust domain is
//! not the CA's stops the server from starting, with an error that says which
//! operator and what to do.

use serde_json::json;
use vmesh_server::{ServerConfig, ServerError, start};

fn config(dir: &std::path::Path, trust_domain: &str) -> ServerConfig {
    let mut config = ServerConfig {
        api_addr: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::new(dir.to_path_buf())
    };
    config.identity.trust_domain = trust_domain.to_string();
    config
}

#[tokio::test]
async fn a_trust_domain_other_than_the_cas_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), "cluster.local")).await.unwrap();
    let operator = json!({
        "apiVersion": "install.istio.io/v1alpha1",
        "kind": "IstioOperator",
        "metadata": {"name": "corp", "namespace": "istio-system"},
        "spec": {"meshConfig": {"trustDomain": "corp.example"}}
    });
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/apis/install.istio.io/v1alpha1/namespaces/istio-system/istiooperators",
            running.api_addr
        ))
        .json(&operator)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        201,
        "{:?}",
        response.text().await
    );
    running.shutdown().await;

    let refused = start(config(dir.path(), "cluster.local"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ServerError::TrustDomainMismatch { mesh, ca, sources }
            if mesh == "corp.example" && ca == "cluster.local" && sources == "istio-system/corp"),
        "{refused}"
    );
    let message = refused.to_string();
    assert!(message.contains("--trust-domain corp.example"), "{message}");

    let agreeing = start(config(dir.path(), "corp.example")).await.unwrap();
    agreeing.shutdown().await;
}
