//! The DNS proxy's speed, in one run on this machine, with dnsmasq on
//! loopback as the upstream resolver:
//! - answers from the name table (1,000 services): queries per second and
//!   p99 latency with 16 concurrent clients;
//! - a forwarded name, one query at a time, through the proxy versus asked
//!   of the upstream directly (interleaved): the ratio of mean latencies,
//!   twice: with dnsmasq on loopback (answers in tens of microseconds, so
//!   the proxy's own hop weighs most), and with an upstream 1 ms away, as
//!   a VPC resolver is (a responder of the bench's own that answers after
//!   1 ms: this machine's kernel has no netem to delay a link).
//!
//! Targets: local answers ≥ 50,000 qps; forwarded ≤ 1.1× direct.
//! Needs `dnsmasq` (scripts/install-deps.sh installs it).

// Latency is wall-clock time.
#![allow(clippy::disallowed_types)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use vmesh_agent::dns::{DnsConfig, DnsMetrics, DnsProxy, NameIndex, ResolvConf};
use vmesh_proto::nds::NameTable;
use vmesh_proto::nds::name_table::NameInfo;

const SERVICES: usize = 1_000;
const CLIENTS: usize = 16;
const LOCAL_RUN: Duration = Duration::from_secs(3);
const FORWARDED: usize = 2_000;

fn query(name: &str, id: u16) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    message.to_vec().unwrap()
}

/// dnsmasq on 127.0.0.1:`port`, answering example.test itself.
struct Upstream(std::process::Child);

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_upstream(port: u16) -> Upstream {
    let mut command = Command::new("dnsmasq");
    command.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--pid-file=",
        "--address=/example.test/10.99.0.7",
        &format!("--port={port}"),
    ]);
    // As root dnsmasq would switch to a user that may not exist here.
    if is_root() {
        command.arg("--user=root");
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq is needed (scripts/install-deps.sh)");
    Upstream(child)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

async fn ask(socket: &UdpSocket, bytes: &[u8], buf: &mut [u8]) -> Duration {
    let started = Instant::now();
    socket.send(bytes).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), socket.recv(buf))
        .await
        .expect("an answer within 2 s")
        .unwrap();
    started.elapsed()
}

async fn client(target: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(target).await.unwrap();
    socket
}

/// A resolver 1 ms away: answers every A query with 10.99.0.8 after 1 ms.
fn start_distant_upstream() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
            answer.metadata.recursion_desired = query.metadata.recursion_desired;
            answer.metadata.recursion_available = true;
            for question in &query.queries {
                answer.add_query(question.clone());
                answer.add_answer(hickory_proto::rr::Record::from_rdata(
                    question.name().clone(),
                    30,
                    hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A(
                        std::net::Ipv4Addr::new(10, 99, 0, 8),
                    )),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
            let _ = socket.send_to(&answer.to_vec().unwrap(), from);
        }
    });
    addr
}

/// A proxy with `table` forwarding to `upstream`; returns where it listens.
async fn start_proxy(table: &NameTable, upstream: SocketAddr) -> SocketAddr {
    let resolv = ResolvConf {
        nameservers: vec![upstream.ip()],
        search: vec!["bench.svc.cluster.local".into()],
    };
    let mut config = DnsConfig::new(resolv.clone(), "bench");
    config.listen = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    config.upstream_port = upstream.port();
    let index = Arc::new(NameIndex::new(table, "bench", &resolv.search));
    let (keep, index) = watch::channel(index);
    let proxy = DnsProxy::bind(config, index, DnsMetrics::default())
        .await
        .unwrap();
    let addr = proxy.local_addrs()[0];
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        proxy.serve(shutdown).await;
        drop((keep, stop));
    });
    addr
}

