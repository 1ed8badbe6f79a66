//! The server's identity services, whole and in-process: each test starts
//! the control plane on port 0 with real TLS on its xDS/CA port and a data
//! dir of its own, and speaks to it as workloads and operators would — the
//! REST API over HTTP, Istio's CA and ADS over TLS (token or mesh client
//! certificate), plain ADS on the loopback port.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue};
use rcgen::PublicKeyData;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use vmesh_agent::identity::{CaAuth, CaClient, CertificateSigner, SignError, new_key_and_csr};
use vmesh_agent::upstream::Upstream;
use vmesh_ca::SpiffeId;
use vmesh_server::connections::ConnectionLimits;
use vmesh_server::{Running, ServerConfig, start};
use vmesh_xds::ads::{CLUSTER_TYPE, HEALTH_INFORMATION_TYPE};
use x509_parser::extensions::GeneralName;

/// The longest any single step may take.
const WAIT: Duration = Duration::from_secs(20);
const TRUST_DOMAIN: &str = "cluster.local";
const ROOT_CONFIG_MAP: &str = "istio-ca-root-cert";

struct Server {
    running: Running,
    base: String,
    http: reqwest::Client,
    /// The TLS port (Istio's 15012).
    xds: SocketAddr,
    data_dir: PathBuf,
}

impl Server {
    async fn start(data_dir: &Path, plaintext: bool) -> Server {
        Server::start_with(data_dir, plaintext, ConnectionLimits::default()).await
    }

    async fn start_with(data_dir: &Path, plaintext: bool, connections: ConnectionLimits) -> Server {
        let running = start(ServerConfig {
            api_addr: "127.0.0.1:0".parse().unwrap(),
            xds_addr: Some("127.0.0.1:0".parse().unwrap()),
            xds_plaintext_addr: plaintext.then(|| "127.0.0.1:0".parse().unwrap()),
            monitoring_addr: Some("127.0.0.1:0".parse().unwrap()),
            connections,
            ..ServerConfig::new(data_dir.to_path_buf())
        })
        .await
        .expect("server starts");
        Server {
            base: format!("http://{}", running.api_addr),
            xds: running.xds_addr.expect("the TLS port is bound"),
            running,
            http: reqwest::Client::new(),
            data_dir: data_dir.to_path_buf(),
        }
    }

    async fn stop(self) {
        tokio::time::timeout(WAIT, self.running.shutdown())
            .await
            .expect("the server shuts down cleanly in time");
    }

    /// `/metrics` from the monitoring port, after Prometheus' own parser
    /// (`promtool check metrics`) read it without an error. Its linter's
    /// naming advice is allowed for Istio's names only: Istio's counters
    /// have no `_total` suffix and some end in `_count`, and dashboards
    /// query them so.
    async fn metrics(&self) -> String {
        let monitoring = self.running.monitoring_addr.expect("monitoring is on");
        let text = self
            .http
            .get(format!("http://{monitoring}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut promtool = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian's prometheus package) is installed");
        use std::io::Write;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let checked = promtool.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&checked.stderr).into_owned()
            + &String::from_utf8_lossy(&checked.stdout);
        // 0: clean; 3: lint problems only (1 is a parse error).
        assert!(
            matches!(checked.status.code(), Some(0 | 3)),
            "promtool could not parse /metrics: {report}\n{text}"
        );
        for problem in report.lines() {
            let (metric, advice) = problem.split_once(' ').unwrap_or((problem, ""));
            assert!(
                (metric.starts_with("pilot_") || metric.starts_with("citadel_"))
                    && matches!(
                        advice,
                        "counter metrics should have \"_total\" suffix"
                            | "non-histogram and non-summary metrics should not have \"_count\" suffix"
                    ),
                "promtool: {problem}\n{text}"
            );
        }
        text
    }

    fn root_file(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("ca").join(vmesh_ca::ROOT_CERT_FILE))
            .expect("<data-dir>/ca/root-cert.pem")
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("the API answers in time")
            .unwrap();
        let code = response.status().as_u16();
        (code, response.json().await.unwrap_or(Value::Null))
    }

    async fn create_namespace(&self, name: &str) {
        let (code, body) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/namespaces",
                Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})),
            )
            .await;
        assert_eq!(code, 201, "namespace {name}: {body}");
    }

    /// `root-cert.pem` of `istio-ca-root-cert` in `namespace`, if it is there.
    async fn published_root(&self, namespace: &str) -> Option<String> {
        let (code, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/namespaces/{namespace}/configmaps/{ROOT_CONFIG_MAP}"),
                None,
            )
            .await;
        if code != 200 {
            return None;
        }
        body["data"]["root-cert.pem"].as_str().map(str::to_owned)
    }

    /// Waits up to five seconds for `namespace` to hold `expected` as its
    /// published root.
    async fn wait_for_root(&self, namespace: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = self.published_root(namespace).await;
            if found.as_deref() == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{ROOT_CONFIG_MAP} in {namespace} does not hold the mesh root: {found:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A join token from the API; panics unless it is issued.
    async fn token(&self, namespace: &str, account: &str) -> Token {
        let (code, body) = self
            .request_token(namespace, account, json!({"durationSeconds": 600}))
            .await;
        assert_eq!(code, 200, "token for {namespace}/{account}: {body}");
        let token = Token {
            token: body["token"].as_str().expect("token").to_owned(),
            id: body["id"].as_str().expect("id").to_owned(),
        };
        let expires = body["expires"].as_str().expect("expires");
        let expires = humantime::parse_rfc3339(expires)
            .unwrap_or_else(|e| panic!("expires {expires:?} is not RFC 3339: {e}"));
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .expect("expires in the future");
        assert!(
            left > Duration::from_secs(590) && left <= Duration::from_secs(601),
            "asked 600 s, expires in {left:?}"
        );
        assert!(!token.id.is_empty() && token.token.split('.').count() == 3);
        token
    }

    async fn request_token(&self, namespace: &str, account: &str, body: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            &format!("/apis/vmesh.io/v1/namespaces/{namespace}/serviceaccounts/{account}/token"),
            Some(body),
        )
        .await
    }

    async fn revoke(&self, namespace: &str, account: &str, body: Value) {
        let (code, response) = self
            .call(
                reqwest::Method::POST,
                &format!(
                    "/apis/vmesh.io/v1/namespaces/{namespace}/serviceaccounts/{account}/revoke"
                ),
                Some(body),
            )
            .await;
        assert_eq!(code, 200, "revoke {namespace}/{account}: {response}");
    }

    fn ca_client(&self, root_pem: &str) -> CaClient {
        CaClient::new(Upstream::new(self.xds.to_string(), root_pem)).with_timeout(WAIT)
    }

    /// Asks the CA on the TLS port to sign `csr`, authenticated by `token`.
    async fn sign_with_token(&self, csr: &str, token: &str) -> Result<Vec<String>, SignError> {
        self.ca_client(&self.root_file())
            .sign(csr, None, CaAuth::Token(token))
            .await
    }

    /// Asks the CA to sign `csr`, authenticated by the mesh certificate `cert`
    /// alone (a renewal).
    async fn sign_with_certificate(&self, csr: &str, cert: &Pem) -> Result<Vec<String>, SignError> {
        let root = self.root_file();
        let credentials = vmesh_agent::Credentials::new(
            &cert.chain,
            cert.key.clone(),
            &vmesh_agent::identity::TrustAnchors::from_pem(&root).unwrap(),
            TRUST_DOMAIN,
            std::time::SystemTime::now(),
        )
        .unwrap();
        self.ca_client(&root)
            .sign(csr, None, CaAuth::Certificate(&credentials))
            .await
    }

    /// A fresh key and certificate chain for `namespace/account`, from the
    /// CA with a token.
    async fn mesh_certificate(&self, token: &str, namespace: &str, account: &str) -> Pem {
        let id = SpiffeId::new(TRUST_DOMAIN, namespace, account).unwrap();
        let (key, csr) = new_key_and_csr(&id).unwrap();
        let chain = self.sign_with_token(&csr, token).await.expect("signed");
        assert_eq!(sans(&chain[0]), vec![id.uri()]);
        Pem {
            chain,
            key: key.serialize_pem(),
        }
    }
}

