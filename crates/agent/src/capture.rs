//! Traffic capture on a VM — what istio-iptables does, through the
//! `iptables` / `ip6tables` commands (legacy or nft backend): Istio's
//! chains in the nat table send inbound TCP to Envoy's port 15006 and
//! outbound TCP to 15001, never the proxy's own traffic (uid/gid 1337),
//! never SSH or the excluded ports, and, with DNS capture on, DNS for the
//! `resolv.conf` nameservers to the agent's DNS proxy on 15053.
//!
//! This module owns:
//! - [`CaptureConfig`] ([`config`]): what to capture, from Istio's
//!   environment names (`cluster.env`);
//! - [`rules`]: the rule layout for a configuration, as text;
//! - [`Runner`] ([`runner`]): running the commands, choosing the backend,
//!   inside a network namespace if asked, or in memory for tests;
//! - [`apply`] and [`cleanup`]: idempotent; cleanup removes exactly what
//!   apply may add (the chains in [`rules::CHAINS`] and the jumps in
//!   [`rules::jumps`]) and nothing else.
//!
//! It does not own the DNS proxy or Envoy (it only points traffic at
//! their ports), deciding when to capture (the `vmesh agent` command
//! does), nor privileges (applying needs `CAP_NET_ADMIN`).
//!
//! Rules are changed one command at a time, not atomically: while an
//! apply rewrites our chains, a new connection may pass uncaptured.
//! With the nft backend, the nat table's (empty) built-in chains stay in
//! nf_tables after cleanup, as iptables-nft creates them on first use;
//! `iptables-save` shows the table exactly as before.
//!
//! ```no_run
//! use vmesh_agent::capture::{self, CaptureConfig, Runner};
//!
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let env = std::fs::read_to_string("/var/lib/istio/envoy/cluster.env")?;
//! let vars = env.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k, v.trim_matches('\'')));
//! let config = CaptureConfig::from_env(vars)?
//!     .with_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf")?);
//! let runner = Runner::detect()?;
//! capture::apply(&config, &runner)?;
//! // … and on the way out:
//! capture::cleanup(&runner)?;
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod rules;
pub mod runner;

use std::collections::BTreeSet;

pub use config::{CaptureConfig, Cidrs, ConfigError, DnsCapture, Ports, parse_resolv_conf};
pub use rules::{Family, Plan, Rule, plan};
pub use runner::{Backend, Ipv6, Runner};

/// Why capture could not be applied or removed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("no iptables found: install the iptables package")]
    NoIptables,
    #[error("unknown iptables backend {0:?} (legacy, nft or iptables)")]
    UnknownBackend(String),
    #[error("IPv6 capture is required but ip6tables does not work here: {0}")]
    Ipv6Unavailable(Box<CaptureError>),
    #[error(
        "{family} chain {chain} is still used by a rule vmesh did not add (`{rule}`): \
         remove that rule, then clean up again; the chain was left in place"
    )]
    ForeignReference {
        family: Family,
        chain: String,
        rule: String,
    },
    #[error("`{command}` keeps matching after deletion")]
    Stuck { command: String },
}

/// Applies `config`: afterwards the nat table holds Istio's chains with
/// exactly the rules [`plan`] gives, and the jumps into them. Applying
/// again (with the same or another configuration) leaves the same state
/// as applying once: our chains are flushed and refilled, jumps added only
/// when missing, and jumps and chains the configuration no longer needs
/// removed. IPv6 as the runner's [`Ipv6`] mode says.
///
/// Returns the families where capture is now in place.
pub fn apply(config: &CaptureConfig, runner: &Runner) -> Result<Vec<Family>, CaptureError> {
    let mut applied = Vec::new();
    for (family, listing) in families(runner)? {
        apply_family(config, runner, family, &listing)?;
        applied.push(family);
    }
    tracing::info!(backend = %runner.backend(), families = ?applied, "traffic capture applied");
    Ok(applied)
}

/// Removes every rule and chain [`apply`] may have added, in every family
/// the runner covers; rules and chains it did not add are untouched.
/// Nothing applied is fine. Fails (leaving the chain) when a rule vmesh did
/// not add still jumps into one of its chains.
///
/// Returns the families that were checked.
pub fn cleanup(runner: &Runner) -> Result<Vec<Family>, CaptureError> {
    let mut cleaned = Vec::new();
    for (family, listing) in families(runner)? {
        let ours: Vec<&'static str> = rules::CHAINS
            .into_iter()
            .filter(|c| listing.chains.contains(*c))
            .collect();
        if !ours.is_empty() {
            for jump in rules::jumps() {
                if jump.target().is_some_and(|t| ours.contains(&t)) {
                    delete_all(runner, family, &jump)?;
                }
            }
            remove_chains(runner, family, &ours)?;
        }
        cleaned.push(family);
    }
    tracing::info!(backend = %runner.backend(), families = ?cleaned, "traffic capture removed");
    Ok(cleaned)
}

