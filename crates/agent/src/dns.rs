//! The agent's DNS proxy (Istio's, on 15053): UDP and TCP, answering mesh
//! names from the name table the control plane pushes (`names`) and
//! forwarding everything else, unchanged, to the nameservers of the VM's
//! `resolv.conf`, with a timeout per try and the next nameserver on failure.
//!
//! Safe by default: a name the table does not have always reaches the
//! upstream resolver; with no table yet (or the control plane gone) every
//! query is forwarded or answered from the last table. The forwarder's own
//! packets carry [`FORWARD_MARK`], which traffic capture exempts, so
//! captured DNS cannot loop back here.
//!
//! This module does not capture traffic (the capture module does) nor
//! fetch the table (the xDS proxy does).

mod names;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, OpCode, ResponseCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use vmesh_proto::nds::NameTable;

pub use names::{Addresses, NameIndex};
use serde::Serialize;

/// The firewall mark on the forwarder's packets (Istio's proxy uid): the
/// capture rules let marked DNS through.
pub const FORWARD_MARK: u32 = 1337;
/// The agent's DNS port.
pub const DEFAULT_PORT: u16 = 15053;
/// The largest DNS message over UDP we accept or send back.
const MAX_UDP: usize = 4096;
/// How long a TCP client may take to send its next query.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP clients served at once; more wait to be accepted.
const MAX_TCP_CLIENTS: usize = 256;

/// Why the DNS proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("binding the DNS proxy on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no upstream nameserver: resolv.conf lists none")]
    NoUpstream,
}

/// What `resolv.conf` says that matters here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResolvConf {
    /// In order, without duplicates; IPv6 zones (`%eth0`) dropped.
    pub nameservers: Vec<IpAddr>,
    /// `search` (or `domain`) domains, in order.
    pub search: Vec<String>,
}

impl ResolvConf {
    /// Parses `resolv.conf` text; unparsable entries are skipped.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    let Some(address) = words.next() else {
                        continue;
                    };
                    let address = address.split('%').next().unwrap_or_default();
                    if let Ok(ip) = address.parse::<IpAddr>()
                        && !conf.nameservers.contains(&ip)
                    {
                        conf.nameservers.push(ip);
                    }
                }
                // The last `search` or `domain` line wins, as in glibc.
                Some("search" | "domain") => {
                    conf.search = words.map(str::to_string).collect();
                }
                _ => {}
            }
        }
        conf
    }
}

/// How the DNS proxy runs.
#[derive(Debug, Clone, Serialize)]
pub struct DnsConfig {
    /// Where it listens, UDP and TCP (`127.0.0.1:15053` and `[::1]:15053`; an
    /// address systemd-resolved can forward `cluster.local` to).
    pub listen: Vec<SocketAddr>,
    pub resolv: ResolvConf,
    /// The upstreams' port: 53, as resolv.conf cannot say otherwise.
    pub upstream_port: u16,
    /// The workload's namespace, for short names.
    pub namespace: String,
    /// How long one try at one upstream may take.
    #[serde(with = "crate::duration_secs")]
    pub timeout: Duration,
    /// Tries per query, across the upstreams in turn.
    pub attempts: u32,
}

impl DnsConfig {
    pub fn new(resolv: ResolvConf, namespace: impl Into<String>) -> DnsConfig {
        DnsConfig {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, DEFAULT_PORT)),
            ],
            resolv,
            upstream_port: 53,
            namespace: namespace.into(),
            timeout: Duration::from_secs(2),
            attempts: 2,
        }
    }
}

/// The DNS proxy's metrics, registered on the status port.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    queries: Counter,
    answered_locally: Counter,
    forwarded: Counter,
    failures: Counter,
    local_seconds: Histogram,
    forward_seconds: Histogram,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        let buckets = || {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.000_05, 2.0, 16,
            ))
        };
        DnsMetrics {
            queries: Counter::default(),
            answered_locally: Counter::default(),
            forwarded: Counter::default(),
            failures: Counter::default(),
            local_seconds: buckets(),
            forward_seconds: buckets(),
        }
    }
}

impl DnsMetrics {
    /// Registers under `dns_…` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let dns = registry.sub_registry_with_prefix("dns");
        dns.register("queries", "DNS queries received", self.queries.clone());
        dns.register(
            "answered_locally",
            "Queries answered from the mesh name table",
            self.answered_locally.clone(),
        );
        dns.register(
            "forwarded",
            "Queries forwarded to the upstream nameservers",
            self.forwarded.clone(),
        );
        dns.register(
            "failures",
            "Queries no upstream answered (SERVFAIL sent) or that could not be parsed",
            self.failures.clone(),
        );
        dns.register(
            "local_answer_seconds",
            "Time to answer from the name table",
            self.local_seconds.clone(),
        );
        dns.register(
            "forward_seconds",
            "Time to get an upstream's answer",
            self.forward_seconds.clone(),
        );
    }
}

