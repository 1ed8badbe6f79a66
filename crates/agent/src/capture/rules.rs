//! The rules themselves: a [`CaptureConfig`] turned into istio-iptables'
//! nat-table layout for one address family, as text. Pure; running them is
//! [`super::apply`]'s.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::config::{CaptureConfig, Cidrs, Ports};

/// Inbound capture: `PREROUTING` jumps here for TCP.
pub const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
/// Inbound redirection to Envoy's inbound port.
pub const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
/// Outbound capture: `OUTPUT` jumps here for TCP.
pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
/// Outbound redirection to Envoy's outbound port.
pub const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
/// UDP DNS capture: `OUTPUT` jumps here for UDP to port 53.
pub const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";

/// Every chain this module may create, in creation order. Apply and
/// cleanup own exactly these (in the nat table).
pub const CHAINS: [&str; 5] = [
    ISTIO_INBOUND,
    ISTIO_REDIRECT,
    ISTIO_IN_REDIRECT,
    ISTIO_OUTPUT,
    ISTIO_OUTPUT_DNS,
];

/// Envoy's source address for inbound passthrough connections (its
/// traffic to the application must not be captured again).
const INBOUND_PASSTHROUGH_V4: &str = "127.0.0.6/32";
const INBOUND_PASSTHROUGH_V6: &str = "::6/128";
const DNS_PORT: &str = "53";
/// The agent's DNS forwarder marks its packets ([`crate::dns::FORWARD_MARK`],
/// written as iptables-save prints it): they go out, never back to the agent.
const DNS_FORWARDER_RETURNS: &[&str] = &["-m", "mark", "--mark", "0x539", "-j", "RETURN"];

/// An address family: which binary (`iptables` or `ip6tables`) and which
/// addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn contains(self, ip: IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One rule in the nat table: `-A <chain> <spec…>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(chain: &'static str, spec: &[&str]) -> Rule {
        Rule {
            chain,
            spec: spec.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn with(chain: &'static str, spec: Vec<String>) -> Rule {
        Rule { chain, spec }
    }

    /// The chain it jumps to (`-j`/`-g`), if any.
    pub fn target(&self) -> Option<&str> {
        self.spec
            .windows(2)
            .find(|w| w[0] == "-j" || w[0] == "-g")
            .map(|w| w[1].as_str())
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec.join(" "))
    }
}

/// The jumps from built-in chains into ours that apply may add: a fixed
/// list (independent of the configuration), so that cleanup knows exactly
/// what to remove without knowing what was applied.
pub fn jumps() -> [Rule; 3] {
    [
        Rule::new("PREROUTING", &["-p", "tcp", "-j", ISTIO_INBOUND]),
        Rule::new("OUTPUT", &["-p", "tcp", "-j", ISTIO_OUTPUT]),
        Rule::new(
            "OUTPUT",
            &["-p", "udp", "--dport", DNS_PORT, "-j", ISTIO_OUTPUT_DNS],
        ),
    ]
}

/// What apply makes of one family's nat table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub family: Family,
    /// Our chains, created (or flushed) in this order.
    pub chains: Vec<&'static str>,
    /// Their contents, appended in this order.
    pub rules: Vec<Rule>,
    /// Jumps from built-in chains, added when missing (a subset of
    /// [`jumps`]); the other known jumps are removed.
    pub jumps: Vec<Rule>,
}

impl Plan {
    /// iptables-save style: `-N` lines, our chains' rules, then the jumps.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for chain in &self.chains {
            out.push_str(&format!("-N {chain}\n"));
        }
        for rule in self.rules.iter().chain(&self.jumps) {
            out.push_str(&format!("{rule}\n"));
        }
        out
    }
}

