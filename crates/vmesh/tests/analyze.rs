//! `vmesh analyze` and `vmesh doctor`'s analysis, the real binary: on a
//! fixture of every analyzer's case, on the guide's manifests, and against a
//! real `vmesh server`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use vmesh_api::testing::seed_dir;
use vmesh_testkit::LocalServer;

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/analyze")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `vmesh analyze --use-kube=false args…`: files only, whatever server runs here.
fn offline(args: &[&str]) -> Output {
    Command::new(VMESH)
        .args(["analyze", "--use-kube=false"])
        .args(args)
        .output()
        .unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn every_analyzer_reports_its_case_and_errors_exit_1() {
    let dir = fixtures().join("broken");
    let output = offline(&["-f", path(&dir)]);
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stdout}{}",
        text(&output.stderr)
    );
    let file = |name: &str| dir.join(name).display().to_string();
    let expected = [
        format!(
            "Error [IST0101] (AuthorizationPolicy shop/pay {}:15) Referenced namespace not found: \"frontend\"",
            file("authz.yaml")
        ),
        format!(
            "Error [IST0101] (Gateway shop/ingress {}:8) Referenced selector not found: \"istio=ingressgateway\"",
            file("gateway.yaml")
        ),
        format!(
            "Error [IST0101] (VirtualService shop/orders {}:14) Referenced host not found: \"orders\"",
            file("host-unknown.yaml")
        ),
        format!(
            "Error [IST0101] (VirtualService shop/pay {}:26) Referenced host+subset in destinationrule not found: \"pay+canry\"",
            file("subset-undefined.yaml")
        ),
        format!(
            "Error [IST0173] (DestinationRule shop/cart {}:33) The Subset v2 defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
            file("subset-empty.yaml")
        ),
        format!(
            "Error [VM0003] (DestinationRule secure/vault {}:48) This DestinationRule disables TLS to port 8200 of vault.secure.svc.cluster.local, but WorkloadEntry secure/vault-1 accepts only mutual TLS on port 8200 (PeerAuthentication secure/strict is STRICT): its requests through this rule are refused.",
            file("strict.yaml")
        ),
        format!(
            "Warning [IST0133] (Telemetry shop/logs {}:16) Schema validation warning: spec.metrics[0].reportingInterval: accepted but not applied by vmesh yet: TCP metrics are reported when a connection closes",
            file("telemetry.yaml")
        ),
        format!(
            "Warning [IST0174] (DestinationRule shop/typo {}:22) The host paymnt.shop.svc.cluster.local defined in the DestinationRule does not match any services in the mesh.",
            file("host-unknown.yaml")
        ),
        format!(
            "Warning [VM0001] (DestinationRule shop/stock-b {}:31) The trafficPolicy of this DestinationRule is not applied: DestinationRule shop/stock-a for the same host stock.shop.svc.cluster.local comes first, and rules for one host in one namespace are merged (every rule's subsets, one traffic policy).",
            file("merge.yaml")
        ),
        format!(
            "Warning [VM0002] (WorkloadGroup shop/billing {}:21) No Service selects the labels of this WorkloadGroup (app=bill), so its VMs receive no traffic; Service shop/billing selects app=billing.",
            file("group.yaml")
        ),
        format!(
            "Warning [VM0004] (Telemetry shop/logs {}:14) provider \"jaeger\" is not defined in meshConfig.extensionProviders: the workloads it selects are not traced",
            file("telemetry.yaml")
        ),
        format!(
            "Info [IST0118] (Service shop/db {}:9) Port name postgres (port: 5432, targetPort: 5432) doesn't follow the naming convention of Istio port.",
            file("port-name.yaml")
        ),
    ];
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stdout}");

    // Only errors fail; warnings alone exit 0.
    let warnings = offline(&[
        "-f",
        path(&dir.join("00-shop.yaml")),
        "-f",
        path(&dir.join("telemetry.yaml")),
        "-f",
        path(&dir.join("merge.yaml")),
    ]);
    assert_eq!(
        warnings.status.code(),
        Some(0),
        "{}",
        text(&warnings.stdout)
    );
    assert_eq!(text(&warnings.stdout).lines().count(), 3);
    let strict = offline(&["--failure-threshold", "Warning", "-f", path(&dir)]);
    assert_eq!(strict.status.code(), Some(1));

    // JSON: istioctl's fields.
    let json = offline(&["-o", "json", "-n", "secure", "-f", path(&dir)]);
    assert_eq!(json.status.code(), Some(1));
    let messages: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        messages,
        serde_json::json!([{
            "code": "VM0003",
            "level": "Error",
            "origin": "DestinationRule secure/vault",
            "reference": format!("{}:48", file("strict.yaml")),
            "message": "This DestinationRule disables TLS to port 8200 of vault.secure.svc.cluster.local, but WorkloadEntry secure/vault-1 accepts only mutual TLS on port 8200 (PeerAuthentication secure/strict is STRICT): its requests through this rule are refused.",
        }])
    );
    let json = offline(&[
        "-o",
        "json",
        "-f",
        path(&dir.join("subset-undefined.yaml")),
        "-f",
        path(&dir.join("00-shop.yaml")),
    ]);
    let messages: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(messages[0]["code"], "IST0101");
    assert_eq!(
        messages[0]["documentationUrl"],
        "https://istio.io/latest/docs/reference/config/analysis/ist0101/"
    );
}

