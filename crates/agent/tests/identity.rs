//! The certificate manager against a real, in-process mesh CA over TLS:
//! first certificate with the bootstrap token, restart from disk without
//! it, renewal at half life with the certificate alone (the token revoked)
//! on tokio's paused clock, short-lived certificates rotating on the real
//! clock, and — through a fake signer — how failures are retried.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use common::{Mesh, WAIT, init_tracing, workload_id};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;
use vmesh_agent::identity::{
    CHAIN_FILE, CaAuth, CaClient, CertificateManager, CertificateSigner, Credentials,
    IdentityConfig, IdentityHandle, KEY_FILE, RenewalPolicy, SignError, TrustAnchors,
};
use vmesh_agent::upstream::Upstream;
use vmesh_ca::{Authority, AuthorityOptions};

const HOUR: Duration = Duration::from_secs(3600);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

struct Running {
    handle: IdentityHandle,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("manager stops")
            .unwrap();
    }
}

fn start(config: IdentityConfig, root_pem: &str, signer: Arc<dyn CertificateSigner>) -> Running {
    let anchors = TrustAnchors::from_pem(root_pem).unwrap();
    let manager = CertificateManager::new(config, anchors, signer).unwrap();
    let handle = manager.handle();
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(manager.run(shutdown));
    Running { handle, stop, task }
}

fn ca_client(mesh: &Mesh) -> Arc<dyn CertificateSigner> {
    Arc::new(
        CaClient::new(Upstream::new(mesh.addr.to_string(), mesh.root_pem()))
            .with_cluster_id("Kubernetes"),
    )
}

async fn next_certificate(
    rx: &mut watch::Receiver<Option<Arc<Credentials>>>,
    timeout: Duration,
) -> Arc<Credentials> {
    tokio::time::timeout(timeout, rx.changed())
        .await
        .expect("a new certificate in time")
        .expect("manager alive");
    rx.borrow_and_update().clone().expect("credentials")
}

#[tokio::test]
async fn token_first_then_restart_from_disk_and_renew_with_the_certificate() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(
        &tmp.path().join("ca"),
        "127.0.0.1:0",
        AuthorityOptions::default(),
    )
    .await;
    let (root, token_file, _) = mesh.onboard(tmp.path());
    let root_pem = std::fs::read_to_string(&root).unwrap();
    let cert_dir = tmp.path().join("agent/certs");
    let mut config = IdentityConfig::new(workload_id(), &cert_dir);
    config.token_file = Some(token_file.clone());

    // First start: nothing on disk, the token gets a certificate.
    let running = start(config.clone(), &root_pem, ca_client(&mesh));
    assert!(running.handle.current().is_none());
    let first = tokio::time::timeout(WAIT, running.handle.ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.identity(), &workload_id());
    assert_eq!(
        first.chain().last().unwrap(),
        mesh.root_pem(),
        "leaf then root"
    );
    let life = first
        .not_after()
        .duration_since(first.not_before())
        .unwrap();
    assert_eq!(life.as_secs(), 24 * 3600 + 60, "the CA's default life");
    assert_eq!(mode(&cert_dir), 0o700);
    assert_eq!(mode(&cert_dir.join(KEY_FILE)), 0o600);
    assert_eq!(
        std::fs::read_to_string(cert_dir.join(KEY_FILE)).unwrap(),
        first.key_pem()
    );
    assert_eq!(
        std::fs::read_to_string(cert_dir.join(CHAIN_FILE)).unwrap(),
        first.chain_pem()
    );
    let status = running.handle.status();
    assert_eq!((status.issued, status.last_error), (1, None));
    running.stop().await;

    // The token is gone: a restart carries on with the stored certificate,
    // published before the manager even runs…
    std::fs::remove_file(&token_file).unwrap();
    let running = start(config.clone(), &root_pem, ca_client(&mesh));
    assert_eq!(running.handle.current().as_deref(), Some(&*first));
    // …and renews with it, over mutual TLS.
    let mut rx = running.handle.subscribe();
    rx.borrow_and_update();
    running.handle.renew_now();
    let second = next_certificate(&mut rx, WAIT).await;
    assert_ne!(second.serial(), first.serial());
    assert_eq!(second.identity(), &workload_id());
    assert_ne!(
        second.key_pem(),
        first.key_pem(),
        "a new key with every certificate"
    );
    assert_eq!(
        std::fs::read_to_string(cert_dir.join(CHAIN_FILE)).unwrap(),
        second.chain_pem()
    );
    assert_eq!(mode(&cert_dir.join(KEY_FILE)), 0o600);
    running.stop().await;

    // Another identity cannot use those files, and without a token says so.
    let mut other = IdentityConfig::new(
        vmesh_ca::SpiffeId::new(common::TRUST_DOMAIN, "vm-ns", "someone-else").unwrap(),
        &cert_dir,
    );
    other.token_file = Some(token_file.clone());
    other.renewal.retry.initial = Duration::from_millis(50);
    let running = start(other, &root_pem, ca_client(&mesh));
    assert!(running.handle.current().is_none());
    let error = loop {
        if let Some(e) = running.handle.status().last_error {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        error.contains("no valid certificate and no bootstrap token"),
        "{error}"
    );
    running.stop().await;
    mesh.stop().await;
}

