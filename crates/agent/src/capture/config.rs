//! What to capture: [`CaptureConfig`] and its parts, read from Istio's
//! environment names (the ones `cluster.env` carries) and from
//! `resolv.conf`. Parsing and validation only; no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Serialize, Serializer};

/// Istio's proxy user and group id.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Envoy's outbound capture port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Envoy's inbound capture port.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// The agent's DNS proxy port.
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// SSH: excluded from inbound capture whatever the configuration says.
pub const SSH_PORT: u16 = 22;
/// What `ISTIO_LOCAL_EXCLUDE_PORTS` means when unset: Envoy's Prometheus
/// stats, Envoy's readiness, the agent's metrics (SSH is added on top).
pub const DEFAULT_EXCLUDE_INBOUND_PORTS: [u16; 3] = [15090, 15021, 15020];

/// Inbound ports to capture (`*` or a comma-separated list).
pub const ENV_INBOUND_PORTS: &str = "ISTIO_INBOUND_PORTS";
/// Inbound ports never captured (comma-separated).
pub const ENV_LOCAL_EXCLUDE_PORTS: &str = "ISTIO_LOCAL_EXCLUDE_PORTS";
/// Outbound destinations to capture (`*` or comma-separated CIDRs).
pub const ENV_SERVICE_CIDR: &str = "ISTIO_SERVICE_CIDR";
/// Outbound destinations never captured (comma-separated CIDRs).
pub const ENV_SERVICE_EXCLUDE_CIDR: &str = "ISTIO_SERVICE_EXCLUDE_CIDR";
/// Outbound destination ports never captured (comma-separated).
pub const ENV_LOCAL_OUTBOUND_PORTS_EXCLUDE: &str = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE";
/// `true` to send DNS for the `resolv.conf` nameservers to the agent.
pub const ENV_DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
/// Only `REDIRECT` is supported.
pub const ENV_INTERCEPTION_MODE: &str = "ISTIO_INBOUND_INTERCEPTION_MODE";
/// Envoy's outbound capture port (istio-iptables' name).
pub const ENV_ENVOY_PORT: &str = "ENVOY_PORT";
/// Envoy's inbound capture port (istio-iptables' name).
pub const ENV_INBOUND_CAPTURE_PORT: &str = "INBOUND_CAPTURE_PORT";
/// The proxy's user id (istio-iptables' name).
pub const ENV_PROXY_UID: &str = "PROXY_UID";
/// The proxy's group id (istio-iptables' name).
pub const ENV_PROXY_GID: &str = "PROXY_GID";

/// Why a capture configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{var}={value:?}: only REDIRECT interception is supported (TPROXY is not)")]
    Unsupported { var: &'static str, value: String },
}

/// Ports to capture: all, or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    /// Every port (`*`), minus the exclusions.
    All,
    /// These ports only (minus the exclusions); empty captures nothing.
    List(Vec<u16>),
}

impl Ports {
    /// Parses `*` or a comma-separated list (blanks ignored).
    pub fn parse(text: &str) -> Result<Ports, String> {
        if text.split(',').any(|p| p.trim() == "*") {
            return Ok(Ports::All);
        }
        parse_ports(text).map(Ports::List)
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::All => f.write_str("*"),
            Ports::List(ports) => f.write_str(&join(ports)),
        }
    }
}

impl Serialize for Ports {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Destination networks: all, or a list of CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cidrs {
    /// Every destination (`*`).
    All,
    /// These networks only.
    List(Vec<IpNet>),
}

impl Cidrs {
    /// Parses `*` or comma-separated CIDRs (a bare address is a /32 or
    /// /128).
    pub fn parse(text: &str) -> Result<Cidrs, String> {
        if text.split(',').any(|p| p.trim() == "*") {
            return Ok(Cidrs::All);
        }
        parse_cidrs(text).map(Cidrs::List)
    }
}

impl fmt::Display for Cidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cidrs::All => f.write_str("*"),
            Cidrs::List(nets) => f.write_str(&join(nets)),
        }
    }
}

