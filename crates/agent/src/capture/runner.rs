//! Running `iptables` / `ip6tables`: which backend (legacy or nft), where
//! (optionally inside a network namespace, through a command prefix such
//! as `ip netns exec NAME`), and an in-memory stand-in that records the
//! commands and keeps a nat table, for unit tests.
//!
//! This module decides nothing about rules ([`super::rules`] does).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;

use parking_lot::Mutex;

use super::CaptureError;
use super::rules::Family;

/// How long a command waits for the xtables lock (legacy backend).
const LOCK_WAIT_SECS: &str = "10";

/// Which iptables implementation the rules go through. The two keep
/// separate rule sets in the kernel, so apply and cleanup must use the
/// same one (see [`Runner::detect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `iptables-legacy` / `ip6tables-legacy` (x_tables).
    Legacy,
    /// `iptables-nft` / `ip6tables-nft` (nf_tables).
    Nft,
    /// Plain `iptables` / `ip6tables`: whatever the system points them at.
    System,
}

impl Backend {
    /// The command for `family`.
    pub fn binary(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Legacy, Family::V4) => "iptables-legacy",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy",
            (Backend::Nft, Family::V4) => "iptables-nft",
            (Backend::Nft, Family::V6) => "ip6tables-nft",
            (Backend::System, Family::V4) => "iptables",
            (Backend::System, Family::V6) => "ip6tables",
        }
    }

    /// Its `-save` command for `family`.
    pub fn save_binary(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Legacy, Family::V4) => "iptables-legacy-save",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-save",
            (Backend::Nft, Family::V4) => "iptables-nft-save",
            (Backend::Nft, Family::V6) => "ip6tables-nft-save",
            (Backend::System, Family::V4) => "iptables-save",
            (Backend::System, Family::V6) => "ip6tables-save",
        }
    }

    /// Whether its IPv4 command runs on this machine.
    pub fn installed(self) -> bool {
        Command::new(self.binary(Family::V4))
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
            Backend::System => "iptables",
        })
    }
}

impl FromStr for Backend {
    type Err = CaptureError;

    /// `legacy`, `nft`, or `iptables` (the system's default).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "legacy" | "iptables-legacy" => Ok(Backend::Legacy),
            "nft" | "nf_tables" | "iptables-nft" => Ok(Backend::Nft),
            "iptables" | "system" | "default" => Ok(Backend::System),
            _ => Err(CaptureError::UnknownBackend(s.to_string())),
        }
    }
}

/// Whether IPv6 rules are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ipv6 {
    /// When `ip6tables` works here (binary present, kernel nat table
    /// available); otherwise IPv4 only, with a warning.
    #[default]
    Auto,
    /// Always; failing when `ip6tables` does not work.
    Required,
    /// Never.
    Off,
}

/// The outcome of one command.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs iptables commands with one backend, optionally behind a command
/// prefix (e.g. inside a network namespace). Commands are blocking and
/// quick; from async code call [`super::apply`] in `spawn_blocking`.
#[derive(Debug, Clone)]
pub struct Runner {
    backend: Backend,
    prefix: Vec<OsString>,
    ipv6: Ipv6,
    exec: Exec,
}

#[derive(Debug, Clone)]
enum Exec {
    System,
    Memory(Arc<Mutex<Memory>>),
}

impl Runner {
    /// Real commands through `backend`.
    pub fn new(backend: Backend) -> Runner {
        Runner {
            backend,
            prefix: Vec::new(),
            ipv6: Ipv6::Auto,
            exec: Exec::System,
        }
    }

    /// Real commands through the backend this machine uses:
    /// 1. the one already holding our chains (so cleanup finds them);
    /// 2. else the one holding more rules (the one the system's other
    ///    tools use — both backends' rules run, but mixing them confuses);
    /// 3. else the one plain `iptables` is (`iptables --version`);
    /// 4. else whichever is installed (nft first), or plain `iptables`.
    pub fn detect() -> Result<Runner, CaptureError> {
        Runner::new(Backend::System).redetect()
    }

    /// [`Runner::detect`] inside network namespace `name`; commands run
    /// there too.
    pub fn detect_in_namespace(name: &str) -> Result<Runner, CaptureError> {
        Runner::new(Backend::System).in_namespace(name).redetect()
    }

    /// This runner (its prefix and IPv6 mode) with the backend chosen as
    /// [`Runner::detect`] says.
    pub fn redetect(mut self) -> Result<Runner, CaptureError> {
        self.backend = self.detect_backend()?;
        Ok(self)
    }

    /// Runs every command inside network namespace `name`
    /// (`ip netns exec NAME …`).
    pub fn in_namespace(self, name: &str) -> Runner {
        self.with_prefix(["ip", "netns", "exec", name])
    }