/// The families to work on, each with its current nat table: IPv4 always,
/// IPv6 as the runner's mode says.
fn families(runner: &Runner) -> Result<Vec<(Family, Listing)>, CaptureError> {
    let mut out = vec![(Family::V4, Listing::parse(&runner.list(Family::V4)?))];
    match runner.ipv6_mode() {
        Ipv6::Off => {}
        Ipv6::Auto => match runner.list(Family::V6) {
            Ok(text) => out.push((Family::V6, Listing::parse(&text))),
            Err(e) => tracing::warn!("IPv6 capture skipped: {e}"),
        },
        Ipv6::Required => {
            let text = runner
                .list(Family::V6)
                .map_err(|e| CaptureError::Ipv6Unavailable(Box::new(e)))?;
            out.push((Family::V6, Listing::parse(&text)));
        }
    }
    Ok(out)
}

fn apply_family(
    config: &CaptureConfig,
    runner: &Runner,
    family: Family,
    listing: &Listing,
) -> Result<(), CaptureError> {
    let plan = plan(config, family);
    for jump in rules::jumps() {
        if !plan.jumps.contains(&jump) && jump.target().is_some_and(|t| listing.chains.contains(t))
        {
            delete_all(runner, family, &jump)?;
        }
    }
    for chain in &plan.chains {
        let op = if listing.chains.contains(*chain) {
            "-F"
        } else {
            "-N"
        };
        runner.must(family, &["-t", "nat", op, chain])?;
    }
    for rule in &plan.rules {
        append(runner, family, rule)?;
    }
    for jump in &plan.jumps {
        if !exists(runner, family, jump)? {
            append(runner, family, jump)?;
        }
    }
    let stale: Vec<&'static str> = rules::CHAINS
        .into_iter()
        .filter(|c| !plan.chains.contains(c) && listing.chains.contains(*c))
        .collect();
    if !stale.is_empty() {
        remove_chains(runner, family, &stale)?;
    }
    Ok(())
}

/// Flushes and deletes `chains` (ours, no longer jumped to by our jumps),
/// after checking that no rule outside our chains still uses them.
fn remove_chains(
    runner: &Runner,
    family: Family,
    chains: &[&'static str],
) -> Result<(), CaptureError> {
    let listing = Listing::parse(&runner.list(family)?);
    for (chain, line) in &listing.rules {
        if rules::CHAINS.contains(&chain.as_str()) {
            continue;
        }
        if let Some(target) = target(line)
            && chains.contains(&target)
        {
            return Err(CaptureError::ForeignReference {
                family,
                chain: target.to_string(),
                rule: line.clone(),
            });
        }
    }
    for chain in chains {
        runner.must(family, &["-t", "nat", "-F", chain])?;
    }
    for chain in chains {
        runner.must(family, &["-t", "nat", "-X", chain])?;
    }
    Ok(())
}

fn rule_args<'a>(op: &'a str, rule: &'a Rule) -> Vec<&'a str> {
    let mut args = vec!["-t", "nat", op, rule.chain];
    args.extend(rule.spec.iter().map(String::as_str));
    args
}

fn append(runner: &Runner, family: Family, rule: &Rule) -> Result<(), CaptureError> {
    runner.must(family, &rule_args("-A", rule)).map(drop)
}

/// Whether `rule` is in place (`-C`: exit 1 means absent).
fn exists(runner: &Runner, family: Family, rule: &Rule) -> Result<bool, CaptureError> {
    let args = rule_args("-C", rule);
    let reply = runner.iptables(family, &args)?;
    match reply.code {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => runner.must(family, &args).map(|_| true),
    }
}

/// Deletes every copy of `rule`.
fn delete_all(runner: &Runner, family: Family, rule: &Rule) -> Result<(), CaptureError> {
    for _ in 0..64 {
        if !exists(runner, family, rule)? {
            return Ok(());
        }
        runner.must(family, &rule_args("-D", rule))?;
    }
    Err(CaptureError::Stuck {
        command: format!("{} {}", family, rule),
    })
}

/// The target of an `-A` line (`-j X` or `-g X`).
fn target(line: &str) -> Option<&str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "-j" || w[0] == "-g")
        .map(|w| w[1])
}

/// A nat table as `iptables -S` lists it.
#[derive(Debug, Default)]
struct Listing {
    /// User-defined chains.
    chains: BTreeSet<String>,
    /// `(chain, whole line)` for every rule.
    rules: Vec<(String, String)>,
}

