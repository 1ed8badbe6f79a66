//! Answers from the name table: which names are the mesh's, and the DNS
//! response for a question about one. Pure: no sockets.
//!
//! A name is the mesh's when the table has it, or — for Kubernetes
//! Services — it is one of the short forms a workload in this namespace
//! expects (`name.namespace.svc`, `name.namespace`, and `name` in its own
//! namespace), or it is a full table name with a resolv.conf search domain
//! appended (what a resolver tries first for names with few dots), so those
//! expansions are answered here instead of leaking upstream. (A short form
//! with a search domain appended is a real name of that domain, such as
//! `api.corp.example`: it is forwarded.)
//!
//! A mesh name is answered authoritatively: its A or AAAA records, and for
//! a type it has none of, an empty NOERROR (NODATA), never NXDOMAIN (the
//! name exists). Every other name is the forwarder's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use serde::Serialize;
use vmesh_proto::nds::NameTable;

/// How long clients may cache a mesh answer: short, as Istio's, so a
/// changed address is picked up quickly.
const TTL: u32 = 30;

/// The addresses of one mesh name.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Addresses {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// The name table, indexed for one workload's namespace and search domains.
#[derive(Debug, Default)]
pub struct NameIndex {
    names: HashMap<String, Arc<Addresses>>,
    /// The table's own (full) names, which alone match with a search domain appended.
    full: std::collections::HashSet<String>,
    search: Vec<String>,
}

