//! Every Kubernetes object in the guide's manifests decodes and validates; the
//! guide's other YAML files are reported as not being Kubernetes objects.

use vmesh_api::decode_manifests;
use vmesh_api::testing::{NOT_KUBERNETES, seed_dir};

#[test]
fn every_seed_manifest_decodes() {
    let mut files: Vec<_> = std::fs::read_dir(seed_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 18,
        "expected the guide's 18 manifests, found {}",
        files.len()
    );
    let mut objects = 0;
    for path in files {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let decoded = decode_manifests(&name, &text);
        if NOT_KUBERNETES.contains(&name.as_str()) {
            assert!(decoded.objects.is_empty(), "{name}");
            assert_eq!(decoded.problems.len(), 1, "{name}: {:?}", decoded.problems);
            let line = decoded.problems[0].to_string();
            assert!(
                line.starts_with(&format!("{name}:")) && line.contains("not a Kubernetes object"),
                "{line}"
            );
            continue;
        }
        let errors: Vec<String> = decoded
            .problems
            .iter()
            .filter(|p| p.is_error())
            .map(ToString::to_string)
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:#?}");
        assert!(!decoded.objects.is_empty(), "{name} has no objects");
        objects += decoded.objects.len();
    }
    assert_eq!(objects, 23, "objects in the guide's manifests");
}

#[test]
fn complete_integration_reads_as_the_guide_wrote_it() {
    let text = std::fs::read_to_string(seed_dir().join("complete-vm-integration.yaml")).unwrap();
    let decoded = decode_manifests("complete-vm-integration.yaml", &text);
    let kinds: Vec<&str> = decoded
        .objects
        .iter()
        .map(|o| o.object.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "WorkloadGroup",
            "Service",
            "DestinationRule",
            "PeerAuthentication",
            "AuthorizationPolicy"
        ]
    );
    let dr = &decoded.objects[4].object;
    assert_eq!(
        dr.body["spec"]["trafficPolicy"]["outlierDetection"]["interval"],
        "30s"
    );
    assert_eq!(
        dr.body["spec"]["trafficPolicy"]["connectionPool"]["http"]["h2UpgradePolicy"],
        "UPGRADE"
    );
    let wg = &decoded.objects[2].object;
    assert_eq!(wg.body["spec"]["probe"]["httpGet"]["port"], 8080);
    assert_eq!(
        decoded.objects[0].object.metadata.namespace, None,
        "Namespace is cluster-scoped"
    );
}

#[test]
fn nameless_istio_operator_gets_a_name() {
    let text = std::fs::read_to_string(seed_dir().join("mesh-config-dns.yaml")).unwrap();
    let decoded = decode_manifests("mesh-config-dns.yaml", &text);
    let iop = &decoded.objects[0].object;
    assert_eq!(iop.metadata.name.as_deref(), Some("default"));
    assert_eq!(iop.metadata.namespace.as_deref(), Some("istio-system"));
    assert_eq!(
        iop.body["spec"]["meshConfig"]["defaultConfig"]["proxyMetadata"]["ISTIO_META_DNS_CAPTURE"],
        "true"
    );
}
