//! `vmesh kubeconfig`: a kubeconfig that points Kubernetes clients (kubectl,
//! client-go, kube-rs, Helm, k9s) at the server's config API, which speaks
//! the Kubernetes API. It holds the address and, when the API has one, the
//! bearer token: a secret, to be kept as the token file is.

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::Connection;
use crate::client::Client;

/// The server a kubeconfig points at, and the CA it is trusted by: as
/// given (`--server`, `--ca-file`), except that a token for a plain-HTTP
/// server on this machine gets the same port over TLS (it takes both on
/// loopback; kubectl sends a token only over TLS), trusted by the mesh
/// root the server publishes, when no `--ca-file` says otherwise.
pub async fn endpoint(connection: &Connection) -> Result<(String, Option<Vec<u8>>)> {
    let mut ca = match &connection.ca_file {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let mut url = reqwest::Url::parse(&connection.server)
        .map_err(|e| anyhow::anyhow!("--server {:?} is not a URL: {e}", connection.server))?;
    let loopback = url.host_str().is_some_and(|host| {
        host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    if connection.token.is_none() || url.scheme() != "http" || !loopback {
        return Ok((connection.server.clone(), ca));
    }
    if ca.is_none() {
        let client = Client::config_api(connection)?;
        let published = client
            .get(
                ROOT_CONFIG_MAP_PATH,
                "reading the mesh root the server publishes",
            )
            .await?;
        let root = published["data"]["root-cert.pem"]
            .as_str()
            .context("the published root ConfigMap holds no root-cert.pem")?;
        ca = Some(root.as_bytes().to_vec());
    }
    url.set_scheme("https")
        .map_err(|()| anyhow::anyhow!("{url} cannot be made https"))?;
    Ok((url.as_str().trim_end_matches('/').to_string(), ca))
}

/// Where the server publishes the mesh root (Istio's `istio-ca-root-cert`).
const ROOT_CONFIG_MAP_PATH: &str = "/api/v1/namespaces/istio-system/configmaps/istio-ca-root-cert";

/// The kubeconfig for the API at `server`, with one cluster, user and
/// context called `name`; an https:// server is trusted by `ca` (PEM, the
/// mesh root), which it needs.
pub fn render(
    server: &str,
    token: Option<&str>,
    ca: Option<&[u8]>,
    name: &str,
    namespace: &str,
) -> Result<String> {
    use base64::Engine;
    let url = reqwest::Url::parse(server)
        .map_err(|e| anyhow::anyhow!("--server {server:?} is not a URL: {e}"))?;
    let mut cluster = json!({"server": server.trim_end_matches('/')});
    match (url.scheme(), ca) {
        ("http", _) => {}
        ("https", Some(pem)) => {
            cluster["certificate-authority-data"] =
                base64::engine::general_purpose::STANDARD.encode(pem).into();
        }
        ("https", None) => bail!(
            "{server} is served over TLS: give its CA with --ca-file (the mesh root, \
             <data-dir>/ca/root-cert.pem on the server's machine)"
        ),
        _ => bail!("--server {server:?} must be an http:// or https:// URL"),
    }
    let user = match token {
        Some(token) => json!({"token": token}),
        None => json!({}),
    };
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
        "current-context": name,
        "preferences": {},
    });
    Ok(serde_saphyr::to_string(&config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeconfig_names_the_server_and_carries_the_token() {
        let text = render(
            "http://10.0.0.5:15080/",
            Some("s3cret"),
            None,
            "vmesh",
            "vm-workloads",
        )
        .unwrap();
        let value: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            value["clusters"][0]["cluster"]["server"],
            "http://10.0.0.5:15080"
        );
        assert_eq!(value["users"][0]["user"]["token"], "s3cret");
        assert_eq!(value["contexts"][0]["context"]["namespace"], "vm-workloads");
        assert_eq!(value["current-context"], "vmesh");
        assert!(render("10.0.0.5:15080", None, None, "vmesh", "default").is_err());
        let refused = render("https://10.0.0.5:15080", None, None, "vmesh", "default");
        assert!(refused.unwrap_err().to_string().contains("--ca-file"));
        let text = render(
            "https://10.0.0.5:15080",
            None,
            Some(b"-----BEGIN CERTIFICATE-----\n"),
            "vmesh",
            "default",
        )
        .unwrap();
        let value: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            value["clusters"][0]["cluster"]["certificate-authority-data"],
            "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="
        );
    }
}
