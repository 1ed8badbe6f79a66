//! The CA service end to end, in process, over real TLS on 127.0.0.1: the
//! server accepts with `server_tls_config` (client certificates optional,
//! verified against the mesh root) and serves tonic over
//! `tokio_rustls::server::TlsStream<TcpStream>`; clients connect with
//! `client_tls_config`, with a bearer token, a mesh certificate, or neither.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request};
use vmesh_ca::{
    Authority, AuthorityOptions, CertificateService, IstioCertificateRequest,
    IstioCertificateServiceClient, PeerIdentity, ROOT_CERT_FILE, ROOT_KEY_FILE, Revocations,
    SpiffeId, TOKEN_KEY_FILE, TokenIssuer, server_tls_config,
};
use vmesh_testkit::tls;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: u64 = 24 * 3600;

struct Mesh {
    dir: tempfile::TempDir,
    authority: Arc<Authority>,
    issuer: Arc<TokenIssuer>,
    revocations: watch::Sender<Arc<Revocations>>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    acceptor: JoinHandle<()>,
}

impl Mesh {
    async fn start() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::load_or_create(
            &dir.path().join("ca"),
            "cluster.local",
            AuthorityOptions::default(),
        )
        .unwrap();
        Mesh::start_with(dir, authority).await
    }

    async fn start_with(dir: tempfile::TempDir, authority: Authority) -> Mesh {
        let authority = Arc::new(authority);
        let issuer =
            Arc::new(TokenIssuer::load_or_create(&dir.path().join("ca"), "cluster.local").unwrap());
        let (revocations, revocations_rx) = watch::channel(Arc::new(Revocations::new()));
        let service = CertificateService::new(authority.clone(), issuer.clone(), revocations_rx);

        let (chain, key) = authority
            .serving_certificate(&["127.0.0.1".into()])
            .unwrap();
        let tls = TlsAcceptor::from(Arc::new(
            server_tls_config(&chain, &key, authority.root_pem()).unwrap(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A failed handshake (e.g. a client certificate from another CA)
        // just drops the connection.
        let (incoming, acceptor) = tls::incoming(listener, tls);
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .add_service(service.into_server())
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = shutdown_rx.await;
                }),
        );
        Mesh {
            dir,
            authority,
            issuer,
            revocations,
            addr,
            shutdown: Some(shutdown),
            server: Some(server),
            acceptor,
        }
    }

    async fn stop(mut self) {
        self.acceptor.abort();
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.server.take().unwrap())
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }

    /// A client over TLS, presenting `identity` (chain, key) when given.
    async fn client(
        &self,
        identity: Option<(&[String], &str)>,
    ) -> IstioCertificateServiceClient<Channel> {
        let channel = tls::connect(self.addr, self.authority.root_pem(), identity)
            .await
            .unwrap();
        IstioCertificateServiceClient::new(channel)
    }

    fn revoke(&self, f: impl FnOnce(&mut Revocations)) {
        self.revocations.send_modify(|r| f(Arc::make_mut(r)));
    }
}

/// A CSR that asks for somebody else's identity, extra names and CA rights.
fn greedy_csr() -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/istio-system/sa/istiod"
            .try_into()
            .unwrap(),
    ));
    params.distinguished_name.push(DnType::CommonName, "admin");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

fn request(csr: &str, validity_secs: i64, token: Option<&str>) -> Request<IstioCertificateRequest> {
    let mut req = Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: validity_secs,
        metadata: None,
    });
    if let Some(token) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    req
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn uris(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => format!("non-URI SAN {other:?}"),
        })
        .collect()
}

fn life_secs(cert: &X509Certificate<'_>) -> i64 {
    cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()
}

/// Checks the chain links with x509-parser and the leaf as a client
/// certificate with webpki against the root alone.
fn assert_chain_verifies(chain: &[String], root_pem: &str) {
    let ders: Vec<_> = chain.iter().map(|p| der(p)).collect();
    assert_eq!(chain.last().unwrap(), root_pem, "root last");
    let certs: Vec<_> = ders
        .iter()
        .map(|d| X509Certificate::from_der(d).unwrap().1)
        .collect();
    for pair in certs.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .unwrap();
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(root_pem)).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&ders[0], &ders[1..ders.len() - 1], UnixTime::now())
        .expect("leaf verifies as a mesh client certificate against the root");
}

