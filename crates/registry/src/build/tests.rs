//! The join, on the guide's manifests and on small cases.

use super::*;
use crate::fixtures::{decode, seed, snapshot};
use crate::{EndpointAddress, OutboundPolicy};

fn owned(expected: &[(&str, u16, u16)]) -> Vec<(String, u16, u16)> {
    expected
        .iter()
        .map(|(address, port, service_port)| (address.to_string(), *port, *service_port))
        .collect()
}

fn addresses(service: &MeshService) -> Vec<(String, u16, u16)> {
    service
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.port, e.service_port))
        .collect()
}

#[test]
fn guide_payment_service_and_database() {
    let snapshot = snapshot(&seed(&[
        "complete-vm-integration.yaml",
        "workload-entry-payment-vm1.yaml",
        "service-entry-vm-database.yaml",
    ]));

    let payment = snapshot
        .service("payment-service.vm-workloads.svc.cluster.local")
        .unwrap();
    let ports: Vec<_> = payment
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            ("http", 8080, Protocol::Http),
            ("grpc", 9090, Protocol::Grpc)
        ]
    );
    assert_eq!(payment.resolution, Resolution::Static);
    assert!(!payment.mesh_external);
    assert_eq!(
        addresses(payment),
        owned(&[("192.168.1.100", 8080, 8080), ("192.168.1.100", 9090, 9090)])
    );
    for endpoint in &payment.endpoints {
        assert_eq!(
            endpoint.service_account.as_deref(),
            Some("payment-service-sa")
        );
        assert_eq!(endpoint.locality.as_deref(), Some("us-west1/zone-a"));
        assert_eq!(endpoint.network.as_deref(), Some("network1"));
        assert_eq!(endpoint.weight, 100);
        assert_eq!(endpoint.workload, "vm-workloads/payment-service-vm1");
        assert!(endpoint.healthy);
        assert_eq!(endpoint.labels["instance-id"], "vm1");
        assert_eq!(endpoint.labels["class"], "vm");
    }
    assert_eq!(payment.service_accounts, ["payment-service-sa"]);
    assert_eq!(payment.addresses.len(), 1);

    let database = snapshot
        .service("vm-database.vm-workloads.svc.cluster.local")
        .unwrap();
    let ports: Vec<_> = database
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            ("mysql", 3306, Protocol::Tcp),
            ("mysql-readonly", 3307, Protocol::Tcp)
        ]
    );
    assert_eq!(
        addresses(database),
        owned(&[("192.168.1.200", 3306, 3306), ("192.168.1.201", 3307, 3307)])
    );
    assert_eq!(database.endpoints[1].labels["role"], "replica");
    assert_eq!(database.endpoints[1].workload, "vm-workloads/vm-database");
    assert!(!database.mesh_external);
    assert_eq!(database.resolution, Resolution::Static);
    let [IpAddr::V4(vip)] = database.addresses[..] else {
        panic!("one IPv4 VIP expected: {:?}", database.addresses);
    };
    assert_eq!(vip.octets()[..2], [240, 240]);

    let hosts: Vec<_> = snapshot.services.iter().map(|s| &s.hostname).collect();
    assert_eq!(hosts.len(), 2);
    assert!(hosts.is_sorted());
    assert_eq!(snapshot.destination_rules[0].name, "payment-service");
}

#[test]
fn target_ports_map_through_workload_ports() {
    let snapshot = snapshot(&decode(
        "t.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: app-port}
  - {name: admin, port: 81, targetPort: 9001}
  - {name: metrics, port: 82}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: a, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: web}, ports: {app-port: 8080, admin: 9100}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: b, namespace: shop}
spec: {address: 10.0.0.2, labels: {app: web}}
"#,
    ));
    let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
    assert_eq!(
        addresses(web),
        owned(&[
            // a: named target from its ports; admin by port name over targetPort.
            ("10.0.0.1", 82, 82),
            ("10.0.0.1", 8080, 80),
            ("10.0.0.1", 9100, 81),
            // b: has no app-port, so it does not serve port 80.
            ("10.0.0.2", 82, 82),
            ("10.0.0.2", 9001, 81),
        ])
    );
    assert_eq!(web.ports[0].target_port, None);
    assert_eq!(web.ports[1].target_port, Some(9001));
    assert!(web.service_accounts.is_empty());
}

#[test]
fn selectors_stay_in_their_namespace() {
    let snapshot = snapshot(&decode(
        "t.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: unselected, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: here, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: elsewhere, namespace: other}
spec: {address: 10.0.0.2, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: labelled-in-metadata, namespace: shop, labels: {app: web}}
spec: {address: 10.0.0.3}
"#,
    ));
    let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
    assert_eq!(
        addresses(web),
        owned(&[("10.0.0.1", 80, 80), ("10.0.0.3", 80, 80)])
    );
    let unselected = snapshot
        .service("unselected.shop.svc.cluster.local")
        .unwrap();
    assert!(unselected.endpoints.is_empty());
}

