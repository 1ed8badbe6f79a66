//! The mesh model's types: what the rest of vmesh reads from a [`Snapshot`],
//! endpoint addresses among them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use vmesh_api::kinds::authorization_policy::AuthorizationPolicySpec;
use vmesh_api::kinds::destination_rule::DestinationRuleSpec;
use vmesh_api::kinds::peer_authentication::PeerAuthenticationSpec;
use vmesh_api::kinds::service::{ServicePort, TransportProtocol};
use vmesh_api::kinds::telemetry::TelemetrySpec;
use vmesh_api::kinds::virtual_service::VirtualServiceSpec;

pub use vmesh_api::mesh::{MeshSettings, OutboundPolicy};

/// Everything the data plane is generated from, at one point in time. Which
/// of its rules apply to a host or a workload is asked of it through the
/// lookups of the `policy` module ([`Snapshot::destination_rule_for`] and
/// the like), not read from these lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Sorted by hostname; one per hostname.
    pub services: Vec<MeshService>,
    /// Sorted by namespace and name; shared with the [`DecodeCache`](crate::DecodeCache)
    /// they were decoded in, as the other rules.
    pub destination_rules: Vec<Arc<Scoped<DestinationRuleSpec>>>,
    /// Sorted by namespace and name.
    pub virtual_services: Vec<Arc<Scoped<VirtualServiceSpec>>>,
    /// Sorted by namespace and name.
    pub peer_authentications: Vec<Arc<Scoped<PeerAuthenticationSpec>>>,
    /// Sorted by namespace and name.
    pub authorization_policies: Vec<Arc<Scoped<AuthorizationPolicySpec>>>,
    /// Sorted by namespace and name.
    pub telemetries: Vec<Arc<Scoped<TelemetrySpec>>>,
    pub mesh: MeshSettings,
    /// Built with the rules by [`Snapshot::build`], for the lookups.
    pub(crate) rules_by_host: crate::policy::RulesByHost,
}

impl Snapshot {
    /// The service with this fully qualified hostname.
    pub fn service(&self, hostname: &str) -> Option<&MeshService> {
        self.services
            .binary_search_by(|s| s.hostname.as_str().cmp(hostname))
            .ok()
            .map(|i| &self.services[i])
    }
}

/// A spec and the object it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Scoped<T> {
    pub namespace: String,
    pub name: String,
    pub spec: T,
}

/// One hostname of the mesh: a Kubernetes Service, or one host of a ServiceEntry.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshService {
    /// `name.namespace.svc.<domain suffix>` for Services, the host itself for ServiceEntries.
    pub hostname: String,
    /// Namespace of the Service or ServiceEntry.
    pub namespace: String,
    /// Name of the Service or ServiceEntry object.
    pub name: String,
    /// Which kind of object it comes from.
    pub origin: Origin,
    /// Virtual IPs: the Service's cluster IPs, the ServiceEntry's single-IP
    /// addresses, or an allocated address; empty when there is none.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<MeshPort>,
    pub resolution: Resolution,
    pub mesh_external: bool,
    /// Sorted by address, then port.
    pub endpoints: Vec<MeshEndpoint>,
    /// The distinct service accounts of the endpoints, sorted.
    pub service_accounts: Vec<String>,
}

/// The object a [`MeshService`] comes from (Istio's registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A Kubernetes Service.
    Service,
    /// One host of a ServiceEntry.
    ServiceEntry,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPort {
    /// Empty for the single unnamed port of a Service.
    pub name: String,
    pub port: u16,
    /// A numeric `targetPort`, if the port has one.
    pub target_port: Option<u16>,
    pub protocol: Protocol,
}

/// How a client finds the endpoints of a service (Istio's `Resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The endpoints listed here (Istio's `ClientSideLB`, a ServiceEntry's `STATIC`).
    Static,
    /// Endpoint addresses are hostnames resolved by DNS, connections spread over all answers.
    Dns,
    /// Endpoint addresses are hostnames resolved by DNS, one answer used at a time.
    DnsRoundRobin,
    /// Traffic goes to the address the client connected to (headless Services, `NONE`).
    Passthrough,
}