struct Token {
    token: String,
    id: String,
}

struct Pem {
    chain: Vec<String>,
    key: String,
}

fn parse_pem(pem: &str) -> x509_parser::pem::Pem {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    pem
}

/// Every subject alternative name of a PEM certificate, URIs as they are,
/// other kinds as `kind:value`.
fn sans(cert_pem: &str) -> Vec<String> {
    let pem = parse_pem(cert_pem);
    let cert = pem.parse_x509().expect("X.509");
    let Some(ext) = cert.subject_alternative_name().expect("one SAN extension") else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::URI(uri) => (*uri).to_owned(),
            other => format!("other:{other:?}"),
        })
        .collect()
}

/// The code a refused signing request came back with.
fn refusal(result: Result<Vec<String>, SignError>) -> Code {
    match result {
        Err(SignError::Refused { code, .. }) => code,
        Err(other) => panic!("expected a refusal from the CA, got {other}"),
        Ok(_) => panic!("expected a refusal from the CA, got a certificate"),
    }
}

/// A gRPC channel to the TLS port trusting only `root_pem`, presenting
/// `client` (chain, key) when given.
async fn tls_channel(
    addr: SocketAddr,
    root_pem: &str,
    client: Option<&Pem>,
) -> Result<Channel, tonic::transport::Error> {
    tokio::time::timeout(
        WAIT,
        vmesh_testkit::tls::connect(
            addr,
            root_pem,
            client.map(|c| (c.chain.as_slice(), c.key.as_str())),
        ),
    )
    .await
    .expect("connects in time")
}

/// A sidecar's node, claiming `namespace` and `account` in its metadata.
fn node(namespace: &str, account: &str) -> Node {
    let string = |s: &str| PbValue {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    Node {
        id: format!("sidecar~10.0.0.9~web-vm.{namespace}~{namespace}.svc.cluster.local"),
        metadata: Some(Struct {
            fields: [
                ("NAMESPACE".to_owned(), string(namespace)),
                ("SERVICE_ACCOUNT".to_owned(), string(account)),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

/// Opens a state-of-the-world ADS stream, asks for clusters as `node`, and
/// returns the first response or the status the stream ended with.
async fn first_cds(
    channel: Channel,
    node: Node,
    token: Option<&str>,
) -> Result<DiscoveryResponse, Status> {
    let call = async {
        let (_requests, mut responses) = cluster_stream(channel, node, token).await?;
        let first = responses.message().await?;
        first.ok_or_else(|| Status::unknown("the stream ended without a response"))
    };
    tokio::time::timeout(WAIT, call)
        .await
        .expect("an answer on the ADS stream in time")
}

/// A state-of-the-world ADS stream asking for clusters as `node`, with
/// `token` as its bearer token if given: the requests' sender and the
/// responses.
async fn cluster_stream(
    channel: Channel,
    node: Node,
    token: Option<&str>,
) -> Result<
    (
        mpsc::UnboundedSender<DiscoveryRequest>,
        tonic::Streaming<DiscoveryResponse>,
    ),
    Status,
> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .unwrap();
    let mut request = Request::new(UnboundedReceiverStream::new(rx));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let responses = client
        .stream_aggregated_resources(request)
        .await?
        .into_inner();
    Ok((tx, responses))
}

/// The ACK of a cluster response.
fn ack(response: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: CLUSTER_TYPE.into(),
        version_info: response.version_info.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn the_mesh_root_is_published_everywhere_and_kept_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), false).await;
    let root = server.root_file();
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
    assert_eq!(server.running.identity.authority.root_pem(), root);

    // The built-in namespaces get it…
    server.wait_for_root("default", &root).await;
    server.wait_for_root("istio-system", &root).await;
    // …and so does one made after start.
    server.create_namespace("late").await;
    server.wait_for_root("late", &root).await;

    // The keys are the server's alone.
    let ca = tmp.path().join("ca");
    assert_eq!(mode(&ca.join(vmesh_ca::ROOT_KEY_FILE)), 0o600, "root key");
    assert_eq!(mode(&ca.join(vmesh_ca::TOKEN_KEY_FILE)), 0o600, "token key");

    // An operator's edit of the ConfigMap is put right again.
    let path = format!("/api/v1/namespaces/late/configmaps/{ROOT_CONFIG_MAP}");
    let (code, mut edited) = server.call(reqwest::Method::GET, &path, None).await;
    assert_eq!(code, 200);
    edited["data"]["root-cert.pem"] = json!("not a certificate");
    let (code, body) = server.call(reqwest::Method::PUT, &path, Some(edited)).await;
    assert_eq!(code, 200, "{body}");
    server.wait_for_root("late", &root).await;

    // A token-authenticated certificate chains to that root.
    let token = server.token("late", "app").await;
    let cert = server.mesh_certificate(&token.token, "late", "app").await;
    assert_eq!(cert.chain.last().unwrap(), &root, "leaf then the root");
    server.stop().await;

    // A restart on the same data dir keeps the root, and publishes the same.
    let server = Server::start(tmp.path(), false).await;
    assert_eq!(server.root_file(), root, "the root file is unchanged");
    assert_eq!(server.running.identity.authority.root_pem(), root);
    for namespace in ["default", "istio-system", "late"] {
        server.wait_for_root(namespace, &root).await;
    }
    // The TLS port still proves itself with that root, and the token key
    // survived too: the token from before the restart still works.
    let again = server.mesh_certificate(&token.token, "late", "app").await;
    assert_eq!(again.chain.last().unwrap(), &root);
    assert_eq!(mode(&ca.join(vmesh_ca::ROOT_KEY_FILE)), 0o600);
    assert_eq!(mode(&ca.join(vmesh_ca::TOKEN_KEY_FILE)), 0o600);
    server.stop().await;
}

#[tokio::test]
async fn tokens_from_the_api_sign_only_their_own_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), false).await;
    server.create_namespace("shop").await;
    let token = server.token("shop", "web").await;

    // A CSR asking for someone else entirely: another SPIFFE id, a DNS
    // name, a subject. The CA names the caller and nothing else.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/istio-system/sa/istiod"
            .try_into()
            .unwrap(),
    ));
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/shop/sa/admin"
            .try_into()
            .unwrap(),
    ));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = server
        .sign_with_token(&csr, &token.token)
        .await
        .expect("a certificate for the token's identity");
    assert_eq!(
        sans(&chain[0]),
        vec!["spiffe://cluster.local/ns/shop/sa/web".to_owned()],
        "the only SAN is the token's identity"
    );
    let leaf_pem = parse_pem(&chain[0]);
    let leaf = leaf_pem.parse_x509().unwrap();
    assert!(
        !leaf.subject().to_string().contains("admin"),
        "the CSR's subject is not copied: {}",
        leaf.subject()
    );
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice(),
        "the certificate is for the CSR's key"
    );
    assert_eq!(chain.last().unwrap(), &server.root_file());

    // No tokens for namespaces that do not exist, nor for silly lives.
    let (code, body) = server
        .request_token("nowhere", "web", json!({"durationSeconds": 600}))
        .await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = server
        .request_token("shop", "web", json!({"durationSeconds": 0}))
        .await;
    assert_eq!(code, 422, "{body}");

    // Garbage is not a token.
    assert_eq!(
        refusal(server.sign_with_token(&csr, "not.a.token").await),
        Code::Unauthenticated
    );
    server.stop().await;
}