/// A name as the index keys it: lower case, no trailing dot.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl NameIndex {
    /// Indexes `table` for a workload in `namespace` whose resolver appends
    /// `search` domains.
    pub fn new(table: &NameTable, namespace: &str, search: &[String]) -> NameIndex {
        let mut names: HashMap<String, Arc<Addresses>> = HashMap::new();
        let full = table.table.keys().map(|host| key(host)).collect();
        let mut aliases: Vec<(String, Arc<Addresses>)> = Vec::new();
        for (host, info) in &table.table {
            let mut addresses = Addresses::default();
            for ip in info.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                match ip {
                    IpAddr::V4(v4) => addresses.v4.push(v4),
                    IpAddr::V6(v6) => addresses.v6.push(v6),
                }
            }
            let addresses = Arc::new(addresses);
            if info.registry == "Kubernetes" && !info.shortname.is_empty() {
                let (name, ns) = (&info.shortname, &info.namespace);
                aliases.push((format!("{name}.{ns}.svc"), addresses.clone()));
                aliases.push((format!("{name}.{ns}"), addresses.clone()));
                if ns == namespace {
                    aliases.push((name.clone(), addresses.clone()));
                }
            }
            names.insert(key(host), addresses);
        }
        // A full name wins over another service's short form.
        for (alias, addresses) in aliases {
            names.entry(key(&alias)).or_insert(addresses);
        }
        NameIndex {
            names,
            full,
            search: search
                .iter()
                .map(|s| key(s))
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The addresses of `name` if it is a mesh name.
    pub fn lookup(&self, name: &str) -> Option<&Arc<Addresses>> {
        let name = key(name);
        if let Some(found) = self.names.get(&name) {
            return Some(found);
        }
        self.search.iter().find_map(|domain| {
            let base = name.strip_suffix(domain.as_str())?.strip_suffix('.')?;
            self.full
                .contains(base)
                .then(|| self.names.get(base))
                .flatten()
        })
    }

    /// Every name and its addresses, sorted (for the debug dump).
    pub fn entries(&self) -> Vec<(&str, &Addresses)> {
        let mut entries: Vec<(&str, &Addresses)> = self
            .names
            .iter()
            .map(|(name, addresses)| (name.as_str(), addresses.as_ref()))
            .collect();
        entries.sort_by_key(|(name, _)| *name);
        entries
    }

    /// The response to `query` if it asks about a mesh name; `None` when
    /// it is the forwarder's (another name, or not a plain query).
    pub fn answer(&self, query: &Message) -> Option<Message> {
        if query.metadata.message_type != MessageType::Query
            || query.metadata.op_code != OpCode::Query
            || query.queries.len() != 1
        {
            return None;
        }
        let question = &query.queries[0];
        let addresses = self.lookup(&question.name().to_ascii())?;
        let name = question.name().clone();
        let records: Vec<Record> = match question.query_type() {
            RecordType::A => addresses
                .v4
                .iter()
                .map(|ip| Record::from_rdata(name.clone(), TTL, RData::A(A(*ip))))
                .collect(),
            RecordType::AAAA => addresses
                .v6
                .iter()
                .map(|ip| Record::from_rdata(name.clone(), TTL, RData::AAAA(AAAA(*ip))))
                .collect(),
            // The name exists; it has no records of this type.
            _ => Vec::new(),
        };
        let mut response = Message::response(query.metadata.id, OpCode::Query);
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = query.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.response_code = ResponseCode::NoError;
        response.add_query(question.clone());
        response.add_answers(records);
        Some(response)
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use vmesh_proto::nds::name_table::NameInfo;

    use super::*;

    fn table() -> NameTable {
        let info = |ips: &[&str], registry: &str, shortname: &str, namespace: &str| NameInfo {
            ips: ips.iter().map(|s| s.to_string()).collect(),
            registry: registry.into(),
            shortname: shortname.into(),
            namespace: namespace.into(),
        };
        NameTable {
            table: [
                (
                    "payment-service.vm-workloads.svc.cluster.local".to_string(),
                    info(
                        &["10.96.0.10"],
                        "Kubernetes",
                        "payment-service",
                        "vm-workloads",
                    ),
                ),
                (
                    "web.shop.svc.cluster.local".to_string(),
                    info(&["10.96.0.11", "fd00::11"], "Kubernetes", "web", "shop"),
                ),
                (
                    "vm-database.vm-workloads.svc.cluster.local".to_string(),
                    info(&["240.240.0.1"], "External", "", "vm-workloads"),
                ),
            ]
            .into(),
        }
    }

    fn ask(index: &NameIndex, name: &str, kind: RecordType) -> Option<Message> {
        let mut query = Message::query();
        query.metadata.id = 7;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        index.answer(&query)
    }

    fn ips(response: &Message) -> Vec<String> {
        response
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn full_and_short_names_of_the_workloads_namespace() {
        let search = [
            "vm-workloads.svc.cluster.local".to_string(),
            "corp.example".into(),
        ];
        let index = NameIndex::new(&table(), "vm-workloads", &search);
        for name in [
            "payment-service.vm-workloads.svc.cluster.local.",
            "PAYMENT-SERVICE.vm-workloads.svc.cluster.local",
            "payment-service.vm-workloads.svc",
            "payment-service.vm-workloads",
            "payment-service",
            // What a resolver tries first for a name with few dots.
            "payment-service.vm-workloads.svc.cluster.local.corp.example",
            "payment-service.vm-workloads.svc.cluster.local",
        ] {
            let response = ask(&index, name, RecordType::A).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(ips(&response), ["10.96.0.10"], "{name}");
            assert_eq!(response.metadata.id, 7);
            assert!(response.metadata.authoritative && response.metadata.recursion_desired);
        }
        // Another namespace's service: its qualified forms only.
        assert!(ask(&index, "web.shop", RecordType::A).is_some());
        assert!(ask(&index, "web", RecordType::A).is_none());
        // A ServiceEntry host: as written.
        assert!(
            ask(
                &index,
                "vm-database.vm-workloads.svc.cluster.local",
                RecordType::A
            )
            .is_some()
        );
        assert!(ask(&index, "vm-database.vm-workloads", RecordType::A).is_none());
        // Not the mesh's: forwarded. A short form under a search domain is
        // that domain's own name.
        assert!(ask(&index, "example.test", RecordType::A).is_none());
        assert!(ask(&index, "payment-service.corp.example", RecordType::A).is_none());
        assert!(
            ask(
                &index,
                "payment-service.vm-workloads.corp.example",
                RecordType::A
            )
            .is_none()
        );
        assert!(
            ask(
                &index,
                "unknown.vm-workloads.svc.cluster.local",
                RecordType::A
            )
            .is_none()
        );
    }

    #[test]
    fn nodata_not_nxdomain_for_missing_types() {
        let index = NameIndex::new(&table(), "shop", &[]);
        let v6 = ask(&index, "payment-service.vm-workloads", RecordType::AAAA).unwrap();
        assert_eq!(v6.metadata.response_code, ResponseCode::NoError);
        assert!(v6.answers.is_empty(), "IPv4 only: an empty AAAA answer");
        let mx = ask(&index, "web", RecordType::MX).unwrap();
        assert_eq!(mx.metadata.response_code, ResponseCode::NoError);
        assert!(mx.answers.is_empty());
        let both = ask(&index, "web", RecordType::AAAA).unwrap();
        assert_eq!(ips(&both), ["fd00::11"]);
    }
}
