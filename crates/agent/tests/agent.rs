//! The assembled agent against the in-process control plane, with tonic
//! clients on its Unix sockets standing in for Envoy: SDS serves the
//! workload certificate and the root and pushes rotations; the xDS proxy
//! relays both ADS protocols over mutual TLS with the current certificate,
//! ends Envoy's stream when the control plane goes away, and connects again
//! once it is back.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use common::{CLUSTER, Mesh, WAIT, init_tracing, uds_channel, workload_id};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;
use vmesh_agent::agent::{self, AgentConfig};
use vmesh_agent::sds::SECRET_TYPE;
use vmesh_ca::AuthorityOptions;
use vmesh_xds::ads::CLUSTER_TYPE;

const NODE: &str = "sidecar~127.0.0.7~vm1.vm-ns~vm-ns.svc.cluster.local";

fn node() -> Option<Node> {
    Some(Node {
        id: NODE.into(),
        ..Default::default()
    })
}

async fn next<T>(stream: &mut Streaming<T>) -> Result<T, tonic::Status> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a message in time")
        .map(|m| m.expect("stream open"))
}

fn secret_of(response: &DiscoveryResponse) -> Vec<Secret> {
    assert_eq!(response.type_url, SECRET_TYPE);
    response
        .resources
        .iter()
        .map(|any| Secret::decode(any.value.as_slice()).unwrap())
        .collect()
}

fn cluster_names(response: &DiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| Cluster::decode(any.value.as_slice()).unwrap().name)
        .collect()
}

/// Opens a state-of-the-world ADS stream through the agent and asks for
/// clusters.
async fn sotw_clusters(
    socket: &std::path::Path,
) -> (
    mpsc::UnboundedSender<DiscoveryRequest>,
    Result<Streaming<DiscoveryResponse>, tonic::Status>,
) {
    let mut client = AggregatedDiscoveryServiceClient::new(uds_channel(socket).await);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DiscoveryRequest {
        node: node(),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .unwrap();
    let responses = client
        .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, responses)
}