impl Serialize for Cidrs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// DNS capture: UDP and TCP to these nameservers on port 53 go to the
/// agent's DNS proxy on `127.0.0.1:port` (`[::1]` for IPv6), except the
/// proxy's own (the agent forwards to the same nameservers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsCapture {
    /// The `resolv.conf` nameservers; only DNS sent to these is captured.
    #[serde(serialize_with = "display_list")]
    pub nameservers: Vec<IpAddr>,
    /// The agent's DNS port.
    pub port: u16,
}

impl DnsCapture {
    /// Capture for `nameservers` to the default port 15053.
    pub fn new(nameservers: Vec<IpAddr>) -> DnsCapture {
        DnsCapture {
            nameservers,
            port: DEFAULT_DNS_PORT,
        }
    }
}

/// What istio-iptables is told on a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureConfig {
    /// The proxy's (Envoy's and the agent's) user id: its traffic is
    /// never captured.
    pub proxy_uid: u32,
    /// The proxy's group id, also never captured (Istio: same as the uid).
    pub proxy_gid: Option<u32>,
    /// Inbound ports sent to Envoy's inbound port.
    pub inbound_ports: Ports,
    /// Inbound ports never captured; SSH (22) is added whatever this says.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations never captured (checked first).
    #[serde(serialize_with = "display_list")]
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Outbound destinations sent to Envoy's outbound port.
    pub include_outbound_cidrs: Cidrs,
    /// Envoy's outbound capture port (15001).
    pub outbound_port: u16,
    /// Envoy's inbound capture port (15006).
    pub inbound_port: u16,
    /// DNS capture, when on.
    pub dns: Option<DnsCapture>,
}

impl Default for CaptureConfig {
    /// Istio's defaults: everything captured both ways except SSH and the
    /// mesh's own ports; no DNS capture.
    fn default() -> Self {
        CaptureConfig {
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: Some(DEFAULT_PROXY_UID),
            inbound_ports: Ports::All,
            exclude_inbound_ports: with_ssh(DEFAULT_EXCLUDE_INBOUND_PORTS.to_vec()),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_cidrs: Cidrs::All,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            dns: None,
        }
    }
}