    /// Runs every command behind `prefix` (a command and its arguments).
    pub fn with_prefix<I, S>(mut self, prefix: I) -> Runner
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.prefix = prefix.into_iter().map(Into::into).collect();
        self
    }

    /// Sets whether IPv6 rules are applied.
    pub fn ipv6(mut self, mode: Ipv6) -> Runner {
        self.ipv6 = mode;
        self
    }

    /// An in-memory stand-in: no process is run; a nat table per family
    /// is kept in memory (starting empty, IPv6 available) and every
    /// command is recorded (see [`Runner::commands`]). For unit tests.
    pub fn in_memory() -> Runner {
        Runner {
            backend: Backend::System,
            prefix: Vec::new(),
            ipv6: Ipv6::Auto,
            exec: Exec::Memory(Arc::new(Mutex::new(Memory::default()))),
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The IPv6 mode.
    pub fn ipv6_mode(&self) -> Ipv6 {
        self.ipv6
    }

    /// The commands an in-memory runner was given (empty for a real one),
    /// one line each, e.g. `iptables -t nat -N ISTIO_INBOUND`.
    pub fn commands(&self) -> Vec<String> {
        match &self.exec {
            Exec::System => Vec::new(),
            Exec::Memory(memory) => memory.lock().log.clone(),
        }
    }

    /// Forgets the recorded commands of an in-memory runner.
    pub fn clear_commands(&self) {
        if let Exec::Memory(memory) = &self.exec {
            memory.lock().log.clear();
        }
    }

    /// Makes `ip6tables` of an in-memory runner fail, as on a machine
    /// without IPv6.
    pub fn without_ipv6_support(self) -> Runner {
        if let Exec::Memory(memory) = &self.exec {
            memory.lock().no_ipv6 = true;
        }
        self
    }

    /// `family`'s nat table as `iptables -t nat -S` prints it.
    pub fn list(&self, family: Family) -> Result<String, CaptureError> {
        self.must(family, &["-t", "nat", "-S"])
    }

    /// Runs `binary(family) -w … args`; a non-zero exit is an `Ok` reply.
    pub(crate) fn iptables(&self, family: Family, args: &[&str]) -> Result<Reply, CaptureError> {
        let mut full = vec!["-w", LOCK_WAIT_SECS];
        full.extend_from_slice(args);
        let binary = self.backend.binary(family);
        match &self.exec {
            Exec::System => {
                if !args.contains(&"-S") {
                    tracing::debug!(command = %command_line(binary, args), "capture");
                }
                self.spawn(binary, &full)
            }
            Exec::Memory(memory) => {
                let mut memory = memory.lock();
                memory.log.push(command_line(binary, args));
                Ok(memory.run(family, args))
            }
        }
    }

    /// Like [`Runner::iptables`], a non-zero exit being an error.
    pub(crate) fn must(&self, family: Family, args: &[&str]) -> Result<String, CaptureError> {
        let reply = self.iptables(family, args)?;
        if reply.ok() {
            Ok(reply.stdout)
        } else {
            Err(CaptureError::Failed {
                command: command_line(self.backend.binary(family), args),
                status: reply
                    .code
                    .map_or_else(|| "killed".to_string(), |c| format!("exit {c}")),
                stderr: reply.stderr.trim().to_string(),
            })
        }
    }

    fn spawn(&self, program: &str, args: &[&str]) -> Result<Reply, CaptureError> {
        let mut command = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = command.output().map_err(|source| CaptureError::Spawn {
            command: command_line(program, args),
            source,
        })?;
        Ok(Reply {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    fn detect_backend(&self) -> Result<Backend, CaptureError> {
        if let Exec::Memory(_) = self.exec {
            return Ok(self.backend);
        }
        let mut found = Vec::new();
        for backend in [Backend::Nft, Backend::Legacy] {
            if let Ok(reply) = self.spawn(backend.save_binary(Family::V4), &[])
                && reply.ok()
            {
                found.push((backend, reply.stdout));
            }
        }
        let system = self
            .spawn(Backend::System.binary(Family::V4), &["--version"])
            .ok()
            .filter(Reply::ok)
            .map(|r| r.stdout);
        let chosen = choose_backend(&found, system.as_deref())?;
        tracing::debug!(backend = %chosen, "capture: iptables backend");
        Ok(chosen)
    }
}

/// [`Runner::detect`]'s choice, given the `-save` output of each installed
/// backend and `iptables --version` (if it runs).
fn choose_backend(
    saves: &[(Backend, String)],
    system_version: Option<&str>,
) -> Result<Backend, CaptureError> {
    let ours = format!(":{} ", super::rules::ISTIO_OUTPUT);
    if let Some((backend, _)) = saves
        .iter()
        .find(|(_, save)| save.lines().any(|l| l.starts_with(&ours)))
    {
        return Ok(*backend);
    }
    let rules = |save: &str| save.lines().filter(|l| l.starts_with("-A ")).count();
    if let Some((backend, count)) = saves
        .iter()
        .map(|(b, save)| (*b, rules(save)))
        .max_by_key(|(_, count)| *count)
        && count > 0
    {
        return Ok(backend);
    }
    let installed = |b: Backend| saves.iter().any(|(found, _)| *found == b);
    if let Some(version) = system_version {
        if version.contains("legacy") && installed(Backend::Legacy) {
            return Ok(Backend::Legacy);
        }
        if version.contains("nf_tables") && installed(Backend::Nft) {
            return Ok(Backend::Nft);
        }
    }
    match saves.first() {
        Some((backend, _)) => Ok(*backend),
        None if system_version.is_some() => Ok(Backend::System),
        None => Err(CaptureError::NoIptables),
    }
}

/// A command line for messages and logs.
fn command_line(binary: &str, args: &[&str]) -> String {
    let mut out = binary.to_string();
    for arg in args {
        out.push(' ');
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            out.push_str(&format!("{arg:?}"));
        } else {
            out.push_str(arg);
        }
    }
    out
}

const BUILTIN: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// The in-memory nat tables: chains in creation order, rules as their
/// spec text.
#[derive(Debug, Default)]
struct Memory {
    tables: BTreeMap<Family, Vec<(String, Vec<String>)>>,
    log: Vec<String>,
    no_ipv6: bool,
}

impl Memory {
    fn run(&mut self, family: Family, args: &[&str]) -> Reply {
        let fail = |code: i32, message: String| Reply {
            code: Some(code),
            stdout: String::new(),
            stderr: message,
        };
        let ok = |stdout: String| Reply {
            code: Some(0),
            stdout,
            stderr: String::new(),
        };
        if family == Family::V6 && self.no_ipv6 {
            return fail(3, "can't initialize ip6tables table `nat'".into());
        }
        let table = self.tables.entry(family).or_insert_with(|| {
            BUILTIN
                .iter()
                .map(|c| (c.to_string(), Vec::new()))
                .collect()
        });
        let mut args = args;
        if let ["-t", "nat", rest @ ..] = args {
            args = rest;
        }
        let (op, chain, spec) = match args {
            [op] => (*op, None, String::new()),
            [op, chain, spec @ ..] => (*op, Some(chain.to_string()), spec.join(" ")),
            [] => return fail(2, "no command".into()),
        };
        let position = table.iter().position(|(c, _)| Some(c) == chain.as_ref());
        let target_missing = |table: &Vec<(String, Vec<String>)>| {
            let words: Vec<&str> = spec.split(' ').collect();
            words.windows(2).any(|w| {
                (w[0] == "-j" || w[0] == "-g")
                    && w[1].starts_with("ISTIO")
                    && !table.iter().any(|(c, _)| c == w[1])
            })
        };
        match (op, position) {
            ("-S", _) => {
                let mut out = String::new();
                for (name, _) in table.iter().filter(|(c, _)| BUILTIN.contains(&c.as_str())) {
                    out.push_str(&format!("-P {name} ACCEPT\n"));
                }
                for (name, _) in table.iter().filter(|(c, _)| !BUILTIN.contains(&c.as_str())) {
                    out.push_str(&format!("-N {name}\n"));
                }
                for (name, rules) in table.iter() {
                    for rule in rules {
                        out.push_str(&format!("-A {name} {rule}\n"));
                    }
                }
                ok(out)
            }
            ("-N", Some(_)) => fail(1, "iptables: Chain already exists.".into()),
            ("-N", None) => {
                table.push((chain.unwrap_or_default(), Vec::new()));
                ok(String::new())
            }
            (_, None) => fail(1, "iptables: No chain/target/match by that name.".into()),
            ("-F", Some(i)) => {
                table[i].1.clear();
                ok(String::new())
            }
            ("-X", Some(i)) => {
                let name = &table[i].0;
                let used = table.iter().any(|(_, rules)| {
                    rules.iter().any(|r| {
                        r.ends_with(&format!("-j {name}")) || r.contains(&format!("-j {name} "))
                    })
                });
                if BUILTIN.contains(&name.as_str()) || used || !table[i].1.is_empty() {
                    fail(1, "iptables: Directory not empty / Too many links.".into())
                } else {
                    table.remove(i);
                    ok(String::new())
                }
            }
            ("-A" | "-I" | "-C", Some(_)) if target_missing(table) => {
                fail(2, "Couldn't load target".into())
            }
            ("-A", Some(i)) => {
                table[i].1.push(spec);
                ok(String::new())
            }
            ("-I", Some(i)) => {
                table[i].1.insert(0, spec);
                ok(String::new())
            }
            ("-C", Some(i)) if table[i].1.contains(&spec) => ok(String::new()),
            ("-D", Some(i)) if table[i].1.contains(&spec) => {
                let at = table[i]
                    .1
                    .iter()
                    .position(|r| *r == spec)
                    .unwrap_or_default();
                table[i].1.remove(at);
                ok(String::new())
            }
            ("-C" | "-D", Some(_)) => fail(
                1,
                "iptables: Bad rule (does a matching rule exist in that chain?).".into(),
            ),
            _ => fail(2, format!("unsupported: {}", args.join(" "))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(rules: &str) -> String {
        format!("*nat\n:PREROUTING ACCEPT [0:0]\n{rules}COMMIT\n")
    }

    #[test]
    fn detection_prefers_our_chains_then_rules_then_the_system_default() {
        let nft_ours = [
            (Backend::Nft, save(":ISTIO_OUTPUT - [0:0]\n")),
            (
                Backend::Legacy,
                save("-A PREROUTING -j DOCKER\n-A OUTPUT -j X\n"),
            ),
        ];
        assert_eq!(choose_backend(&nft_ours, None).unwrap(), Backend::Nft);
        let legacy_rules = [
            (Backend::Nft, save("-A OUTPUT -j X\n")),
            (
                Backend::Legacy,
                save("-A PREROUTING -j DOCKER\n-A OUTPUT -j X\n"),
            ),
        ];
        assert_eq!(
            choose_backend(&legacy_rules, None).unwrap(),
            Backend::Legacy
        );
        let empty = [(Backend::Nft, save("")), (Backend::Legacy, String::new())];
        assert_eq!(
            choose_backend(&empty, Some("iptables v1.8.9 (legacy)")).unwrap(),
            Backend::Legacy
        );
        assert_eq!(
            choose_backend(&empty, Some("iptables v1.8.9 (nf_tables)")).unwrap(),
            Backend::Nft
        );
        assert_eq!(choose_backend(&empty, None).unwrap(), Backend::Nft);
        assert_eq!(
            choose_backend(&[], Some("iptables v1.6.1")).unwrap(),
            Backend::System
        );
        assert!(matches!(
            choose_backend(&[], None),
            Err(CaptureError::NoIptables)
        ));
    }

    #[test]
    fn backends_parse_and_name_their_binaries() {
        assert_eq!("legacy".parse::<Backend>().unwrap(), Backend::Legacy);
        assert_eq!("NFT".parse::<Backend>().unwrap(), Backend::Nft);
        assert_eq!("iptables".parse::<Backend>().unwrap(), Backend::System);
        assert!("ebtables".parse::<Backend>().is_err());
        assert_eq!(Backend::Nft.binary(Family::V6), "ip6tables-nft");
        assert_eq!(
            Backend::Legacy.save_binary(Family::V4),
            "iptables-legacy-save"
        );
    }

    #[test]
    fn in_memory_runner_behaves_like_iptables() {
        let runner = Runner::in_memory();
        let run = |args: &[&str]| runner.iptables(Family::V4, args).unwrap();
        assert!(run(&["-t", "nat", "-N", "ISTIO_X"]).ok());
        assert_eq!(run(&["-t", "nat", "-N", "ISTIO_X"]).code, Some(1));
        assert!(run(&["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_X"]).ok());
        assert_eq!(
            run(&["-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_NOPE"]).code,
            Some(2)
        );
        assert!(run(&["-t", "nat", "-C", "OUTPUT", "-p", "tcp", "-j", "ISTIO_X"]).ok());
        assert_eq!(run(&["-t", "nat", "-X", "ISTIO_X"]).code, Some(1));
        assert!(run(&["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "ISTIO_X"]).ok());
        assert_eq!(
            run(&["-t", "nat", "-C", "OUTPUT", "-p", "tcp", "-j", "ISTIO_X"]).code,
            Some(1)
        );
        assert!(run(&["-t", "nat", "-X", "ISTIO_X"]).ok());
        assert_eq!(
            runner.list(Family::V4).unwrap(),
            "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n"
        );
        assert_eq!(runner.commands()[0], "iptables -t nat -N ISTIO_X");
        let runner = Runner::in_memory().without_ipv6_support();
        assert!(runner.list(Family::V6).is_err());
    }
}
