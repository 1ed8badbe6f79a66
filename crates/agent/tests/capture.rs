//! Traffic capture with the real `iptables` / `ip6tables`, inside network
//! namespaces these tests create (and delete): the rules `iptables-save`
//! shows, idempotence, clean-up to the byte, backend detection, and real
//! connections being redirected (or not). Every test runs once per
//! installed backend (iptables-legacy, iptables-nft), each in fresh
//! namespaces; nothing outside them is touched.
//!
//! These tests need root (`ip netns add`) and fail without it.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use vmesh_agent::capture::{
    self, Backend, CaptureConfig, CaptureError, DnsCapture, Family, Ipv6, Ports, Runner,
};
use vmesh_testkit::Namespace;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace for the test's lifetime (the test kit's: it ends
/// the processes started in it), named after `tag`.
fn netns(tag: &str) -> Namespace {
    Namespace::new(&format!(
        "vmcap-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// What these tests do in a namespace.
trait Capture {
    fn runner(&self, backend: Backend) -> Runner;
    fn save(&self, backend: Backend, family: Family) -> String;
    fn saves(&self, backend: Backend) -> (String, String);
    fn iptables(&self, backend: Backend, family: Family, args: &str);
    fn serve(&self, specs: &[&str]);
    fn probe(&self, probes: &[Probe]) -> Vec<String>;
}

impl Capture for Namespace {
    fn runner(&self, backend: Backend) -> Runner {
        Runner::new(backend).in_namespace(self.name())
    }

    /// The nat table as `<backend>-save -t nat` prints it, without
    /// comments and counters.
    fn save(&self, backend: Backend, family: Family) -> String {
        normalize(&self.run(&[backend.save_binary(family), "-t", "nat"]))
    }

    fn saves(&self, backend: Backend) -> (String, String) {
        (
            self.save(backend, Family::V4),
            if ipv6(backend) {
                self.save(backend, Family::V6)
            } else {
                String::new()
            },
        )
    }

    fn iptables(&self, backend: Backend, family: Family, args: &str) {
        let mut all = vec![backend.binary(family), "-t", "nat"];
        all.extend(args.split_whitespace());
        self.run(&all);
    }

    /// Starts the test server (see [`SERVER`]) listening on `specs`.
    fn serve(&self, specs: &[&str]) {
        let mut args = vec![python(), "-u", "-c", SERVER];
        args.extend_from_slice(specs);
        let mut child = self
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.adopt(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "test server in {} did not start",
            self.name()
        );
    }

    /// Runs each probe in a child process with its uid/gid; returns what
    /// each connection was answered (the port that accepted it) or
    /// `error: …`.
    fn probe(&self, probes: &[Probe]) -> Vec<String> {
        let cases: Vec<serde_json::Value> = probes
            .iter()
            .map(|p| serde_json::json!([p.uid, p.gid, p.proto, p.host, p.port]))
            .collect();
        let cases = serde_json::Value::Array(cases).to_string();
        let out = self.run(&[python(), "-c", CLIENT, &cases]);
        serde_json::from_str(out.trim()).unwrap()
    }
}

#[derive(Clone, Copy)]
struct Probe {
    uid: Option<u32>,
    gid: Option<u32>,
    proto: &'static str,
    host: &'static str,
    port: u16,
}

/// As `uid`/`gid` (`None`: as root).
fn probe(ids: Option<(u32, u32)>, proto: &'static str, host: &'static str, port: u16) -> Probe {
    Probe {
        uid: ids.map(|i| i.0),
        gid: ids.map(|i| i.1),
        proto,
        host,
        port,
    }
}

const APP: Option<(u32, u32)> = Some((4242, 4242));
const PROXY: Option<(u32, u32)> = Some((1337, 1337));
const ROOT: Option<(u32, u32)> = None;

/// Listens on `proto:port` specs (`@lo`: on loopback only, as a UDP
/// server behind REDIRECT must, so that its replies come from the
/// address the kernel translated to) for IPv4 and IPv6, and answers
/// every TCP connection and UDP datagram with the port it arrived on.
const SERVER: &str = r#"
import selectors, socket, sys
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    spec, _, where = spec.partition('@')
    proto, port = spec.split(':')
    port = int(port)
    addrs = ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')) if where == 'lo' \
        else ((socket.AF_INET, '0.0.0.0'), (socket.AF_INET6, '::'))
    for family, addr in addrs:
        kind = socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        sel.register(s, selectors.EVENT_READ, (proto, port))
print('ready', flush=True)
while True:
    for key, _ in sel.select():
        proto, port = key.data
        if proto == 'tcp':
            conn, _ = key.fileobj.accept()
            try:
                conn.sendall(b'%d\n' % port)
            finally:
                conn.close()
        else:
            _, peer = key.fileobj.recvfrom(512)
            key.fileobj.sendto(b'%d\n' % port, peer)
"#;

/// Runs the probes given as JSON `[[uid, gid, proto, host, port], …]`,
/// each in a forked child that drops to its uid/gid first; prints the
/// answers as a JSON list.
const CLIENT: &str = r#"
import json, os, socket, sys
def probe(uid, gid, proto, host, port):
    if uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        if proto == 'udp':
            s.send(b'?')
        return s.recv(64).decode().strip()
    except Exception as e:
        return 'error: ' + type(e).__name__
out = []
for case in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            answer = probe(*case)
        except Exception as e:
            answer = 'error: ' + repr(e)
        os.write(w, answer.encode())
        os._exit(0)
    os.close(w)
    data = b''
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    out.append(data.decode())
print(json.dumps(out))
"#;

/// The real python3 (not a pyenv shim), found once.
fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let output = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is needed for the traffic tests");
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    })
}