impl CaptureConfig {
    /// Reads Istio's variables from `vars` (e.g. `cluster.env` or the
    /// process environment); unknown names are ignored:
    ///
    /// | variable | meaning | unset |
    /// |---|---|---|
    /// | `ISTIO_INBOUND_PORTS` | `*` or ports; empty = no inbound capture | `*` |
    /// | `ISTIO_LOCAL_EXCLUDE_PORTS` | inbound ports never captured (22 always added) | `15090,15021,15020` |
    /// | `ISTIO_SERVICE_CIDR` | `*` or CIDRs captured outbound (empty = `*`) | `*` |
    /// | `ISTIO_SERVICE_EXCLUDE_CIDR` | CIDRs never captured outbound | none |
    /// | `ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE` | outbound ports never captured | none |
    /// | `ISTIO_META_DNS_CAPTURE` | `true` turns DNS capture on | off |
    /// | `ISTIO_INBOUND_INTERCEPTION_MODE` | must be `REDIRECT` if set | `REDIRECT` |
    /// | `ENVOY_PORT`, `INBOUND_CAPTURE_PORT` | Envoy's capture ports | 15001, 15006 |
    /// | `PROXY_UID`, `PROXY_GID` | the proxy's ids | 1337, the uid |
    ///
    /// With DNS capture on, the nameservers are still to be filled in:
    /// see [`CaptureConfig::with_resolv_conf`].
    pub fn from_env<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self, ConfigError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().trim().to_string()))
            .collect();
        let get = |var: &'static str| vars.get(var).map(String::as_str);
        let mut config = CaptureConfig::default();

        if let Some(mode) = get(ENV_INTERCEPTION_MODE)
            && !mode.is_empty()
            && !mode.eq_ignore_ascii_case("REDIRECT")
        {
            return Err(ConfigError::Unsupported {
                var: ENV_INTERCEPTION_MODE,
                value: mode.to_string(),
            });
        }
        if let Some(value) = get(ENV_INBOUND_PORTS) {
            config.inbound_ports =
                Ports::parse(value).map_err(invalid(ENV_INBOUND_PORTS, value))?;
        }
        if let Some(value) = get(ENV_LOCAL_EXCLUDE_PORTS) {
            let ports = parse_ports(value).map_err(invalid(ENV_LOCAL_EXCLUDE_PORTS, value))?;
            config.exclude_inbound_ports = with_ssh(ports);
        }
        if let Some(value) = get(ENV_SERVICE_CIDR).filter(|v| !v.is_empty()) {
            config.include_outbound_cidrs =
                Cidrs::parse(value).map_err(invalid(ENV_SERVICE_CIDR, value))?;
        }
        if let Some(value) = get(ENV_SERVICE_EXCLUDE_CIDR) {
            config.exclude_outbound_cidrs =
                parse_cidrs(value).map_err(invalid(ENV_SERVICE_EXCLUDE_CIDR, value))?;
        }
        if let Some(value) = get(ENV_LOCAL_OUTBOUND_PORTS_EXCLUDE) {
            config.exclude_outbound_ports =
                parse_ports(value).map_err(invalid(ENV_LOCAL_OUTBOUND_PORTS_EXCLUDE, value))?;
        }
        if let Some(value) = get(ENV_DNS_CAPTURE)
            && parse_bool(value).map_err(invalid(ENV_DNS_CAPTURE, value))?
        {
            config.dns = Some(DnsCapture::new(Vec::new()));
        }
        if let Some(value) = get(ENV_ENVOY_PORT).filter(|v| !v.is_empty()) {
            config.outbound_port = parse_port(value).map_err(invalid(ENV_ENVOY_PORT, value))?;
        }
        if let Some(value) = get(ENV_INBOUND_CAPTURE_PORT).filter(|v| !v.is_empty()) {
            config.inbound_port =
                parse_port(value).map_err(invalid(ENV_INBOUND_CAPTURE_PORT, value))?;
        }
        if let Some(value) = get(ENV_PROXY_UID).filter(|v| !v.is_empty()) {
            config.proxy_uid = parse_id(value).map_err(invalid(ENV_PROXY_UID, value))?;
            config.proxy_gid = Some(config.proxy_uid);
        }
        if let Some(value) = get(ENV_PROXY_GID).filter(|v| !v.is_empty()) {
            config.proxy_gid = Some(parse_id(value).map_err(invalid(ENV_PROXY_GID, value))?);
        }
        Ok(config)
    }

    /// With DNS capture on, takes its nameservers from `resolv.conf`'s
    /// text (see [`parse_resolv_conf`]); otherwise unchanged.
    pub fn with_resolv_conf(mut self, resolv_conf: &str) -> Self {
        if let Some(dns) = &mut self.dns {
            dns.nameservers = parse_resolv_conf(resolv_conf);
        }
        self
    }

    /// The inbound ports never captured, SSH first, without duplicates.
    pub fn inbound_exclusions(&self) -> Vec<u16> {
        with_ssh(self.exclude_inbound_ports.clone())
    }
}

/// The `nameserver` addresses in a `resolv.conf` (see
/// [`crate::dns::ResolvConf::parse`]).
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    crate::dns::ResolvConf::parse(text).nameservers
}

fn with_ssh(ports: Vec<u16>) -> Vec<u16> {
    let mut out = vec![SSH_PORT];
    for port in ports {
        if !out.contains(&port) {
            out.push(port);
        }
    }
    out
}

fn invalid(var: &'static str, value: &str) -> impl FnOnce(String) -> ConfigError {
    let value = value.to_string();
    move |reason| ConfigError::Invalid { var, value, reason }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{text:?} is not a port (1-65535)")),
        Ok(port) => Ok(port),
    }
}

fn parse_ports(text: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let port = parse_port(item)?;
        if !out.contains(&port) {
            out.push(port);
        }
    }
    Ok(out)
}

fn parse_cidrs(text: &str) -> Result<Vec<IpNet>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let net = match IpNet::from_str(item) {
            Ok(net) => net.trunc(),
            Err(_) => match item.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => return Err(format!("{item:?} is not a CIDR")),
            },
        };
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