/// Mean latencies through `proxy` and straight to `upstream`, interleaved.
async fn forwarded_vs_direct(
    proxy: SocketAddr,
    upstream: SocketAddr,
    count: usize,
) -> (Duration, Duration) {
    let through = client(proxy).await;
    let direct = client(upstream).await;
    let mut buf = vec![0u8; 4096];
    let (mut forwarded, mut straight) = (Vec::new(), Vec::new());
    for i in 0..count {
        let bytes = query(&format!("host-{}.example.test", i % 50), i as u16);
        forwarded.push(ask(&through, &bytes, &mut buf).await);
        straight.push(ask(&direct, &bytes, &mut buf).await);
    }
    (mean(&forwarded), mean(&straight))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn mean(samples: &[Duration]) -> Duration {
    samples.iter().sum::<Duration>() / samples.len() as u32
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let port = free_port();
    let _upstream = start_upstream(port);
    let upstream = SocketAddr::from(([127, 0, 0, 1], port));

    let table = NameTable {
        table: (0..SERVICES)
            .map(|i| {
                (
                    format!("svc-{i}.bench.svc.cluster.local"),
                    NameInfo {
                        ips: vec![format!("10.96.{}.{}", i / 250, i % 250 + 1)],
                        registry: "Kubernetes".into(),
                        shortname: format!("svc-{i}"),
                        namespace: "bench".into(),
                    },
                )
            })
            .collect(),
    };
    let proxy_addr = start_proxy(&table, upstream).await;
    let distant = start_distant_upstream();
    let distant_proxy = start_proxy(&table, distant).await;

    // The upstream is up when it answers.
    let probe = client(upstream).await;
    let mut buf = vec![0u8; 4096];
    for attempt in 0.. {
        probe.send(&query("example.test", 1)).await.unwrap();
        if tokio::time::timeout(Duration::from_millis(200), probe.recv(&mut buf))
            .await
            .is_ok()
        {
            break;
        }
        assert!(attempt < 50, "dnsmasq did not start");
    }

    // Local answers, 16 clients as fast as they can.
    let deadline = Instant::now() + LOCAL_RUN;
    let mut workers = Vec::new();
    for c in 0..CLIENTS {
        workers.push(tokio::spawn(async move {
            let socket = client(proxy_addr).await;
            let mut buf = vec![0u8; 4096];
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let name = format!("svc-{}.bench", i % SERVICES);
                latencies.push(ask(&socket, &query(&name, i as u16), &mut buf).await);
                i += CLIENTS;
            }
            latencies
        }));
    }
    let mut local = Vec::new();
    for worker in workers {
        local.extend(worker.await.unwrap());
    }
    local.sort();
    let qps = local.len() as f64 / LOCAL_RUN.as_secs_f64();

    // Forwarded versus direct, one query at a time, interleaved.
    let (near_forwarded, near_direct) = forwarded_vs_direct(proxy_addr, upstream, FORWARDED).await;
    let near = near_forwarded.as_secs_f64() / near_direct.as_secs_f64();
    let (far_forwarded, far_direct) =
        forwarded_vs_direct(distant_proxy, distant, FORWARDED / 4).await;
    let far = far_forwarded.as_secs_f64() / far_direct.as_secs_f64();

    println!("DNS proxy, {SERVICES} services in the table, dnsmasq on loopback upstream");
    println!(
        "  local answers ({CLIENTS} clients, {:?}): {qps:>9.0} qps   p50 {:>7.1?}   p99 {:>7.1?}   target ≥ 50,000 qps   {}",
        LOCAL_RUN,
        percentile(&local, 0.5),
        percentile(&local, 0.99),
        verdict(qps >= 50_000.0)
    );
    println!(
        "  forwarded, dnsmasq on loopback: mean {near_forwarded:>7.1?} vs direct {near_direct:>7.1?} = {near:.2}× (+{:.1?})   target ≤ 1.1×   {}",
        near_forwarded.saturating_sub(near_direct),
        verdict(near <= 1.1)
    );
    println!(
        "  forwarded, upstream 1 ms away:  mean {far_forwarded:>7.1?} vs direct {far_direct:>7.1?} = {far:.2}× (+{:.1?})   target ≤ 1.1×   {}",
        far_forwarded.saturating_sub(far_direct),
        verdict(far <= 1.1)
    );
}