#[tokio::test]
async fn revocations_take_effect_at_once_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), false).await;
    server.create_namespace("shop").await;
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", "web").unwrap();
    let (_, csr) = new_key_and_csr(&id).unwrap();

    let before = server.token("shop", "web").await;
    let other_account = server.token("shop", "db").await;
    let cert_before = server.mesh_certificate(&before.token, "shop", "web").await;
    server
        .sign_with_token(&csr, &before.token)
        .await
        .expect("works before the revocation");

    // Revoking the account refuses the earlier token at once, no restart…
    server.revoke("shop", "web", json!({})).await;
    assert_eq!(
        refusal(server.sign_with_token(&csr, &before.token).await),
        Code::Unauthenticated
    );
    // …and the certificates issued before it (no renewal with them)…
    let by_cert = server.sign_with_certificate(&csr, &cert_before).await;
    assert_eq!(refusal(by_cert), Code::Unauthenticated);
    // …but not another account's tokens.
    let (_, db_csr) = new_key_and_csr(&SpiffeId::new(TRUST_DOMAIN, "shop", "db").unwrap()).unwrap();
    server
        .sign_with_token(&db_csr, &other_account.token)
        .await
        .expect("shop/db is not revoked");

    // A token issued in a later second works (revocation is by the second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = server.token("shop", "web").await;
    server
        .sign_with_token(&csr, &after.token)
        .await
        .expect("a token issued after the revocation works");

    // Revoking by id revokes that token only.
    let kept = server.token("shop", "web").await;
    let dropped = server.token("shop", "web").await;
    server
        .revoke("shop", "web", json!({"id": dropped.id}))
        .await;
    assert_eq!(
        refusal(server.sign_with_token(&csr, &dropped.token).await),
        Code::Unauthenticated
    );
    for token in [&after, &kept] {
        server
            .sign_with_token(&csr, &token.token)
            .await
            .expect("tokens not named stay good");
    }

    // The revocations are kept in the store, where the config API does not
    // reach: no object anywhere carries them, and an object named as the
    // old ConfigMap was, written with junk or emptied, changes nothing.
    let (code, everything) = server
        .call(reqwest::Method::GET, "/api/v1/configmaps", None)
        .await;
    assert_eq!(code, 200, "{everything}");
    let listed = everything.to_string();
    assert!(
        !listed.contains(&dropped.id) && !listed.contains("shop/web"),
        "{listed}"
    );
    for (method, path, junk) in [
        (reqwest::Method::POST, "", "{not json"),
        (
            reqwest::Method::PUT,
            "/vmesh-token-revocations",
            r#"{"tokens":{},"accounts":{}}"#,
        ),
    ] {
        let (code, body) = server
            .call(
                method,
                &format!("/api/v1/namespaces/istio-system/configmaps{path}"),
                Some(json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "vmesh-token-revocations", "namespace": "istio-system"},
                    "data": {"revocations.json": junk},
                })),
            )
            .await;
        assert!(code == 200 || code == 201, "{body}");
    }
    server.stop().await;

    // …and still hold after a restart.
    let server = Server::start(tmp.path(), false).await;
    for token in [&before, &dropped] {
        assert_eq!(
            refusal(server.sign_with_token(&csr, &token.token).await),
            Code::Unauthenticated,
            "token {} is still revoked after the restart",
            token.id
        );
    }
    for token in [&after, &kept] {
        server
            .sign_with_token(&csr, &token.token)
            .await
            .expect("the tokens not revoked still work after the restart");
    }
    server
        .sign_with_token(&db_csr, &other_account.token)
        .await
        .expect("shop/db still works after the restart");
    server.stop().await;
}