#[test]
fn cluster_ips_headless_and_external_name_services() {
    let snapshot = snapshot(&decode(
        "t.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: fixed, namespace: shop}
spec: {clusterIP: 10.96.7.7, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{name: tcp, port: 5000}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: api.example.com, ports: [{name: https, port: 443}]}
"#,
    ));
    let fixed = snapshot.service("fixed.shop.svc.cluster.local").unwrap();
    assert_eq!(fixed.addresses, ["10.96.7.7".parse::<IpAddr>().unwrap()]);

    let headless = snapshot.service("headless.shop.svc.cluster.local").unwrap();
    assert!(headless.addresses.is_empty());
    assert_eq!(headless.resolution, Resolution::Passthrough);

    let ext = snapshot.service("ext.shop.svc.cluster.local").unwrap();
    assert!(ext.addresses.is_empty());
    assert_eq!(ext.resolution, Resolution::Dns);
    assert!(ext.mesh_external);
    assert_eq!(addresses(ext), owned(&[("api.example.com", 443, 443)]));
}

#[test]
fn health_from_conditions_and_annotation() {
    let entry = |name: &str, annotated: bool, status: Option<&str>| {
        let annotations = if annotated {
            "annotations: {proxy.istio.io/health-checks-enabled: \"true\"}"
        } else {
            ""
        };
        let status = status
            .map(|s| format!("status: {{conditions: [{{type: Healthy, status: \"{s}\"}}]}}"))
            .unwrap_or_default();
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: shop\n  {annotations}\nspec: {{address: 10.0.0.1, labels: {{app: web}}}}\n{status}\n---\n"
        )
    };
    let text = [
        entry("plain", false, None),
        entry("failing", false, Some("False")),
        entry("unprobed", true, None),
        entry("probed", true, Some("True")),
        entry("probe-failing", true, Some("False")),
    ]
    .concat()
        + "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, ports: [{name: http, port: 80}]}\n";
    let snapshot = snapshot(&decode("t.yaml", &text));
    let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
    let health: BTreeMap<_, _> = web
        .endpoints
        .iter()
        .map(|e| (e.workload.as_str(), e.healthy))
        .collect();
    assert_eq!(
        health,
        BTreeMap::from([
            ("shop/failing", false),
            ("shop/plain", true),
            ("shop/probe-failing", false),
            ("shop/probed", true),
            ("shop/unprobed", false),
        ])
    );
}

#[test]
fn service_entry_resolutions_and_vips() {
    let snapshot = snapshot(&decode(
        "t.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com, "*.cdn.example.com"]
  ports: [{name: https, number: 443, protocol: HTTPS, targetPort: 8443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: shop}
spec:
  hosts: [db.internal]
  addresses: [10.1.0.0/16, 10.2.0.5/32, 10.3.0.1]
  ports: [{name: tcp, number: 5432}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: no-endpoints, namespace: shop}
spec:
  hosts: [anything.internal]
  ports: [{name: tcp, number: 5432}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: selected, namespace: shop}
spec:
  hosts: [cache.internal]
  ports: [{name: redis, number: 6379, protocol: REDIS}]
  workloadSelector: {labels: {app: cache}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: cache-1, namespace: shop}
spec: {address: 10.0.0.9, labels: {app: cache}, serviceAccount: cache}
"#,
    ));
    let api = snapshot.service("api.example.com").unwrap();
    assert_eq!(api.resolution, Resolution::Dns);
    assert!(api.mesh_external);
    assert_eq!(api.ports[0].protocol, Protocol::Https);
    assert_eq!(addresses(api), owned(&[("api.example.com", 8443, 443)]));
    assert_eq!(api.addresses.len(), 1);

    let wildcard = snapshot.service("*.cdn.example.com").unwrap();
    assert!(wildcard.addresses.is_empty());

    let db = snapshot.service("db.internal").unwrap();
    assert_eq!(db.resolution, Resolution::Passthrough);
    let written: Vec<IpAddr> = ["10.2.0.5", "10.3.0.1"].map(|a| a.parse().unwrap()).into();
    assert_eq!(db.addresses, written);

    let bare = snapshot.service("anything.internal").unwrap();
    assert!(bare.addresses.is_empty() && bare.endpoints.is_empty());

    let cache = snapshot.service("cache.internal").unwrap();
    assert_eq!(cache.addresses.len(), 1, "NONE with a selector gets a VIP");
    assert_eq!(addresses(cache), owned(&[("10.0.0.9", 6379, 6379)]));
    assert_eq!(cache.service_accounts, ["cache"]);
    assert_eq!(cache.endpoints[0].workload, "shop/cache-1");
}

#[test]
fn mesh_settings_from_istio_operator() {
    let operators = |text: &str| snapshot(&decode("t.yaml", text)).mesh;
    assert_eq!(operators(""), Default::default());
    let mesh = operators(
        r#"
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: a, namespace: istio-system}
spec:
  meshConfig:
    trustDomain: example.org
    outboundTrafficPolicy: {mode: REGISTRY_ONLY}
---
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: b, namespace: istio-system}
spec:
  meshConfig: {trustDomain: ignored.org, rootNamespace: mesh-root}
"#,
    );
    assert_eq!(mesh.trust_domain, "example.org");
    assert_eq!(mesh.outbound_policy, OutboundPolicy::RegistryOnly);
    assert_eq!(mesh.root_namespace, "mesh-root");
    let guide = snapshot(&seed(&["istio-operator-vm.yaml", "mesh-config-dns.yaml"])).mesh;
    assert_eq!(guide.trust_domain, "cluster.local");
    assert_eq!(guide.outbound_policy, OutboundPolicy::AllowAny);
}

