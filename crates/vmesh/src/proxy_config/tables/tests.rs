//! The tables from a real Envoy's config dump and `/clusters` (the payment
//! VM of the end-to-end test, trimmed), as istioctl prints them.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::*;
use crate::proxy_config::secrets;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn dump() -> Value {
    fixture("envoy-config-dump.json")
}

/// The first cell of every row but the header.
fn first_cells(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .map(|l| l.split("   ").next().unwrap().trim().to_string())
        .collect()
}

#[test]
fn clusters_as_istioctl_prints_and_filters_them() {
    let dump = dump();
    let table = cluster_table(&clusters(&dump, &ClusterFilter::default()));
    assert_eq!(
        table,
        "\
SERVICE FQDN                                     PORT   SUBSET   DIRECTION   TYPE           DESTINATION RULE
                                                 8080   -        inbound     STATIC
BlackHoleCluster                                 -      -        -           STATIC
PassthroughCluster                               -      -        -           ORIGINAL_DST
payment-service.vm-workloads.svc.cluster.local   8080   -        outbound    EDS            payment-service.vm-workloads
payment-service.vm-workloads.svc.cluster.local   8080   stable   outbound    EDS            payment-service.vm-workloads
vm-database.vm-workloads.svc.cluster.local       3306   -        outbound    EDS
xds-grpc                                         -      -        -           STATIC
"
    );
    let names = |filter: ClusterFilter| -> Vec<String> {
        clusters(&dump, &filter)
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(ClusterFilter {
            fqdn: Some("payment".into()),
            subset: Some("stable".into()),
            ..Default::default()
        }),
        ["outbound|8080|stable|payment-service.vm-workloads.svc.cluster.local"]
    );
    assert_eq!(
        names(ClusterFilter {
            port: Some(8080),
            direction: Some("inbound".into()),
            ..Default::default()
        }),
        ["inbound|8080||"]
    );
    assert!(
        names(ClusterFilter {
            port: Some(9999),
            ..Default::default()
        })
        .is_empty()
    );
}

#[test]
fn listeners_one_row_per_filter_chain() {
    let dump = dump();
    let table = listener_table(&listeners(&dump, &ListenerFilter::default()));
    assert_eq!(
        table,
        "\
ADDRESSES       PORT    MATCH                      DESTINATION
240.240.72.44   3306    ALL                        Cluster: outbound|3306||vm-database.vm-workloads.svc.cluster.local
0.0.0.0         8080    ALL                        Route: 8080
0.0.0.0         15001   ALL                        PassthroughCluster
0.0.0.0         15006   ALL                        Non-HTTP/Non-TCP
0.0.0.0         15006   Trans: tls; Addr: *:9090   Cluster: inbound|9090||
0.0.0.0         15006   Trans: tls; Addr: *:8080   Cluster: inbound|8080||
"
    );
    let names = |filter: ListenerFilter| -> Vec<String> {
        listeners(&dump, &filter)
            .iter()
            .map(|l| l["name"].as_str().unwrap().to_string())
            .collect()
    };
    let filter = |address: Option<&str>, port: Option<u16>, kind: Option<&str>| ListenerFilter {
        address: address.map(Into::into),
        port,
        kind: kind.map(Into::into),
    };
    assert_eq!(
        names(filter(None, None, Some("tcp"))),
        ["240.240.72.44_3306", "virtualOutbound"]
    );

    assert_eq!(
        names(filter(None, None, Some("HTTP"))),
        // The inbound chains are HTTP; its default chain, to the
        // blackhole, does not count as TCP.
        ["0.0.0.0_8080", "virtualInbound"]
    );
    assert_eq!(
        names(filter(Some("240.240.72.44"), None, None)),
        ["240.240.72.44_3306"]
    );
    assert_eq!(names(filter(None, Some(15006), None)), ["virtualInbound"]);
}