#[tokio::test]
async fn ads_on_the_tls_port_admits_only_proven_identities() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), true).await;
    server.create_namespace("shop").await;
    let root = server.root_file();
    let token = server.token("shop", "web").await;
    let cert = server.mesh_certificate(&token.token, "shop", "web").await;

    // No credentials at all: refused before anything is served.
    let anonymous = tls_channel(server.xds, &root, None).await.unwrap();
    let refused = first_cds(anonymous.clone(), node("shop", "web"), None)
        .await
        .expect_err("an anonymous proxy is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // Nor does a token that is not one help.
    let refused = first_cds(anonymous.clone(), node("shop", "web"), Some("not.a.token"))
        .await
        .expect_err("a bad token is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // The mesh certificate of shop/web, claiming to be shop/web: served.
    let mutual = tls_channel(server.xds, &root, Some(&cert)).await.unwrap();
    let response = first_cds(mutual.clone(), node("shop", "web"), None)
        .await
        .expect("the proxy that proved its identity is served");
    assert_eq!(response.type_url, CLUSTER_TYPE);
    assert!(!response.nonce.is_empty());

    // The same certificate claiming another account, or namespace: refused.
    let refused = first_cds(mutual.clone(), node("shop", "admin"), None)
        .await
        .expect_err("a proxy claiming shop/admin with shop/web's certificate is refused");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = first_cds(mutual.clone(), node("default", "web"), None)
        .await
        .expect_err("a proxy claiming default/web with shop/web's certificate is refused");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A bearer token works in place of the certificate, with the same rule.
    let response = first_cds(anonymous.clone(), node("shop", "web"), Some(&token.token))
        .await
        .expect("a proxy authenticated by its token is served");
    assert_eq!(response.type_url, CLUSTER_TYPE);
    let refused = first_cds(anonymous.clone(), node("shop", "admin"), Some(&token.token))
        .await
        .expect_err("the token of shop/web does not make a proxy shop/admin");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A certificate of the right name from another CA gets nowhere.
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = vmesh_ca::Authority::load_or_create(
        stranger_dir.path(),
        TRUST_DOMAIN,
        vmesh_ca::AuthorityOptions::default(),
    )
    .unwrap();
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", "web").unwrap();
    let (key, csr) = new_key_and_csr(&id).unwrap();
    let forged = Pem {
        chain: stranger.sign_workload(&csr, &id, None).unwrap(),
        key: key.serialize_pem(),
    };
    match tls_channel(server.xds, &root, Some(&forged)).await {
        Err(_) => {}
        Ok(channel) => {
            let result = first_cds(channel, node("shop", "web"), None).await;
            assert!(
                result.is_err(),
                "a foreign certificate was served: {result:?}"
            );
        }
    }

    // The loopback plaintext port asks nothing of anyone.
    let plaintext = server.running.xds_plaintext_addr.expect("plaintext port");
    let channel = tokio::time::timeout(
        WAIT,
        Endpoint::from_shared(format!("http://{plaintext}"))
            .unwrap()
            .connect(),
    )
    .await
    .expect("connects in time")
    .unwrap();
    let response = first_cds(channel, node("shop", "admin"), None)
        .await
        .expect("the plaintext port needs no credentials");
    assert_eq!(response.type_url, CLUSTER_TYPE);

    drop((anonymous, mutual));
    server.stop().await;
}

/// Operators (or scripts) revoking several tokens at once must not lose any
/// of the revocations they were told succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_revocations_are_all_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::start(tmp.path(), false).await);
    server.create_namespace("shop").await;
    let mut tokens = Vec::new();
    for _ in 0..20 {
        tokens.push(server.token("shop", "web").await);
    }
    let revocations: Vec<_> = tokens
        .iter()
        .map(|token| {
            let (server, id) = (server.clone(), token.id.clone());
            tokio::spawn(async move { server.revoke("shop", "web", json!({"id": id})).await })
        })
        .collect();
    for revocation in revocations {
        revocation.await.unwrap();
    }
    let (_, csr) = new_key_and_csr(&SpiffeId::new(TRUST_DOMAIN, "shop", "web").unwrap()).unwrap();
    let mut still_good = Vec::new();
    for token in &tokens {
        if server.sign_with_token(&csr, &token.token).await.is_ok() {
            still_good.push(token.id.clone());
        }
    }
    Arc::try_unwrap(server)
        .ok()
        .expect("no other users")
        .stop()
        .await;
    // Stored, every one: a restarted server refuses them all.
    let server = Server::start(tmp.path(), false).await;
    let mut not_stored = Vec::new();
    for token in &tokens {
        if server.sign_with_token(&csr, &token.token).await.is_ok() {
            not_stored.push(token.id.clone());
        }
    }
    server.stop().await;
    assert!(
        still_good.is_empty() && not_stored.is_empty(),
        "of {} tokens revoked at once (every call answered 200), {} still sign and {} sign again after a restart",
        tokens.len(),
        still_good.len(),
        not_stored.len()
    );
}