/// The real CA client, run on a real-clock runtime of its own through
/// `spawn_blocking`: tokio's paused clock jumps ahead whenever its runtime
/// idles with a timer pending, even while socket I/O is in flight, so
/// network I/O on the paused runtime would race the clock. A blocking task
/// holds the paused clock still until the call is done.
struct OnRealClock {
    client: Arc<CaClient>,
    runtime: tokio::runtime::Handle,
}

#[tonic::async_trait]
impl CertificateSigner for OnRealClock {
    async fn sign(
        &self,
        csr: &str,
        validity: Option<Duration>,
        auth: CaAuth<'_>,
    ) -> Result<Vec<String>, SignError> {
        enum Owned {
            Token(String),
            Certificate(Credentials),
        }
        let auth = match auth {
            CaAuth::Token(t) => Owned::Token(t.to_owned()),
            CaAuth::Certificate(c) => Owned::Certificate(c.clone()),
        };
        let (client, runtime, csr) = (self.client.clone(), self.runtime.clone(), csr.to_owned());
        tokio::task::spawn_blocking(move || {
            runtime.block_on(async {
                let auth = match &auth {
                    Owned::Token(t) => CaAuth::Token(t),
                    Owned::Certificate(c) => CaAuth::Certificate(c),
                };
                client.sign(&csr, validity, auth).await
            })
        })
        .await
        .unwrap()
    }
}

/// Runs `f` to completion on `runtime`, from a paused-clock test.
async fn on<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let runtime = runtime.clone();
    tokio::task::spawn_blocking(move || runtime.block_on(f))
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_life_with_the_certificate_on_a_paused_clock() {
    init_tracing();
    let real = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let mesh = on(real.handle(), async move {
        Mesh::start(&ca_dir, "127.0.0.1:0", AuthorityOptions::default()).await
    })
    .await;
    let (root, token_file, _) = mesh.onboard(tmp.path());
    let root_pem = std::fs::read_to_string(&root).unwrap();
    let cert_dir = tmp.path().join("certs");
    let mut config = IdentityConfig::new(workload_id(), &cert_dir);
    config.token_file = Some(token_file.clone());
    config.requested_ttl = Some(HOUR);
    let signer = Arc::new(OnRealClock {
        client: Arc::new(CaClient::new(Upstream::new(
            mesh.addr.to_string(),
            mesh.root_pem(),
        ))),
        runtime: real.handle().clone(),
    });

    let running = start(config, &root_pem, signer);
    let mut rx = running.handle.subscribe();
    let first = next_certificate(&mut rx, WAIT).await;
    let issued_at = Instant::now();
    let life = first
        .not_after()
        .duration_since(first.not_before())
        .unwrap();
    assert_eq!(
        life,
        HOUR + Duration::from_secs(60),
        "one hour asked, backdated a minute"
    );
    // From here on there is no token: renewals must use the certificate.
    std::fs::remove_file(&token_file).unwrap();

    for round in 0..2 {
        let previous = rx.borrow().clone().unwrap();
        let start = Instant::now();
        let next = next_certificate(&mut rx, 2 * HOUR).await;
        let waited = start.elapsed();
        // Half the hour, plus up to a tenth of it.
        assert!(
            waited >= HOUR / 2 - Duration::from_secs(5)
                && waited <= HOUR / 2 + HOUR / 10 + Duration::from_secs(5),
            "round {round}: renewed after {waited:?}"
        );
        assert_ne!(next.serial(), previous.serial());
        assert_eq!(next.identity(), &workload_id());
        assert_eq!(
            std::fs::read_to_string(cert_dir.join(CHAIN_FILE)).unwrap(),
            next.chain_pem()
        );
        // Another subscriber, made before the rotation, sees it too.
        assert_eq!(running.handle.current().unwrap().serial(), next.serial());
    }
    assert!(
        issued_at.elapsed() >= HOUR,
        "two renewals took at least an hour of tokio time"
    );
    let status = running.handle.status();
    assert_eq!((status.issued, status.consecutive_failures), (3, 0));
    running.stop().await;
    on(real.handle(), mesh.stop()).await;
    real.shutdown_background();
}