#[test]
fn routes_name_their_virtual_service() {
    let dump = dump();
    let table = route_table(&routes(&dump, None));
    assert_eq!(
        table,
        "\
NAME             VHOST NAME                                            DOMAINS                                                     MATCH   VIRTUAL SERVICE
8080             payment-service.vm-workloads.svc.cluster.local:8080   payment-service.vm-workloads, payment-service + 1 more...   /*      payment-service-vs.vm-workloads
8080             payment-service.vm-workloads.svc.cluster.local:8080   payment-service.vm-workloads, payment-service + 1 more...   /*      payment-service-vs.vm-workloads
inbound|8080||   inbound|8080||                                        *                                                           /*
"
    );
    assert_eq!(
        first_cells(&route_table(&routes(&dump, Some("8080")))),
        ["8080", "8080"]
    );
    assert!(routes(&dump, Some("9999")).is_empty());
}

#[test]
fn route_domains_shortened_as_istioctl_does() {
    assert_eq!(route_domains(&[]), "");
    assert_eq!(
        route_domains(&["a.ns.svc.cluster.local"]),
        "a.ns.svc.cluster.local"
    );
    assert_eq!(
        route_domains(&[
            "a.ns.svc.cluster.local",
            "a.ns.svc.cluster.local:80",
            "a.ns",
            "a.ns:80"
        ]),
        "a.ns"
    );
    assert_eq!(
        route_domains(&[
            "a.ns.svc",
            "a.ns",
            "a",
            "10.0.0.1",
            "[fd00:10::1]",
            "[fd00:10::1]:80"
        ]),
        "a.ns, a + 2 more..."
    );
}

#[test]
fn endpoints_from_envoys_clusters_and_from_a_dump() {
    let statuses = fixture("envoy-clusters.json");
    let all = EndpointFilter::default();
    let table = endpoint_table(&endpoints_of_clusters(&statuses, &all));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "ENDPOINT                                                   STATUS    OUTLIER CHECK   CLUSTER",
            "10.46.0.2:8080                                             HEALTHY   OK              outbound|8080|stable|payment-service.vm-workloads.svc.cluster.local",
            "10.46.0.2:8080                                             HEALTHY   OK              outbound|8080||payment-service.vm-workloads.svc.cluster.local",
            "127.0.0.1:8080                                             HEALTHY   OK              inbound|8080||",
        ]
    );
    assert!(lines[5].starts_with("unix:///") && lines[5].ends_with("sds-grpc"));
    // The dump's load assignments give the same endpoints, without outlier state.
    let from_dump = endpoints_of_dump(&dump(), &all);
    let address = |rows: &[EndpointRow]| -> Vec<String> {
        rows.iter()
            .filter(|r| r.port != 0)
            .map(|r| format!("{}:{} {}", r.address, r.port, r.cluster))
            .collect()
    };
    assert_eq!(
        address(&from_dump),
        address(&endpoints_of_clusters(&statuses, &all))
    );
    assert!(from_dump.iter().all(|r| r.failed_outlier_check.is_none()));
    let filtered = |filter: EndpointFilter| endpoints_of_clusters(&statuses, &filter).len();
    let filter = EndpointFilter {
        address: Some("10.46.0.2".into()),
        port: Some(8080),
        ..Default::default()
    };
    assert_eq!(filtered(filter), 2);
    let filter = EndpointFilter {
        cluster: Some("INBOUND|8080||".into()),
        status: Some("healthy".into()),
        ..Default::default()
    };
    assert_eq!(filtered(filter), 1);
    let filter = EndpointFilter {
        status: Some("UNHEALTHY".into()),
        ..Default::default()
    };
    assert_eq!(filtered(filter), 0);
    assert_eq!(
        load_assignments(
            &dump(),
            &EndpointFilter {
                port: Some(3306),
                ..Default::default()
            }
        )
        .iter()
        .map(|a| a["cluster_name"].as_str().unwrap())
        .collect::<Vec<_>>(),
        ["outbound|3306||vm-database.vm-workloads.svc.cluster.local"]
    );
}

#[test]
fn secrets_with_their_certificates() {
    let dump = dump();
    // The fixture's certificates: the workload's valid for a day from
    // 2026-12-05T00:09:29Z, the root's for ten years.
    let during = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_472_000); // 2026-12-05T12:00:00Z
    assert_eq!(
        secrets::secret_table(&secrets::secrets(&dump, during)),
        "\
RESOURCE NAME   TYPE         STATUS   VALID CERT   SERIAL NUMBER                      NOT AFTER              NOT BEFORE
default         Cert Chain   ACTIVE   true         69d35d18ee95b7f8e43f2961cfd36398   2026-12-06T00:10:29Z   2026-12-05T00:09:29Z
ROOTCA          CA           ACTIVE   true         7d16f810056b532abf158d79ac2b4862   2036-12-02T00:10:29Z   2026-12-05T00:09:29Z
"
    );
    let later = during + Duration::from_secs(2 * 86_400);
    let rows = secrets::secrets(&dump, later);
    assert_eq!(
        rows.iter()
            .map(|r| (r.name.as_str(), r.valid))
            .collect::<Vec<_>>(),
        [("default", false), ("ROOTCA", true)]
    );
    assert_eq!(rows[0].trust_domain, "cluster.local");
    assert_eq!(
        secrets::secret_table(&[]),
        "No active or warming secrets found.\n"
    );
    assert_eq!(
        secrets::serial_hex(&[0x00, 0x0a, 0xff]),
        format!("{:0>32}", "aff")
    );
}

#[test]
fn bootstrap_summary_names_the_versions() {
    assert_eq!(
        secrets::bootstrap_summary(&dump()),
        "Istio Version: 1.27.0\nEnvoy Version: 1.40.0/Clean/RELEASE/BoringSSL\n"
    );
}

#[test]
fn management_reads_istios_config_path() {
    let metadata = |path: &str| serde_json::json!({"filter_metadata": {"istio": {"config": path}}});
    assert_eq!(
        management(&metadata(
            "/apis/networking.istio.io/v1/namespaces/ns/destination-rule/dr"
        )),
        "dr.ns"
    );
    assert_eq!(management(&metadata("/elsewhere")), "<unknown>");
    assert_eq!(management(&Value::Null), "");
}