/// A port's protocol, as Istio decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    GrpcWeb,
    Https,
    Tls,
    Tcp,
    Mongo,
    Redis,
    Mysql,
    Udp,
    /// Not declared: Istio sniffs the protocol; vmesh routes it as TCP.
    Unsupported,
}

/// Ports whose unnamed traffic is TCP rather than sniffed (Istio's well-known
/// ports: SMTP, DNS, MySQL, MongoDB), since sniffing breaks server-first protocols.
const WELL_KNOWN_TCP_PORTS: &[u32] = &[25, 53, 3306, 27017];

impl Protocol {
    /// An Istio protocol name (`HTTP`, `grpc`, `GRPC-WEB`, …), case-insensitive.
    pub fn parse(name: &str) -> Protocol {
        match name.to_ascii_lowercase().as_str() {
            "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "tcp" => Protocol::Tcp,
            "mongo" => Protocol::Mongo,
            "redis" => Protocol::Redis,
            "mysql" => Protocol::Mysql,
            "udp" => Protocol::Udp,
            _ => Protocol::Unsupported,
        }
    }

    /// A Kubernetes Service port's protocol: UDP from `protocol`, else
    /// `appProtocol`, else the port name's prefix before `-` (`http-web` is HTTP).
    pub fn of_service_port(port: &ServicePort) -> Protocol {
        if port.protocol == Some(TransportProtocol::Udp) {
            return Protocol::Udp;
        }
        let name = port
            .app_protocol
            .as_deref()
            .or(port.name.as_deref())
            .unwrap_or_default()
            .to_ascii_lowercase();
        match name.as_str() {
            "kubernetes.io/h2c" => return Protocol::Http2,
            "kubernetes.io/ws" => return Protocol::Http,
            "kubernetes.io/wss" => return Protocol::Https,
            _ if name.starts_with("grpc-web") => return Protocol::GrpcWeb,
            _ => {}
        }
        let prefix = name.split('-').next().unwrap_or_default();
        match Protocol::parse(prefix) {
            Protocol::Unsupported if WELL_KNOWN_TCP_PORTS.contains(&port.port) => Protocol::Tcp,
            protocol => protocol,
        }
    }

    /// Whether traffic on the port is routed as HTTP; everything else
    /// (undeclared protocols included) is routed as TCP.
    pub fn is_http(&self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }
}

/// Where a workload is reached, as its WorkloadEntry, the endpoint written in
/// a ServiceEntry, or a Service's `externalName` says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    Ip(IpAddr),
    /// A DNS name: only a service with DNS resolution resolves it.
    Hostname(String),
    /// A Unix domain socket, written `unix:///path` (`unix://@name` for an
    /// abstract one); the path without the scheme.
    Unix(PathBuf),
    /// No address: a workload on another network, reached through that
    /// network's gateway.
    ViaGateway {
        network: String,
    },
}

impl EndpointAddress {
    /// An entry's address: what `address` says, else (absent or empty) the
    /// gateway of its `network`; `None` when it has neither.
    pub fn parse(address: Option<&str>, network: Option<&str>) -> Option<EndpointAddress> {
        let Some(address) = address.filter(|a| !a.is_empty()) else {
            return network
                .filter(|n| !n.is_empty())
                .map(|network| EndpointAddress::ViaGateway {
                    network: network.to_string(),
                });
        };
        Some(if let Some(path) = address.strip_prefix("unix://") {
            EndpointAddress::Unix(path.into())
        } else if let Ok(ip) = address.parse() {
            EndpointAddress::Ip(ip)
        } else {
            EndpointAddress::Hostname(address.to_string())
        })
    }

    /// The address as an entry writes it (empty through a gateway): what
    /// endpoints are ordered by.
    pub(crate) fn written(&self) -> Cow<'_, str> {
        match self {
            EndpointAddress::Ip(ip) => Cow::Owned(ip.to_string()),
            EndpointAddress::Hostname(host) => Cow::Borrowed(host),
            EndpointAddress::Unix(path) => Cow::Owned(format!("unix://{}", path.display())),
            EndpointAddress::ViaGateway { .. } => Cow::Borrowed(""),
        }
    }
}

