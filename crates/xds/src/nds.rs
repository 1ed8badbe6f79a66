//! The DNS name table (Istio's NDS): every host the mesh knows, with the
//! addresses an agent's DNS proxy answers for it. It is the same for every
//! proxy: the short forms a workload expects in its own namespace (`name`,
//! `name.namespace`, `name.namespace.svc`) are the agent's to derive from
//! `shortname` and `namespace`, as Istio's agent does.
//!
//! This module decides what the table holds; the ADS server delivers it and
//! the agent answers from it.

use std::collections::HashMap;
use std::net::IpAddr;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use vmesh_proto::NAME_TABLE_TYPE;
use vmesh_proto::nds::NameTable;
use vmesh_proto::nds::name_table::NameInfo;
use vmesh_registry::{EndpointAddress, MeshService, Origin, Resolution, Snapshot};

use crate::ads::ResourceSet;

/// The one resource's name (the agent subscribes to every one).
pub const NAME_TABLE_RESOURCE: &str = "name-table";
/// `registry` of Kubernetes Services and of ServiceEntries, as Istio says it.
const KUBERNETES: &str = "Kubernetes";
const EXTERNAL: &str = "External";

/// What a name resolves to: the virtual IPs, or for a service without one
/// whose clients connect to endpoints directly (headless, `resolution:
/// NONE`), the endpoints' addresses.
fn addresses(service: &MeshService) -> Vec<String> {
    let direct = service.resolution == Resolution::Passthrough || service.addresses.is_empty();
    let mut ips: Vec<String> = if direct {
        service
            .endpoints
            .iter()
            .filter_map(|e| match e.address {
                EndpointAddress::Ip(ip) => Some(ip.to_string()),
                _ => None,
            })
            .collect()
    } else {
        service.addresses.iter().map(IpAddr::to_string).collect()
    };
    if ips.is_empty() {
        ips = service.addresses.iter().map(IpAddr::to_string).collect();
    }
    ips.sort();
    ips.dedup();
    ips
}

/// The table for `snapshot`: one entry per resolvable, non-wildcard host.
pub fn name_table(snapshot: &Snapshot) -> NameTable {
    let mut table = HashMap::new();
    for service in &snapshot.services {
        if service.hostname.starts_with('*') {
            continue;
        }
        let ips = addresses(service);
        if ips.is_empty() {
            continue;
        }
        let kubernetes = service.origin == Origin::Service;
        table.insert(
            service.hostname.clone(),
            NameInfo {
                ips,
                registry: if kubernetes { KUBERNETES } else { EXTERNAL }.into(),
                shortname: if kubernetes {
                    service.name.clone()
                } else {
                    String::new()
                },
                namespace: service.namespace.clone(),
            },
        );
    }
    NameTable { table }
}

/// The table as the resource set the ADS server pushes.
pub fn name_table_resources(snapshot: &Snapshot) -> ResourceSet {
    let mut set = ResourceSet::default();
    set.insert(
        NAME_TABLE_TYPE,
        NAME_TABLE_RESOURCE,
        Any {
            type_url: NAME_TABLE_TYPE.into(),
            value: name_table(snapshot).encode_to_vec(),
        },
    );
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::snapshot;

    #[test]
    fn services_and_service_entries_with_their_addresses() {
        let snapshot = snapshot(
            "apiVersion: v1\nkind: Service\nmetadata: {name: payment-service, namespace: vm-workloads}\n\
             spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 8080}], selector: {app: payment}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: vm-database, namespace: vm-workloads}\n\
             spec: {hosts: [vm-database.vm-workloads.svc.cluster.local], ports: [{number: 5432, name: tcp, protocol: TCP}], resolution: STATIC, endpoints: [{address: 10.0.0.20}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: peers, namespace: vm-workloads}\n\
             spec: {hosts: [peers.internal], ports: [{number: 80, name: http}], resolution: NONE, endpoints: [{address: 10.0.0.31}, {address: 10.0.0.30}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: wild, namespace: vm-workloads}\n\
             spec: {hosts: ['*.example.com'], ports: [{number: 443, name: tls}], resolution: NONE}\n",
        );
        let table = name_table(&snapshot).table;
        let payment = &table["payment-service.vm-workloads.svc.cluster.local"];
        assert_eq!(payment.ips, ["10.96.0.10"]);
        assert_eq!(
            (
                payment.registry.as_str(),
                payment.shortname.as_str(),
                payment.namespace.as_str()
            ),
            (KUBERNETES, "payment-service", "vm-workloads")
        );
        let database = &table["vm-database.vm-workloads.svc.cluster.local"];
        assert_eq!(database.registry, EXTERNAL);
        assert!(
            database.ips[0].starts_with("240.240."),
            "a ServiceEntry without addresses gets an allocated one: {:?}",
            database.ips
        );
        assert_eq!(
            table["peers.internal"].ips,
            ["10.0.0.30", "10.0.0.31"],
            "resolution NONE answers with the endpoints"
        );
        assert!(!table.keys().any(|k| k.contains('*')), "no wildcards");
    }
}