#[test]
fn endpoint_addresses_of_every_kind() {
    let snapshot = snapshot(&decode(
        "t.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: socket, namespace: shop}
spec:
  hosts: [socket.internal]
  ports: [{name: tcp, number: 9000}]
  resolution: STATIC
  endpoints: [{address: "unix:///var/run/app.sock"}, {network: n2}, {address: 10.0.0.1}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: named, namespace: shop}
spec: {address: web-1.example.com, labels: {app: web}}
"#,
    ));
    let socket = snapshot.service("socket.internal").unwrap();
    let found: Vec<_> = socket.endpoints.iter().map(|e| e.address.clone()).collect();
    assert_eq!(
        found,
        [
            EndpointAddress::ViaGateway {
                network: "n2".into()
            },
            EndpointAddress::Ip("10.0.0.1".parse().unwrap()),
            EndpointAddress::Unix("/var/run/app.sock".into()),
        ],
        "ordered as written, the gateway's empty address first"
    );
    let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
    assert_eq!(
        web.endpoints[0].address,
        EndpointAddress::Hostname("web-1.example.com".into())
    );

    // An entry with neither address nor network (validation refuses it)
    // serves nothing.
    let mut objects = decode(
        "t.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, ports: [{name: http, port: 80}]}\n",
    );
    let mut nowhere = decode(
        "t.yaml",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: nowhere, namespace: shop}\nspec: {address: 10.0.0.2, labels: {app: web}}\n",
    );
    nowhere[0].body["spec"]
        .as_object_mut()
        .unwrap()
        .remove("address");
    objects.extend(nowhere);
    let snapshot = crate::fixtures::snapshot(&objects);
    let web = snapshot.service("web.shop.svc.cluster.local").unwrap();
    assert!(web.endpoints.is_empty());
}

#[test]
fn service_hostnames_use_the_mesh_domain_suffix() {
    let snapshot = snapshot(&decode(
        "t.yaml",
        r#"
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: mesh, namespace: istio-system}
spec: {values: {global: {proxy: {clusterDomain: corp.internal}}}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
"#,
    ));
    assert_eq!(snapshot.mesh.domain_suffix, "corp.internal");
    let hosts: Vec<_> = snapshot
        .services
        .iter()
        .map(|s| s.hostname.as_str())
        .collect();
    assert_eq!(hosts, ["web.shop.svc.corp.internal"]);
}

#[test]
fn invalid_bodies_and_unknown_kinds_are_skipped() {
    let mut objects = decode(
        "t.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n",
    );
    let mut broken = objects[0].clone();
    broken.metadata.name = Some("broken".into());
    broken.body["spec"] = serde_json::json!({"ports": "not a list"});
    let mut unknown = objects[0].clone();
    unknown.kind = "Gizmo".into();
    objects.extend([broken, unknown]);
    let snapshot = snapshot(&objects);
    let hosts: Vec<_> = snapshot
        .services
        .iter()
        .map(|s| s.hostname.as_str())
        .collect();
    assert_eq!(hosts, ["ok.shop.svc.cluster.local"]);
}

#[test]
fn a_hostname_defined_twice_keeps_the_service() {
    let snapshot = snapshot(&decode(
        "t.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow, namespace: aaa}
spec: {hosts: [web.shop.svc.cluster.local], ports: [{name: http, number: 80}], resolution: DNS}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
"#,
    ));
    assert_eq!(snapshot.services.len(), 1);
    assert_eq!(snapshot.services[0].name, "web");
}