impl fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddress::ViaGateway { network } => {
                write!(f, "the gateway of network {network}")
            }
            other => f.write_str(&other.written()),
        }
    }
}

/// One workload serving one port of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshEndpoint {
    pub address: EndpointAddress,
    /// The port traffic for [`service_port`](Self::service_port) goes to on this workload.
    pub port: u16,
    pub service_port: u16,
    /// Load-balancing weight, at least 1.
    pub weight: u32,
    /// `region/zone/subzone`.
    pub locality: Option<String>,
    pub network: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Service account name, in the service's namespace.
    pub service_account: Option<String>,
    /// `namespace/name` of the WorkloadEntry, or of the ServiceEntry or Service
    /// for endpoints written inside them.
    pub workload: String,
    /// The workload's name in metrics (an auto-registered entry's WorkloadGroup).
    pub workload_name: String,
    pub healthy: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, number: u32, app_protocol: Option<&str>) -> ServicePort {
        ServicePort {
            name: Some(name.to_string()),
            port: number,
            app_protocol: app_protocol.map(str::to_string),
            ..ServicePort::default()
        }
    }

    #[test]
    fn service_port_protocols_follow_istio() {
        let cases = [
            (port("http", 80, None), Protocol::Http),
            (port("http-web", 80, None), Protocol::Http),
            (port("HTTP2-x", 80, None), Protocol::Http2),
            (port("grpc", 9090, None), Protocol::Grpc),
            (port("grpc-web-ui", 80, None), Protocol::GrpcWeb),
            (port("tls-db", 443, None), Protocol::Tls),
            (port("web", 80, Some("https")), Protocol::Https),
            (port("http", 80, Some("kubernetes.io/h2c")), Protocol::Http2),
            (port("db", 3306, None), Protocol::Tcp),
            (port("db", 5432, None), Protocol::Unsupported),
            (port("mysql", 3306, None), Protocol::Mysql),
        ];
        for (port, expected) in cases {
            assert_eq!(Protocol::of_service_port(&port), expected, "{port:?}");
        }
        let mut udp = port("http", 53, None);
        udp.protocol = Some(TransportProtocol::Udp);
        assert_eq!(Protocol::of_service_port(&udp), Protocol::Udp);
    }

    #[test]
    fn endpoint_addresses_by_what_is_written() {
        let parse =
            |address: Option<&str>, network: Option<&str>| EndpointAddress::parse(address, network);
        assert_eq!(
            parse(Some("10.0.0.1"), Some("n1")),
            Some(EndpointAddress::Ip("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            parse(Some("2001:db8::1"), None),
            Some(EndpointAddress::Ip("2001:db8::1".parse().unwrap()))
        );
        assert_eq!(
            parse(Some("db.example.com"), None),
            Some(EndpointAddress::Hostname("db.example.com".into()))
        );
        assert_eq!(
            parse(Some("unix:///var/run/app.sock"), None),
            Some(EndpointAddress::Unix("/var/run/app.sock".into()))
        );
        let gateway = Some(EndpointAddress::ViaGateway {
            network: "n2".into(),
        });
        assert_eq!(parse(None, Some("n2")), gateway);
        assert_eq!(parse(Some(""), Some("n2")), gateway);
        assert_eq!(parse(None, None), None);
        assert_eq!(parse(Some(""), Some("")), None);
        for written in ["10.0.0.1", "db.example.com", "unix:///var/run/app.sock"] {
            let address = parse(Some(written), None).unwrap();
            assert_eq!(
                (address.written(), address.to_string()),
                (written.into(), written.into())
            );
        }
        assert_eq!(gateway.as_ref().unwrap().written(), "");
    }

    #[test]
    fn only_http_family_routes_as_http() {
        assert!(Protocol::parse("GRPC").is_http());
        assert!(Protocol::parse("http2").is_http());
        assert!(!Protocol::parse("HTTPS").is_http());
        assert!(!Protocol::parse("").is_http());
        assert!(!Protocol::Mysql.is_http());
    }
}