#[tokio::test]
async fn sds_and_xds_proxy_with_rotation_and_upstream_restart() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let mesh = Mesh::start(&ca_dir, "127.0.0.1:0", AuthorityOptions::default()).await;
    let addr = mesh.addr;
    let (root, token_file, _) = mesh.onboard(tmp.path());
    let mut config = AgentConfig::new(
        workload_id(),
        addr.to_string(),
        &root,
        tmp.path().join("certs"),
        tmp.path().join("run"),
    );
    config.token_file = Some(token_file);
    config.xds_backoff.initial = Duration::from_millis(100);
    config.xds_backoff.max = Duration::from_millis(500);
    let (stop, shutdown) = watch::channel(false);
    let agent = agent::start(config, shutdown).await.unwrap();
    for socket in [agent.sds_socket(), agent.xds_socket()] {
        let meta = std::fs::symlink_metadata(socket).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            socket.display()
        );
    }

    // --- SDS ---
    let mut sds = SecretDiscoveryServiceClient::new(uds_channel(agent.sds_socket()).await);
    let (sds_tx, rx) = mpsc::unbounded_channel();
    sds_tx
        .send(DiscoveryRequest {
            node: node(),
            resource_names: vec!["default".into(), "ROOTCA".into()],
            type_url: SECRET_TYPE.into(),
            ..Default::default()
        })
        .unwrap();
    let mut secrets = sds
        .stream_secrets(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // The certificate may arrive after the root: wait for a response with both.
    let first = loop {
        let response = next(&mut secrets).await.unwrap();
        sds_tx
            .send(DiscoveryRequest {
                resource_names: vec!["default".into(), "ROOTCA".into()],
                type_url: SECRET_TYPE.into(),
                version_info: response.version_info.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .unwrap();
        if secret_of(&response).len() == 2 {
            break response;
        }
    };
    let creds = agent.identity().current().expect("a certificate by now");
    for secret in secret_of(&first) {
        match (secret.name.as_str(), secret.r#type.unwrap()) {
            ("default", secret::Type::TlsCertificate(tls)) => {
                assert_eq!(
                    tls.certificate_chain.unwrap().specifier,
                    Some(Specifier::InlineBytes(creds.chain_pem().into_bytes()))
                );
                assert_eq!(
                    tls.private_key.unwrap().specifier,
                    Some(Specifier::InlineBytes(creds.key_pem().as_bytes().to_vec()))
                );
            }
            ("ROOTCA", secret::Type::ValidationContext(ctx)) => assert_eq!(
                ctx.trusted_ca.unwrap().specifier,
                Some(Specifier::InlineBytes(mesh.root_pem().as_bytes().to_vec()))
            ),
            (name, other) => panic!("unexpected secret {name}: {other:?}"),
        }
    }

    // --- ADS through the proxy, state of the world ---
    let (ads_tx, responses) = sotw_clusters(agent.xds_socket()).await;
    let mut responses = responses.unwrap();
    let clusters = next(&mut responses).await.unwrap();
    assert_eq!(cluster_names(&clusters), [CLUSTER]);
    ads_tx
        .send(DiscoveryRequest {
            type_url: CLUSTER_TYPE.into(),
            version_info: clusters.version_info.clone(),
            response_nonce: clusters.nonce.clone(),
            ..Default::default()
        })
        .unwrap();
    let peers = mesh.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers[0].id,
        workload_id().to_string(),
        "mutual TLS with the workload certificate"
    );
    assert_eq!(peers[0].serial, creds.serial());

    // A node claiming another identity than its certificate's is refused
    // by the control plane, and Envoy hears why.
    let mut client = AggregatedDiscoveryServiceClient::new(uds_channel(agent.xds_socket()).await);
    let (impostor_tx, rx) = mpsc::unbounded_channel();
    impostor_tx
        .send(DiscoveryRequest {
            node: Some(Node {
                id: "sidecar~127.0.0.7~db.other-ns~other-ns.svc.cluster.local".into(),
                ..Default::default()
            }),
            type_url: CLUSTER_TYPE.into(),
            ..Default::default()
        })
        .unwrap();
    let mut impostor = client
        .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let status = next(&mut impostor).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("other-ns"),
        "{}",
        status.message()
    );

    // --- Delta ---
    let mut delta_client =
        AggregatedDiscoveryServiceClient::new(uds_channel(agent.xds_socket()).await);
    let (delta_tx, rx) = mpsc::unbounded_channel();
    delta_tx
        .send(DeltaDiscoveryRequest {
            node: node(),
            type_url: CLUSTER_TYPE.into(),
            ..Default::default()
        })
        .unwrap();
    let mut delta = delta_client
        .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let response = next(&mut delta).await.unwrap();
    let names: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, [CLUSTER]);

    // --- Rotation: SDS pushes, new streams present the new certificate ---
    let mut watch_creds = agent.identity().subscribe();
    watch_creds.borrow_and_update();
    agent.identity().renew_now();
    tokio::time::timeout(WAIT, watch_creds.changed())
        .await
        .unwrap()
        .unwrap();
    let renewed = agent.identity().current().unwrap();
    assert_ne!(renewed.serial(), creds.serial());
    let pushed = next(&mut secrets).await.unwrap();
    assert_ne!(pushed.version_info, first.version_info);
    let chains: Vec<Vec<u8>> = secret_of(&pushed)
        .into_iter()
        .filter_map(|s| match s.r#type {
            Some(secret::Type::TlsCertificate(tls)) => match tls.certificate_chain?.specifier? {
                Specifier::InlineBytes(b) => Some(b),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(chains, [renewed.chain_pem().into_bytes()]);
    let (_again_tx, again) = sotw_clusters(agent.xds_socket()).await;
    let mut again = again.unwrap();
    assert_eq!(cluster_names(&next(&mut again).await.unwrap()), [CLUSTER]);
    let peers = mesh.peers();
    assert_eq!(peers.last().unwrap().serial, renewed.serial(), "{peers:?}");

    // --- The control plane goes away: Envoy's streams end UNAVAILABLE ---
    mesh.stop().await;
    let status = next(&mut responses).await.expect_err("the stream ends");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let status = next(&mut delta).await.expect_err("the stream ends");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // A stream opened while it is down waits, and is served once the
    // control plane is back on the same address.
    let (_waiting_tx, waiting) = sotw_clusters(agent.xds_socket()).await;
    let mut waiting = waiting.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mesh = Mesh::start(&ca_dir, &addr.to_string(), AuthorityOptions::default()).await;
    assert_eq!(cluster_names(&next(&mut waiting).await.unwrap()), [CLUSTER]);
    assert_eq!(mesh.peers()[0].serial, renewed.serial());

    // Shutdown ends the streams and removes the sockets.
    stop.send_replace(true);
    let status = next(&mut waiting).await.expect_err("ends on shutdown");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let (sds_socket, xds_socket) = (agent.sds_socket().to_owned(), agent.xds_socket().to_owned());
    tokio::time::timeout(WAIT, agent.wait())
        .await
        .expect("agent stops")
        .unwrap();
    assert!(!sds_socket.exists() && !xds_socket.exists());
    mesh.stop().await;
}