#[test]
fn the_guides_manifests_are_quiet_where_the_guide_is_right() {
    let cluster = fixtures().join("guide-cluster.yaml");
    let complete = seed_dir().join("complete-vm-integration.yaml");
    let output = offline(&["-f", path(&complete), "-f", path(&cluster)]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stdout));
    assert_eq!(text(&output.stdout), "");
    assert_eq!(
        text(&output.stderr),
        format!(
            "\u{2714} No validation issues found when analyzing:\n  - {}\n  - {}\n",
            complete.display(),
            cluster.display()
        )
    );

    // Every manifest of the guide: no error. What remains is true of vmesh
    // and of the guide: the namespace-wide PeerAuthentication's
    // portLevelMtls (which Istio refuses), the guide's two DestinationRules
    // for the payment service, whose second traffic policy (locality
    // failover, connect timeout) no merge applies, and vm-tracing's provider
    // `zipkin`, which the guide's mesh config never defines.
    let output = offline(&["-f", path(&seed_dir()), "-f", path(&cluster)]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let messages: Vec<&str> = stdout
        .lines()
        .map(|line| line.split_once(')').map_or(line, |(origin, _)| origin))
        .collect();
    let guide = seed_dir().display().to_string();
    assert_eq!(
        messages,
        [
            format!(
                "Warning [IST0133] (PeerAuthentication vm-workloads/strict-mtls {guide}/peer-authentication-strict.yaml:20"
            ),
            format!(
                "Warning [VM0001] (DestinationRule vm-workloads/payment-service-dr {guide}/destination-rule-payment.yaml:14"
            ),
            format!(
                "Warning [VM0004] (Telemetry vm-workloads/vm-tracing {guide}/telemetry-tracing.yaml:13"
            ),
        ],
        "{stdout}"
    );
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("cloud-init-istio-vm.yaml:") && stderr.contains("not a Kubernetes object"),
        "{stderr}"
    );
}

/// A namespace `shop`, its payment Service and VM, and a VirtualService
/// routing to subset `canry` that the DestinationRule does not define.
fn canry_mesh(server: &LocalServer) {
    let broken = fixtures().join("broken");
    for file in ["00-shop.yaml", "subset-undefined.yaml"] {
        let output = server
            .command(&["apply", "-f", path(&broken.join(file))])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
}

#[test]
fn against_a_server_analyze_and_doctor_report_the_undefined_subset() {
    let data = tempfile::tempdir().unwrap();
    let server = LocalServer::start(Path::new(VMESH), data.path(), &[], &[]).unwrap();
    canry_mesh(&server);
    let line = "Error [IST0101] (VirtualService shop/pay) Referenced host+subset in destinationrule not found: \"pay+canry\"\n";

    let all = server.command(&["analyze", "-A"]).output().unwrap();
    assert_eq!(all.status.code(), Some(1), "{}", text(&all.stderr));
    assert_eq!(text(&all.stdout), line);

    // istioctl's default: namespace `default`, where nothing is wrong.
    let default = server.command(&["analyze"]).output().unwrap();
    assert_eq!(default.status.code(), Some(0));
    assert_eq!(
        text(&default.stderr),
        "\u{2714} No validation issues found when analyzing namespace: default.\n"
    );
    let shop = server.command(&["analyze", "-n", "shop"]).output().unwrap();
    assert_eq!(
        (shop.status.code(), text(&shop.stdout)),
        (Some(1), line.to_string())
    );

    // Files combine with the server's objects: the fixed VirtualService
    // replaces the server's, and nothing is left to say.
    let fixed = data.path().join("fixed.yaml");
    let vs = std::fs::read_to_string(fixtures().join("broken/subset-undefined.yaml"))
        .unwrap()
        .replace("subset: canry", "subset: v1");
    std::fs::write(&fixed, vs).unwrap();
    let combined = server
        .command(&["analyze", "-f", path(&fixed)])
        .output()
        .unwrap();
    assert_eq!(
        combined.status.code(),
        Some(0),
        "{}",
        text(&combined.stdout)
    );
    assert_eq!(text(&combined.stdout), "");

    let doctor = server
        .command(&["doctor", "--monitoring", server.monitoring()])
        .output()
        .unwrap();
    let report = text(&doctor.stdout);
    assert_eq!(
        doctor.status.code(),
        Some(1),
        "{report}{}",
        text(&doctor.stderr)
    );
    assert!(
        report.contains(
            "FAIL  VirtualService shop/pay: [IST0101] Referenced host+subset in destinationrule not found: \"pay+canry\""
        ),
        "{report}"
    );
}