#[tokio::test]
async fn token_gets_a_certificate_for_its_own_identity_only() {
    let mesh = Mesh::start().await;
    let token = mesh.issuer.issue("vm-ns", "payment", HOUR).unwrap();
    let (key, csr) = greedy_csr();
    let resp = mesh
        .client(None)
        .await
        .create_certificate(request(&csr, 0, Some(&token.token)))
        .await
        .unwrap()
        .into_inner();
    let chain = resp.cert_chain;
    assert_eq!(chain.len(), 2, "leaf then root");
    assert_eq!(chain[1], mesh.authority.root_pem());
    assert_chain_verifies(&chain, mesh.authority.root_pem());

    let leaf_der = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    assert_eq!(
        uris(&leaf),
        vec!["spiffe://cluster.local/ns/vm-ns/sa/payment".to_string()]
    );
    let subject: Vec<String> = leaf
        .subject()
        .iter_attributes()
        .map(|a| format!("{}={}", a.attr_type(), a.as_str().unwrap()))
        .collect();
    assert_eq!(
        subject,
        [format!("2.5.4.5=vmesh-lineage:{}", token.id)],
        "the CSR's subject is ignored; the subject names the token the certificate descends from"
    );
    assert!(!leaf.is_ca());
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && eku.server_auth);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    // Default life 24 h, backdated a minute.
    assert!(
        (life_secs(&leaf) - (DAY as i64 + 60)).abs() <= 2,
        "{}",
        life_secs(&leaf)
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((leaf.validity().not_before.timestamp() - (now - 60)).abs() <= 5);
    mesh.stop().await;
}

#[tokio::test]
async fn validity_is_clamped_to_the_maximum() {
    let mesh = Mesh::start().await;
    let token = mesh.issuer.issue("a", "b", HOUR).unwrap();
    let mut client = mesh.client(None).await;
    for (asked, expected) in [
        (3600, 3600),
        (365 * DAY as i64, 90 * DAY as i64),
        (-5, DAY as i64),
    ] {
        let (_, csr) = greedy_csr();
        let chain = client
            .create_certificate(request(&csr, asked, Some(&token.token)))
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        let d = der(&chain[0]);
        let (_, leaf) = X509Certificate::from_der(&d).unwrap();
        assert!(
            (life_secs(&leaf) - 60 - expected).abs() <= 2,
            "asked {asked}: life {}",
            life_secs(&leaf)
        );
    }
    mesh.stop().await;
}

