//! Identity and mTLS end to end, with real Envoy on both sides. Three network
//! namespaces of the test's own, joined by veth pairs:
//!
//! - `payment` (10.44.0.2 / 10.45.0.2) runs `vmesh server` (CA and xDS over
//!   TLS on 15012) and the payment VM: the demo application on
//!   127.0.0.1:8080, `vmesh agent` and Envoy, inbound 8080 captured to 15006;
//! - `frontend` (10.44.0.1) and `orders` (10.45.0.1) each run `vmesh agent`
//!   and Envoy, with traffic to the service range captured to 15001.
//!
//! Every agent gets its certificate with a token from `vmesh token create`
//! and its root from the `istio-ca-root-cert` ConfigMap. The guide's
//! `peer-authentication-strict.yaml` and `authorization-policy-payment.yaml`
//! then decide who gets through.
//!
//! Needs root, `ip`, `iptables`, `curl`, `openssl` and Envoy; without them it
//! fails, it never skips.

use std::path::Path;
use std::time::Duration;

use vmesh_api::testing::seed_dir;
use vmesh_testkit::mesh::{capture_inbound, capture_service_range};
use vmesh_testkit::netns::link;
use vmesh_testkit::testing::{envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

const PAYMENT_HOST: &str = "payment-service.vm-workloads.svc.cluster.local";

/// An HTTP request through the client's sidecar: the status code, or `None`
/// when the connection failed.
fn request(ns: &Namespace, method: &str, url: &str) -> Option<u16> {
    vmesh_testkit::http::status(ns, method, url, Duration::from_secs(3))
}

#[test]
fn mesh_mtls_and_authorization_between_real_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let payment = Namespace::new(&format!("vmesh-pay-{id}"));
    let frontend = Namespace::new(&format!("vmesh-fe-{id}"));
    let orders = Namespace::new(&format!("vmesh-ord-{id}"));
    link(
        &frontend,
        "10.44.0.1",
        &payment,
        "10.44.0.2",
        &format!("f{id}"),
    )
    .unwrap();
    link(
        &orders,
        "10.45.0.1",
        &payment,
        "10.45.0.2",
        &format!("o{id}"),
    )
    .unwrap();
    // The payment VM's address is 10.44.0.2, on the frontend's link.
    orders.run(&["ip", "route", "add", "10.44.0.0/24", "via", "10.45.0.2"]);

    // The control plane and the payment VM's application.
    let mesh = Mesh::new(VMESH, &payment, dir.path()).with_envoy(&envoy_binary());
    mesh.start_server(&payment, &["--xds-addr", "0.0.0.0:15012"])
        .unwrap();
    payment
        .spawn(
            &[
                VMESH,
                "demo-app",
                "--addr",
                "127.0.0.1:8080",
                "--name",
                "payment-vm",
            ],
            &dir.path().join("app.log"),
        )
        .unwrap();
    let seed = seed_dir();
    mesh.apply_file(&seed.join("complete-vm-integration.yaml"))
        .unwrap();
    for namespace in ["frontend", "orders"] {
        mesh.cli(&["create", "namespace", namespace]).unwrap();
    }
    // The guide's hand-written WorkloadEntry as it is, but for the VM's
    // address: no tlsMode label, a service account, so mTLS by Istio's rule.
    let guide_entry = std::fs::read_to_string(seed.join("workload-entry-payment-vm1.yaml"))
        .unwrap()
        .replace("address: 192.168.1.100", "address: 10.44.0.2");
    assert!(guide_entry.contains("address: 10.44.0.2") && !guide_entry.contains("tlsMode"));
    mesh.apply("vm.yaml", &guide_entry).unwrap();
    for file in [
        "peer-authentication-strict.yaml",
        "authorization-policy-payment.yaml",
    ] {
        mesh.apply_file(&seed.join(file)).unwrap();
    }

    // The payment VM's sidecar: inbound 8080 goes to Envoy's 15006.
    capture_inbound(&payment, &[8080]).unwrap();
    mesh.start_agent(
        &payment,
        "127.0.0.1:15012",
        "vm-workloads",
        "payment-service-sa",
        "10.44.0.2",
        &["--label", "app=payment-service", "--label", "version=v1"],
        51,
    )
    .unwrap();
    // The clients' sidecars: the service range goes to Envoy's 15001.
    for (client, ip, namespace, account, base_id) in [
        (&frontend, "10.44.0.1", "frontend", "frontend-sa", 52),
        (&orders, "10.45.0.1", "orders", "order-service-sa", 53),
    ] {
        capture_service_range(client, ip).unwrap();
        let server = format!(
            "{}:15012",
            if ip == "10.44.0.1" {
                "10.44.0.2"
            } else {
                "10.45.0.2"
            }
        );
        mesh.start_agent(
            client,
            &server,
            namespace,
            account,
            ip,
            &["--label", &format!("app={namespace}")],
            base_id,
        )
        .unwrap();
    }

    let vip = mesh.vip_of(PAYMENT_HOST).unwrap();
    let url = |path: &str| format!("http://{vip}:8080{path}");

    // frontend-sa may GET and POST payments and refunds, nothing else.
    eventually("frontend → payment over mTLS", || {
        (request(&frontend, "GET", &url("/api/payments/1")) == Some(200)).then_some(())
    });
    let answered = (0..100)
        .filter(|i| request(&frontend, "GET", &url(&format!("/api/payments/{i}"))) == Some(200))
        .count();
    assert_eq!(
        answered, 100,
        "the guide's payment-vm-1 answers every request under STRICT mTLS"
    );
    assert_eq!(
        request(&frontend, "POST", &url("/api/refunds/7")),
        Some(200)
    );
    assert_eq!(
        request(&frontend, "DELETE", &url("/api/payments/1")),
        Some(403)
    );
    assert_eq!(request(&frontend, "GET", &url("/admin")), Some(403));
    // order-service-sa may only POST /api/payments/process.
    eventually("orders → payment over mTLS", || {
        let code = request(&orders, "POST", &url("/api/payments/process"));
        (code == Some(200)).then_some(())
    });
    assert_eq!(request(&orders, "GET", &url("/api/payments/1")), Some(403));
    assert_eq!(request(&orders, "POST", &url("/api/refunds/7")), Some(403));

    // The mTLS was real: the payment sidecar saw the clients' identities.
    let stats = payment.run(&["curl", "-s", "http://127.0.0.1:15000/stats"]);
    let ssl_handshakes: u64 = stats
        .lines()
        .filter(|l| l.starts_with("listener.0.0.0.0_15006.ssl.handshake:"))
        .filter_map(|l| l.rsplit(" ").next()?.parse::<u64>().ok())
        .sum();
    assert!(
        ssl_handshakes >= 2,
        "inbound TLS handshakes: {ssl_handshakes}"
    );

    // Plaintext straight to the VM, around the client's sidecar: refused under STRICT.
    let direct = "http://10.44.0.2:8080/api/payments/1";
    assert_eq!(
        request(&frontend, "GET", direct),
        None,
        "plaintext refused under STRICT"
    );

    // A client certificate with the right name from another root: refused.
    let other = dir.path().join("other-root");
    std::fs::create_dir_all(&other).unwrap();
    frontend.run(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/O=elsewhere",
        "-addext",
        "subjectAltName=URI:spiffe://cluster.local/ns/frontend/sa/frontend-sa",
        "-keyout",
        other.join("key.pem").to_str().unwrap(),
        "-out",
        other.join("cert.pem").to_str().unwrap(),
    ]);
    let mtls_direct = |cert: &Path, key: &Path| {
        let output = frontend
            .command(&[
                "curl",
                "-sk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                "--cert",
                cert.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                "https://10.44.0.2:8080/api/payments/1",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let mesh_certs = dir
        .path()
        .join("agent-".to_string() + frontend.name())
        .join("certs");
    assert_eq!(
        mtls_direct(
            &mesh_certs.join("cert-chain.pem"),
            &mesh_certs.join("key.pem")
        ),
        "200",
        "the same request with the mesh certificate goes through"
    );
    assert_ne!(
        mtls_direct(&other.join("cert.pem"), &other.join("key.pem")),
        "200",
        "a certificate from another root is refused"
    );

    // PERMISSIVE takes plaintext too, on the same port.
    mesh.apply(
        "permissive.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: payment-service-mtls, namespace: vm-workloads}\n\
         spec: {selector: {matchLabels: {app: payment-service}}, mtls: {mode: PERMISSIVE}}\n",
    )
    .unwrap();
    mesh.cli(&[
        "delete",
        "ap",
        "payment-service-authz",
        "-n",
        "vm-workloads",
    ])
    .unwrap();
    eventually("plaintext served under PERMISSIVE", || {
        (request(&frontend, "GET", direct) == Some(200)).then_some(())
    });
    assert_eq!(
        request(&frontend, "GET", &url("/api/payments/1")),
        Some(200),
        "mTLS still works"
    );
}