#[tokio::test]
async fn short_lived_certificates_rotate_on_the_real_clock() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(
        &tmp.path().join("ca"),
        "127.0.0.1:0",
        AuthorityOptions::default(),
    )
    .await;
    let (root, token_file, token) = mesh.onboard(tmp.path());
    let root_pem = std::fs::read_to_string(&root).unwrap();
    let mut config = IdentityConfig::new(workload_id(), tmp.path().join("certs"));
    config.token_file = Some(token_file.clone());
    config.requested_ttl = Some(Duration::from_secs(4));

    let running = start(config, &root_pem, ca_client(&mesh));
    let mut rx = running.handle.subscribe();
    let mut serials = vec![next_certificate(&mut rx, WAIT).await.serial().to_owned()];
    std::fs::remove_file(&token_file).unwrap();
    let start = Instant::now();
    for _ in 0..2 {
        serials.push(next_certificate(&mut rx, WAIT).await.serial().to_owned());
    }
    let took = start.elapsed();
    // Each renewal comes 2 to 2.4 s after the last certificate.
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "{took:?}"
    );
    serials.dedup();
    assert_eq!(serials.len(), 3, "{serials:?}");

    // Revoking the token the certificates descend from ends their renewals.
    mesh.revoke(|r| r.revoke_token(&token.id));
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(error) = running.handle.status().last_error {
                break error;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a renewal refused in time");
    assert!(
        refused.contains(&format!("descends from revoked token {}", token.id)),
        "{refused}"
    );
    running.stop().await;
    mesh.stop().await;
}

/// A CA without a network: signs with an [`Authority`] directly, after
/// failing as often as told, and records how each call authenticated.
struct FakeCa {
    authority: Authority,
    fail_next: AtomicU32,
    calls: Mutex<Vec<(Instant, &'static str)>>,
}

#[tonic::async_trait]
impl CertificateSigner for FakeCa {
    async fn sign(
        &self,
        csr: &str,
        validity: Option<Duration>,
        auth: CaAuth<'_>,
    ) -> Result<Vec<String>, SignError> {
        let kind = match auth {
            CaAuth::Token(_) => "token",
            CaAuth::Certificate(c) => {
                assert!(
                    c.is_valid_at(SystemTime::now()),
                    "only valid certificates are presented"
                );
                "certificate"
            }
        };
        self.calls.lock().push((Instant::now(), kind));
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SignError::Refused {
                code: tonic::Code::Unavailable,
                message: "CA down".into(),
            });
        }
        Ok(self
            .authority
            .sign_workload(csr, &workload_id(), validity)
            .unwrap())
    }
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_with_backoff_and_renewals_use_the_certificate() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let authority = Authority::load_or_create(
        &tmp.path().join("ca"),
        common::TRUST_DOMAIN,
        AuthorityOptions::default(),
    )
    .unwrap();
    let root_pem = authority.root_pem().to_owned();
    let fake = Arc::new(FakeCa {
        authority,
        fail_next: AtomicU32::new(3),
        calls: Mutex::default(),
    });
    let token_file = tmp.path().join("istio-token");
    std::fs::write(&token_file, "a-token\n").unwrap();
    let mut config = IdentityConfig::new(workload_id(), tmp.path().join("certs"));
    config.token_file = Some(token_file.clone());
    config.requested_ttl = Some(HOUR);
    config.renewal = RenewalPolicy::default();

    let running = start(config.clone(), &root_pem, fake.clone());
    let mut rx = running.handle.subscribe();
    let started = Instant::now();
    let first = next_certificate(&mut rx, HOUR).await;
    // Three failures, retried after ~1, ~2 and ~4 s (jitter shortens by up
    // to a fifth), then success.
    let calls = fake.calls.lock().clone();
    assert_eq!(
        calls.iter().map(|(_, k)| *k).collect::<Vec<_>>(),
        ["token"; 4]
    );
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
    for (gap, full) in gaps.iter().zip([1, 2, 4]) {
        let full = Duration::from_secs(full);
        assert!(*gap <= full && *gap >= full.mul_f64(0.8), "{gaps:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(running.handle.status().consecutive_failures, 0);

    // The renewal fails twice, and is retried with the certificate (never
    // the token) until it works, well before the certificate expires.
    fake.fail_next.store(2, Ordering::SeqCst);
    let second = next_certificate(&mut rx, HOUR).await;
    assert_ne!(second.serial(), first.serial());
    let calls = fake.calls.lock().clone();
    assert_eq!(
        calls[4..].iter().map(|(_, k)| *k).collect::<Vec<_>>(),
        ["certificate"; 3]
    );
    assert!(calls[6].0 - calls[4].0 <= Duration::from_secs(3));
    running.stop().await;

    // A restart that finds a chain from another root on disk counts it as
    // none, and goes back to the token.
    let dir = config.cert_dir.clone();
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = Authority::load_or_create(
        stranger_dir.path(),
        common::TRUST_DOMAIN,
        AuthorityOptions::default(),
    )
    .unwrap();
    let (key, csr) = vmesh_agent::identity::new_key_and_csr(&workload_id()).unwrap();
    let foreign = stranger
        .sign_workload(&csr, &workload_id(), Some(HOUR))
        .unwrap();
    std::fs::write(dir.join(CHAIN_FILE), foreign.concat()).unwrap();
    std::fs::write(dir.join(KEY_FILE), key.serialize_pem()).unwrap();
    let before = fake.calls.lock().len();
    let running = start(config, &root_pem, fake.clone());
    assert!(running.handle.current().is_none());
    let third = tokio::time::timeout(HOUR, running.handle.ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.identity(), &workload_id());
    assert_eq!(fake.calls.lock()[before].1, "token");
    running.stop().await;
}
