//! `vmesh kubeconfig`: a kubeconfig that points Kubernetes clients (kubectl,
//! client-go, kube-rs, Helm, k9s) at the server's config API, which speaks
//! the Kubernetes API. It holds the address and, when the API has one, the
//! bearer token: a secret, to be kept as the token file is.

use anyhow::{Result, bail};
use serde_json::json;

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