fn sign_with_token_key(dir: &Path, claims: serde_json::Value) -> String {
    let pem = std::fs::read(dir.join("ca").join(TOKEN_KEY_FILE)).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn bad_credentials_are_unauthenticated() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client(None).await;
    let (_, csr) = greedy_csr();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let expired = mesh
        .issuer
        .issue_at("a", "b", HOUR, SystemTime::now() - 2 * HOUR)
        .unwrap()
        .token;
    let wrong_audience = sign_with_token_key(
        mesh.dir.path(),
        serde_json::json!({"iss":"vmesh","aud":["kubernetes.default.svc"],"sub":"system:serviceaccount:a:b","iat":now,"exp":now+600,"jti":"x1"}),
    );
    // A control: the same claims with the right audience pass, so the key
    // and the claims are otherwise fine.
    let right_audience = sign_with_token_key(
        mesh.dir.path(),
        serde_json::json!({"iss":"vmesh","aud":["istio-ca"],"sub":"system:serviceaccount:a:b","iat":now,"exp":now+600,"jti":"x2"}),
    );
    client
        .create_certificate(request(&csr, 0, Some(&right_audience)))
        .await
        .expect("control token is accepted");
    let other_dir = tempfile::tempdir().unwrap();
    let forged = TokenIssuer::load_or_create(other_dir.path(), "cluster.local")
        .unwrap()
        .issue("a", "b", HOUR)
        .unwrap()
        .token;
    // A real token with its payload swapped for another account's.
    let real = mesh.issuer.issue("a", "b", HOUR).unwrap().token;
    let other = mesh
        .issuer
        .issue("istio-system", "istiod", HOUR)
        .unwrap()
        .token;
    let spliced = {
        let r: Vec<&str> = real.split('.').collect();
        let o: Vec<&str> = other.split('.').collect();
        format!("{}.{}.{}", r[0], o[1], r[2])
    };

    for (name, token, needle) in [
        ("expired", expired.as_str(), "expired"),
        ("wrong audience", &wrong_audience, "audience"),
        ("forged", &forged, "signature"),
        ("spliced", &spliced, "signature"),
        ("garbage", "not-a-jwt", "malformed"),
        ("three garbage parts", "a.b.c", "malformed"),
    ] {
        let status = client
            .create_certificate(request(&csr, 0, Some(token)))
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{name}: {:?}",
            status.message()
        );
    }

    let status = client
        .create_certificate(request(&csr, 0, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("no credentials"),
        "{}",
        status.message()
    );

    let mut basic = request(&csr, 0, None);
    basic
        .metadata_mut()
        .insert("authorization", "Basic YTpi".parse().unwrap());
    let status = client.create_certificate(basic).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // An authenticated caller with a bad CSR gets InvalidArgument.
    let good = mesh.issuer.issue("a", "b", HOUR).unwrap().token;
    let status = client
        .create_certificate(request("hello", 0, Some(&good)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut tampered =
        rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
    let n = tampered.len();
    tampered[n - 3] ^= 0x10;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", tampered));
    let status = client
        .create_certificate(request(&tampered, 0, Some(&good)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("signature"),
        "{}",
        status.message()
    );
    mesh.stop().await;
}

#[tokio::test]
async fn revocation_takes_effect_on_the_next_call() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client(None).await;
    let (_, csr) = greedy_csr();
    let first = mesh.issuer.issue("vm", "web", HOUR).unwrap();
    let second = mesh.issuer.issue("vm", "web", HOUR).unwrap();
    client
        .create_certificate(request(&csr, 0, Some(&first.token)))
        .await
        .unwrap();

    mesh.revoke(|r| r.revoke_token(&first.id));
    let status = client
        .create_certificate(request(&csr, 0, Some(&first.token)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{}", status.message());
    // Only that token.
    client
        .create_certificate(request(&csr, 0, Some(&second.token)))
        .await
        .unwrap();

    mesh.revoke(|r| r.revoke_account("vm", "web", SystemTime::now()));
    let status = client
        .create_certificate(request(&csr, 0, Some(&second.token)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{}", status.message());
    // Other accounts are untouched.
    let other = mesh.issuer.issue("vm", "db", HOUR).unwrap();
    client
        .create_certificate(request(&csr, 0, Some(&other.token)))
        .await
        .unwrap();

    // A token issued after the revocation (one-second resolution) works.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = mesh.issuer.issue("vm", "web", HOUR).unwrap();
    let chain = client
        .create_certificate(request(&csr, 0, Some(&fresh.token)))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    let d = der(&chain[0]);
    assert_eq!(
        uris(&X509Certificate::from_der(&d).unwrap().1),
        vec!["spiffe://cluster.local/ns/vm/sa/web".to_string()]
    );
    mesh.stop().await;
}

#[tokio::test]
async fn revoking_a_token_refuses_renewals_of_everything_issued_from_it() {
    let mesh = Mesh::start().await;
    let token = mesh.issuer.issue("vm", "web", HOUR).unwrap();
    let other = mesh.issuer.issue("vm", "web", HOUR).unwrap();
    let issue = |chain: Option<(Vec<String>, String)>, token: Option<String>| {
        let mesh = &mesh;
        async move {
            let (key, csr) = greedy_csr();
            let mut client = match &chain {
                Some((chain, key)) => mesh.client(Some((chain.as_slice(), key.as_str()))).await,
                None => mesh.client(None).await,
            };
            client
                .create_certificate(request(&csr, 0, token.as_deref()))
                .await
                .map(|r| (r.into_inner().cert_chain, key.serialize_pem()))
        }
    };
    // A certificate from the token, its renewal, and the renewal's renewal:
    // each carries the token's id.
    let first = issue(None, Some(token.token.clone())).await.unwrap();
    let second = issue(Some(first.clone()), None).await.unwrap();
    let third = issue(Some(second.clone()), None).await.unwrap();
    for (chain, _) in [&first, &second, &third] {
        let peer = PeerIdentity::from_certificate(&der(&chain[0]), "cluster.local").unwrap();
        assert_eq!(peer.lineage.as_deref(), Some(token.id.as_str()));
    }
    let unrelated = issue(None, Some(other.token.clone())).await.unwrap();

    mesh.revoke(|r| r.revoke_token(&token.id));
    for chain in [first, second, third] {
        let status = issue(Some(chain), None).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(
            status
                .message()
                .contains(&format!("revoked token {}", token.id)),
            "{}",
            status.message()
        );
    }
    // The same account's other lineage renews on.
    issue(Some(unrelated), None).await.unwrap();
    mesh.stop().await;
}

#[tokio::test]
async fn renewal_with_the_current_mesh_certificate() {
    let mesh = Mesh::start().await;
    let token = mesh.issuer.issue("vm", "web", HOUR).unwrap();
    let (key, csr) = greedy_csr();
    let chain = mesh
        .client(None)
        .await
        .create_certificate(request(&csr, 0, Some(&token.token)))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;

    // No token: the client certificate authenticates, and still only its
    // own identity is issued.
    let key_pem = key.serialize_pem();
    let mut with_cert = mesh.client(Some((&chain, &key_pem))).await;
    let (_, csr2) = greedy_csr();
    let renewed = with_cert
        .create_certificate(request(&csr2, 0, None))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    let d = der(&renewed[0]);
    assert_eq!(
        uris(&X509Certificate::from_der(&d).unwrap().1),
        vec!["spiffe://cluster.local/ns/vm/sa/web".to_string()]
    );
    assert_chain_verifies(&renewed, mesh.authority.root_pem());

    // A certificate beats an expired token sent along with it.
    let expired = mesh
        .issuer
        .issue_at("vm", "web", HOUR, SystemTime::now() - 2 * HOUR)
        .unwrap();
    with_cert
        .create_certificate(request(&csr2, 0, Some(&expired.token)))
        .await
        .unwrap();

    // Revoking the account stops renewal with certificates issued before.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mesh.revoke(|r| r.revoke_account("vm", "web", SystemTime::now()));
    let status = with_cert
        .create_certificate(request(&csr2, 0, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{}", status.message());

    // A client certificate from another CA never gets through the handshake.
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = Authority::load_or_create(
        stranger_dir.path(),
        "cluster.local",
        AuthorityOptions::default(),
    )
    .unwrap();
    let stranger_key = KeyPair::generate().unwrap();
    let stranger_csr = CertificateParams::default()
        .serialize_request(&stranger_key)
        .unwrap()
        .pem()
        .unwrap();
    let stranger_chain = stranger
        .sign_workload(
            &stranger_csr,
            &SpiffeId::new("cluster.local", "vm", "db").unwrap(),
            None,
        )
        .unwrap();
    let stranger_key_pem = stranger_key.serialize_pem();
    let outcome = async {
        let channel = tls::connect(
            mesh.addr,
            mesh.authority.root_pem(),
            Some((&stranger_chain, &stranger_key_pem)),
        )
        .await
        .map_err(|e| e.to_string())?;
        IstioCertificateServiceClient::new(channel)
            .create_certificate(request(&stranger_csr, 0, None))
            .await
            .map_err(|e| e.to_string())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), outcome)
        .await
        .expect("fails promptly");
    assert!(
        outcome.is_err(),
        "a foreign client certificate must not be served"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn key_files_are_private_and_the_root_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let first =
        Authority::load_or_create(&ca_dir, "cluster.local", AuthorityOptions::default()).unwrap();
    let issuer = TokenIssuer::load_or_create(&ca_dir, "cluster.local").unwrap();
    let token = issuer.issue("a", "b", HOUR).unwrap();
    for file in [ROOT_KEY_FILE, TOKEN_KEY_FILE] {
        let mode = std::fs::metadata(ca_dir.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    assert_eq!(
        std::fs::read_to_string(ca_dir.join(ROOT_CERT_FILE)).unwrap(),
        first.root_pem()
    );
    drop((first.root_pem().to_owned(), issuer));

    // "Restart": load everything again from the directory.
    let root_before = first.root_pem().to_owned();
    drop(first);
    let second =
        Authority::load_or_create(&ca_dir, "cluster.local", AuthorityOptions::default()).unwrap();
    assert_eq!(second.root_pem(), root_before);
    let mesh = Mesh::start_with(dir, second).await;
    // The reloaded token key still accepts a token issued before the restart.
    let (_, csr) = greedy_csr();
    let chain = mesh
        .client(None)
        .await
        .create_certificate(request(&csr, 0, Some(&token.token)))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain.last().unwrap(), &root_before);
    mesh.stop().await;
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    params
}

#[tokio::test]
async fn plugged_in_intermediate_issues_leaf_intermediate_root() {
    let dir = tempfile::tempdir().unwrap();
    let root_params = ca_params("operator root");
    let root_key = KeyPair::generate().unwrap();
    let root = root_params.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate().unwrap();
    let int = ca_params("vmesh intermediate")
        .signed_by(&int_key, &Issuer::from_params(&root_params, &root_key))
        .unwrap();
    let plug = dir.path().join("plugged");
    std::fs::create_dir(&plug).unwrap();
    std::fs::write(plug.join("ca-cert.pem"), int.pem()).unwrap();
    std::fs::write(plug.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
    std::fs::write(plug.join("cert-chain.pem"), root.pem()).unwrap();
    let authority = Authority::from_files(
        &plug.join("ca-cert.pem"),
        &plug.join("ca-key.pem"),
        Some(&plug.join("cert-chain.pem")),
        "cluster.local",
        AuthorityOptions::default(),
    )
    .unwrap();
    assert_eq!(authority.root_pem(), root.pem());

    let mesh = Mesh::start_with(dir, authority).await;
    let token = mesh.issuer.issue("vm", "web", HOUR).unwrap();
    let (_, csr) = greedy_csr();
    let chain = mesh
        .client(None)
        .await
        .create_certificate(request(&csr, 0, Some(&token.token)))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain[1], int.pem());
    assert_eq!(chain[2], root.pem());
    assert_chain_verifies(&chain, &root.pem());
    let d = der(&chain[0]);
    assert_eq!(
        uris(&X509Certificate::from_der(&d).unwrap().1),
        vec!["spiffe://cluster.local/ns/vm/sa/web".to_string()]
    );
    mesh.stop().await;
}