/// Sends a CDS request as `node` and then a health report; returns the
/// acknowledgement of the report, if one comes within `patience`.
async fn report_health(
    channel: Channel,
    node: Node,
    token: &str,
    healthy: bool,
    patience: Duration,
) -> Option<DiscoveryResponse> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .unwrap();
    tx.send(DiscoveryRequest {
        type_url: HEALTH_INFORMATION_TYPE.into(),
        response_nonce: "health-1".into(),
        error_detail: (!healthy).then(|| envoy_types::pb::google::rpc::Status {
            code: 500,
            message: "GET /health: HTTP 503".into(),
            details: Vec::new(),
        }),
        ..Default::default()
    })
    .unwrap();
    let mut request = Request::new(UnboundedReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut responses = client
        .stream_aggregated_resources(request)
        .await
        .expect("the stream opens")
        .into_inner();
    let ack = tokio::time::timeout(patience, async {
        while let Some(response) = responses.message().await.expect("the stream stays up") {
            if response.type_url == HEALTH_INFORMATION_TYPE {
                return Some(response);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    drop(tx);
    ack
}

/// A proxy naming a manually made WorkloadEntry (ISTIO_META_WORKLOAD_ENTRY)
/// reports its health into that entry only if the entry runs as the
/// proxy's proven service account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_reach_only_the_callers_own_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), false).await;
    server.create_namespace("shop").await;
    for (name, account) in [("web-1", "web"), ("admin-1", "admin")] {
        let (status, body) = server
            .call(
                reqwest::Method::POST,
                "/apis/networking.istio.io/v1/namespaces/shop/workloadentries",
                Some(json!({
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "WorkloadEntry",
                    "metadata": {
                        "name": name,
                        "namespace": "shop",
                        "annotations": {"proxy.istio.io/health-checks-enabled": "true"},
                    },
                    "spec": {"address": "10.0.0.9", "serviceAccount": account},
                })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let root = server.root_file();
    let token = server.token("shop", "web").await;
    let channel = tls_channel(server.xds, &root, None).await.unwrap();
    let naming = |entry: &str| {
        let mut node = node("shop", "web");
        node.metadata.as_mut().unwrap().fields.insert(
            "WORKLOAD_ENTRY".into(),
            PbValue {
                kind: Some(Kind::StringValue(entry.into())),
            },
        );
        node
    };
    let condition = |entry: &str| {
        let server = &server;
        let path = format!("/apis/networking.istio.io/v1/namespaces/shop/workloadentries/{entry}");
        async move {
            let (_, body) = server.call(reqwest::Method::GET, &path, None).await;
            body["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Healthy").cloned())
        }
    };

    // Its own entry: recorded, then acknowledged with the report's nonce.
    let ack = report_health(channel.clone(), naming("web-1"), &token.token, false, WAIT)
        .await
        .expect("the report on its own entry is acknowledged");
    assert_eq!(ack.nonce, "health-1");
    let recorded = condition("web-1").await.expect("a Healthy condition");
    assert_eq!(recorded["status"], "False");
    assert_eq!(recorded["message"], "GET /health: HTTP 503");
    report_health(channel.clone(), naming("web-1"), &token.token, true, WAIT)
        .await
        .expect("acknowledged");
    assert_eq!(condition("web-1").await.unwrap()["status"], "True");

    // Another account's entry: not written, not acknowledged.
    let ack = report_health(
        channel.clone(),
        naming("admin-1"),
        &token.token,
        false,
        Duration::from_secs(1),
    )
    .await;
    assert!(
        ack.is_none(),
        "a report on another account's entry: {ack:?}"
    );
    assert_eq!(condition("admin-1").await, None);

    drop(channel);
    server.stop().await;
}

/// The value of the sample `name` (with its labels, as written) in `/metrics`.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{metrics}"))
}

#[tokio::test]
async fn metrics_under_istios_names_count_proxies_pushes_and_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), true).await;
    server.create_namespace("shop").await;
    let before = server.metrics().await;
    assert_eq!(sample(&before, "pilot_xds"), 0.0);
    assert_eq!(sample(&before, "citadel_server_csr_count"), 0.0);
    assert!(sample(&before, "process_resident_memory_bytes") > 0.0);

    // One certificate issued, one caller refused.
    let token = server.token("shop", "web").await;
    server.mesh_certificate(&token.token, "shop", "web").await;
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", "web").unwrap();
    let (_, csr) = new_key_and_csr(&id).unwrap();
    refusal(server.sign_with_token(&csr, "not-a-token").await);

    // A proxy on plaintext ADS gets its clusters, ACKs them, and then a
    // pushed change.
    let plaintext = server.running.xds_plaintext_addr.unwrap();
    let channel = Endpoint::from_shared(format!("http://{plaintext}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, mut responses) = cluster_stream(channel, node("shop", "web"), None)
        .await
        .unwrap();
    let next = async |responses: &mut tonic::Streaming<DiscoveryResponse>| {
        tokio::time::timeout(WAIT, responses.message())
            .await
            .expect("a response in time")
            .unwrap()
            .expect("the stream is open")
    };
    let first = next(&mut responses).await;
    tx.send(ack(&first)).unwrap();
    let connected = server.metrics().await;
    assert_eq!(sample(&connected, "pilot_xds"), 1.0);
    let pushed_before = sample(&connected, "pilot_xds_pushes{type=\"cds\"}");
    let converged_before = sample(&connected, "pilot_proxy_convergence_time_count");

    let (code, body) = server
        .call(
            reqwest::Method::POST,
            "/api/v1/namespaces/shop/services",
            Some(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "cart", "namespace": "shop"},
                "spec": {"ports": [{"name": "http", "port": 8080}], "selector": {"app": "cart"}},
            })),
        )
        .await;
    assert!(code == 201 || code == 200, "{code} {body}");
    let pushed = next(&mut responses).await;
    assert_ne!(pushed.version_info, first.version_info);
    // The push is counted once its last response is written.
    let after = loop {
        let text = server.metrics().await;
        if sample(&text, "pilot_proxy_convergence_time_count") > converged_before {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(sample(&after, "pilot_xds_pushes{type=\"cds\"}") > pushed_before);
    assert!(sample(&after, "pilot_proxy_convergence_time_sum") > 0.0);
    assert!(sample(&after, "pilot_xds_push_time_count{type=\"cds\"}") >= 2.0);
    assert_eq!(sample(&after, "pilot_services"), 1.0);
    assert_eq!(sample(&after, "citadel_server_csr_count"), 2.0);
    assert_eq!(
        sample(&after, "citadel_server_success_cert_issuance_count"),
        1.0
    );
    assert_eq!(
        sample(&after, "citadel_server_authentication_failure_count"),
        1.0
    );

    // A refusal is counted, and a proxy that leaves is no longer connected.
    tx.send(DiscoveryRequest {
        type_url: CLUSTER_TYPE.into(),
        version_info: first.version_info.clone(),
        response_nonce: pushed.nonce.clone(),
        error_detail: Some(envoy_types::pb::google::rpc::Status {
            message: "cluster cart: refused".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
    let rejects = "pilot_total_xds_rejects{type=\"cds\"}";
    tokio::time::timeout(WAIT, async {
        while !server.metrics().await.contains(rejects) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the refusal is counted");
    drop((tx, responses));
    let left = loop {
        let text = server.metrics().await;
        if sample(&text, "pilot_xds") == 0.0 {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sample(&left, rejects), 1.0);
    server.stop().await;
}

/// What became of a connection a crowd held: how long after it was made
/// the server closed it (`None`: still open when the test stopped looking).
async fn closed_after(
    mut connection: impl tokio::io::AsyncRead + Unpin,
    opened: Instant,
    deadline: Instant,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout_at(deadline, connection.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(opened.elapsed()),
            // The server's own opening frames (HTTP/2 settings, pings).
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crowds_of_idle_and_slow_connections_leave_room_for_real_clients() {
    use tokio::io::AsyncWriteExt;
    const IDLE_TLS: usize = 20_000;
    const SLOWLORIS: usize = 2_000;
    const IDLE: Duration = Duration::from_secs(30);
    // The test holds both ends of every connection in one process.
    let fd_limit = vmesh_server::connections::raise_fd_limit();
    assert!(
        fd_limit >= 16_384,
        "this test needs 16,384 open files (both ends of 6,096 connections and \
         the server's share-out); the limit is {fd_limit}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let limits = ConnectionLimits {
        idle: IDLE,
        ..ConnectionLimits::default()
    };
    let server = Server::start_with(tmp.path(), false, limits).await;
    let root = server.root_file();
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(&root) {
        roots.add(cert).unwrap();
    }
    let tls = Arc::new(
        tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let connector = tokio_rustls::TlsConnector::from(tls);
    let xds = server.xds;
    let api: SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    // The crowds come from hosts of their own; the real clients from 127.0.0.1.
    let connect_from = |from: &str, to: SocketAddr| {
        let from: std::net::IpAddr = from.parse().unwrap();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(from, 0)).unwrap();
            socket.connect(to).await
        }
    };

    // 2,000 slowloris clients on the config API: half a request head each.
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..SLOWLORIS {
        let mut tcp = connect_from("127.0.0.3", api).await.unwrap();
        tcp.write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push((tcp, Instant::now()));
    }
    // 20,000 TLS connections to the xDS port from one host, each to
    // complete the handshake and say nothing, 200 at a time: the server
    // holds as many as one source may have and turns the rest away.
    let mut idle = Vec::new();
    let mut refused = 0;
    let mut opening = tokio::task::JoinSet::new();
    let mut settle = |opened: Option<_>| match opened {
        Some(held) => idle.push(held),
        None => refused += 1,
    };
    for _ in 0..IDLE_TLS {
        if opening.len() >= 200 {
            settle(opening.join_next().await.unwrap().unwrap());
        }
        let connector = connector.clone();
        let tcp = connect_from("127.0.0.2", xds);
        opening.spawn(async move {
            let tcp = tcp.await.ok()?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(
                vmesh_ca::ISTIOD_SERVICE_NAME,
            )
            .unwrap();
            let tls = connector.connect(name, tcp).await.ok()?;
            Some((tls, Instant::now()))
        });
    }
    while let Some(opened) = opening.join_next().await {
        settle(opened.unwrap());
    }
    println!(
        "held {} idle TLS connections ({refused} turned away) and {} slowloris after {:?}",
        idle.len(),
        slow.len(),
        started.elapsed()
    );
    assert_eq!(idle.len(), limits.per_source, "one source's share held");
    assert_eq!(refused, IDLE_TLS - limits.per_source);
    assert!(
        started.elapsed() < IDLE,
        "the crowd gathered before the first were closed"
    );

    // Meanwhile a real client applies objects and a workload renews its certificate.
    let busy = Instant::now();
    server.create_namespace("crowded").await;
    let (code, body) = server
        .call(
            reqwest::Method::POST,
            "/api/v1/namespaces/crowded/configmaps",
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}})),
        )
        .await;
    assert_eq!(code, 201, "apply while crowded: {body}");
    let token = server.token("crowded", "app").await;
    let first = server
        .mesh_certificate(&token.token, "crowded", "app")
        .await;
    let id = SpiffeId::new(TRUST_DOMAIN, "crowded", "app").unwrap();
    let (_, csr) = new_key_and_csr(&id).unwrap();
    let credentials = vmesh_agent::Credentials::new(
        &first.chain,
        first.key.clone(),
        &vmesh_agent::identity::TrustAnchors::from_pem(&root).unwrap(),
        TRUST_DOMAIN,
        std::time::SystemTime::now(),
    )
    .unwrap();
    let renewed = server
        .ca_client(&root)
        .sign(&csr, None, CaAuth::Certificate(&credentials))
        .await
        .expect("renewed with the current certificate");
    assert_eq!(sans(&renewed[0]), vec![id.uri()]);
    assert!(
        busy.elapsed() < Duration::from_secs(5),
        "apply, token, certificate and renewal took {:?}",
        busy.elapsed()
    );

    // Every crowd connection is closed once it has been silent for the
    // idle limit: not before, not long after.
    let deadline = Instant::now() + IDLE + Duration::from_secs(20);
    let mut closing = tokio::task::JoinSet::new();
    for (tls, opened) in idle {
        closing.spawn(closed_after(tls, opened, deadline));
    }
    for (tcp, opened) in slow {
        closing.spawn(closed_after(tcp, opened, deadline));
    }
    let mut lives = Vec::new();
    while let Some(life) = closing.join_next().await {
        lives.push(life.unwrap());
    }
    let open = lives.iter().filter(|l| l.is_none()).count();
    assert_eq!(
        open,
        0,
        "{open} crowd connections still open {:?} after the idle limit",
        Duration::from_secs(20)
    );
    let shortest = lives.iter().flatten().min().unwrap();
    let longest = lives.iter().flatten().max().unwrap();
    assert!(
        *shortest >= IDLE - Duration::from_secs(1) && *longest <= IDLE + Duration::from_secs(15),
        "closed between {shortest:?} and {longest:?} after opening; the limit is {IDLE:?}"
    );
    server.stop().await;
}

fn rustls_pemfile_certs(
    pem: &str,
) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The idle limit closes silent connections, not quiet ones: an ADS stream
/// with nothing to say for three idle limits still gets the next change,
/// because the server pings its peers and their answers are traffic.
#[tokio::test]
async fn a_quiet_xds_stream_outlives_the_idle_limit() {
    const IDLE: Duration = Duration::from_secs(2);
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        tmp.path(),
        false,
        ConnectionLimits {
            idle: IDLE,
            ..ConnectionLimits::default()
        },
    )
    .await;
    server.create_namespace("shop").await;
    let root = server.root_file();
    let token = server.token("shop", "web").await;
    let cert = server.mesh_certificate(&token.token, "shop", "web").await;
    let channel = tls_channel(server.xds, &root, Some(&cert)).await.unwrap();
    let (tx, mut responses) = cluster_stream(channel, node("shop", "web"), None)
        .await
        .unwrap();
    let first = responses.message().await.unwrap().expect("clusters");
    tx.send(ack(&first)).unwrap();
    tokio::time::sleep(IDLE * 3).await;
    let (code, body) = server
        .call(
            reqwest::Method::POST,
            "/api/v1/namespaces/shop/services",
            Some(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "late"},
                "spec": {"ports": [{"name": "http", "port": 8080}]}})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let next = tokio::time::timeout(WAIT, responses.message())
        .await
        .expect("a push in time")
        .expect("the stream is still open")
        .expect("a response");
    assert_ne!(next.version_info, first.version_info);
    drop(tx);
    server.stop().await;
}

/// Polls `check` until it holds, for the changes the server makes after
/// an event (a deletion's revocation).
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn deleting_a_service_account_or_namespace_revokes_and_stops_issuance() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), false).await;
    server.create_namespace("shop").await;
    let account = |name: &str| json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": "shop"}});
    const ACCOUNTS: &str = "/api/v1/namespaces/shop/serviceaccounts";
    for name in ["web", "db"] {
        let (code, body) = server
            .call(reqwest::Method::POST, ACCOUNTS, Some(account(name)))
            .await;
        assert_eq!(code, 201, "{body}");
    }
    let web = SpiffeId::new(TRUST_DOMAIN, "shop", "web").unwrap();
    let (_, csr) = new_key_and_csr(&web).unwrap();
    let (_, db_csr) = new_key_and_csr(&SpiffeId::new(TRUST_DOMAIN, "shop", "db").unwrap()).unwrap();
    let token = server.token("shop", "web").await;
    let cert = server.mesh_certificate(&token.token, "shop", "web").await;
    let db_token = server.token("shop", "db").await;

    let (code, body) = server
        .call(reqwest::Method::DELETE, &format!("{ACCOUNTS}/web"), None)
        .await;
    assert_eq!(code, 200, "{body}");
    until("the deleted account's token is refused", async || {
        server.sign_with_token(&csr, &token.token).await.is_err()
    })
    .await;
    assert_eq!(
        refusal(server.sign_with_certificate(&csr, &cert).await),
        Code::Unauthenticated,
        "its certificates renew no more"
    );
    let (code, body) = server.request_token("shop", "web", json!({})).await;
    assert_eq!(code, 404, "no new tokens for a deleted account: {body}");
    assert!(
        body["message"].as_str().unwrap().contains("was deleted"),
        "{body}"
    );
    server
        .sign_with_token(&db_csr, &db_token.token)
        .await
        .expect("the namespace's other account is untouched");

    // Created again: new tokens work, the old credentials stay revoked.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, body) = server
        .call(reqwest::Method::POST, ACCOUNTS, Some(account("web")))
        .await;
    assert_eq!(code, 201, "{body}");
    let mut fresh = None;
    until("a token for the account created again", async || {
        let (code, body) = server.request_token("shop", "web", json!({})).await;
        fresh = (code == 200).then(|| body["token"].as_str().unwrap().to_string());
        fresh.is_some()
    })
    .await;
    server
        .sign_with_token(&csr, fresh.as_deref().unwrap())
        .await
        .expect("a token of the account created again works");
    assert!(server.sign_with_token(&csr, &token.token).await.is_err());

    // Deleting the namespace stops issuance for every account in it, and
    // that holds across a restart.
    let (code, body) = server
        .call(reqwest::Method::DELETE, "/api/v1/namespaces/shop", None)
        .await;
    assert_eq!(code, 200, "{body}");
    until("the deleted namespace's tokens are refused", async || {
        server
            .sign_with_token(&db_csr, &db_token.token)
            .await
            .is_err()
    })
    .await;
    server.stop().await;
    let server = Server::start(tmp.path(), false).await;
    assert!(
        server
            .sign_with_token(&db_csr, &db_token.token)
            .await
            .is_err()
    );
    assert!(server.sign_with_certificate(&csr, &cert).await.is_err());
    server.create_namespace("shop").await;
    assert!(
        server
            .sign_with_token(&db_csr, &db_token.token)
            .await
            .is_err(),
        "a namespace created again does not bring back what was issued before"
    );
    server.stop().await;
}

/// The onboarding files a join token hands out, minus the token a join
/// mints itself.
fn join_files() -> Value {
    vmesh_api::onboarding::BUNDLE
        .iter()
        .filter(|file| file.name != vmesh_api::onboarding::TOKEN.name)
        .map(|file| {
            (
                file.name.to_string(),
                Value::String(format!("{} contents\n", file.name)),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

impl Server {
    /// A VM's join: the bootstrap token from the onboarding archive the
    /// server hands out for `join_token`.
    async fn join(&self, join_token: &str) -> Result<String, String> {
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.root_file().as_bytes()).unwrap(),
            )
            .resolve(vmesh_ca::ISTIOD_SERVICE_NAME, self.xds)
            .build()
            .unwrap();
        let response = client
            .get(format!(
                "https://{}:{}{}",
                vmesh_ca::ISTIOD_SERVICE_NAME,
                self.xds.port(),
                vmesh_server::join::BOOTSTRAP_PATH
            ))
            .bearer_auth(join_token)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.bytes().await.unwrap();
        if !status.is_success() {
            return Err(String::from_utf8_lossy(&body).into_owned());
        }
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&body[..]));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap().to_str() == Some(vmesh_api::onboarding::TOKEN.name) {
                let mut token = String::new();
                std::io::Read::read_to_string(&mut entry, &mut token).unwrap();
                return Ok(token);
            }
        }
        Err("no token in the archive".into())
    }
}