struct Shared {
    config: DnsConfig,
    index: watch::Receiver<Arc<NameIndex>>,
    metrics: DnsMetrics,
    /// Idle upstream UDP sockets, connected and marked, by upstream: made
    /// once and reused, so a forward costs no socket set-up.
    idle: parking_lot::Mutex<Vec<(SocketAddr, UdpSocket)>>,
}

/// Idle upstream sockets kept at most.
const MAX_IDLE: usize = 64;

impl Shared {
    async fn forward_udp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        id: u16,
    ) -> std::io::Result<Vec<u8>> {
        let reused = {
            let mut idle = self.idle.lock();
            idle.iter()
                .position(|(to, _)| *to == upstream)
                .map(|i| idle.swap_remove(i).1)
        };
        let socket = match reused {
            Some(socket) => socket,
            None => upstream_socket(upstream).await?,
        };
        let answer = exchange_udp(&socket, query, id).await?;
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push((upstream, socket));
        }
        Ok(answer)
    }
}

/// A DNS proxy bound to its addresses.
pub struct DnsProxy {
    shared: Arc<Shared>,
    udp: Vec<Arc<UdpSocket>>,
    tcp: Vec<TcpListener>,
}

impl std::fmt::Debug for DnsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsProxy")
            .field("listen", &self.local_addrs())
            .finish_non_exhaustive()
    }
}

/// Keeps the index current with the name tables published on `tables`.
pub fn index_tables(
    mut tables: watch::Receiver<Option<Arc<NameTable>>>,
    namespace: String,
    search: Vec<String>,
) -> watch::Receiver<Arc<NameIndex>> {
    let build = move |table: &Option<Arc<NameTable>>| {
        Arc::new(match table {
            Some(table) => NameIndex::new(table, &namespace, &search),
            None => NameIndex::default(),
        })
    };
    let (publish, index) = watch::channel(build(&tables.borrow_and_update()));
    tokio::spawn(async move {
        while tables.changed().await.is_ok() {
            let next = build(&tables.borrow_and_update());
            tracing::info!(names = next.len(), "DNS name table updated");
            if publish.send(next).is_err() {
                return;
            }
        }
    });
    index
}

impl DnsProxy {
    /// Binds UDP and TCP on every listen address. An address of the other
    /// family that this machine lacks (no `::1`) is skipped with a warning.
    pub async fn bind(
        config: DnsConfig,
        index: watch::Receiver<Arc<NameIndex>>,
        metrics: DnsMetrics,
    ) -> Result<DnsProxy, DnsError> {
        if config.resolv.nameservers.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for (i, addr) in config.listen.iter().enumerate() {
            let bound = async {
                let socket = UdpSocket::bind(addr).await?;
                let listener = TcpListener::bind(addr).await?;
                Ok::<_, std::io::Error>((socket, listener))
            };
            match bound.await {
                Ok((socket, listener)) => {
                    udp.push(Arc::new(socket));
                    tcp.push(listener);
                }
                Err(e) if i > 0 && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tracing::warn!(%addr, "DNS proxy not listening there: {e}");
                }
                Err(source) => {
                    return Err(DnsError::Bind {
                        addr: *addr,
                        source,
                    });
                }
            }
        }
        Ok(DnsProxy {
            shared: Arc::new(Shared {
                config,
                index,
                metrics,
                idle: parking_lot::Mutex::default(),
            }),
            udp,
            tcp,
        })
    }

    /// The UDP addresses bound (TCP is bound on the same).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` turns true.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) {
        let mut tasks = JoinSet::new();
        for socket in self.udp {
            tasks.spawn(serve_udp(self.shared.clone(), socket));
        }
        for listener in self.tcp {
            tasks.spawn(serve_tcp(self.shared.clone(), listener));
        }
        crate::stopped(&mut shutdown).await;
        tasks.shutdown().await;
    }
}

/// What to do with one query.
enum Plan {
    /// The answer, from the table.
    Local(Vec<u8>),
    /// The upstreams' to answer.
    Forward(Message),
    /// Not a DNS message: no answer.
    Drop,
}

impl Shared {
    /// Counts `query` and answers it from the table if it is a mesh name.
    fn plan(&self, query: &[u8]) -> Plan {
        let started = Instant::now();
        self.metrics.queries.inc();
        let Ok(message) = Message::from_vec(query) else {
            self.metrics.failures.inc();
            return Plan::Drop;
        };
        let local = self.index.borrow().answer(&message);
        match local.map(|response| response.to_vec()) {
            Some(Ok(bytes)) => {
                self.metrics.answered_locally.inc();
                self.metrics
                    .local_seconds
                    .observe(started.elapsed().as_secs_f64());
                Plan::Local(bytes)
            }
            Some(Err(e)) => {
                tracing::warn!("encoding a DNS answer: {e}");
                self.metrics.failures.inc();
                Plan::Drop
            }
            None => Plan::Forward(message),
        }
    }