/// istio-iptables' layout for `config` in `family`'s nat table.
///
/// Inbound (`PREROUTING -p tcp -j ISTIO_INBOUND`, left out when no port is
/// captured): the excluded ports (SSH first) `RETURN`, then either every
/// other port or the listed ones go to `ISTIO_IN_REDIRECT`
/// (`REDIRECT --to-ports 15006`).
///
/// Outbound (`OUTPUT -p tcp -j ISTIO_OUTPUT`), in order: excluded ports
/// return; Envoy's inbound passthrough (from `127.0.0.6` on `lo`) returns;
/// the proxy calling a local address other than 127.0.0.1 goes to
/// `ISTIO_IN_REDIRECT` (so inbound policy applies); anyone else's loopback
/// traffic returns; the proxy's own traffic returns (for the uid, then the
/// gid); TCP DNS to the nameservers goes to the agent; `127.0.0.1`
/// returns; excluded CIDRs return; included CIDRs (or everything) go to
/// `ISTIO_REDIRECT` (`REDIRECT --to-ports 15001`).
///
/// DNS (`OUTPUT -p udp --dport 53 -j ISTIO_OUTPUT_DNS`, only with
/// nameservers of this family): the proxy's own queries and the agent's
/// forwarded ones (marked) return, queries to the nameservers are
/// redirected to the agent's port. The marked ones return in
/// `ISTIO_OUTPUT` too, before TCP DNS is redirected.
pub fn plan(config: &CaptureConfig, family: Family) -> Plan {
    let uid = config.proxy_uid.to_string();
    let gid = config.proxy_gid.map(|g| g.to_string());
    let loopback = family.loopback();
    let nameservers: Vec<String> = config
        .dns
        .iter()
        .flat_map(|dns| &dns.nameservers)
        .filter(|ip| family.contains(**ip))
        .map(|ip| format!("{ip}/{}", family.host_prefix()))
        .collect();
    let dns_port = config.dns.as_ref().map(|d| d.port.to_string());
    let capture_dns = !nameservers.is_empty();
    let in_family = |nets: &[IpNet]| -> Vec<String> {
        nets.iter()
            .filter(|n| family.contains(n.addr()))
            .map(|n| n.trunc().to_string())
            .collect()
    };

    let mut rules = vec![
        Rule::new(
            ISTIO_IN_REDIRECT,
            &[
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &config.inbound_port.to_string(),
            ],
        ),
        Rule::new(
            ISTIO_REDIRECT,
            &[
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &config.outbound_port.to_string(),
            ],
        ),
    ];

    // Inbound.
    let exclusions = config.inbound_exclusions();
    let captured: Option<Vec<u16>> = match &config.inbound_ports {
        Ports::All => None,
        Ports::List(ports) => Some(
            ports
                .iter()
                .copied()
                .filter(|p| !exclusions.contains(p))
                .collect(),
        ),
    };
    let inbound = captured.as_ref().is_none_or(|ports| !ports.is_empty());
    if inbound {
        for port in &exclusions {
            rules.push(Rule::new(
                ISTIO_INBOUND,
                &["-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"],
            ));
        }
        match &captured {
            None => rules.push(Rule::new(
                ISTIO_INBOUND,
                &["-p", "tcp", "-j", ISTIO_IN_REDIRECT],
            )),
            Some(ports) => {
                for port in ports {
                    rules.push(Rule::new(
                        ISTIO_INBOUND,
                        &[
                            "-p",
                            "tcp",
                            "--dport",
                            &port.to_string(),
                            "-j",
                            ISTIO_IN_REDIRECT,
                        ],
                    ));
                }
            }
        }
    }

    // Outbound.
    for port in &config.exclude_outbound_ports {
        rules.push(Rule::new(
            ISTIO_OUTPUT,
            &["-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"],
        ));
    }
    let passthrough = match family {
        Family::V4 => INBOUND_PASSTHROUGH_V4,
        Family::V6 => INBOUND_PASSTHROUGH_V6,
    };
    rules.push(Rule::new(
        ISTIO_OUTPUT,
        &["-s", passthrough, "-o", "lo", "-j", "RETURN"],
    ));
    // With DNS capture, loopback DNS (a local resolver such as
    // 127.0.0.53) must reach the DNS rules below.
    let not_dns: &[&str] = if capture_dns {
        &["-p", "tcp", "!", "--dport", DNS_PORT]
    } else {
        &[]
    };
    let owners: Vec<(&str, &str)> = std::iter::once(("--uid-owner", uid.as_str()))
        .chain(gid.as_deref().map(|g| ("--gid-owner", g)))
        .collect();
    for (flag, id) in &owners {
        let mut spec: Vec<&str> = vec!["-o", "lo", "!", "-d", loopback];
        spec.extend_from_slice(not_dns);
        spec.extend_from_slice(&["-m", "owner", flag, id, "-j", ISTIO_IN_REDIRECT]);
        rules.push(Rule::new(ISTIO_OUTPUT, &spec));
        let mut spec: Vec<&str> = vec!["-o", "lo"];
        spec.extend_from_slice(not_dns);
        spec.extend_from_slice(&["-m", "owner", "!", flag, id, "-j", "RETURN"]);
        rules.push(Rule::new(ISTIO_OUTPUT, &spec));
        rules.push(Rule::new(
            ISTIO_OUTPUT,
            &["-m", "owner", flag, id, "-j", "RETURN"],
        ));
    }
    if let Some(dns_port) = &dns_port {
        if capture_dns {
            rules.push(Rule::new(ISTIO_OUTPUT, DNS_FORWARDER_RETURNS));
        }
        for ns in &nameservers {
            rules.push(Rule::new(
                ISTIO_OUTPUT,
                &[
                    "-d",
                    ns,
                    "-p",
                    "tcp",
                    "--dport",
                    DNS_PORT,
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    dns_port,
                ],
            ));
        }
    }
    rules.push(Rule::new(ISTIO_OUTPUT, &["-d", loopback, "-j", "RETURN"]));
    for net in in_family(&config.exclude_outbound_cidrs) {
        rules.push(Rule::with(
            ISTIO_OUTPUT,
            vec!["-d".into(), net, "-j".into(), "RETURN".into()],
        ));
    }
    match &config.include_outbound_cidrs {
        Cidrs::All => rules.push(Rule::new(ISTIO_OUTPUT, &["-j", ISTIO_REDIRECT])),
        Cidrs::List(nets) => {
            for net in in_family(nets) {
                rules.push(Rule::with(
                    ISTIO_OUTPUT,
                    vec!["-d".into(), net, "-j".into(), ISTIO_REDIRECT.into()],
                ));
            }
        }
    }

    // UDP DNS.
    let mut chains = vec![
        ISTIO_INBOUND,
        ISTIO_REDIRECT,
        ISTIO_IN_REDIRECT,
        ISTIO_OUTPUT,
    ];
    if let (true, Some(dns_port)) = (capture_dns, &dns_port) {
        chains.push(ISTIO_OUTPUT_DNS);
        for (flag, id) in &owners {
            rules.push(Rule::new(
                ISTIO_OUTPUT_DNS,
                &["-m", "owner", flag, id, "-j", "RETURN"],
            ));
        }
        rules.push(Rule::new(ISTIO_OUTPUT_DNS, DNS_FORWARDER_RETURNS));
        for ns in &nameservers {
            rules.push(Rule::new(
                ISTIO_OUTPUT_DNS,
                &[
                    "-d",
                    ns,
                    "-p",
                    "udp",
                    "--dport",
                    DNS_PORT,
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    dns_port,
                ],
            ));
        }
    }
    // Chains in creation order, rules grouped by chain in that order.
    rules.sort_by_key(|r| chains.iter().position(|c| *c == r.chain));

    let [prerouting, output, output_dns] = jumps();
    let mut wanted = Vec::new();
    if inbound {
        wanted.push(prerouting);
    }
    wanted.push(output);
    if capture_dns {
        wanted.push(output_dns);
    }
    Plan {
        family,
        chains,
        rules,
        jumps: wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::DnsCapture;
    use super::*;

    const DEFAULT_V4: &str = "\
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
";

    #[test]
    fn defaults_render_istios_layout() {
        let plan = plan(&CaptureConfig::default(), Family::V4);
        assert_eq!(plan.render(), DEFAULT_V4);
        let v6 = super::plan(&CaptureConfig::default(), Family::V6).render();
        assert_eq!(
            v6,
            DEFAULT_V4
                .replace("127.0.0.6/32", "::6/128")
                .replace("127.0.0.1/32", "::1/128")
        );
    }

    #[test]
    fn dns_capture_redirects_only_the_nameservers_and_never_the_proxy() {
        let config = CaptureConfig {
            dns: Some(DnsCapture::new(vec![
                "10.0.0.2".parse().unwrap(),
                "fd00::53".parse().unwrap(),
            ])),
            proxy_gid: None,
            ..CaptureConfig::default()
        };
        let v4 = plan(&config, Family::V4).render();
        let expected_output = "\
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 53 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m mark --mark 0x539 -j RETURN
-A ISTIO_OUTPUT -d 10.0.0.2/32 -p tcp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_OUTPUT_DNS -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT_DNS -m mark --mark 0x539 -j RETURN
-A ISTIO_OUTPUT_DNS -d 10.0.0.2/32 -p udp --dport 53 -j REDIRECT --to-ports 15053
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A OUTPUT -p udp --dport 53 -j ISTIO_OUTPUT_DNS
";
        assert!(v4.ends_with(expected_output), "{v4}");
        assert!(v4.contains("-N ISTIO_OUTPUT_DNS\n"));
        let v6 = plan(&config, Family::V6).render();
        assert!(v6.contains("-A ISTIO_OUTPUT_DNS -d fd00::53/128 -p udp --dport 53 -j REDIRECT --to-ports 15053\n"), "{v6}");
        assert!(!v6.contains("10.0.0.2"));

        // No nameserver of a family: no DNS rules there at all.
        let config = CaptureConfig {
            dns: Some(DnsCapture::new(vec!["10.0.0.2".parse().unwrap()])),
            ..CaptureConfig::default()
        };
        let v6 = plan(&config, Family::V6);
        assert!(!v6.chains.contains(&ISTIO_OUTPUT_DNS));
        assert!(!v6.render().contains("53"), "{}", v6.render());
    }

    #[test]
    fn listed_inbound_ports_skip_ssh_and_exclusions() {
        let config = CaptureConfig {
            inbound_ports: Ports::List(vec![22, 8080, 15020, 9000]),
            ..CaptureConfig::default()
        };
        let text = plan(&config, Family::V4).render();
        let inbound: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A ISTIO_INBOUND"))
            .collect();
        assert_eq!(
            inbound,
            [
                "-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
                "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT",
                "-A ISTIO_INBOUND -p tcp --dport 9000 -j ISTIO_IN_REDIRECT",
            ]
        );
        // Nothing to capture inbound: no PREROUTING jump, nothing redirected.
        for ports in [vec![], vec![22, 15021]] {
            let config = CaptureConfig {
                inbound_ports: Ports::List(ports),
                ..CaptureConfig::default()
            };
            let plan = plan(&config, Family::V4);
            assert!(!plan.render().contains("-A ISTIO_INBOUND"));
            assert!(plan.jumps.iter().all(|j| j.chain != "PREROUTING"));
        }
    }

    #[test]
    fn outbound_cidrs_and_ports_by_family() {
        let config = CaptureConfig {
            include_outbound_cidrs: Cidrs::List(vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00::/108".parse().unwrap(),
            ]),
            exclude_outbound_cidrs: vec![
                "10.96.0.1/32".parse().unwrap(),
                "169.254.0.0/16".parse().unwrap(),
            ],
            exclude_outbound_ports: vec![5432],
            ..CaptureConfig::default()
        };
        let v4 = plan(&config, Family::V4).render();
        assert!(
            v4.contains("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN\n-A ISTIO_OUTPUT -s 127.0.0.6/32"),
            "{v4}"
        );
        assert!(
            v4.ends_with(
                "\
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -d 10.96.0.1/32 -j RETURN
-A ISTIO_OUTPUT -d 169.254.0.0/16 -j RETURN
-A ISTIO_OUTPUT -d 10.96.0.0/12 -j ISTIO_REDIRECT
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
"
            ),
            "{v4}"
        );
        let v6 = plan(&config, Family::V6).render();
        assert!(v6.contains("-A ISTIO_OUTPUT -d ::1/128 -j RETURN\n-A ISTIO_OUTPUT -d fd00::/108 -j ISTIO_REDIRECT\n"), "{v6}");
        assert!(!v6.contains("10.96"));
    }

    #[test]
    fn custom_ids_and_ports() {
        let config = CaptureConfig {
            proxy_uid: 999,
            proxy_gid: None,
            outbound_port: 16001,
            inbound_port: 16006,
            ..CaptureConfig::default()
        };
        let text = plan(&config, Family::V4).render();
        assert!(text.contains("--to-ports 16001") && text.contains("--to-ports 16006"));
        assert!(text.contains("--uid-owner 999 -j RETURN"));
        assert!(!text.contains("gid-owner") && !text.contains("1337"));
    }
}