/// The backends installed here: each test runs with every one.
fn backends() -> Vec<Backend> {
    let found: Vec<Backend> = [Backend::Legacy, Backend::Nft]
        .into_iter()
        .filter(|b| b.installed())
        .collect();
    assert!(
        !found.is_empty(),
        "neither iptables-legacy nor iptables-nft is installed (Debian package iptables)"
    );
    found
}

fn ipv6(backend: Backend) -> bool {
    Command::new(backend.binary(Family::V6))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `iptables-save` output without comments and counters.
fn normalize(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines().filter(|l| !l.starts_with('#')) {
        let line = match line.strip_prefix(':') {
            Some(chain) => match chain.rsplit_once(" [") {
                Some((head, _)) => format!(":{head}"),
                None => line.to_string(),
            },
            None => match line.strip_prefix('[') {
                Some(rest) => rest.split_once("] ").map_or(line, |(_, r)| r).to_string(),
                None => line.to_string(),
            },
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn dns_config(nameservers: &[&str]) -> CaptureConfig {
    CaptureConfig {
        dns: Some(DnsCapture::new(
            nameservers
                .iter()
                .map(|n| n.parse::<IpAddr>().unwrap())
                .collect(),
        )),
        ..CaptureConfig::default()
    }
}

fn lines_of<'a>(save: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    save.lines().filter(|l| l.starts_with(&prefix)).collect()
}

#[test]
fn apply_installs_istios_chains_and_jumps() {
    for backend in backends() {
        let ns = netns("rules");
        let runner = ns.runner(backend).ipv6(Ipv6::Required);
        let families = capture::apply(&CaptureConfig::default(), &runner).unwrap();
        assert_eq!(families, [Family::V4, Family::V6], "{backend}");

        for (family, loopback) in [(Family::V4, "127.0.0.1/32"), (Family::V6, "::1/128")] {
            let save = ns.save(backend, family);
            let context = format!("{backend} {family}:\n{save}");
            for chain in [
                "ISTIO_INBOUND",
                "ISTIO_IN_REDIRECT",
                "ISTIO_OUTPUT",
                "ISTIO_REDIRECT",
            ] {
                assert!(
                    save.contains(&format!("\n:{chain} -\n")),
                    "{chain} missing, {context}"
                );
            }
            assert!(!save.contains("ISTIO_OUTPUT_DNS"), "{context}");
            assert_eq!(
                lines_of(&save, "PREROUTING"),
                ["-A PREROUTING -p tcp -j ISTIO_INBOUND"],
                "{context}"
            );
            assert_eq!(
                lines_of(&save, "OUTPUT"),
                ["-A OUTPUT -p tcp -j ISTIO_OUTPUT"],
                "{context}"
            );
            assert_eq!(
                lines_of(&save, "ISTIO_IN_REDIRECT"),
                ["-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"],
                "{context}"
            );
            assert_eq!(
                lines_of(&save, "ISTIO_REDIRECT"),
                ["-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"],
                "{context}"
            );
            let inbound = lines_of(&save, "ISTIO_INBOUND");
            assert_eq!(inbound.len(), 5, "{context}");
            for (line, port) in inbound.iter().zip([22, 15090, 15021, 15020]) {
                assert!(
                    line.contains(&format!("--dport {port} -j RETURN")),
                    "{context}"
                );
            }
            assert_eq!(
                inbound[4], "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
                "{context}"
            );
            let output = lines_of(&save, "ISTIO_OUTPUT");
            assert_eq!(output.len(), 9, "{context}");
            assert!(
                output.contains(&"-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
                "{context}"
            );
            assert!(
                output.contains(&"-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN"),
                "{context}"
            );
            assert!(
                output
                    .iter()
                    .any(|l| l.contains(&format!("! -d {loopback}"))
                        && l.contains("-o lo")
                        && l.contains("--uid-owner 1337 -j ISTIO_IN_REDIRECT")),
                "{context}"
            );
            assert_eq!(
                output[7],
                format!("-A ISTIO_OUTPUT -d {loopback} -j RETURN"),
                "{context}"
            );
            assert_eq!(output[8], "-A ISTIO_OUTPUT -j ISTIO_REDIRECT", "{context}");
        }

        // DNS capture adds its chain, for the nameservers only.
        capture::apply(&dns_config(&["10.99.0.1", "fd99::1"]), &runner).unwrap();
        let (v4, v6) = ns.saves(backend);
        for (save, ns_net) in [(&v4, "10.99.0.1/32"), (&v6, "fd99::1/128")] {
            assert!(
                save.contains("\n:ISTIO_OUTPUT_DNS -\n"),
                "{backend}:\n{save}"
            );
            let dns = lines_of(save, "ISTIO_OUTPUT_DNS");
            assert_eq!(dns.len(), 4, "{backend}:\n{save}");
            assert!(
                dns[0].contains("--uid-owner 1337 -j RETURN"),
                "{backend}:\n{save}"
            );
            assert!(
                dns[1].contains("--gid-owner 1337 -j RETURN"),
                "{backend}:\n{save}"
            );
            assert!(
                dns[2].contains("-m mark --mark 0x539 -j RETURN"),
                "the agent's forwarded queries go out: {backend}:\n{save}"
            );
            assert!(
                dns[3].contains(&format!("-d {ns_net}"))
                    && dns[3].contains("-p udp")
                    && dns[3].contains("--dport 53 -j REDIRECT --to-ports 15053"),
                "{backend}:\n{save}"
            );
            assert!(
                lines_of(save, "ISTIO_OUTPUT")
                    .iter()
                    .any(|l| l.contains(&format!("-d {ns_net}"))
                        && l.contains("--dport 53 -j REDIRECT --to-ports 15053")),
                "{backend}:\n{save}"
            );
            assert_eq!(lines_of(save, "OUTPUT").len(), 2, "{backend}:\n{save}");
        }
    }
}

#[test]
fn apply_twice_is_apply_once() {
    for backend in backends() {
        let ns = netns("twice");
        let runner = ns.runner(backend);
        for config in [
            CaptureConfig::default(),
            dns_config(&["10.99.0.1", "fd99::1"]),
        ] {
            capture::apply(&config, &runner).unwrap();
            let once = ns.saves(backend);
            capture::apply(&config, &runner).unwrap();
            assert_eq!(ns.saves(backend), once, "{backend}");
        }

        // Going back to a smaller configuration leaves what applying it
        // in a fresh namespace leaves.
        let smaller = CaptureConfig {
            inbound_ports: Ports::List(vec![8080]),
            ..CaptureConfig::default()
        };
        capture::apply(&smaller, &runner).unwrap();
        let fresh = netns("fresh");
        capture::apply(&smaller, &fresh.runner(backend)).unwrap();
        assert_eq!(ns.saves(backend), fresh.saves(backend), "{backend}");
        assert!(
            !ns.saves(backend).0.contains("ISTIO_OUTPUT_DNS"),
            "{backend}"
        );
    }
}

#[test]
fn cleanup_restores_the_nat_table_exactly() {
    for backend in backends() {
        let ns = netns("clean");
        let runner = ns.runner(backend);
        // Nothing applied yet: fine, and nothing changes.
        let empty = ns.saves(backend);
        let families = capture::cleanup(&runner).unwrap();
        assert_eq!(families.contains(&Family::V6), ipv6(backend), "{backend}");
        assert_eq!(ns.saves(backend), empty, "{backend}");

        // Someone else's rules, before and around ours, in both families.
        for family in [Family::V4, Family::V6] {
            for rule in [
                "-N SOMEONE_ELSE",
                "-A SOMEONE_ELSE -p tcp --dport 9999 -j RETURN",
                "-A PREROUTING -p tcp --dport 2222 -j REDIRECT --to-ports 22",
                "-A OUTPUT -p tcp -j SOMEONE_ELSE",
                "-A POSTROUTING -o lo -j RETURN",
            ] {
                ns.iptables(backend, family, rule);
            }
        }
        let before = ns.saves(backend);
        capture::apply(&dns_config(&["10.99.0.1", "fd99::1"]), &runner).unwrap();
        assert_ne!(ns.saves(backend), before);
        capture::apply(&CaptureConfig::default(), &runner).unwrap();
        // One more of theirs, added after our jump.
        for family in [Family::V4, Family::V6] {
            ns.iptables(backend, family, "-A OUTPUT -p udp -j SOMEONE_ELSE");
        }

        capture::cleanup(&runner).unwrap();
        let after = ns.saves(backend);
        assert!(
            !after.0.contains("ISTIO") && !after.1.contains("ISTIO"),
            "{backend}"
        );
        // Theirs is still there (deleting it succeeds), and then the table
        // is exactly as before.
        for family in [Family::V4, Family::V6] {
            ns.iptables(backend, family, "-D OUTPUT -p udp -j SOMEONE_ELSE");
        }
        let after = ns.saves(backend);
        assert_eq!(after.0, before.0, "{backend} IPv4");
        assert_eq!(after.1, before.1, "{backend} IPv6");

        // Again: nothing to do, nothing changes.
        capture::cleanup(&runner).unwrap();
        assert_eq!(ns.saves(backend), after, "{backend}");
    }
}

#[test]
fn cleanup_is_exact_against_a_snapshot() {
    // The plainest form of the claim: snapshot, apply (twice), clean up,
    // compare.
    for backend in backends() {
        let ns = netns("snap");
        let runner = ns.runner(backend);
        ns.iptables(backend, Family::V4, "-A OUTPUT -d 10.1.2.3/32 -j RETURN");
        ns.iptables(backend, Family::V6, "-A PREROUTING -p udp -j RETURN");
        let before = ns.saves(backend);
        capture::apply(&dns_config(&["10.99.0.1", "fd99::1"]), &runner).unwrap();
        capture::apply(&dns_config(&["10.99.0.1", "fd99::1"]), &runner).unwrap();
        capture::cleanup(&runner).unwrap();
        assert_eq!(ns.saves(backend), before, "{backend}");
    }
}

#[test]
fn cleanup_leaves_a_chain_someone_else_still_uses() {
    for backend in backends() {
        let ns = netns("foreign");
        let runner = ns.runner(backend).ipv6(Ipv6::Off);
        let before = ns.save(backend, Family::V4);
        capture::apply(&CaptureConfig::default(), &runner).unwrap();
        ns.iptables(
            backend,
            Family::V4,
            "-A PREROUTING -p udp --dport 7 -j ISTIO_REDIRECT",
        );
        let err = capture::cleanup(&runner).unwrap_err();
        assert!(
            matches!(&err, CaptureError::ForeignReference { chain, .. } if chain == "ISTIO_REDIRECT"),
            "{backend}: {err}"
        );
        let save = ns.save(backend, Family::V4);
        assert!(
            save.contains("--dport 7 -j ISTIO_REDIRECT"),
            "{backend}:\n{save}"
        );
        // Capture itself is off already.
        assert!(lines_of(&save, "OUTPUT").is_empty(), "{backend}:\n{save}");
        ns.iptables(
            backend,
            Family::V4,
            "-D PREROUTING -p udp --dport 7 -j ISTIO_REDIRECT",
        );
        capture::cleanup(&runner).unwrap();
        assert_eq!(ns.save(backend, Family::V4), before, "{backend}");
    }
}

#[test]
fn detection_finds_the_backend_holding_our_chains() {
    let installed = backends();
    for backend in &installed {
        let ns = netns("detect");
        capture::apply(&CaptureConfig::default(), &ns.runner(*backend)).unwrap();
        let detected = Runner::detect_in_namespace(ns.name()).unwrap();
        assert_eq!(detected.backend(), *backend);
        capture::cleanup(&detected).unwrap();
        assert!(!ns.saves(*backend).0.contains("ISTIO"));
    }
    // A fresh namespace: some installed backend.
    let ns = netns("detect");
    let detected = Runner::detect_in_namespace(ns.name()).unwrap();
    assert!(
        installed.contains(&detected.backend()),
        "{}",
        detected.backend()
    );
}

#[test]
fn traffic_is_captured_but_never_the_proxys_own_nor_ssh() {
    for backend in backends() {
        // "vm" (10.99.0.2, fd99::2) is captured; "remote" (10.99.0.1 and
        // 10.99.0.200, fd99::1) is the rest of the world.
        let vm = netns("vm");
        let remote = netns("remote");
        vm.run(&[
            "ip",
            "link",
            "add",
            "vm0",
            "type",
            "veth",
            "peer",
            "name",
            "rm0",
            "netns",
            remote.name(),
        ]);
        vm.run(&["ip", "addr", "add", "10.99.0.2/24", "dev", "vm0"]);
        vm.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd99::2/64",
            "dev",
            "vm0",
            "nodad",
        ]);
        vm.run(&["ip", "link", "set", "vm0", "up"]);
        remote.run(&["ip", "addr", "add", "10.99.0.1/24", "dev", "rm0"]);
        remote.run(&["ip", "addr", "add", "10.99.0.200/24", "dev", "rm0"]);
        remote.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd99::1/64",
            "dev",
            "rm0",
            "nodad",
        ]);
        remote.run(&["ip", "link", "set", "rm0", "up"]);

        // Stand-ins: Envoy's capture ports, the agent's DNS proxy, SSH, a
        // health port and an application on the VM; a web server and a
        // nameserver outside.
        vm.serve(&[
            "tcp:15001",
            "tcp:15006",
            "tcp:22",
            "tcp:15021",
            "tcp:8080",
            "tcp:15053",
            "udp:15053@lo",
        ]);
        remote.serve(&["tcp:80", "tcp:53", "udp:53"]);

        let before = vm.probe(&[
            probe(APP, "tcp", "10.99.0.1", 80),
            probe(APP, "udp", "10.99.0.1", 53),
            probe(APP, "tcp", "fd99::1", 80),
        ]);
        assert_eq!(before, ["80", "53", "80"], "{backend}: the topology works");
        assert_eq!(
            remote.probe(&[probe(ROOT, "tcp", "10.99.0.2", 8080)]),
            ["8080"],
            "{backend}"
        );

        let config = CaptureConfig {
            exclude_outbound_cidrs: vec!["10.99.0.200/32".parse().unwrap()],
            ..dns_config(&["10.99.0.1", "fd99::1"])
        };
        let families = capture::apply(&config, &vm.runner(backend)).unwrap();
        assert_eq!(families, [Family::V4, Family::V6], "{backend}");

        let cases = [
            // The application's outbound TCP goes to Envoy; the proxy's
            // (by uid or by gid) goes out; excluded CIDRs go out.
            (probe(APP, "tcp", "10.99.0.1", 80), "15001"),
            (probe(PROXY, "tcp", "10.99.0.1", 80), "80"),
            (probe(Some((4242, 1337)), "tcp", "10.99.0.1", 80), "80"),
            (probe(APP, "tcp", "10.99.0.200", 80), "80"),
            (probe(APP, "tcp", "fd99::1", 80), "15001"),
            (probe(PROXY, "tcp", "fd99::1", 80), "80"),
            // DNS to the nameserver goes to the agent, except the agent's
            // own forwarding (no loop).
            (probe(APP, "udp", "10.99.0.1", 53), "15053"),
            (probe(APP, "tcp", "10.99.0.1", 53), "15053"),
            (probe(PROXY, "udp", "10.99.0.1", 53), "53"),
            (probe(PROXY, "tcp", "10.99.0.1", 53), "53"),
            (probe(APP, "udp", "fd99::1", 53), "15053"),
            (probe(PROXY, "udp", "fd99::1", 53), "53"),
            // Loopback: the application calling itself is left alone; the
            // proxy calling the VM's own address goes through inbound.
            (probe(APP, "tcp", "10.99.0.2", 8080), "8080"),
            (probe(APP, "tcp", "127.0.0.1", 8080), "8080"),
            (probe(PROXY, "tcp", "10.99.0.2", 8080), "15006"),
            (probe(PROXY, "tcp", "127.0.0.1", 8080), "8080"),
        ];
        let answers = vm.probe(&cases.map(|c| c.0));
        let expected: Vec<&str> = cases.iter().map(|c| c.1).collect();
        assert_eq!(answers, expected, "{backend}: outbound from the VM");

        // Inbound: to Envoy, except SSH and the excluded ports.
        let inbound = [
            (probe(ROOT, "tcp", "10.99.0.2", 8080), "15006"),
            (probe(ROOT, "tcp", "10.99.0.2", 22), "22"),
            (probe(ROOT, "tcp", "10.99.0.2", 15021), "15021"),
            (probe(ROOT, "tcp", "fd99::2", 8080), "15006"),
            (probe(ROOT, "tcp", "fd99::2", 22), "22"),
        ];
        let answers = remote.probe(&inbound.map(|c| c.0));
        let expected: Vec<&str> = inbound.iter().map(|c| c.1).collect();
        assert_eq!(answers, expected, "{backend}: inbound to the VM");

        // After cleanup, nothing is captured.
        capture::cleanup(&vm.runner(backend)).unwrap();
        assert_eq!(
            vm.probe(&[
                probe(APP, "tcp", "10.99.0.1", 80),
                probe(APP, "udp", "10.99.0.1", 53),
                probe(APP, "tcp", "fd99::1", 80),
            ]),
            ["80", "53", "80"],
            "{backend}: after cleanup"
        );
        assert_eq!(
            remote.probe(&[
                probe(ROOT, "tcp", "10.99.0.2", 8080),
                probe(ROOT, "tcp", "fd99::2", 8080),
            ]),
            ["8080", "8080"],
            "{backend}: after cleanup"
        );
    }
}
