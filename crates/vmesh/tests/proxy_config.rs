//! `vmesh proxy-config` against a real Envoy: inside a network namespace of
//! the test's own, `vmesh server` (CA and xDS over TLS on 15012) and the
//! payment VM's `vmesh agent` with its Envoy, the guide's manifests applied.
//! What the server says it sent (`proxy-config … PROXY`, from
//! `/debug/config_dump?proxyID=`) must be what Envoy's own `/config_dump`
//! holds: the same cluster, listener and route names, the same endpoint
//! addresses; `--local` reads Envoy and agrees; `secret --local` shows the
//! serial number Envoy's `/certs` shows; `log --level` changes Envoy's
//! levels.
//!
//! Needs root, `ip`, `curl` and Envoy; without them it fails, it never
//! skips.

use std::collections::BTreeSet;

use serde_json::Value;
use vmesh_api::testing::seed_dir;
use vmesh_testkit::testing::{envoy_binary, eventually};
use vmesh_testkit::{Mesh, Namespace};

const VMESH: &str = env!("CARGO_BIN_EXE_vmesh");
const VM_IP: &str = "10.46.0.2";

/// `vmesh proxy-config ARGS…` inside `ns`: its standard output.
fn proxy_config(ns: &Namespace, args: &[&str]) -> String {
    let mut full = vec![VMESH, "proxy-config"];
    full.extend_from_slice(args);
    ns.run(&full)
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `field` of each item of a JSON array.
fn names(items: &Value, field: &str) -> BTreeSet<String> {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {items}"))
        .iter()
        .map(|i| i[field].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The section of an Envoy config dump whose `@type` ends in `kind`.
fn section<'a>(dump: &'a Value, kind: &str) -> &'a Value {
    dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["@type"].as_str().unwrap().rsplit('.').next() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// What Envoy's dynamic config names, per kind, from its own `/config_dump`.
fn envoy_names(dump: &Value) -> [BTreeSet<String>; 3] {
    let list = |kind: &str, list: &str, path: &[&str]| -> BTreeSet<String> {
        section(dump, kind)[list]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| {
                let resource = path.iter().fold(item, |v, key| &v[*key]);
                resource["name"].as_str().unwrap().to_string()
            })
            .collect()
    };
    [
        list(
            "ClustersConfigDump",
            "dynamic_active_clusters",
            &["cluster"],
        ),
        list(
            "ListenersConfigDump",
            "dynamic_listeners",
            &["active_state", "listener"],
        ),
        list(
            "RoutesConfigDump",
            "dynamic_route_configs",
            &["route_config"],
        ),
    ]
}

/// `cluster → {ip:port}` of the load assignments in an array of them.
fn endpoint_addresses(assignments: &Value) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for assignment in assignments.as_array().into_iter().flatten() {
        let cluster = assignment["cluster_name"].as_str().unwrap().to_string();
        for locality in assignment["endpoints"].as_array().into_iter().flatten() {
            for endpoint in locality["lb_endpoints"].as_array().into_iter().flatten() {
                let socket = &endpoint["endpoint"]["address"]["socket_address"];
                found.insert((
                    cluster.clone(),
                    format!(
                        "{}:{}",
                        socket["address"].as_str().unwrap(),
                        socket["port_value"]
                    ),
                ));
            }
        }
    }
    found
}