fn parse_id(text: &str) -> Result<u32, String> {
    text.parse::<u32>()
        .map_err(|_| format!("{text:?} is not a numeric id"))
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{text:?} is not true or false")),
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn display_list<T: fmt::Display, S: Serializer>(items: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(items.iter().map(ToString::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_istios() {
        let config = CaptureConfig::from_env(BTreeMap::<String, String>::new()).unwrap();
        assert_eq!(config, CaptureConfig::default());
        assert_eq!(config.proxy_uid, 1337);
        assert_eq!(config.proxy_gid, Some(1337));
        assert_eq!(config.inbound_ports, Ports::All);
        assert_eq!(config.exclude_inbound_ports, [22, 15090, 15021, 15020]);
        assert_eq!(config.include_outbound_cidrs, Cidrs::All);
        assert_eq!((config.outbound_port, config.inbound_port), (15001, 15006));
        assert_eq!(config.dns, None);
    }

    #[test]
    fn reads_istio_names() {
        let config = CaptureConfig::from_env([
            ("ISTIO_INBOUND_PORTS", "8080, 9090,8080"),
            ("ISTIO_LOCAL_EXCLUDE_PORTS", "15090,15021,15020,8081"),
            ("ISTIO_SERVICE_CIDR", "10.96.0.0/12,fd00::/108,192.168.1.7"),
            ("ISTIO_SERVICE_EXCLUDE_CIDR", "10.96.0.1/32"),
            ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "5432"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("PROXY_UID", "1500"),
            ("ISTIO_NAMESPACE", "ignored"),
        ])
        .unwrap()
        .with_resolv_conf(
            "# comment\nsearch svc.local\nnameserver 10.0.0.2\nnameserver fe80::1%eth0 # x\nnameserver 10.0.0.2\nnameserver bogus\n",
        );
        assert_eq!(config.inbound_ports, Ports::List(vec![8080, 9090]));
        assert_eq!(
            config.exclude_inbound_ports,
            [22, 15090, 15021, 15020, 8081]
        );
        assert_eq!(
            config.include_outbound_cidrs.to_string(),
            "10.96.0.0/12,fd00::/108,192.168.1.7/32"
        );
        assert_eq!(config.exclude_outbound_cidrs[0].to_string(), "10.96.0.1/32");
        assert_eq!(config.exclude_outbound_ports, [5432]);
        assert_eq!((config.proxy_uid, config.proxy_gid), (1500, Some(1500)));
        let dns = config.dns.unwrap();
        assert_eq!(dns.port, 15053);
        assert_eq!(
            dns.nameservers,
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn ssh_is_always_excluded_and_empty_means_none() {
        let config = CaptureConfig::from_env([
            ("ISTIO_INBOUND_PORTS", ""),
            ("ISTIO_LOCAL_EXCLUDE_PORTS", ""),
            ("ISTIO_SERVICE_CIDR", ""),
            ("ISTIO_META_DNS_CAPTURE", "false"),
        ])
        .unwrap();
        assert_eq!(config.inbound_ports, Ports::List(vec![]));
        assert_eq!(config.exclude_inbound_ports, [22]);
        assert_eq!(config.include_outbound_cidrs, Cidrs::All);
        assert_eq!(config.dns, None);
        let config = CaptureConfig {
            exclude_inbound_ports: vec![8080],
            ..CaptureConfig::default()
        };
        assert_eq!(config.inbound_exclusions(), [22, 8080]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("ISTIO_INBOUND_PORTS", "80,http"),
            ("ISTIO_LOCAL_EXCLUDE_PORTS", "70000"),
            ("ISTIO_SERVICE_CIDR", "10.0.0.0/33"),
            ("ISTIO_META_DNS_CAPTURE", "maybe"),
            ("PROXY_GID", "-1"),
        ] {
            let err = CaptureConfig::from_env([(var, value)])
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(var), "{err}");
        }
        let err =
            CaptureConfig::from_env([("ISTIO_INBOUND_INTERCEPTION_MODE", "TPROXY")]).unwrap_err();
        assert!(matches!(err, ConfigError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn serialises_for_a_config_dump() {
        let json = serde_json::to_value(CaptureConfig::default()).unwrap();
        assert_eq!(json["inbound_ports"], "*");
        assert_eq!(json["include_outbound_cidrs"], "*");
        assert_eq!(
            json["exclude_inbound_ports"],
            serde_json::json!([22, 15090, 15021, 15020])
        );
    }
}