    /// The upstreams' answer to `query`, or SERVFAIL when none answered.
    async fn forward(&self, query: &[u8], message: &Message, tcp: bool) -> Option<Vec<u8>> {
        let started = Instant::now();
        self.metrics.forwarded.inc();
        let upstreams = &self.config.resolv.nameservers;
        let mut answer = None;
        for attempt in 0..self.config.attempts.max(1) as usize {
            let upstream = SocketAddr::new(
                upstreams[attempt % upstreams.len()],
                self.config.upstream_port,
            );
            let tried = if tcp {
                tokio::time::timeout(self.config.timeout, forward_tcp(upstream, query)).await
            } else {
                let id = message.metadata.id;
                tokio::time::timeout(self.config.timeout, self.forward_udp(upstream, query, id))
                    .await
            };
            match tried {
                Ok(Ok(bytes)) => {
                    answer = Some(bytes);
                    break;
                }
                Ok(Err(e)) => tracing::debug!(%upstream, "DNS upstream failed: {e}"),
                Err(_) => tracing::debug!(%upstream, "DNS upstream timed out"),
            }
        }
        self.metrics
            .forward_seconds
            .observe(started.elapsed().as_secs_f64());
        if answer.is_some() {
            return answer;
        }
        self.metrics.failures.inc();
        let mut failure =
            Message::error_msg(message.metadata.id, OpCode::Query, ResponseCode::ServFail);
        failure.metadata.recursion_desired = message.metadata.recursion_desired;
        failure.metadata.recursion_available = true;
        failure.queries = message.queries.clone();
        failure.to_vec().ok()
    }
}

/// A socket whose packets capture lets through.
fn marked(socket: socket2::Socket) -> std::io::Result<socket2::Socket> {
    socket.set_mark(FORWARD_MARK)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn domain(addr: &SocketAddr) -> socket2::Domain {
    if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    }
}

/// A UDP socket connected to `upstream`, marked so capture lets it out.
async fn upstream_socket(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = marked(socket2::Socket::new(
        domain(&upstream),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?)?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(upstream).await?;
    Ok(socket)
}

/// Sends `query` and waits for the answer with its id; a late answer to an
/// earlier query on a reused socket is skipped. (Dropped on error or
/// timeout, so a socket is reused only after a clean exchange.)
async fn exchange_udp(socket: &UdpSocket, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let n = socket.recv(&mut buf).await?;
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let socket = marked(socket2::Socket::new(
        domain(&upstream),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let mut stream = socket.connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream).await
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let length = u16::try_from(message.len())
        .map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let length = stream.read_u16().await?;
    let mut message = vec![0u8; usize::from(length)];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

async fn serve_udp(shared: Arc<Shared>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                tracing::debug!("DNS receive: {e}");
                continue;
            }
        };
        // Local answers inline (the common, fast case); forwards on a task
        // of their own so a slow upstream holds up no one else.
        match shared.plan(&buf[..n]) {
            Plan::Local(answer) => {
                let _ = socket.send_to(&answer, client).await;
            }
            Plan::Forward(message) => {
                let query = buf[..n].to_vec();
                let (shared, socket) = (shared.clone(), socket.clone());
                tokio::spawn(async move {
                    if let Some(answer) = shared.forward(&query, &message, false).await {
                        let _ = socket.send_to(&answer, client).await;
                    }
                });
            }
            Plan::Drop => {}
        }
    }
}

async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let Ok(permit) = clients.clone().acquire_owned().await else {
            return;
        };
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: do not spin.
                tracing::debug!("DNS accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // One connection may carry several queries, answered in turn;
            // an idle one is closed.
            while let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await
            {
                let answer = match shared.plan(&query) {
                    Plan::Local(answer) => Some(answer),
                    Plan::Forward(message) => shared.forward(&query, &message, true).await,
                    Plan::Drop => None,
                };
                let Some(answer) = answer else {
                    return;
                };
                if write_framed(&mut stream, &answer).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_and_search() {
        let conf = ResolvConf::parse(
            "# comment\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\n\
             nameserver bogus\ndomain first.example\nsearch vm-workloads.svc.cluster.local corp.example ; tail\noptions ndots:5\n",
        );
        assert_eq!(
            conf.nameservers,
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(
            conf.search,
            ["vm-workloads.svc.cluster.local", "corp.example"]
        );
    }
}