#[test]
fn proxy_config_agrees_with_envoys_own_config_dump() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Namespace::new(&format!("vmesh-pc-{}", std::process::id()));
    ns.run(&["ip", "addr", "add", &format!("{VM_IP}/32"), "dev", "lo"]);
    let mesh = Mesh::new(VMESH, &ns, dir.path()).with_envoy(&envoy_binary());
    mesh.start_server(&ns, &["--xds-addr", "0.0.0.0:15012"])
        .unwrap();
    let seed = seed_dir();
    for file in [
        "complete-vm-integration.yaml",
        "destination-rule-payment.yaml",
        "virtual-service-payment.yaml",
        "service-entry-vm-database.yaml",
    ] {
        mesh.apply_file(&seed.join(file)).unwrap();
    }
    let entry = std::fs::read_to_string(seed.join("workload-entry-payment-vm1.yaml"))
        .unwrap()
        .replace("address: 192.168.1.100", &format!("address: {VM_IP}"));
    mesh.apply("vm.yaml", &entry).unwrap();
    mesh.start_agent(
        &ns,
        "127.0.0.1:15012",
        "vm-workloads",
        "payment-service-sa",
        VM_IP,
        &["--label", "app=payment-service", "--label", "version=v1"],
        61,
    )
    .unwrap();
    let proxy = format!("{}.vm-workloads", ns.name());
    let proxy_id = format!("sidecar~{VM_IP}~{proxy}~vm-workloads.svc.cluster.local");
    eventually("the proxy to be SYNCED", || {
        let table = ns.run(&[VMESH, "proxy-status"]);
        let row = table.lines().find(|l| l.starts_with(&proxy_id))?;
        (row.split_whitespace().skip(2).collect::<Vec<_>>() == ["SYNCED"; 4]).then_some(())
    });

    // Names: the server's view, Envoy's own dump, and --local agree.
    let envoy_dump = || {
        json_of(&ns.run(&[
            "curl",
            "-s",
            "http://127.0.0.1:15000/config_dump?include_eds",
        ]))
    };
    let server = |kind: &str, extra: &[&str]| {
        let mut args = vec![kind, proxy.as_str(), "-o", "json"];
        args.extend_from_slice(extra);
        json_of(&proxy_config(&ns, &args))
    };
    let local = |kind: &str| json_of(&proxy_config(&ns, &[kind, "--local", "-o", "json"]));
    let [clusters, listeners, routes] = envoy_names(&envoy_dump());
    assert!(
        clusters.contains("outbound|8080|stable|payment-service.vm-workloads.svc.cluster.local"),
        "{clusters:?}"
    );
    assert_eq!(names(&server("cluster", &[]), "name"), clusters);
    assert_eq!(names(&server("listener", &[]), "name"), listeners);
    assert_eq!(names(&server("route", &[]), "name"), routes);
    // Envoy's own clusters and listeners from its bootstrap (xds-grpc,
    // sds-grpc, …) are static: --local shows them beside the dynamic ones.
    let local_clusters = names(&local("cluster"), "name");
    assert!(local_clusters.is_superset(&clusters) && local_clusters.contains("xds-grpc"));
    let local_listeners = names(&local("listener"), "name");
    assert!(local_listeners.is_superset(&listeners));
    // Route configurations inline in listeners are static ones to Envoy.
    assert!(names(&local("route"), "name").is_superset(&routes));
    // The same endpoints, by cluster.
    let envoy_endpoints = endpoint_addresses(&Value::Array(
        section(&envoy_dump(), "EndpointsConfigDump")["dynamic_endpoint_configs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["endpoint_config"].clone())
            .collect(),
    ));
    assert!(
        envoy_endpoints.contains(&(
            "outbound|8080|stable|payment-service.vm-workloads.svc.cluster.local".into(),
            format!("{VM_IP}:8080")
        )),
        "{envoy_endpoints:?}"
    );
    assert_eq!(
        endpoint_addresses(&server("endpoint", &[])),
        envoy_endpoints
    );
    // Envoy's /clusters, read with --local, has the same endpoints.
    let table = proxy_config(&ns, &["endpoint", "--local"]);
    for (cluster, address) in &envoy_endpoints {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(address.as_str()) && l.ends_with(cluster.as_str())),
            "{address} of {cluster} in\n{table}"
        );
    }

    // The tables, as istioctl prints them.
    let table = proxy_config(&ns, &["cluster", &proxy, "--fqdn", "payment-service"]);
    assert!(table.starts_with(
        "SERVICE FQDN                                     PORT   SUBSET   DIRECTION   TYPE   DESTINATION RULE"
    ), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "payment-service.vm-workloads.svc.cluster.local",
                    "8080",
                    "stable",
                    "outbound",
                    "EDS",
                    "payment-service.vm-workloads"
                ]),
        "{table}"
    );
    assert!(
        table
            .lines()
            .skip(1)
            .all(|l| l.starts_with("payment-service.")),
        "{table}"
    );
    let table = proxy_config(&ns, &["listener", &proxy, "--port", "15001"]);
    assert!(table.starts_with("ADDRESSES   PORT    MATCH"), "{table}");
    let table = proxy_config(&ns, &["route", &proxy, "--name", "8080"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("8080") && l.ends_with("payment-service-vs.vm-workloads")),
        "{table}"
    );
    let table = proxy_config(&ns, &["bootstrap", &proxy, "-o", "short"]);
    assert!(table.contains("Envoy Version: 1."), "{table}");
    let table = proxy_config(&ns, &["all", &proxy, "--with-headers"]);
    for heading in [
        "CLUSTER INFO",
        "LISTENER INFO",
        "ROUTE INFO",
        "ENDPOINTS INFO",
    ] {
        assert!(table.contains(heading), "{table}");
    }

    // Secrets: Envoy's certificate, with the serial Envoy's /certs shows.
    let certs = json_of(&ns.run(&["curl", "-s", "http://127.0.0.1:15000/certs"]));
    let serial_of = |kind: &str| -> String {
        let certificate = certs["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c[kind].as_array().cloned().unwrap_or_default())
            .next()
            .unwrap_or_else(|| panic!("no {kind} in {certs}"));
        certificate["serial_number"].as_str().unwrap().to_string()
    };
    let secrets = proxy_config(&ns, &["secret", "--local"]);
    let default = secrets
        .lines()
        .find(|l| l.starts_with("default "))
        .unwrap_or_else(|| panic!("{secrets}"));
    let cells: Vec<&str> = default.split_whitespace().collect();
    assert_eq!(
        &cells[..5],
        ["default", "Cert", "Chain", "ACTIVE", "true"],
        "{secrets}"
    );
    assert_eq!(
        cells[5].trim_start_matches('0'),
        serial_of("cert_chain").trim_start_matches('0'),
        "{secrets}"
    );
    assert!(
        secrets
            .lines()
            .any(|l| l.starts_with("ROOTCA ") && l.contains(" CA ")),
        "{secrets}"
    );
    let server_secrets = proxy_config(&ns, &["secret", &proxy]);
    assert_eq!(server_secrets, "No active or warming secrets found.\n");

    // Log levels.
    let levels = || ns.run(&["curl", "-s", "-X", "POST", "http://127.0.0.1:15000/logging"]);
    // Every logger's level, from Envoy's list (`  name: level` lines).
    let all_at = |level: &str| {
        let text = levels();
        let loggers: Vec<&str> = text.lines().filter(|l| l.starts_with("  ")).collect();
        !loggers.is_empty() && loggers.iter().all(|l| l.ends_with(&format!(": {level}")))
    };
    assert!(all_at("warning"), "{}", levels());
    let answer = proxy_config(&ns, &["log", "--level", "debug"]);
    assert!(answer.contains("http: debug"), "{answer}");
    assert!(all_at("debug"), "{}", levels());
    proxy_config(&ns, &["log", "--level", "http:trace"]);
    assert!(levels().contains("  http: trace"), "{}", levels());
    proxy_config(&ns, &["log", "--reset"]);
    assert!(all_at("warning"), "{}", levels());

    // An unknown proxy is the server's 404, said plainly.
    let missing = ns
        .command(&[VMESH, "proxy-config", "cluster", "nobody.nowhere"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("not connected"), "{stderr}");
}