#[tokio::test]
async fn revoking_a_join_token_revokes_every_vm_it_let_in_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), false).await;
    server.create_namespace("shop").await;
    let (code, body) = server
        .call(
            reqwest::Method::POST,
            "/apis/networking.istio.io/v1/namespaces/shop/workloadgroups",
            Some(json!({
                "apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"template": {"serviceAccount": "web"}},
            })),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let join_token = |uses: u32| {
        let server = &server;
        async move {
            let (code, body) = server
                .call(
                    reqwest::Method::POST,
                    "/apis/vmesh.io/v1/namespaces/shop/workloadgroups/web/jointokens",
                    Some(json!({"uses": uses, "files": join_files()})),
                )
                .await;
            assert_eq!(code, 200, "{body}");
            (
                body["token"].as_str().unwrap().to_string(),
                body["id"].as_str().unwrap().to_string(),
            )
        }
    };
    let (revoked_join, revoked_id) = join_token(2).await;
    let (kept_join, _) = join_token(1).await;
    let web = SpiffeId::new(TRUST_DOMAIN, "shop", "web").unwrap();
    let (_, csr) = new_key_and_csr(&web).unwrap();
    // Two VMs join with the first token, one with the second; each gets a
    // certificate and renews it once.
    let mut vms = Vec::new();
    for join in [&revoked_join, &revoked_join, &kept_join] {
        let bootstrap = server.join(join).await.expect("joins");
        let first = server.mesh_certificate(&bootstrap, "shop", "web").await;
        let (key, renewal_csr) = new_key_and_csr(&web).unwrap();
        let renewed = server
            .sign_with_certificate(&renewal_csr, &first)
            .await
            .expect("renews");
        vms.push((
            bootstrap,
            Pem {
                chain: renewed,
                key: key.serialize_pem(),
            },
        ));
    }

    let (code, body) = server
        .call(
            reqwest::Method::POST,
            "/apis/vmesh.io/v1/namespaces/shop/workloadgroups/web/jointokens/revoke",
            Some(json!({"id": revoked_id})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["revoked"], 1);
    check_join_lineage(&server, &vms, &csr, &revoked_join, "at once").await;
    server.stop().await;
    let server = Server::start(tmp.path(), false).await;
    check_join_lineage(&server, &vms, &csr, &revoked_join, "after a restart").await;
    server.stop().await;
}

/// The first two VMs of `vms` joined with the revoked `revoked_join`, the
/// third with another token.
async fn check_join_lineage(
    server: &Server,
    vms: &[(String, Pem)],
    csr: &str,
    revoked_join: &str,
    when: &str,
) {
    for (bootstrap, cert) in &vms[..2] {
        assert_eq!(
            refusal(server.sign_with_token(csr, bootstrap).await),
            Code::Unauthenticated,
            "{when}: the bootstrap token a revoked join token minted"
        );
        assert_eq!(
            refusal(server.sign_with_certificate(csr, cert).await),
            Code::Unauthenticated,
            "{when}: a renewed certificate of a revoked join token's lineage"
        );
    }
    let (bootstrap, cert) = &vms[2];
    server
        .sign_with_token(csr, bootstrap)
        .await
        .expect("another join token's VM");
    server
        .sign_with_certificate(csr, cert)
        .await
        .expect("another join token's VM");
    let refused = server.join(revoked_join).await.unwrap_err();
    assert!(refused.contains("revoked"), "{when}: {refused}");
}

/// Guessing credentials at 15012 is slowed to a crawl per source: after ten
/// forged tokens in a minute the source is turned away, good token or not,
/// at the CA and at xDS alike. Credentials that were good once (expired,
/// revoked) are no guesses and do not count.
#[tokio::test]
async fn forged_credentials_are_throttled_per_source() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), false).await;
    server.create_namespace("shop").await;
    let good = server.token("shop", "web").await;
    let revoked = server.token("shop", "web").await;
    server
        .revoke("shop", "web", json!({"id": revoked.id}))
        .await;
    let (_, csr) = new_key_and_csr(&SpiffeId::new(TRUST_DOMAIN, "shop", "web").unwrap()).unwrap();
    for _ in 0..20 {
        assert_eq!(
            refusal(server.sign_with_token(&csr, &revoked.token).await),
            Code::Unauthenticated
        );
    }
    server
        .sign_with_token(&csr, &good.token)
        .await
        .expect("refusals of a revoked token are not guesses");
    for _ in 0..10 {
        assert_eq!(
            refusal(server.sign_with_token(&csr, "forged.not.token").await),
            Code::Unauthenticated
        );
    }
    assert_eq!(
        refusal(server.sign_with_token(&csr, &good.token).await),
        Code::ResourceExhausted,
        "the guessing source waits, whatever it sends"
    );
    let channel = tls_channel(server.xds, &server.root_file(), None)
        .await
        .unwrap();
    let refused = first_cds(channel, node("shop", "web"), Some(&good.token))
        .await
        .expect_err("xDS turns the source away too");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    server.stop().await;
}