impl Listing {
    fn parse(text: &str) -> Listing {
        let mut listing = Listing::default();
        for line in text.lines().map(str::trim) {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("-N"), Some(chain)) => {
                    listing.chains.insert(chain.to_string());
                }
                (Some("-A"), Some(chain)) => {
                    listing.rules.push((chain.to_string(), line.to_string()));
                }
                _ => {}
            }
        }
        listing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns_config() -> CaptureConfig {
        CaptureConfig {
            dns: Some(DnsCapture::new(vec![
                "10.0.0.2".parse().unwrap(),
                "fd00::53".parse().unwrap(),
            ])),
            ..CaptureConfig::default()
        }
    }

    fn tables(runner: &Runner) -> (String, String) {
        (
            runner.list(Family::V4).unwrap(),
            runner.list(Family::V6).unwrap(),
        )
    }

    #[test]
    fn first_apply_runs_the_plan_as_commands() {
        let runner = Runner::in_memory();
        assert_eq!(
            apply(&CaptureConfig::default(), &runner).unwrap(),
            [Family::V4, Family::V6]
        );
        let commands = runner.commands();
        let v4: Vec<&str> = commands
            .iter()
            .map(String::as_str)
            .filter(|c| c.starts_with("iptables "))
            .collect();
        assert_eq!(v4[0], "iptables -t nat -S");
        assert_eq!(v4[1], "iptables -t nat -N ISTIO_INBOUND");
        assert!(v4.contains(&"iptables -t nat -A ISTIO_INBOUND -p tcp --dport 22 -j RETURN"));
        assert!(v4.contains(&"iptables -t nat -C OUTPUT -p tcp -j ISTIO_OUTPUT"));
        assert_eq!(
            v4.last(),
            Some(&"iptables -t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT")
        );
        let listed = runner.list(Family::V4).unwrap();
        let expected = plan(&CaptureConfig::default(), Family::V4).render();
        for line in expected.lines() {
            assert!(listed.contains(line), "{line} missing from\n{listed}");
        }
    }

    #[test]
    fn apply_twice_is_apply_once_and_cleanup_restores() {
        let runner = Runner::in_memory();
        for args in [
            [
                "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "RETURN",
            ],
            [
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "9",
                "-j",
                "RETURN",
            ],
        ] {
            runner.must(Family::V4, &args).unwrap();
        }
        let before = tables(&runner);
        apply(&dns_config(), &runner).unwrap();
        let once = tables(&runner);
        apply(&dns_config(), &runner).unwrap();
        assert_eq!(tables(&runner), once);
        // The jumps were not added again.
        assert_eq!(once.0.matches("-j ISTIO_OUTPUT\n").count(), 1);
        cleanup(&runner).unwrap();
        assert_eq!(tables(&runner), before);
        runner.clear_commands();
        cleanup(&runner).unwrap();
        assert_eq!(tables(&runner), before);
        // Nothing applied: only listings.
        assert!(
            runner.commands().iter().all(|c| c.ends_with(" -S")),
            "{:?}",
            runner.commands()
        );
    }

    #[test]
    fn reapplying_drops_what_the_new_config_does_not_need() {
        let fresh = Runner::in_memory();
        let config = CaptureConfig {
            inbound_ports: Ports::List(vec![]),
            ..CaptureConfig::default()
        };
        apply(&config, &fresh).unwrap();
        let runner = Runner::in_memory();
        apply(&dns_config(), &runner).unwrap();
        apply(&config, &runner).unwrap();
        assert_eq!(tables(&runner), tables(&fresh));
        assert!(!tables(&runner).0.contains("ISTIO_OUTPUT_DNS"));
        assert!(!tables(&runner).0.contains("-A PREROUTING"));
    }

    #[test]
    fn cleanup_refuses_while_a_foreign_rule_uses_our_chain() {
        let runner = Runner::in_memory();
        apply(&CaptureConfig::default(), &runner).unwrap();
        runner
            .must(
                Family::V4,
                &["-t", "nat", "-A", "INPUT", "-j", "ISTIO_REDIRECT"],
            )
            .unwrap();
        let err = cleanup(&runner).unwrap_err();
        assert!(
            matches!(&err, CaptureError::ForeignReference { chain, .. } if chain == "ISTIO_REDIRECT"),
            "{err}"
        );
        // The foreign rule is untouched.
        assert!(
            runner
                .list(Family::V4)
                .unwrap()
                .contains("-A INPUT -j ISTIO_REDIRECT")
        );
    }

    #[test]
    fn ipv6_modes() {
        let runner = Runner::in_memory().without_ipv6_support();
        assert_eq!(
            apply(&CaptureConfig::default(), &runner).unwrap(),
            [Family::V4]
        );
        assert_eq!(cleanup(&runner).unwrap(), [Family::V4]);
        let runner = runner.ipv6(Ipv6::Required);
        assert!(matches!(
            apply(&CaptureConfig::default(), &runner),
            Err(CaptureError::Ipv6Unavailable(_))
        ));
        let runner = Runner::in_memory().ipv6(Ipv6::Off);
        assert_eq!(
            apply(&CaptureConfig::default(), &runner).unwrap(),
            [Family::V4]
        );
        assert!(
            runner
                .commands()
                .iter()
                .all(|c| !c.starts_with("ip6tables"))
        );
    }
}
