//! A kube-rs client against a real `vmesh server`, configured from the
//! kubeconfig `vmesh kubeconfig` writes: discovery finds Istio's kinds,
//! and kube-rs' own dynamic API and watcher list, watch, patch (merge and
//! server-side apply) and delete WorkloadEntries; its typed API creates a
//! Namespace.

use std::path::Path;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::Discovery;
use kube::runtime::watcher;
use serde_json::json;
use vmesh_testkit::LocalServer;

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
const TOKEN: &str = "kube-rs-test-token-0123456789";

async fn client(dir: &Path) -> (LocalServer, kube::Client) {
    let (server, text) =
        LocalServer::start_for_kubernetes(Path::new(VMESH), dir, TOKEN, true).unwrap();
    let kubeconfig = Kubeconfig::from_yaml(&text).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    (server, kube::Client::try_from(config).unwrap())
}

fn workload_entry(name: &str, address: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": name, "namespace": "vm-workloads", "labels": {"app": "payment"}},
        "spec": {"address": address, "serviceAccount": "payment-service-sa"},
    }))
    .unwrap()
}

#[tokio::test]
async fn kube_rs_lists_watches_and_patches_workload_entries() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = client(dir.path()).await;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "vm-workloads"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();

    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (resource, capabilities) = discovery
        .resolve_gvk(&GroupVersionKind::gvk(
            "networking.istio.io",
            "v1",
            "WorkloadEntry",
        ))
        .expect("discovery finds WorkloadEntries");
    assert_eq!(resource.plural, "workloadentries");
    assert!(capabilities.supports_operation(kube::discovery::verbs::WATCH));
    let entries: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "vm-workloads", &resource);

    entries
        .create(&PostParams::default(), &workload_entry("vm-1", "10.0.0.1"))
        .await
        .unwrap();
    let listed = entries
        .list(&ListParams::default().labels("app=payment"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].data["spec"]["address"], "10.0.0.1");

    // kube-rs' watcher, from a list and then a watch.
    let mut events = watcher(entries.clone(), watcher::Config::default()).boxed();
    let mut seen = Vec::new();
    let mut next = async || -> watcher::Event<DynamicObject> {
        tokio::time::timeout(Duration::from_secs(10), events.try_next())
            .await
            .expect("a watch event within 10 s")
            .unwrap()
            .unwrap()
    };
    loop {
        match next().await {
            watcher::Event::InitDone => break,
            watcher::Event::InitApply(o) => seen.push(o.metadata.name.unwrap()),
            _ => {}
        }
    }
    assert_eq!(seen, ["vm-1"]);

    let patched = entries
        .patch(
            "vm-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"address": "10.0.0.2"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["address"], "10.0.0.2");
    match next().await {
        watcher::Event::Apply(o) => assert_eq!(o.data["spec"]["address"], "10.0.0.2"),
        other => panic!("expected the patch, got {other:?}"),
    }

    // Server-side apply by kube-rs' own field manager.
    let applied = entries
        .patch(
            "vm-2",
            &PatchParams::apply("kube-rs-test"),
            &Patch::Apply(workload_entry("vm-2", "10.0.0.3")),
        )
        .await
        .unwrap();
    let managers = applied.metadata.managed_fields.unwrap();
    assert_eq!(managers[0].manager.as_deref(), Some("kube-rs-test"));
    assert_eq!(managers[0].operation.as_deref(), Some("Apply"));
    match next().await {
        watcher::Event::Apply(o) => assert_eq!(o.metadata.name.as_deref(), Some("vm-2")),
        other => panic!("expected the apply, got {other:?}"),
    }

    entries
        .delete("vm-1", &DeleteParams::default())
        .await
        .unwrap();
    match next().await {
        watcher::Event::Delete(o) => assert_eq!(o.metadata.name.as_deref(), Some("vm-1")),
        other => panic!("expected the delete, got {other:?}"),
    }
    let error = entries.get("vm-1").await.unwrap_err();
    match error {
        kube::Error::Api(status) => assert_eq!(status.code, 404),
        other => panic!("expected a 404, got {other}"),
    }
}