/// The serial and end of validity of the certificate a TLS port presents
/// as `name`, trusting only `root_pem`.
async fn served_certificate(addr: SocketAddr, name: &str, root_pem: &str) -> (Vec<u8>, i64) {
    let config = Arc::new(vmesh_ca::client_tls_config(root_pem, None).unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server_name =
        tokio_rustls::rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    .unwrap()
    .expect("the port's certificate is valid for the name");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    (
        cert.raw_serial().to_vec(),
        cert.validity().not_after.timestamp(),
    )
}

#[tokio::test]
async fn serving_certificates_are_renewed_before_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let mut identity = vmesh_server::identity::IdentityConfig::default();
    identity.options.serving_ttl = Duration::from_secs(3);
    let running = start(ServerConfig {
        api_addr: "127.0.0.1:0".parse().unwrap(),
        api_tls: true,
        xds_addr: Some("127.0.0.1:0".parse().unwrap()),
        identity,
        ..ServerConfig::new(dir.path().to_path_buf())
    })
    .await
    .expect("server starts");
    let root = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
    let xds = running.xds_addr.unwrap();
    let api = running.api_addr;
    let first_xds = served_certificate(xds, vmesh_ca::ISTIOD_SERVICE_NAME, &root).await;
    let first_api = served_certificate(api, "localhost", &root).await;
    // Renewed at two thirds of a 3 s life: new ones well before the old expire.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second_xds = served_certificate(xds, vmesh_ca::ISTIOD_SERVICE_NAME, &root).await;
    let second_api = served_certificate(api, "127.0.0.1", &root).await;
    assert_ne!(
        first_xds.0, second_xds.0,
        "the xDS port's certificate was renewed"
    );
    assert_ne!(
        first_api.0, second_api.0,
        "the API's certificate was renewed"
    );
    assert!(second_xds.1 > first_xds.1 && second_api.1 > first_api.1);
    tokio::time::timeout(WAIT, running.shutdown())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_loopback_api_takes_tls_and_plain_http_or_tls_only_when_asked() {
    for tls_only in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let running = start(ServerConfig {
            api_addr: "127.0.0.1:0".parse().unwrap(),
            api_tls: tls_only,
            ..ServerConfig::new(dir.path().to_path_buf())
        })
        .await
        .expect("server starts");
        assert_eq!(running.api_tls, tls_only);
        let root = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
        // TLS, with the mesh CA's certificate for the loopback names.
        served_certificate(running.api_addr, "localhost", &root).await;
        let plain = reqwest::Client::new()
            .get(format!("http://{}/healthz", running.api_addr))
            .timeout(WAIT)
            .send()
            .await;
        match tls_only {
            false => assert_eq!(plain.unwrap().status().as_u16(), 200),
            true => assert!(plain.is_err(), "plain HTTP is refused: {plain:?}"),
        }
        tokio::time::timeout(WAIT, running.shutdown())
            .await
            .unwrap();
    }
}
